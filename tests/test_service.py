"""The service side, in process: ``connect()`` and ``RelayServer`` through a real
``Relay`` on 127.0.0.1, with real stdlib clients.

- the socketserver contract, with stdlib handlers run unchanged (a
  StreamRequestHandler, http.server, an XML-RPC server),
- reconnecting, the first connection, refusals and the backoff,
- port leases: held for a lost service, freed at once on goodbye, handed
  over to the token's holder, a preference at a relay that never issued it,
- dead peers: TCP keepalive and the heartbeat, with a path that goes silent
  without closing (``FreezableProxy``),
- PROXY protocol headers and the client's address in handlers.

Every test runs under ``no_leaks`` and fails if tcprelay logs an error.
"""

import http.client
import http.server
import logging
import os
import queue
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, Worker, free_port_range, wait_until
from helpers.envs import Serving
from helpers.relay import (
    connect_client, echo_roundtrip, link_of, read_until_end, recv_exact, recv_to_eof,
)
from tcprelay import muxado, service
from tcprelay.echoserver import EchoHandler
from tcprelay.heartbeat import enable_tcp_keepalive
from tcprelay.service import (
    Backoff, RegistrationRefused, RelayGone, RelayServer, ServiceConnection, connect,
)


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


# -- helpers -------------------------------------------------------------------------------

class RecordingServer(RelayServer):
    """A RelayServer that reports each registration and what handlers saw."""

    def __init__(self, *args, **kwargs):
        self.registrations = queue.Queue()   # the public address, at each registration
        self.seen = queue.Queue()            # whatever handlers put there
        RelayServer.__init__(self, *args, **kwargs)

    def registered(self, previous_address, connection):
        RelayServer.registered(self, previous_address, connection)
        self.registrations.put(connection.address)


def public(port):
    return "127.0.0.1:%d" % port


def assert_echoes(port, data=b"echo me"):
    """A client of ``port`` gets ``data`` back exactly, then EOF."""
    client = connect_client(port)
    try:
        assert echo_roundtrip(client, data) == data
        assert recv_to_eof(client) == b""
    finally:
        client.close()


def delays(messages):
    """The seconds in "... trying again in 0.5s" log messages."""
    return [float(re.search(r"trying again in ([0-9.]+)s", m).group(1)) for m in messages]


# -- the socketserver contract, stdlib handlers unchanged -----------------------------------

class UpperLines(socketserver.StreamRequestHandler):
    """Answers each line in upper case until the client half-closes."""

    def handle(self):
        self.server.seen.put((self.request, self.client_address, self.server,
                              threading.current_thread()))
        for line in self.rfile:
            self.wfile.write(line.upper())


def test_stream_request_handler_over_the_relay(env):
    relay = env.relay(ports=2)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, UpperLines, cls=RecordingServer)
    # The socketserver attributes name the public address.
    assert server.server_address == ("127.0.0.1", port)
    assert server.public_address == public(port)
    env.serve(server)
    client = env.client(port)
    lines = [b"hello relay\n", b"second line\n", os.urandom(3000).replace(b"\n", b"-") + b"\n"]
    for line in lines:
        client.sendall(line)
        assert recv_exact(client, len(line)) == line.upper()
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""   # the handler returned: the stream was half-closed
    request, client_address, handler_server, thread = server.seen.get(timeout=TIMEOUT)
    assert isinstance(request, muxado.Stream)
    assert client_address == relay.server_address   # no PROXY header: the relay's address
    assert handler_server is server
    assert thread is not threading.current_thread()


def test_http_server_fetched_with_urllib(env, tmp_path, monkeypatch):
    content = os.urandom(200 * 1024)
    (tmp_path / "file.bin").write_bytes(content)
    monkeypatch.chdir(str(tmp_path))   # SimpleHTTPRequestHandler serves the current directory
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, http.server.SimpleHTTPRequestHandler)
    env.serve(server)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # no proxy from the env
    with opener.open("http://127.0.0.1:%d/file.bin" % port, timeout=TIMEOUT) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(content)
        assert response.read() == content
    with pytest.raises(urllib.error.HTTPError) as missing:
        opener.open("http://127.0.0.1:%d/missing.txt" % port, timeout=TIMEOUT)
    missing.value.close()
    assert missing.value.code == 404


