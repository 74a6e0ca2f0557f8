"""Python sessions against the recorded Go muxado traffic, over loopback TCP."""

import binascii
import hashlib
import socket
import struct
import threading

import pytest

from helpers.basics import TIMEOUT, load_vectors
from tcprelay import frames, muxado
from tcprelay.frames import Data, ErrorCode, GoAway, Rst, WndInc, decode_frames, encode_data

VECTORS = load_vectors()
SCENARIOS = {s["name"]: s for s in VECTORS["scenarios"]}
MALFORMED = {m["name"]: m for m in VECTORS["malformed"]}
QUIET = 0.3   # how long "Go sent nothing" is checked for: a bounded read, not a sleep
LARGE_PATTERN = bytes(i % 251 for i in range(300000))


def unhex(text):
    return binascii.unhexlify(text)


def split_frames(data):
    """The raw bytes of each frame, cut on the length field alone (no codec involved)."""
    out = []
    pos = 0
    while pos < len(data):
        word, stream_id = struct.unpack_from(">II", data, pos)
        end = pos + 8 + (word >> 8)
        out.append(((word >> 4) & 0xF, word & 0xF, stream_id, word >> 8, data[pos:end]))
        pos = end
    assert pos == len(data)
    return out


def expected_streams(client_bytes):
    """Per stream id: (payload the server must read, whether FIN ends it), from the
    client's DATA frames; and the ids the client opened (SYN), in order."""
    payloads = {}
    fins = set()
    opened = []
    for frame in decode_frames(client_bytes):
        if not isinstance(frame, Data):
            continue
        if frame.syn:
            opened.append(frame.stream_id)
        payloads.setdefault(frame.stream_id, bytearray()).extend(frame.payload)
        if frame.fin:
            fins.add(frame.stream_id)
    return {sid: (bytes(p), sid in fins) for sid, p in payloads.items()}, opened


class StreamReader(threading.Thread):
    """Reads one stream to its end: FIN, or the error that ended it."""

    def __init__(self, stream):
        threading.Thread.__init__(self, name="reader-%d" % stream.id)
        self.daemon = True
        self.stream = stream
        self.data = bytearray()
        self.ended_by = None

    def run(self):
        try:
            while True:
                chunk = self.stream.recv(65536)
                if not chunk:
                    self.ended_by = "FIN"
                    return
                self.data += chunk
        except Exception as exc:   # the test inspects it
            self.ended_by = exc


def read_stream_to_end(stream):
    reader = StreamReader(stream)
    reader.run()
    return bytes(reader.data), reader.ended_by


class Acceptor(threading.Thread):
    """Accepts ``count`` streams and starts a reader on each."""

    def __init__(self, session, count):
        threading.Thread.__init__(self, name="acceptor")
        self.daemon = True
        self.session = session
        self.count = count
        self.readers = []
        self.error = None

    def run(self):
        try:
            for _ in range(self.count):
                stream = self.session.accept(timeout=TIMEOUT)
                stream.settimeout(TIMEOUT)
                reader = StreamReader(stream)
                self.readers.append(reader)
                reader.start()
        except Exception as exc:
            self.error = exc


def feed_with_flow_control(peer, client_bytes, seen):
    """Send the client's frames as Go's client did: never past the window the
    Python session granted (256 KiB per stream, plus its WNDINC frames)."""
    window = {}
    for ftype, flags, stream_id, length, raw in split_frames(client_bytes):
        if ftype == frames.FrameType.DATA and length:
            window.setdefault(stream_id, frames.DEFAULT_WINDOW)
            while window[stream_id] < length:
                frame = peer.read_frame(TIMEOUT)
                assert frame is not None, "session closed while the client waited for window"
                seen.append(frame)
                if isinstance(frame, WndInc):
                    window[frame.stream_id] = window.get(
                        frame.stream_id, frames.DEFAULT_WINDOW) + frame.increment
            window[stream_id] -= length
        peer.send(raw)


def join(thread):
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "%s did not finish" % thread.name


