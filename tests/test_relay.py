"""The relay end to end, in process: a ``Relay`` served from a thread, services
that speak muxado directly (stand-ins the test drives), and plain TCP clients of
the public ports, all on 127.0.0.1.

Every test runs under ``no_leaks`` (threads and files back to where they
were), fails if the relay logs an error (a crash), and bounds every blocking
call with ``TIMEOUT``.
"""

import json
import logging
import os
import select
import socket
import threading
import time

import pytest

from helpers.basics import LOOPBACK, MIB, TIMEOUT, Worker, free_port_range, wait_until
from helpers.envs import registered
from helpers.relay import (
    Service, abort, connect_client, echo_handler, echo_roundtrip, link_of, push_until_stalled,
    read_until_end, recv_exact, recv_to_eof, send_until_it_fails, sendall_then,
)
from tcprelay import muxado
from tcprelay.muxado import ErrorCode
from tcprelay.relay import Relay


@pytest.fixture
def env(relay_env):
    """This module's tests run in a Env (conftest)."""
    return relay_env


def address(port):
    return "127.0.0.1:%d" % port


# -- registration -------------------------------------------------------------------------

@pytest.mark.parametrize("announce", [False, True], ids=["go-style-lazy-syn", "announced"])
def test_minimal_registration_answers_host_port_and_serves_clients(env, announce):
    relay = env.relay(ports=2)
    first = relay.pool.ports[0]
    service = env.service(relay)
    # Go's contract: open a stream, write nothing, half-close, read to EOF.
    assert service.register_minimal(announce=announce) == address(first).encode("ascii")
    client = env.client(first)
    stream = service.accept()   # each client is a new stream
    client.sendall(b"ping")
    assert recv_exact(stream, 4) == b"ping"
    stream.sendall(b"pong")
    assert recv_exact(client, 4) == b"pong"


def test_minimal_registration_uses_public_host(env):
    relay = env.relay(ports=1, public_host="relay.example.test")
    service = env.service(relay)
    reply = service.register_minimal()
    assert reply == ("relay.example.test:%d" % relay.pool.ports[0]).encode("ascii")


@pytest.mark.parametrize("body", [
    {},
    {"version": 1},
    {"version": 1, "name": "svc-1"},
    {"notices": True},
    {"max_wait": 0},
    {"version": 1, "name": "svc", "notices": False, "max_wait": 5, "future_field": [1]},
], ids=["empty-object", "version", "name", "notices", "max-wait-0", "all-fields"])
def test_extended_registration_ok_reply(env, body):
    relay = env.relay(ports=2)
    first = relay.pool.ports[0]
    service = env.service(relay)
    registration = service.register(body)
    waiting, reply = registration.final()
    registration.close()
    assert waiting == []   # a port was free: no line to report
    assert reply["status"] == "ok"
    assert reply["address"] == address(first)
    assert reply["port"] == first
    # And the port really serves that service.
    client = env.client(first)
    stream = service.accept()
    client.sendall(b"x")
    assert recv_exact(stream, 1) == b"x"


def test_requested_port_in_pool_is_granted(env):
    relay = env.relay(ports=4)
    wanted = relay.pool.ports[2]
    service = env.service(relay)
    registration = service.register({"port": wanted, "notices": True})
    waiting, reply = registration.final()
    assert waiting == []
    assert (reply["status"], reply["port"], reply["address"]) == ("ok", wanted, address(wanted))
    env.client(wanted)
    assert service.accept().id > 0


def expect_refusal(service, body=None, raw=None):
    """Register and expect exactly one error reply, then the stream's end."""
    registration = service.register(body, raw=raw)
    waiting, reply = registration.final()
    registration.close()
    assert waiting == []
    assert reply["status"] == "error", reply
    assert isinstance(reply.get("error"), str) and reply["error"].strip(), reply
    assert "port" not in reply and "address" not in reply
    return reply["error"]


