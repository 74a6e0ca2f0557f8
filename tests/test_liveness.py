"""Liveness: what counts as a peer being alive, and what each timer bounds.

- a busy session on a slow link is alive: every byte received proves it,
  and a writer queued behind other writers is not a stuck peer,
- the heartbeat agreed at registration is a promise to be heard from at
  least every ``timeout`` seconds: pings keep an idle service's promise,
  bytes of any kind count, and the heartbeat stream ending (FIN or RST)
  stops the pings but not the timeout.

Every test runs under ``no_leaks``; the throttling proxy is the test's own
(its threads joined, its sockets closed).
"""

import hashlib
import json
import logging
import socket
import threading
import time

import pytest

from conftest import TIMEOUT, Worker
from relay_helpers import LOOPBACK, recv_exact, recv_to_eof
from test_service import env, logs  # noqa: F401 (fixtures)
from tcprelay import muxado


# -- a throttling TCP proxy ------------------------------------------------------------------

def _small_segments(sock, buffer):
    # An Internet-sized MSS, not loopback's 64 KiB: the peer's send buffer
    # starts at ten segments' worth, megabytes with loopback's MSS, and data
    # of that size would take a slow link minutes to move.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)


class ThrottledProxy(object):
    """A TCP proxy on 127.0.0.1 in front of ``target`` that moves at most
    ``rate`` bytes a second each way, in ``chunk``-byte steps: a slow link.
    Its sockets take at most about ``buffer`` bytes ahead of what it moved,
    so that the peers' own send buffers fill as on a real slow link.

    One connection at a time is enough for these tests; ``close()`` ends it,
    joins every thread and closes every socket.
    """

    def __init__(self, target, rate, chunk=4096, buffer=16384):
        self.target = tuple(target[:2])
        self.rate = float(rate)
        self.chunk = chunk
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._resumed = threading.Condition(self._lock)
        self._paused = False
        self._socks = []
        self._threads = []
        self.buffer = buffer
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _small_segments(self._listener, buffer)   # the sockets it accepts inherit it
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(4)
        self.address = self._listener.getsockname()
        self._spawn(self._accept_loop, name="throttled proxy")

    def _spawn(self, fn, *args, **kwargs):
        thread = threading.Thread(target=fn, args=args, name=kwargs.get("name", "throttled pump"))
        thread.daemon = True
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self):
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                _small_segments(upstream, self.buffer)
                upstream.settimeout(TIMEOUT)
                upstream.connect(self.target)
            except OSError:
                upstream.close()
                downstream.close()
                continue
            with self._lock:
                self._socks.extend((downstream, upstream))
            for sock in (downstream, upstream):
                sock.settimeout(None)
            self._spawn(self._pump, downstream, upstream)
            self._spawn(self._pump, upstream, downstream)

    def _pump(self, src, dst):
        start = time.monotonic()
        moved = 0
        while not self._stop.is_set():
            with self._lock:
                while self._paused and not self._stop.is_set():
                    self._resumed.wait()
            try:
                data = src.recv(self.chunk)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)   # pass the FIN on
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return
            moved += len(data)
            ahead = start + moved / self.rate - time.monotonic()
            if ahead > 0 and self._stop.wait(ahead):   # the throttle, not synchronisation
                return

    def pause(self):
        """Stop moving bytes, both ways, until close(): a path gone silent."""
        with self._lock:
            self._paused = True

    def close(self):
        with self._lock:
            self._stop.set()
            self._resumed.notify_all()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # wakes recv and sendall
            except OSError:
                pass
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "throttled proxy thread still running"
        self._listener.close()
        for sock in socks:
            sock.close()


def throttled(env, target, rate):
    proxy = ThrottledProxy(target, rate)
    env.defer(proxy.close)
    return proxy


def digest_handler(stream):
    """Read the client's upload to EOF; answer its length and SHA-256, then close."""
    try:
        digest = hashlib.sha256()
        size = 0
        while True:
            data = stream.recv(256 * 1024)
            if not data:
                break
            size += len(data)
            digest.update(data)
        stream.sendall(b"%d %s\n" % (size, digest.hexdigest().encode("ascii")))
    except (OSError, muxado.MuxadoError):
        pass
    finally:
        stream.close()


def serve_streams(env, connection, count, handler):
    """Accept ``count`` streams on a service connection, each handled in a thread."""
    def accept_all():
        workers = []
        try:
            for _ in range(count):
                stream = connection.accept(TIMEOUT)
                stream.settimeout(TIMEOUT)
                workers.append(Worker(handler, stream, name="test handler"))
        finally:
            for worker in workers:
                worker.finish()
    acceptor = Worker(accept_all, name="test acceptor")
    env.defer(acceptor.finish)
    return acceptor


def upload(port, data):
    """A client that uploads ``data``, half-closes, and returns the service's answer."""
    sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        sock.settimeout(TIMEOUT)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_to_eof(sock)
    finally:
        sock.close()


# -- a busy session on a slow link is alive ------------------------------------------------------