class RelayXMLRPCServer(RelayServer, SimpleXMLRPCDispatcher):
    """As xmlrpc.server.SimpleXMLRPCServer is socketserver.TCPServer + SimpleXMLRPCDispatcher."""

    def __init__(self, relay_address, requestHandler=SimpleXMLRPCRequestHandler,
                 logRequests=True, allow_none=False, encoding=None, use_builtin_types=False,
                 **options):
        self.logRequests = logRequests
        SimpleXMLRPCDispatcher.__init__(self, allow_none, encoding, use_builtin_types)
        RelayServer.__init__(self, relay_address, requestHandler, **options)


class TimeoutTransport(xmlrpc.client.Transport):
    """ServerProxy's transport, with a timeout on every socket call."""

    def make_connection(self, host):
        connection = xmlrpc.client.Transport.make_connection(self, host)
        connection.timeout = TIMEOUT
        return connection


def test_xmlrpc_server_called_with_server_proxy(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, SimpleXMLRPCRequestHandler,
                        cls=RelayXMLRPCServer, logRequests=False)
    server.register_introspection_functions()
    server.register_function(lambda a, b: a + b, "add")
    server.register_function(lambda blob: xmlrpc.client.Binary(blob.data[::-1]), "reverse")
    env.serve(server)
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % port,
                                      transport=TimeoutTransport())
    try:
        assert proxy.add(2, 40) == 42
        blob = os.urandom(100 * 1024)
        assert proxy.reverse(xmlrpc.client.Binary(blob)).data == blob[::-1]
        assert {"add", "reverse", "system.listMethods"} <= set(proxy.system.listMethods())
        with pytest.raises(xmlrpc.client.Fault) as fault:
            proxy.no_such_method()
        assert "no_such_method" in fault.value.faultString
    finally:
        proxy("close")()


class Hold(socketserver.BaseRequestHandler):
    """Tells the test it started, waits until released, then says b"done"."""

    def handle(self):
        self.server.seen.put(threading.current_thread())
        assert self.server.release.wait(TIMEOUT)
        self.request.sendall(b"done")
        self.server.finished.set()


class HoldingServer(RecordingServer):
    def __init__(self, *args, **kwargs):
        self.release = threading.Event()
        self.finished = threading.Event()
        RecordingServer.__init__(self, *args, **kwargs)


class Rejecting(RecordingServer):
    """Refuses its first client in verify_request."""

    verified = 0

    def verify_request(self, request, client_address):
        self.seen.put(("verify", request, client_address))
        self.verified += 1
        return self.verified > 1


def test_verify_request_false_closes_the_client_without_a_handler(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, EchoHandler, cls=Rejecting)
    env.serve(server)
    rejected = env.client(port)
    assert recv_to_eof(rejected) == b""   # closed, nothing handled
    what, request, client_address = server.seen.get(timeout=TIMEOUT)
    assert what == "verify" and isinstance(request, muxado.Stream)
    assert client_address == relay.server_address
    assert_echoes(port, b"accepted")   # the next client passes and is handled


class Failing(socketserver.BaseRequestHandler):
    def handle(self):
        line = self.request.recv(100)
        if line == b"fail":
            raise RuntimeError("handler failed on purpose")
        self.request.sendall(line)


class ErrorRecording(RecordingServer):
    def handle_error(self, request, client_address):
        self.seen.put((request, client_address, sys.exc_info()[1]))


def test_handle_error_gets_the_handler_exception_and_serving_goes_on(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, Failing, cls=ErrorRecording)
    env.serve(server)
    failing = env.client(port)
    failing.sendall(b"fail")
    assert recv_to_eof(failing) == b""   # the request was shut down after the error
    request, client_address, error = server.seen.get(timeout=TIMEOUT)
    assert isinstance(request, muxado.Stream) and client_address == relay.server_address
    assert isinstance(error, RuntimeError) and str(error) == "handler failed on purpose"
    fine = env.client(port)
    fine.sendall(b"fine")
    assert recv_exact(fine, 4) == b"fine"


