"""Helpers shared by the relay's end-to-end tests.

- ``Service``: a service stand-in that speaks muxado directly, and
  ``Registration`` to read the relay's JSON-line replies; ``RawService``:
  one that speaks frame by frame, nothing read or answered unless the test does,
- small socket/stream helpers that always time out, listeners, echo checks,
- an in-process relay's insides (its links and bridges), the kernel's view of
  its sockets (/proc/net), TLS contexts with the test certificates.

Everything binds to 127.0.0.1 only, and every blocking call has a timeout.
"""

import hashlib
import json
import os
import socket
import struct
import threading
import time

from helpers.basics import DATA_DIR, LOOPBACK, MIB, RESET_ERRORS, TIMEOUT, Worker, wait_until
from tcprelay import frames, muxado, tls


# -- the adapter ---------------------------------------------------------------------------

def fill_until_the_adapter_holds(adapter, client):
    """Upload through ``client`` until ``adapter``'s only bridge holds bytes its
    local service (which never reads) cannot take; then half-close the client
    and wait for the stream's FIN at the adapter. Returns the bridge."""
    def only_bridge():
        with adapter._bridges_lock:
            return next(iter(adapter._bridges), None)
    bridge = wait_until(only_bridge, what="the adapter's bridge")

    def taken():
        """(bytes the adapter holds, bytes it has taken in all)."""
        with bridge._lock:
            held = sum(len(chunk) for chunk in bridge._pending)
        return held, held + bridge.bytes_down

    sent, block = 0, os.urandom(128 * 1024)
    while taken()[0] == 0:
        assert sent < 64 * MIB, "the local service's socket never filled"
        client.sendall(block)
        sent += len(block)
        wait_until(lambda: taken()[1] == sent, what="the upload through the relay")
    client.shutdown(socket.SHUT_WR)   # the relay finishes the stream: FIN
    wait_until(lambda: bridge._service_done, what="the stream's FIN at the adapter")
    return bridge


