"""muxado v1 services (Go muxado of 2014) on our relay: the first bytes choose
the protocol, the 2014 registration, the v1 heartbeat, clients relayed within
v1's windows and frame sizes, and a hostile v1 peer ending its session only.

A raw v1 peer (a socket and ``framesv1``) checks the bytes; the real 2014
``bin-orig-echoserver`` from ../shared/go-peers/ checks that it all works
with Go (skipped when that file is absent)."""

import os
import queue
import re
import socket
import subprocess
import threading

import pytest

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, free_port_range, wait_until
from helpers.processes import assert_no_traceback, quick
from helpers.relay import recv_exact, recv_to_eof
from tcprelay import muxadov1
from tcprelay.frames import ErrorCode, FrameHandler
from tcprelay.framesv1 import (
    HEARTBEAT_TYPE, MAX_LENGTH, Data, FrameDecoder, GoAway, Rst, Syn, WndInc, encode_data,
    encode_syn, encode_wndinc,
)

ECHOSERVER = os.path.join(os.path.dirname(ROOT), "shared", "go-peers", "bin-orig-echoserver")
TOKEN = b"\0\0\0\0"


class _Collect(FrameHandler):
    """framesv1 decoder calls as frame values, into a queue."""

    def __init__(self, out):
        self.out = out
        self.decoder = None
        self._payload = bytearray()

    def extension_syn(self, stream_id, flags, priority, stream_type):
        self.out.put(Syn(stream_id, bool(flags & 1), priority, stream_type))

    def data_begin(self, stream_id, flags, length):
        self._payload = bytearray()

    def data_chunk(self, chunk):
        self._payload += chunk

    def data_end(self, stream_id, flags):
        if flags & 2:
            self.out.put(Syn(stream_id, bool(flags & 1)))
        else:
            self.out.put(Data(stream_id, self._payload, bool(flags & 1)))

    def rst(self, stream_id, code):
        self.out.put(Rst(stream_id, code))

    def wndinc(self, stream_id, increment):
        self.out.put(WndInc(stream_id, increment))

    def goaway(self, last_stream_id, code, debug):
        self.out.put(GoAway(last_stream_id, code))


class RawV1Service(object):
    """A muxado v1 service written by hand: sends frames, reads the relay's as values."""

    def __init__(self, relay):
        self.sock = socket.create_connection(relay.server_address[:2], timeout=TIMEOUT)
        self.frames = queue.Queue()
        self._decoder = FrameDecoder(_Collect(self.frames))
        self._thread = threading.Thread(target=self._read, name="raw v1 service")
        self._thread.daemon = True
        self._thread.start()

    def _read(self):
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self._decoder.feed(data)
        except OSError:
            pass
        self.frames.put(None)   # EOF

    def send(self, *frames):
        self.sock.sendall(b"".join(frames))

    def next(self, skip=(WndInc,)):
        """The relay's next frame (None at EOF), skipping window updates by default."""
        while True:
            frame = self.frames.get(timeout=TIMEOUT)
            if not isinstance(frame, skip):
                return frame

    def register(self, heartbeat=True):
        """The 2014 echoserver's opening: SYN 3 (registration), heartbeat SYN 5; the address."""
        self.send(encode_syn(3))
        if heartbeat:
            self.send(encode_syn(5, priority=0x7FFFFFFF, stream_type=HEARTBEAT_TYPE))
        reply = self.next()
        assert isinstance(reply, Data) and reply.stream_id == 3 and not reply.fin, reply
        assert self.next() == Data(3, b"", fin=True)
        return reply.payload.decode("ascii")

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def v1_service(relay_env):
    made = []

    def make(relay):
        service = RawV1Service(relay)
        made.append(service)
        return service
    yield make
    for service in made:
        service.close()


def public_port(address):
    host, port = address.rsplit(":", 1)
    assert host == LOOPBACK
    return int(port)


