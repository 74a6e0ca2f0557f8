#!/usr/bin/env python3
"""Benchmark the relay against a direct connection, in one run, on loopback.

It starts a relay (python3 -m tcprelay.relay), the echo service
(python3 -m tcprelay.echoserver) and, as the baseline, a plain threaded
Python echo server with no relay, then loads both with the same client code:

  throughput_1  one connection echoing 512 MiB; MiB/s one way
  throughput_8  eight connections at once; aggregate MiB/s
  rtt           64-byte ping-pong, 5,000 round trips; p50 and p99 in us
  connect_rate  5,000 short connections, 8 at a time, 1-byte echo each; per s
  requests_32   32 connections of back-to-back 64-byte echo rounds for 5 s;
                rounds per s, p50 and p99 in us
  adapter_*     connect_rate and requests_32 through the relay and the adapter
                (python3 -m tcprelay.adapter) in front of the direct echo
                server: the path of a real server behind the relay
  hold          2,000 connections open at once, each pinging 64 bytes a second
                for 20 s: failures, the relay's peak RSS and threads, and
                whether its threads and open files return to the start

Each ratio compares relay and direct measured in the same run; with --runs N
the median of N runs is reported (machines are noisy: quote medians).

    python3 scripts/bench.py                  # full run, a table
    python3 scripts/bench.py --quick          # under 30 s
    python3 scripts/bench.py --json out.json  # the same figures as JSON
    python3 scripts/bench.py --relay HOST:PORT   # use a running relay (any, speaking
                                                 # the registration protocol)
    python3 scripts/bench.py --against HOST:PORT # load any public echo address (a Go
                                                 # relay, frp, ...) with the same client
"""

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402

TARGETS = {"throughput_1": 0.30, "throughput_8": 0.30, "rtt": 3.0, "connect_rate": 0.6}
_DATA = os.path.join(benchkit.ROOT, "tests", "data")
TEST_CERT = os.path.join(_DATA, "test-server.pem")   # TLS for --tls: the test certificate
TEST_KEY = os.path.join(_DATA, "test-server.key")
TEST_CA = os.path.join(_DATA, "test-ca.pem")
HOLD_RSS_LIMIT_MIB = 300


def free_port_range(count, low=20000, high=32000):
    """``count`` consecutive free ports below the kernel's ephemeral range."""
    import random
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no %d free consecutive ports in %d-%d" % (count, low, high))


class Children(object):
    """Child processes started in order and stopped in reverse (``stop``)."""

    def __init__(self):
        self.children = []

    def _child(self, args, wait_for_port=None):
        if wait_for_port is None:
            child = benchkit.Child(args)
        else:
            child = _ProcessWaitingForPort(args, wait_for_port)
        self.children.append(child)
        return child

    def stop(self):
        for child in reversed(self.children):
            child.stop()


class Setup(Children):
    """The processes under test for one run."""

    def __init__(self, args, tls=False, direct=True):
        py = sys.executable
        Children.__init__(self)
        self.relay = None
        self.relay_pid = None
        relay_cpu, service_cpu = pin_cpus(args.pin)
        try:
            self.direct_child = self.service = None
            if direct:
                direct = self.direct_child = self._child(
                    [py, os.path.abspath(__file__), "--serve-direct"])
                self.direct = ("127.0.0.1", int(direct.line))
            self.adapter_target = None
            if args.target:
                self.target = benchkit.parse_hostport(args.target)
                return
            if args.relay:
                relay_address = benchkit.parse_hostport(args.relay)
            else:
                base = free_port_range(3)
                relay_address = ("127.0.0.1", base)
                # --max-clients: hold opens 2,000 clients on one service.
                self.relay = self._child(
                    [py, "-m", "tcprelay.relay", str(base), "--host", "127.0.0.1",
                     "--public-bind", "127.0.0.1", "--ports", "%d-%d" % (base + 1, base + 2),
                     "--max-clients", "4000", "--log-level", "warning"]
                    + (["--tls-cert", TEST_CERT, "--tls-key", TEST_KEY] if tls else [])
                    + relay_cpu,
                    wait_for_port=relay_address)
                self.relay_pid = self.relay.pid
            echo = self._child([py, "-m", "tcprelay.echoserver", relay_address[0],
                                str(relay_address[1]), "--log-level", "warning"]
                               + (["--tls", "--tls-ca", TEST_CA] if tls else []) + service_cpu)
            self.service = echo
            host, port = benchkit.parse_hostport(echo.line)
            self.target = ("127.0.0.1" if host == "localhost" else host, port)
            self.adapter_target = None
            if direct and not tls:
                adapter = self._child([py, "-m", "tcprelay.adapter", relay_address[0],
                                       str(relay_address[1]), "%s:%d" % self.direct,
                                       "--log-level", "warning"] + service_cpu)
                host, port = benchkit.parse_hostport(adapter.line)
                self.adapter_target = ("127.0.0.1" if host == "localhost" else host, port)
        except BaseException:
            self.stop()
            raise

