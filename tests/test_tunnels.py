"""Several public ports on one service session (issue 16; docs/PROTOCOL.md, 2.11).

In process, through a real ``Relay``: one adapter, three local servers, three
public ports, byte-exact both ways with half-close, back on their ports after a
relay restart; a stream for a tunnel the service does not serve is reset; the
relay's refusals of further tunnels; an old-style single-tunnel service sees
exactly the bytes it saw before. The preamble itself on a socket pair. As a
process: the adapter's ``name address`` lines, from targets and --config.
"""

import os
import socket
import socketserver
import threading

import pytest

from helpers.basics import LOOPBACK, MIB, TIMEOUT, Worker, free_port_range
from helpers.relay import echo_roundtrip, recv_exact, recv_to_eof
from tcprelay import registrant, tunnelwire
from tcprelay.adapter import Adapter


@pytest.fixture
def env(service_env):
    return service_env


class TaggedEcho(socketserver.BaseRequestHandler):
    """Sends its server's tag, then echoes until EOF, then closes: the tag says
    which local server a client reached."""

    def handle(self):
        self.request.sendall(self.server.tag)
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class Backend(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def start_backend(env, tag):
    server = Backend((LOOPBACK, 0), TaggedEcho)
    server.tag = tag
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="backend")
    thread.start()

    def stop():
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    env.defer(stop)
    return server


def tagged_roundtrip(port, tag, data):
    """A client of public ``port``: its tag, then ``data`` echoed byte-exact,
    sent with a half-close, and the EOF after it."""
    client = socket.create_connection((LOOPBACK, port), TIMEOUT)
    try:
        client.settimeout(TIMEOUT)
        assert recv_exact(client, len(tag)) == tag
        assert echo_roundtrip(client, data, half_close=True) == data
        assert recv_to_eof(client) == b""
    finally:
        client.close()


def public_port(address):
    return int(address.rsplit(":", 1)[1])


class Registrations(Adapter):
    """An Adapter whose ``second`` is set when it has registered a second time."""

    def __init__(self, *args, **kwargs):
        self.registrations = 0
        self.second = threading.Event()
        Adapter.__init__(self, *args, **kwargs)

    def registered(self, previous_address, connection):
        Adapter.registered(self, previous_address, connection)
        self.registrations += 1
        if self.registrations == 2:
            self.second.set()


def test_one_adapter_three_tunnels_byte_exact_and_back_on_their_ports_after_a_restart(env):
    pool = free_port_range(4)
    relay = env.relay(ports=pool)
    relay_address = relay.server_address
    # The lowest port goes to a service that will not come back: after the
    # restart the tunnels must each ask for their own port (their leases).
    first_comer = env.connect(relay_address)
    assert first_comer.port == pool[0]
    names = ["db", "cache", "web"]
    backends = dict((name, start_backend(env, b"<%s>" % name.encode())) for name in names)
    adapter = Registrations(relay_address, None, targets=dict(
        (name, {"local": backends[name].server_address}) for name in names))
    env.defer(adapter.server_close)
    env.serve(adapter, reconnect=True)
    addresses = dict(adapter.public_addresses)
    assert sorted(public_port(a) for a in addresses.values()) == pool[1:]
    payloads = dict((name, os.urandom(MIB + i) + name.encode()) for i, name in enumerate(names))
    workers = [Worker(tagged_roundtrip, public_port(addresses[name]), b"<%s>" % name.encode(),
                      payloads[name]) for name in names]
    for worker in workers:
        worker.finish()
    first_comer.close()
    env.stop_relay(relay)
    env.relay(ports=pool, port=relay_address[1])
    assert adapter.second.wait(TIMEOUT), "the adapter did not register again"
    assert dict(adapter.public_addresses) == addresses
    for name in names:
        tagged_roundtrip(public_port(addresses[name]), b"<%s>" % name.encode(), b"again")


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(TIMEOUT)
        self.request.sendall(b"tunnel %s: " % self.request.tunnel.encode())
        data = recv_to_eof(self.request)
        self.request.sendall(data)