class Inline(RecordingServer):
    """process_request overridden to handle each client in serve_forever's thread."""

    def process_request(self, request, client_address):
        self.seen.put(("process_request", client_address))
        self.finish_request(request, client_address)
        self.shutdown_request(request)


class ThreadReporting(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.seen.put(threading.current_thread())
        self.request.sendall(b"ok")


def test_process_request_override_runs_handlers_where_it_says(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, ThreadReporting, cls=Inline)
    serving = env.serve(server)
    for _ in range(2):
        client = env.client(port)
        assert recv_to_eof(client) == b"ok"
        assert server.seen.get(timeout=TIMEOUT) == ("process_request", relay.server_address)
        assert server.seen.get(timeout=TIMEOUT) is serving.worker   # no thread per client


@pytest.mark.parametrize("daemon", [False, True])
def test_daemon_threads(env, daemon):
    class Server(RecordingServer):
        daemon_threads = daemon
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, ThreadReporting, cls=Server)
    env.serve(server)
    assert recv_to_eof(env.client(port)) == b"ok"
    thread = server.seen.get(timeout=TIMEOUT)
    assert thread.daemon is daemon
    assert RelayServer.daemon_threads is False   # socketserver's default


@pytest.mark.parametrize("block", [True, False])
def test_block_on_close(env, block):
    class Server(HoldingServer):
        block_on_close = block
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, Hold, cls=Server)
    serving = env.serve(server)
    client = env.client(port)
    handler_thread = server.seen.get(timeout=TIMEOUT)
    closing = Worker(server.server_close, name="server_close")
    if block:
        closing.join(0.3)
        assert closing.is_alive(), "server_close() returned while a handler was running"
        server.release.set()
        closing.finish()
        assert server.finished.is_set()   # the handler had finished by then
        assert serving.result() is None
        data, how = read_until_end(client)
        assert data == b"done"
    else:
        closing.finish()   # at once, the handler still running
        assert serving.result() is None
        assert handler_thread.is_alive() and not server.finished.is_set()
        server.release.set()
        handler_thread.join(TIMEOUT)
        assert not handler_thread.is_alive()
        data, how = read_until_end(client)
        assert data == b""   # it left the relay under the handler: nothing got through


def test_shutdown_returns_promptly(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    # A few times over: whether shutdown() hangs depends on which thread of
    # the session happens to be reading the socket when it is called.
    for attempt in range(10):
        server = RelayServer(relay.server_address, EchoHandler, heartbeat=False)
        serving = Serving(server, reconnect=False)
        assert_echoes(port, b"attempt %d" % attempt)
        stopping = Worker(server.shutdown, name="shutdown")
        stopping.join(1.0)
        hung = stopping.is_alive()
        server.server_close()   # ends a hung shutdown() too
        stopping.finish()
        assert serving.result() is None
        assert not hung, ("attempt %d: shutdown() did not return within 1s while "
                          "serve_forever waited for a client" % attempt)


# The next three call shutdown(); a relay with a short keepalive pongs every
# 0.5 s, which frees a shutdown() caught by test_shutdown_returns_promptly's bug.

def test_shutdown_ends_serve_forever_and_clients_being_served_carry_on(env):
    relay = env.relay(ports=1, keepalive=1.5)
    port = relay.pool.ports[0]
    with RelayServer(relay.server_address, EchoHandler) as server:
        serving = Serving(server, reconnect=False)
        client = connect_client(port)
        try:
            assert echo_roundtrip(client, b"before", half_close=False) == b"before"
            server.shutdown()
            assert serving.result() is None
            assert echo_roundtrip(client, b"after shutdown") == b"after shutdown"
            assert recv_to_eof(client) == b""
        finally:
            client.close()
    assert server.connection.closed   # leaving the with block left the relay


def test_a_new_client_after_shutdown_does_not_cut_off_clients_being_served(env):
    relay = env.relay(ports=1, keepalive=1.5)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, EchoHandler)
    serving = env.serve(server)
    client = env.client(port)
    assert echo_roundtrip(client, b"before", half_close=False) == b"before"
    link = link_of(relay, port)
    server.shutdown()
    assert serving.result() is None
    # Someone else knocks at the public port now. Whatever the relay does with
    # them (reset them, or keep them for a later serve_forever), the client
    # being served must carry on.
    latecomer = env.client(port)
    latecomer.sendall(b"hello?")
    latecomer.settimeout(1.0)
    data, how = read_until_end(latecomer)
    assert data == b"", "served after shutdown(): %r" % data
    assert not link.join(1.0), "the relay ended the session of a service with a client open"
    try:
        client.sendall(b"after")
        client.shutdown(socket.SHUT_WR)
    except OSError as exc:
        data, how = b"", exc
    else:
        data, how = read_until_end(client)
    assert (data, how) == (b"after", "eof"), (
        "the client being served was cut off when a new client arrived after shutdown(): "
        "it got %r, then %r" % (data, how))


