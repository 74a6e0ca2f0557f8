"""Races between a session's threads found in review (issue 13's split):
each test drives the interleaving by hand, no sleeps."""

import socket
import threading

import pytest

from helpers.basics import TIMEOUT, wait_until
from tcprelay.frames import Data, ErrorCode, Rst


def test_a_stream_the_peer_opens_after_the_session_ended_is_refused(sessions):
    # The reader applies the rest of a chunk after another thread ended the
    # session (a failed write, close()): a SYN in it must not make a stream
    # that nothing will ever end.
    server = sessions.server
    server._die(ErrorCode.SESSION_CLOSED, "transport write failed")   # another thread
    assert server._on_syn(3) is None                                 # the reader, same chunk
    with pytest.raises(OSError) as info:
        server.accept(timeout=TIMEOUT)
    assert not isinstance(info.value, socket.timeout)


def test_a_reset_racing_the_first_frame_of_a_lazily_opened_stream(raw_peer):
    # A stream opened with announce=False is announced by its first frame.
    # A reset while that frame waits for the write lock found the stream
    # unannounced and sent no RST; the frame then went out and opened the
    # stream on the peer for good. Now the frame is dropped instead.
    peer = raw_peer(client=True)
    stream = peer.session.open(announce=False)
    lock = peer.session._writer.lock
    lock.acquire()
    try:
        window = stream._send_window
        sender = threading.Thread(target=stream.sendall, args=(b"hello",))
        sender.start()
        wait_until(lambda: stream._send_window < window, what="the send to take its window")
        stream.reset()
    finally:
        lock.release()
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    peer.session.goaway()      # a frame after, so that reading until it sees all before
    frames = []
    while True:
        frame = peer.read_frame()
        assert frame is not None, "EOF before the GOAWAY"
        if not isinstance(frame, (Data, Rst)):
            break
        frames.append(frame)
    opened = [f for f in frames if isinstance(f, Data) and f.syn]
    resets = [f for f in frames if isinstance(f, Rst) and f.stream_id == stream.id]
    assert not opened or resets, frames


def test_a_finaliser_that_defers_work_inside_the_writers_own_lock_does_not_deadlock(sessions):
    # A makefile() object's finaliser completes its stream's close through
    # the writer thread. The garbage collector may run it anywhere, the
    # writer thread too, while that thread holds its queue's lock.
    writer = sessions.client._writer
    ran = threading.Event()
    outcome = []

    def finaliser_inside_the_lock():
        with writer._control_lock:
            writer.defer_from_finaliser(ran.set)
        outcome.append("returned")

    thread = threading.Thread(target=finaliser_inside_the_lock)
    thread.start()
    thread.join(TIMEOUT)
    assert outcome == ["returned"], "the finaliser deadlocked on the writer's lock"
    assert ran.wait(TIMEOUT), "the deferred work never ran"


def test_a_makefile_object_collected_late_still_closes_its_stream(sessions):
    import gc
    opened, accepted = sessions.stream_pair()
    reader = accepted.makefile("rb")
    accepted.close()                       # pending: the file object holds the stream
    assert not accepted.closed
    cycle = [reader]
    cycle.append(cycle)                    # only the collector can free it
    del reader, cycle
    gc.collect()
    wait_until(lambda: accepted.closed, what="the stream's close to complete")
    assert opened.recv(1) == b""           # the peer sees the FIN
