#!/usr/bin/env python3
"""What a connection costs the relay: memory (RSS), threads and descriptors.

Starts a relay (python3 -m tcprelay.relay on 127.0.0.1) and reads its
/proc figures (Linux only) before and after each kind of connection:

  pending     connections that have opened a registration stream and sent
              half a request, then wait (slowloris)
  hostile     pending connections that send all the bytes their read budget
              allows (a registration stream filled with junk), then wait
  registered  services registered (minimal form), idle
  clients     public clients of one registered service, idle

Each figure is the relay's growth divided by the count. The counts stay
under the relay's caps (--max-pending raised for the run).

    python3 scripts/footprint.py               # 100 of each
    python3 scripts/footprint.py --count 200
"""

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench     # noqa: E402
import benchkit  # noqa: E402
from tcprelay import frames  # noqa: E402
from tcprelay.relay import PENDING_READ_BUDGET  # noqa: E402

SETTLE = 1.0   # seconds for the relay's threads to take up new connections


def settle(pid, before=None):
    """The relay's (RSS MiB, threads, fds) once they stop moving."""
    last = None
    for _ in range(20):
        time.sleep(SETTLE / 4)
        now = benchkit.process_stats(pid)
        if last is not None and now[1:] == last[1:] and abs(now[0] - last[0]) < 0.2:
            return now
        last = now
    return last


def open_pending(address, count, junk):
    socks = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(frames.encode_data(3, b'{"name": "slo', frames.SYN))
        if junk:
            # Then all the budget allows, on more streams that wait to be accepted.
            body = b"x" * (60 * 1024)
            sent = 64
            stream_id = 5
            while sent + len(body) + 8 < PENDING_READ_BUDGET:
                sock.sendall(frames.encode_data(stream_id, body, frames.SYN))
                stream_id += 2
                sent += len(body) + 8
        socks.append(sock)
    return socks


def register_minimal(address, count):
    from tcprelay import muxado
    sessions = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=10)
        session = muxado.client(sock)
        stream = session.open()
        stream.settimeout(10)
        stream.close_write()
        reply = b""
        while True:
            chunk = stream.recv(4096)
            if not chunk:
                break
            reply += chunk
        stream.close()
        sessions.append((session, reply.decode()))
    return sessions


def measure(count, kind):
    """(before, after) relay figures around ``count`` connections of ``kind``, in a
    relay of their own (None: just the idle relay)."""
    base = bench.free_port_range(count + 3)
    address = ("127.0.0.1", base)
    relay = bench._ProcessWaitingForPort(
        [sys.executable, "-m", "tcprelay.relay", str(base), "--host", "127.0.0.1",
         "--public-bind", "127.0.0.1", "--ports", "%d-%d" % (base + 1, base + count + 2),
         "--max-services", str(count + 2), "--max-pending", str(4 * count),
         "--max-pending-per-host", str(4 * count), "--registration-rate", "1000000",
         "--handshake-timeout", "600", "--log-level", "warning"], address)
    held = []
    try:
        pid = relay.proc.pid
        if kind == "clients":
            session, reply = register_minimal(address, 1)[0]
            held.append(session)
            port = int(reply.rsplit(":", 1)[1])
        before = settle(pid)
        if kind in ("pending", "hostile"):
            held.extend(open_pending(address, count, kind == "hostile"))
        elif kind == "registered":
            held.extend(s for s, _ in register_minimal(address, count))
        elif kind == "clients":
            held.extend(socket.create_connection(("127.0.0.1", port), timeout=10)
                        for _ in range(count))
        return before, settle(pid)
    finally:
        for thing in held:
            thing.close()
        relay.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="connections of each kind")
    args = parser.parse_args(argv)
    count = args.count
    print("%-11s %12s %9s %9s   (each, %d connections; relay at start: %s)"
          % ("kind", "RSS KiB", "threads", "fds", count, "%.1f MiB RSS, %d threads, %d fds"
             % measure(count, None)[0]))
    for kind in ("pending", "hostile", "registered", "clients"):
        before, after = measure(count, kind)
        print("%-11s %12.0f %9.2f %9.2f" % (
            kind, (after[0] - before[0]) * 1024 / count, (after[1] - before[1]) / count,
            (after[2] - before[2]) / count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
