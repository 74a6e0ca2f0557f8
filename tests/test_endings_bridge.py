"""How a bridge (a public client joined to a stream) ends: nothing the peer
finished sending is lost, nothing hangs, and no slot is held by a client that
has gone.

- a client reset while its pump waits for the service's window frees its slot;
- a service that finishes a stream and leaves at once still has it delivered
  (bounded by --drain-timeout), in the relay and in the adapter;
- --idle-timeout counts what the flusher delivers, and covers a bridge whatever
  its half-close state;
- one slow client socket never blocks the session's reader or the flusher.
"""

import os
import socket
import sys
import threading
import time

import pytest

from helpers.basics import MIB, TIMEOUT, Worker, wait_until
from helpers.relay import (
    abort, echo_handler, fill_until_the_adapter_holds, link_of, listening_socket, only_bridge,
    push_until_stalled, read_until_end, recv_exact, recv_to_eof, send_until_it_fails,
)
from tcprelay import bridge as bridge_module
from tcprelay.adapter import Adapter
from tcprelay.service import RelayGone


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


WINDOW_CHECK = 0.25   # the pump's look at its client while it waits for window (1 s by default)


@pytest.fixture
def quick_window_checks(monkeypatch):
    """Pumps waiting for window look at their client every WINDOW_CHECK seconds."""
    monkeypatch.setattr(bridge_module, "_WINDOW_CHECK", WINDOW_CHECK)


# -- A: a client reset while its pump waits for window -------------------------------------

def test_client_reset_while_the_pump_waits_for_window_frees_its_slot(env, quick_window_checks):
    relay = env.relay(ports=1, max_clients=1)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()          # its handler never reads
    push_until_stalled(client)         # the pump now waits for the service's window
    link = link_of(relay, port)
    assert link.client_count == 1
    abort(client)
    # Noticed at the pump's next check between waits for window (WINDOW_CHECK).
    wait_until(lambda: link.client_count == 0, timeout=4,
               what="the reset client's slot freed")
    data, how = read_until_end(stream)
    assert isinstance(how, ConnectionResetError), "the stream saw %r, not a reset" % (how,)
    # The slot is free: a new client gets through.
    newcomer = env.client(port)
    fresh = service.accept()
    newcomer.sendall(b"hello")
    assert recv_exact(fresh, 5) == b"hello"


def test_half_closed_client_whose_pump_waits_for_window_still_delivers(env,
                                                                      quick_window_checks):
    # A client's FIN is not its going away: what it sent must all arrive.
    relay = env.relay(ports=1)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()
    sent = push_until_stalled(client)
    client.shutdown(socket.SHUT_WR)
    # Nothing to wait for: the pump must NOT end the client over a few of its
    # checks of the client socket between waits for window (three of them here).
    threading.Event().wait(3.5 * WINDOW_CHECK)
    assert link_of(relay, port).client_count == 1
    assert recv_to_eof(stream) == sent
    stream.sendall(b"bye")
    stream.close()
    assert recv_to_eof(client) == b"bye"


# -- 2: a service that finishes a stream and leaves at once ------------------------------------

def finish_and_leave(connection, stream, data):
    if data:
        stream.sendall(data)
    stream.close_write()
    stream.close()
    connection.close()


@pytest.mark.parametrize("client_sends_late", [False, True],
                         ids=["client-quiet", "client-sends-after-the-service-left"])
def test_service_leaving_right_after_finishing_a_stream_loses_nothing(env, client_sends_late):
    relay = env.relay(ports=1, drain_timeout=TIMEOUT)
    connection = env.connect(relay.server_address)
    client = env.client(connection.port)
    stream = connection.accept(TIMEOUT)
    stream.settimeout(TIMEOUT)
    link = link_of(relay, connection.port)
    # The client has not half-closed and reads nothing until the service is gone.
    if client_sends_late:
        data = push_until_stalled(stream)   # the relay holds a window's worth for it
        Worker(finish_and_leave, connection, stream, b"").finish()
    else:
        data = os.urandom(3 * MIB)          # the case as reported
        Worker(finish_and_leave, connection, stream, data).finish()
    assert link._session.wait(TIMEOUT), "the relay never saw the service leave"
    if client_sends_late:
        # The stream can take nothing more: only the upward direction ends.
        client.sendall(b"too late")
    assert recv_to_eof(client) == data
    client.close()
    assert link.join(TIMEOUT), "the service's link still waits"
    assert relay.client_count == 0


