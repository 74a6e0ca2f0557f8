"""Hostile peers: each ends its own session cleanly, with the code Go would use.

A raw socket (conftest.RawPeer) plays the hostile peer against a Python
session; the GOAWAY it reads back is what a Go peer would have been told.
Nothing else may be harmed: other streams and sessions keep working, no
thread raises uncaught, and threads and file descriptors return to baseline.
"""

import logging
import random
import socket
import struct
import threading
import time

import pytest

import fuzzing
from helpers.basics import TIMEOUT, LeakCheck
from helpers.relay import recv_exact, recv_to_eof
from helpers.sessions import SessionPair
from tcprelay import muxado, writer
from tcprelay.frames import (
    DEFAULT_WINDOW, FIN, GOAWAY_DEBUG_LIMIT, MAX_WINDOW, PAD_FRAME, SYN, encode_data,
    encode_goaway, encode_header, encode_rst, encode_unknown, encode_wndinc,
)
from tcprelay.muxado import Data, ErrorCode, GoAway, Rst, Unknown, WndInc

QUIET = 0.25        # a bounded wait that must time out to prove "nothing was sent"
FLOOD = (100, 1.0)  # a small flood limit (burst, per second), to keep floods quick


# -- helpers -----------------------------------------------------------------------------

def syn(stream_id, payload=b"", fin=False):
    return encode_data(stream_id, payload, SYN | (FIN if fin else 0))


def with_reserved_bit(frame):
    """The same frame with the top (reserved) bit of its stream id set."""
    frame = bytearray(frame)
    frame[4] |= 0x80
    return bytes(frame)


def accept(session, stream_id=None):
    stream = session.accept(timeout=TIMEOUT)
    stream.settimeout(TIMEOUT)
    if stream_id is not None:
        assert stream.id == stream_id
    return stream


def assert_quiet(peer, wait=QUIET):
    """Nothing arrives from our session within ``wait`` seconds."""
    try:
        with pytest.raises(socket.timeout):
            frame = peer.read_frame(timeout=wait)
            pytest.fail("expected nothing from the session, got %r" % (frame,))
    finally:
        peer.sock.settimeout(TIMEOUT)


def assert_goaway_then_eof(peer, code):
    """Read to EOF: the last frame is our GOAWAY with ``code``; no earlier GOAWAY."""
    got = peer.read_until_eof()
    assert got, "the session closed without GOAWAY"
    goaway = got[-1]
    assert isinstance(goaway, GoAway), got[-3:]
    assert goaway.code == code, goaway[:2] + (goaway.debug[:200],)
    assert not [f for f in got[:-1] if isinstance(f, GoAway)]
    return goaway, got[:-1]


def assert_session_ended(session, code):
    assert session.wait(TIMEOUT), "the session did not end"
    assert session.closed
    assert session.error is not None and session.error.code == code, session.error


def assert_stream_dead(stream, code):
    """Writes fail at once; reads give what was buffered, then fail (never EOF)."""
    with pytest.raises(muxado.SessionClosedError) as info:
        stream.sendall(b"x")
    assert info.value.code == code
    with pytest.raises(muxado.SessionClosedError) as info:
        for _ in range(1000):
            assert stream.recv(65536), "a dead stream read as EOF"
    assert info.value.code == code


def assert_dead_calls(session, stream, code):
    """Every call on the ended session and its streams fails with SessionClosedError(code).

    accept() may still hand out streams that were queued before the end (as
    Go's may); they are dead too.
    """
    for _ in range(200):
        try:
            queued = session.accept(timeout=TIMEOUT)
        except muxado.SessionClosedError as exc:
            assert exc.code == code
            break
        assert_stream_dead(queued, code)
    else:
        pytest.fail("accept() kept returning streams after the session ended")
    with pytest.raises(muxado.SessionClosedError) as info:
        session.open()
    assert info.value.code == code
    if stream is not None:
        assert_stream_dead(stream, code)