def assert_relay_still_serves(env, relay, port):
    """A new service still registers and gets ``port``: the relay did not crash."""
    service = env.service(relay)
    assert service.register_minimal() == address(port).encode("ascii")


@pytest.mark.parametrize("where", ["below", "above", "far"])
def test_requested_port_outside_pool_is_refused(env, where):
    relay = env.relay(ports=2)
    low, high = relay.pool.ports[0], relay.pool.ports[-1]
    port = {"below": low - 1, "above": high + 1, "far": 65535}[where]
    error = expect_refusal(env.service(relay), {"port": port})
    assert str(port) in error
    assert_relay_still_serves(env, relay, low)


def test_unsupported_version_is_refused(env):
    relay = env.relay(ports=1)
    error = expect_refusal(env.service(relay), {"version": 99, "name": "from-the-future"})
    assert "version" in error
    assert_relay_still_serves(env, relay, relay.pool.ports[0])


@pytest.mark.parametrize("raw", [
    b"{not json\n",
    b"[1, 2, 3]\n",
    b"\"just a string\"\n",
    b"\xff\xfe\xfd\n",
    b"{\"port\": \"eighty\"}\n",
    b"{\"port\": 0}\n",
    b"{\"notices\": 1}\n",
    b"{\"max_wait\": -1}\n",
    b"{\"name\": \"\"}\n",
    b"{\"name\": 12}\n",
    b"{\"version\": 0}\n",
    b"{\"version\": \"1\"}\n",
    b"{\"port\": 1.5e3}\n",
    b"{\"port\": true}\n",
    b"[" * 4000 + b"\n",
], ids=["bad-json", "array", "string", "not-utf8", "port-text", "port-0", "notices-int",
        "max-wait-negative", "name-empty", "name-number", "version-0", "version-text",
        "port-float", "port-bool", "deep-nesting"])
def test_malformed_request_gets_error_reply(env, raw):
    relay = env.relay(ports=1)
    expect_refusal(env.service(relay), raw=raw)
    assert_relay_still_serves(env, relay, relay.pool.ports[0])


def test_request_over_4kib_is_capped_with_error_reply(env):
    # 64 KiB with no newline and no FIN: the relay must stop reading at 4 KiB and
    # answer at once, not wait for a newline until the (long) handshake timeout.
    relay = env.relay(ports=1, handshake_timeout=6 * TIMEOUT)
    expect_refusal(env.service(relay), raw=b"{\"name\": \"" + b"a" * (64 * 1024))
    assert_relay_still_serves(env, relay, relay.pool.ports[0])


def test_request_of_exactly_4kib_is_read(env):
    relay = env.relay(ports=1)
    line = json.dumps({"version": 1, "pad": ""}).encode()
    line = json.dumps({"version": 1, "pad": "p" * (4096 - len(line) - 1)}).encode() + b"\n"
    assert len(line) == 4096
    service = env.service(relay)
    registration = service.register(raw=line)
    waiting, reply = registration.final()
    registration.close()
    assert (reply["status"], reply["port"]) == ("ok", relay.pool.ports[0])


@pytest.mark.parametrize("silence", ["no-stream", "empty-stream", "partial-line"])
def test_silent_service_is_dropped_after_handshake_timeout(env, silence):
    timeout = 0.5
    relay = env.relay(ports=1, handshake_timeout=timeout)
    started = time.monotonic()
    service = env.service(relay)
    if silence == "empty-stream":
        service.session.open()   # announced, but no request and no FIN
    elif silence == "partial-line":
        service.session.open().sendall(b"{\"name\": \"sl")
    assert service.session.wait(TIMEOUT), "the relay kept a silent service"
    elapsed = time.monotonic() - started
    assert elapsed >= timeout * 0.8, "dropped after %.2fs, before the handshake timeout" % elapsed
    # It never took the port.
    assert_relay_still_serves(env, relay, relay.pool.ports[0])


# -- the port pool ---------------------------------------------------------------------------

