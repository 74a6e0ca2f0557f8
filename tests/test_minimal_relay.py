"""Our services on a relay that speaks only the minimal registration form
(issue 17; docs/PROTOCOL.md 2.1 and "A relay of the minimal form only").

Two such relays: ``MinimalRelay`` below, in the 2014 style (it answers
``host:port`` on the first stream and closes it, having read that stream to
EOF or not at all), and Go's ``bin-v2-relay`` from ../shared/go-peers (skipped
when absent, a clone without ../shared). The service library finds them out
(a bare ``host:port``, or silence to the extended request) and registers in
the minimal form, with one warning; ``minimal=True`` and ``--minimal`` use it
at once; what only the extended form carries is a clear error.

Every blocking call has a timeout; everything binds 127.0.0.1.
"""

import logging
import os
import queue
import socket
import socketserver
import subprocess
import tempfile
import threading
import time

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, free_port_range, wait_until
from helpers.envs import EchoLoop
from helpers.processes import MainRun, assert_clean_exit, assert_no_traceback
from helpers.relay import connect_client, recv_to_eof
from tcprelay import muxado, registrant, registration, service
from tcprelay.service import connect

GO_PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "go-peers")
GO_RELAY = os.path.join(GO_PEERS, "bin-v2-relay")
needs_go_relay = pytest.mark.skipif(
    not os.access(GO_RELAY, os.X_OK),
    reason="../shared/go-peers/bin-v2-relay is absent (a clone without ../shared)")

MINIMAL_ONLY = "speaks only the minimal registration form"


# The grace a silent relay gets before it is taken for a minimal one is the
# smaller of 2 s and --timeout (the timeout=): these tests give it less than
# the 2 s a user waits, to stay quick; what happens after it is the same.
QUICK_GRACE = ["--timeout", "1"]
# Where nothing is registered after the grace (the run ends with the error),
# half of it: the Go relay never answers an extended request before its FIN,
# so the grace always runs out whatever its length.
QUICKER_GRACE = ["--timeout", "0.5"]


@pytest.fixture(autouse=True)
def quick_grace(monkeypatch):
    monkeypatch.setattr(registrant, "MINIMAL_GRACE", 0.3)


@pytest.fixture
def env(service_env):
    """Our own relays, connections and their cleanup (conftest)."""
    return service_env


# -- a relay of the 2014 design, in Python ---------------------------------------------------

class MinimalRelay(object):
    """A relay that answers only the minimal form, as the 2014 relay did.

    Each service connection's first stream is its registration: read to EOF
    (``read_first``) or not at all, then answered with ``127.0.0.1:port`` of
    a fresh public listener and closed. Each client of that port becomes a
    stream, copied both ways with half-closes. ``requests`` gets, per
    service connection, what its first stream carried: bytes up to its FIN,
    or ("aborted", bytes) when it was reset or the session ended before a FIN,
    or None (not read).
    """

    def __init__(self, read_first):
        self.read_first = read_first
        self.requests = queue.Queue()
        self.sessions = []
        self._threads = []
        self._sockets = []
        self._lock = threading.Lock()
        self._closed = False
        self.listener = self._listen()
        self.address = self.listener.getsockname()
        self._spawn(self._accept_services)

    def _listen(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        sock.settimeout(0.1)   # the accept loops look at _closed this often
        self._sockets.append(sock)
        return sock

    def _spawn(self, fn, *args):
        thread = threading.Thread(target=fn, args=args, name="minimal relay")
        thread.daemon = True
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener):
        """The next connection, or None once closed."""
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return None
            conn.settimeout(None)
            return conn
        return None

    def _accept_services(self):
        while True:
            sock = self._accept(self.listener)
            if sock is None:
                return
            session = muxado.server(sock)
            with self._lock:
                self.sessions.append(session)
            self._spawn(self._serve, session)

    def _serve(self, session):
        try:
            stream = session.accept(TIMEOUT)
        except (OSError, muxado.MuxadoError):
            return
        stream.settimeout(TIMEOUT)
        request = None
        if self.read_first:
            data = bytearray()
            try:
                while True:
                    chunk = stream.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except (OSError, muxado.MuxadoError):
                self.requests.put(("aborted", bytes(data)))   # a reset, say
                return
            if session.closed:   # the session ended: no FIN came (a stream's EOF here)
                self.requests.put(("aborted", bytes(data)))
                return
            request = bytes(data)
        self.requests.put(request)
        public = self._listen()
        try:
            stream.sendall(("127.0.0.1:%d" % public.getsockname()[1]).encode("ascii"))
            # A FIN, as Go's Close() sends: our close() would reset a stream with
            # the unread extended request on it, and the reply with it.
            stream.close_write()
        except (OSError, muxado.MuxadoError):
            return
        while True:
            client = self._accept(public)
            if client is None or session.closed:
                if client is not None:
                    client.close()
                return
            try:
                relayed = session.open()
            except (OSError, muxado.MuxadoError):
                client.close()
                return
            self._spawn(self._copy, client, relayed)
            self._spawn(self._copy, relayed, client)

    @staticmethod
    def _copy(source, sink):
        source.settimeout(TIMEOUT)
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except (OSError, muxado.MuxadoError):
            pass

    def session_ends(self):
        """Wait for every service session the relay has seen to end."""
        with self._lock:
            sessions = list(self.sessions)
        for session in sessions:
            assert session.wait(TIMEOUT), "the service's session did not end"

    def close(self):
        self._closed = True
        with self._lock:
            sessions = list(self.sessions)
        for session in sessions:
            session.close()
        for sock in self._sockets:
            sock.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a minimal relay thread still runs"