def test_a_stream_for_a_tunnel_the_service_does_not_serve_is_reset(env):
    relay = env.relay(ports=2)
    server = env.server(relay.server_address, {"a": Echo, "b": Echo}, timeout=TIMEOUT)
    env.serve(server)
    ports = dict((name, public_port(a)) for name, a in server.public_addresses.items())
    del server.tunnel_handlers["b"]   # as if the relay named a tunnel we never asked for
    stray = socket.create_connection((LOOPBACK, ports["b"]), TIMEOUT)
    stray.settimeout(TIMEOUT)
    with pytest.raises(ConnectionResetError):
        stray.sendall(b"anyone?")
        recv_to_eof(stray)
    stray.close()
    client = socket.create_connection((LOOPBACK, ports["a"]), TIMEOUT)
    client.settimeout(TIMEOUT)
    client.sendall(b"hello")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b"tunnel a: hello"
    client.close()


def test_the_relay_refuses_a_further_tunnel_with_a_name_taken_or_without_one(env):
    relay = env.relay(ports=3)
    connection = env.connect(relay.server_address, name="a", tunnels=[{"name": "b"}])
    assert [t.name for t in connection.tunnels.values()] == ["a", "b"]
    assert connection.reply.get("tunnels") is True
    for name, reason in (("a", "has a tunnel named 'a' already"),
                         (None, "needs a request with a 'name'")):
        with pytest.raises(registrant.RegistrationRefused) as refused:
            registrant.register(connection.session, name=name, timeout=TIMEOUT)
        assert reason in refused.value.reason
    # Nothing was taken for them: the third port is still free.
    third = env.connect(relay.server_address)
    assert third.port == relay.pool.ports[2]


def test_an_old_style_single_tunnel_service_sees_no_preamble(env):
    relay = env.relay(ports=1)
    connection = env.connect(relay.server_address, name="old", proxy_protocol="v1")
    assert "tunnels" not in connection.reply and connection.tunnels is None
    client = env.client(connection.port)
    client.sendall(b"first bytes")
    stream = connection.accept(TIMEOUT)
    stream.settimeout(TIMEOUT)
    header = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (client.getsockname()[1],
                                                             connection.port)
    assert recv_exact(stream, len(header) + 11) == header + b"first bytes"
    stream.close()


def test_the_preamble_is_read_off_exactly_even_split_across_frames(sessions):
    theirs, ours = sessions.stream_pair()
    theirs.sendall(b"tcprelay-tun")
    writer = Worker(theirs.sendall, b"nel caf\xc3\xa9 db\nPROXY rest")
    assert tunnelwire.read(ours) == u"caf\u00e9 db"
    writer.finish()
    assert recv_exact(ours, 10) == b"PROXY rest"
    theirs, ours = sessions.stream_pair()
    theirs.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(tunnelwire.PreambleError):
        tunnelwire.read(ours)
    theirs, ours = sessions.stream_pair()
    theirs.sendall(b"tcprelay-tunnel cut")
    theirs.close()
    with pytest.raises(tunnelwire.PreambleError):
        tunnelwire.read(ours)


def test_the_adapter_process_prints_one_name_address_line_per_tunnel(procs, tmp_path):
    pool = free_port_range(5)
    relay_port, ports = pool[0], pool[1:]
    procs.relay(relay_port, "--ports", "%d-%d" % (ports[0], ports[-1]))
    listeners = []
    for _ in range(3):
        listener = socket.socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        listeners.append(listener)
    try:
        targets = ["%s:%d" % listener.getsockname() for listener in listeners]
        # Targets may come among the options, as a single one may.
        adapter = procs.start("tcprelay.adapter", LOOPBACK, relay_port, targets[0],
                              "--log-level", "info", targets[1])
        assert [adapter.readline(), adapter.readline()] == [
            "%s 127.0.0.1:%d" % (targets[0], ports[0]), "%s 127.0.0.1:%d" % (targets[1], ports[1])]
        config = tmp_path / "tunnels.ini"
        config.write_text(u"[pg]\nlocal = %s\nport = %d\n\n[redis]\nlocal = %s\n"
                          "proxy_protocol = v2\n" % (targets[2], ports[3], targets[0]))
        configured = procs.start("tcprelay.adapter", LOOPBACK, relay_port, "--config",
                                 str(config))
        assert [configured.readline(), configured.readline()] == [
            "pg 127.0.0.1:%d" % ports[3], "redis 127.0.0.1:%d" % ports[2]]
    finally:
        for listener in listeners:
            listener.close()
