"""Who reads the session's socket: leader/follower reading.

A thread about to block on a stream reads the socket itself when nobody
else does; the session's reader thread reads whenever no such thread does.
These tests pin down that nothing starves and that, in request/response
traffic, the waiting thread is woken by its own read, not by a handoff.
"""

import socket
import threading

import pytest

from helpers.basics import TIMEOUT, Worker
from helpers.sessions import RawPeer
from tcprelay import muxado
from tcprelay.frames import FIN, SYN, encode_data
from tcprelay.reader import SessionReader


class ReadLog(object):
    """Records which thread ran each socket read of a session."""

    def __init__(self, monkeypatch):
        self.readers = []
        original = SessionReader.read_once
        log = self.readers

        def read_once(session, *args, **kwargs):
            log.append(threading.current_thread().name)
            return original(session, *args, **kwargs)

        monkeypatch.setattr(SessionReader, "read_once", read_once)


class Collector(object):
    """A stream receiver (Stream.set_receiver) that keeps what it gets."""

    def __init__(self):
        self.data = bytearray()
        self.ended = threading.Event()
        self.got = threading.Condition()

    def stream_data(self, data):
        with self.got:
            self.data += data
            self.got.notify_all()
        return len(data)

    def stream_end(self, error):
        self.ended.set()

    def wait_for(self, n):
        with self.got:
            return self.got.wait_for(lambda: len(self.data) >= n, TIMEOUT)


def _ping_pong(opened, accepted, rounds):
    """``rounds`` request/response rounds: this thread pings, an "echoer" thread echoes."""

    def echo():
        while True:
            data = accepted.recv(100)
            if not data:
                return
            accepted.sendall(data)

    echoer = threading.Thread(target=echo, name="echoer")
    echoer.start()
    buf = bytearray(5)
    for _ in range(rounds):
        opened.sendall(b"ping!")
        got = 0
        while got < 5:
            got += opened.recv_into(memoryview(buf)[got:])
        assert buf == b"ping!"
    opened.close_write()
    echoer.join(TIMEOUT)
    assert not echoer.is_alive()


def test_request_response_is_read_by_the_waiting_thread(sessions, monkeypatch):
    reads = ReadLog(monkeypatch)
    opened, accepted = sessions.stream_pair()
    # Not the main thread, which never leads the reads (see below).
    Worker(_ping_pong, opened, accepted, 200, name="pinger").finish()
    # Nearly every read on each side ran in the thread that wanted the data;
    # the reader threads read only at the start and end (SYN, FIN).
    assert reads.readers.count("pinger") >= 190, reads.readers[:20]
    assert reads.readers.count("echoer") >= 190, reads.readers[:20]


def test_the_main_thread_never_reads_for_the_session(sessions, monkeypatch):
    # Signal handlers run in the main thread and may raise at any point
    # (KeyboardInterrupt, an alarm-based timeout): never inside the frames the
    # whole session depends on. So the main thread waits; another thread reads.
    reads = ReadLog(monkeypatch)
    opened, accepted = sessions.stream_pair()
    _ping_pong(opened, accepted, 50)
    assert threading.current_thread() is threading.main_thread()
    assert reads.readers.count(threading.current_thread().name) == 0, reads.readers[:20]
    assert reads.readers.count("echoer") >= 45, reads.readers[:20]


def test_a_leading_thread_delivers_other_streams_data(sessions):
    a_open, a_acc = sessions.stream_pair()
    b_open, b_acc = sessions.stream_pair()
    got_b = []
    # A leads (nothing will come for it for a while); B parks behind it.
    a_reader = threading.Thread(target=lambda: got_b.append(("a", a_acc.recv(10))))
    a_reader.start()
    b_reader = threading.Thread(target=lambda: got_b.append(("b", b_acc.recv(10))))
    b_reader.start()
    b_open.sendall(b"for b")
    b_reader.join(TIMEOUT)
    assert not b_reader.is_alive()
    assert got_b == [("b", b"for b")]
    a_open.sendall(b"for a")
    a_reader.join(TIMEOUT)
    assert not a_reader.is_alive()
    assert got_b[-1] == ("a", b"for a")


def test_reader_thread_takes_over_when_the_leader_leaves(sessions):
    opened, accepted = sessions.stream_pair()
    other_open, other_acc = sessions.stream_pair()
    collector = Collector()
    other_acc.set_receiver(collector)
    # This thread leads once, gets its data and goes away without reading again.
    opened.sendall(b"one")
    assert accepted.recv(10) == b"one"
    # Nobody waits on any stream now: the receiver's data must still arrive.
    other_open.sendall(b"x" * 100000)
    assert collector.wait_for(100000)
    other_open.close_write()
    assert collector.ended.wait(TIMEOUT)


def test_a_leader_with_a_timeout_times_out_and_reading_goes_on(sessions):
    opened, accepted = sessions.stream_pair()
    accepted.settimeout(0.2)
    with pytest.raises(socket.timeout):
        accepted.recv(10)
    collector = Collector()
    other_open, other_acc = sessions.stream_pair()
    other_acc.set_receiver(collector)
    other_open.sendall(b"after the timeout")
    assert collector.wait_for(17)
    accepted.settimeout(TIMEOUT)
    opened.sendall(b"late")
    assert accepted.recv(10) == b"late"


def test_a_stream_that_does_not_lead_leaves_the_reads_to_the_reader_thread(sessions, monkeypatch):
    # A heartbeat-like stream: its thread waits but never offers to read the
    # socket; the session's reader thread reads for it and for the others.
    quiet_open, quiet_acc = sessions.stream_pair()
    busy_open, busy_acc = sessions.stream_pair()
    quiet_acc.set_lead_reads(False)
    collector = Collector()
    busy_acc.set_receiver(collector)
    offers = []
    original = SessionReader.try_lead

    def try_lead(session, stream):
        offers.append(stream)
        return original(session, stream)

    monkeypatch.setattr(SessionReader, "try_lead", try_lead)
    got = []
    waiter = threading.Thread(target=lambda: got.append(quiet_acc.recv(10)), name="quiet")
    waiter.start()
    for i in range(20):
        busy_open.sendall(b"x" * 1000)
        assert collector.wait_for(1000 * (i + 1))
    quiet_open.sendall(b"ping")
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and got == [b"ping"]
    assert quiet_acc not in offers


def test_close_while_a_thread_leads_wakes_it(no_leaks):
    peer = RawPeer()
    try:
        peer.send(encode_data(1, b"", SYN))
        stream = peer.session.accept(timeout=TIMEOUT)
        outcome = []

        def reader():
            try:
                stream.recv(10)
            except muxado.SessionClosedError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        # The reader is now in recv; which thread reads the socket does not matter.
        peer.session.close()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert outcome and isinstance(outcome[0], muxado.SessionClosedError)
    finally:
        peer.close()


def test_a_writer_waiting_for_window_reads_the_update_itself(raw_peer):
    peer = raw_peer()
    peer.send(encode_data(1, b"", SYN))
    stream = peer.session.accept(timeout=TIMEOUT)
    stream.settimeout(TIMEOUT)
    done = threading.Event()

    def writer():
        stream.sendall(b"w" * (256 * 1024 + 10))
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    received = 0
    while received < 256 * 1024:
        frame = peer.read_frame()
        received += len(frame.payload)
    assert not done.is_set()
    peer.send(muxado.WndInc(1, 10).encode())
    thread.join(TIMEOUT)
    assert done.is_set()
    peer.send(encode_data(1, b"", FIN))