# -- scenarios: a Python server fed the Go client's bytes ------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_python_server_reads_what_go_server_read(name, raw_peer):
    scenario = SCENARIOS[name]
    client_bytes = unhex(scenario["client_to_server_hex"])
    expected, opened_by_client = expected_streams(client_bytes)
    assert expected, "a scenario without stream data tests nothing"
    peer = raw_peer()
    session = peer.session
    seen = []

    # Streams of the server's parity were opened by Go's server: open them the
    # same way (lazy SYN with its first write) before the client's bytes arrive.
    readers = {}
    go_server_frames = decode_frames(unhex(scenario["server_to_client_hex"]))
    for sid in sorted(s for s in expected if s % 2 == 0):
        stream = session.open(announce=False)
        assert stream.id == sid
        stream.settimeout(TIMEOUT)
        stream.sendall(b"".join(f.payload for f in go_server_frames
                                if isinstance(f, Data) and f.stream_id == sid))
        first = peer.read_frame(TIMEOUT)
        assert first == [f for f in go_server_frames if f.stream_id == sid][0]
        readers[sid] = StreamReader(stream)
        readers[sid].start()

    acceptor = Acceptor(session, len(opened_by_client))
    acceptor.start()
    feed_with_flow_control(peer, client_bytes, seen)
    join(acceptor)
    assert acceptor.error is None
    for reader in acceptor.readers:
        readers[reader.stream.id] = reader
    assert [r.stream.id for r in acceptor.readers] == opened_by_client
    assert sorted(readers) == sorted(expected)

    # Streams the client half-closed read to EOF while the session is alive,
    # even though the client's bytes end with its GOAWAY.
    for sid, (payload, fin) in sorted(expected.items()):
        if fin:
            join(readers[sid])
            assert bytes(readers[sid].data) == payload, "stream %d" % sid
            assert readers[sid].ended_by == "FIN", "stream %d" % sid
    assert not session.closed

    # Now the client's TCP half-close: the rest end with the session, not a FIN.
    peer.sock.shutdown(socket.SHUT_WR)
    seen.extend(peer.read_until_eof())
    assert session.wait(TIMEOUT)
    for sid, (payload, fin) in sorted(expected.items()):
        join(readers[sid])
        assert bytes(readers[sid].data) == payload, "stream %d" % sid
        if not fin:
            assert isinstance(readers[sid].ended_by, muxado.SessionClosedError), (
                "stream %d ended by %r" % (sid, readers[sid].ended_by))
            assert readers[sid].ended_by.code == ErrorCode.PEER_EOF

    # Everything was taken: no stream was refused or reset, and the client's
    # GOAWAY was understood.
    assert not [f for f in seen if isinstance(f, Rst)]
    assert seen and seen[-1] == GoAway(max(opened_by_client or [1]), ErrorCode.PEER_EOF,
                                       b"read EOF from remote peer")
    client_goaway = decode_frames(client_bytes)[-1]
    assert session.remote_goaway == (client_goaway.last_stream_id, ErrorCode.NO_ERROR,
                                     b"no error")


def test_large_write_window_scenario_is_the_documented_pattern():
    # Guards the vector itself: the scenario test compares against this data.
    client_bytes = unhex(SCENARIOS["large-write-window"]["client_to_server_hex"])
    expected, opened = expected_streams(client_bytes)
    assert opened == [3]
    payload, fin = expected[3]
    assert fin and payload == LARGE_PATTERN
    assert hashlib.sha256(payload).hexdigest() == hashlib.sha256(LARGE_PATTERN).hexdigest()
    # more than one window: the feed above had to wait for the session's WNDINC
    assert len(payload) > frames.DEFAULT_WINDOW


def test_python_server_answers_data_after_close_with_rst_as_go_did(raw_peer):
    # reset-after-close, driven in Go's order: the server closes the stream
    # after its first frame, so the client's next DATA gets RST STREAM_CLOSED.
    scenario = SCENARIOS["reset-after-close"]
    first, more, goaway = [f[4] for f in split_frames(unhex(scenario["client_to_server_hex"]))]
    go_answer = decode_frames(unhex(scenario["server_to_client_hex"]))
    peer = raw_peer()
    peer.send(first)
    stream = peer.session.accept(timeout=TIMEOUT)
    # Go's server closed with b"first" unread and still sent FIN; ours resets a
    # stream closed with unread data (as TCP does), so it reads it first.
    stream.settimeout(TIMEOUT)
    assert stream.recv(5) == b"first"
    stream.close()

    def next_frame():   # our FIN gives back the consumed window: skip the WNDINC
        frame = peer.read_frame(TIMEOUT)
        return peer.read_frame(TIMEOUT) if isinstance(frame, WndInc) else frame

    assert next_frame() == go_answer[0]   # the server's FIN
    peer.send(more)
    assert next_frame() == go_answer[1]   # RST(3, STREAM_CLOSED)
    peer.send(goaway)
    peer.sock.shutdown(socket.SHUT_WR)
    assert [f for f in peer.read_until_eof() if not isinstance(f, WndInc)] == [
        GoAway(3, ErrorCode.PEER_EOF, b"read EOF from remote peer")]
    assert peer.session.wait(TIMEOUT)