def test_serve_forever_runs_again_after_shutdown(env):
    relay = env.relay(ports=1, keepalive=1.5)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, EchoHandler)
    first = Serving(server, reconnect=False)
    assert_echoes(port, b"first run")
    server.shutdown()
    assert first.result() is None
    # As socketserver: serve_forever can be called again, and serves clients.
    second = env.serve(server)
    try:
        assert_echoes(port, b"second run")
    except OSError as exc:
        second.checked = True
        second.worker.join(TIMEOUT)
        raise AssertionError("serve_forever() after shutdown() serves no one: the client saw "
                             "%r; serve_forever raised %r" % (exc, second.worker.error))


# -- reconnecting ---------------------------------------------------------------------------

def test_backoff_is_exponential_from_half_a_second_to_30s_with_jitter():
    backoff = Backoff()
    values = [backoff.next() for _ in range(12)]
    for attempt, value in enumerate(values):
        base = min(30.0, 0.5 * 2 ** attempt)
        assert 0.75 * base <= value <= min(30.0, 1.25 * base), (attempt, value)
    assert all(22.5 <= v <= 30.0 for v in values[6:])   # capped at 30 s
    # Jitter: many services that lost the same relay do not come back in step.
    firsts = set(Backoff().next() for _ in range(50))
    assert len(firsts) > 40 and min(firsts) >= 0.375 and max(firsts) <= 0.625


def test_backoff_bounds_at_the_ends_of_the_jitter(monkeypatch):
    for factor, expected in ((0.75, [0.375, 0.75, 1.5, 3.0, 6.0, 12.0, 22.5, 22.5, 22.5]),
                             (1.25, [0.625, 1.25, 2.5, 5.0, 10.0, 20.0, 30.0, 30.0, 30.0])):
        monkeypatch.setattr(service.random, "uniform", lambda a, b, f=factor: f)
        backoff = Backoff()
        assert [round(backoff.next(), 6) for _ in expected] == expected


def test_the_first_connection_failing_is_an_error_at_once(env, logs):
    nowhere = (LOOPBACK, free_port_range(1)[0])   # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        RelayServer(nowhere, EchoHandler)
    with pytest.raises(ConnectionRefusedError):
        connect(nowhere, timeout=TIMEOUT)
    assert time.monotonic() - started < 1.0
    assert logs.messages("trying again") == []


def test_retry_makes_the_first_connection_retry(env, logs):
    ports = free_port_range(2)
    relay_port, pool = ports[0], ports[1:]
    where = "127.0.0.1:%d" % relay_port
    starting = Worker(lambda: RelayServer((LOOPBACK, relay_port), EchoHandler, retry=True),
                      name="RelayServer(retry=True)")
    failed = logs.wait_for("cannot register with the relay at %s" % where)[0]
    assert "Connection refused" in failed and "trying again in" in failed
    relay = env.relay(pool, port=relay_port)
    server = starting.finish()
    env.defer(server.server_close)
    assert server.server_address == ("127.0.0.1", pool[0])
    env.serve(server)
    assert_echoes(pool[0])
    assert relay.services