def prove_alive(peer, stream_id):
    """A new peer stream is accepted, carries data both ways, and closes."""
    payload = b"probe %d" % stream_id
    peer.send(syn(stream_id, payload, fin=True))
    stream = accept(peer.session, stream_id)
    assert recv_to_eof(stream) == payload
    stream.sendall(b"pong")
    assert peer.read_frame() == Data(stream_id, b"pong")
    stream.close()
    assert peer.read_frame() == Data(stream_id, b"", fin=True)
    assert not peer.session.closed


def bystander_works(pair):
    """An unrelated session pair still carries data."""
    opened, accepted = pair.stream_pair()
    opened.sendall(b"still here")
    opened.close_write()
    assert recv_to_eof(accepted) == b"still here"
    accepted.sendall(b"good")
    accepted.close()
    assert recv_to_eof(opened) == b"good"
    opened.close()


class Caller(object):
    """Run ``fn`` in a thread; remember what it returned or raised."""

    def __init__(self, fn, name, barrier=None):
        self.fn = fn
        self.barrier = barrier
        self.started = threading.Event()
        self.outcome = None
        self.thread = threading.Thread(target=self._run, name=name)
        self.thread.daemon = True

    def _run(self):
        if self.barrier is not None:
            self.barrier.wait()
        self.started.set()
        try:
            self.outcome = ("returned", self.fn())
        except BaseException as exc:   # whatever it was, the test judges it
            self.outcome = ("raised", exc)

    def start(self):
        self.thread.start()
        return self

    def join(self, timeout=TIMEOUT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "%s is still blocked" % self.thread.name
        return self.outcome

    def raised(self, kind, code=None, timeout=TIMEOUT):
        outcome = self.join(timeout)
        assert outcome[0] == "raised", "%s returned %r" % (self.thread.name, outcome[1])
        exc = outcome[1]
        assert isinstance(exc, kind), "%s raised %r" % (self.thread.name, exc)
        if code is not None:
            assert exc.code == code, "%s raised %r" % (self.thread.name, exc)
        return exc


@pytest.fixture(autouse=True)
def no_thread_failures(caplog):
    """No session thread may fail: no uncaught exception, no 'thread failed' log."""
    caught = []
    previous = getattr(threading, "excepthook", None)
    if previous is not None:   # 3.8+
        threading.excepthook = caught.append
    caplog.set_level(logging.INFO, logger="tcprelay")
    try:
        yield caught
    finally:
        if previous is not None:
            threading.excepthook = previous
    assert not caught, "uncaught in threads: %r" % [(a.thread, a.exc_value) for a in caught]
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    failures = [r.getMessage() for r in records
                if r.levelno >= logging.ERROR or "thread failed" in r.getMessage()]
    assert not failures, failures


# -- truncated frames --------------------------------------------------------------------

TRUNCATED = {
    "header": syn(3, b"hello")[:5],
    "data-body": syn(3, b"x" * 100)[:58],
    "rst-body": encode_rst(1, ErrorCode.STREAM_CANCELLED)[:10],
    "wndinc-body": encode_wndinc(1, 1000)[:9],
    "goaway-fixed": encode_goaway(0, ErrorCode.NO_ERROR, b"bye")[:13],
    "goaway-debug": encode_goaway(0, ErrorCode.NO_ERROR, b"bye" * 10)[:20],
    "unknown-body": encode_unknown(7, 0, 0, b"z" * 50)[:20],
}


@pytest.mark.parametrize("cut", sorted(TRUNCATED))
def test_eof_inside_a_frame_ends_the_session(raw_peer, sessions, cut):
    peer = raw_peer()
    peer.send(syn(1))
    stream = accept(peer.session, 1)
    reader = Caller(lambda: stream.recv(10), "blocked-recv").start()
    assert reader.started.wait(TIMEOUT)
    peer.send(TRUNCATED[cut])
    peer.sock.shutdown(socket.SHUT_WR)     # EOF mid-frame; we can still read

    goaway, before = assert_goaway_then_eof(peer, ErrorCode.PEER_EOF)
    assert before == []
    assert_session_ended(peer.session, ErrorCode.PEER_EOF)
    reader.raised(muxado.SessionClosedError, ErrorCode.PEER_EOF)
    assert_dead_calls(peer.session, stream, ErrorCode.PEER_EOF)
    bystander_works(sessions)


def _frame_sequence():
    """Frames of every kind, and where each one starts."""
    parts = [
        syn(1, b"first"),
        encode_wndinc(1, 1000),
        encode_goaway(0, 0x1234, b"draining, but go on"),
        PAD_FRAME,
        encode_unknown(9, 0, 0, b"skip me"),
        encode_data(1, b"second", FIN),
    ]
    starts = []
    pos = 0
    for part in parts:
        starts.append(pos)
        pos += len(part)
    return b"".join(parts), starts


SEQUENCE, STARTS = _frame_sequence()
CUTS = {
    "data-header": STARTS[0] + 3,
    "data-body": STARTS[0] + 10,
    "wndinc-header": STARTS[1] + 7,
    "wndinc-body": STARTS[1] + 10,
    "goaway-fixed": STARTS[2] + 12,
    "goaway-debug": STARTS[2] + 20,
    "unknown-body": STARTS[4] + 11,
    "fin-header": STARTS[5] + 1,
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_frame_waits_for_the_rest(raw_peer, cut):
    peer = raw_peer()
    at = CUTS[cut]
    peer.send(SEQUENCE[:at])
    assert_quiet(peer)                     # no GOAWAY, no RST: it is waiting
    assert not peer.session.wait(0)
    peer.send(SEQUENCE[at:])

    stream = accept(peer.session, 1)
    assert recv_to_eof(stream) == b"firstsecond"
    assert peer.session.remote_goaway == (0, 0x1234, b"draining, but go on")
    stream.sendall(b"reply")               # the peer's WNDINC did no harm
    assert peer.read_frame() == Data(1, b"reply")
    stream.close()
    assert peer.read_frame() == Data(1, b"", fin=True)
    prove_alive(peer, 3)


# -- protocol errors that end the session -----------------------------------------------

@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "queued"])
def test_duplicate_syn_ends_the_session_and_wakes_readers(raw_peer, sessions, accepted):
    peer = raw_peer()
    peer.send(syn(1))
    if accepted:
        stream = accept(peer.session, 1)
        reader = Caller(lambda: stream.recv(10), "blocked-recv").start()
        assert reader.started.wait(TIMEOUT)
    peer.send(syn(1, b"again"))

    goaway, before = assert_goaway_then_eof(peer, ErrorCode.PROTOCOL_ERROR)
    assert before == []
    assert goaway.last_stream_id == 1
    assert_session_ended(peer.session, ErrorCode.PROTOCOL_ERROR)
    if accepted:
        reader.raised(muxado.SessionClosedError, ErrorCode.PROTOCOL_ERROR)
        assert_dead_calls(peer.session, stream, ErrorCode.PROTOCOL_ERROR)
    bystander_works(sessions)