def test_a_v1_service_registers_without_a_request_and_gets_host_port_then_a_close(
        relay_env, v1_service):
    relay = relay_env.relay(ports=1)
    service = v1_service(relay)
    address = service.register()
    assert public_port(address) in relay.pool
    [link] = relay.services
    assert link.muxado_version == 1 and link.request.minimal
    # The service's own close afterwards (Go's Close(): an empty DATA+FIN) is taken quietly.
    service.send(encode_data(3, b"", fin=True))
    service.send(encode_data(5, TOKEN))
    assert service.next() == Data(5, TOKEN)


def test_heartbeat_tokens_are_echoed_on_their_stream_and_their_window_returned(
        relay_env, v1_service):
    relay = relay_env.relay(ports=1)
    service = v1_service(relay)
    service.register()
    # 9,000 tokens: 36,000 bytes, past half of v1's 64 KiB window both ways
    count = 9000
    service.send(*[encode_data(5, TOKEN)] * count)
    echoed = 0
    granted = 0
    while echoed < count * 4 or not granted:
        frame = service.next(skip=())
        if isinstance(frame, WndInc):
            assert frame.stream_id == 5
            granted += frame.increment
        else:
            assert frame == Data(5, TOKEN)
            echoed += 4
            if echoed % 16384 == 0:
                service.send(encode_wndinc(5, 16384))   # as Go: the echoes are read
    assert echoed == count * 4 and granted >= 32 * 1024


def test_a_client_becomes_a_v1_stream_within_v1_frames_and_windows(relay_env, v1_service):
    relay = relay_env.relay(ports=1)
    service = v1_service(relay)
    port = public_port(service.register())
    client = relay_env.client(port)
    # announced at once with a SYN of its own, on the server's first even id
    assert service.next() == Syn(2)
    upload = bytes(range(256)) * 800   # 200 KiB
    client.sendall(upload)
    got = bytearray()
    while len(got) < 65536:
        frame = service.next()
        assert frame.stream_id == 2 and isinstance(frame, Data) and not frame.fin
        assert len(frame.payload) <= MAX_LENGTH
        got += frame.payload
    assert len(got) == 65536   # v1's window, and not a byte more until it is granted
    service.send(encode_wndinc(2, len(upload)))
    while len(got) < len(upload):
        got += service.next().payload
    assert bytes(got) == upload
    service.send(encode_data(2, b"pong"), encode_data(2, b"", fin=True))
    assert recv_exact(client, 4) == b"pong"
    assert client.recv(10) == b""
    client.shutdown(socket.SHUT_WR)
    assert service.next() == Data(2, b"", fin=True)


def test_a_hostile_frame_ends_that_v1_session_only_with_a_v1_goaway(relay_env, v1_service):
    relay = relay_env.relay(ports=2)
    good = v1_service(relay)
    good_port = public_port(good.register())
    bad = v1_service(relay)
    bad.register()
    bad.send(bytes.fromhex("0000000500000003"))   # PRI: Go v1 does not accept it either
    assert bad.next() == GoAway(5, ErrorCode.PROTOCOL_ERROR)
    assert bad.next() is None
    bad2 = v1_service(relay)
    bad2.register()
    bad2.send(bytes.fromhex("0000000200000003"))  # an RST without its code
    goodbye = bad2.next()
    assert isinstance(goodbye, GoAway) and goodbye.code == ErrorCode.FRAME_SIZE_ERROR
    assert bad2.next() is None
    # the other service is served as before
    client = relay_env.client(good_port)
    assert good.next() == Syn(2)
    client.sendall(b"ping")
    assert good.next() == Data(2, b"ping")