def test_client_that_never_reads_is_reset_drain_timeout_after_the_service_left(env):
    drain = 0.5
    relay = env.relay(ports=1, drain_timeout=drain)
    connection = env.connect(relay.server_address)
    client = env.client(connection.port)
    stream = connection.accept(TIMEOUT)
    stream.settimeout(TIMEOUT)
    link = link_of(relay, connection.port)
    push_until_stalled(stream)   # the relay now holds a window's worth for the client
    Worker(finish_and_leave, connection, stream, b"").finish()
    assert link._session.wait(TIMEOUT)
    left = time.monotonic()
    assert link.join(TIMEOUT), "a client that never reads holds the service's port"
    held = time.monotonic() - left
    assert drain * 0.8 <= held < drain + 3, "the client was held %.2fs, not about %gs" % (
        held, drain)
    assert relay.client_count == 0
    with pytest.raises(ConnectionResetError):
        while client.recv(MIB):
            pass


def test_adapter_delivers_a_finished_upload_after_the_relay_left(env):
    relay = env.relay(ports=1)
    cleanups = []
    env.defer(lambda: [fn() for fn in reversed(cleanups)])
    backend = listening_socket(cleanups)
    adapter = Adapter(relay.server_address, backend.getsockname())
    env.defer(adapter.server_close)
    serving = env.serve(adapter)
    port = adapter.server_address[1]
    client = env.client(port)
    conn, _ = backend.accept()       # the local service reads nothing yet
    cleanups.append(conn.close)
    conn.settimeout(TIMEOUT)
    upload = os.urandom(MIB)
    client.sendall(upload)
    client.shutdown(socket.SHUT_WR)
    link = link_of(relay, port)
    # The relay has sent the stream's FIN (its pump is done): then it goes away.
    wait_until(lambda: all(b._up_done for b in list(link._bridges)),
               what="the relay's pump done")
    link.close()
    assert link.join(TIMEOUT)
    with pytest.raises(RelayGone):
        serving.result()
    # The relay sent everything and FIN before it went: all of it arrives.
    assert recv_to_eof(conn) == upload


# -- 4: --idle-timeout and slow clients ---------------------------------------------------------

def stream_until(stream, stop, block=16 * 1024):
    """Send on ``stream`` without pause until ``stop`` is set or the stream fails."""
    data = os.urandom(block)
    try:
        while not stop.is_set():
            stream.sendall(data)
    except OSError:
        pass


def test_idle_timeout_counts_what_the_flusher_delivers(env):
    relay = env.relay(ports=1, idle_timeout=1.0)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()
    stop = threading.Event()
    streaming = Worker(stream_until, stream, stop)
    try:
        # A slow reader: everything reaches it through the flusher's backlog,
        # for twice the idle timeout.
        end = time.monotonic() + 2.0
        got = 0
        while time.monotonic() < end:
            chunk = client.recv(16 * 1024)
            assert chunk, "EOF after %d bytes" % got
            got += len(chunk)
            stop.wait(0.1)
        assert link_of(relay, port).client_count == 1
    finally:
        stop.set()
        stream.reset()
        streaming.finish()


def trickle(stream, stop, block=2 * 1024):
    """Small sends without pause: the bridge's backlog is many small chunks."""
    stream_until(stream, stop, block)


def slow_read(sock, stop):
    while not stop.is_set():
        try:
            if not sock.recv(4 * 1024):
                return
        except OSError:
            return
        stop.wait(0.02)


@pytest.mark.parametrize("idle_timeout", [None, 5.0], ids=["no-idle-timeout", "idle-timeout"])
def test_a_slow_client_never_blocks_the_session_reader_or_the_flusher(env, idle_timeout):
    relay = env.relay(ports=1, idle_timeout=idle_timeout)
    service = env.service(relay)
    port = service.register_ok()
    slow = env.client(port)
    slow_stream = service.accept()
    lively = env.client(port)
    lively_stream = service.accept()
    echo = Worker(echo_handler, lively_stream)
    stop = threading.Event()
    workers = [Worker(trickle, slow_stream, stop), Worker(slow_read, slow, stop)]
    try:
        link = link_of(relay, port)

        def backlog():
            with link._lock:
                bridges = list(link._bridges)
            return any(bridge._pending for bridge in bridges)
        # (Never, if sends to the slow socket block instead of leaving a backlog.)
        wait_until(backlog, timeout=3, what="a backlog for the slow client, not a blocked send")
        worst = 0.0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            started = time.monotonic()
            lively.sendall(b"ping" * 25)
            assert recv_exact(lively, 100) == b"ping" * 25
            worst = max(worst, time.monotonic() - started)
        assert worst < 1.0, "a round trip took %.2fs behind a slow client" % worst
    finally:
        stop.set()
        slow_stream.reset()
        for worker in workers:
            worker.finish()
    lively.shutdown(socket.SHUT_WR)
    assert recv_to_eof(lively) == b""
    echo.finish()


# -- endings in every half-close state -------------------------------------------------------

