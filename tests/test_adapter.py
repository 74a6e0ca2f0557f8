"""The adapter: an unmodified TCP service exposed through a relay.

In process (``Adapter`` through a real ``Relay``, under ``no_leaks``): a
threaded echo server, http.server fetched with urllib, a banner service, a
service that half-closes, resets both ways, a local service that refuses or
never answers, PROXY headers passed on to the backend.

As processes (``python -m tcprelay.adapter``, as a user runs it): the address
line, the options, signals, exit codes, and a relay killed (SIGKILL) and
restarted, with the adapter and the echo server coming back on their ports.
"""

import http.server
import logging
import os
import re
import signal
import socket
import socketserver
import struct
import threading
import time
import urllib.request

import pytest

from helpers.basics import LOOPBACK, MIB, TIMEOUT, Worker, free_port_range, pool_args, wait_until
from helpers.processes import assert_no_traceback, quick
from helpers.relay import (
    abort, connect_client, echo_roundtrip, listening_socket, read_until_end, recv_exact,
    recv_to_eof, sendall_then,
)
from tcprelay.adapter import Adapter
from tcprelay.echoserver import EchoHandler


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


# -- local services --------------------------------------------------------------------------

class ThreadedTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True


class ThreadedHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True


def start_backend(cleanups, handler, server_class=ThreadedTCPServer):
    """A socketserver on 127.0.0.1 (any port), served from a thread until cleanup."""
    server = server_class((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="backend")
    thread.start()

    def stop():
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    cleanups.append(stop)
    return server


def serve_once(listener, handle):
    """Accept one connection and return ``handle(conn)``."""
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    try:
        return handle(conn)
    finally:
        conn.close()


def unanswering_listener(cleanups):
    """A listener whose accept queue is full: a new connection to it hangs until it
    times out (the kernel drops the SYNs)."""
    listener = listening_socket(cleanups, backlog=0)
    for _ in range(8):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        cleanups.append(filler.close)
        filler.settimeout(0.3)
        try:
            filler.connect(listener.getsockname())
        except socket.timeout:
            return listener
    raise AssertionError("could not fill the accept queue of %s" % (listener.getsockname(),))


def proxy_header(version, client, public_port):
    """The PROXY header for ``client`` (host, port) reaching ``public_port``, written out."""
    host, port = client[:2]
    if version == "v1":
        return ("PROXY TCP4 %s %s %d %d\r\n" % (host, LOOPBACK, port, public_port)).encode()
    addresses = (socket.inet_aton(host) + socket.inet_aton(LOOPBACK)
                 + struct.pack(">HH", port, public_port))
    return (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack(">H", len(addresses))
            + addresses)


# -- in process ------------------------------------------------------------------------------

class Local(object):
    """Local services for one in-process test, torn down by ``env``."""

    def __init__(self, env):
        self.cleanups = []
        env.defer(self.close)

    def close(self):
        while self.cleanups:
            self.cleanups.pop()()


@pytest.fixture
def local(env):
    return Local(env)


def start_adapter(env, relay, local_address, **options):
    """An in-process Adapter registered with ``relay``, serving; returns its public port."""
    adapter = Adapter(relay.server_address, local_address, **options)
    env.defer(adapter.server_close)
    env.serve(adapter)
    return adapter.server_address[1]


def test_threaded_tcp_echo_server(env, local):
    relay = env.relay(ports=2)
    backend = start_backend(local.cleanups, EchoHandler)
    port = start_adapter(env, relay, backend.server_address)
    assert port == relay.pool.ports[0]
    payloads = [os.urandom(MIB + 17), os.urandom(300 * 1024), b"x"]
    clients = [env.client(port) for _ in payloads]
    # Concurrent clients, bytes exact both ways; each client's half-close
    # reaches the echo server, whose close comes back as the client's EOF.
    workers = [Worker(echo_roundtrip, client, data) for client, data in zip(clients, payloads)]
    for worker, client, data in zip(workers, clients, payloads):
        assert worker.finish() == data
        assert recv_to_eof(client) == b""


def test_http_server_fetched_with_urllib(env, local, tmp_path, monkeypatch):
    content = os.urandom(300 * 1024)
    (tmp_path / "data.bin").write_bytes(content)
    monkeypatch.chdir(str(tmp_path))   # SimpleHTTPRequestHandler serves the current directory
    relay = env.relay(ports=1)
    backend = start_backend(local.cleanups, http.server.SimpleHTTPRequestHandler,
                            ThreadedHTTPServer)
    port = start_adapter(env, relay, backend.server_address)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(2):
        with opener.open("http://127.0.0.1:%d/data.bin" % port, timeout=TIMEOUT) as response:
            assert response.status == 200
            assert response.read() == content


def test_banner_service_speaks_first(env, local):
    relay = env.relay(ports=1)
    listener = listening_socket(local.cleanups)

    def banner(conn):
        conn.sendall(b"220 banner.test ready\r\n")
        line = recv_exact(conn, 6)
        conn.sendall(b"221 bye\r\n")
        return line
    service = Worker(serve_once, listener, banner)
    port = start_adapter(env, relay, listener.getsockname())
    client = env.client(port)
    # The client says nothing: the banner must come anyway.
    assert recv_exact(client, 23) == b"220 banner.test ready\r\n"
    client.sendall(b"QUIT\r\n")
    assert recv_to_eof(client) == b"221 bye\r\n"
    assert service.finish() == b"QUIT\r\n"


def test_service_that_half_closes(env, local):
    relay = env.relay(ports=1)
    listener = listening_socket(local.cleanups)

    def greet_then_listen(conn):
        conn.sendall(b"greeting, and that is all from me")
        conn.shutdown(socket.SHUT_WR)
        return recv_to_eof(conn)
    service = Worker(serve_once, listener, greet_then_listen)
    port = start_adapter(env, relay, listener.getsockname())
    client = env.client(port)
    assert recv_to_eof(client) == b"greeting, and that is all from me"
    # The other direction still flows, to its own end.
    upload = os.urandom(512 * 1024)
    writer = Worker(sendall_then, client, upload, lambda: client.shutdown(socket.SHUT_WR))
    assert service.finish() == upload
    writer.finish()
    data, how = read_until_end(client)
    assert data == b""


@pytest.mark.parametrize("who", ["client", "service"])
def test_resets_are_carried_both_ways(env, local, who):
    relay = env.relay(ports=1)
    listener = listening_socket(local.cleanups)

    def service_side(conn):
        if who == "client":
            conn.sendall(recv_exact(conn, 2))   # the whole path is up
            return read_until_end(conn)
        conn.sendall(b"hi")
        assert recv_exact(conn, 2) == b"ok"
        abort(conn)
        return None
    service = Worker(serve_once, listener, service_side)
    port = start_adapter(env, relay, listener.getsockname())
    client = env.client(port)
    if who == "client":
        client.sendall(b"hi")
        assert recv_exact(client, 2) == b"hi"
        abort(client)
        data, how = service.finish()
    else:
        assert recv_exact(client, 2) == b"hi"
        client.sendall(b"ok")
        data, how = read_until_end(client)
        service.finish()
    assert data == b""
    assert isinstance(how, ConnectionResetError), "saw %r, not a reset" % (how,)


def test_local_service_refusing_resets_each_client_and_is_logged_once_a_second(env, logs):
    # Each client is reset, and the adapter carries on. One WARNING per client
    # let anyone who reaches the public port fill the service host's log: it is
    # told once a second, with how many were left out.
    relay = env.relay(ports=1)
    nothing = (LOOPBACK, free_port_range(1)[0])
    port = start_adapter(env, relay, nothing)
    started = time.monotonic()
    for _ in range(100):
        try:
            client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        except ConnectionResetError:
            continue   # reset before connect() returned
        with client:
            data, how = read_until_end(client)
        assert data == b"" and isinstance(how, ConnectionResetError), (data, how)
    took = time.monotonic() - started
    # Each was logged (or counted) before its client was reset: all are in by now.
    warnings = logs.messages("cannot reach the local service", level=logging.WARNING)
    assert 1 <= len(warnings) <= took + 2, warnings
    assert "127.0.0.1:%d" % nothing[1] in warnings[0] and "refused" in warnings[0], warnings
    # Every client reached the adapter, which is still registered.
    links = [link for link in relay.services if link.port == port]
    assert len(links) == 1 and links[0].clients_served == 100, relay.services


def test_local_service_timing_out_resets_the_client_and_is_logged(env, local, logs):
    relay = env.relay(ports=1)
    silent = unanswering_listener(local.cleanups)
    port = start_adapter(env, relay, silent.getsockname(), connect_timeout=0.5)
    client = env.client(port)
    started = time.monotonic()
    data, how = read_until_end(client)
    elapsed = time.monotonic() - started
    assert data == b""
    assert isinstance(how, ConnectionResetError), "saw %r, not a reset" % (how,)
    assert 0.4 <= elapsed < TIMEOUT, elapsed
    warning = logs.wait_for("cannot reach the local service at 127.0.0.1:%d"
                            % silent.getsockname()[1], level=logging.WARNING)[0]
    assert "timed out" in warning, warning


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_passed_on_to_the_backend(env, local, version):
    relay = env.relay(ports=1)
    listener = listening_socket(local.cleanups)
    service = Worker(serve_once, listener, recv_to_eof)
    port = start_adapter(env, relay, listener.getsockname(), proxy_protocol=version)
    client = env.client(port)
    client.sendall(b"the client's own bytes\r\n")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""
    expected = proxy_header(version, client.getsockname(), port) + b"the client's own bytes\r\n"
    assert service.finish() == expected


# -- as processes ------------------------------------------------------------------------------

@pytest.fixture
def backends():
    """Local services for process tests; stopped at the end, whatever happened."""
    cleanups = []
    try:
        yield cleanups
    finally:
        while cleanups:
            cleanups.pop()()


def adapter_process(procs, relay_port, local_address, *args):
    """``python -m tcprelay.adapter 127.0.0.1 RELAY_PORT HOST:PORT args...``."""
    return procs.start("tcprelay.adapter", LOOPBACK, relay_port, "%s:%d" % local_address[:2],
                       *args)


OPTIONS = ["--port", "--name", "--proxy-protocol", "--connect-timeout", "--log-level",
           "--retry", "--no-reconnect"]


def test_help_describes_every_option(procs):
    process = procs.start("tcprelay.adapter", "--help")
    assert process.wait() == 0
    text = process.stdout_rest()
    assert "LOCAL_HOST:LOCAL_PORT" in text
    for option in OPTIONS:
        match = re.search(r"^\s+%s(?:[ =]\S+)?(.*(?:\n\s{6,}\S.*)*)" % re.escape(option),
                          text, re.M)
        assert match, "%s missing from --help:\n%s" % (option, text)
        described = " ".join(match.group(1).split())
        assert len(described.split()) >= 3, "%s has no help text: %r" % (option, described)
    assert "{none,v1,v2}" in text


@pytest.mark.parametrize("signame, code, freed", [
    ("SIGTERM", 0, "is free again ("),
    ("SIGINT", 0, "is free again ("),
    ("SIGKILL", -signal.SIGKILL, "is free again once its lease ends"),
], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_cli_exposes_a_local_service_and_stops_on_a_signal(procs, backends, signame, code,
                                                           freed):
    ports = free_port_range(3)
    relay_port, pool = ports[0], ports[1:]
    # A short keepalive: the relay's pongs (every 0.5 s) also free a shutdown
    # caught by the bug test_service.test_shutdown_returns_promptly shows.
    relay = procs.relay(relay_port, *quick("--keepalive", "1.5", *pool_args(pool)))
    backend = start_backend(backends, EchoHandler)
    adapter = adapter_process(procs, relay_port, backend.server_address,
                              "--name", "db-adapter", "--port", pool[1])
    assert adapter.readline() == "127.0.0.1:%d" % pool[1]   # the first line, at once
    wait_until(lambda: "service 'db-adapter'" in relay.stderr_text(), what="the name in the log")
    data = os.urandom(256 * 1024)
    client = connect_client(pool[1])
    try:
        assert echo_roundtrip(client, data, half_close=False) == data
        adapter.send_signal(getattr(signal, signame))
        assert adapter.wait() == code
        left, how = read_until_end(client)   # its client ends with it
        assert left == b""
    finally:
        client.close()
    # A clean stop says goodbye: the port is free at once. A killed adapter
    # keeps it for its lease.
    wait_until(lambda: "port %d %s" % (pool[1], freed) in relay.stderr_text(),
               what="the relay to free port %d" % pool[1])
    if code == 0:
        assert adapter.stdout_rest() == ""   # one address line only
        assert "%s received" % signame in adapter.stderr_text()
        assert_no_traceback(adapter)
    assert_no_traceback(relay)


def test_cli_proxy_protocol_passes_the_header_on(procs, backends):
    ports = free_port_range(2)
    procs.relay(ports[0], *quick(*pool_args(ports[1:])))
    listener = listening_socket(backends)
    probe = Worker(serve_once, listener, recv_to_eof)   # the adapter's check at start
    adapter = adapter_process(procs, ports[0], listener.getsockname(), "--proxy-protocol", "v2")
    assert adapter.readline() == "127.0.0.1:%d" % ports[1]
    assert probe.finish() == b""
    service = Worker(serve_once, listener, recv_to_eof)
    client = connect_client(ports[1])
    try:
        client.sendall(b"after the header")
        client.shutdown(socket.SHUT_WR)
        assert recv_to_eof(client) == b""
        expected = proxy_header("v2", client.getsockname(), ports[1]) + b"after the header"
    finally:
        client.close()
    assert service.finish() == expected


def test_cli_connect_timeout_resets_the_client_and_names_the_local_address(procs, backends):
    ports = free_port_range(2)
    procs.relay(ports[0], *quick(*pool_args(ports[1:])))
    silent = unanswering_listener(backends)
    adapter = adapter_process(procs, ports[0], silent.getsockname(), "--connect-timeout", "0.5")
    assert adapter.readline() == "127.0.0.1:%d" % ports[1]
    client = connect_client(ports[1])
    try:
        started = time.monotonic()
        data, how = read_until_end(client)
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert data == b"" and isinstance(how, ConnectionResetError), (data, how)
    assert 0.4 <= elapsed < TIMEOUT, elapsed
    wanted = "cannot reach the local service at 127.0.0.1:%d (timed out)" % silent.getsockname()[1]
    wait_until(lambda: wanted in adapter.stderr_text(), what="the log line")
    assert adapter.alive()


def test_cli_unreachable_relay_exits_1_with_the_reason(procs):
    relay_port, local_port = free_port_range(2)   # nothing listens on either
    adapter = adapter_process(procs, relay_port, (LOOPBACK, local_port))
    assert adapter.wait() == 1
    assert adapter.stdout_rest() == ""
    lines = adapter.stderr_lines()
    assert len(lines) == 1, adapter.stderr_text()
    assert lines[0].startswith("tcprelay.adapter: cannot register with the relay at "
                               "127.0.0.1:%d" % relay_port), lines[0]
    assert "refused" in lines[0].lower(), lines[0]


def test_cli_refused_registration_exits_1_with_the_reason(procs):
    ports = free_port_range(3)
    procs.relay(ports[0], *quick(*pool_args(ports[1:2])))
    adapter = adapter_process(procs, ports[0], (LOOPBACK, ports[2]), "--retry",
                              "--port", ports[2])   # not in the pool: final, even with --retry
    assert adapter.wait() == 1
    assert adapter.stdout_rest() == ""
    lines = adapter.stderr_lines()
    assert len(lines) == 1, adapter.stderr_text()
    assert lines[0].startswith("tcprelay.adapter: the relay at 127.0.0.1:%d refused us: "
                               % ports[0]), lines[0]
    assert "port %d is not in this relay's pool" % ports[2] in lines[0], lines[0]


def test_cli_retry_waits_for_the_relay(procs, backends):
    ports = free_port_range(2)
    relay_port = ports[0]
    backend = start_backend(backends, EchoHandler)
    adapter = adapter_process(procs, relay_port, backend.server_address, "--retry",
                              "--log-level", "warning")
    wanted = "cannot register with the relay at 127.0.0.1:%d: Connection refused; " \
             "trying again in" % relay_port
    wait_until(lambda: wanted in adapter.stderr_text(), what="a logged failed attempt")
    procs.relay(relay_port, *quick(*pool_args(ports[1:])))
    assert adapter.readline() == "127.0.0.1:%d" % ports[1]
    client = connect_client(ports[1])
    try:
        assert echo_roundtrip(client, b"it waited") == b"it waited"
    finally:
        client.close()
    assert " INFO " not in adapter.stderr_text()   # --log-level warning


def _registrations(process):
    return process.stderr_text().count("registered with the relay at")


def _first_delays(process):
    """The first "trying again in" delay after each "lost the relay" line."""
    firsts, lost = [], False
    for line in process.stderr_lines():
        if "lost the relay at" in line:
            lost = True
        elif lost and "trying again in" in line:
            firsts.append(float(re.search(r"trying again in ([0-9.]+)s", line).group(1)))
            lost = False
    return firsts


def test_relay_killed_and_restarted_services_come_back_on_their_ports(procs, backends):
    ports = free_port_range(4)
    relay_port, pool = ports[0], ports[1:]
    relay_args = quick("--keepalive", "3", *pool_args(pool))   # see the signal test
    relay = procs.relay(relay_port, *relay_args)
    backend = start_backend(backends, EchoHandler)
    # The lowest port goes to one that will not come back (--no-reconnect), so
    # that after a restart the others must each ask for their own port.
    quitter = adapter_process(procs, relay_port, backend.server_address, "--no-reconnect")
    assert quitter.readline() == "127.0.0.1:%d" % pool[0]
    echo, echo_port = procs.echo(relay_port)   # reconnects by default
    adapter = adapter_process(procs, relay_port, backend.server_address)
    assert (echo_port, adapter.readline()) == (pool[1], "127.0.0.1:%d" % pool[2])
    for outage in (1, 2):
        relay.kill()   # SIGKILL: no goodbye
        if outage == 1:
            assert quitter.wait() == 1   # --no-reconnect: it exits, saying why
            lines = quitter.stderr_lines()
            assert lines[-1].startswith("tcprelay.adapter: lost the relay at 127.0.0.1:%d"
                                        % relay_port), lines[-1]
        # Both notice, try at once, fail, and log why.
        for process in (adapter, echo):
            wait_until(lambda: process.stderr_text().count(
                "cannot register with the relay at 127.0.0.1:%d: Connection refused; trying "
                "again in" % relay_port) >= outage, what="%r to fail an attempt" % process)
        relay = procs.relay(relay_port, *relay_args)
        # A new relay never issued their leases; each still names its port,
        # though the lowest one is free.
        for process in (adapter, echo):
            wait_until(lambda: _registrations(process) == outage + 1,
                       what="%r to register again" % process)
        for port in (pool[1], pool[2]):
            client = connect_client(port)
            try:
                assert echo_roundtrip(client, b"outage %d" % outage) == b"outage %d" % outage
                assert recv_to_eof(client) == b""
            finally:
                client.close()
    # Every outage started the backoff over from half a second.
    delays = _first_delays(adapter)
    assert len(delays) == 2 and all(0.35 <= d <= 0.65 for d in delays), delays
    for process in (adapter, echo):
        assert re.search(r"lost the relay at 127\.0\.0\.1:%d \(.+\); reconnecting" % relay_port,
                         process.stderr_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait() == 0
        assert process.stdout_rest() == ""   # same address: no new line
        assert_no_traceback(process)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["numeric", "name"])
def test_local_service_by_address_or_by_name(env, local, host):
    # A numeric local address is connected to directly (no resolver call per
    # client); a host name is resolved for each client, as it may change.
    relay = env.relay(ports=1)
    backend = start_backend(local.cleanups, EchoHandler)
    port = start_adapter(env, relay, (host, backend.server_address[1]))
    client = env.client(port)
    assert echo_roundtrip(client, b"ping", half_close=True) == b"ping"
