#!/usr/bin/env python3
"""tcprelay beside the Go relay of the same design, measured by one Go load generator.

Needs the Go peers in ../shared/go-peers (the project's shared tree; a user's
clone has none: then it says so and exits 2). Everything runs on loopback:

  go        bin-v2-relay + bin-v2-service echo (Go muxado/v2)
  ours      python3 -m tcprelay.relay + python3 -m tcprelay.echoserver
  adapter   python3 -m tcprelay.relay + python3 -m tcprelay.adapter in front of
            a plain Go echo server (bin-loadgen serve), the path a real
            server takes
  direct    that Go echo server alone (the floor)

and loads each with bin-loadgen, in interleaved rounds (go, ours, adapter,
direct, then again), medians reported:

  echo_1    one connection echoing --mib MiB; MiB/s one way
  echo_8    eight connections, --mib / 4 MiB each; MiB/s
  rtt       one connection, 5,000 sequential 64-byte rounds; p50 and p99 in us
  conn      5,000 short connections, 8 at a time, 1-byte echo; per second
  rr_32     32 connections of back-to-back 64-byte rounds for --seconds; req/s,
            p50 and p99 in us

    python3 scripts/vs_go.py                 # 3 rounds, a table
    python3 scripts/vs_go.py --rounds 1 --only conn,rr_32
    python3 scripts/vs_go.py --json out.json
    python3 scripts/vs_go.py --pin           # each relay on CPU 0, each service on CPU 1

--pin keeps each relay (Go's and ours) on the first CPU and each service (Go's,
our echo server, the adapter) on the second, ours with --cpu and Go's with
taskset; the load generator and the plain echo server may run anywhere.
"""

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402
from bench import Children, free_port_range  # noqa: E402

GO_PEERS = os.path.join(os.path.dirname(benchkit.ROOT), "shared", "go-peers")
FIGURES = ("echo_1", "echo_8", "rtt", "conn", "rr_32")
SUBJECTS = ("go", "ours", "adapter", "direct")


