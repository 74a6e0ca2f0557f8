#!/usr/bin/env python3
"""Where the CPU goes: each process's CPU time per short connection and per MiB.

bench.py says how fast; this says who pays. It starts the relay, the echo
service and the direct baseline as bench.py does, loads them with the same
client code, and reads each process's user and system CPU time from /proc
(Linux only) around each workload:

  connection  short connections, 8 at a time, 1-byte echo each: us per connection
  request     32 connections of back-to-back 64-byte echo rounds: us per round
  bulk        8 connections echoing at once: ms per MiB (one direction counted)

Beside the CPU time, each process's context switches per unit (voluntary and
not, summed over its live threads: the cost of thread handoffs and GIL
passing, which is most of the system time).

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


def context_switches(pid):
    """Context switches so far of process ``pid``'s live threads (this process: None)."""
    total = 0
    base = "/proc/%s/task" % ("self" if pid is None else pid)
    for tid in os.listdir(base):
        try:
            with open("%s/%s/status" % (base, tid)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass   # the thread ended meanwhile
    return total


def measure(pids, workload):
    """Run ``workload()`` -> (units, rate); (user, system, switches) per unit of
    each process in ``pids``."""
    before = {name: cpu_times(pid) + (context_switches(pid),) for name, pid in pids.items()}
    units, rate = workload()
    after = {name: cpu_times(pid) + (context_switches(pid),) for name, pid in pids.items()}
    cost = {}
    for name in pids:
        cost[name] = tuple((after[name][i] - before[name][i]) / units for i in range(3))
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
    parser.add_argument("--seconds", type=int, default=4,
                        help="seconds of each request run (default 4)")
    parser.add_argument("--pin", action="store_true",
                        help="the relay on the first CPU, the echo server on the second "
                             "(as bench.py --pin)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.exists("/proc/self/stat"):
        print("cost.py reads /proc: it runs on Linux only", file=sys.stderr)
        return 2
    if args.runs < 1 or args.connections < 1 or args.mib < 8:
        print("--runs and --connections must be at least 1, --mib at least 8", file=sys.stderr)
        return 2
    setup_args = argparse.Namespace(target=None, relay=None, pin=args.pin)
    setup = bench.Setup(setup_args)
    try:
        relay = benchkit.tcp_connector(setup.target)
        direct = benchkit.tcp_connector(setup.direct)
        service_pid = setup.service.pid
        direct_pid = setup.direct_child.pid
        relay_pids = {"client": None, "relay": setup.relay_pid, "service": service_pid}
        direct_pids = {"client": None, "server": direct_pid}
        per_stream = (args.mib // 8) << 20
        mib = (per_stream >> 20) * 8

        def connections(connect):
            return lambda: (args.connections, benchkit.connect_rate(connect, args.connections, 8))

        def bulk(connect):
            return lambda: (mib, benchkit.throughput(connect, per_stream, 8))

        def requests(address):
            def run():
                rate = benchkit.request_rate(address, 32, args.seconds)[0]
                return rate * args.seconds, rate
            return run

        # Warm up: threads and buffers grown, as in steady use.
        benchkit.connect_rate(relay, 200, 8)
        benchkit.throughput(relay, 8 << 20, 8)
        rows = []
        # (label, unit, scale to the unit, number format, rate format, loads)
        workloads = (
            ("connection", "us", 1e6, "%.0f", "%.0f/s", connections(relay), connections(direct)),
            ("request", "us", 1e6, "%.0f", "%.0f/s", requests(setup.target),
             requests(setup.direct)),
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
                    switches = benchkit.median([c[name][2] for _, c in runs])
                    total += user + system
                    cells.append(("%s " + number + "+" + number + " (%.1f sw)")
                                 % (name, user, system, switches))
                rows.append((label, subject, rate_format % rate, (number + " %s") % (total, unit),
                             ", ".join(cells)))
        print("CPU per unit of work, user+system (sw: context switches per unit), median of "
              "%d run(s)" % args.runs)
        rows.insert(0, ("workload", "subject", "rate", "total",
                        "each process: user+system (switches)"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths))
                  + "  " + row[4])
    finally:
        setup.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