@pytest.fixture
def minimal_relay(no_leaks):
    relays = []

    def make(read_first):
        relay = MinimalRelay(read_first)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


def echoed(port, data=b"hello, minimal relay\n"):
    """A client of ``port`` half-closes after ``data`` and reads the echo to EOF."""
    client = connect_client(port)
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_to_eof(client) == data
    finally:
        client.close()


def minimal_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING
            and MINIMAL_ONLY in r.getMessage()]


# -- the library against a minimal relay -----------------------------------------------------

def test_a_relay_that_answers_at_once_registers_us_on_that_session(env, minimal_relay, caplog):
    """The 2014 style, reply before reading: the bare host:port is our address."""
    relay = minimal_relay(read_first=False)
    connection = env.connect(relay.address, timeout=4.0)
    env.defer(EchoLoop(connection).close)
    assert connection.minimal and connection.lease is None
    port = int(connection.address.rpartition(":")[2])
    assert echoed(port)
    assert relay.requests.get(timeout=TIMEOUT) is None
    assert len(relay.sessions) == 1, "no second session: it registered us on the first"
    assert len(minimal_warnings(caplog)) == 1


def test_a_relay_that_waits_for_the_fin_gets_the_minimal_form_on_a_fresh_session(
        env, minimal_relay, caplog):
    """The extended request gets no answer: we leave that session, dial again, and
    register in the minimal form (an empty request, then FIN)."""
    relay = minimal_relay(read_first=True)
    started = time.monotonic()
    connection = env.connect(relay.address, timeout=4.0)
    assert time.monotonic() - started < 4.0, "it waited for the timeout, not the grace"
    env.defer(EchoLoop(connection).close)
    first = relay.requests.get(timeout=TIMEOUT)
    assert first[0] == "aborted" and first[1].startswith(b"{"), first
    assert relay.requests.get(timeout=TIMEOUT) == b""
    assert connection.minimal and connection.lease is None
    assert relay.sessions[0].wait(TIMEOUT), "the first session is left, not half-registered"
    assert echoed(int(connection.address.rpartition(":")[2]))
    assert len(minimal_warnings(caplog)) == 1


def test_minimal_true_registers_at_once_without_a_warning(env, minimal_relay, caplog):
    relay = minimal_relay(read_first=True)
    connection = env.connect(relay.address, minimal=True)
    env.defer(EchoLoop(connection).close)
    assert relay.requests.get(timeout=TIMEOUT) == b""
    assert len(relay.sessions) == 1 and connection.minimal
    assert echoed(int(connection.address.rpartition(":")[2]))
    assert minimal_warnings(caplog) == []


@pytest.mark.parametrize("read_first", [False, True])
@pytest.mark.parametrize("option, value", [
    ("port", 8081), ("proxy_protocol", "v1"), ("secret", b"s3cret"),
])
def test_what_only_the_extended_form_carries_is_a_clear_error(minimal_relay, no_leaks,
                                                              read_first, option, value):
    relay = minimal_relay(read_first)
    with pytest.raises(service.NeedsExtendedForm) as raised:
        connect(relay.address, timeout=4.0, **{option: value})
    assert raised.value.option == option
    assert "%s=" % option in str(raised.value) and MINIMAL_ONLY in str(raised.value)
    relay.session_ends()   # registered (or not): either way, left
    assert len(relay.sessions) == 1, "no second dial for a registration that cannot be"