RESERVED = {
    "syn": with_reserved_bit(syn(3, b"hi")),
    "data": with_reserved_bit(encode_data(1, b"hi")),
    "fin": with_reserved_bit(encode_data(1, b"", FIN)),
    "rst": with_reserved_bit(encode_rst(1, ErrorCode.STREAM_CANCELLED)),
    "wndinc": with_reserved_bit(encode_wndinc(1, 100)),
    "goaway": with_reserved_bit(encode_goaway(0, ErrorCode.NO_ERROR, b"x")),
    "unknown": with_reserved_bit(encode_unknown(12, 0, 0, b"")),
}


@pytest.mark.parametrize("kind", sorted(RESERVED))
def test_reserved_stream_id_bit_is_a_protocol_error(raw_peer, kind):
    peer = raw_peer()
    peer.send(syn(1))
    stream = accept(peer.session, 1)
    assert struct.unpack(">I", RESERVED[kind][4:8])[0] & 0x80000000
    peer.send(RESERVED[kind])

    goaway, before = assert_goaway_then_eof(peer, ErrorCode.PROTOCOL_ERROR)
    assert before == []
    assert_session_ended(peer.session, ErrorCode.PROTOCOL_ERROR)
    assert_dead_calls(peer.session, stream, ErrorCode.PROTOCOL_ERROR)


# -- stream-level faults: the stream ends, the session lives -----------------------------

