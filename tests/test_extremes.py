"""Extremes: timeouts of any size, as a socket takes them.

Every blocking call in these tests has a timeout of its own (TIMEOUT), however
long the timeouts under test are.
"""

import signal
import socket
import socketserver
import struct
import sys
import threading
import time

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, Worker, bindable, free_port_range, wait_until
from helpers.relay import echo_handler, echo_roundtrip, recv_exact
from helpers.sessions import SessionPair
from tcprelay import clock, heartbeat, mainthread, muxado, muxerrors, service, socketlike
from tcprelay import streambuffer, streamincoming, window
from tcprelay import reader as muxado_reader, stream as muxado_stream, writer as muxado_writer
from tcprelay.relay import Relay
from tcprelay.service import RelayServer


@pytest.fixture
def env(relay_env_errors_allowed):
    """This module's tests run in a Env, errors in the log allowed (conftest)."""
    return relay_env_errors_allowed


THIRTY_DAYS = 30 * 24 * 3600.0
# serve_forever with reconnect, noticing shutdown() within 0.1 s (its default poll is 0.5 s)
RECONNECT = {"reconnect": True, "poll_interval": 0.1}
EXTREMES = [THIRTY_DAYS, 10 * 365 * 24 * 3600.0, clock.MAX_TIMEOUT]


@pytest.mark.parametrize("timeout", EXTREMES, ids=["30-days", "10-years", "max"])
def test_a_huge_stream_timeout_reads_as_a_socket_does(sessions, timeout):
    opened, accepted = sessions.stream_pair()
    for stream in (opened, accepted):
        stream.settimeout(timeout)
    # Round trips: the thread waiting for its reply reads the session's socket
    # itself (it leads the reads), with the stream's timeout as its wait.
    for n in range(20):
        message = b"round %d" % n
        opened.sendall(message)
        assert recv_exact(accepted, len(message)) == message
        accepted.sendall(message)
        assert recv_exact(opened, len(message)) == message
    # A wait that really blocks with that timeout, woken by data from another thread.
    sender = threading.Timer(0.2, accepted.sendall, (b"late",))
    sender.start()
    try:
        assert opened.recv(4) == b"late"
    finally:
        sender.join(TIMEOUT)


def test_stream_timeouts_are_checked_as_a_socket_checks_them(sessions):
    opened, _ = sessions.stream_pair()
    probe = socket.socket()
    try:
        for bad, error in ((-1, ValueError), (1e300, OverflowError)):
            with pytest.raises(error):
                probe.settimeout(bad)
            with pytest.raises(error):
                opened.settimeout(bad)
    finally:
        probe.close()
    opened.settimeout(0)
    with pytest.raises(BlockingIOError):
        opened.recv(1)
    opened.settimeout(None)
    assert opened.gettimeout() is None


def test_huge_accept_timeout(sessions):
    accepted = Worker(sessions.server.accept, THIRTY_DAYS)
    opened = sessions.client.open()
    stream = accepted.finish()
    opened.sendall(b"x")
    stream.settimeout(TIMEOUT)
    assert stream.recv(1) == b"x"


def test_a_relay_and_services_with_thirty_day_timers(env):
    # Every duration the relay and the library take, at thirty days.
    relay = env.relay(ports=1, lease_time=THIRTY_DAYS, keepalive=THIRTY_DAYS,
                      idle_timeout=THIRTY_DAYS, drain_timeout=THIRTY_DAYS,
                      handshake_timeout=THIRTY_DAYS)
    first = service.connect(relay.server_address, keepalive=THIRTY_DAYS, timeout=TIMEOUT)
    env.defer(first.close)
    # A second service waits in line for as long as it likes.
    second = Worker(service.connect, relay.server_address, max_wait=THIRTY_DAYS,
                    keepalive=THIRTY_DAYS, timeout=TIMEOUT)
    client = socket.create_connection((LOOPBACK, relay.pool.ports[0]), timeout=TIMEOUT)
    stream = first.accept(TIMEOUT)
    echo = Worker(echo_handler, stream)
    assert echo_roundtrip(client, b"first", half_close=False) == b"first"
    client.close()
    echo.finish()
    first.close()
    connection = second.finish()
    env.defer(connection.close)
    assert connection.port == relay.pool.ports[0]
    client = socket.create_connection((LOOPBACK, connection.port), timeout=TIMEOUT)
    env.defer(client.close)
    stream = connection.accept(TIMEOUT)
    echo = Worker(echo_handler, stream)
    assert echo_roundtrip(client, b"second", half_close=False) == b"second"
    client.shutdown(socket.SHUT_WR)
    echo.finish()