def pin_cpus(pin):
    """The --cpu options of (the relay, the services) for --pin: the first CPU
    and the second; empty without --pin. Exits if there are not two."""
    if not pin:
        return [], []
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("bench: --pin needs two CPUs; this process may use %s" % cpus)
    return ["--cpu", str(cpus[0])], ["--cpu", str(cpus[1])]


class _ProcessWaitingForPort(object):
    """A child that prints nothing on stdout; ready once its port accepts."""

    def __init__(self, args, address, timeout=30.0):
        import subprocess
        env = dict(os.environ)
        env["PYTHONPATH"] = benchkit.ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=benchkit.ROOT, env=env)
        try:
            benchkit.wait_connectable(address, timeout, died=lambda: self.proc.poll() is not None)
        except RuntimeError:
            self.stop()
            raise RuntimeError("%s did not start" % " ".join(args))

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=15.0):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout)


def run_hold(setup, connections, seconds):
    pid = setup.relay_pid
    start = benchkit.process_stats(pid) if pid else None
    peak = {"rss": start[0] if start else None, "threads": start[1] if start else None}

    def sample():
        if pid:
            rss, threads, _ = benchkit.process_stats(pid)
            peak["rss"] = max(peak["rss"], rss)
            peak["threads"] = max(peak["threads"], threads)

    failures = benchkit.hold(setup.target, connections, seconds, on_tick=sample)
    sample()
    returned = None
    if pid:
        # Threads and open files must come back once the clients are gone.
        end = time.monotonic() + 15
        while True:
            # "<=": the start may still count pump threads from the figures
            # before, which end on their own once idle.
            rss, threads, fds = benchkit.process_stats(pid)
            returned = threads <= start[1] and fds <= start[2]
            if returned or time.monotonic() > end:
                break
            time.sleep(0.1)   # observing another process: nothing to join
    return {
        "connections": connections,
        "seconds": seconds,
        "failures": failures,
        "relay_peak_rss_mib": round(peak["rss"], 1) if pid else None,
        "relay_peak_threads": peak["threads"] if pid else None,
        "relay_start_rss_mib": round(start[0], 1) if pid else None,
        "relay_start_threads": start[1] if pid else None,
        "returned_to_baseline": returned,
    }