# -- malformed input: the Python server answers as Go's did ---------------------------


def first_answer(frames_):
    """Go's first frame that is not a window update (those depend on reads and batching)."""
    for frame in frames_:
        if not isinstance(frame, WndInc):
            return frame
    return None


def probe_stream_id(data):
    """An odd stream id above any id in ``data``, for a fresh client stream."""
    used = [f[2] for f in split_frames(data)]
    top = max(used + [1])
    return top + 2 if top % 2 else top + 1


def assert_session_alive(peer, input_bytes, accepted_first=()):
    """A stream opened from the raw side now is accepted (after ``accepted_first``)."""
    sid = probe_stream_id(input_bytes)
    peer.send(encode_data(sid, b"probe", frames.SYN | frames.FIN))
    streams = []
    for want in list(accepted_first) + [sid]:
        # One at a time, so a missing stream fails at once instead of timing out.
        stream = peer.session.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        streams.append(stream)
        assert stream.id == want, "accepted %s, expected %s" % (
            [s.id for s in streams], list(accepted_first) + [sid])
    assert read_stream_to_end(streams[-1]) == (b"probe", "FIN")
    assert not peer.session.closed
    return streams[:-1]


def assert_quiet(peer, allow_wndinc_for=None):
    """Nothing (but window updates) comes back within QUIET seconds."""
    while True:
        try:
            frame = peer.read_frame(QUIET)
        except socket.timeout:
            return
        assert frame is not None, "session closed the connection"
        assert isinstance(frame, WndInc) and frame.stream_id == allow_wndinc_for, frame


def fatal_vectors():
    names = []
    for name, vector in sorted(MALFORMED.items()):
        answer = first_answer(decode_frames(unhex(vector["output_hex"])))
        if isinstance(answer, GoAway) and answer.code != ErrorCode.NO_ERROR:
            names.append(name)
    return names


FATAL = fatal_vectors()
SURVIVABLE = sorted(set(MALFORMED) - set(FATAL))


def test_malformed_vectors_split_into_fatal_and_survivable_as_documented():
    # Guards the parametrisation below against a misread vector file.
    assert FATAL == ["data-stream-zero", "goaway-nonzero-stream", "rst-bad-length",
                     "syn-wrong-parity", "wndinc-zero"]
    for name in FATAL:
        assert MALFORMED[name]["what_go_muxado_does"].startswith(
            ("session ends", "a client may only open odd ids"))


@pytest.mark.parametrize("name", FATAL)
def test_python_server_ends_the_session_as_go_did(name, raw_peer):
    vector = MALFORMED[name]
    input_bytes = unhex(vector["input_hex"])
    go_goaway = first_answer(decode_frames(unhex(vector["output_hex"])))
    peer = raw_peer()
    peer.send(input_bytes)
    frame = peer.read_frame(TIMEOUT)
    assert isinstance(frame, GoAway), frame
    assert frame.code == go_goaway.code
    assert frame.last_stream_id == go_goaway.last_stream_id
    assert frame.debug == go_goaway.debug
    assert peer.read_until_eof() == []
    session = peer.session
    assert session.wait(TIMEOUT)
    assert session.error.code == go_goaway.code

    # What Go's acceptor got: a stream with that data, then the session's end.
    if vector["accepted_stream_data"]:
        stream = session.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        data, ended_by = read_stream_to_end(stream)
        assert data == vector["accepted_stream_data"].encode()
        assert isinstance(ended_by, muxado.SessionClosedError)
        assert ended_by.code == go_goaway.code
    with pytest.raises(muxado.SessionClosedError):
        session.accept(timeout=TIMEOUT)