def test_wndinc_past_2_31_resets_only_that_stream(raw_peer, sessions):
    peer = raw_peer()
    peer.send(syn(1))
    stream = accept(peer.session, 1)
    # Exactly up to 2^31-1 is allowed. (The data after it arrives once the
    # WNDINC has been handled: frames are handled in order.)
    peer.send(encode_wndinc(1, MAX_WINDOW - DEFAULT_WINDOW) + encode_data(1, b"sync"))
    assert recv_exact(stream, 4) == b"sync"
    stream.sendall(b"abc")
    assert peer.read_frame() == Data(1, b"abc")
    # The window is now 2^31-1 - 3: four more overflows it by one.
    peer.send(encode_wndinc(1, 4))
    assert peer.read_frame() == Rst(1, ErrorCode.FLOW_CONTROL_ERROR)
    with pytest.raises(muxado.StreamResetError) as info:
        stream.sendall(b"more")
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    # The stream is gone: more data on it is answered as for any unknown stream.
    peer.send(encode_data(1, b"late"))
    assert peer.read_frame() == Rst(1, ErrorCode.STREAM_CLOSED)
    prove_alive(peer, 3)
    bystander_works(sessions)


def test_wndinc_overflow_on_our_own_stream(raw_peer):
    peer = raw_peer()
    ours = peer.session.open()
    ours.settimeout(TIMEOUT)
    assert peer.read_frame() == Data(2, b"", syn=True)
    peer.send(encode_wndinc(2, MAX_WINDOW))
    assert peer.read_frame() == Rst(2, ErrorCode.FLOW_CONTROL_ERROR)
    with pytest.raises(muxado.StreamResetError):
        ours.sendall(b"x")
    prove_alive(peer, 1)
    other = peer.session.open()
    other.sendall(b"ok")
    assert peer.read_frame() == Data(4, b"", syn=True)
    assert peer.read_frame() == Data(4, b"ok")
    other.reset()
    assert peer.read_frame() == Rst(4, ErrorCode.STREAM_RESET)