def test_a_healthy_service_on_a_slow_link_is_not_declared_dead(env, logs):
    # The case scaled down: a link of 128 KiB/s between the service
    # and the relay, clients uploading more than it moves in several
    # heartbeat timeouts. The pongs wait behind the data, and the relay's
    # writers wait for each other; every byte still gets through.
    keepalive = 1.5
    rate = 128 * 1024
    clients, size = 6, 96 * 1024    # 576 KiB: about 4.5 s on this link
    relay = env.relay(ports=1, keepalive=keepalive, write_timeout=1.0, lease_time=0)
    port = relay.pool.ports[0]
    proxy = throttled(env, relay.server_address, rate)
    connection = env.connect(proxy.address, keepalive=keepalive, write_timeout=1.0)
    assert connection.reply["heartbeat"]["timeout"] == keepalive
    serve_streams(env, connection, clients, digest_handler)
    payloads = [bytes([n]) * size for n in range(clients)]
    started = time.monotonic()
    uploads = [Worker(upload, port, data, name="test client") for data in payloads]
    answers = [worker.finish(timeout=3 * TIMEOUT) for worker in uploads]
    elapsed = time.monotonic() - started
    for data, answer in zip(payloads, answers):
        assert answer == b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode()), \
            "a client lost its upload (%r); took %.1fs" % (answer, elapsed)
    assert elapsed > 2 * keepalive, "the link was not slow enough to test anything (%.1fs)" % elapsed
    assert not connection.closed
    assert not logs.messages("heartbeat", level=logging.WARNING)
    assert not logs.messages("write timed out")



class SlowSessionPair(object):
    """A client and a server muxado session joined through a ``ThrottledProxy``.

    Both sockets get a small, fixed send buffer (a slow path's buffer is
    sized to its small bandwidth-delay product; on loopback the kernel
    would size it to megabytes), so writers soon wait on the link.
    """

    def __init__(self, rate, sndbuf=32 * 1024, **options):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        dialer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.proxy = None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)   # accepted: too
            listener.bind((LOOPBACK, 0))
            listener.listen(1)
            listener.settimeout(TIMEOUT)
            self.proxy = ThrottledProxy(listener.getsockname(), rate)
            dialer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            dialer.settimeout(TIMEOUT)
            dialer.connect(self.proxy.address)
            acceptor, _ = listener.accept()
        except BaseException:
            dialer.close()
            if self.proxy is not None:
                self.proxy.close()
            raise
        finally:
            listener.close()
        self.client = muxado.client(dialer, **options)
        self.server = muxado.server(acceptor, **options)

    def close(self):
        self.client.close()
        self.server.close()
        self.proxy.close()
        assert self.client.wait(TIMEOUT) and self.server.wait(TIMEOUT)


@pytest.fixture
def slow_pair(no_leaks):
    pairs = []

    def make(rate, **options):
        pair = SlowSessionPair(rate, **options)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


def test_writers_waiting_for_each_other_on_a_slow_link_are_not_a_stuck_peer(slow_pair):
    # Three writers each send a 128 KiB frame over a 128 KiB/s link: each
    # holds the write lock about a second, so the last waits about two,
    # four times write_timeout. Every write makes progress all along.
    pair = slow_pair(128 * 1024, write_timeout=0.5)
    size = 128 * 1024
    streams = [pair.client.open() for _ in range(3)]
    extra = pair.client.open()
    accepted = [pair.server.accept(TIMEOUT) for _ in range(4)]
    readers = [Worker(recv_exact, peer, size, name="test reader") for peer in accepted[:3]]
    for peer in accepted:
        peer.settimeout(TIMEOUT)
    for stream in streams:
        stream.settimeout(TIMEOUT)
    started = time.monotonic()
    writers = [Worker(stream.sendall, bytes([n]) * size, name="test writer")
               for n, stream in enumerate(streams)]
    # A small frame queued behind them: an RST, written by _write.
    extra.reset()
    for writer in writers:
        writer.finish()
    elapsed = time.monotonic() - started
    assert elapsed > 4 * 0.5, "the link was not slow enough to test anything (%.1fs)" % elapsed
    for n, reader in enumerate(readers):
        assert reader.finish() == bytes([n]) * size
    with pytest.raises(muxado.StreamResetError):
        accepted[3].recv(1)
    assert not pair.client.closed and not pair.server.closed


def test_a_peer_that_stops_reading_still_ends_the_session_within_write_timeout(slow_pair):
    # The other side of the rule: the writer holding the lock makes no
    # progress (the link stopped), and its SO_SNDTIMEO ends the session;
    # the writers queued behind it learn it at once.
    pair = slow_pair(128 * 1024, write_timeout=0.5)
    streams = [pair.client.open(), pair.client.open()]
    for stream in streams:
        stream.settimeout(TIMEOUT)
    pair.proxy.pause()
    started = time.monotonic()
    writers = [Worker(stream.sendall, b"x" * 200 * 1024, name="test writer") for stream in streams]
    for writer in writers:
        with pytest.raises(muxado.SessionClosedError):
            writer.finish()
    elapsed = time.monotonic() - started
    assert pair.client.error.code == muxado.ErrorCode.WRITE_TIMEOUT, pair.client.error
    assert elapsed < 0.5 + 2.0, elapsed
