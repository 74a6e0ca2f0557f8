"""Streams as sockets and files, flow control, isolation and threads, over loopback.

Every test runs real muxado sessions on 127.0.0.1 (``sessions``, ``make_pair``)
or a session against a hand-driven peer (``raw_peer``) that sees the frames on
the wire. Every blocking call is bounded: streams carry timeouts, threads are
joined with ``TIMEOUT``, frames are read with a timeout.
"""

import errno
import io
import socket
import threading
import time

import pytest

from helpers.basics import TIMEOUT, Worker, tcp_pair
from helpers.relay import recv_exact
from helpers.sessions import SessionPair, frames_until, pattern, raw_open
from tcprelay import frames, muxado
from tcprelay.muxado import (
    Data, ErrorCode, MuxadoError, SessionClosedError, StreamClosedError, StreamResetError,
    WndInc,
)

WINDOW = 256 * 1024
MIB = 1 << 20


# -- helpers -----------------------------------------------------------------------------

def times_out(call, *args):
    """Seconds ``call(*args)`` took to raise socket.timeout, run in a worker so a
    library that ignored the timeout fails the test instead of hanging it."""
    start = time.monotonic()
    with pytest.raises(socket.timeout):
        Worker(call, *args).finish()
    return time.monotonic() - start


def read_exactly(stream, n):
    """recv_exact asking recv for the whole remainder each time (no cap)."""
    return recv_exact(stream, n, max_chunk=None)


def read_to_eof(stream, size=1 << 20):
    buf = bytearray(size)
    out = bytearray()
    while True:
        n = stream.recv_into(buf)
        if not n:
            return bytes(out)
        out += buf[:n]


@pytest.fixture
def make_pair(no_leaks):
    """SessionPair with options; closed (and leak-checked) after the test."""
    pairs = []

    def make(client_options=None, server_options=None):
        pair = SessionPair(client_options, server_options)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


# -- socket-like methods -------------------------------------------------------------------

def test_recv_zero_returns_empty_without_blocking_or_consuming(sessions):
    opened, accepted = sessions.stream_pair()
    start = time.monotonic()
    assert accepted.recv(0) == b""                   # nothing buffered: still no wait
    assert time.monotonic() - start < 1.0
    opened.sendall(b"abc")
    assert accepted.recv(1) == b"a"
    assert accepted.recv(0) == b""
    assert read_exactly(accepted, 2) == b"bc"
    with pytest.raises(ValueError):
        accepted.recv(-1)


def test_recv_into_honours_nbytes_and_slices(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"abcdefghij")
    buf = bytearray(b"." * 10)
    assert accepted.recv_into(buf, 3) == 3
    assert buf == b"abc......."
    view = memoryview(buf)[5:]
    got = 0
    while got < 5:
        got += accepted.recv_into(view[got:])
    assert buf == b"abc..defgh"
    small = bytearray(2)
    assert accepted.recv_into(small, 0) == 2             # nbytes=0 means len(buffer)
    assert small == b"ij"
    assert accepted.recv_into(bytearray(0)) == 0
    opened.close_write()
    assert accepted.recv_into(bytearray(8)) == 0          # EOF