def test_idle_timeout_reclaims_a_client_that_half_closed_and_left(env):
    relay = env.relay(ports=1, idle_timeout=0.5)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(stream) == b"request"
    # The service neither replies nor closes; the client is gone in all but name.
    link = link_of(relay, port)
    wait_until(lambda: link.client_count == 0, timeout=3,
               what="the half-closed idle client reclaimed")
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    how = send_until_it_fails(stream)
    assert isinstance(how, ConnectionResetError), "the stream saw %r, not a reset" % (how,)


def test_public_clients_get_tcp_keepalive(env):
    relay = env.relay(ports=1)
    service = env.service(relay)
    port = service.register_ok()
    env.client(port)
    service.accept()
    bridge = only_bridge(relay, port)
    assert bridge.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_server_close_resets_a_client_still_reading_a_finished_stream_at_once(env):
    # drain_timeout is for a service that left; server_close() resets at once
    # (Relay.drain has had its time), as before a finished stream was delivered.
    relay = env.relay(ports=1, drain_timeout=TIMEOUT)
    connection = env.connect(relay.server_address)
    client = env.client(connection.port)
    stream = connection.accept(TIMEOUT)
    stream.settimeout(TIMEOUT)
    push_until_stalled(stream)
    stream.close_write()
    link = link_of(relay, connection.port)
    wait_until(lambda: only_bridge(relay, connection.port)._service_done,
               what="the relay to see the stream's FIN")
    started = time.monotonic()
    link.close()
    assert link.join(TIMEOUT)
    assert time.monotonic() - started < TIMEOUT / 4, "close() waited for the client"
    with pytest.raises(ConnectionResetError):
        while client.recv(MIB):
            pass


def test_adapter_close_resets_a_local_service_that_never_takes_a_finished_stream(env):
    relay = env.relay(ports=1)
    cleanups = []
    env.defer(lambda: [fn() for fn in reversed(cleanups)])
    backend = listening_socket(cleanups)
    # Small buffers: the adapter keeps part of the upload waiting for the service.
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    adapter = Adapter(relay.server_address, backend.getsockname(), drain_timeout=0.5)
    serving = env.serve(adapter)
    port = adapter.server_address[1]
    client = env.client(port)
    conn, _ = backend.accept()       # the local service never reads
    cleanups.append(conn.close)
    conn.settimeout(TIMEOUT)

    # Upload until the local service's socket is full and the adapter holds the rest.
    fill_until_the_adapter_holds(adapter, client)
    started = time.monotonic()
    closing = Worker(adapter.server_close)
    closing.finish(TIMEOUT)
    assert time.monotonic() - started < 0.5 + 3, "server_close waited on the local service"
    serving.result()
    with pytest.raises(ConnectionResetError):
        while conn.recv(MIB):
            pass


def test_idle_timeout_covers_a_client_stalled_on_a_service_that_takes_nothing(
        env, quick_window_checks):
    # Nothing moves either way: the client's upload waits for window that never comes.
    relay = env.relay(ports=1, idle_timeout=1.0)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()          # never read
    push_until_stalled(client)
    stalled = time.monotonic()
    link = link_of(relay, port)
    wait_until(lambda: link.client_count == 0, timeout=5, what="the stalled client reclaimed")
    assert time.monotonic() - stalled < 4
    data, how = read_until_end(stream)
    assert isinstance(how, ConnectionResetError), "the stream saw %r, not a reset" % (how,)


def test_service_closing_a_finished_stream_while_the_client_still_sends_loses_nothing(env):
    # The service sent its reply and closed the stream; the client's later
    # bytes are refused (RST STREAM_CLOSED): only they are dropped, not the reply.
    relay = env.relay(ports=1)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()
    reply = push_until_stalled(stream)   # the relay holds a window's worth for the client
    stream.close()
    bridge = only_bridge(relay, port)
    wait_until(lambda: bridge.stream._fin_received, what="the stream's FIN at the relay")
    client.sendall(b"more")
    wait_until(lambda: bridge.stream._error is not None, what="the service's RST")
    assert recv_to_eof(client) == reply
    wait_until(lambda: link_of(relay, port).client_count == 0, what="the client counted out")


@pytest.mark.parametrize("inherited", [None, False], ids=["from-the-listener", "set-each"])
def test_public_clients_get_the_relays_keepalive_and_nodelay(env, monkeypatch, inherited):
    # The public listener carries the options and accepted clients inherit
    # them (no syscalls per client); where a system does not copy them, the
    # relay sets them on each client. Either way every client has them.
    from tcprelay import heartbeat
    monkeypatch.setattr(heartbeat, "_inherited", inherited)
    relay = env.relay(ports=1, keepalive=90.0)
    service = env.service(relay)
    port = service.register_ok()
    env.client(port)
    service.accept()
    sock = only_bridge(relay, port).sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
    assert sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18)) == 90000
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    if inherited is None and sys.platform.startswith("linux"):
        assert heartbeat._inherited is True   # Linux copies them: no syscalls per client
