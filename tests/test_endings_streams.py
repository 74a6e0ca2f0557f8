"""How streams end, and what the peer is left with (issue "Nothing lost, nothing hung").

- A stream closed while the peer may still send tells the peer, as TCP does:
  with unread data, close() resets it (RST STREAM_CLOSED); without, the FIN
  carries back the window consumed so far, so that the peer's next DATA draws
  RST STREAM_CLOSED. After the peer's FIN a close is a clean FIN.
- ``recv(n, MSG_WAITALL)`` for more than the window returns the window while
  it waits.
- A burst of streams is not refused while each still fits under max_streams.

Real sessions on 127.0.0.1 (``sessions``, ``raw_peer``), a real relay for the
end-to-end cases, and Go's muxado (``bin-muxpeer``) when ../shared is there.
"""

import hashlib
import os
import socket
import subprocess
import threading

import pytest

from helpers.basics import LOOPBACK, MIB, RESET_ERRORS, ROOT, TIMEOUT, Worker, wait_until
from helpers.relay import link_of, recv_exact
from helpers.sessions import frames_until, pattern, raw_open
from tcprelay import frames, muxado
from tcprelay.muxado import Data, ErrorCode, Rst, SessionClosedError, StreamResetError, WndInc


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


WINDOW = 256 * 1024
PROMPTLY = 5.0          # a reset that takes longer than this has not come "promptly"
MUXPEER = os.path.join(os.path.dirname(ROOT), "shared", "go-peers", "bin-muxpeer")


def marker_after(peer, frames_of_stream):
    """Frames of ``frames_of_stream`` up to a marker stream's SYN (orders everything before it)."""
    marker = peer.session.open()
    got = frames_until(peer, lambda f: isinstance(f, Data) and f.stream_id == marker.id)
    marker.close()
    return [f for f in got if getattr(f, "stream_id", None) == frames_of_stream]


def fill_window(opened, accepted, size=4 * MIB):
    """The opener starts a ``size`` upload; returns its worker once ``accepted`` holds
    a whole window unread (the opener is then out of window)."""
    uploader = Worker(opened.sendall, pattern(size))
    assert accepted.recv(WINDOW, socket.MSG_PEEK | socket.MSG_WAITALL) == pattern(WINDOW)
    return uploader


def raises_reset_promptly(worker):
    with pytest.raises(StreamResetError) as info:
        worker.finish(PROMPTLY)
    return info.value


# -- close with unread data: the peer learns, as over TCP -----------------------------------

def test_close_with_unread_data_resets_a_peer_blocked_for_window(sessions):
    opened, accepted = sessions.stream_pair()
    uploader = fill_window(opened, accepted)
    assert accepted.recv(10) == pattern(10)
    accepted.close()
    error = raises_reset_promptly(uploader)
    assert error.code == ErrorCode.STREAM_CLOSED     # as Go answers data after its Close()
    # Our side is closed, not reset: its calls say so.
    with pytest.raises(SessionClosedError):
        accepted.recv(1)


def test_close_after_close_write_with_unread_data_still_resets(sessions):
    # RelayServer.shutdown_request: shutdown(SHUT_WR), then close().
    opened, accepted = sessions.stream_pair()
    uploader = fill_window(opened, accepted)
    accepted.sendall(b"reply")
    accepted.shutdown(socket.SHUT_WR)
    assert recv_exact(opened, 5) == b"reply"
    assert opened.recv(1) == b""                      # FIN first...
    accepted.close()
    raises_reset_promptly(uploader)                   # ...then the reset


def test_close_with_unread_data_on_the_wire_is_rst_stream_closed(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1, b"unread")
    accepted.recv(1, socket.MSG_PEEK)                 # it has arrived
    accepted.close()
    assert marker_after(peer, 1) == [Rst(1, ErrorCode.STREAM_CLOSED)]
    # Data still in flight then is answered the same way.
    peer.send(frames.encode_data(1, b"late"))
    assert frames_until(peer, lambda f: isinstance(f, Rst))[-1] == Rst(1, ErrorCode.STREAM_CLOSED)


def test_close_without_unread_data_returns_the_window_with_the_fin(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1, pattern(100 * 1024))
    assert recv_exact(accepted, 100 * 1024) == pattern(100 * 1024)   # below the WNDINC batch
    accepted.close()
    assert marker_after(peer, 1) == [Data(1, b"", fin=True), WndInc(1, 100 * 1024)]
    # The peer's next DATA draws RST STREAM_CLOSED.
    peer.send(frames.encode_data(1, b"more"))
    assert frames_until(peer, lambda f: isinstance(f, Rst))[-1] == Rst(1, ErrorCode.STREAM_CLOSED)