def test_partial_recv_of_a_big_chunk_keeps_the_rest_in_order(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(200000)
    opened.sendall(data)                                  # one 200000-byte frame
    opened.close_write()
    got = bytearray()
    for _ in range(5):
        chunk = accepted.recv(1)
        assert len(chunk) == 1
        got += chunk
    chunk = accepted.recv(1000)
    assert 1 <= len(chunk) <= 1000
    got += chunk
    buf = bytearray(777)
    n = accepted.recv_into(buf)
    assert 1 <= n <= 777
    got += buf[:n]
    got += read_to_eof(accepted)
    assert bytes(got) == data


def test_send_returns_a_count_within_the_window(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(3 * WINDOW + 1234)
    reader = Worker(read_to_eof, accepted)
    view = memoryview(data)
    sent = 0
    counts = []
    while sent < len(data):
        n = opened.send(view[sent:])
        assert 1 <= n <= min(len(data) - sent, WINDOW)
        counts.append(n)
        sent += n
    assert opened.send(b"") == 0
    opened.close_write()
    assert reader.finish() == data
    assert len(counts) >= 4                               # no single send passed the window


def test_sendall_of_several_windows_within_its_timeout(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(5 * WINDOW + 17, seed=3)
    reader = Worker(read_to_eof, accepted)
    opened.settimeout(TIMEOUT)
    assert opened.sendall(data) is None
    opened.close_write()
    assert reader.finish() == data


@pytest.mark.parametrize("how", ["close_write", "shutdown"])
def test_writing_after_close_write_is_a_broken_pipe(sessions, how):
    opened, accepted = sessions.stream_pair()
    if how == "close_write":
        opened.close_write()
    else:
        opened.shutdown(socket.SHUT_WR)
    for attempt in (lambda: opened.send(b"x"), lambda: opened.sendall(b"xyz"),
                    lambda: opened.sendall(b"")):
        with pytest.raises(StreamClosedError) as info:
            attempt()
        assert isinstance(info.value, BrokenPipeError)
        assert isinstance(info.value, MuxadoError)
        assert info.value.errno == errno.EPIPE
    assert accepted.recv(10) == b""
    opened.close_write()                                   # a second half-close is harmless
    # The other direction still works.
    accepted.sendall(b"still open")
    assert read_exactly(opened, 10) == b"still open"


def test_shutdown_rd_returns_eof_and_keeps_the_peer_flowing(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"dropped")
    accepted.shutdown(socket.SHUT_RD)
    assert accepted.recv(100) == b""
    assert accepted.recv_into(bytearray(10)) == 0
    # Data that keeps coming is dropped and its window given back: 4 windows go through.
    opened.sendall(pattern(4 * WINDOW))
    assert accepted.recv(100) == b""
    # Writing is unaffected.
    accepted.sendall(b"reply")
    assert read_exactly(opened, 5) == b"reply"


def test_shutdown_rdwr_sends_fin_and_reads_eof(sessions):
    opened, accepted = sessions.stream_pair()
    accepted.shutdown(socket.SHUT_RDWR)
    assert accepted.recv(10) == b""
    assert opened.recv(10) == b""                          # the peer saw FIN
    with pytest.raises(BrokenPipeError):
        accepted.send(b"x")
    opened.sendall(b"ignored")                            # dropped, not an error
    with pytest.raises(ValueError):
        opened.shutdown(99)


def test_close_twice_sends_one_fin(raw_peer):
    peer = raw_peer(client=True)                           # our session dials
    stream = peer.session.open()
    stream.close()
    stream.close()
    assert stream.closed
    marker = peer.session.open()                           # a frame to order against
    got = frames_until(peer, lambda f: isinstance(f, Data) and f.stream_id == marker.id)
    assert got == [Data(stream.id, b"", syn=True), Data(stream.id, b"", fin=True),
                   Data(marker.id, b"", syn=True)]


def test_use_after_close_is_session_closed_error(sessions):
    opened, accepted = sessions.stream_pair()
    opened.close()
    calls = [lambda: opened.recv(1), lambda: opened.recv_into(bytearray(1)),
             lambda: opened.send(b"x"), lambda: opened.sendall(b"x"),
             lambda: opened.close_write(), lambda: opened.shutdown(socket.SHUT_RD)]
    for call in calls:
        with pytest.raises(SessionClosedError) as info:
            call()
        assert isinstance(info.value, ConnectionAbortedError)
        assert info.value.errno == errno.ECONNABORTED
    opened.close()                                         # still idempotent
    assert accepted.recv(1) == b""


def test_context_manager_closes_and_the_peer_sees_eof(sessions):
    opened, accepted = sessions.stream_pair()
    with opened as entered:
        assert entered is opened
        opened.sendall(b"bye")
    assert opened.closed
    assert read_exactly(accepted, 3) == b"bye"
    assert accepted.recv(10) == b""
    with pytest.raises(SessionClosedError):
        opened.recv(1)


def test_names_and_options_come_from_the_transport(no_leaks):
    dialer, acceptor = tcp_pair()
    dialer_names = (dialer.getsockname(), dialer.getpeername())
    acceptor_names = (acceptor.getsockname(), acceptor.getpeername())
    client = muxado.client(dialer)
    server = muxado.server(acceptor)
    try:
        opened = client.open()
        accepted = server.accept(timeout=TIMEOUT)
        assert opened.session is client and accepted.session is server
        assert opened.id == accepted.id and opened.id % 2 == 1
        assert (opened.getsockname(), opened.getpeername()) == dialer_names
        assert (accepted.getsockname(), accepted.getpeername()) == acceptor_names
        assert opened.getsockname()[0] == "127.0.0.1"
        opened.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        with pytest.raises(OSError):
            opened.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with pytest.raises(OSError):
            opened.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with pytest.raises(io.UnsupportedOperation):
            opened.fileno()
        with pytest.raises(OSError):                       # UnsupportedOperation is an OSError
            accepted.fileno()
    finally:
        client.close()
        server.close()


# -- timeouts ------------------------------------------------------------------------------

def test_recv_timeout_is_honoured_and_the_stream_survives(sessions):
    opened, accepted = sessions.stream_pair()
    accepted.settimeout(0.2)
    assert accepted.gettimeout() == 0.2
    assert 0.18 <= times_out(accepted.recv, 10) < 2.0
    assert 0.18 <= times_out(accepted.recv_into, bytearray(10)) < 2.0
    opened.sendall(b"late")
    accepted.settimeout(TIMEOUT)
    assert read_exactly(accepted, 4) == b"late"
    with pytest.raises(ValueError):
        accepted.settimeout(-1)


def test_fresh_streams_block_by_default(sessions):
    stream = sessions.client.open()
    accepted = sessions.server.accept(timeout=TIMEOUT)
    assert stream.gettimeout() is None and accepted.gettimeout() is None
    stream.close()
    accepted.close()


def test_nonblocking_recv_and_send(raw_peer):
    peer = raw_peer()
    stream = raw_open(peer, 1)
    stream.setblocking(False)
    assert stream.gettimeout() == 0.0
    with pytest.raises(BlockingIOError) as info:
        stream.recv(10)
    assert info.value.errno == errno.EAGAIN
    # Fill the send window (the raw peer grants nothing), then a send would block.
    def drain():
        got = 0
        while got < WINDOW:
            frame = peer.read_frame()
            assert isinstance(frame, Data) and frame.stream_id == 1, frame
            got += len(frame.payload)
        return got

    drainer = Worker(drain)
    sent = 0
    while sent < WINDOW:
        sent += stream.send(b"x" * (WINDOW - sent))
    assert sent == WINDOW
    with pytest.raises(BlockingIOError):
        stream.send(b"y")
    with pytest.raises(BlockingIOError):
        stream.sendall(b"y")
    assert drainer.finish() == WINDOW
    stream.setblocking(True)
    assert stream.gettimeout() is None


def test_sendall_past_a_closed_window_times_out(sessions):
    opened, accepted = sessions.stream_pair()              # nobody reads `accepted`
    opened.settimeout(0.3)
    data = pattern(WINDOW + 50000)
    assert 0.28 <= times_out(opened.sendall, data) < 3.0
    assert 0.28 <= times_out(opened.send, b"more") < 3.0
    # Exactly one window went out; once it is read the rest goes through.
    assert read_exactly(accepted, WINDOW) == data[:WINDOW]
    opened.settimeout(TIMEOUT)
    opened.sendall(data[WINDOW:])
    opened.close_write()
    assert read_to_eof(accepted) == data[WINDOW:]


# -- makefile and file-like use -------------------------------------------------------------

def test_makefile_rb_readline(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"first line\nsecond")
    opened.sendall(b" line\n" + b"x" * 20000 + b"\nlast")
    opened.close_write()
    with accepted.makefile("rb") as f:
        assert f.readline() == b"first line\n"
        assert f.readline() == b"second line\n"
        assert f.readline() == b"x" * 20000 + b"\n"
        assert f.read() == b"last"
        assert f.read() == b""


def test_makefile_wb_with_flush(sessions):
    opened, accepted = sessions.stream_pair()
    f = opened.makefile("wb")
    f.write(b"small ")
    f.write(b"writes")
    f.flush()
    assert read_exactly(accepted, 12) == b"small writes"
    big = pattern(3 * WINDOW)
    reader = Worker(read_exactly, accepted, len(big))
    f.write(big)
    f.flush()
    assert reader.finish() == big
    f.close()
    opened.close()
    assert accepted.recv(10) == b""


def test_makefile_text_mode_with_encoding_and_newline(sessions):
    opened, accepted = sessions.stream_pair()
    writer = opened.makefile("w", encoding="utf-8", newline="\r\n")
    writer.write(u"h\u00e9llo\nw\u00f6rld\n")
    writer.flush()
    assert read_exactly(accepted, 16) == u"h\u00e9llo\r\nw\u00f6rld\r\n".encode("utf-8")
    accepted.sendall(u"\u00e7a\r\nva\nbien".encode("utf-8"))
    accepted.close_write()
    reader = opened.makefile("r", encoding="utf-8")        # newline=None: universal
    assert reader.readline() == u"\u00e7a\n"
    assert reader.readline() == u"va\n"
    assert reader.read() == u"bien"
    raw_lines = accepted.makefile("r", encoding="utf-8", newline="")
    opened.sendall(b"a\r\nb\n")
    opened.shutdown(socket.SHUT_WR)
    assert raw_lines.readline() == u"a\r\n"                # newline="": untranslated
    assert raw_lines.readline() == u"b\n"
    assert raw_lines.readline() == u""
    for f in (writer, reader, raw_lines):
        f.close()


def test_makefile_rwb(sessions):
    opened, accepted = sessions.stream_pair()
    mine = opened.makefile("rwb")
    theirs = accepted.makefile("rwb")
    mine.write(b"ping\n")
    mine.flush()
    assert theirs.readline() == b"ping\n"
    theirs.write(b"pong\n")
    theirs.flush()
    assert mine.readline() == b"pong\n"
    mine.close()
    theirs.close()
    opened.close()
    assert accepted.recv(1) == b""


def test_makefile_unbuffered_is_raw(sessions):
    opened, accepted = sessions.stream_pair()
    raw_out = opened.makefile("wb", buffering=0)
    raw_in = accepted.makefile("rb", buffering=0)
    assert isinstance(raw_in, io.RawIOBase)
    assert raw_out.write(b"abc") == 3                      # straight through, no flush
    got = raw_in.read(10)
    assert 1 <= len(got) <= 3 and b"abc".startswith(got)
    got += read_exactly(accepted, 3 - len(got))
    assert got == b"abc"
    with pytest.raises(ValueError):
        accepted.makefile("r", buffering=0, encoding="utf-8")
    raw_out.close()
    raw_in.close()


def test_makefile_nonblocking_read_returns_none(sessions):
    opened, accepted = sessions.stream_pair()
    accepted.setblocking(False)
    f = accepted.makefile("rb", buffering=0)
    assert f.read(10) is None                              # SocketIO saw errno EAGAIN
    f.close()


def test_makefile_keeps_the_stream_open_until_it_is_closed(sessions):
    opened, accepted = sessions.stream_pair()
    f = accepted.makefile("rwb")
    opened.sendall(b"line1\nline2\n")
    accepted.close()                                       # the file still holds the stream
    assert not accepted.closed
    assert f.readline() == b"line1\n"
    opened.sendall(b"line3\n")                              # still accepted: no RST
    f.write(b"from the file\n")                             # still writable: no FIN sent yet
    f.flush()
    assert read_exactly(opened, 14) == b"from the file\n"
    assert f.readline() == b"line2\n"
    assert f.readline() == b"line3\n"
    f.close()                                              # the last reference: now FIN
    assert opened.recv(10) == b""
    assert accepted.closed


def test_makefile_reader_only_also_holds_the_stream(sessions):
    opened, accepted = sessions.stream_pair()
    f = accepted.makefile("rb")
    accepted.close()
    opened.sendall(b"after close\n")
    assert f.readline() == b"after close\n"
    opened.settimeout(0.2)
    times_out(opened.recv, 1)                              # no EOF while the file is open
    opened.settimeout(TIMEOUT)
    f.close()
    assert opened.recv(1) == b""


def test_buffered_reader_and_text_wrapper_over_a_stream(sessions):
    opened, accepted = sessions.stream_pair()
    assert accepted.readable() and accepted.writable()
    long_line = b"0123456789" * 10000
    opened.sendall(b"alpha\nbeta\n" + long_line + b"\n" + u"\u00fcber\n".encode("utf-8"))
    opened.close_write()
    buffered = io.BufferedReader(accepted)
    assert buffered.readline() == b"alpha\n"
    assert buffered.peek(1)[:1] == b"b"
    text = io.TextIOWrapper(buffered, encoding="utf-8")
    assert text.readline() == u"beta\n"
    assert text.readline() == long_line.decode("ascii") + u"\n"
    assert text.readline() == u"\u00fcber\n"
    assert text.readline() == u""
    text.close()                                           # closes the buffer and the stream
    assert accepted.closed
    with pytest.raises(ValueError):
        accepted.readable()


def test_buffered_reader_read_all(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(3 * WINDOW, seed=9)
    writer = Worker(lambda: (opened.sendall(data), opened.close_write()))
    buffered = io.BufferedReader(accepted)
    assert buffered.read() == data
    writer.finish()
    buffered.close()


def test_file_like_read_write_and_readinto(sessions):
    opened, accepted = sessions.stream_pair()
    assert opened.write(b"hello") == 5
    buf = bytearray(5)
    got = 0
    while got < 5:
        got += accepted.readinto(memoryview(buf)[got:])
    assert buf == b"hello"
    data = pattern(2 * WINDOW + 3)
    writer = Worker(lambda: (opened.sendall(data), opened.close_write()))
    assert accepted.read() == data                         # no size: until EOF
    writer.finish()
    assert accepted.read() == b"" and accepted.read(10) == b""


# -- half-close, SYN+FIN, resets, session end ---------------------------------------------

def test_half_close_both_ways(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"request")
    opened.close_write()
    assert read_exactly(accepted, 7) == b"request"
    assert accepted.recv(10) == b""
    assert accepted.recv(10) == b""                        # EOF stays EOF
    accepted.sendall(b"response")
    accepted.close_write()
    assert read_exactly(opened, 8) == b"response"
    assert opened.recv(10) == b""
    with pytest.raises(BrokenPipeError):
        accepted.send(b"x")
    opened.close()
    accepted.close()
    # The session is still fine for new streams.
    again, again_accepted = sessions.stream_pair()
    again.sendall(b"!")
    assert again_accepted.recv(1) == b"!"


def test_syn_fin_open_between_sessions(sessions):
    opened = sessions.client.open(announce=False)
    opened.settimeout(TIMEOUT)
    opened.close_write()                                    # SYN and FIN together
    accepted = sessions.server.accept(timeout=TIMEOUT)
    accepted.settimeout(TIMEOUT)
    assert accepted.id == opened.id
    assert accepted.recv(10) == b""
    accepted.sendall(b"the acceptor can still write")
    accepted.close()
    assert read_to_eof(opened) == b"the acceptor can still write"


def test_syn_fin_open_on_the_wire(raw_peer):
    peer = raw_peer(client=True)
    opened = peer.session.open(announce=False)
    opened.settimeout(TIMEOUT)
    opened.close_write()
    assert peer.read_frame() == Data(opened.id, b"", fin=True, syn=True)
    peer.send(frames.encode_data(opened.id, b"reply"))
    peer.send(frames.encode_data(opened.id, b"", frames.FIN))
    assert read_to_eof(opened) == b"reply"


def test_syn_fin_from_the_peer_leaves_our_side_writable(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1, b"request", fin=True)
    assert read_to_eof(accepted) == b"request"
    accepted.sendall(b"response")
    accepted.close()
    got = frames_until(peer, lambda f: isinstance(f, Data) and f.fin)
    assert b"".join(f.payload for f in got if isinstance(f, Data)) == b"response"
    assert all(isinstance(f, (Data, WndInc)) and f.stream_id == 1 for f in got)


@pytest.mark.parametrize("wait", [True, False], ids=["reset", "reset-nowait"])
@pytest.mark.parametrize("resetter", ["opener", "acceptor"])
@pytest.mark.parametrize("code", [ErrorCode.STREAM_RESET, ErrorCode.STREAM_CANCELLED,
                                  ErrorCode.REMOTE_GONE_AWAY])
def test_reset_reaches_the_peer(sessions, resetter, code, wait):
    opened, accepted = sessions.stream_pair()
    local, remote = (opened, accepted) if resetter == "opener" else (accepted, opened)
    local.sendall(b"before")
    assert read_exactly(remote, 6) == b"before"
    blocked = Worker(remote.recv, 10)
    local.reset(code, wait=wait)
    with pytest.raises(StreamResetError) as info:
        blocked.finish()
    for error in (info.value,):
        assert error.code == code
        assert error.errno == errno.ECONNRESET
        assert isinstance(error, ConnectionResetError) and isinstance(error, MuxadoError)
    with pytest.raises(StreamResetError) as info:
        remote.send(b"x")
    assert info.value.code == code and info.value.errno == errno.ECONNRESET
    with pytest.raises(ConnectionResetError):
        remote.sendall(b"x")
    # Locally the reset stream is dead too.
    with pytest.raises(StreamResetError):
        local.recv(1)
    local.close()
    remote.close()


def test_reset_with_an_unknown_code_keeps_the_number(sessions):
    opened, accepted = sessions.stream_pair()
    opened.reset(1234)
    with pytest.raises(StreamResetError) as info:
        accepted.recv(1)
    assert info.value.code == 1234


def test_reset_through_a_makefile_raises_not_eagain(sessions):
    # Python 3.6's SocketIO looks at args[0] and 3.7+ at errno for EAGAIN (11);
    # REMOTE_GONE_AWAY is also 11, and must still surface as a reset.
    opened, accepted = sessions.stream_pair()
    f = accepted.makefile("rb", buffering=0)
    opened.reset(ErrorCode.REMOTE_GONE_AWAY)
    with pytest.raises(ConnectionResetError):
        f.read(10)
    f.close()


@pytest.mark.parametrize("who", ["own", "peer"])
def test_session_close_wakes_a_blocked_recv(sessions, who):
    opened, accepted = sessions.stream_pair()
    blocked = Worker(accepted.recv, 10)
    blocked.join(0.1)
    assert blocked.is_alive()                              # it is waiting for data
    (sessions.server if who == "own" else sessions.client).close()
    with pytest.raises(SessionClosedError) as info:
        blocked.finish()
    assert info.value.errno == errno.ECONNABORTED
    assert isinstance(info.value, ConnectionAbortedError)
    assert sessions.server.wait(TIMEOUT)
    with pytest.raises(SessionClosedError):
        accepted.send(b"x")
    with pytest.raises(SessionClosedError):
        accepted.recv(1)
    accepted.close()


@pytest.mark.parametrize("who", ["own", "peer"])
def test_buffered_data_outlives_the_session(sessions, who):
    opened, accepted = sessions.stream_pair()
    fin_open, fin_acc = sessions.stream_pair()
    opened.sendall(b"buffered")
    fin_open.sendall(b"then fin")
    fin_open.close_write()
    # Let both frames arrive: a third stream's data is read after them.
    marker_open, marker_acc = sessions.stream_pair()
    marker_open.sendall(b"m")
    assert marker_acc.recv(1) == b"m"
    (sessions.server if who == "own" else sessions.client).close()
    assert sessions.server.wait(TIMEOUT)
    assert sessions.server.closed
    assert read_exactly(accepted, 8) == b"buffered"
    with pytest.raises(SessionClosedError):
        accepted.recv(1)
    assert read_exactly(fin_acc, 8) == b"then fin"
    assert fin_acc.recv(1) == b""                          # FIN came first: EOF, not an error


# -- session-level calls ---------------------------------------------------------------------

def test_accept_timeout_and_calls_on_an_ended_session(make_pair):
    pair = make_pair()
    assert 0.18 <= times_out(pair.server.accept, 0.2) < 2.0
    blocked = Worker(pair.server.accept, TIMEOUT)
    with pair.client as client:                             # context manager closes it
        assert not client.closed
    assert pair.client.closed
    with pytest.raises(SessionClosedError):
        blocked.finish()
    assert pair.server.wait(TIMEOUT) and pair.server.closed
    with pytest.raises(SessionClosedError):
        pair.server.accept(timeout=TIMEOUT)
    with pytest.raises(SessionClosedError):
        pair.client.open()
    pair.client.close()                                     # idempotent
    pair.client.close()
    assert pair.client.wait(0)


# -- flow control on the wire ---------------------------------------------------------------

@pytest.mark.parametrize("window_size", [WINDOW, 4 * WINDOW])
def test_receiver_batches_window_updates(raw_peer, window_size):
    peer = raw_peer(window_size=window_size)
    total = 4 * window_size
    data = pattern(total, seed=5)
    frame = 16 * 1024
    stream_id = 1
    peer.send(frames.encode_data(stream_id, b"", frames.SYN))
    accepted = peer.session.accept(timeout=TIMEOUT)
    accepted.settimeout(TIMEOUT)

    def consume():
        out = bytearray()
        while len(out) < total:
            chunk = accepted.recv(4096)                  # many small reads
            assert chunk
            out += chunk
        return bytes(out)

    consumer = Worker(consume)
    increments = []
    window = WINDOW                                       # what the raw peer may send
    sent = 0
    while sent < total:
        while window > 0 and sent < total:
            n = min(frame, window, total - sent)
            peer.send(frames.encode_data(stream_id, data[sent:sent + n]))
            sent += n
            window -= n
        while sent < total and window <= 0:
            got = peer.read_frame(TIMEOUT)
            assert isinstance(got, WndInc) and got.stream_id == stream_id, got
            increments.append(got.increment)
            window += got.increment
    assert consumer.finish() == data
    accepted.close()                                      # FIN: orders the last WNDINCs before it
    for got in frames_until(peer, lambda f: isinstance(f, Data)):
        if isinstance(got, WndInc):
            increments.append(got.increment)
        else:
            assert got == Data(stream_id, b"", fin=True)
    early = window_size - WINDOW
    assert sum(increments) <= total + early               # nothing granted that wasn't consumed
    assert sum(increments) >= total + early - window_size // 2
    # Go would send one per read (1000+ here); a batching receiver about two per window.
    assert 1 <= len(increments) <= 2 * (total // window_size) + 1, increments


def test_big_window_is_granted_with_the_syn_on_open(raw_peer):
    peer = raw_peer(window_size=MIB)
    opened = peer.session.open()
    opened.settimeout(TIMEOUT)
    assert peer.read_frame() == Data(opened.id, b"", syn=True)
    assert peer.read_frame() == WndInc(opened.id, MIB - WINDOW)
    # The peer may now put a whole MiB in flight before any further update.
    data = pattern(MIB, seed=1)
    for offset in range(0, MIB, 64 * 1024):
        peer.send(frames.encode_data(opened.id, data[offset:offset + 64 * 1024]))
    assert read_exactly(opened, MIB) == data


@pytest.mark.parametrize("first", ["recv", "send"])
def test_big_window_is_granted_to_an_accepted_stream(raw_peer, first):
    peer = raw_peer(window_size=MIB)
    accepted = raw_open(peer, 1, b"hello")
    if first == "recv":
        assert accepted.recv(5) == b"hello"
        consumed = 5
    else:
        consumed = 0
    accepted.sendall(b"marker")
    accepted.sendall(b"end")          # the grant may ride after the first frame: order on a second
    got = frames_until(peer, lambda f: isinstance(f, Data) and f.payload == b"end")
    assert [f.payload for f in got if isinstance(f, Data)] == [b"marker", b"end"]
    granted = sum(f.increment for f in got if isinstance(f, WndInc))
    assert MIB - WINDOW <= granted <= MIB - WINDOW + consumed
    assert not [f for f in got if not isinstance(f, (Data, WndInc)) or f.stream_id != 1]
    # Everything the peer now believes it may send is really accepted.
    window = WINDOW - 5 + granted
    data = pattern(window, seed=2)
    for offset in range(0, window, 64 * 1024):
        peer.send(frames.encode_data(1, data[offset:offset + 64 * 1024]))
    expected = (b"hello" if first == "send" else b"") + data
    assert read_exactly(accepted, len(expected)) == expected


def test_big_window_grant_rides_with_the_reply_to_a_short_request(raw_peer):
    # A short request and its reply: the early grant goes out in the reply's
    # write, not as a WNDINC of its own before it (one write less per connection).
    peer = raw_peer(window_size=MIB)
    accepted = raw_open(peer, 1, b"ping")
    accepted.settimeout(TIMEOUT)
    assert accepted.recv(4) == b"ping"
    accepted.sendall(b"pong")
    assert peer.read_frame() == Data(1, b"pong")
    assert peer.read_frame() == WndInc(1, MIB - WINDOW)


def test_waitall_for_more_than_the_first_window_gets_the_early_grant(raw_peer):
    # The early grant of a big window waits for the peer to use some of its
    # first one; a MSG_WAITALL read for more than that must not wait for it.
    peer = raw_peer(window_size=MIB)
    accepted = raw_open(peer, 1, b"head")
    accepted.settimeout(TIMEOUT)
    assert accepted.recv(4) == b"head"
    want = WINDOW + 4096                  # more than the peer may send ungranted
    reader = Worker(accepted.recv, want, socket.MSG_WAITALL)
    data = pattern(want, seed=9)
    window = WINDOW - 4
    sent = 0
    while sent < want:
        if window <= 0:
            got = peer.read_frame(TIMEOUT)
            assert isinstance(got, WndInc) and got.stream_id == 1, got
            window += got.increment
            continue
        n = min(64 * 1024, window, want - sent)
        peer.send(frames.encode_data(1, data[sent:sent + n]))
        sent += n
        window -= n
    got = reader.finish()
    assert len(got) == len(data) and got == data


def test_sender_never_exceeds_the_granted_window(raw_peer):
    peer = raw_peer()
    stream = peer.session.open()
    assert peer.read_frame() == Data(stream.id, b"", syn=True)
    stream.settimeout(0.5)
    data = pattern(300000, seed=4)
    # A first small write leaves a window that is not a multiple of any frame size.
    assert stream.send(data[:1000]) == 1000
    sender = Worker(stream.sendall, data[1000:])
    received = bytearray()
    while len(received) < WINDOW:
        got = peer.read_frame()
        assert isinstance(got, Data) and got.stream_id == stream.id and not got.fin, got
        received += got.payload
    assert bytes(received) == data[:WINDOW]
    with pytest.raises(socket.timeout):
        sender.finish()
    # Nothing more was sent before the next frame of the session.
    marker = peer.session.open()
    assert peer.read_frame() == Data(marker.id, b"", syn=True)
    # A grant of 1000 lets exactly 1000 bytes through.
    peer.send(frames.encode_wndinc(stream.id, 1000))
    stream.settimeout(TIMEOUT)
    assert stream.send(b"y" * 5000) == 1000
    assert peer.read_frame() == Data(stream.id, b"y" * 1000)
    stream.settimeout(0.2)
    times_out(stream.send, b"z")
    times_out(stream.sendall, b"z" * 10)
    marker.close()
    assert peer.read_frame() == Data(marker.id, b"", fin=True)


# -- isolation -------------------------------------------------------------------------------

def test_a_stalled_stream_does_not_stall_the_others(sessions):
    a_open, a_acc = sessions.stream_pair()
    b_open, b_acc = sessions.stream_pair()
    # Nobody reads A; its sender fills A's whole window and then blocks.
    a_data = pattern(WINDOW + 100000, seed=6)
    a_open.settimeout(0.3)
    times_out(a_open.sendall, a_data)

    # Meanwhile B carries 10 MiB each way.
    size = 10 * MIB
    up = pattern(size, seed=7)
    down = pattern(size, seed=8)
    start = time.monotonic()
    workers = [
        Worker(lambda: (b_open.sendall(up), b_open.close_write())),
        Worker(lambda: (b_acc.sendall(down), b_acc.close_write())),
        Worker(read_to_eof, b_acc),
        Worker(read_to_eof, b_open),
    ]
    results = [w.finish() for w in workers]
    assert results[2] == up and results[3] == down
    assert time.monotonic() - start < TIMEOUT

    # A holds exactly one window: no more was sent or buffered.
    assert read_exactly(a_acc, WINDOW) == a_data[:WINDOW]
    a_acc.setblocking(False)
    with pytest.raises(BlockingIOError):
        a_acc.recv(1)
    a_acc.settimeout(TIMEOUT)
    # Once read, A moves again.
    a_open.settimeout(TIMEOUT)
    a_open.sendall(a_data[WINDOW:])
    a_open.close_write()
    assert read_to_eof(a_acc) == a_data[WINDOW:]


def test_an_unread_stream_does_not_block_the_reader_thread(raw_peer):
    # The raw peer fills A's window first, then keeps talking on B: the reader
    # thread must go on delivering B while A sits full and unread.
    peer = raw_peer()
    a = raw_open(peer, 1)
    b = raw_open(peer, 3)
    for offset in range(0, WINDOW, 16 * 1024):
        peer.send(frames.encode_data(1, b"a" * 16 * 1024))
    payload = pattern(WINDOW, seed=10)
    for round_ in range(4):
        for offset in range(0, WINDOW, 32 * 1024):
            peer.send(frames.encode_data(3, payload[offset:offset + 32 * 1024]))
        assert read_exactly(b, WINDOW) == payload
        if round_ < 3:
            # Collect B's window updates so the raw peer stays within its window.
            granted = 0
            while granted < WINDOW:
                got = peer.read_frame()
                assert isinstance(got, WndInc) and got.stream_id == 3, got
                granted += got.increment
    assert read_exactly(a, WINDOW) == b"a" * WINDOW


# -- threads -----------------------------------------------------------------------------

def test_reader_thread_is_named_after_the_session_and_ends(make_pair):
    pair = make_pair({"name": "streams-probe-client"})
    names = [t.name for t in threading.enumerate() if t.is_alive()]
    assert any("streams-probe-client" in name for name in names), names
    assert any(pair.server.name in name for name in names), names
    reader_names = []                       # done callbacks run on the reader thread
    pair.client.add_done_callback(
        lambda session: reader_names.append(threading.current_thread().name))
    opened, accepted = pair.stream_pair()
    opened.sendall(b"x")
    assert accepted.recv(1) == b"x"
    pair.client.close()                                   # returns once its threads are done
    assert len(reader_names) == 1 and "streams-probe-client" in reader_names[0], reader_names
    alive = [t.name for t in threading.enumerate()
             if "streams-probe-client" in t.name and t.is_alive()
             and t is not threading.current_thread()]
    assert not alive, alive
    # The peer's session ends on its own: threads gone, socket closed.
    assert pair.server.wait(TIMEOUT)
    for thread in threading.enumerate():
        if pair.server.name in thread.name:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), thread.name


def test_a_session_ended_by_its_peer_closes_its_socket(no_leaks):
    dialer, acceptor = tcp_pair()
    client = muxado.client(dialer)
    server = muxado.server(acceptor)
    try:
        stream = client.open()
        server.accept(timeout=TIMEOUT).close()
        stream.close()
        client.close()
        assert dialer.fileno() == -1
        assert server.wait(TIMEOUT)
        assert acceptor.fileno() == -1
        assert server.closed
    finally:
        client.close()
        server.close()


# -- many streams ---------------------------------------------------------------------------

def test_two_hundred_concurrent_streams_from_eight_threads(make_pair):
    pair = make_pair(server_options={"accept_backlog": 256})
    threads_n, per_thread = 8, 25
    total = threads_n * per_thread

    def echo(stream):
        with stream:
            stream.sendall(read_to_eof(stream, 65536))

    def acceptor():
        handlers = []
        for _ in range(total):
            stream = pair.server.accept(timeout=TIMEOUT)
            stream.settimeout(TIMEOUT)
            handlers.append(Worker(echo, stream))
        for handler in handlers:
            handler.finish()

    def client(t):
        streams = []
        for i in range(per_thread):                      # all open at once
            stream = pair.client.open()
            stream.settimeout(TIMEOUT)
            streams.append(stream)
        payloads = []
        for i, stream in enumerate(streams):
            payload = (b"<%d.%d>" % (t, i)) * (1 + (t * per_thread + i) * 7)
            payloads.append(payload)
            stream.sendall(payload)
            stream.close_write()
        results = []
        for stream, payload in zip(streams, payloads):
            results.append((stream.id, read_to_eof(stream, 65536) == payload))
            stream.close()
        return results

    server = Worker(acceptor)
    clients = [Worker(client, t) for t in range(threads_n)]
    results = [r for c in clients for r in c.finish(2 * TIMEOUT)]
    server.finish()
    assert len(results) == total
    assert len(set(sid for sid, _ in results)) == total
    assert all(ok for _, ok in results)


def test_recv_peek_leaves_the_data_and_waitall_waits_for_all(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"PROXY hello")
    assert accepted.recv(5, socket.MSG_PEEK) == b"PROXY"
    assert accepted.recv(100, socket.MSG_PEEK) == b"PROXY hello"
    assert accepted.recv(6) == b"PROXY "
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        accepted.recv(10, socket.MSG_WAITALL)))
    waiter.start()
    # Five of the ten bytes are there; the rest comes in two more frames.
    opened.sendall(b"12")
    opened.sendall(b"345")
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert got == [b"hello12345"]
    # At EOF, MSG_WAITALL returns what there is.
    opened.sendall(b"tail")
    opened.close_write()
    assert accepted.recv(100, socket.MSG_WAITALL | socket.MSG_PEEK) == b"tail"
    assert accepted.recv(100, socket.MSG_WAITALL) == b"tail"
    assert accepted.recv(100) == b""
    with pytest.raises(ValueError):
        accepted.recv(1, socket.MSG_OOB)
