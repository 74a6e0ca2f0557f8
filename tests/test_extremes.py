"""Extremes: timeouts of any size, as a socket takes them.

Every blocking call in these tests has a timeout of its own (TIMEOUT), however
long the timeouts under test are.
"""

import socket
import threading

import pytest

from conftest import TIMEOUT
from relay_helpers import LOOPBACK, Worker, echo_handler, echo_roundtrip, recv_exact
from test_relay import Env
from tcprelay import clock, heartbeat, service

THIRTY_DAYS = 30 * 24 * 3600.0
EXTREMES = [THIRTY_DAYS, 10 * 365 * 24 * 3600.0, clock.MAX_TIMEOUT]


@pytest.fixture
def env(no_leaks):
    environment = Env()
    yield environment
    environment.close()


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