def test_a_refusal_is_final_even_with_retry(env, logs):
    relay = env.relay(ports=2)
    outside = relay.pool.ports[-1] + 1
    with pytest.raises(RegistrationRefused) as refused:
        RelayServer(relay.server_address, EchoHandler, port=outside, retry=True)
    assert str(outside) in refused.value.reason and "pool" in refused.value.reason
    assert logs.messages("trying again") == []   # no second attempt


def test_a_refusal_while_reconnecting_ends_serve_forever(env):
    ports = free_port_range(4)
    relay_port, wanted = ports[0], ports[1]
    relay = env.relay([wanted], port=relay_port)
    server = env.server(relay.server_address, EchoHandler, port=wanted)
    serving = env.serve(server, reconnect=True)
    env.stop_relay(relay)
    env.relay(ports[2:4], port=relay_port)   # back, but its pool no longer has that port
    with pytest.raises(RegistrationRefused) as refused:
        serving.result()
    assert str(wanted) in refused.value.reason


def test_serve_forever_reconnects_to_a_restarted_relay_on_the_same_port(env, logs):
    ports = free_port_range(3)
    relay_port, pool = ports[0], ports[1:]
    where = "127.0.0.1:%d" % relay_port
    relay = env.relay(pool, port=relay_port)
    # Someone holds the lowest port, so that the server's is not simply the first free one.
    holder = env.connect(relay.server_address)
    assert holder.port == pool[0]
    server = env.server(relay.server_address, EchoHandler, cls=RecordingServer)
    assert server.registrations.get(timeout=TIMEOUT) == public(pool[1])
    serving = env.serve(server, reconnect=True)
    assert_echoes(pool[1], b"first relay")
    env.stop_relay(relay)
    # Every attempt is logged, with its reason.
    lost = logs.wait_for("lost the relay at %s" % where)[0]
    assert re.search(r"lost the relay at %s \(.+\); reconnecting" % re.escape(where), lost), lost
    failed = logs.wait_for("cannot register with the relay at %s" % where)[0]
    assert "Connection refused" in failed and "trying again in" in failed
    # A new relay: it never issued the server's lease, which still names its
    # port; the holder is gone, so the lower port is free too.
    env.relay(pool, port=relay_port)
    assert server.registrations.get(timeout=TIMEOUT) == public(pool[1])
    assert server.public_address == public(pool[1])
    assert serving.worker.is_alive()
    assert_echoes(pool[1], b"second relay")


def test_backoff_grows_while_the_relay_is_away_and_resets_after_registering(env, logs):
    ports = free_port_range(2)
    relay_port, pool = ports[0], ports[1:]
    relay = env.relay(pool, port=relay_port)
    server = env.server(relay.server_address, EchoHandler, cls=RecordingServer)
    assert server.registrations.get(timeout=TIMEOUT) == public(pool[0])
    env.serve(server, reconnect=True)
    env.stop_relay(relay)
    first, second = delays(logs.wait_for("trying again in", count=2))
    assert 0.35 <= first <= 0.65 and 0.7 <= second <= 1.3, (first, second)
    relay = env.relay(pool, port=relay_port)
    assert server.registrations.get(timeout=TIMEOUT) == public(pool[0])
    env.stop_relay(relay)
    third = delays(logs.wait_for("trying again in", count=3))[2]
    assert 0.35 <= third <= 0.65, "the backoff did not start over: %gs" % third


# -- port leases -----------------------------------------------------------------------------

def test_registration_returns_an_opaque_lease_token(env):
    relay = env.relay(ports=2, lease_time=12.5)
    first = env.connect(relay.server_address)
    second = env.connect(relay.server_address)
    assert isinstance(first, ServiceConnection)
    for connection in (first, second):
        assert isinstance(connection.lease, str) and len(connection.lease) >= 16
        assert connection.reply["lease_seconds"] == 12.5
    assert first.lease != second.lease


