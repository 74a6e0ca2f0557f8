"""PortPool on its own: the line, leases, cooldown, and grants racing each other.

The pool is given a ``bind`` function; here it binds real listening sockets on
127.0.0.1 (ephemeral ports stand for the pool's public ports), or blocks on an
event where a test needs a bind to be in progress.
"""

import socket
import threading

import pytest

from helpers.basics import TIMEOUT
from tcprelay.portpool import Cancelled, PoolError, PortPool


class Binder(object):
    """Binds 127.0.0.1:0 for whichever pool port is asked for; can hold a bind open."""

    def __init__(self):
        self.calls = []
        self.hold = {}          # port -> Event that bind(port) waits for
        self.started = {}       # port -> Event set once bind(port) has begun
        self.fail = set()       # ports whose bind raises OSError
        self.sockets = []

    def __call__(self, port):
        self.calls.append(port)
        self.started.setdefault(port, threading.Event()).set()
        if port in self.hold:
            assert self.hold[port].wait(TIMEOUT)
        if port in self.fail:
            raise OSError(98, "Address already in use")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        self.sockets.append(sock)
        return sock

    def close(self):
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def binder(no_leaks):
    b = Binder()
    yield b
    b.close()


def grant(ticket, timeout=TIMEOUT):
    granted = ticket.wait(timeout)
    assert granted is not None
    return granted[0]


def wait_in_thread(ticket):
    """``ticket.wait(TIMEOUT)`` on a thread of its own: (the started thread, a list
    that gets the wait's result, or "cancelled")."""
    outcome = []

    def wait():
        try:
            outcome.append(ticket.wait(TIMEOUT))
        except Cancelled:
            outcome.append("cancelled")
    waiter = threading.Thread(target=wait, name="ticket wait")
    waiter.start()
    return waiter, outcome


def test_ports_go_lowest_first_then_the_line_waits_in_order(binder):
    pool = PortPool([9003, 9001, 9002], binder)
    assert [grant(pool.request()) for _ in range(3)] == [9001, 9002, 9003]
    first, second = pool.request(), pool.request()
    assert first.wait(0) is None and second.wait(0) is None
    assert (first.position, second.position) == (1, 2)
    pool.release(9002)
    assert second.wait(0) is None          # the head of the line goes first
    assert grant(first) == 9002
    assert second.position == 1


def test_a_move_up_between_reading_the_position_and_waiting_is_not_missed(binder):
    # The relay reads a ticket's position, reports it, then waits for a change.
    # If the one ahead leaves in between, the wait must return at once.
    pool = PortPool([9001], binder)
    assert grant(pool.request()) == 9001
    ahead, behind = pool.request(), pool.request()
    reported = behind.position
    assert reported == 2
    ahead.cancel()
    waiter = threading.Thread(target=lambda: outcome.append(behind.wait(TIMEOUT, position=reported)))
    outcome = []
    waiter.start()
    waiter.join(TIMEOUT / 2)
    alive = waiter.is_alive()
    if alive:
        behind.cancel()    # frees the thread so the test can end
        waiter.join(TIMEOUT)
    assert not alive, "the wait missed the move to position 1"
    assert outcome == [None] and behind.position == 1


def test_a_specific_port_waits_for_that_port_only(binder):
    pool = PortPool([9001, 9002], binder)
    assert grant(pool.request(9001)) == 9001
    wants_9001 = pool.request(9001)
    assert wants_9001.wait(0) is None
    assert grant(pool.request()) == 9002   # anyone else may pass it for another port
    pool.release(9001)
    assert grant(wants_9001) == 9001
    with pytest.raises(PoolError, match="not in this relay's pool"):
        pool.request(8000)


def test_a_port_being_bound_is_not_counted_twice(binder):
    """Regression: while the head of the line bound its port, the pool counted
    it both as binding and as waiting, and the next service was told to wait
    although a port was free."""
    pool = PortPool([9001, 9002], binder)
    binder.hold[9001] = threading.Event()
    first = pool.request()
    granted = []
    binding = threading.Thread(target=lambda: granted.append(first.wait(TIMEOUT)))
    binding.start()
    try:
        assert binder.started.setdefault(9001, threading.Event()).wait(TIMEOUT)
        second = pool.request()
        assert second.wait(0) is not None, "a free port, yet the second service must wait"
        assert second.granted[0] == 9002
    finally:
        binder.hold[9001].set()
        binding.join(TIMEOUT)
    assert granted[0][0] == 9001


def test_a_port_that_cannot_be_bound_is_skipped_and_tried_again_later(binder):
    pool = PortPool([9001, 9002], binder, retry_after=0.2)
    binder.fail.add(9001)
    assert grant(pool.request()) == 9002
    waiting = pool.request()
    assert waiting.wait(0) is None          # 9001 cools down
    binder.fail.discard(9001)
    assert grant(waiting, timeout=TIMEOUT) == 9001   # after the cooldown, not lost
    assert binder.calls.count(9001) == 2


def test_a_held_port_goes_only_to_its_lease_until_the_hold_ends(binder):
    pool = PortPool([9001, 9002], binder)
    assert grant(pool.request()) == 9001
    pool.release(9001, hold_for="token", hold_seconds=60)
    assert grant(pool.request()) == 9002      # not 9001, though it is lower
    stranger = pool.request()
    assert stranger.wait(0) is None
    assert grant(pool.request(lease="token")) == 9001
    pool.release(9002)
    assert grant(stranger) == 9002


def test_a_hold_that_expires_frees_the_port_for_anyone(binder):
    pool = PortPool([9001], binder)
    assert grant(pool.request()) == 9001
    pool.release(9001, hold_for="token", hold_seconds=0.2)
    stranger = pool.request()
    assert grant(stranger, timeout=TIMEOUT) == 9001   # wakes at the expiry by itself


def test_cancel_wakes_a_waiter_and_lets_the_next_one_in(binder):
    pool = PortPool([9001], binder)
    assert grant(pool.request()) == 9001
    first, second = pool.request(), pool.request()
    waiter, outcome = wait_in_thread(first)
    first.cancel()
    first.cancel()   # idempotent
    waiter.join(TIMEOUT)
    assert outcome == ["cancelled"]
    assert second.position == 1
    pool.release(9001)
    assert grant(second) == 9001
    assert pool.stats() == {"free": 0, "in_use": 1, "waiting": 0}


def test_limit_caps_ports_in_use_below_the_pool_size(binder):
    pool = PortPool([9001, 9002, 9003], binder, limit=2)
    assert [grant(pool.request()) for _ in range(2)] == [9001, 9002]
    third = pool.request()
    assert third.wait(0) is None
    pool.release(9001)
    assert grant(third) == 9001


def test_a_closed_line_grants_nothing_more_and_ports_in_use_stay(binder):
    pool = PortPool([9001, 9002], binder)
    assert grant(pool.request()) == 9001
    binder.hold[9002] = threading.Event()
    waiter, outcomes = wait_in_thread(pool.request())
    assert binder.started.setdefault(9002, threading.Event()).wait(TIMEOUT)
    in_line = pool.request(9001)
    pool.close_line()
    with pytest.raises(Cancelled):
        in_line.wait(TIMEOUT)
    binder.hold[9002].set()   # its bind ends after the close: the port goes back
    waiter.join(TIMEOUT)
    assert outcomes == ["cancelled"]
    later = pool.request()
    with pytest.raises(Cancelled):
        later.wait(TIMEOUT)
    pool.release(9001)
    assert pool.stats() == {"free": 2, "in_use": 0, "waiting": 0}
    with pytest.raises(Cancelled):
        pool.request().wait(0)