@pytest.mark.parametrize("option, value", [
    ("port", 8081), ("proxy_protocol", "v2"), ("secret", b"s3cret"),
    ("allow_clients", ["10.0.0.0/8"]), ("group", "web"),
])
def test_minimal_true_with_what_it_cannot_carry_is_a_value_error(no_leaks, option, value):
    options = {option: value}
    if option == "group":
        options["group_key"] = b"k" * 32
    with pytest.raises(ValueError) as raised:
        connect((LOOPBACK, 1), minimal=True, **options)   # nothing is dialled
    assert "%s=" % option in str(raised.value)


def test_a_lease_and_a_name_are_dropped_harmlessly(env, minimal_relay):
    relay = minimal_relay(read_first=False)
    connection = env.connect(relay.address, lease="8081-old", name="billing", timeout=4.0)
    assert connection.minimal and connection.address.startswith("127.0.0.1:")


def test_a_server_that_answers_neither_form_is_still_a_timeout(env, no_leaks):
    """Silence to the extended request and to the minimal one: not a relay (or a
    dead one): the timeout, as before, and no session left behind."""
    listener = env.listener()
    held = []

    def hold():
        for _ in range(2):
            sock, _ = listener.accept()
            held.append(sock)   # a muxado session that never answers
    worker = threading.Thread(target=hold, name="silent server")
    worker.start()
    try:
        with pytest.raises(socket.timeout) as raised:
            connect(listener.getsockname(), timeout=0.5)
        assert "neither the extended nor the minimal form" in str(raised.value)
    finally:
        worker.join(TIMEOUT)
        for sock in held:
            sock.close()


def test_relay_server_remembers_a_minimal_relay_across_reconnects(env, minimal_relay, caplog):
    relay = minimal_relay(read_first=True)
    server = env.server(relay.address, None, timeout=4.0)
    serving = env.serve(server, reconnect=True)
    assert server.minimal
    assert relay.requests.get(timeout=TIMEOUT)[0] == "aborted"
    assert relay.requests.get(timeout=TIMEOUT) == b""
    relay.sessions[1].close()   # the relay goes away; the server dials again
    assert relay.requests.get(timeout=TIMEOUT) == b"", "straight to the minimal form"
    assert len(minimal_warnings(caplog)) == 1
    serving.stop()


# -- our own relay, asked for the minimal form -----------------------------------------------

def test_our_relay_takes_minimal_true(env):
    relay = env.relay(ports=1)
    connection = env.connect(relay.server_address, minimal=True)
    assert connection.minimal and connection.lease is None
    assert connection.address == "127.0.0.1:%d" % relay.pool.ports[0]
    env.assert_reaches(relay.pool.ports[0], connection, b"minimal")


def test_our_relay_with_a_secret_refuses_minimal_true(env):
    relay = env.relay(ports=1, secret=b"s3cret")
    with pytest.raises(service.RegistrationRefused):
        connect(relay.server_address, minimal=True, timeout=TIMEOUT)


@pytest.mark.parametrize("answer, address, port", [
    (b"127.0.0.1:8081", "127.0.0.1:8081", 8081),
    (b"[::1]:8081", "[::1]:8081", 8081),
    (b"relay.example:9000\n", "relay.example:9000", 9000),
])
def test_the_minimal_reply_parsed(answer, address, port):
    reply = registration.parse_minimal_reply(answer)
    assert reply == {"status": "ok", "address": address, "port": port}


@pytest.mark.parametrize("answer", [b"127.0.0.1", b"host:0", b"\xff:1", b"a b:1", b"::1:80"])
def test_a_minimal_reply_that_is_no_address(answer):
    with pytest.raises(registration.RegistrationError):
        registration.parse_minimal_reply(answer)


# -- Go's bin-v2-relay and our programs ------------------------------------------------------

class GoRelay(object):
    """``bin-v2-relay`` on 127.0.0.1: a service port and three public ports."""

    def __init__(self, seed_handshake=False):
        ports = free_port_range(4)
        self.port, self.public = ports[0], ports[1:]
        self._log = tempfile.TemporaryFile()
        environ = dict(os.environ, RELAY_HOST=LOOPBACK)
        if seed_handshake:
            environ["V2RELAY_SEED_HANDSHAKE"] = "1"
        self.popen = subprocess.Popen([GO_RELAY, str(self.port), str(ports[1]), str(ports[-1])],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=self._log, env=environ)
        wait_until(lambda: "listening for services" in self.log() or self.popen.poll() is not None,
                   what="bin-v2-relay to listen")
        assert self.popen.poll() is None, self.log()

    def log(self):
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def close(self):
        if self.popen.poll() is None:
            self.popen.terminate()
        self.popen.wait(TIMEOUT)
        self._log.close()