def loadgen(*args, timeout=300):
    """Run bin-loadgen; its one line of output as a dict of the numbers after each word."""
    out = subprocess.run([os.path.join(GO_PEERS, "bin-loadgen")] + [str(a) for a in args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                         universal_newlines=True).stdout.strip()
    words = out.split()
    values = {}
    for name, value in zip(words, words[1:]):
        if re.match(r"^-?[0-9.]+$", value) and not re.match(r"^-?[0-9.]+$", name):
            values[name] = float(value)
    if "fails" in values and values["fails"]:
        print("  loadgen %s: %s" % (" ".join(str(a) for a in args), out), file=sys.stderr)
    return values, out


def measure(figure, address, mib, seconds):
    """One figure against ``address``: (value, extra text)."""
    target = "%s:%d" % address
    if figure == "echo_1":
        v, _ = loadgen("echo", target, mib, 1)
        return v["MiB/s"], ""
    if figure == "echo_8":
        v, _ = loadgen("echo", target, max(1, mib // 4), 8)
        return v["MiB/s"], ""
    if figure == "rtt":
        v, _ = loadgen("rtt", target, 5000)
        return v["p50"], "p99 %d" % v["p99"]
    if figure == "conn":
        v, _ = loadgen("conn", target, 5000, 8)
        return v["conn/s"], "fails %d" % v.get("fails", 0)
    if figure == "rr_32":
        v, _ = loadgen("rr", target, 32, seconds)
        return v["req/s"], "p50 %d p99 %d" % (v["p50"], v["p99"])
    raise ValueError(figure)


def pinning(pin):
    """(relay CPU, service CPU) as text for --pin, or (None, None); exits if it cannot."""
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("vs_go: --pin needs two CPUs; this process may use %s" % cpus)
    return str(cpus[0]), str(cpus[1])


def on_cpu(cpu, argv):
    """``argv`` run by taskset on ``cpu`` (None: as it is)."""
    return argv if cpu is None else ["taskset", "-c", cpu] + argv


def cpu_option(cpu):
    return [] if cpu is None else ["--cpu", cpu]


class Subjects(Children):
    """The four subjects' processes, started once for all rounds."""

    def __init__(self, pin=False):
        Children.__init__(self)
        self.addresses = {}
        py = sys.executable
        relay_cpu, service_cpu = pinning(pin)
        try:
            base = free_port_range(12)
            direct = ("127.0.0.1", base)
            self._child([os.path.join(GO_PEERS, "bin-loadgen"), "serve", "127.0.0.1:%d" % base,
                         "echo"], wait_for_port=direct)
            self.addresses["direct"] = direct
            go_relay = ("127.0.0.1", base + 1)
            self._child(on_cpu(relay_cpu, [os.path.join(GO_PEERS, "bin-v2-relay"), str(base + 1),
                                           str(base + 2), str(base + 3)]),
                        wait_for_port=go_relay)
            go = self._child(on_cpu(service_cpu, [os.path.join(GO_PEERS, "bin-v2-service"),
                                                  "127.0.0.1:%d" % (base + 1), "echo"]))
            self.addresses["go"] = benchkit.parse_hostport(go.line)
            ours = ("127.0.0.1", base + 4)
            self._child([py, "-m", "tcprelay.relay", str(base + 4), "--host", "127.0.0.1",
                         "--public-bind", "127.0.0.1", "--ports", "%d-%d" % (base + 5, base + 8),
                         "--max-clients", "4000", "--log-level", "warning"]
                        + cpu_option(relay_cpu), wait_for_port=ours)
            echo = self._child([py, "-m", "tcprelay.echoserver", "127.0.0.1", str(base + 4),
                                "--log-level", "warning"] + cpu_option(service_cpu))
            self.addresses["ours"] = benchkit.parse_hostport(echo.line)
            adapter = self._child([py, "-m", "tcprelay.adapter", "127.0.0.1", str(base + 4),
                                   "127.0.0.1:%d" % base, "--log-level", "warning"]
                                  + cpu_option(service_cpu))
            self.addresses["adapter"] = benchkit.parse_hostport(adapter.line)
        except BaseException:
            self.stop()
            raise



def main():
    parser = argparse.ArgumentParser(
        description="tcprelay beside the Go relay of the same design (../shared/go-peers), "
                    "loaded by one Go load generator.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--only", metavar="FIGURES",
                        help="comma-separated figures to run (default: all of %s)"
                             % ", ".join(FIGURES))
    parser.add_argument("--subjects", metavar="NAMES",
                        help="comma-separated subjects (default: all of %s)" % ", ".join(SUBJECTS))
    parser.add_argument("--mib", type=int, default=256,
                        help="MiB echoed by echo_1 (echo_8: a quarter on each; default 256)")
    parser.add_argument("--seconds", type=int, default=5,
                        help="length of each rr_32 run (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout)")
    parser.add_argument("--pin", action="store_true",
                        help="each relay on the first CPU, each service on the second (ours "
                             "with --cpu, Go's with taskset)")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(GO_PEERS, "bin-loadgen")):
        print("vs_go: the Go peers are not at %s (they come with the project's shared tree, "
              "not with a clone); nothing to compare with" % GO_PEERS, file=sys.stderr)
        return 2
    figures = args.only.split(",") if args.only else list(FIGURES)
    subjects = args.subjects.split(",") if args.subjects else list(SUBJECTS)
    for name in figures:
        if name not in FIGURES:
            parser.error("unknown figure %r (figures: %s)" % (name, ", ".join(FIGURES)))
    for name in subjects:
        if name not in SUBJECTS:
            parser.error("unknown subject %r (subjects: %s)" % (name, ", ".join(SUBJECTS)))
    results = {(f, s): [] for f in figures for s in subjects}
    setup = Subjects(args.pin)
    try:
        time.sleep(0.5)   # let every child settle (registrations done, logs quiet)
        for round_number in range(args.rounds):
            for figure in figures:
                for subject in subjects:
                    value, extra = measure(figure, setup.addresses[subject], args.mib,
                                           args.seconds)
                    results[figure, subject].append((value, extra))
                    print("round %d %-7s %-8s %10.1f  %s" % (round_number + 1, figure, subject,
                                                             value, extra), file=sys.stderr)
    finally:
        setup.stop()
    rows = []
    figures_json = {}
    for figure in figures:
        medians = {}
        for subject in subjects:
            values = sorted(results[figure, subject], key=lambda pair: pair[0])
            medians[subject] = values[len(values) // 2]
        row = [figure]
        for subject in subjects:
            row.append("%.0f %s" % medians[subject])
        if "go" in medians and "ours" in medians:
            ours, go = medians["ours"][0], medians["go"][0]
            # for rtt lower is better: the ratio is Go's time over ours
            row.append("%.2f" % ((go / ours) if figure == "rtt" else (ours / go)))
        if "go" in medians and "adapter" in medians:
            adapter, go = medians["adapter"][0], medians["go"][0]
            row.append("%.2f" % ((go / adapter) if figure == "rtt" else (adapter / go)))
        rows.append(row)
        figures_json[figure] = {s: {"median": medians[s][0], "detail": medians[s][1],
                                    "all": [v for v, _ in results[figure, s]]}
                                for s in subjects}
    header = ["figure"] + subjects
    if "go" in subjects and "ours" in subjects:
        header.append("ours/go")
    if "go" in subjects and "adapter" in subjects:
        header.append("adapter/go")
    print("tcprelay beside the Go relay (medians of %d rounds%s; rtt in us, ratios above 1 "
          "mean faster than Go)" % (args.rounds, "; relays on one CPU, services on another"
                                    if args.pin else ""))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    if args.json:
        benchkit.dump_json(figures_json, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