def test_waiting_services_are_served_in_arrival_order(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    holder = env.service(relay)
    assert holder.register_ok() == port
    waiters = []
    for expected in (1, 2, 3):
        service = env.service(relay)
        registration = service.register({"notices": True, "name": "waiter-%d" % expected})
        assert registration.reply() == {"status": "waiting", "position": expected}
        waiters.append((service, registration))
    # The holder leaves: the port goes to the head of the line at once,
    # and everyone behind moves up one place.
    holder.close()
    for turn in range(3):
        service, registration = waiters[turn]
        reply = registration.reply()
        assert reply["status"] == "ok", reply
        assert (reply["port"], reply["address"]) == (port, address(port))
        assert registration.reply() is None
        for place, (_, behind) in enumerate(waiters[turn + 1:], 1):
            assert behind.reply() == {"status": "waiting", "position": place}
        # The new holder really serves the port...
        client = env.client(port)
        stream = service.accept()
        client.sendall(b"turn %d" % turn)
        assert recv_exact(stream, 6) == b"turn %d" % turn
        client.close()
        registration.close()
        # ...until it leaves in turn.
        service.close()


def test_service_that_leaves_the_line_is_out_of_it_at_once(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    holder = env.service(relay)
    assert holder.register_ok() == port
    leaver = env.service(relay)
    leaving = leaver.register({"notices": True})
    assert leaving.reply() == {"status": "waiting", "position": 1}
    stayer = env.service(relay)
    staying = stayer.register({"notices": True})
    assert staying.reply() == {"status": "waiting", "position": 2}
    leaver.close()   # disconnects while waiting
    # The one behind moves up while the port is still held.
    assert staying.reply() == {"status": "waiting", "position": 1}
    holder.close()
    waiting, reply = staying.final()
    assert waiting == []
    assert (reply["status"], reply["port"]) == ("ok", port)


def test_max_wait_ends_the_wait_with_an_error(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    holder = env.service(relay)
    assert holder.register_ok() == port
    impatient = env.service(relay)
    started = time.monotonic()
    registration = impatient.register({"notices": True, "max_wait": 0.4})
    waiting, reply = registration.final()
    elapsed = time.monotonic() - started
    assert waiting == [{"status": "waiting", "position": 1}]
    assert reply["status"] == "error" and reply["error"], reply
    assert 0.3 <= elapsed < TIMEOUT
    # It is out of the line: the next one is first, and gets the port.
    patient = env.service(relay)
    line = patient.register({"notices": True})
    assert line.reply() == {"status": "waiting", "position": 1}
    holder.close()
    waiting, reply = line.final()
    assert (reply["status"], reply["port"]) == ("ok", port)


def test_requested_port_is_granted_when_it_becomes_free(env):
    relay = env.relay(ports=2)
    wanted, other = relay.pool.ports
    holder = env.service(relay)
    assert holder.register_ok({"port": wanted}) == wanted
    asker = env.service(relay)
    asking = asker.register({"port": wanted, "notices": True})
    assert asking.reply() == {"status": "waiting", "position": 1, "port": wanted,
                              "reason": "port %d is held by another service" % wanted}
    # Anyone else still gets the other free port meanwhile.
    assert env.service(relay).register_ok() == other
    holder.close()
    waiting, reply = asking.final()
    assert waiting == []
    assert (reply["status"], reply["port"]) == ("ok", wanted)


def test_max_services_makes_services_wait_with_ports_free(env):
    relay = env.relay(ports=3, max_services=1)
    first = relay.pool.ports[0]
    holder = env.service(relay)
    assert holder.register_ok() == first
    waiter = env.service(relay)
    registration = waiter.register({"notices": True})
    reply = registration.reply()
    assert (reply["status"], reply["position"]) == ("waiting", 1), reply
    # Not "every port is taken": two are free.
    assert "ports free" in reply["reason"] and "port" not in reply, reply
    holder.close()
    waiting, reply = registration.final()
    assert (reply["status"], reply["port"]) == ("ok", first)


def test_session_end_resets_clients_stops_listening_and_frees_the_port(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    service = env.service(relay)
    assert service.register_ok() == port
    idle = env.client(port)
    idle_stream = service.accept()
    busy = env.client(port)
    busy_stream = service.accept()
    # The busy client is mid-transfer: part of its data has reached the service.
    busy.sendall(b"b" * 100000)
    recv_exact(busy_stream, 50000)
    idle.sendall(b"hi")
    assert recv_exact(idle_stream, 2) == b"hi"
    link = link_of(relay, port)
    service.close()
    for client in (idle, busy):
        data, how = read_until_end(client)
        assert isinstance(how, ConnectionResetError), "client saw %r, not a reset" % (how,)
    assert link.join(TIMEOUT), "the service's thread did not end"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=TIMEOUT).close()
    # Back in the pool: the next service gets it.
    assert_relay_still_serves(env, relay, port)


def test_unbindable_port_is_skipped_logged_and_retried(env, caplog):
    relay = env.relay(ports=2, port_retry_after=0.5)   # the retry, without its 5 s
    blocked, free = relay.pool.ports
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    env.defer(blocker.close)
    blocker.bind((LOOPBACK, blocked))
    blocker.listen(1)
    first = env.service(relay)
    assert first.register_ok() == free   # skipped the port it could not bind
    warnings = [r.getMessage() for r in caplog.records
                if r.name.startswith("tcprelay") and r.levelno >= logging.WARNING
                and str(blocked) in r.getMessage()]
    assert warnings, "the relay did not log the port it could not bind"
    second = env.service(relay)
    registration = second.register({"notices": True})
    reply = registration.reply()
    assert (reply["status"], reply["position"]) == ("waiting", 1), reply
    assert "1 cannot be bound" in reply["reason"], reply   # not "every port is taken"
    blocker.close()   # the other program lets go: the port must come back
    waiting, reply = registration.final()
    assert waiting == []
    assert (reply["status"], reply["port"]) == ("ok", blocked)
    client = env.client(blocked)
    stream = second.accept()
    client.sendall(b"back")
    assert recv_exact(stream, 4) == b"back"


# -- forwarding ----------------------------------------------------------------------------

def test_banner_service_speaks_first(env):
    relay, service, port = registered(env)
    client = env.client(port)
    # The client sends nothing: the stream must exist at once for the service.
    stream = service.accept()
    stream.sendall(b"220 banner ready\r\n")
    assert recv_exact(client, 18) == b"220 banner ready\r\n"
    client.sendall(b"QUIT\r\n")
    assert recv_exact(stream, 6) == b"QUIT\r\n"


def test_bytes_a_client_sends_with_its_connect_arrive_once_and_in_order(env):
    # The relay sends a new client's first bytes with the stream's SYN, and
    # the pump the rest: together they must be the client's bytes exactly.
    relay, service, port = registered(env)
    bursts = [os.urandom(size) for size in (1, 16 * 1024, 100 * 1024 + 7)]
    for burst in bursts:
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        sender = Worker(sendall_then, client, burst, lambda: client.shutdown(socket.SHUT_WR))
        stream = service.accept()
        assert recv_to_eof(stream) == burst
        sender.finish()
        stream.close()
        assert recv_to_eof(client) == b""
        client.close()


def test_early_bytes_never_wait():
    from tcprelay.relay import _early_bytes
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(TIMEOUT)                   # a timeout must not make it wait either
        start = time.monotonic()
        assert _early_bytes(a) == b""          # nothing yet
        assert time.monotonic() - start < TIMEOUT / 2, "waited for bytes"
        b.sendall(b"first")
        assert select.select([a], [], [], TIMEOUT)[0] == [a]
        assert _early_bytes(a) == b"first"
        b.close()
        assert _early_bytes(a) == b""          # EOF: the pump's own read sees it


def test_each_client_is_its_own_stream_bytes_exact_both_ways(env):
    relay, service, port = registered(env)
    service.serve(echo_handler)
    payloads = [os.urandom(MIB + i * 1001) for i in range(3)]
    clients = [env.client(port) for _ in payloads]
    workers = [Worker(echo_roundtrip, client, data) for client, data in zip(clients, payloads)]
    for worker, data, client in zip(workers, payloads, clients):
        assert worker.finish() == data
        assert recv_to_eof(client) == b""   # and nothing more: not padded


def test_client_half_close_keeps_the_other_direction_flowing(env):
    relay, service, port = registered(env)
    client = env.client(port)
    stream = service.accept()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(stream) == b"request"   # the client's EOF became FIN
    reply = os.urandom(512 * 1024)
    writer = Worker(sendall_then, stream, reply, stream.close_write)
    assert recv_to_eof(client) == reply
    writer.finish()


def test_service_half_close_keeps_the_other_direction_flowing(env):
    relay, service, port = registered(env)
    client = env.client(port)
    stream = service.accept()
    stream.sendall(b"greeting")
    stream.close_write()
    assert recv_to_eof(client) == b"greeting"   # FIN became shutdown(SHUT_WR)
    upload = os.urandom(512 * 1024)
    writer = Worker(sendall_then, client, upload, lambda: client.shutdown(socket.SHUT_WR))
    assert recv_to_eof(stream) == upload
    writer.finish()


def test_client_reset_resets_the_stream(env):
    relay, service, port = registered(env)
    client = env.client(port)
    stream = service.accept()
    client.sendall(b"abc")
    assert recv_exact(stream, 3) == b"abc"
    abort(client)
    data, how = read_until_end(stream)
    assert data == b""
    assert isinstance(how, muxado.StreamResetError), "the stream saw %r, not a reset" % (how,)
    assert isinstance(how, ConnectionResetError)


def test_stream_reset_resets_the_client(env):
    relay, service, port = registered(env)
    client = env.client(port)
    stream = service.accept()
    stream.sendall(b"partial")
    assert recv_exact(client, 7) == b"partial"
    stream.reset()
    with pytest.raises(ConnectionResetError):
        client.recv(100)


# After the client's half-close its pump is gone: the service's side of the
# connection, whichever way it ends, must still close the client and count it out.

def half_closed_client(env, **relay_options):
    """(relay, port, client, stream): a client that has sent FIN, seen by the service."""
    relay, service, port = registered(env, **relay_options)
    client = env.client(port)
    stream = service.accept()
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(stream) == b""
    return relay, service, port, client, stream


def wait_counted_out(relay, port, clients=0):
    wait_until(lambda: link_of(relay, port).client_count == clients,
               what="%d clients counted" % clients)


def test_stream_reset_after_the_client_half_closed_resets_the_client(env):
    relay, service, port, client, stream = half_closed_client(env)
    stream.sendall(b"partial")
    assert recv_exact(client, 7) == b"partial"
    stream.reset()
    with pytest.raises(ConnectionResetError):
        client.recv(100)
    wait_counted_out(relay, port)


def test_client_reset_after_its_half_close_resets_the_stream_mid_download(env):
    relay, service, port, client, stream = half_closed_client(env)
    assert stream.sendall(b"first") is None
    assert recv_exact(client, 5) == b"first"
    abort(client)
    # The relay learns of the reset when it next writes to the client.
    how = send_until_it_fails(stream)
    assert isinstance(how, muxado.StreamResetError), "the stream saw %r, not a reset" % (how,)
    wait_counted_out(relay, port)


def test_service_fin_after_the_client_half_closed_ends_the_connection(env):
    relay, service, port, client, stream = half_closed_client(env)
    wait_counted_out(relay, port, clients=1)
    reply = os.urandom(2 * MIB)       # more than the socket takes at once: the flusher's FIN
    writer = Worker(sendall_then, stream, reply, stream.close_write)
    assert recv_to_eof(client) == reply
    writer.finish()
    wait_counted_out(relay, port)


def test_a_client_that_stops_reading_after_the_service_left_cannot_hold_the_port(env):
    # Both sides have sent FIN, the service has gone, and its last bytes wait
    # for a client that never reads: after drain_timeout the client is reset.
    relay, service, port, client, stream = half_closed_client(env, drain_timeout=0.5)
    push_until_stalled(stream)        # the relay now holds a window's worth
    stream.close_write()
    service.close()
    link = link_of(relay, port)
    link.join(TIMEOUT)
    assert not link._thread.is_alive(), "the stalled client still holds the service's port"
    wait_until(lambda: port not in [link.port for link in relay.services],
               what="the port released")
    with pytest.raises(ConnectionResetError):
        while client.recv(MIB):
            pass


def test_stalled_client_does_not_delay_another_client(env):
    relay, service, port = registered(env)
    stalled = env.client(port)
    stalled_stream = service.accept()
    lively = env.client(port)
    lively_stream = service.accept()
    echo = Worker(echo_handler, lively_stream)
    # Push to the client that never reads until nothing more goes anywhere.
    sent = push_until_stalled(stalled_stream)
    # The other client of the same service goes on at full speed.
    data = os.urandom(2 * MIB)
    assert echo_roundtrip(lively, data) == data
    echo.finish()
    # Nothing was lost for the slow one either.
    stalled_stream.close_write()
    assert recv_to_eof(stalled) == sent


def test_service_not_reading_one_stream_does_not_delay_another_client(env):
    relay, service, port = registered(env)
    pushing = env.client(port)
    unread = service.accept()   # never read until the end
    lively = env.client(port)
    lively_stream = service.accept()
    echo = Worker(echo_handler, lively_stream)
    sent = push_until_stalled(pushing)
    data = os.urandom(2 * MIB)
    assert echo_roundtrip(lively, data) == data
    echo.finish()
    pushing.shutdown(socket.SHUT_WR)
    assert recv_to_eof(unread) == sent


def _write_until_full_then_all(send, data, full, deadline):
    """Send all of ``data`` with short timeouts; set ``full`` at the first time-out."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        try:
            offset += send(view[offset:offset + 256 * 1024])
        except socket.timeout:
            full.set()
            assert time.monotonic() < deadline, "writing stalled for good"


def _read_exactly_with_retries(recv, size, deadline):
    data = bytearray()
    while len(data) < size:
        try:
            chunk = recv(256 * 1024)
        except socket.timeout:
            assert time.monotonic() < deadline, "reading stalled for good"
            continue
        assert chunk, "EOF after %d of %d bytes" % (len(data), size)
        data += chunk
    return bytes(data)


def test_both_directions_full_at_once_no_deadlock(env):
    relay, service, port = registered(env)
    client = env.client(port)
    stream = service.accept()
    up, down = os.urandom(10 * MIB), os.urandom(10 * MIB)
    client.settimeout(0.5)
    stream.settimeout(0.5)
    deadline = time.monotonic() + 4 * TIMEOUT
    client_full, service_full = threading.Event(), threading.Event()
    writers = [Worker(_write_until_full_then_all, client.send, up, client_full, deadline),
               Worker(_write_until_full_then_all, stream.send, down, service_full, deadline)]
    # Both sides write before either reads, until both directions are full.
    assert client_full.wait(TIMEOUT), "the client's writes never filled up"
    assert service_full.wait(TIMEOUT), "the service's writes never filled up"
    readers = [Worker(_read_exactly_with_retries, stream.recv, len(up), deadline),
               Worker(_read_exactly_with_retries, client.recv, len(down), deadline)]
    for worker in writers:
        worker.finish(4 * TIMEOUT)
    got_up, got_down = [worker.finish(4 * TIMEOUT) for worker in readers]
    assert got_up == up
    assert got_down == down


# -- draining and the in-process interface ---------------------------------------------------

def test_drain_sends_goaway_refuses_new_clients_and_lets_open_ones_finish(env):
    relay = env.relay(ports=2)
    services = []
    for _ in range(2):
        service = env.service(relay)
        port = service.register_ok()
        service.serve(echo_handler)
        # A stream the relay has not heard of (lazy SYN): the relay's GOAWAY resets
        # it, which tells the test, without polling, that the GOAWAY has arrived.
        probe = service.session.open(announce=False)
        probe.settimeout(TIMEOUT)
        services.append((service, port, probe))
    client = env.client(services[0][1])
    assert echo_roundtrip(client, b"before", half_close=False) == b"before"
    relay.shutdown()
    started = time.monotonic()
    drain = Worker(relay.drain, TIMEOUT)
    for service, port, probe in services:   # GOAWAY to every service
        with pytest.raises(ConnectionResetError):
            probe.recv(1)
        assert service.session.remote_goaway is not None
        assert service.session.remote_goaway[1] == ErrorCode.NO_ERROR
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=TIMEOUT).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(relay.server_address, timeout=TIMEOUT).close()
    assert drain.is_alive(), "drain() returned while a client was still open"
    # The open client carries on, then finishes.
    assert echo_roundtrip(client, b"during the drain") == b"during the drain"
    assert recv_to_eof(client) == b""
    client.close()
    assert drain.finish() is True
    assert time.monotonic() - started < TIMEOUT


def test_service_goaway_as_a_new_clients_first_bytes_go_out_drains_the_service(env, monkeypatch):
    # The service's GOAWAY arrives between opening a client's stream and sending
    # its first bytes: that client is refused, and the open ones carry on.
    relay, service, port = registered(env)
    service.serve(echo_handler)
    first = env.client(port)
    assert echo_roundtrip(first, b"before", half_close=False) == b"before"
    link = link_of(relay, port)
    from tcprelay import servicelink as relay_module   # its accept loop calls _early_bytes
    original = relay_module._early_bytes

    def goaway_first(conn):
        select.select([conn], [], [], TIMEOUT)          # the client's bytes are there
        service.session.goaway()
        wait_until(lambda: link._session.remote_goaway is not None, what="GOAWAY at the relay")
        return original(conn)

    monkeypatch.setattr(relay_module, "_early_bytes", goaway_first)
    second = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    second.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        second.recv(10)
    second.close()
    assert echo_roundtrip(first, b"after the goaway") == b"after the goaway"
    assert recv_to_eof(first) == b""


def test_drain_timeout_then_server_close_resets_open_clients(env):
    relay, service, port = registered(env)
    service.serve(echo_handler)
    client = env.client(port)
    assert echo_roundtrip(client, b"hello", half_close=False) == b"hello"
    relay.shutdown()
    started = time.monotonic()
    assert relay.drain(0.3) is False
    assert time.monotonic() - started >= 0.25
    relay.server_close()
    data, how = read_until_end(client)
    assert isinstance(how, ConnectionResetError), "client saw %r, not a reset" % (how,)
    assert service.session.wait(TIMEOUT), "the service's session outlived server_close()"


def test_relay_in_process_interface(no_leaks):
    ports = free_port_range(2)
    service = None
    with Relay((LOOPBACK, 0), public_bind=LOOPBACK, ports=ports) as relay:
        host, service_port = relay.server_address[:2]
        assert (host, service_port != 0) == (LOOPBACK, True)
        serving = threading.Thread(target=relay.serve_forever, name="serve_forever")
        serving.start()
        try:
            service = Service(relay.server_address)
            assert service.register_minimal() == address(ports[0]).encode("ascii")
            service.serve(echo_handler)
            client = connect_client(ports[0])
            try:
                assert echo_roundtrip(client, b"in process") == b"in process"
                assert recv_to_eof(client) == b""
            finally:
                client.close()
        finally:
            relay.shutdown()
            serving.join(TIMEOUT)
        assert not serving.is_alive()
        assert relay.drain(TIMEOUT) is True   # nothing open: returns at once
    # Leaving the with block closed everything: the service's session ended.
    try:
        assert service.session.wait(TIMEOUT)
    finally:
        service.close()