def test_a_lost_service_keeps_its_port_for_its_lease_only(env):
    relay = env.relay(ports=2, lease_time=TIMEOUT)
    held, other = relay.pool.ports
    proxy = env.proxy(relay.server_address)
    lost = env.connect(proxy.address)
    assert lost.port == held
    token = lost.lease
    link = link_of(relay, held)
    proxy.cut()   # the connection is lost: no goodbye
    assert link.join(TIMEOUT)
    assert lost.session.wait(TIMEOUT)
    # While the lease holds, the port goes to no one else: a newcomer gets the
    # other port although the held one is lower...
    newcomer = env.connect(relay.server_address)
    assert newcomer.port == other
    # ...and one that wants it, without the token, cannot have it.
    with pytest.raises(RegistrationRefused):
        connect(relay.server_address, port=held, max_wait=0.3, timeout=TIMEOUT)
    with pytest.raises(RegistrationRefused):
        connect(relay.server_address, lease="%d-not-the-token" % held, max_wait=0.3,
                timeout=TIMEOUT)
    # The token gets it back, at once.
    back = env.connect(relay.server_address, lease=token, max_wait=0)
    assert back.port == held
    assert back.lease and back.lease != token
    env.assert_reaches(held, back, b"back")


def test_a_lost_services_port_is_free_again_when_the_lease_ends(env):
    lease_time = 0.5
    relay = env.relay(ports=1, lease_time=lease_time)
    port = relay.pool.ports[0]
    proxy = env.proxy(relay.server_address)
    lost = env.connect(proxy.address)
    link = link_of(relay, port)
    proxy.cut()
    assert link.join(TIMEOUT)
    released = time.monotonic()
    with pytest.raises(RegistrationRefused):   # still held
        connect(relay.server_address, port=port, max_wait=0, timeout=TIMEOUT)
    other = env.connect(relay.server_address, port=port, max_wait=TIMEOUT)
    waited = time.monotonic() - released
    assert other.port == port
    assert waited <= lease_time + 1.0, waited
    assert lost.session.wait(TIMEOUT)


@pytest.mark.parametrize("how", ["ServiceConnection.close", "RelayServer.server_close"])
def test_a_service_that_says_goodbye_frees_its_port_at_once(env, how):
    relay = env.relay(ports=1)   # the default lease time, 30 s
    port = relay.pool.ports[0]

    def register():
        """A service on ``port`` at once (max_wait=0); returns its close()."""
        try:
            if how == "ServiceConnection.close":
                service_ = connect(relay.server_address, port=port, max_wait=0, timeout=TIMEOUT)
                return service_.close
            service_ = RelayServer(relay.server_address, EchoHandler, port=port, max_wait=0)
            return service_.server_close
        except RegistrationRefused:
            return None
    # Round after round: each service leaves, and the next one must get the
    # port at once (whether the goodbye arrives can depend on timing).
    close = register()
    assert close is not None
    for round_ in range(6):
        link = link_of(relay, port)
        close()
        assert link.join(TIMEOUT)
        close = register()
        assert close is not None, ("round %d: the port was held after its service said "
                                   "goodbye (%s)" % (round_, how))
    close()


def test_an_unknown_lease_names_its_port_as_a_preference(env):
    relay = env.relay(ports=3)   # a relay that never issued these tokens (it restarted)
    low, middle, high = relay.pool.ports
    preferred = env.connect(relay.server_address, lease="%d-0123456789abcdef" % high, max_wait=0)
    assert preferred.port == high
    # Taken: any other port does, at once.
    taken = env.connect(relay.server_address, lease="%d-fedcba9876543210" % high, max_wait=0)
    assert taken.port == low
    nonsense = env.connect(relay.server_address, lease="not-a-port", max_wait=0)
    assert nonsense.port == middle