@pytest.fixture
def go_relay():
    relays = []

    def make(seed_handshake=False):
        relay = GoRelay(seed_handshake)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


def registered_port(process, relay):
    line = process.readline()
    host, _, port = line.rpartition(":")
    assert host == LOOPBACK and int(port) in relay.public, line
    return int(port)


@needs_go_relay
@pytest.mark.parametrize("seed_handshake", [False, True])
def test_echoserver_against_the_go_relay(procs, go_relay, seed_handshake):
    relay = go_relay(seed_handshake)
    echo = procs.start("tcprelay.echoserver", LOOPBACK, relay.port, *QUICK_GRACE)
    port = registered_port(echo, relay)
    assert echoed(port)
    warnings = [l for l in echo.stderr_lines() if "WARNING" in l and MINIMAL_ONLY in l]
    assert len(warnings) == 1, echo.stderr_text()
    assert_no_traceback(echo)
    # One registration; a request given up was reset, so took no port. (The
    # relay may log its registration after the reply.)
    log = wait_until(lambda: " registered " in relay.log() and relay.log(),
                     what="bin-v2-relay to log the registration")
    assert log.count(" registered ") == 1 and "registration reply" not in log, log


class EchoBackend(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(TIMEOUT)
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture
def echo_backend():
    """A plain TCP echo server on 127.0.0.1: its (host, port)."""
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), EchoBackend)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="echo backend")
    thread.start()
    yield server.server_address
    server.shutdown()
    thread.join(TIMEOUT)
    server.server_close()


@needs_go_relay
def test_adapter_against_the_go_relay(procs, go_relay, echo_backend):
    relay = go_relay()
    adapter = procs.start("tcprelay.adapter", LOOPBACK, relay.port, "%s:%d" % echo_backend,
                          *QUICK_GRACE)
    assert echoed(registered_port(adapter, relay), b"through the Go relay and back")
    assert_no_traceback(adapter)


@needs_go_relay
def test_minimal_flag_against_the_go_relay(procs, go_relay):
    """One session, an empty request, no grace spent and no warning."""
    relay = go_relay()
    echo = procs.start("tcprelay.echoserver", LOOPBACK, relay.port, "--minimal")
    assert echoed(registered_port(echo, relay))
    log = wait_until(lambda: " registered " in relay.log() and relay.log(),
                     what="bin-v2-relay to log the registration")
    assert log.count("registered (request 0 bytes)") == 1, log
    assert "registration reply" not in log and "back in the pool" not in log, log
    assert MINIMAL_ONLY not in echo.stderr_text()
    assert_no_traceback(echo)


@needs_go_relay
@pytest.mark.parametrize("module, args, named", [
    ("tcprelay.echoserver", ["--port", "8081"], "--port"),
    ("tcprelay.adapter", ["127.0.0.1:9", "--proxy-protocol", "v1"], "--proxy-protocol"),
    ("tcprelay.echoserver", ["--secret-file", "SECRET"], "--secret-file"),
    ("tcprelay.echoserver", [], "$TCPRELAY_SECRET"),
])
def test_go_relay_with_what_only_the_extended_form_carries(procs, go_relay, tmp_path,
                                                           module, args, named):
    relay = go_relay()
    secret = tmp_path / "secret"
    secret.write_bytes(b"a secret of enough length\n")
    os.chmod(str(secret), 0o600)
    args = [str(secret) if a == "SECRET" else a for a in args]
    kw = {"secret_env": "a secret of enough length"} if named.startswith("$") else {}
    process = procs.start(module, LOOPBACK, relay.port, *(args + QUICKER_GRACE), **kw)
    line = assert_clean_exit(process, 1, "%s: the relay at" % module)
    assert MINIMAL_ONLY in line and "cannot carry %s" % named in line, line


@pytest.mark.parametrize("module, args, named", [
    ("tcprelay.echoserver", ["--port", "8081"], "--port"),
    ("tcprelay.adapter", ["127.0.0.1:9", "--proxy-protocol", "v2"], "--proxy-protocol"),
])
def test_minimal_flag_with_what_it_cannot_carry_is_a_usage_error(module, args, named):
    run = MainRun(module, [LOOPBACK, "1", "--minimal"] + args)
    assert run.wait() == 2
    assert "%s needs the extended registration form" % named in run.stderr_text()
