#!/usr/bin/env python3
"""The scheduling policy and the CPUs of the relay and its services, A/B on the same processes.

Starts one relay, one echo server and one adapter (in front of a plain Go echo
server, bin-loadgen serve) once, then switches how they run between
interleaved rounds, on the live processes, so that nothing else differs:

  --toggle policy   SCHED_OTHER ("default") against SCHED_BATCH ("batch"),
                    with chrt -a -p; --pin keeps the relay on the first CPU
                    and the services on the second throughout
  --toggle cpus     arrangements, all under SCHED_BATCH, with taskset -a -p:
                    spread (any CPU), pinned (the relay on the first CPU, the
                    services on the second), same (all on the first),
                    relay-only (the relay on the first, the services anywhere)

Loaded by bin-loadgen from ../shared/go-peers (Linux; chrt and taskset from
util-linux). Everything on loopback.

    python3 scripts/cpu_ab.py --toggle policy
    python3 scripts/cpu_ab.py --toggle policy --pin
    python3 scripts/cpu_ab.py --toggle cpus --rounds 4
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402
from bench import Children, free_port_range  # noqa: E402
from vs_go import GO_PEERS, loadgen  # noqa: E402

FIGURES = ("rr_32", "conn", "rtt", "echo_1")
SUBJECTS = ("ours", "adapter")
ARRANGEMENTS = ("spread", "pinned", "same", "relay-only")


def measure(figure, address):
    target = "%s:%d" % address
    if figure == "rr_32":
        return loadgen("rr", target, 32, 4)[0]["req/s"]
    if figure == "conn":
        return loadgen("conn", target, 5000, 8)[0]["conn/s"]
    if figure == "rtt":
        return loadgen("rtt", target, 5000)[0]["p50"]
    if figure == "echo_1":
        return loadgen("echo", target, 256, 1)[0]["MiB/s"]
    raise ValueError(figure)


class Processes(Children):
    """The relay, the echo server, the adapter and the plain echo server behind it."""

    def __init__(self):
        Children.__init__(self)
        py = sys.executable
        try:
            base = free_port_range(8)
            direct = ("127.0.0.1", base)
            self._child([os.path.join(GO_PEERS, "bin-loadgen"), "serve", "%s:%d" % direct,
                         "echo"], wait_for_port=direct)
            relay_address = ("127.0.0.1", base + 1)
            # --cpu-policy default: this script sets the policy itself.
            self.relay = self._child(
                [py, "-m", "tcprelay.relay", str(base + 1), "--host", "127.0.0.1",
                 "--public-bind", "127.0.0.1", "--ports", "%d-%d" % (base + 2, base + 6),
                 "--max-clients", "4000", "--log-level", "warning", "--cpu-policy", "default"],
                wait_for_port=relay_address)
            self.echo = self._child([py, "-m", "tcprelay.echoserver", "127.0.0.1",
                                     str(base + 1), "--log-level", "warning",
                                     "--cpu-policy", "default"])
            self.adapter = self._child([py, "-m", "tcprelay.adapter", "127.0.0.1",
                                        str(base + 1), "%s:%d" % direct, "--log-level",
                                        "warning", "--cpu-policy", "default"])
            self.addresses = {"ours": benchkit.parse_hostport(self.echo.line),
                              "adapter": benchkit.parse_hostport(self.adapter.line)}
        except BaseException:
            self.stop()
            raise

    def set_policy(self, policy):
        flag = ["-b", "0"] if policy == "batch" else ["-o", "0"]
        for child in (self.relay, self.echo, self.adapter):
            subprocess.check_call(["chrt", "-a", "-p"] + flag + [str(child.pid)],
                                  stdout=subprocess.DEVNULL)

    def set_cpus(self, relay_cpus, service_cpus):
        for child, cpus in ((self.relay, relay_cpus), (self.echo, service_cpus),
                            (self.adapter, service_cpus)):
            subprocess.check_call(["taskset", "-a", "-p", "-c", cpus, str(child.pid)],
                                  stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(
        description="The CPU scheduling policy or the CPUs of the relay and its services, "
                    "switched between interleaved rounds on the same processes.")
    parser.add_argument("--toggle", choices=["policy", "cpus"], required=True,
                        help="what changes between runs")
    parser.add_argument("--pin", action="store_true",
                        help="with --toggle policy: the relay on the first CPU, the "
                             "services on the second")
    parser.add_argument("--arrangements", default=",".join(ARRANGEMENTS),
                        help="with --toggle cpus: which, comma-separated (default: all "
                             "of %s)" % ", ".join(ARRANGEMENTS))
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--only", metavar="FIGURES",
                        help="comma-separated figures (default: %s)" % ", ".join(FIGURES))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(GO_PEERS, "bin-loadgen")):
        print("cpu_ab: the Go load generator is not at %s (it comes with the project's "
              "shared tree, not with a clone)" % GO_PEERS, file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("cpu_ab: needs two CPUs; this process may use %s" % cpus, file=sys.stderr)
        return 2
    first, second, anywhere = str(cpus[0]), str(cpus[1]), ",".join(str(c) for c in cpus)
    layouts = {"spread": (anywhere, anywhere), "pinned": (first, second),
               "same": (first, first), "relay-only": (first, anywhere)}
    figures = args.only.split(",") if args.only else list(FIGURES)
    if args.toggle == "policy":
        variants = ["default", "batch"]
    else:
        variants = args.arrangements.split(",")
        for name in variants:
            if name not in layouts:
                parser.error("unknown arrangement %r" % name)
    results = {}
    processes = Processes()
    try:
        if args.toggle == "policy" and args.pin:
            processes.set_cpus(first, second)
        elif args.toggle == "cpus":
            processes.set_policy("batch")
        time.sleep(0.5)
        for number in range(args.rounds):
            for variant in (variants if number % 2 == 0 else variants[::-1]):
                if args.toggle == "policy":
                    processes.set_policy(variant)
                else:
                    processes.set_cpus(*layouts[variant])
                for figure in figures:
                    for subject in SUBJECTS:
                        value = measure(figure, processes.addresses[subject])
                        results.setdefault((figure, subject, variant), []).append(value)
                        print("round %d %-7s %-8s %-10s %10.1f" % (number + 1, figure, subject,
                                                                   variant, value),
                              file=sys.stderr, flush=True)
    finally:
        processes.stop()
    print("medians of %d rounds (rtt: p50 in us; other figures per second or MiB/s); "
          "in brackets, the ratio to the first" % args.rounds)
    for figure in figures:
        for subject in SUBJECTS:
            base = statistics.median(results[figure, subject, variants[0]])
            cells = ["%s %.1f (%.2f)" % (v, statistics.median(results[figure, subject, v]),
                                         statistics.median(results[figure, subject, v]) / base)
                     for v in variants]
            print("%-7s %-8s %s" % (figure, subject, "  ".join(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