def test_a_valid_lease_takes_the_port_over_from_a_connection_still_up(env):
    relay = env.relay(ports=2)
    port = relay.pool.ports[0]
    current = env.connect(relay.server_address)
    assert current.port == port
    # Several times over: the old connection's end races the new registration.
    for round_ in range(6):
        old, old_link = current, link_of(relay, port)
        current = env.connect(relay.server_address, lease=old.lease)
        assert current.port == port, ("round %d: the lease's holder got port %d, not its "
                                      "own %d" % (round_, current.port, port))
        assert old_link.join(TIMEOUT)
        assert old.session.wait(TIMEOUT), "the relay kept the old connection"
        with pytest.raises(RelayGone):
            old.accept(TIMEOUT)
    env.assert_reaches(port, current, b"new")


# -- dead peers --------------------------------------------------------------------------------

def _proc_address(address):
    host, port = address[:2]
    return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(host))[0], port)


def tcp_timer(local, remote):
    """(timer, seconds to go) of the TCP connection ``local`` -> ``remote`` (/proc/net/tcp).

    The timer is 0 for none, 1 retransmit, 2 keepalive, 4 zero window probe.
    """
    wanted = (_proc_address(local), _proc_address(remote))
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                timer, ticks = fields[5].split(":")
                return int(timer, 16), int(ticks, 16) / float(os.sysconf("SC_CLK_TCK"))
    raise AssertionError("no TCP connection %s -> %s" % (local, remote))


def test_tcp_keepalive_within_the_keepalive_time_on_both_ends(env):
    relay = env.relay(ports=1)   # keepalive: the default, 30 s
    connection = env.connect(relay.server_address, heartbeat=False)
    assert "heartbeat" not in connection.reply
    ours = connection.session.getsockname()
    for local, remote in ((ours, relay.server_address), (relay.server_address, ours)):
        # Idle: the keepalive timer runs, due within the keepalive time (the
        # kernel's own default would be two hours).
        def keepalive_timer():
            timer = tcp_timer(local, remote)
            return timer if timer[0] == 2 else None
        timer = wait_until(keepalive_timer, what="a keepalive timer on %s -> %s" % (local, remote))
        assert 0 < timer[1] <= 30.0, timer
    # enable_tcp_keepalive: probes start and give up well within the time asked for.
    for seconds in (30.0, 6.0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            enable_tcp_keepalive(sock, seconds)
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert idle + interval * count <= seconds, (idle, interval, count)
            user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)
            assert 0 < sock.getsockopt(socket.IPPROTO_TCP, user_timeout) <= seconds * 1000
        finally:
            sock.close()


def test_heartbeat_is_negotiated_answered_and_a_silent_service_dropped(env, logs):
    relay = env.relay(ports=1, keepalive=1.5, lease_time=0)
    port = relay.pool.ports[0]
    service_ = env.service(relay)
    registration = service_.register({"heartbeat": True})
    reply = registration.reply()
    assert reply["status"] == "ok" and reply["port"] == port
    assert reply["heartbeat"] == {"interval": 0.5, "timeout": 1.5}
    # The registration stream stays open and carries ping/pong lines.
    for n in (1, 2, 3):
        registration.stream.sendall(b'{"ping": %d}\n' % n)
        assert registration.reply() == {"pong": n}
    quiet_since = time.monotonic()
    assert service_.session.wait(TIMEOUT), "the relay kept a service that stopped pinging"
    elapsed = time.monotonic() - quiet_since
    assert 1.3 <= elapsed <= 1.5 + 1.0, elapsed
    assert logs.messages("no heartbeat for 1.5s", level=logging.WARNING)
    for link in relay.services:
        assert link.join(TIMEOUT)
    assert env.connect(relay.server_address, port=port, max_wait=TIMEOUT).port == port


