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

from helpers.basics import LOOPBACK, TIMEOUT, Worker
from helpers.relay import CA, CERT, KEY, recv_exact, recv_to_eof
from tcprelay import muxado, service, tls


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


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
    keepalive = 1.0
    rate = 128 * 1024
    clients, size = 6, 64 * 1024    # 384 KiB: about 3 s on this link
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

    def __init__(self, rate, sndbuf=32 * 1024, tls_on=False, **options):
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
        if tls_on:
            dialer, acceptor = _tls_pair(dialer, acceptor)
        self.client = muxado.client(dialer, **options)
        self.server = muxado.server(acceptor, **options)

    def close(self):
        self.client.close()
        self.server.close()
        self.proxy.close()
        assert self.client.wait(TIMEOUT) and self.server.wait(TIMEOUT)


def _tls_pair(dialer, acceptor):
    """Both ends of a connected pair under TLS, as tls.TLSTransport."""
    server_side = Worker(tls.server_context(CERT, KEY).wrap_socket, acceptor, True,
                         name="test TLS handshake")
    try:
        client_side = tls.client_context(CA).wrap_socket(dialer, server_hostname="localhost")
    except BaseException:
        dialer.close()
        acceptor.close()
        server_side.join(TIMEOUT)
        raise
    return tls.TLSTransport(client_side), tls.TLSTransport(server_side.finish())


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


def test_tls_write_timeout_bounds_a_write_without_progress_not_a_slow_one(slow_pair):
    # A 256 KiB frame over a 128 KiB/s link takes two seconds, four times
    # write_timeout, and makes progress all along.
    pair = slow_pair(128 * 1024, tls_on=True, write_timeout=0.5)
    size = 256 * 1024
    stream = pair.client.open()
    peer = pair.server.accept(TIMEOUT)
    for end in (stream, peer):
        end.settimeout(TIMEOUT)
    reader = Worker(recv_exact, peer, size, name="test reader")
    started = time.monotonic()
    stream.sendall(b"t" * size)
    assert reader.finish() == b"t" * size
    assert time.monotonic() - started > 3 * 0.5   # three times write_timeout
    assert not pair.client.closed
    # A link that stops: the write makes no progress and ends the session.
    pair.proxy.pause()
    with pytest.raises(muxado.SessionClosedError):
        stream.sendall(b"u" * (4 * size))
    assert pair.client.error.code == muxado.ErrorCode.WRITE_TIMEOUT, pair.client.error


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


# -- the heartbeat is a promise to be heard from --------------------------------------------------

KEEPALIVE = 1.0   # the relay's heartbeat: a ping every 1/3 s, a timeout of 1 s
SLACK = 1.5       # how late a timeout may act on a loaded machine


def registered_with_heartbeat(env, relay):
    """A raw service stand-in registered with the heartbeat: (service, registration)."""
    service_ = env.service(relay)
    registration = service_.register({"heartbeat": True})
    reply = registration.reply()
    assert reply["status"] == "ok" and reply["heartbeat"]["timeout"] == KEEPALIVE, reply
    return service_, registration


def chatter(client, until):
    """Echo a line through the relay every 0.2 s until the event ``until`` is set."""
    n = 0
    while not until.wait(0.2):   # pacing the traffic, not synchronisation
        line = b"line %d\n" % n
        client.sendall(line)
        assert recv_exact(client, len(line)) == line
        n += 1
    return n


@pytest.mark.parametrize("how", ["half-close", "reset"])
def test_relay_ends_a_silent_service_whose_heartbeat_stream_ended(env, logs, how):
    # A FIN on the heartbeat stream (the Go v2 service sends one when not
    # told to ping) or an RST only means no more pings: the service promised
    # to be heard from every timeout, and silence still ends its session.
    relay = env.relay(ports=1, keepalive=KEEPALIVE, lease_time=0)
    service_, registration = registered_with_heartbeat(env, relay)
    registration.stream.sendall(b'{"ping": 1}\n')
    assert registration.reply() == {"pong": 1}
    if how == "half-close":
        registration.stream.close_write()
    else:
        registration.stream.reset()
    quiet_since = time.monotonic()
    assert service_.session.wait(KEEPALIVE + SLACK), \
        "the relay kept a silent service %gs after its heartbeat stream ended" % (
            KEEPALIVE + SLACK)
    elapsed = time.monotonic() - quiet_since
    assert elapsed >= 0.8 * KEEPALIVE, elapsed
    assert logs.messages("no heartbeat for 1s", level=logging.WARNING)


