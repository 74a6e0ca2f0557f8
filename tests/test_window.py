"""The receive window and receive buffer of a stream, on numbers and bytes
(tcprelay/window.py, tcprelay/streambuffer.py): no sockets, no threads."""

import random

import pytest

from tcprelay.frames import DEFAULT_WINDOW
from tcprelay.streambuffer import ReceiveBuffer
from tcprelay.window import EARLY_GRANT_AFTER, ReceiveWindow

BIG = 4 * DEFAULT_WINDOW


def test_a_frame_past_the_window_is_refused_and_takes_nothing():
    window = ReceiveWindow(DEFAULT_WINDOW)
    assert window.admit(DEFAULT_WINDOW - 10)
    assert not window.admit(11)
    assert window.available == 10
    assert window.admit(10)
    assert not window.admit(1)


def test_window_goes_back_in_half_window_batches():
    window = ReceiveWindow(DEFAULT_WINDOW)
    half = DEFAULT_WINDOW // 2
    assert window.admit(DEFAULT_WINDOW)
    assert window.consumed(half - 1, buffered=DEFAULT_WINDOW - half + 1, ended=False) == 0
    assert window.consumed(1, buffered=DEFAULT_WINDOW - half, ended=False) == half
    assert window.available == half
    assert window.unacked == 0


def test_nothing_goes_back_once_the_peer_sends_no_more():
    window = ReceiveWindow(DEFAULT_WINDOW)
    assert window.admit(DEFAULT_WINDOW)
    assert window.consumed(DEFAULT_WINDOW, buffered=0, ended=True) == 0
    assert window.unacked == DEFAULT_WINDOW
    assert window.flush() == DEFAULT_WINDOW      # a FIN going out takes all that is owed
    assert window.flush() == 0


def test_a_big_window_is_granted_early_once():
    window = ReceiveWindow(BIG)
    assert window.available == BIG               # ours already; the peer learns of it later
    assert window.take_grant() == BIG - DEFAULT_WINDOW
    assert window.take_grant() == 0
    window.untake_grant(BIG - DEFAULT_WINDOW)    # its frame never went out
    assert window.take_grant() == BIG - DEFAULT_WINDOW


def test_the_early_grant_waits_for_a_quarter_window_of_traffic():
    window = ReceiveWindow(BIG)
    pending = BIG - DEFAULT_WINDOW
    assert window.admit(EARLY_GRANT_AFTER)
    assert window.consumed(10, buffered=EARLY_GRANT_AFTER - 11, ended=False) == 0
    # consumed + buffered reaches the mark: the early grant goes, with what is owed
    assert window.consumed(1, buffered=EARLY_GRANT_AFTER - 11, ended=False) == 11 + pending
    assert window.grant_pending == 0


def test_settle_due_when_the_batch_is_full_a_grant_is_owed_or_a_read_waits():
    window = ReceiveWindow(DEFAULT_WINDOW)
    half = DEFAULT_WINDOW // 2
    assert not window.settle_due(0, waiting=True)
    assert not window.settle_due(half - 1, waiting=False)
    assert window.settle_due(half, waiting=False)
    assert window.settle_due(1, waiting=True)
    assert ReceiveWindow(BIG).settle_due(1, waiting=False)   # the early grant is owed


def test_a_waitall_read_bigger_than_the_window_gets_window_ahead_of_reading():
    window = ReceiveWindow(DEFAULT_WINDOW)
    want = 3 * DEFAULT_WINDOW
    assert window.admit(DEFAULT_WINDOW)          # all buffered, nothing read
    grant, ahead = window.early_return(want, buffered=DEFAULT_WINDOW, ended=False)
    assert (grant, ahead) == (DEFAULT_WINDOW, DEFAULT_WINDOW)
    assert window.early_return(want, buffered=DEFAULT_WINDOW, ended=True) == (0, 0)
    assert window.grant_while_waiting(want, buffered=DEFAULT_WINDOW, ended=False) == grant
    assert window.available == DEFAULT_WINDOW
    assert window.granted_ahead == DEFAULT_WINDOW
    # reading the bytes granted ahead owes nothing twice
    assert window.consumed(DEFAULT_WINDOW, buffered=0, ended=False) == 0
    assert window.granted_ahead == 0