def test_tcp_keepalive_of_any_length_is_set():
    sock = socket.socket()
    try:
        heartbeat.enable_tcp_keepalive(sock, 10 * 365 * 24 * 3600.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        # The kernel's longest idle time before probes, not its default (7,200 s).
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 32767
    finally:
        sock.close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        echo_handler(self.request)


def test_a_relay_restart_costs_new_clients_nothing(env):
    # Relay R1 leaves (SIGTERM: stop accepting, GOAWAY to services, drain) while
    # a client is still open; R2 starts at once on the same ports. The service
    # keeps serving the old client on R1 and registers with R2 straight away.
    ports = free_port_range(2)
    service_port, public_port = ports
    r1 = Relay((LOOPBACK, service_port), ports=[public_port], public_bind=LOOPBACK,
               drain_timeout=TIMEOUT)
    r1_thread = threading.Thread(target=r1.serve_forever, name="r1")
    r1_thread.start()
    server = RelayServer((LOOPBACK, service_port), _Echo, timeout=TIMEOUT)
    serving = threading.Thread(target=server.serve_forever, kwargs=RECONNECT,
                               name="service")
    serving.start()
    old_client = socket.create_connection((LOOPBACK, public_port), timeout=TIMEOUT)
    r2 = None
    try:
        assert echo_roundtrip(old_client, b"before", half_close=False) == b"before"
        r1.shutdown()
        r1_thread.join(TIMEOUT)
        draining = Worker(r1.drain)
        wait_until(lambda: bindable((LOOPBACK, service_port)),
                   what="r1 to stop listening")
        r2 = Relay((LOOPBACK, service_port), ports=[public_port], public_bind=LOOPBACK)
        r2_thread = threading.Thread(target=r2.serve_forever, name="r2")
        r2_thread.start()
        env.defer(r2_thread.join, TIMEOUT)
        env.defer(r2.server_close)
        env.defer(r2.shutdown)
        started = time.monotonic()
        wait_until(lambda: any(link.port == public_port for link in r2.services),
                   what="the service to register with the new relay")
        assert time.monotonic() - started < 3.0
        new_client = socket.create_connection((LOOPBACK, public_port), timeout=TIMEOUT)
        with new_client:
            assert echo_roundtrip(new_client, b"after") == b"after"
        # The old client still talks to the service through the old relay.
        assert echo_roundtrip(old_client, b"still", half_close=False) == b"still"
        old_client.shutdown(socket.SHUT_WR)
        assert recv_exact(old_client, 0) == b"" and old_client.recv(1) == b""
        assert draining.finish() is True
    finally:
        old_client.close()
        server.shutdown()
        serving.join(TIMEOUT)
        server.server_close()
        r1.server_close()


class _Interrupted(Exception):
    """Raised in the main thread, as a signal handler's exception would be."""


def test_an_exception_in_the_main_thread_never_ends_the_session(sessions, monkeypatch):
    # A signal handler may raise wherever the main thread is. If the main
    # thread were reading frames for the session when it did, the session
    # would end and every stream with it: the main thread must never do that.
    from tcprelay.reader import FrameDispatch
    real = FrameDispatch.data

    def data(self, stream_id, flags, payload):
        if threading.current_thread() is threading.main_thread():
            raise _Interrupted()
        return real(self, stream_id, flags, payload)

    monkeypatch.setattr(FrameDispatch, "data", data)
    opened, accepted = sessions.stream_pair()
    for n in range(50):
        message = b"message %d" % n
        sender = threading.Timer(0.001, opened.sendall, (message,))
        sender.start()
        try:
            assert recv_exact(accepted, len(message)) == message
        finally:
            sender.join(TIMEOUT)
    assert not sessions.server.closed, sessions.server.error


def test_out_of_stream_ids_the_service_moves_to_a_fresh_session(env):
    # The relay's stream ids for one service's session run out: it asks the
    # service to register again (GOAWAY) and gives its port to the new session
    # at once; the clients open on the old one finish there, unharmed.
    from tcprelay.frames import MAX_STREAM_ID
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = RelayServer(relay.server_address, _Echo, timeout=TIMEOUT)
    serving = threading.Thread(target=server.serve_forever, kwargs=RECONNECT,
                               name="service")
    serving.start()
    clients = []
    try:
        old_link = [link for link in relay.services if link.port == port][0]
        old_link._session._next_id = MAX_STREAM_ID - 3   # the last two even ids: two clients more
        for _ in range(2):
            clients.append(socket.create_connection((LOOPBACK, port), timeout=TIMEOUT))
            assert echo_roundtrip(clients[-1], b"on the old session", half_close=False) \
                == b"on the old session"
        # The next client finds no stream id left: refused, and the service moves.
        try:
            refused = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        except ConnectionResetError:
            pass   # reset before connect() returned
        else:
            with refused:
                try:
                    assert refused.recv(1) == b""
                except ConnectionResetError:
                    pass
        wait_until(lambda: any(link.port == port and link is not old_link
                               for link in relay.services),
                   what="the service's fresh session to hold the port")
        new_client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        with new_client:
            assert echo_roundtrip(new_client, b"on the new one") == b"on the new one"
        for client in clients:   # the old session's clients never noticed
            assert echo_roundtrip(client, b"still here", half_close=False) == b"still here"
        assert not old_link._session.closed
        for client in clients:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        assert old_link.join(TIMEOUT), "the old session did not end once its clients had"
    finally:
        for client in clients:
            client.close()
        server.shutdown()
        serving.join(TIMEOUT)
        server.server_close()


def test_a_service_waiting_in_line_follows_a_relay_restart(env):
    # A service the relay had in line was reachable and taken: when the relay
    # restarts it tries again, --retry or not, and waits in line at the new one.
    ports = free_port_range(2)
    service_port, public_port = ports
    r1 = Relay((LOOPBACK, service_port), ports=[public_port], public_bind=LOOPBACK,
               drain_timeout=TIMEOUT, waiting_interval=0.2)
    r1_thread = threading.Thread(target=r1.serve_forever, name="r1")
    r1_thread.start()
    holder = RelayServer((LOOPBACK, service_port), _Echo, timeout=TIMEOUT)
    holding = threading.Thread(target=holder.serve_forever, kwargs=RECONNECT,
                               name="holder")
    holding.start()
    in_line = threading.Event()
    waiter = RelayServer((LOOPBACK, service_port), _Echo, timeout=TIMEOUT,
                         bind_and_activate=False, on_waiting=lambda position: in_line.set())
    registering = Worker(waiter.server_activate, name="waiter")
    r2 = None
    try:
        assert in_line.wait(TIMEOUT)
        in_line.clear()
        r1.shutdown()
        r1_thread.join(TIMEOUT)
        assert r1.drain() is True
        r1.server_close()
        r2 = Relay((LOOPBACK, service_port), ports=[public_port], public_bind=LOOPBACK,
                   waiting_interval=0.2)
        r2_thread = threading.Thread(target=r2.serve_forever, name="r2")
        r2_thread.start()
        env.defer(r2_thread.join, TIMEOUT)
        env.defer(r2.server_close)
        env.defer(r2.shutdown)
        # Both come back: whichever is first gets the port, the other waits in line.
        wait_until(lambda: len(r2.services) == 2, timeout=2 * TIMEOUT,
                   what="the holder and the waiter to come back to the new relay")
        assert registering.is_alive() or registering.error is None, registering.error
        holder.shutdown()
        holding.join(TIMEOUT)
        holder.server_close()
        registering.finish()    # the port came
        assert waiter.server_address[1] == public_port
    finally:
        holder.shutdown()
        holding.join(TIMEOUT)
        holder.server_close()
        waiter.server_close()
        r1.server_close()


# -- exceptions from signal handlers, in the middle of a stream's bookkeeping ----

# muxado's code: the session, its streams, reads and writes, and their helpers
_MUXADO_FILES = frozenset(module.__file__.rstrip("c") for module in (
    muxado, muxado_stream, muxado_reader, muxado_writer, mainthread, clock, muxerrors,
    socketlike, streambuffer, streamincoming, window))
_THREADING_FILE = threading.__file__.rstrip("c")


def _in_muxado(frame):
    """Whether ``frame`` runs muxado's code, or the threading code it called.

    Not a finaliser or hook that happened to run inside it: an exception
    there is ignored ("Exception ignored in"), whoever raises it.
    """
    if (frame.f_code.co_filename not in _MUXADO_FILES
            and frame.f_code.co_filename != _THREADING_FILE):
        return False
    while frame is not None:
        if frame.f_code.co_filename in _MUXADO_FILES:
            return True
        frame = frame.f_back
    return False


class _Alarms(object):
    """SIGALRM every ``interval`` seconds; its handler raises _Interrupted
    whenever the main thread is inside tcprelay.muxado (and counts it)."""

    def __init__(self, interval):
        self.interval = interval
        self.raised = 0
        self.armed = True

    def _handler(self, signum, frame):
        if self.armed and _in_muxado(frame):
            self.raised += 1
            raise _Interrupted()

    def __enter__(self):
        self._previous = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def __exit__(self, *exc_info):
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def _pattern(start, n):
    """Bytes ``start`` to ``start + n`` of an endless pattern that shows a loss or a repeat."""
    out = bytearray()
    while len(out) < n:
        position = start + len(out)
        block = struct.pack(">Q", position // 8)
        out += block[position % 8:][:n - len(out)]
    return bytes(out)


needs_alarm = pytest.mark.skipif(
    not hasattr(signal, "setitimer") or sys.version_info < (3, 11),
    reason="needs signal.setitimer (POSIX), and CPython 3.11 or later: before, a signal "
           "handler's exception can land between a with block's end and its __exit__ "
           "(bpo-29988), leaving a lock taken whatever Python code does (seen on 3.6-3.10)")


@needs_alarm
@pytest.mark.parametrize("how", ["recv", "recv_into", "waitall"])
def test_a_signal_raising_in_recv_loses_nothing_and_stalls_nothing(how):
    # A signal handler raises in the main thread while it reads a stream, at
    # any point of the stream's bookkeeping. Every byte comes through, once and
    # in order; the window is never leaked (a leak of two grants would stall);
    # the session lives on. Before: IndexError from the buffer, lost bytes.
    total = 4 * 1024 * 1024
    window = muxado.DEFAULT_WINDOW
    pair = SessionPair()
    try:
        opened, accepted = pair.stream_pair()

        def send():
            position = 0
            while position < total:
                n = min(total - position, 1000 + position % 7000)
                opened.sendall(_pattern(position, n))
                position += n
            opened.close_write()

        sender = threading.Thread(target=send, name="sender")
        sender.start()
        received = 0
        buffer = bytearray(70000)
        deadline = time.monotonic() + 60
        with _Alarms(0.0005) as alarms:
            while True:
                assert time.monotonic() < deadline, "stalled at %d of %d" % (received, total)
                size = 1 + received % 65536
                try:
                    if how == "recv":
                        data = accepted.recv(size)
                    elif how == "recv_into":
                        data = bytes(buffer[:accepted.recv_into(buffer, size)])
                    else:
                        data = accepted.recv(size + window, socket.MSG_WAITALL)
                except _Interrupted:
                    continue
                if not data:
                    break
                assert data == _pattern(received, len(data)), "at %d" % received
                received += len(data)
        sender.join(TIMEOUT)
        assert received == total
        assert alarms.raised > 50, "the handler hardly ever landed in muxado"
        assert not pair.server.closed and not pair.client.closed, pair.server.error
        # The stream still works both ways.
        accepted.sendall(b"still here")
        assert recv_exact(opened, 10) == b"still here"
    finally:
        pair.close()


@needs_alarm
def test_a_signal_raising_in_send_never_breaks_the_session():
    # The main thread sends while a signal handler raises in it. What a raise
    # interrupted may or may not have gone (as with socket.send), but frames
    # stay whole, no window is leaked (a leak would stall) and
    # the session lives on. Before: the write lock or window could be lost.
    pair = SessionPair()
    try:
        opened, accepted = pair.stream_pair()
        received = []

        def receive():
            while True:
                data = accepted.recv(65536)
                if not data:
                    return
                received.append(len(data))

        receiver = threading.Thread(target=receive, name="receiver")
        receiver.start()
        payload = b"x" * 20000
        sent = 0
        deadline = time.monotonic() + 60
        with _Alarms(0.0005) as alarms:
            while alarms.raised < 200 and sent < 256 * 1024 * 1024:
                assert time.monotonic() < deadline, "stalled after %d bytes" % sent
                try:
                    sent += opened.send(payload)
                except _Interrupted:
                    continue
        opened.close_write()
        receiver.join(TIMEOUT)
        assert not receiver.is_alive()
        assert sum(received) >= sent
        assert alarms.raised >= 200, "the handler hardly ever landed in muxado"
        assert not pair.server.closed and not pair.client.closed, pair.server.error
        accepted.sendall(b"still here")
        assert recv_exact(opened, 10) == b"still here"
    finally:
        pair.close()