def main():
    parser = argparse.ArgumentParser(
        description="Benchmark the relay against a direct connection, on loopback.",
        epilog="The figures are described in README.md (Performance), the targets and "
               "the method in docs/PERFORMANCE.md.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and one run: under 30 s")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of each ratio figure; the median is reported (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout)")
    parser.add_argument("--relay", metavar="HOST:PORT",
                        help="use this running relay instead of starting one")
    parser.add_argument("--against", "--target", dest="target", metavar="HOST:PORT",
                        help="load this public address (an echo service behind any relay: "
                             "ours, a Go relay, frp) instead of starting a relay and a "
                             "service")
    parser.add_argument("--skip-hold", action="store_true", help="skip the hold figure")
    parser.add_argument("--pin", action="store_true",
                        help="run the relay on the first CPU and the echo server and the "
                             "adapter on the second (--cpu; docs/PERFORMANCE.md)")
    parser.add_argument("--tls", action="store_true",
                        help="also measure throughput through a relay with TLS on its "
                             "service port, against the plain relay (the cost of TLS)")
    parser.add_argument("--serve-direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_direct:
        return benchkit.serve_direct_echo()

    quick = args.quick
    size1 = (64 if quick else 512) * benchkit.MiB
    size8 = size1 // 8
    rounds = 1000 if quick else 5000
    short = 1000 if quick else 5000
    hold_conns, hold_seconds = (200, 5) if quick else (2000, 20)
    runs = 1 if quick else max(1, args.runs)

    samples = {name: ([], []) for name in ("throughput_1", "throughput_8", "rtt", "connect_rate",
                                           "requests_32", "adapter_connect_rate",
                                           "adapter_requests_32")}
    request_p = {name: ([], []) for name in ("requests_32", "adapter_requests_32")}
    request_seconds = 2 if quick else 5
    p99 = ([], [])
    hold_result = None
    tls_samples = {"throughput_1": [], "throughput_8": []}
    for run in range(runs):
        setup = Setup(args)
        try:
            relay = benchkit.tcp_connector(setup.target)
            direct = benchkit.tcp_connector(setup.direct)
            for index, connect in ((0, relay), (1, direct)):
                samples["throughput_1"][index].append(benchkit.throughput(connect, size1, 1))
                samples["throughput_8"][index].append(benchkit.throughput(connect, size8, 8))
                samples["connect_rate"][index].append(benchkit.connect_rate(connect, short, 8))
            for index, address in ((0, setup.target), (1, setup.direct)):
                rate, p50, p99_ = benchkit.request_rate(address, 32, request_seconds)
                samples["requests_32"][index].append(rate)
                request_p["requests_32"][index].append((p50, p99_))
            if setup.adapter_target is not None:
                adapter = benchkit.tcp_connector(setup.adapter_target)
                for index, (connect, address) in enumerate(((adapter, setup.adapter_target),
                                                            (direct, setup.direct))):
                    samples["adapter_connect_rate"][index].append(
                        benchkit.connect_rate(connect, short, 8))
                    rate, p50, p99_ = benchkit.request_rate(address, 32, request_seconds)
                    samples["adapter_requests_32"][index].append(rate)
                    request_p["adapter_requests_32"][index].append((p50, p99_))
            # Round trips alternate between the two in small batches, so that
            # both see the same machine state (see benchkit).
            for index, times in enumerate(benchkit.interleaved_round_trips([relay, direct], rounds)):
                samples["rtt"][index].append(benchkit.percentile(times, 0.5))
                p99[index].append(benchkit.percentile(times, 0.99))
            if run == runs - 1 and not args.skip_hold:
                hold_result = run_hold(setup, hold_conns, hold_seconds)
        finally:
            setup.stop()
        if args.tls and not (args.relay or args.target):
            secure = Setup(args, tls=True, direct=False)
            try:
                connect = benchkit.tcp_connector(secure.target)
                tls_samples["throughput_1"].append(benchkit.throughput(connect, size1, 1))
                tls_samples["throughput_8"].append(benchkit.throughput(connect, size8, 8))
            finally:
                secure.stop()

    figures = {"runs": runs, "quick": quick}
    rows = []
    for name in ("throughput_1", "throughput_8", "rtt", "connect_rate", "requests_32",
                 "adapter_connect_rate", "adapter_requests_32"):
        if not samples[name][0]:
            continue
        subject = benchkit.median(samples[name][0])
        base = benchkit.median(samples[name][1])
        ratio = subject / base
        figures[name] = {"relay": round(subject, 1), "direct": round(base, 1),
                         "ratio": round(ratio, 3)}
        if name == "rtt":
            figures[name].update({"relay_p99": round(benchkit.median(p99[0]), 1),
                                  "direct_p99": round(benchkit.median(p99[1]), 1),
                                  "unit": "us"})
            rows.append(("rtt p50 (us)", "%.0f (p99 %.0f)" % (subject, benchkit.median(p99[0])),
                         "%.0f (p99 %.0f)" % (base, benchkit.median(p99[1])),
                         "%.2fx" % ratio, "<= %gx" % TARGETS[name], ratio <= TARGETS[name]))
        elif name in request_p:
            latency = [benchkit.median([p[i] for p in request_p[name][j]])
                       for j in (0, 1) for i in (0, 1)]
            figures[name].update({"unit": "req/s", "relay_p50": round(latency[0], 1),
                                  "relay_p99": round(latency[1], 1),
                                  "direct_p50": round(latency[2], 1),
                                  "direct_p99": round(latency[3], 1)})
            rows.append(("%s (req/s)" % name, "%.0f (p50 %.0f p99 %.0f us)" % (
                subject, latency[0], latency[1]), "%.0f (p50 %.0f p99 %.0f us)" % (
                base, latency[2], latency[3]), "%.3f" % ratio, "", None))
        else:
            unit = "conn/s" if name.endswith("connect_rate") else "MiB/s"
            figures[name]["unit"] = unit
            target = TARGETS.get(name)
            rows.append(("%s (%s)" % (name, unit), "%.0f" % subject, "%.0f" % base,
                         "%.3f" % ratio, "" if target is None else ">= %g" % target,
                         None if target is None else ratio >= target))
    if tls_samples["throughput_1"]:
        figures["tls"] = {}
        for name in ("throughput_1", "throughput_8"):
            plain = benchkit.median(samples[name][0])
            secure = benchkit.median(tls_samples[name])
            figures["tls"][name] = {"relay": round(plain, 1), "relay_tls": round(secure, 1),
                                    "ratio": round(secure / plain, 3), "unit": "MiB/s"}
            rows.append(("%s TLS (MiB/s)" % name, "%.0f" % secure, "plain relay %.0f" % plain,
                         "%.2f" % (secure / plain), "(cost of TLS)", None))
    if hold_result is not None:
        figures["hold"] = hold_result
        met = (hold_result["failures"] == 0 and hold_result["returned_to_baseline"] is not False
               and (hold_result["relay_peak_rss_mib"] or 0) < HOLD_RSS_LIMIT_MIB)
        rows.append(("hold %d x %ds" % (hold_conns, hold_seconds),
                     "%d failures" % hold_result["failures"],
                     "peak %s MiB, %s threads" % (hold_result["relay_peak_rss_mib"],
                                                  hold_result["relay_peak_threads"]),
                     "back: %s" % hold_result["returned_to_baseline"],
                     "0 fail, <%d MiB" % HOLD_RSS_LIMIT_MIB, met))
    benchkit.print_table(rows, "relay vs direct, loopback, median of %d run(s)%s"
                         % (runs, " (quick)" if quick else ""))
    if args.json:
        benchkit.dump_json(figures, args.json)


if __name__ == "__main__":
    main()