def test_a_second_heartbeat_or_unknown_extension_stream_is_reset_stream_closed(
        relay_env, v1_service):
    relay = relay_env.relay(ports=1)
    service = v1_service(relay)
    service.register()
    service.send(encode_syn(7, priority=0x7FFFFFFF, stream_type=HEARTBEAT_TYPE))
    assert service.next() == Rst(7, ErrorCode.STREAM_CLOSED)
    service.send(encode_syn(9, stream_type=0xFFFFFFFF))
    assert service.next() == Rst(9, ErrorCode.STREAM_CLOSED)
    service.send(encode_data(5, TOKEN))   # the first heartbeat is still answered
    assert service.next() == Data(5, TOKEN)


def test_a_relay_with_a_secret_drops_a_v1_service(relay_env, v1_service):
    relay = relay_env.relay(ports=1, secret=b"s3cret")
    service = v1_service(relay)
    service.send(encode_syn(3), encode_syn(5, priority=0x7FFFFFFF, stream_type=HEARTBEAT_TYPE))
    goodbye = service.next()
    assert isinstance(goodbye, GoAway) and goodbye.code == ErrorCode.NO_ERROR
    assert service.next() is None
    assert not relay.services or all(link.request is None for link in relay.services)


class EchoServer2014(object):
    """bin-orig-echoserver HOST PORT, its stdout lines in a queue."""

    def __init__(self, address):
        self.process = subprocess.Popen(
            [ECHOSERVER, address[0], str(address[1])], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="echoserver output")
        self._thread.daemon = True
        self._thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def line(self, pattern):
        """The first line matching ``pattern`` (lines before it are passed over)."""
        while True:
            line = self.lines.get(timeout=TIMEOUT)
            assert line is not None, "echoserver ended before a line matching %r" % pattern
            match = re.match(pattern, line)
            if match:
                return match

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(TIMEOUT)
        self.process.stdout.close()
        self._thread.join(TIMEOUT)


@pytest.mark.skipif(not os.path.exists(ECHOSERVER),
                    reason="the 2014 Go echoserver not found (%s): ../shared is absent"
                    % ECHOSERVER)
def test_the_2014_echoserver_registers_echoes_padded_and_outlives_its_first_heartbeat(
        relay_env):
    relay = relay_env.relay(ports=1)
    echoserver = EchoServer2014(relay.server_address)
    relay_env.defer(echoserver.stop)
    address = echoserver.line(r"Listening on (\S+)$").group(1)
    client = relay_env.client(public_port(address))
    client.sendall(b"Hello, world\n")
    # the 2014 echo server writes back its whole 256-byte read buffer
    assert recv_exact(client, 256) == b"Hello, world\n" + bytes(243)
    client.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    echoserver.line(r"Closed connection to client$")
    # Its first token comes 3 s after it connected; the echo keeps it up.
    [link] = relay.services
    wait_until(lambda: (muxadov1.heartbeat_of(link._session) is not None
                        and muxadov1.heartbeat_of(link._session).echoed >= 4), timeout=TIMEOUT)
    # and it still serves (a heartbeat fault would have closed its session at once)
    again = relay_env.client(public_port(address))
    again.sendall(b"again")
    assert recv_exact(again, 256) == b"again" + bytes(251)


@pytest.mark.skipif(not os.path.exists(ECHOSERVER),
                    reason="the 2014 Go echoserver not found (%s): ../shared is absent"
                    % ECHOSERVER)
def test_the_readme_transcript_the_2014_echoserver_on_python3_m_tcprelay_relay(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *quick("--ports", "%d-%d" % (ports[1], ports[1])))
    echoserver = EchoServer2014((LOOPBACK, ports[0]))
    try:
        echoserver.line(r"Connected\. Waiting for handshake\.\.\.$")
        assert echoserver.line(r"Listening on (\S+)$").group(1) == "%s:%d" % (LOOPBACK,
                                                                               ports[1])
        client = socket.create_connection((LOOPBACK, ports[1]), timeout=TIMEOUT)
        with client:
            client.sendall(b"Hello, world\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_to_eof(client) == b"Hello, world\n" + bytes(243)
    finally:
        echoserver.stop()
    assert "muxado v1" in relay.stderr_text()
    assert_no_traceback(relay)