@pytest.mark.parametrize("extra", [0, 1, 4096])
def test_goaway_debug_over_1mib_is_cut_and_stays_in_step(raw_peer, extra):
    peer = raw_peer()
    debug = (bytes(range(256)) * (GOAWAY_DEBUG_LIMIT // 256 + 17))[:GOAWAY_DEBUG_LIMIT + extra]
    peer.send(encode_goaway(7, 0x4242, debug))
    # The peer went away but may still open streams; it needs no pad for us.
    peer.send(syn(1, b"after the goaway", fin=True))

    stream = accept(peer.session, 1)
    assert recv_to_eof(stream) == b"after the goaway"
    last_id, code, kept = peer.session.remote_goaway
    assert (last_id, code) == (7, 0x4242)
    assert len(kept) == GOAWAY_DEBUG_LIMIT
    assert kept == debug[:GOAWAY_DEBUG_LIMIT]
    with pytest.raises(muxado.RemoteGoneAwayError):
        peer.session.open()
    stream.sendall(b"pong")
    assert peer.read_frame() == Data(1, b"pong")
    stream.close()
    assert peer.read_frame() == Data(1, b"", fin=True)
    prove_alive(peer, 3)


# -- limits ------------------------------------------------------------------------------

def test_max_streams_refuses_the_extra_one(raw_peer):
    peer = raw_peer(max_streams=4)
    ids = [1, 3, 5, 7]
    for sid in ids:
        peer.send(syn(sid, b"open %d" % sid))
    streams = [accept(peer.session, sid) for sid in ids]
    peer.send(syn(9, b"one too many"))
    assert peer.read_frame() == Rst(9, ErrorCode.STREAM_REFUSED)
    peer.send(encode_data(9, b"still?"))
    assert peer.read_frame() == Rst(9, ErrorCode.STREAM_CLOSED)

    for sid, stream in zip(ids, streams):      # the first four still work
        assert recv_exact(stream, len(b"open %d" % sid)) == b"open %d" % sid
        stream.sendall(b"ack %d" % sid)
        assert peer.read_frame() == Data(sid, b"ack %d" % sid)

    peer.send(encode_data(1, b"", FIN))        # stream 1 ends both ways
    assert recv_to_eof(streams[0]) == b""
    streams[0].close()
    assert peer.read_frame() == Data(1, b"", fin=True)

    peer.send(syn(11, b"room now"))
    eleven = accept(peer.session, 11)
    assert recv_exact(eleven, 8) == b"room now"
    peer.send(syn(13))                          # four open again: refused
    assert peer.read_frame() == Rst(13, ErrorCode.STREAM_REFUSED)

    peer.send(encode_rst(3, ErrorCode.STREAM_CANCELLED))   # a reset frees a slot too
    with pytest.raises(muxado.StreamResetError):
        streams[1].recv(1)
    peer.send(syn(15, b"x"))
    assert accept(peer.session, 15).recv(1) == b"x"
    assert not peer.session.closed


def test_full_accept_backlog_refuses_and_forgets(raw_peer):
    peer = raw_peer(accept_backlog=2)
    peer.send(syn(1, b"one") + syn(3, b"three") + syn(5, b"five"))
    assert peer.read_frame() == Rst(5, ErrorCode.ACCEPT_QUEUE_FULL)
    peer.send(encode_data(5, b"more"))         # the refused stream does not exist
    assert peer.read_frame() == Rst(5, ErrorCode.STREAM_CLOSED)
    peer.send(encode_wndinc(5, 10) + encode_data(5, b"", FIN))   # ignored
    assert_quiet(peer)

    one = accept(peer.session, 1)
    three = accept(peer.session, 3)
    with pytest.raises(socket.timeout):
        peer.session.accept(timeout=QUIET)
    assert recv_exact(one, 3) == b"one"
    assert recv_exact(three, 5) == b"three"
    prove_alive(peer, 7)                       # the backlog has room again


# -- floods ------------------------------------------------------------------------------

def _open_stream_one(peer):
    peer.send(syn(1))
    return accept(peer.session, 1)


FLOODS = {
    "empty-data": lambda n: encode_data(1, b"") * n,
    "syn-rst": lambda n: b"".join(syn(sid) + encode_rst(sid, ErrorCode.STREAM_CANCELLED)
                                  for sid in range(101, 101 + 2 * n, 2)),
    "unknown-type": lambda n: encode_unknown(11, 0, 0) * n,
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_flood_past_the_limit_is_told_to_calm_down(raw_peer, sessions, kind):
    peer = raw_peer(flood_limit=FLOOD)
    stream = _open_stream_one(peer)
    peer.send(FLOODS[kind](2 * FLOOD[0]))
    goaway, before = assert_goaway_then_eof(peer, ErrorCode.ENHANCE_YOUR_CALM)
    assert before == []
    assert_session_ended(peer.session, ErrorCode.ENHANCE_YOUR_CALM)
    assert_dead_calls(peer.session, stream, ErrorCode.ENHANCE_YOUR_CALM)
    bystander_works(sessions)


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_burst_below_the_flood_limit_is_fine(raw_peer, kind):
    peer = raw_peer(flood_limit=FLOOD)
    stream = _open_stream_one(peer)
    peer.send(FLOODS[kind](FLOOD[0] - 10))
    peer.send(encode_data(1, b"after the burst"))
    assert recv_exact(stream, 15) == b"after the burst"
    # Streams opened and reset at once are not left in the accept queue.
    prove_alive(peer, 1001)
    assert not peer.session.closed


# -- a peer that stops reading -----------------------------------------------------------

def test_peer_that_stops_reading_ends_the_session_with_write_timeout(raw_peer):
    peer = raw_peer(write_timeout=0.5)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    session = peer.session
    stream = session.open()
    stream.settimeout(TIMEOUT)
    assert peer.read_frame() == Data(2, b"", syn=True)
    # A window as big as there is, so only TCP can hold the writer back.
    peer.send(encode_wndinc(2, MAX_WINDOW - DEFAULT_WINDOW))
    peer.send(syn(1))
    other = accept(session, 1)

    chunk = bytes(1 << 20)
    limit = 512   # MiB: far beyond any socket buffers; the writer must fail first

    def write_forever():
        for _ in range(limit):
            stream.sendall(chunk)
        return "wrote %d MiB without blocking" % limit

    began = time.monotonic()
    writer = Caller(write_forever, "writer").start()
    reader = Caller(lambda: other.recv(1), "blocked-recv").start()
    exc = writer.raised(muxado.SessionClosedError, ErrorCode.WRITE_TIMEOUT)
    took = time.monotonic() - began
    assert took < 5.0, "the writer took %.1fs to fail" % took
    assert exc.errno is not None
    assert_session_ended(session, ErrorCode.WRITE_TIMEOUT)
    reader.raised(muxado.SessionClosedError, ErrorCode.WRITE_TIMEOUT)
    assert_dead_calls(session, stream, ErrorCode.WRITE_TIMEOUT)


def test_peer_that_floods_replies_it_never_reads_is_told_to_calm_down(raw_peer, monkeypatch):
    # DATA on an unknown stream is owed an RST each; a peer that sends them
    # faster than it reads the answers must not grow our reply queue forever.
    monkeypatch.setattr(writer, "MAX_QUEUED_REPLIES", 100)
    peer = raw_peer()
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.session._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    flood = encode_data(99, b"x") * 50000

    def send_flood():
        try:
            peer.sock.sendall(flood)
        except OSError:
            pass  # the session gave up on us, as it should

    sender = threading.Thread(target=send_flood)
    sender.start()
    assert_session_ended(peer.session, ErrorCode.ENHANCE_YOUR_CALM)
    assert "replies" in peer.session.error.message
    peer.read_until_eof()   # unblocks the sender
    sender.join(TIMEOUT)
    assert not sender.is_alive()


# -- close() racing everything -----------------------------------------------------------

RACE_JOIN = 3.0     # seconds a racing call may take to end once close() is called


def _close_race(pair, round_no):
    server = pair.server
    opened, accepted = pair.stream_pair()
    barrier = threading.Barrier(5, timeout=TIMEOUT)

    def open_then_recv():
        stream = server.open()
        stream.settimeout(TIMEOUT)
        return stream.recv(1)

    callers = [
        Caller(open_then_recv, "open", barrier),
        Caller(lambda: server.accept(timeout=TIMEOUT), "accept", barrier),
        Caller(lambda: accepted.recv(1), "recv", barrier),
        Caller(lambda: accepted.sendall(bytes(DEFAULT_WINDOW + 1024)), "send", barrier),
    ]
    for caller in callers:
        caller.start()
    barrier.wait()
    if round_no % 3 == 1:
        time.sleep(0.002)        # jitter only: let some calls block first
    close_ours = round_no % 4 != 3
    if close_ours:
        server.close()
    else:
        pair.client.close()      # the peer goes: the calls fail from the reader thread
    for caller in callers:
        # Far less than the calls' own timeouts: a call that was not woken fails here.
        exc = caller.raised(muxado.MuxadoError, timeout=RACE_JOIN)
        assert isinstance(exc, OSError), exc
        if close_ours:
            assert isinstance(exc, muxado.SessionClosedError), (caller.thread.name, exc)
    assert server.wait(TIMEOUT) and pair.client.wait(TIMEOUT)


def test_close_races_open_accept_recv_send(no_leaks):
    began = time.monotonic()
    for round_no in range(100):
        check = LeakCheck()
        pair = SessionPair()
        try:
            _close_race(pair, round_no)
        finally:
            pair.close()
        check.assert_clean()
        assert time.monotonic() - began < 10.0, "round %d: too slow" % round_no


# -- our GOAWAY --------------------------------------------------------------------------

def test_after_our_goaway_new_streams_are_refused_old_ones_work(raw_peer):
    peer = raw_peer()
    peer.send(syn(1, b"before"))
    stream = accept(peer.session, 1)
    peer.session.goaway(ErrorCode.NO_ERROR, b"draining")
    assert peer.read_frame() == GoAway(1, ErrorCode.NO_ERROR, b"draining")
    assert peer.read_frame() == Unknown(15, 0, 0, b"")     # the pad, for Go's reader
    peer.send(syn(3, b"too late"))
    assert peer.read_frame() == Rst(3, ErrorCode.STREAM_REFUSED)
    peer.send(encode_data(1, b" and after", FIN))
    assert recv_to_eof(stream) == b"before and after"
    stream.sendall(b"reply")
    assert peer.read_frame() == Data(1, b"reply")
    stream.close()
    assert peer.read_frame() == Data(1, b"", fin=True)
    assert not peer.session.closed
    # The refused stream was never queued; with nothing left, accept() says why.
    with pytest.raises(muxado.SessionClosedError) as info:
        peer.session.accept(timeout=TIMEOUT)
    assert info.value.code == ErrorCode.NO_ERROR
    assert not peer.session.closed


def test_our_goaway_bytes_on_the_wire(raw_peer):
    peer = raw_peer()
    peer.session.goaway()
    expected = encode_goaway(1, ErrorCode.NO_ERROR, b"") + encode_header(15, 0, 0, 0)
    peer.sock.settimeout(TIMEOUT)
    got = b""
    while len(got) < len(expected):
        data = peer.sock.recv(len(expected) - len(got))
        assert data
        got += data
    assert got == expected
    assert PAD_FRAME == expected[16:]


# -- unknown streams ---------------------------------------------------------------------

@pytest.mark.parametrize("sid", [99, 4, 1], ids=["never-opened", "our-parity", "finished"])
def test_data_on_unknown_stream_is_refused_and_the_rest_ignored(raw_peer, sid):
    peer = raw_peer()
    if sid == 1:
        peer.send(syn(1, b"x", fin=True))
        done = accept(peer.session, 1)
        assert recv_to_eof(done) == b"x"
        done.close()
        assert peer.read_frame() == Data(1, b"", fin=True)
    ignored = (encode_data(sid, b"", FIN)
               + encode_rst(sid, ErrorCode.STREAM_CANCELLED)
               + encode_wndinc(sid, 12345))
    peer.send(ignored)
    assert_quiet(peer)
    # Replies go out in order; if any of the above had one, it would come first.
    peer.send(ignored + encode_data(sid, b"hello?", FIN))
    assert peer.read_frame() == Rst(sid, ErrorCode.STREAM_CLOSED)
    peer.send(encode_data(sid, b"again"))
    assert peer.read_frame() == Rst(sid, ErrorCode.STREAM_CLOSED)
    prove_alive(peer, 101)


BURST = 2000    # more frames than one sendmsg() may carry buffers (IOV_MAX is 1024)


@pytest.mark.parametrize("kind", ["data-on-unknown-stream", "syn-after-our-goaway"])
def test_a_burst_of_refusals_is_answered_in_full(raw_peer, kind):
    """Each frame gets its RST, however many arrive at once; the session lives."""
    peer = raw_peer()
    if kind == "syn-after-our-goaway":
        peer.session.goaway()
        assert peer.read_frame() == GoAway(1, ErrorCode.NO_ERROR, b"")
        assert peer.read_frame() == Unknown(15, 0, 0, b"")
        ids = list(range(1, 2 * BURST, 2))
        code = ErrorCode.STREAM_REFUSED
        peer.send(b"".join(syn(sid, b"x") for sid in ids))
    else:
        ids = [99] * BURST
        code = ErrorCode.STREAM_CLOSED
        peer.send(encode_data(99, b"x") * BURST)
    for i, sid in enumerate(ids):
        frame = peer.read_frame()
        assert frame == Rst(sid, code), "frame %d of %d: %r (session error: %s)" % (
            i, len(ids), frame, peer.session.error)
    assert not peer.session.closed, peer.session.error
    if kind == "data-on-unknown-stream":
        prove_alive(peer, 101)
    else:
        peer.send(encode_data(99, b"still in step"))
        assert peer.read_frame() == Rst(99, ErrorCode.STREAM_CLOSED)


# -- garbage -----------------------------------------------------------------------------

def _random_frame(rng):
    """A frame with a plausible header and random contents; now and then a bad one."""
    ftype = rng.choice([0, 1, 1, 1, 2, 2, 3, rng.randint(4, 15)])
    flags = rng.choice([0, 0, FIN, SYN, SYN | FIN, rng.randint(0, 15)])
    sid = rng.choice([1, 1, 1, 3, 5, 7, 2, 4, rng.randint(0, 40), rng.getrandbits(31)])
    if ftype in (0, 2):
        length = 4 if rng.random() < 0.9 else rng.randint(0, 12)
    elif ftype == 3:
        sid = 0 if rng.random() < 0.9 else sid
        length = rng.choice([8, 8, rng.randint(0, 40)])
    else:
        length = rng.randint(0, 30)
    if rng.random() < 0.05:
        sid |= 0x80000000
    if ftype == 0 and length == 4:
        body = struct.pack(">I", rng.choice([rng.randint(0, 16), rng.getrandbits(32)]))
    else:
        body = bytes(rng.getrandbits(8) for _ in range(length))
    return struct.pack(">II", length << 8 | ftype << 4 | flags, sid) + body


def _valid_frames(rng):
    sid = rng.choice([1, 3, 5])
    parts = [syn(sid, b"hello"), encode_wndinc(sid, 4096), encode_data(sid, b"data" * 5),
             encode_unknown(6, 0, 0, b"ext"), encode_goaway(sid, 0, b"bye"), PAD_FRAME,
             encode_data(sid, b"", FIN), encode_rst(sid, ErrorCode.STREAM_CANCELLED)]
    return b"".join(parts[:rng.randint(2, len(parts))])


def _garbage_cases():
    rng = random.Random(0x6D7578)
    cases = []
    for _ in range(16):
        cases.append(("random-bytes", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 96)))))
    for _ in range(16):
        cases.append(("random-frames",
                      b"".join(_random_frame(rng) for _ in range(rng.randint(1, 8)))))
    for _ in range(16):
        data = bytearray(_valid_frames(rng))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        cases.append(("mutated-frames", bytes(data)))
    return cases