def listeners(port):
    """The local addresses of TCP sockets in LISTEN state on ``port`` (from /proc/net)."""
    found = []
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":
                continue
            address, _, hexport = fields[1].partition(":")
            if int(hexport, 16) != port:
                continue
            if v6:
                found.append("[%s]" % address)
            else:
                found.append(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def accept_queue(port):
    """Connections waiting in the kernel for ``accept()`` on ``port``'s listener
    (IPv4; the rx_queue of a LISTEN socket in /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 5 and fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("nothing listens on port %d" % port)


# -- sockets and streams --------------------------------------------------------------

def connect_client(port, timeout=TIMEOUT):
    """A TCP client of a public port on 127.0.0.1."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def abort(sock):
    """Close ``sock`` with a TCP reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exact(conn, size, max_chunk=256 * 1024):
    """Exactly ``size`` bytes from a socket or stream (AssertionError at an early EOF).
    Each recv asks for the rest, at most ``max_chunk`` bytes (None: no cap)."""
    data = bytearray()
    while len(data) < size:
        left = size - len(data)
        chunk = conn.recv(left if max_chunk is None else min(left, max_chunk))
        if not chunk:
            raise AssertionError("EOF after %d of %d bytes" % (len(data), size))
        data += chunk
    return bytes(data)


def recv_to_eof(conn):
    """Everything up to EOF from a socket or stream."""
    data = bytearray()
    while True:
        chunk = conn.recv(256 * 1024)
        if not chunk:
            return bytes(data)
        data += chunk


def read_until_end(conn):
    """(data, how) where how is "eof" or the exception that ended the reading."""
    data = bytearray()
    while True:
        try:
            chunk = conn.recv(256 * 1024)
        except (OSError, muxado.MuxadoError) as exc:
            return bytes(data), exc
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def sendall_then(conn, data, after):
    """Send ``data`` then call ``after()`` (close_write or a socket shutdown)."""
    conn.sendall(data)
    after()


def echo_roundtrip(sock, data, half_close=True):
    """Send ``data`` from a thread while reading the same amount back; returns what came."""
    if half_close:
        writer = Worker(sendall_then, sock, data, lambda: sock.shutdown(socket.SHUT_WR))
    else:
        writer = Worker(sock.sendall, data)
    try:
        received = recv_exact(sock, len(data))
    finally:
        writer.finish()
    return received


def echo_handler(stream):
    """An echo service's handler: echo until EOF, then half-close (by closing)."""
    try:
        while True:
            data = stream.recv(256 * 1024)
            if not data:
                break
            stream.sendall(data)
    except (OSError, muxado.MuxadoError):
        pass
    finally:
        stream.close()


def listening_socket(cleanups, backlog=8, receive_buffer=None):
    """A listener on 127.0.0.1, any port, closed by ``cleanups`` (a list of callables).

    ``receive_buffer``: its SO_RCVBUF in bytes, set before it listens (so that
    accepted sockets take little, e.g. to keep part of an upload waiting).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cleanups.append(listener.close)
    if receive_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    listener.bind((LOOPBACK, 0))
    listener.listen(backlog)
    listener.settimeout(TIMEOUT)
    return listener


def digest(data):
    return hashlib.sha256(data).hexdigest()


def checked_echo(port, size):
    """A client sends ``size`` random bytes through ``port`` and gets them all back."""
    client = connect_client(port)
    try:
        data = os.urandom(size)
        got = echo_roundtrip(client, data)
        assert len(got) == len(data) and digest(got) == digest(data)
        assert recv_to_eof(client) == b""
    finally:
        client.close()


class Streamer(object):
    """A client that echoes random blocks of ``block_size`` bytes through ``port``
    until stopped.

    Every byte sent and received is hashed, and each byte received is compared
    with the byte sent at the same offset (``intact``). ``outcome`` (from
    ``finish``): "eof" (a clean end after a half-close), "reset", "cut" (EOF
    in the middle of an echo) or "corrupted". ``started`` is set at the first
    echo back, or at the end.
    """

    def __init__(self, port, block_size=32 * 1024):
        self.block_size = block_size
        self.sock = connect_client(port)
        self.started = threading.Event()
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.intact = True
        self.rounds = 0
        self.ended = False
        self._cond = threading.Condition()
        self.stop = threading.Event()
        self.worker = Worker(self._run, name="streamer")

    def _run(self):
        try:
            while not self.stop.is_set():
                block = os.urandom(self.block_size)
                self.sock.sendall(block)
                self.sent.update(block)
                self.sent_bytes += len(block)
                got = 0
                while got < len(block):
                    chunk = self.sock.recv(len(block) - got)
                    if not chunk:
                        return "cut"
                    if chunk != block[got:got + len(chunk)]:
                        self.intact = False
                        return "corrupted"
                    self.received.update(chunk)
                    self.received_bytes += len(chunk)
                    got += len(chunk)
                with self._cond:
                    self.rounds += 1
                    self._cond.notify_all()
                self.started.set()
            self.sock.shutdown(socket.SHUT_WR)
            return "eof" if recv_to_eof(self.sock) == b"" else "extra bytes"
        except RESET_ERRORS:
            return "reset"
        finally:
            self.started.set()
            self.sock.close()
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def wait_rounds(self, count, timeout=TIMEOUT):
        """Wait until ``count`` echoes have come back."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.rounds < count and not self.ended:
                left = deadline - time.monotonic()
                assert left > 0, "the echo stalled at round %d (wanted %d)" % (self.rounds, count)
                self._cond.wait(left)
            assert self.rounds >= count, "the client ended after %d rounds" % self.rounds

    def more_rounds(self, count=3, timeout=TIMEOUT):
        self.wait_rounds(self.rounds + count, timeout)

    def finish(self, timeout=TIMEOUT):
        self.stop.set()
        return self.worker.finish(timeout)

    def assert_whole(self):
        """Stops the client: it ended cleanly with every byte back, checksums equal."""
        outcome = self.finish()
        assert outcome == "eof", outcome
        assert self.sent_bytes == self.received_bytes > 0
        assert self.sent.hexdigest() == self.received.hexdigest()

    def assert_cut_off(self, outcomes=("reset",)):
        """It was cut off (one of ``outcomes``), and no byte it got was wrong."""
        outcome = self.worker.finish()
        assert outcome in outcomes, outcome
        assert self.intact and self.received_bytes > 0


# -- an in-process relay's insides ---------------------------------------------------------

def link_of(relay, port):
    """The relay's ServiceLink holding ``port`` (to join its thread)."""
    links = [link for link in relay.services if link.port == port]
    assert len(links) == 1, relay.services
    return links[0]


def only_bridge(relay, port):
    link = link_of(relay, port)
    wait_until(lambda: link.client_count == 1, what="the client counted")
    with link._lock:
        return next(iter(link._bridges))


def push_until_stalled(stream, block_size=64 * 1024):
    """Send on a stream or socket until nothing more goes anywhere; what was sent."""
    sent = bytearray()
    block = os.urandom(block_size)
    stream.settimeout(0.5)
    while True:
        try:
            n = stream.send(block)
        except socket.timeout:
            break
        sent += block[:n]
        assert len(sent) < 256 * MIB, "nothing ever pushed back"
    stream.settimeout(TIMEOUT)
    return bytes(sent)


def send_until_it_fails(stream, chunk=b"x" * 65536):
    """Send until the stream fails; the error."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            stream.sendall(chunk)
        except OSError as exc:
            return exc
    raise AssertionError("the stream never failed")


# -- TLS with the test certificates (tests/data) -------------------------------------------

CA = os.path.join(DATA_DIR, "test-ca.pem")
CERT = os.path.join(DATA_DIR, "test-server.pem")
KEY = os.path.join(DATA_DIR, "test-server.key")


def server_tls():
    return tls.server_context(CERT, KEY)


def trusting_tls():
    return tls.client_context(CA)


# -- a service stand-in speaking muxado directly ------------------------------------------

class Registration(object):
    """The service's side of an extended-form registration stream: sends the request
    line, then reads the relay's JSON-line replies with timeouts."""

    def __init__(self, stream, request_bytes):
        self.stream = stream
        stream.settimeout(TIMEOUT)
        self._buffer = bytearray()
        self.eof = False
        if request_bytes:
            stream.sendall(request_bytes)

    def reply(self, timeout=TIMEOUT):
        """The next reply as a dict, or None at EOF."""
        self.stream.settimeout(timeout)
        while b"\n" not in self._buffer:
            if self.eof:
                assert not self._buffer, "reply without a newline: %r" % bytes(self._buffer)
                return None
            chunk = self.stream.recv(65536)
            if not chunk:
                self.eof = True
                continue
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        reply = json.loads(line.decode("utf-8"))
        assert isinstance(reply, dict), reply
        return reply

    def final(self, timeout=TIMEOUT):
        """(waiting notices, final reply), then checks the relay closed the stream."""
        waiting = []
        while True:
            reply = self.reply(timeout)
            assert reply is not None, "the relay closed the stream without a final reply"
            if reply.get("status") != "waiting":
                break
            waiting.append(reply)
        assert self.reply(timeout) is None, "more after the final reply"
        return waiting, reply

    def statuses(self, timeout=TIMEOUT):
        """The status of every reply until the stream ends (EOF, a reset, the session's end)."""
        statuses = []
        while True:
            try:
                reply = self.reply(timeout)
            except (OSError, muxado.MuxadoError):
                return statuses
            if reply is None:
                return statuses
            statuses.append(reply["status"])

    def close(self):
        self.stream.close()


class Service(object):
    """A service stand-in: a muxado client session to the relay, driven by the test."""

    def __init__(self, relay_address, **session_options):
        sock = socket.create_connection(tuple(relay_address[:2]), timeout=TIMEOUT)
        self.session = muxado.client(sock, **session_options)
        self._threads = []
        self._lock = threading.Lock()

    def register_minimal(self, announce=False):
        """The Go-style minimal form: open, write nothing, half-close, read to EOF."""
        stream = self.session.open(announce=announce)
        stream.settimeout(TIMEOUT)
        try:
            stream.close_write()
            return recv_to_eof(stream)
        finally:
            stream.close()

    def register(self, body=None, raw=None):
        """Start an extended-form registration with ``body`` (a dict) or ``raw`` bytes."""
        if raw is None:
            raw = (json.dumps(body if body is not None else {}) + "\n").encode("utf-8")
        return Registration(self.session.open(), raw)

    def register_ok(self, body=None):
        """Register (extended form) and expect an immediate ok; returns the port."""
        registration = self.register(body)
        try:
            waiting, reply = registration.final()
        finally:
            registration.close()
        assert waiting == [] and reply["status"] == "ok", (waiting, reply)
        return reply["port"]

    def accept(self, timeout=TIMEOUT):
        stream = self.session.accept(timeout)
        stream.settimeout(TIMEOUT)
        return stream

    def serve(self, handler=echo_handler):
        """Accept streams until the session ends, each handled in its own thread."""
        self._spawn(self._accept_loop, handler)

    def _accept_loop(self, handler):
        while True:
            try:
                stream = self.session.accept()
            except (OSError, muxado.MuxadoError):
                return
            stream.settimeout(TIMEOUT)
            self._spawn(handler, stream)

    def _spawn(self, fn, *args):
        thread = threading.Thread(target=fn, args=args, name="service stand-in")
        thread.daemon = True
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def close(self):
        self.session.close()
        assert self.session.wait(TIMEOUT)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "service stand-in thread still running"


class RawService(object):
    """A service that speaks muxado frame by frame over a plain socket: no Session,
    so nothing reads or answers unless the test does."""

    def __init__(self, address, sock=None):
        self.sock = sock or socket.create_connection(tuple(address[:2]), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        collector = frames._FrameCollector()
        self.frames = collector.frames
        self._decoder = frames.FrameDecoder(collector)
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def feed(self, data):
        """Decode ``data`` read from the socket elsewhere (b"": the relay closed)."""
        if data:
            self._decoder.feed(data)
        else:
            self.eof = True

    def open(self, stream_id, payload=b"", fin=False):
        self.send(frames.encode_data(stream_id, payload, frames.SYN | (frames.FIN if fin else 0)))

    def read_until(self, predicate, timeout=TIMEOUT):
        """Read frames until ``predicate()`` holds (True) or the relay closes (False)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.eof:
                return False
            left = deadline - time.monotonic()
            assert left > 0, "the relay sent nothing more within %gs; frames: %r" % (
                timeout, self.frames[-10:])
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(256 * 1024)
            except ConnectionResetError:
                data = b""
            self.feed(data)
        return True

    def read_to_eof(self, timeout=TIMEOUT):
        self.read_until(lambda: False, timeout)

    def lines(self, stream_id=3):
        """The JSON lines the relay wrote on ``stream_id`` so far."""
        payload = b"".join(f.payload for f in self.frames
                           if isinstance(f, frames.Data) and f.stream_id == stream_id)
        return [json.loads(line.decode("utf-8")) for line in payload.split(b"\n") if line]

    def close(self):
        self.sock.close()