@pytest.mark.parametrize("name", SURVIVABLE)
def test_python_server_survives_as_go_did(name, raw_peer):
    vector = MALFORMED[name]
    input_bytes = unhex(vector["input_hex"])
    go_output = decode_frames(unhex(vector["output_hex"]))
    go_answer = first_answer(go_output)
    peer = raw_peer()
    session = peer.session
    peer.send(input_bytes)

    accepted_first = ()
    if name == "window-overrun":
        accepted_first = (3,)

    if isinstance(go_answer, Rst):
        frame = peer.read_frame(TIMEOUT)
        assert isinstance(frame, Rst), frame
        assert (frame.stream_id, frame.code) == (go_answer.stream_id, go_answer.code)
    elif go_answer is None and go_output:
        # Go only sent WNDINC, because its acceptor read the stream; read it too.
        assert name == "unknown-type-then-stream"
        stream = session.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        assert read_stream_to_end(stream) == (vector["accepted_stream_data"].encode(), "FIN")
        assert_quiet(peer, allow_wndinc_for=stream.id)
    else:
        assert go_answer is None and not vector["output_hex"], go_answer
        assert_quiet(peer)

    # The session lives: a new stream is accepted, and nothing else was before it.
    earlier = assert_session_alive(peer, input_bytes, accepted_first)

    if name == "window-overrun":
        # Go hands the overrun bytes on; Python drops them and resets the stream.
        with pytest.raises(muxado.StreamResetError) as info:
            earlier[0].recv(1)
        assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    if name == "goaway-from-client":
        # The client's GOAWAY was taken: the server opens no more streams.
        assert session.remote_goaway == (0, ErrorCode.NO_ERROR, b"ok")
        with pytest.raises(muxado.RemoteGoneAwayError):
            session.open()
    assert not session.closed


# -- a Python client sends what Go's client sent ----------------------------------------


def without_wndinc(frames_):
    return [f for f in frames_ if not isinstance(f, WndInc)]


def without_repeated_fin(frames_):
    """Drops an empty FIN on a stream that has already sent FIN.

    Go's Close() after CloseWrite() sends a second FIN; the wire document
    calls it harmless, and a Python client need not copy it.
    """
    out = []
    fin_sent = set()
    for frame in frames_:
        if isinstance(frame, Data) and frame.fin:
            if frame.stream_id in fin_sent and not frame.payload and not frame.syn:
                continue
            fin_sent.add(frame.stream_id)
        out.append(frame)
    return out


def read_until(peer, predicate, into):
    while True:
        frame = peer.read_frame(TIMEOUT)
        assert frame is not None, "session closed early"
        into.append(frame)
        if predicate(frame):
            return


def test_python_client_sends_go_client_frames_for_open_write_halfclose_reply(raw_peer):
    scenario = SCENARIOS["open-write-halfclose-reply"]
    go_client = decode_frames(unhex(scenario["client_to_server_hex"]))
    peer = raw_peer(client=True)
    sent = []

    stream = peer.session.open(announce=False)
    stream.settimeout(TIMEOUT)
    stream.sendall(b"hello")
    stream.close_write()
    read_until(peer, lambda f: isinstance(f, Data) and f.fin, sent)
    # Go's server answered after reading to EOF: replay its bytes.
    peer.send(unhex(scenario["server_to_client_hex"]))
    assert read_stream_to_end(stream) == (b"world", "FIN")
    stream.close()
    peer.session.close()
    sent.extend(peer.read_until_eof())

    # The recording does hold Go's repeated FIN; everything else must match exactly.
    expected = without_repeated_fin(without_wndinc(go_client))
    assert len(expected) == len(without_wndinc(go_client)) - 1
    assert without_repeated_fin(without_wndinc(sent)) == expected
    assert expected[-1] == GoAway(0, ErrorCode.NO_ERROR, b"no error")
    # Any window update goes to the stream and grants no more than was read.
    assert sum(f.increment for f in sent if isinstance(f, WndInc) and f.stream_id == 3) <= 5


def test_python_client_sends_go_client_frames_for_syn_fin_empty(raw_peer):
    scenario = SCENARIOS["syn-fin-empty"]
    go_client = decode_frames(unhex(scenario["client_to_server_hex"]))
    peer = raw_peer(client=True)

    stream = peer.session.open(announce=False)
    stream.close_write()
    peer.session.close()
    sent = peer.read_until_eof()

    assert without_wndinc(sent) == without_wndinc(go_client)
    assert sent[0] == Data(3, b"", fin=True, syn=True)
    assert sent[-1] == GoAway(0, ErrorCode.NO_ERROR, b"no error")
