"""tcprelay.limits on its own: addresses, numbers and a clock the test moves.

No sockets and no threads: each test runs in microseconds.
"""

import logging

from helpers.basics import FakeClock
from tcprelay.limits import FailureBans, LogGate, LogGates, Networks, RateLimit


class Lines(object):
    """A logger stand-in: keeps (level, message % args)."""

    def __init__(self):
        self.lines = []

    def log(self, level, message, *args):
        self.lines.append((level, message % args))


# -- Networks (--allow-from) ----------------------------------------------------------------

def test_networks_hold_their_addresses_of_either_family():
    allowed = Networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert "10.1.2.3" in allowed and "192.0.2.7" in allowed and "2001:db8::1" in allowed
    assert "11.0.0.1" not in allowed and "192.0.2.8" not in allowed
    assert "2001:db9::1" not in allowed


def test_networks_see_an_ipv4_mapped_address_as_ipv4():
    assert "::ffff:10.0.0.1" in Networks(["10.0.0.0/8"])
    assert "::ffff:11.0.0.1" not in Networks(["10.0.0.0/8"])


def test_networks_refuse_what_is_not_an_address_and_take_host_bits():
    allowed = Networks(["10.0.0.1/8"])        # strict=False: host bits are dropped
    assert str(allowed) == "10.0.0.0/8"
    assert "localhost" not in allowed and "" not in allowed and "10.0.0.1:80" not in allowed


def test_no_networks_is_false():
    assert not Networks([])
    assert Networks(["::1"])


# -- FailureBans -----------------------------------------------------------------------------

def test_a_ban_starts_at_the_limit_th_failure_within_the_window_and_lasts_its_time():
    clock = FakeClock()
    bans = FailureBans(limit=3, window=60.0, ban=30.0, clock=clock)
    assert bans.failed("192.0.2.1") is False
    clock.advance(10)
    assert bans.failed("192.0.2.1") is False
    assert not bans.banned("192.0.2.1")
    assert bans.failed("192.0.2.1") is True
    assert bans.banned("192.0.2.1") and not bans.banned("192.0.2.2")
    clock.advance(29.5)
    assert bans.banned("192.0.2.1")
    clock.advance(0.5)
    assert not bans.banned("192.0.2.1")


def test_failures_older_than_the_window_do_not_count():
    clock = FakeClock()
    bans = FailureBans(limit=3, window=60.0, ban=30.0, clock=clock)
    bans.failed("192.0.2.1")
    bans.failed("192.0.2.1")
    clock.advance(60)            # both fall out of the window
    assert bans.failed("192.0.2.1") is False
    assert bans.failed("192.0.2.1") is False
    assert bans.failed("192.0.2.1") is True


def test_a_ban_that_ended_starts_the_count_afresh():
    clock = FakeClock()
    bans = FailureBans(limit=2, window=60.0, ban=5.0, clock=clock)
    bans.failed("h")
    assert bans.failed("h") is True
    clock.advance(5)
    assert not bans.banned("h")
    assert bans.failed("h") is False
    assert bans.failed("h") is True


# -- RateLimit ----------------------------------------------------------------------------------

def test_a_rate_limit_allows_a_burst_then_refills_at_its_rate():
    clock = FakeClock()
    rate = RateLimit(per_minute=60, burst=3, clock=clock)   # a token a second
    assert [rate.allow("h") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("other")                                # per address
    clock.advance(0.5)
    assert not rate.allow("h")
    clock.advance(0.5)
    assert rate.allow("h") and not rate.allow("h")
    clock.advance(3600)                                      # refills up to the burst only
    assert [rate.allow("h") for _ in range(4)] == [True, True, True, False]


# -- LogGate, LogGates -------------------------------------------------------------------------

def test_a_log_gate_lets_a_burst_through_then_one_a_second_and_counts_the_rest():
    clock = FakeClock()
    logger = Lines()
    gate = LogGate(logger, logging.INFO, per_second=1.0, burst=2, clock=clock)
    for n in range(5):
        gate("refused %d", n)
    assert logger.lines == [(logging.INFO, "refused 0"), (logging.INFO, "refused 1")]
    clock.advance(1)
    gate("refused %d", 5)
    assert logger.lines[2:] == [(logging.INFO, "refused 5 (and 3 more left out)")]
    gate("refused %d", 6)
    assert len(logger.lines) == 3


def test_a_log_gate_owes_the_lines_it_left_out_and_flush_tells_them_once():
    clock = FakeClock()
    logger = Lines()
    gate = LogGate(logger, per_second=2.0, burst=1, more="refused", clock=clock)
    assert gate.owed() is None
    gate("a %s", "first")
    gate("a %s", "second")
    gate("a %s", "third")
    assert gate.owed() == 0.5
    gate.flush()                       # no token yet: nothing
    assert len(logger.lines) == 1
    clock.advance(0.25)
    assert gate.owed() == 0.25
    clock.advance(0.25)
    assert gate.owed() == 0.0
    gate.flush()
    assert logger.lines == [(logging.WARNING, "a first"),
                            (logging.WARNING, "a third (and 1 more refused)")]
    assert gate.owed() is None
    clock.advance(10)
    gate.flush()
    assert len(logger.lines) == 2


def test_log_gates_keep_one_gate_per_kind_at_one_line_a_second():
    clock = FakeClock()
    logger = Lines()
    gates = LogGates(logger, logging.INFO, clock=clock)
    gates("full", "port %d full", 1)
    gates("full", "port %d full", 2)      # within the same second: left out
    gates("banned", "%s banned", "h")
    clock.advance(1)
    gates("full", "port %d full", 3)
    assert logger.lines == [(logging.INFO, "port 1 full"), (logging.INFO, "h banned"),
                            (logging.INFO, "port 3 full (and 1 more left out)")]
