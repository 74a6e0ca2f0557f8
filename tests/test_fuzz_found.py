"""Library bugs the new fuzz kinds found (tests/fuzzing.py), as regular tests.

1. proxyproto.parse took any int() for a v1 port ("-1", "70000", "+80", "1_0")
   and an address of the other family ("TCP4 ::1 ..."): read_header returned
   ports outside 0-65535 instead of raising ProxyHeaderError
   (python3 scripts/fuzz.py --kind proxy finds it within a few hundred cases).
2. service.connect turned the relay's heartbeat interval and timeout into
   seconds with float() after the registration's try block: a relay answering
   ``"heartbeat": {"interval": "x"}`` (or a list, or 1e400) made connect() raise
   ValueError/TypeError/OverflowError and leave its session (two threads and the
   socket) running for ever.
3. service.register (via _silence_in_line) took a waiting notice's interval of
   1e308 (doubled: infinity) or 10**400 as a silence limit: connect() raised
   OverflowError from deep in the stream's wait.
4. tls.TLSTransport.recv_into raised an error met after it had copied records
   into the caller's buffer, losing them (Python < 3.10 with OpenSSL 3, where an
   EOF without close_notify is an SSLError: the relay's error reply was lost).
"""

import socket
import threading

import pytest

from helpers.basics import TIMEOUT, tcp_pair
from tcprelay import muxado, proxyproto, registration, service


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1234 -1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 80\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 80\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1234 80\r\n",
    b"PROXY TCP6 1.2.3.4 ::2 1234 80\r\n",
], ids=["port-too-big", "negative-port", "signed-port", "underscore-port",
        "ipv6-in-tcp4", "ipv4-in-tcp6"])
def test_proxy_v1_header_with_a_bad_port_or_family_is_refused(no_leaks, header):
    dialer, acceptor = tcp_pair()
    try:
        dialer.sendall(header + b"client bytes")
        with pytest.raises(proxyproto.ProxyHeaderError):
            proxyproto.read_header(acceptor)
    finally:
        dialer.close()
        acceptor.close()


def test_proxy_v1_header_at_the_edges_of_the_port_range_is_read(no_leaks):
    dialer, acceptor = tcp_pair()
    try:
        dialer.sendall(b"PROXY TCP6 ::1 ::ffff:1.2.3.4 65535 0\r\nafter")
        source, destination = proxyproto.read_header(acceptor)
        assert source == ("::1", 65535) and destination[1] == 0
        assert acceptor.recv(100) == b"after"
    finally:
        dialer.close()
        acceptor.close()


class FakeRelay(object):
    """A relay on loopback that answers the registration with ``reply`` and holds on."""

    def __init__(self, reply):
        self.reply = reply
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.session = None
        self.error = None
        self.thread = threading.Thread(target=self._run, name="fake relay")
        self.thread.start()

    def _run(self):
        try:
            sock, _ = self.listener.accept()
            self.session = muxado.server(sock)
            stream = self.session.accept(timeout=TIMEOUT)
            stream.settimeout(TIMEOUT)
            request = b""
            while not request.endswith(b"\n"):
                chunk = stream.recv(4096)
                assert chunk, "the service closed before its request"
                request += chunk
            stream.sendall(self.reply)
            # The service must end the session by itself.
            if not self.session.wait(TIMEOUT):
                self.error = "the service never ended its session"
        except Exception as exc:   # reported by the test
            self.error = repr(exc)

    def close(self):
        self.thread.join(TIMEOUT)
        if self.session is not None:
            self.session.close()
        self.listener.close()
        assert not self.thread.is_alive()


@pytest.mark.parametrize("beat", [
    b'{"interval": "x", "timeout": 30}', b'{"interval": 10, "timeout": [1]}',
    b'{"interval": 1e400, "timeout": 30}', b'{"interval": 10, "timeout": 0}',
    b'{"interval": -1}', b'{"interval": true}', b'{"timeout": null}',
    b'{"interval": 1' + b"0" * 400 + b"}",
], ids=["string", "list", "infinite", "zero", "negative", "bool", "null", "huge-int"])
def test_service_refuses_a_relays_bad_heartbeat_numbers_and_leaves_nothing(no_leaks, beat):
    relay = FakeRelay(b'{"status": "ok", "address": "localhost:1", "port": 1, "version": 1, '
                      b'"heartbeat": ' + beat + b"}\n")
    try:
        with pytest.raises(registration.RegistrationError):
            service.connect(relay.listener.getsockname(), timeout=TIMEOUT, heartbeat=True)
    finally:
        relay.close()
    assert relay.error is None, relay.error


@pytest.mark.parametrize("interval", [b"1e308", b"1" + b"0" * 400, b"1e400"],
                         ids=["doubled-to-infinity", "huge-int", "infinity"])
def test_service_waits_in_line_behind_a_relay_promising_an_endless_interval(no_leaks, interval):
    """3. A waiting notice whose interval doubled is infinite (or too big for a float)
    made connect() raise OverflowError as soon as it waited for the next line
    (client case 2 of seed 1): such a promise is no promise, so the service waits
    as long as the session lasts, here until we cancel the attempt."""
    relay = FakeRelay(b'{"status": "waiting", "position": 1, "interval": ' + interval + b'}\n')
    attempt = service.Attempt()
    timers = []

    def waiting(position):
        # Give connect() time to start its wait for the next line, then cut it short.
        timers.append(threading.Timer(0.2, attempt.cancel))
        timers[-1].start()

    try:
        with pytest.raises(service.ConnectCancelled):
            service.connect(relay.listener.getsockname(), timeout=TIMEOUT, heartbeat=False,
                            on_waiting=waiting, attempt=attempt)
        assert timers, "connect() never reported the waiting line"
    finally:
        for timer in timers:
            timer.join(TIMEOUT)
        relay.close()
    assert relay.error is None, relay.error


def test_tls_transport_returns_the_records_it_read_before_an_error(no_leaks):
    """4. TLSTransport.recv_into copied whole records into the caller's buffer, then
    met an error on the next record (an EOF without close_notify raises SSLError on
    Python < 3.10 with OpenSSL 3) and raised it: the bytes already taken were lost
    (the relay's error reply, in the tls kind's cases on Python 3.6). They must come
    first, the error after."""
    import os
    from tcprelay import tls
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    server_context = tls.server_context(os.path.join(data, "test-server.pem"),
                                        os.path.join(data, "test-server.key"))
    client_context = tls.client_context(os.path.join(data, "test-ca.pem"))
    dialer, acceptor = tcp_pair()
    results = {}

    def serve():
        try:
            server = server_context.wrap_socket(acceptor, server_side=True)
            server.sendall(b"hello")
            server.sendall(b"world")
            server.close()          # no close_notify: a ragged EOF
        except Exception as exc:   # reported below
            results["server"] = exc

    thread = threading.Thread(target=serve, name="tls server")
    thread.start()
    try:
        client = client_context.wrap_socket(dialer, server_hostname="127.0.0.1")
        thread.join(TIMEOUT)
        assert not thread.is_alive() and "server" not in results, results
        transport = tls.TLSTransport(client)
        received = bytearray()
        buffer = bytearray(100)
        while len(received) < 10:
            try:
                n = transport.recv_into(buffer)
            except OSError as exc:
                raise AssertionError("lost %r: %r" % (bytes(buffer[:10]), exc))
            if not n:
                break
            received += buffer[:n]
        assert bytes(received) == b"helloworld"
        transport.close()
    finally:
        thread.join(TIMEOUT)
        acceptor.close()
        dialer.close()
