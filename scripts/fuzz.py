#!/usr/bin/env python3
"""Fuzz tcprelay with the engine the tests use (tests/fuzzing.py), any seed, any size.

    python3 scripts/fuzz.py                              # the CI run: 3,500 session + 1,200 relay cases
    python3 scripts/fuzz.py --cases 100000 --seed 5      # more, with another seed
    python3 scripts/fuzz.py --kind relay --cases 20000
    python3 scripts/fuzz.py --seed 7000 --kind session --replay 1234   # one case again
    python3 scripts/fuzz.py --kind proxy --cases 100000   # PROXY headers (read_header)
    python3 scripts/fuzz.py --kind client --cases 20000   # the service library vs a hostile relay

Session cases feed mutated and random muxado frame streams to a Python server
session over loopback TCP; relay cases send garbage, mutated frames and
half-valid registrations to one live relay while a healthy service's traffic
runs beside them (docs in tests/fuzzing.py). Cases are deterministic per seed;
a failing case is printed with the command that replays it. Exit status: 0 if
every case passed, 1 if any failed, 2 for bad arguments.
"""

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(ROOT, "tests", "fuzzing.py")


def load_engine():
    spec = importlib.util.spec_from_file_location("fuzzing", ENGINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzzing"] = module
    spec.loader.exec_module(module)
    return module


def positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("%r must be at least 1" % text)
    return value


def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return value


def build_parser(fuzzing):
    parser = argparse.ArgumentParser(
        prog="python3 scripts/fuzz.py",
        description="Fuzz tcprelay's muxado sessions and relay (standard library only). "
                    "Deterministic per seed; a failure prints the command that replays it.")
    parser.add_argument("--cases", type=positive, default=None, metavar="N",
                        help="how many cases to run: with --kind both, 4/5 of them session "
                             "cases and 1/5 relay cases (default: the CI run, 3500 session "
                             "and 1200 relay cases)")
    parser.add_argument("--seed", type=int, default=fuzzing.DEFAULT_SEED, metavar="S",
                        help="seed for every case (default: %d, the one CI uses)"
                             % fuzzing.DEFAULT_SEED)
    parser.add_argument("--kind", choices=["session", "relay", "both"] + sorted(fuzzing.EXTRA_KINDS),
                        default="both",
                        help="session: frame streams against a server session; relay: a live "
                             "relay with a healthy service beside the cases; both (default); "
                             + "; ".join("%s: %s" % (k, v[2]) for k, v in
                                         sorted(fuzzing.EXTRA_KINDS.items())))
    parser.add_argument("--replay", type=non_negative, default=None, metavar="CASE",
                        help="run only case number CASE of --kind (one kind, not both) for "
                             "--seed, and print it in full")
    parser.add_argument("--repeat", type=positive, default=1, metavar="R",
                        help="with --replay: run the case R times (for a failure that "
                             "depends on timing); default 1")
    parser.add_argument("--workers", type=positive, default=None, metavar="W",
                        help="cases run at once (default: 24 session, 16 relay)")
    parser.add_argument("--max-failures", type=non_negative, default=25, metavar="F",
                        help="start no new case after F failures; 0 for no limit (default 25)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines, only the summary and failures")
    return parser


def memory():
    """(resident, peak resident) of this process in MiB, from /proc (None elsewhere)."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) / 1024.0
    except (OSError, ValueError):
        return None
    if len(fields) != 2:
        return None
    return fields["VmRSS"], fields["VmHWM"]


class Progress(object):
    """A line on stderr at every tenth of the way (at least every 10,000 cases), with
    the process's memory: it must stay flat however many cases run."""

    def __init__(self, kind, quiet):
        self.kind = kind
        self.quiet = quiet
        self.start = time.monotonic()
        self.shown = 0

    def __call__(self, done, total, failures):
        step = max(1, min(total // 10, 10000))
        if self.quiet or (done < total and done // step == self.shown // step):
            return
        self.shown = done
        rss = memory()
        sys.stderr.write("%s: %d/%d cases, %d failed, %.1fs%s\n"
                         % (self.kind, done, total, failures, time.monotonic() - self.start,
                            ", rss %.0f MiB (peak %.0f MiB)" % rss if rss else ""))
        sys.stderr.flush()


def run(fuzzing, kind, seed, numbers, args, report, make_case=None):
    workers = args.workers or (24 if kind == "session" else 16)
    progress = Progress(kind, args.quiet or len(numbers) < 10)
    if kind in fuzzing.EXTRA_KINDS:
        runner = fuzzing.EXTRA_KINDS[kind][0]
    else:
        runner = fuzzing.run_session_fuzz if kind == "session" else fuzzing.run_relay_fuzz
    return runner(seed, numbers, workers=workers, report=report, progress=progress,
                  make_case=make_case, max_failures=args.max_failures or None)


def replay(fuzzing, args):
    kind = args.kind
    seen = {}
    if kind == "session" or kind in fuzzing.EXTRA_KINDS:
        generate = fuzzing.gen_session_case if kind == "session" else \
            fuzzing.EXTRA_KINDS[kind][1]

        def make_case(seed, n, *env):   # the tls kind's generator takes the relay's env
            case = generate(seed, args.replay, *env)
            seen["case"] = case
            return case._replace(number=n)
    else:
        def make_case(seed, n, env):
            case = fuzzing.gen_relay_case(seed, args.replay, env)
            seen["case"] = case
            return case._replace(number=n)
    numbers = range(args.replay, args.replay + args.repeat)
    report = run(fuzzing, kind, args.seed, numbers, args, fuzzing.Report(args.seed), make_case)
    if "case" in seen:
        if kind in fuzzing.EXTRA_KINDS:
            print(fuzzing.describe_simple_case(seen["case"]))
        else:
            print(fuzzing.describe_case(seen["case"]))
    print()
    print(report.summary())
    if report.failures:
        print()
        print(report.describe_failures(limit=3))
        return 1
    return 0


def main(argv=None):
    fuzzing = load_engine()
    parser = build_parser(fuzzing)
    args = parser.parse_args(argv)
    if args.replay is not None:
        if args.kind == "both":
            parser.error("--replay needs one --kind (not both)")
        if args.cases is not None:
            parser.error("--replay runs one case; leave out --cases")
        return replay(fuzzing, args)
    if args.repeat != 1:
        parser.error("--repeat goes with --replay")
    if args.cases is None:
        counts = {"session": 3500, "relay": 1200}
    elif args.kind == "both":
        relay = max(1, args.cases // 5) if args.cases > 1 else 0
        counts = {"session": args.cases - relay, "relay": relay}
    else:
        counts = {args.kind: args.cases}
    kinds = ["session", "relay"] if args.kind == "both" else [args.kind]
    report = fuzzing.Report(args.seed)
    for kind in kinds:
        if counts.get(kind):
            run(fuzzing, kind, args.seed, range(counts[kind]), args, report)
    print(report.summary())
    rss = memory()
    if rss:
        print("  memory: rss %.0f MiB, peak %.0f MiB" % rss)
    if report.failures:
        print()
        print(report.describe_failures(limit=10))
        print()
        numbered = [(k, n) for k, n, _ in report.failures if n is not None]
        if numbered:
            print("replay the first failing case with:\n  %s"
                  % report.replay_command(*numbered[0]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
