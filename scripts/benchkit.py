"""Client-side load code shared by the benchmarks (standard library only).

Every workload takes ``connect()``, a function returning a connected
socket-like object, so that the same code loads a direct echo server, a
muxado session and a relay. Loopback only.
"""

import json
import os
import selectors
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IO_TIMEOUT = 60.0


# -- servers in child processes ---------------------------------------------------------

class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                return
            sock.sendall(data)


class ThreadedEchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def serve_direct_echo():
    """Run a plain threaded echo server; print its port; serve until stdin closes."""
    server = ThreadedEchoServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()


class Child(object):
    """A child process that prints one line (an address) when ready."""

    def __init__(self, args, env=None, ready_timeout=30.0):
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=ROOT, env=full_env)
        self.line = _read_line(self.proc.stdout, ready_timeout, args)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=15.0):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc.stdout.close()


def _read_line(stream, timeout, args):
    result = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        raise RuntimeError("%s did not start within %gs" % (" ".join(args), timeout))
    return result[0].decode().strip()


def process_stats(pid):
    """(RSS in MiB, thread count, open fds) of a process, from /proc."""
    rss = threads = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return rss, threads, fds


def parse_hostport(text):
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


def wait_connectable(address, timeout, died=None):
    """Return once something accepts connections on ``address``; RuntimeError after
    ``timeout`` seconds, or at once when ``died()`` (a child's exit, say) is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline or (died is not None and died()):
                raise RuntimeError("nothing accepts connections on %s:%d" % address[:2])
            time.sleep(0.05)   # another process is to bind it: nothing to join


def tcp_connector(address):
    def connect():
        sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return connect


# -- workloads ---------------------------------------------------------------------------

def throughput(connect, total_bytes, connections=1, block=1 << 20):
    """Echo ``total_bytes`` through each of ``connections`` at once; aggregate MiB/s
    of one direction, from the first byte sent to the last byte back."""
    conns = [connect() for _ in range(connections)]
    payload = bytes(block)
    errors = []
    barrier = threading.Barrier(2 * connections + 1)

    def send(conn):
        try:
            barrier.wait(IO_TIMEOUT)
            view = memoryview(payload)
            left = total_bytes
            while left:
                n = min(left, block)
                conn.sendall(view[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
        except Exception as exc:
            errors.append(exc)

    def receive(conn, counts, index):
        try:
            buf = bytearray(block)
            got = 0
            barrier.wait(IO_TIMEOUT)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
            counts[index] = got
        except Exception as exc:
            errors.append(exc)

    counts = [0] * connections
    threads = []
    for i, conn in enumerate(conns):
        threads.append(threading.Thread(target=send, args=(conn,)))
        threads.append(threading.Thread(target=receive, args=(conn, counts, i)))
    for t in threads:
        t.start()
    barrier.wait(IO_TIMEOUT)
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError("throughput run failed: %r" % errors[0])
    if counts != [total_bytes] * connections:
        raise RuntimeError("echo lost bytes: %r" % counts)
    return total_bytes * connections / MiB / elapsed


def round_trips(connect, rounds, size=64):
    """Round-trip times in microseconds of ``size``-byte ping-pongs on one connection."""
    conn = connect()
    message = b"x" * size
    buf = bytearray(size)
    view = memoryview(buf)
    times = []
    try:
        for _ in range(50):   # warm up
            _ping(conn, message, view, size)
        for _ in range(rounds):
            start = time.perf_counter()
            _ping(conn, message, view, size)
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        conn.close()
    return times


def interleaved_round_trips(connectors, rounds, size=64, batch=250):
    """Round-trip times (us) for each connector, measured in alternating batches.

    The machine's idle-state polling adapts to recent load (this is a VM with
    the haltpoll cpuidle driver), so wake-up latency drifts; alternating keeps
    every subject under the same conditions.
    """
    conns = [connect() for connect in connectors]
    message = b"x" * size
    views = [memoryview(bytearray(size)) for _ in conns]
    times = [[] for _ in conns]
    try:
        for conn, view in zip(conns, views):
            for _ in range(50):   # warm up
                _ping(conn, message, view, size)
        done = 0
        while done < rounds:
            n = min(batch, rounds - done)
            for conn, view, out in zip(conns, views, times):
                for _ in range(n):
                    start = time.perf_counter()
                    _ping(conn, message, view, size)
                    out.append((time.perf_counter() - start) * 1e6)
            done += n
    finally:
        for conn in conns:
            conn.close()
    return times


def _ping(conn, message, view, size):
    conn.sendall(message)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if not n:
            raise RuntimeError("connection closed mid ping")
        got += n


def connect_rate(connect, total, concurrency=8):
    """Short connections per second: each connects, echoes 1 byte, closes."""
    errors = []
    counter = [0]
    lock = threading.Lock()

    def worker():
        try:
            while True:
                with lock:
                    if counter[0] >= total:
                        return
                    counter[0] += 1
                conn = connect()
                conn.sendall(b"!")
                if conn.recv(1) != b"!":
                    raise RuntimeError("bad echo")
                conn.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("connect_rate failed: %r" % errors[0])
    return total / elapsed


def request_rate(address, connections=32, seconds=5.0, size=64):
    """``connections`` at once, each doing back-to-back ``size``-byte echo rounds
    for ``seconds``: (rounds per second, p50 us, p99 us).

    One thread, non-blocking sockets, as a load generator does: the client
    costs little beside the subject.
    """
    selector = selectors.DefaultSelector()
    message = b"r" * size
    conns = []
    times = []
    try:
        for _ in range(connections):
            conn = socket.create_connection(address, timeout=IO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            conns.append(conn)
        state = {}
        start = time.perf_counter()
        end = start + seconds
        for conn in conns:
            conn.send(message)
            state[conn] = [0, time.perf_counter()]
            selector.register(conn, selectors.EVENT_READ)
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            for key, _ in selector.select(min(1.0, end - now)):
                conn = key.fileobj
                data = conn.recv(size)
                if not data:
                    raise RuntimeError("connection closed mid request")
                entry = state[conn]
                entry[0] += len(data)
                if entry[0] >= size:
                    sent_at = entry[1]
                    entry[0] = 0
                    entry[1] = time.perf_counter()
                    times.append((entry[1] - sent_at) * 1e6)
                    conn.send(message)
        elapsed = time.perf_counter() - start
    finally:
        selector.close()
        for conn in conns:
            conn.close()
    if not times:
        raise RuntimeError("request_rate: no round completed")
    return len(times) / elapsed, percentile(times, 0.5), percentile(times, 0.99)


def hold(address, connections, seconds, interval=1.0, size=64, on_tick=None):
    """Hold ``connections`` open, each pinging ``size`` bytes every ``interval`` s.

    One thread, non-blocking sockets. Returns the number of failures
    (connections that could not open, broke, or echoed wrong bytes).
    ``on_tick()`` is called about once a second (to sample the relay).
    """
    selector = selectors.DefaultSelector()
    message = b"h" * size
    failures = 0
    conns = []
    for _ in range(connections):
        try:
            sock = socket.create_connection(address, timeout=IO_TIMEOUT)
            sock.setblocking(False)
            state = {"sock": sock, "got": 0, "next": 0.0, "out": False}
            conns.append(state)
            selector.register(sock, selectors.EVENT_READ, state)
        except OSError:
            failures += 1
    start = time.monotonic()
    # Spread the pings over the interval.
    for i, state in enumerate(conns):
        state["next"] = start + interval * i / max(1, len(conns))
    end = start + seconds
    last_tick = start
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for state in conns:
            if state["sock"] is not None and not state["out"] and state["next"] <= now:
                try:
                    state["sock"].send(message)
                    state["out"] = True
                    state["got"] = 0
                    state["next"] += interval
                except OSError:
                    failures += 1
                    _drop(selector, state)
        for key, _ in selector.select(0.01):
            state = key.data
            try:
                data = state["sock"].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data or data.strip(b"h"):
                failures += 1
                _drop(selector, state)
                continue
            state["got"] += len(data)
            if state["got"] >= size:
                state["out"] = False
        if on_tick is not None and now - last_tick >= 1.0:
            last_tick = now
            on_tick()
    for state in conns:
        if state["sock"] is not None:
            if state["out"]:
                failures += 1   # a ping never came back
            _drop(selector, state)
    selector.close()
    return failures


def _drop(selector, state):
    try:
        selector.unregister(state["sock"])
    except (KeyError, ValueError):
        pass
    state["sock"].close()
    state["sock"] = None


# -- reporting ------------------------------------------------------------------------------

def median(values):
    return statistics.median(values)


def percentile(values, fraction):
    ordered = sorted(values)
    index = min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))
    return ordered[index]


def print_table(rows, title):
    """rows: (figure, relay, direct, ratio, target, met) tuples of strings/bools."""
    print(title)
    header = ("figure", "subject", "direct", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(6)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        cells = list(row[:5]) + ["ok" if row[5] else ("MISSED" if row[5] is False else "")]
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))


def dump_json(figures, path):
    text = json.dumps(figures, indent=2, sort_keys=True)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
