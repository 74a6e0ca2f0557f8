"""Abuse and exhaustion, in process: a stream's error ends that client only.

Every test runs under ``no_leaks`` and bounds each blocking call.
"""

import socket
import time

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, Worker, wait_until
from helpers.envs import registered
from helpers.relay import Service, echo_handler, echo_roundtrip, read_until_end, recv_exact
from tcprelay import frames
from tcprelay.muxado import ErrorCode
from tcprelay.relay import PENDING_READ_BUDGET


@pytest.fixture
def env(relay_env):
    """This module's tests run in a Env (conftest)."""
    return relay_env


def test_streams_the_service_refuses_end_those_clients_not_the_service(env, caplog):
    # A service whose accept queue is full resets new streams (ACCEPT_QUEUE_FULL).
    # With PROXY headers a client's first bytes go out in a second frame, which
    # may meet that reset: it ends that client, never the service's session.
    relay = env.relay(ports=1)
    service = Service(relay.server_address, accept_backlog=1)
    env.defer(service.close)
    port = service.register_ok({"proxy_protocol": "v1"})
    held = env.client(port)   # its stream fills the accept queue
    held.sendall(b"first")
    first = service.accept()
    assert first.recv(5).startswith(b"PROXY")
    held_back = env.client(port)   # queued, never accepted until the end
    for _ in range(300):
        # Refused: the relay resets it, maybe before connect() has returned.
        try:
            client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        except ConnectionResetError:
            continue
        with client:
            try:
                client.sendall(b"hello")
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
        assert not service.session.closed, service.session.error
    assert "cannot open a stream" not in caplog.text
    # The service still serves: the clients it holds, and new ones.
    first.close()
    queued = service.accept()
    queued.close()
    held_back.close()
    service.serve()
    client = env.client(port)
    client.sendall(b"again")
    assert recv_exact(client, 5) == b"PROXY"   # the echo of the stream's PROXY header
    assert len(relay.services) == 1


def test_tls_and_the_request_share_one_handshake_deadline(env):
    # TLS finishing late in the handshake timeout leaves the request only what is left.
    from helpers.relay import Registration, server_tls, trusting_tls
    from tcprelay import muxado, tls
    relay = env.relay(ports=1, tls_context=server_tls(), handshake_timeout=1.0)
    started = time.monotonic()
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    time.sleep(0.7)   # a slow TLS start: part of the scenario, not synchronisation
    secure = trusting_tls().wrap_socket(sock, server_hostname="localhost")
    session = muxado.client(tls.TLSTransport(secure))
    try:
        registration = Registration(session.open(), b"")   # never sends a request
        try:
            reply = registration.reply()
        except (OSError, muxado.MuxadoError) as exc:   # dropped before the reply came
            reply = {"status": "error", "error": str(exc)}
        elapsed = time.monotonic() - started
        assert reply is None or reply["status"] == "error", reply
        assert elapsed < 1.5, "registration took %.2fs of a 1s handshake timeout" % elapsed
    finally:
        session.close()


def _goaway_code(data):
    goaways = [f for f in frames.decode_frames(data) if isinstance(f, frames.GoAway)]
    return goaways[0].code if goaways else None


def _flood(sock, frame, limit):
    """Send ``frame`` over and over until the relay stops reading; bytes sent."""
    burst = frame * 512
    sent = 0
    try:
        while sent < limit:
            sock.sendall(burst)
            sent += len(burst)
    except OSError:
        pass
    return sent


def test_an_unregistered_connection_may_send_only_its_budget(env):
    # Window updates on streams that do not exist, before registering: after
    # the read budget the connection is dropped, long before the handshake timeout.
    relay, service, port = registered(env, handshake_timeout=30.0)
    service.serve(echo_handler)
    client = env.client(port)
    attacker = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    env.defer(attacker.close)
    started = time.monotonic()
    sent = Worker(_flood, attacker, frames.encode_wndinc(7, 1), 64 * PENDING_READ_BUDGET)
    data, how = read_until_end(attacker)
    assert sent.finish() < 64 * PENDING_READ_BUDGET   # cut off, not read to the end
    assert time.monotonic() - started < 5.0
    assert _goaway_code(data) == ErrorCode.ENHANCE_YOUR_CALM
    echo_roundtrip(client, b"unharmed", half_close=False)


def test_a_registered_service_flooding_frames_on_unknown_streams_is_dropped(env):
    relay, service, port = registered(env)
    # The stand-in's own socket, bypassing its session: WNDINC on a stream never opened.
    sock = service.session._sock
    frame = frames.encode_wndinc(1001, 1)
    try:
        for _ in range(40):
            sock.sendall(frame * 1000)
    except OSError:
        pass
    assert service.session.wait(TIMEOUT)
    assert service.session.remote_goaway is not None
    assert service.session.remote_goaway[1] == ErrorCode.ENHANCE_YOUR_CALM


def _reset_at_once(address):
    """True if a connection to ``address`` is reset before anything is said
    (maybe before connect() returns)."""
    try:
        sock = socket.create_connection(address, timeout=TIMEOUT)
    except ConnectionResetError:
        return True
    with sock:
        data, how = read_until_end(sock)
    return data == b"" and isinstance(how, ConnectionResetError)


def test_pending_connections_are_capped_in_all_and_per_address(env):
    relay = env.relay(ports=1, max_pending=3, max_pending_per_host=2)
    held = []
    for _ in range(2):
        sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
        env.defer(sock.close)
        held.append(sock)
    wait_until(lambda: len(relay.services) == 2, what="two pending connections")
    assert _reset_at_once(relay.server_address)
    # Registered services are no longer pending: room again.
    for sock in held:
        sock.close()
    wait_until(lambda: not relay.services, what="the pending connections to go")
    service = env.service(relay)
    assert service.register_ok() == relay.pool.ports[0]
    another = env.service(relay)
    reg = another.register({"notices": True})
    assert reg.reply()["status"] == "waiting"
    env.defer(reg.close)
    # One registered, one waiting in line: neither is pending, so two more may try.
    for _ in range(2):
        sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
        env.defer(sock.close)
    wait_until(lambda: len(relay.services) == 4, what="two more pending connections")
    assert _reset_at_once(relay.server_address)


def test_a_deeply_nested_request_is_refused_on_the_relays_small_thread_stacks(env):
    # The relay runs its threads with 256 KiB stacks (relay.THREAD_STACK_SIZE,
    # set by its main()). There, json.loads of 4,000 nested brackets overflowed
    # the C stack on CPython 3.13.0: the whole relay died of a segfault on one
    # registration line. The suite met it when an in-process main() had set the
    # stack size before this module's test of the same line.
    import threading
    from tcprelay.relay import THREAD_STACK_SIZE
    previous = threading.stack_size(THREAD_STACK_SIZE)
    try:
        relay = env.relay(ports=1)
        service = Service(relay.server_address)
    finally:
        threading.stack_size(previous)
    try:
        reply = service.register(raw=b"[" * 4000 + b"\n").final()
        assert reply[1]["status"] == "error", reply
        assert "nested" in reply[1]["error"], reply
    finally:
        service.close()
    # Still serving, on the same small stacks.
    assert env.service(relay).register_ok() == relay.pool.ports[0]
