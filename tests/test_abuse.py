"""Abuse and exhaustion, in process: a stream's error ends that client only.

Every test runs under ``no_leaks`` and bounds each blocking call.
"""

import logging
import socket
import time

import pytest

from conftest import TIMEOUT
from relay_helpers import LOOPBACK, Service, echo_roundtrip, recv_exact, wait_until
from test_relay import Env


@pytest.fixture
def env(no_leaks, caplog):
    caplog.set_level(logging.INFO, logger="tcprelay")
    environment = Env()
    yield environment
    environment.close()


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
    from test_security import server_tls, trusting_tls
    from relay_helpers import Registration
    from tcprelay import muxado, tls
    relay = env.relay(ports=1, tls_context=server_tls(), handshake_timeout=1.0)
    started = time.monotonic()
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    time.sleep(0.7)   # a slow TLS start: part of the scenario, not synchronisation
    secure = trusting_tls().wrap_socket(sock, server_hostname="localhost")
    session = muxado.client(tls.TLSTransport(secure))
    try:
        registration = Registration(session.open(), b"")   # never sends a request
        reply = registration.reply()
        elapsed = time.monotonic() - started
        assert reply is None or reply["status"] == "error", reply
        assert elapsed < 1.5, "registration took %.2fs of a 1s handshake timeout" % elapsed
    finally:
        session.close()
