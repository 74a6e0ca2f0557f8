"""tcprelay.portpool and tcprelay.leases on their own: port numbers, a bind
stand-in that opens nothing, and a clock the test moves. Every wait has
timeout 0 (a grant that can be made now, or None), so nothing blocks and each
test runs in microseconds. (tests/test_portpool.py races real threads.)
"""

from helpers.basics import FakeClock
from tcprelay.leases import Leases
from tcprelay.portpool import PortPool


class Listener(object):
    """What the pool's ``bind`` returns, standing in for a listening socket."""

    def __init__(self, port):
        self.port = port
        self.closed = False

    def close(self):
        self.closed = True


class Bind(object):
    """The pool's ``bind``: a ``Listener``, or OSError for a port in ``taken``."""

    def __init__(self):
        self.taken = set()
        self.calls = []

    def __call__(self, port):
        self.calls.append(port)
        if port in self.taken:
            raise OSError(98, "Address already in use")
        return Listener(port)


class Link(object):
    """What Leases reads of a ServiceLink."""

    def __init__(self, said_goodbye=False):
        self.lease = None
        self.said_goodbye = said_goodbye
        self.label = "service stand-in"
        self.closed = False

    def close(self):
        self.closed = True


def now(ticket):
    """The port ``ticket`` is granted now, or None."""
    granted = ticket.wait(0)
    return None if granted is None else granted[0]


def pool_of(ports, **options):
    clock, bind = FakeClock(), Bind()
    return PortPool(ports, bind, clock=clock, **options), clock, bind


# -- holds ------------------------------------------------------------------------------------

def test_a_held_port_goes_only_to_its_lease_for_exactly_its_hold():
    pool, clock, _ = pool_of([9001])
    assert now(pool.request()) == 9001
    pool.release(9001, hold_for="token", hold_seconds=30.0)
    assert pool.held_for(9001) == "token"
    stranger = pool.request()
    assert now(stranger) is None
    assert pool.why_waiting(stranger) == ("of the free ports, 1 held for the leases of "
                                          "services that left")
    clock.advance(29.5)
    assert now(stranger) is None and pool.held_for(9001) == "token"
    clock.advance(0.5)
    assert pool.held_for(9001) is None
    assert now(stranger) == 9001


def test_the_lease_takes_its_held_port_past_those_ahead_in_line():
    pool, _, _ = pool_of([9001, 9002])
    assert [now(pool.request()) for _ in range(2)] == [9001, 9002]
    pool.release(9002, hold_for="mine", hold_seconds=30.0)
    first = pool.request()
    assert now(first) is None
    mine = pool.request(lease="mine")
    assert now(mine) == 9002            # the port is no use to the ticket ahead
    assert now(first) is None
    pool.release(9001)
    assert now(first) == 9001


def test_a_release_without_a_hold_frees_the_port_at_once():
    pool, _, _ = pool_of([9001])
    assert now(pool.request()) == 9001
    pool.release(9001, hold_for="token", hold_seconds=0.0)
    assert pool.held_for(9001) is None
    assert now(pool.request()) == 9001


# -- ports that cannot be bound -------------------------------------------------------------------

def test_a_port_that_cannot_be_bound_is_skipped_for_retry_after_seconds():
    pool, clock, bind = pool_of([9001, 9002], retry_after=5.0)
    bind.taken.add(9001)
    assert now(pool.request()) == 9002
    assert bind.calls == [9001, 9002]
    waiting = pool.request()
    assert now(waiting) is None
    assert pool.why_waiting(waiting) == ("of the free ports, 1 cannot be bound now "
                                         "(another program has it)")
    pool.release(9002)
    assert now(waiting) == 9002
    bind.taken.clear()
    later = pool.request(port=9001)
    clock.advance(4.5)
    assert now(later) is None
    assert pool.why_waiting(later) == "port 9001 cannot be bound now (another program has it)"
    clock.advance(0.5)
    assert now(later) == 9001
    assert bind.calls == [9001, 9002, 9002, 9001]


def test_why_waiting_names_the_limit_and_the_port_held_by_another_service():
    pool, _, _ = pool_of([9001, 9002, 9003], limit=1)
    assert now(pool.request()) == 9001
    second = pool.request()
    assert now(second) is None
    assert pool.why_waiting(second) == ("the relay serves as many services as it may at "
                                        "once (1), with ports free")
    specific = pool.request(port=9001)
    assert pool.why_waiting(specific) == "port 9001 is held by another service"


def test_a_preferred_port_is_taken_if_free_else_any():
    pool, _, _ = pool_of([9001, 9002, 9003])
    assert now(pool.request(prefer=9002)) == 9002
    assert now(pool.request(prefer=9002)) == 9001


# -- leases over the pool ---------------------------------------------------------------------------

def _registered(pool, leases, link):
    port = now(pool.request())
    link.lease = leases.issue(link, port)
    return port


def test_a_lost_service_s_lease_holds_its_port_for_lease_time_on_the_pool_s_clock():
    pool, clock, _ = pool_of([9001])
    leases = Leases(pool, lease_time=60.0)
    lost = Link()
    port = _registered(pool, leases, lost)
    assert lost.lease.startswith("9001-")
    assert leases.release(lost, port) is True
    back = Link()
    clock.advance(59.5)
    assert leases.claim(lost.lease, back) == (lost.lease, 9001)
    clock.advance(0.5)
    assert leases.claim(lost.lease, back) == (None, 9001)   # a preference now, no more
    assert not lost.closed and not back.closed


def test_a_token_the_relay_does_not_know_still_names_its_port():
    pool, _, _ = pool_of([9001])
    leases = Leases(pool, lease_time=60.0)
    assert leases.claim("9001-abc", Link()) == (None, 9001)
    assert leases.claim("x9001-abc", Link()) == (None, None)
    assert leases.claim("\u0661\u0662-abc", Link()) == (None, 12)   # what int() takes


def test_goodbye_or_a_leaving_relay_holds_nothing():
    pool, _, _ = pool_of([9001, 9002])
    leases = Leases(pool, lease_time=60.0)
    polite, cut = Link(said_goodbye=True), Link()
    first, second = _registered(pool, leases, polite), _registered(pool, leases, cut)
    assert leases.release(polite, first) is False
    assert leases.release(cut, second, hold=False) is False
    assert pool.held_for(first) is None and pool.held_for(second) is None
    assert pool.stats() == {"free": 2, "in_use": 0, "waiting": 0}