GARBAGE = _garbage_cases()
PROBE_ID = MAX_WINDOW            # the highest odd stream id: never in the garbage


@pytest.mark.parametrize("case", range(len(GARBAGE)),
                         ids=["%s-%d" % (GARBAGE[i][0], i) for i in range(len(GARBAGE))])
def test_garbage_ends_cleanly_or_keeps_working(raw_peer, case):
    """The fuzzer's verdict (fuzzing.analyse, as run_session_case applies it): a frame
    that breaks the rules ends the session by itself with the code the rules name;
    garbage cut off inside a frame ends it at our EOF; garbage in step leaves it
    working (a fresh stream is echoed) unless the model says it may end it."""
    peer = raw_peer()
    session = peer.session
    data = GARBAGE[case][1]
    verdict = fuzzing.analyse(data)
    assert PROBE_ID not in verdict.ids
    allowed = set(verdict.maybe)
    peer.send(data)
    worked = False
    if verdict.fault is not None:
        allowed.add(verdict.fault[1])
        assert session.wait(TIMEOUT), "frame %d breaks the rules (%s) but the session lives" \
            % verdict.fault
    elif not verdict.need:
        # In step: a fresh stream must work, unless the model says the garbage may end it.
        allowed.add(ErrorCode.PEER_EOF)
        peer.send(syn(PROBE_ID, b"probe", fin=True))
        while True:
            try:
                stream = accept(session)
            except muxado.SessionClosedError:
                break
            if stream.id == PROBE_ID:
                assert recv_to_eof(stream) == b"probe"
                stream.sendall(b"pong")
                worked = True
                break
        assert worked or verdict.maybe, "the session ended: %s" % (session.error,)
    else:
        allowed.add(ErrorCode.PEER_EOF)   # cut off inside a frame: only our EOF ends it
    try:
        peer.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass   # the session ended and reset the connection
    assert session.wait(TIMEOUT), "the session did not end at EOF"
    goaway, before = assert_goaway_then_eof(peer, session.error.code)
    assert_session_ended(session, goaway.code)
    if worked:
        assert Data(PROBE_ID, b"pong") in before
        assert goaway.code == ErrorCode.PEER_EOF
    assert goaway.code in allowed, (goaway.code, allowed)
    for frame in before:
        assert isinstance(frame, (Data, Rst, WndInc)), frame