def test_a_waitall_read_within_the_window_gets_nothing_ahead():
    window = ReceiveWindow(DEFAULT_WINDOW)
    assert window.admit(DEFAULT_WINDOW)
    assert window.early_return(DEFAULT_WINDOW, buffered=DEFAULT_WINDOW, ended=False) == (
        0, 0)


@pytest.mark.parametrize("size", [DEFAULT_WINDOW, BIG])
def test_our_window_and_the_peers_view_of_it_never_part(size):
    # The peer may send what it was granted: 256 KiB at first plus every
    # WNDINC. We must take all of it (available >= what the peer may send)
    # and the buffer must stay bounded; exactly, available = the peer's view
    # plus the early grant not yet sent.
    rng = random.Random(size)
    window = ReceiveWindow(size)
    peer_may_send = DEFAULT_WINDOW
    buffered = 0
    most_wanted = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.4 and peer_may_send:
            n = rng.randint(1, peer_may_send)
            assert window.admit(n)
            peer_may_send -= n
            buffered += n
        elif op < 0.8 and buffered:
            n = rng.randint(1, buffered)
            buffered -= n
            peer_may_send += window.consumed(n, buffered, ended=False)
        elif op < 0.9:
            peer_may_send += window.take_grant()
        else:
            want = rng.randint(1, 3 * size)
            most_wanted = max(most_wanted, want)
            peer_may_send += window.grant_while_waiting(want, buffered, ended=False)
        assert window.available == peer_may_send + window.grant_pending
        # every byte is in flight, buffered, owed back or granted ahead of its reading
        assert (buffered + peer_may_send + window.grant_pending + window.unacked
                - window.granted_ahead) == size
        # and what is granted ahead only lets a waiting read's bytes in
        assert window.granted_ahead <= max(0, most_wanted - size)
    assert not window.admit(window.available + 1)


def _buffer(*chunks):
    buffer = ReceiveBuffer()
    for chunk in chunks:
        buffer.append(chunk)
    return buffer


def test_buffer_copies_across_chunks_from_any_position():
    buffer = _buffer(b"abc", b"defg", b"h")
    assert (buffer.read_pos, buffer.end) == (0, 8)
    assert buffer.copy_out(1, 5, whole=True) == b"bcdef"
    assert buffer.copy_out(1, 100, whole=True) == b"bcdefgh"
    view = bytearray(4)
    assert buffer.copy_into(memoryview(view), 2, 4) == 4
    assert view == b"cdef"
    assert buffer.read_pos == 0                  # copying commits nothing


def test_buffer_hands_a_whole_first_chunk_without_a_copy():
    first = b"x" * 100
    buffer = _buffer(first, b"y")
    assert buffer.copy_out(0, 1000, whole=False) is first
    assert buffer.copy_out(0, 1000, whole=True) == first + b"y"


def test_buffer_drops_read_chunks_lazily_and_knows_what_it_still_holds():
    buffer = _buffer(b"abc", b"def")
    buffer.read_pos = 4
    assert buffer.holds_from(0)                  # nothing dropped yet
    assert buffer.copy_out(4, 2, whole=False) == b"ef"
    assert not buffer.holds_from(0)              # "abc" is gone
    assert buffer.holds_from(3)
    buffer.drop()
    assert buffer.read_pos == buffer.end == 6
    assert not buffer.holds_from(6)


def test_buffer_take_unread_yields_the_rest_from_mid_chunk():
    buffer = _buffer(b"abc", b"def")
    buffer.read_pos = 1
    taken = [(end, bytes(chunk)) for end, chunk in buffer.take_unread()]
    assert taken == [(3, b"bc"), (6, b"def")]
    assert buffer.read_pos == 6