@pytest.mark.parametrize("how", ["half-close", "reset"])
def test_relay_keeps_a_service_without_pings_while_its_bytes_come(env, logs, how):
    relay = env.relay(ports=1, keepalive=KEEPALIVE, lease_time=0)
    port = relay.pool.ports[0]
    service_, registration = registered_with_heartbeat(env, relay)
    service_.serve()   # echo
    if how == "half-close":
        registration.stream.close_write()
    else:
        registration.stream.reset()
    client = env.client(port)
    stop = threading.Event()
    talker = Worker(chatter, client, stop, name="test client")
    # Timeouts on end without a ping, with the service's echo as its only sign of life.
    assert not service_.session.wait(1.8 * KEEPALIVE), "the relay dropped a service that talks"
    stop.set()
    assert talker.finish() >= 5
    assert not logs.messages("no heartbeat", level=logging.WARNING)
    # Silence from here on ends it, clients or no clients.
    assert service_.session.wait(KEEPALIVE + SLACK)
    assert logs.messages("no heartbeat for 1s", level=logging.WARNING)


# -- the service's side: the relay's heartbeat stream ending ----------------------------------------

class FakeRelay(object):
    """The relay's end of one service connection, driven by the test: it
    answers the registration with a heartbeat, then does what it is told."""

    def __init__(self, env, interval, timeout):
        listener = env.listener()
        connecting = Worker(service.connect, listener.getsockname(), None, None, TIMEOUT,
                            name="test connect")
        sock, _ = listener.accept()
        self.session = muxado.server(sock)
        env.defer(self.close)
        self.stream = self.session.accept(TIMEOUT)
        self.stream.settimeout(TIMEOUT)
        request = b""
        while not request.endswith(b"\n"):
            data = self.stream.recv(4096)
            assert data, "the service closed its registration stream"
            request += data
        assert json.loads(request.decode("utf-8"))["heartbeat"] is True
        self.stream.sendall(json.dumps({
            "status": "ok", "address": "localhost:1", "port": 1, "version": 1,
            "heartbeat": {"interval": interval, "timeout": timeout}}).encode("ascii") + b"\n")
        self.connection = connecting.finish()
        env.defer(self.connection.close)
        self._pings = b""

    def ping(self, timeout=TIMEOUT):
        """The next ping's number."""
        self.stream.settimeout(timeout)
        while b"\n" not in self._pings:
            data = self.stream.recv(4096)
            assert data, "the service closed its heartbeat stream"
            self._pings += data
        line, _, self._pings = self._pings.partition(b"\n")
        return json.loads(line.decode("utf-8"))["ping"]

    def close(self):
        self.session.close()
        assert self.session.wait(TIMEOUT)


INTERVAL, BEAT_TIMEOUT = 0.3, 1.0


@pytest.mark.parametrize("how", ["half-close", "reset"])
def test_service_ends_a_silent_relays_session_after_the_heartbeat_stream_ended(env, logs, how):
    relay = FakeRelay(env, INTERVAL, BEAT_TIMEOUT)
    assert relay.ping() == 1
    relay.stream.sendall(b'{"pong": 1}\n')
    if how == "half-close":
        relay.stream.close_write()
        # No more pongs can come, but the relay can still hear pings.
        assert relay.ping() == 2
    else:
        relay.stream.reset()
    quiet_since = time.monotonic()
    session = relay.connection.session
    assert session.wait(BEAT_TIMEOUT + SLACK), \
        "the service kept a silent relay %gs after the relay ended the heartbeat stream" % (
            BEAT_TIMEOUT + SLACK)
    assert time.monotonic() - quiet_since >= 0.5 * BEAT_TIMEOUT
    assert logs.messages("no answer to a heartbeat for 1s", level=logging.WARNING)


@pytest.mark.parametrize("how", ["half-close", "reset"])
def test_service_keeps_a_relay_without_pongs_while_its_bytes_come(env, logs, how):
    relay = FakeRelay(env, INTERVAL, BEAT_TIMEOUT)
    if how == "half-close":
        relay.stream.close_write()
    else:
        relay.stream.reset()
    client = relay.session.open()
    stop = threading.Event()

    def talk():
        n = 0
        while not stop.wait(0.2):   # pacing the traffic, not synchronisation
            client.sendall(b"x")
            n += 1
        return n

    talker = Worker(talk, name="test relay client")
    stream = relay.connection.accept(TIMEOUT)
    stream.settimeout(TIMEOUT)
    assert not relay.connection.session.wait(1.8 * BEAT_TIMEOUT), \
        "the service dropped a relay that sends data"
    stop.set()
    count = talker.finish()
    assert recv_exact(stream, count) == b"x" * count
    assert not logs.messages("no answer to a heartbeat", level=logging.WARNING)
    assert relay.connection.session.wait(BEAT_TIMEOUT + SLACK)
    assert logs.messages("no answer to a heartbeat for 1s", level=logging.WARNING)


