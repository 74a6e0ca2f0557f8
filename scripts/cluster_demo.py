#!/usr/bin/env python3
"""Several relays behind a load balancer, on loopback (docs/DEPLOY.md, "Several relays").

    python3 scripts/cluster_demo.py                  # failover: two relays, one killed mid-load
    python3 scripts/cluster_demo.py --processes 3    # scaling: 1, then 3 relay processes

It starts relays (relay i's public ports on 127.0.0.(i+2), its service port on
127.0.0.1), one echo server registered with all of them (``--relay`` repeated:
the same public port on each), and a load balancer on 127.0.0.1 in front of
that public port: HAProxy when ``haproxy`` is on PATH (``apt-get install
haproxy``, ``dnf install haproxy``, ``brew install haproxy``), else a tiny
round-robin TCP balancer written below with the standard library (a backend
that refuses the connection is skipped). It says which it used.

Failover: clients each make back-to-back requests (connect, 64 bytes echoed,
close) through the balancer; relay B is killed (SIGKILL) mid-load; it prints
the failed requests and the request rate before and after, then restarts B and
prints the rate once the echo server is registered there again.
Installs nothing; standard library only; Linux (127.0.0.2 and up are loopback).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

REQUEST = b"x" * 64
READY_TIMEOUT = 15.0


# -- the fallback balancer (run as: cluster_demo.py _balance LISTEN_PORT HOST:PORT...) ----------

def _pump(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _join(client, backends, turn):
    """Connect ``client`` to the next backend that takes a connection, then pump."""
    try:
        for attempt in range(len(backends)):
            address = backends[(turn + attempt) % len(backends)]
            try:
                server = socket.create_connection(address, timeout=2.0)
                break
            except OSError:
                continue
        else:
            return
        server.settimeout(None)
        try:
            other = threading.Thread(target=_pump, args=(server, client), daemon=True)
            other.start()
            _pump(client, server)
            other.join()
        finally:
            server.close()
    finally:
        client.close()


def balance(listen_port, backends):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(1024)
    print("listening", flush=True)
    turn = 0
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_join, args=(client, backends, turn), daemon=True).start()
        turn += 1


HAPROXY_CFG = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
frontend echo
    bind 127.0.0.1:{port}
    default_backend relays
backend relays
    balance roundrobin
{servers}
"""


# -- processes ----------------------------------------------------------------------------

def free_port(hosts):
    """A port free on every one of ``hosts``."""
    while True:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        try:
            for host in hosts:
                sock = socket.socket()
                try:
                    sock.bind((host, port))
                finally:
                    sock.close()
        except OSError:
            continue
        return port


def wait_connectable(address, timeout=READY_TIMEOUT):
    benchkit.wait_connectable(address, timeout)


def start(args, stdout=subprocess.DEVNULL):
    env = dict(os.environ)
    env["PYTHONPATH"] = benchkit.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(args, stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE,
                            cwd=benchkit.ROOT, env=env)


