#!/usr/bin/env python3
"""Benchmark muxado sessions against plain TCP, in one run, on loopback.

The server side runs in a child process: a plain threaded echo server (the
direct baseline), or a muxado server session echoing each stream on its own
thread. The client code is the same for both, minus the multiplexing.

    python3 scripts/bench_muxado.py            # table
    python3 scripts/bench_muxado.py --json -   # the same figures as JSON

Figures: throughput_1 (one stream echoing 512 MiB, MiB/s one way),
throughput_8 (eight at once, aggregate), rtt (64-byte ping-pong, p50 and
p99 in microseconds). Each is measured --runs times; the median is shown.
"""

import argparse
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402
from tcprelay import muxado  # noqa: E402

TARGETS = {"throughput_1": 0.25, "throughput_8": 0.30, "rtt": 2.0}


def serve_muxado(window_size):
    """Accept one connection, run a muxado server session, echo every stream."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    sock, _ = listener.accept()
    listener.close()
    session = muxado.server(sock, window_size=window_size, accept_backlog=1024)

    def echo(stream):
        with stream:
            while True:
                data = stream.recv(256 * 1024)
                if not data:
                    return
                stream.sendall(data)

    threading.Thread(target=lambda: sys.stdin.read() or session.close(), daemon=True).start()
    while True:
        try:
            stream = session.accept()
        except muxado.MuxadoError:
            return
        threading.Thread(target=echo, args=(stream,), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (~10 s)")
    parser.add_argument("--window", type=int, default=1 << 20,
                        help="muxado window size in bytes (default 1 MiB)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-': stdout)")
    parser.add_argument("--serve", choices=["direct", "muxado"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "direct":
        return benchkit.serve_direct_echo()
    if args.serve == "muxado":
        return serve_muxado(args.window)

    size = (64 if args.quick else 512) * benchkit.MiB
    size8 = size // 8
    rounds = 1000 if args.quick else 5000
    runs = 1 if args.quick else args.runs
    me = [sys.executable, os.path.abspath(__file__)]
    results = {"throughput_1": ([], []), "throughput_8": ([], []), "rtt": ([], [])}
    p99 = ([], [])
    for _ in range(runs):
        direct = benchkit.Child(me + ["--serve", "direct"])
        mux = benchkit.Child(me + ["--serve", "muxado", "--window", str(args.window)])
        session = None
        try:
            direct_connect = benchkit.tcp_connector(("127.0.0.1", int(direct.line)))
            sock = socket.create_connection(("127.0.0.1", int(mux.line)))
            session = muxado.client(sock, window_size=args.window)

            def mux_connect():
                stream = session.open()
                stream.settimeout(benchkit.IO_TIMEOUT)
                return stream

            for index, connect in ((0, mux_connect), (1, direct_connect)):
                results["throughput_1"][index].append(benchkit.throughput(connect, size, 1))
                results["throughput_8"][index].append(benchkit.throughput(connect, size8, 8))
            both = benchkit.interleaved_round_trips([mux_connect, direct_connect], rounds)
            for index, times in enumerate(both):
                results["rtt"][index].append(benchkit.percentile(times, 0.5))
                p99[index].append(benchkit.percentile(times, 0.99))
        finally:
            if session is not None:
                session.close()
            mux.stop()
            direct.stop()

    figures = {}
    rows = []
    for name in ("throughput_1", "throughput_8", "rtt"):
        subject = benchkit.median(results[name][0])
        direct = benchkit.median(results[name][1])
        ratio = subject / direct
        if name == "rtt":
            met = ratio <= TARGETS[name]
            figures[name] = {"muxado": {"p50_us": subject, "p99_us": benchkit.median(p99[0])},
                             "direct": {"p50_us": direct, "p99_us": benchkit.median(p99[1])},
                             "ratio": ratio}
            rows.append(("rtt p50 (us)", "%.0f (p99 %.0f)" % (subject, benchkit.median(p99[0])),
                         "%.0f (p99 %.0f)" % (direct, benchkit.median(p99[1])),
                         "%.2fx" % ratio, "<= %.1fx" % TARGETS[name], met))
        else:
            met = ratio >= TARGETS[name]
            figures[name] = {"muxado": subject, "direct": direct, "ratio": ratio}
            rows.append(("%s (MiB/s)" % name, "%.0f" % subject, "%.0f" % direct,
                         "%.3f" % ratio, ">= %.2f" % TARGETS[name], met))
    benchkit.print_table(rows, "muxado vs direct TCP, loopback, median of %d run(s), "
                               "window %d KiB" % (runs, args.window // 1024))
    if args.json:
        figures["runs"] = runs
        benchkit.dump_json(figures, args.json)


if __name__ == "__main__":
    main()