def test_close_without_unread_data_the_peer_is_not_stuck(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(pattern(100 * 1024))
    assert recv_exact(accepted, 100 * 1024) == pattern(100 * 1024)
    accepted.close()
    assert opened.recv(1) == b""
    # More than the window the peer had left: it is told, not left waiting.
    raises_reset_promptly(Worker(opened.sendall, pattern(4 * WINDOW)))


def test_close_after_the_peers_fin_is_a_clean_fin(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1, b"request", fin=True)   # nothing more can come
    accepted.recv(1, socket.MSG_PEEK)
    accepted.sendall(b"reply")
    accepted.close()                                      # "request" left unread
    assert marker_after(peer, 1) == [Data(1, b"reply"), Data(1, b"", fin=True)]


def test_close_after_the_peers_fin_between_sessions(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"request")
    opened.close_write()
    assert accepted.recv(1) == b"r"
    assert accepted.recv(100, socket.MSG_PEEK | socket.MSG_WAITALL) == b"equest"   # FIN seen
    accepted.sendall(b"reply")
    accepted.close()
    assert recv_exact(opened, 5) == b"reply"
    assert opened.recv(1) == b""                           # FIN, not a reset


def test_shutdown_rd_then_close_resets_a_peer_still_sending(sessions):
    # SHUT_RD drops what is buffered and what comes after (the peer keeps
    # flowing); the close then gives the FIN, and the peer's next DATA a reset.
    opened, accepted = sessions.stream_pair()

    def upload_for_ever():
        block = pattern(WINDOW)
        while True:
            opened.sendall(block)

    uploader = Worker(upload_for_ever)
    assert accepted.recv(WINDOW, socket.MSG_PEEK | socket.MSG_WAITALL) == pattern(WINDOW)
    accepted.shutdown(socket.SHUT_RD)
    assert accepted.recv(10) == b""
    accepted.close()
    raises_reset_promptly(uploader)


def test_deferred_close_with_a_makefile_resets_too(sessions):
    opened, accepted = sessions.stream_pair()
    uploader = fill_window(opened, accepted)
    reader = accepted.makefile("rb")
    assert reader.read(10) == pattern(10)    # the BufferedReader reads ahead; more stays unread
    accepted.close()                         # deferred: the file still holds the stream
    reader.close()                           # the close completes (on the writer thread)
    raises_reset_promptly(uploader)


def split_frame(stream_id, payload, head):
    """A DATA frame in two pieces: the header with ``head`` bytes, then the rest."""
    frame = frames.encode_data(stream_id, payload)
    return frame[:frames.HEADER_SIZE + head], frame[frames.HEADER_SIZE + head:]


def test_close_in_the_middle_of_a_frame_answers_its_rest_with_rst(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1)
    first, rest = split_frame(1, pattern(64 * 1024), 1000)
    peer.send(first)
    assert recv_exact(accepted, 1000) == pattern(1000)   # nothing unread at the close
    accepted.close()
    assert marker_after(peer, 1) == [Data(1, b"", fin=True), WndInc(1, 1000)]
    peer.send(rest)                                       # dropped: the peer must hear so
    assert frames_until(peer, lambda f: isinstance(f, Rst))[-1] == Rst(1, ErrorCode.STREAM_CLOSED)


def test_data_after_a_local_reset_mid_frame_is_not_read(raw_peer):
    peer = raw_peer()
    accepted = raw_open(peer, 1)
    first, rest = split_frame(1, pattern(64 * 1024), 1000)
    peer.send(first)
    assert recv_exact(accepted, 1000) == pattern(1000)
    accepted.reset()
    peer.send(rest)
    raw_open(peer, 3)                     # the reader has handled the rest by now
    with pytest.raises(StreamResetError):
        accepted.recv(1)


# -- the same through a real relay ------------------------------------------------------------

def test_a_handler_that_returns_with_unread_data_resets_the_client(env):
    """A handler reads 10 bytes, replies and returns while the client is uploading:
    the client is reset, as by a TCP server, and leaves the relay."""
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    handled = threading.Event()
    replied = threading.Event()

    class ShortReader(object):
        def __init__(self, request, client_address, server):
            assert recv_exact(request, 10) == pattern(10)
            request.sendall(b"ok")
            replied.wait(TIMEOUT)              # the client has it (a reset may drop it)
            request.recv(1, socket.MSG_PEEK)   # more has come, and stays unread
            handled.set()

    server = env.server(relay.server_address, ShortReader)
    env.serve(server)
    link = link_of(relay, port)
    client = env.client(port)

    def upload_for_ever():   # socket buffers could hold a fixed amount
        block = pattern(MIB)
        while True:
            client.sendall(block)

    uploader = Worker(upload_for_ever)
    assert recv_exact(client, 2) == b"ok"
    replied.set()
    assert handled.wait(TIMEOUT)
    with pytest.raises(RESET_ERRORS):   # the kernel reports the reset once: here
        uploader.finish(PROMPTLY)
    wait_until(lambda: link.client_count == 0, timeout=PROMPTLY,
               what="the relay to let the client go")


# -- MSG_WAITALL for more than the window ---------------------------------------------------

def test_waitall_for_a_mebibyte_over_a_default_window(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(MIB, seed=3)
    sender = Worker(opened.sendall, data)
    got = Worker(accepted.recv, MIB, socket.MSG_WAITALL).finish(PROMPTLY)
    sender.finish()
    assert len(got) == MIB and got == data
    # The window accounts for what was given back early: the stream carries on.
    more = pattern(3 * WINDOW, seed=4)
    sender = Worker(opened.sendall, more)
    assert recv_exact(accepted, len(more)) == more
    sender.finish()


def test_waitall_after_consuming_less_than_a_window_update(sessions):
    # 100 KiB consumed is below the WNDINC batch: a WAITALL for 200 KiB more
    # must give those back, or only 156 KiB can ever arrive.
    opened, accepted = sessions.stream_pair()
    opened.sendall(pattern(100 * 1024))
    assert recv_exact(accepted, 100 * 1024) == pattern(100 * 1024)
    data = pattern(200 * 1024, seed=5)
    sender = Worker(opened.sendall, data)
    assert Worker(accepted.recv, len(data), socket.MSG_WAITALL).finish(PROMPTLY) == data
    sender.finish()


def test_peek_waitall_for_more_than_the_window_then_read(sessions):
    opened, accepted = sessions.stream_pair()
    data = pattern(MIB, seed=6)
    sender = Worker(opened.sendall, data)
    peeked = Worker(accepted.recv, MIB, socket.MSG_PEEK | socket.MSG_WAITALL).finish(PROMPTLY)
    assert peeked == data
    assert recv_exact(accepted, MIB) == data
    sender.finish()
    # Reading what was granted early grants nothing twice: a second MiB flows.
    more = pattern(MIB, seed=7)
    sender = Worker(opened.sendall, more)
    assert Worker(accepted.recv, MIB, socket.MSG_WAITALL).finish(PROMPTLY) == more
    sender.finish()


def test_waitall_does_not_let_the_peer_exceed_the_window(raw_peer):
    # Granted early only up to what the caller asked for: the peer may have
    # at most max(window, n) buffered, and no more.
    peer = raw_peer()
    accepted = raw_open(peer, 1)
    want = WINDOW + 64 * 1024
    reader = Worker(accepted.recv, want, socket.MSG_WAITALL)
    data = pattern(want, seed=8)
    window, sent, granted = WINDOW, 0, 0
    while sent < want:
        if window <= 0:
            got = peer.read_frame(TIMEOUT)
            assert isinstance(got, WndInc) and got.stream_id == 1, got
            window += got.increment
            granted += got.increment
            continue
        n = min(32 * 1024, window, want - sent)
        peer.send(frames.encode_data(1, data[sent:sent + n]))
        sent += n
        window -= n
    assert reader.finish(PROMPTLY) == data
    assert granted == want - WINDOW              # no more than the caller asked for
    # What was granted early is not granted again: the read gives back one
    # window, and the peer may then buffer a window and not a byte more.
    assert peer.read_frame(TIMEOUT) == WndInc(1, WINDOW)
    for offset in range(0, WINDOW, 32 * 1024):
        peer.send(frames.encode_data(1, data[:32 * 1024]))
    peer.send(frames.encode_data(1, b"!"))
    assert peer.read_frame(TIMEOUT) == Rst(1, ErrorCode.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("how", ["makefile", "recv_into"])
def test_reading_a_mebibyte_by_other_paths(sessions, how):
    # These loop on recv_into, which returns the window as it goes: no hang,
    # kept here so that it stays so.
    opened, accepted = sessions.stream_pair()
    data = pattern(MIB, seed=9)
    sender = Worker(opened.sendall, data)
    if how == "makefile":
        reader = accepted.makefile("rb")
        got = Worker(reader.read, MIB).finish(PROMPTLY)
        reader.close()
    else:
        def read_into():
            buf = bytearray(MIB)
            view = memoryview(buf)
            n = 0
            while n < MIB:
                got = accepted.recv_into(view[n:])
                assert got
                n += got
            return bytes(buf)
        got = Worker(read_into).finish(PROMPTLY)
    sender.finish()
    assert got == data


def test_a_handler_waitall_for_four_mebibytes_through_the_relay(env):
    relay = env.relay(ports=1)
    port = relay.pool.ports[0]
    size = 4 * MIB

    class WaitAll(object):
        def __init__(self, request, client_address, server):
            request.settimeout(PROMPTLY)
            data = request.recv(size, socket.MSG_WAITALL)
            request.sendall(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    server = env.server(relay.server_address, WaitAll)
    env.serve(server)
    client = env.client(port)
    data = pattern(size, seed=10)
    uploader = Worker(client.sendall, data)
    uploader.finish()
    client.shutdown(socket.SHUT_WR)
    reply = recv_exact(client, 7 + 1 + 64)
    assert reply == b"%d %s" % (size, hashlib.sha256(data).hexdigest().encode())


# -- bursts of new streams ------------------------------------------------------------------

BURST = 1000


def test_a_burst_of_a_thousand_streams_is_accepted(sessions):
    # All opened before the first accept: a default server session queues
    # them (each counts against max_streams, its data against its window).
    opened = [sessions.client.open() for _ in range(BURST)]
    for stream in opened:
        stream.sendall(b"x")
        stream.close_write()
    accepted = []
    for _ in range(BURST):
        stream = sessions.server.accept(timeout=TIMEOUT)
        stream.settimeout(TIMEOUT)
        accepted.append(stream)
    assert sorted(s.id for s in accepted) == sorted(s.id for s in opened)
    for stream in accepted:
        assert stream.recv(10, socket.MSG_WAITALL) == b"x"
        stream.sendall(b"y")
        stream.close()
    for stream in opened:
        assert stream.recv(10, socket.MSG_WAITALL) == b"y"   # none was refused
        stream.close()


def test_the_backlog_is_still_a_limit_when_set(raw_peer):
    peer = raw_peer(accept_backlog=2)
    for stream_id in (1, 3, 5):
        peer.send(frames.encode_data(stream_id, b"", frames.SYN))
    assert peer.read_frame() == Rst(5, ErrorCode.ACCEPT_QUEUE_FULL)


@pytest.mark.skipif(not os.path.exists(MUXPEER),
                    reason="Go muxado peer not found (%s): ../shared is absent" % MUXPEER)
def test_a_go_client_bursting_a_thousand_streams_at_a_default_server(no_leaks):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    address = "%s:%d" % listener.getsockname()
    env = dict(os.environ, TIMEOUT="20")
    go = subprocess.Popen([MUXPEER, "dial", address, str(BURST), "0"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        sock, _ = listener.accept()
    finally:
        listener.close()
    session = muxado.server(sock)

    def serve():
        served = 0
        while True:
            try:
                stream = session.accept(timeout=TIMEOUT)
            except (socket.timeout, muxado.MuxadoError):
                return served
            stream.settimeout(TIMEOUT)
            with stream:
                while stream.recv(65536):
                    pass
            served += 1

    server = Worker(serve)
    try:
        out, err = go.communicate(timeout=30)
    finally:
        if go.poll() is None:
            go.kill()
            go.wait(TIMEOUT)
        session.close()
    served = server.finish()
    assert go.returncode == 0, (out, err[-2000:])
    assert b"failures 0" in out, out
    assert served == BURST


def test_a_reset_while_the_first_frame_is_being_written_reaches_the_peer(raw_peer):
    # One thread writes a lazily announced stream's first frame (its SYN)
    # into a full socket; another resets the stream meanwhile. The peer has
    # heard of the stream, so it must get the RST, or it keeps the stream
    # open until the session ends. (A regression the review of the signal
    # work caught: the SYN was marked sent only after the write.)
    peer = raw_peer(client=True)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.session._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = peer.session.open(announce=False)
    stream.settimeout(TIMEOUT)
    writer = threading.Thread(target=stream.sendall, args=(b"x" * 65536,), name="writer")
    writer.start()
    try:
        wait_until(peer.session._writer.lock.locked)   # the SYN frame, stuck in a full socket
        stream.reset(wait=False)
        seen = []
        while True:
            frame = peer.read_frame()
            assert frame is not None, "EOF before the RST; frames: %r" % seen[:5]
            seen.append(type(frame).__name__)
            if isinstance(frame, frames.Rst):
                assert frame.stream_id == stream.id
                break
    finally:
        writer.join(TIMEOUT)
    assert not writer.is_alive()