class Cluster(object):
    """``count`` relays, an echo server registered with all, a balancer in front."""

    def __init__(self, count):
        self.hosts = ["127.0.0.%d" % (i + 2) for i in range(count)]
        self.public_port = free_port(["127.0.0.1"] + self.hosts)
        self.relay_ports = [free_port(["127.0.0.1"]) for _ in self.hosts]
        self.processes = []
        self.relays = [self.start_relay(i) for i in range(count)]
        relays = []
        for port in self.relay_ports:
            relays += ["--relay", "127.0.0.1:%d" % port]
        self.echo = self.track(start([sys.executable, "-m", "tcprelay.echoserver"] + relays,
                                     stdout=subprocess.PIPE))
        for host in self.hosts:
            wait_connectable((host, self.public_port))
        self.balancer_name, self.balancer = self.start_balancer()
        wait_connectable(("127.0.0.1", self.public_port))
        self.address = ("127.0.0.1", self.public_port)

    def track(self, process):
        self.processes.append(process)
        return process

    def start_relay(self, index):
        port = self.relay_ports[index]
        process = self.track(start([
            sys.executable, "-m", "tcprelay.relay", str(port), "--host", "127.0.0.1",
            "--public-bind", self.hosts[index], "--drain-timeout", "1",
            "--ports", "%d-%d" % (self.public_port, self.public_port),
            "--max-clients", "100000", "--log-level", "warning"]))
        wait_connectable(("127.0.0.1", port))
        return process

    def start_balancer(self):
        backends = [(host, self.public_port) for host in self.hosts]
        if shutil.which("haproxy"):
            servers = "\n".join("    server relay%d %s:%d check inter 500ms fall 1 rise 2"
                                % (i, host, port) for i, (host, port) in enumerate(backends))
            config = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
            config.write(HAPROXY_CFG.format(port=self.public_port, servers=servers))
            config.close()
            return "haproxy", self.track(start(["haproxy", "-db", "-f", config.name]))
        return "the Python fallback balancer (haproxy is not on PATH)", self.track(start(
            [sys.executable, os.path.abspath(__file__), "_balance", str(self.public_port)]
            + ["%s:%d" % b for b in backends]))

    def close(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()


# -- load -----------------------------------------------------------------------------------

class Load(object):
    """``clients`` threads making back-to-back requests; each ends as (time, ok)."""

    def __init__(self, address, clients):
        self.connect = benchkit.tcp_connector(address)
        self.results = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True)
                        for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def client(self):
        while not self.stop.is_set():
            ok = False
            try:
                sock = self.connect()
                try:
                    sock.settimeout(5.0)
                    sock.sendall(REQUEST)
                    got = b""
                    while len(got) < len(REQUEST):
                        chunk = sock.recv(len(REQUEST) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    ok = got == REQUEST
                finally:
                    sock.close()
            except OSError:
                pass
            with self.lock:
                self.results.append((time.monotonic(), ok))

    def between(self, start, end):
        """(requests that succeeded per second, requests that failed) in [start, end)."""
        with self.lock:
            chosen = [ok for t, ok in self.results if start <= t < end]
        return sum(chosen) / (end - start), len(chosen) - sum(chosen)

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def failover(seconds, clients):
    cluster = Cluster(2)
    try:
        print("balancer: %s on 127.0.0.1:%d; relays A and B; one echo server on both"
              % (cluster.balancer_name, cluster.public_port))
        load = Load(cluster.address, clients)
        try:
            time.sleep(seconds)
            killed = time.monotonic()
            cluster.relays[1].send_signal(signal.SIGKILL)
            time.sleep(seconds)
            after = time.monotonic()
            cluster.relays[1].wait()
            cluster.relays[1] = cluster.start_relay(1)
            wait_connectable((cluster.hosts[1], cluster.public_port), timeout=60)
            back = time.monotonic()
            time.sleep(seconds)
            end = time.monotonic()
        finally:
            load.close()
        before_rate, before_failed = load.between(killed - seconds, killed)
        after_rate, failed = load.between(killed, after)
        back_rate, back_failed = load.between(back, end)
        print("before the kill:  %7.0f requests/s (%d failed)" % (before_rate, before_failed))
        print("B killed:         %7.0f requests/s over the next %gs; %d requests failed"
              % (after_rate, seconds, failed))
        print("B back (%.1fs later, the echo server registered again): %7.0f requests/s "
              "(%d failed)" % (back - after, back_rate, back_failed))
    finally:
        cluster.close()


def scaling(processes, seconds, clients):
    print("request rate (new connection per request, %d clients) with N relay processes "
          "behind the balancer:" % clients)
    for count in sorted(set([1, processes])):
        cluster = Cluster(count)
        try:
            load = Load(cluster.address, clients)
            try:
                time.sleep(1.0)   # warm up
                start = time.monotonic()
                time.sleep(seconds)
                rate, failed = load.between(start, time.monotonic())
            finally:
                load.close()
            print("  N=%d: %7.0f requests/s (%d failed; balancer: %s)"
                  % (count, rate, failed, cluster.balancer_name))
        finally:
            cluster.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_balance"]:
        return balance(int(argv[1]), [benchkit.parse_hostport(a) for a in argv[2:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="show the scaling of N relay processes instead of failover")
    parser.add_argument("--seconds", type=float, default=5.0, help="each phase (default 5)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    args = parser.parse_args(argv)
    if args.processes is not None:
        scaling(args.processes, args.seconds, args.clients)
    else:
        failover(args.seconds, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