def test_relay_frees_the_port_of_a_service_whose_path_went_silent(env, logs):
    keepalive = 1.5
    relay = env.relay(ports=1, keepalive=keepalive, lease_time=0)
    port = relay.pool.ports[0]
    proxy = env.proxy(relay.server_address)
    vanishing = env.connect(proxy.address)   # asks for the heartbeat, by default
    assert vanishing.port == port
    link = link_of(relay, port)
    proxy.freeze()   # no FIN, no RST: the path just goes silent
    frozen_at = time.monotonic()
    assert link.join(TIMEOUT), "the relay never noticed"
    elapsed = time.monotonic() - frozen_at
    assert 0.9 <= elapsed <= keepalive + 1.0, elapsed
    assert logs.messages("no heartbeat for 1.5s", level=logging.WARNING)
    assert env.connect(relay.server_address, port=port, max_wait=0).port == port


def test_service_notices_a_silent_relay_and_reconnects_to_the_same_port(env, logs):
    keepalive = 1.5
    relay = env.relay(ports=2, keepalive=keepalive)   # leases on: the port waits for it
    port = relay.pool.ports[0]
    proxy = env.proxy(relay.server_address)
    server = env.server(proxy.address, EchoHandler, cls=RecordingServer)
    assert server.registrations.get(timeout=TIMEOUT) == public(port)
    env.serve(server, reconnect=True)
    assert_echoes(port, b"before")
    proxy.freeze()
    frozen_at = time.monotonic()
    assert server.registrations.get(timeout=TIMEOUT) == public(port)
    elapsed = time.monotonic() - frozen_at
    # Noticed within the keepalive time (plus a ping interval), then the
    # first attempt goes through at once.
    assert elapsed <= keepalive + 0.5 + 1.0, elapsed
    assert logs.messages("no answer to a heartbeat for 1.5s", level=logging.WARNING)
    assert logs.messages("lost the relay")
    assert_echoes(port, b"after")


# -- PROXY protocol -----------------------------------------------------------------------------

class AddressEcho(socketserver.StreamRequestHandler):
    def handle(self):
        self.server.seen.put(self.client_address)
        self.wfile.write(self.rfile.readline())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_handlers_see_the_clients_address(env, version):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, AddressEcho, cls=RecordingServer,
                        proxy_protocol=version)
    env.serve(server)
    for _ in range(2):
        client = env.client(port)
        client.sendall(b"PROXY is not mine to read\n")   # the client's own bytes, intact
        assert recv_to_eof(client) == b"PROXY is not mine to read\n"
        assert server.seen.get(timeout=TIMEOUT) == client.getsockname()


class RecordingFiles(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler, unchanged but for noting client_address."""

    def do_GET(self):
        self.server.seen.put(self.client_address)
        http.server.SimpleHTTPRequestHandler.do_GET(self)


def test_proxy_protocol_http_server_logs_the_real_client(env, tmp_path, monkeypatch, capsys):
    (tmp_path / "index.txt").write_bytes(b"hello from behind the relay\n")
    monkeypatch.chdir(str(tmp_path))
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, RecordingFiles, cls=RecordingServer,
                        proxy_protocol="v2")
    env.serve(server)
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/index.txt")
        client_host, client_port = connection.sock.getsockname()[:2]
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"hello from behind the relay\n")
    finally:
        connection.close()
    assert server.seen.get(timeout=TIMEOUT) == (client_host, client_port)
    assert client_port != relay.server_address[1]
    logged = [line for line in capsys.readouterr().err.splitlines() if "GET /index.txt" in line]
    assert len(logged) == 1, logged
    assert logged[0].startswith("%s - - [" % client_host), logged[0]


def test_proxy_protocol_a_client_cannot_forge_the_header(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    server = env.server(relay.server_address, AddressEcho, cls=RecordingServer,
                        proxy_protocol="v1")
    env.serve(server)
    # The relay writes the header itself; a client cannot forge one in its place.
    client = env.client(port)
    client.sendall(b"PROXY TCP4 10.9.8.7 10.9.8.6 1111 2222\r\nline\n")
    assert recv_to_eof(client) == b"PROXY TCP4 10.9.8.7 10.9.8.6 1111 2222\r\n"
    assert server.seen.get(timeout=TIMEOUT) == client.getsockname()
