#!/usr/bin/env python3
"""Where the CPU goes: each process's CPU time per short connection and per MiB.

bench.py says how fast; this says who pays. It starts the relay, the echo
service and the direct baseline as bench.py does, loads them with the same
client code, and reads each process's user and system CPU time from /proc
(Linux only) around each workload:

  connection  short connections, 8 at a time, 1-byte echo each: us per connection
  bulk        8 connections echoing at once: ms per MiB (one direction counted)

On 2 cores the relay path's total (client + relay + service) against the
direct path's total (client + server) bounds the ratios bench.py can show.
System time is most of it: copies, wake-ups and GIL handoffs. For their
counts, run `perf stat -e context-switches,syscalls:sys_enter_futex -p PID`
on a process while this runs.

    python3 scripts/cost.py               # median of 3 runs
    python3 scripts/cost.py --runs 5 --connections 5000 --mib 512
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench     # noqa: E402
import benchkit  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid):
    """(user, system) CPU seconds of process ``pid``; None for this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def measure(pids, workload):
    """Run ``workload()`` -> (units, rate); CPU per unit of each process in ``pids``."""
    before = {name: cpu_times(pid) for name, pid in pids.items()}
    units, rate = workload()
    after = {name: cpu_times(pid) for name, pid in pids.items()}
    cost = {}
    for name in pids:
        user = (after[name][0] - before[name][0]) / units
        system = (after[name][1] - before[name][1]) / units
        cost[name] = (user, system)
    return rate, cost


def build_parser():
    parser = argparse.ArgumentParser(
        description="CPU time per short connection and per MiB, for the relay, the echo "
                    "service, the direct baseline and the client (Linux).",
        epilog="Figures are medians over --runs; compare totals, not single cells.")
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument("--connections", type=int, default=3000,
                        help="short connections per run (default 3000)")
    parser.add_argument("--mib", type=int, default=256,
                        help="MiB echoed per bulk run, over 8 connections (default 256)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.exists("/proc/self/stat"):
        print("cost.py reads /proc: it runs on Linux only", file=sys.stderr)
        return 2
    if args.runs < 1 or args.connections < 1 or args.mib < 8:
        print("--runs and --connections must be at least 1, --mib at least 8", file=sys.stderr)
        return 2
    setup_args = argparse.Namespace(target=None, relay=None)
    setup = bench.Setup(setup_args)
    try:
        relay = benchkit.tcp_connector(setup.target)
        direct = benchkit.tcp_connector(setup.direct)
        service_pid = setup.children[-1].pid
        direct_pid = setup.children[0].pid
        relay_pids = {"client": None, "relay": setup.relay_pid, "service": service_pid}
        direct_pids = {"client": None, "server": direct_pid}
        per_stream = (args.mib // 8) << 20
        mib = (per_stream >> 20) * 8

        def connections(connect):
            return lambda: (args.connections, benchkit.connect_rate(connect, args.connections, 8))

        def bulk(connect):
            return lambda: (mib, benchkit.throughput(connect, per_stream, 8))

        # Warm up: threads and buffers grown, as in steady use.
        benchkit.connect_rate(relay, 200, 8)
        benchkit.throughput(relay, 8 << 20, 8)
        rows = []
        # (label, unit, scale to the unit, number format, rate format, loads)
        workloads = (
            ("connection", "us", 1e6, "%.0f", "%.0f/s", connections(relay), connections(direct)),
            ("bulk 8 streams", "ms/MiB", 1e3, "%.2f", "%.0f MiB/s", bulk(relay), bulk(direct)))
        for label, unit, scale, number, rate_format, relay_load, direct_load in workloads:
            samples = {"relay": [], "direct": []}
            for _ in range(args.runs):
                # Alternate subjects within a run: the machine drifts.
                samples["relay"].append(measure(relay_pids, relay_load))
                samples["direct"].append(measure(direct_pids, direct_load))
            for subject, pids in (("relay", relay_pids), ("direct", direct_pids)):
                runs = samples[subject]
                rate = benchkit.median([r for r, _ in runs])
                cells = []
                total = 0.0
                for name in pids:
                    user = benchkit.median([c[name][0] for _, c in runs]) * scale
                    system = benchkit.median([c[name][1] for _, c in runs]) * scale
                    total += user + system
                    cells.append(("%s " + number + "+" + number) % (name, user, system))
                rows.append((label, subject, rate_format % rate, (number + " %s") % (total, unit),
                             ", ".join(cells)))
        print("CPU per unit of work, user+system, median of %d run(s)" % args.runs)
        rows.insert(0, ("workload", "subject", "rate", "total", "each process: user+system"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths))
                  + "  " + row[4])
    finally:
        setup.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
