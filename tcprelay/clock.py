"""Timeouts of any size: each single blocking wait is capped.

A caller may give any timeout a socket takes (``settimeout`` accepts up to
``threading.TIMEOUT_MAX``, about 292 years), but ``poll`` takes an int of
milliseconds (24.8 days at most) and epoll, ``select`` and
``Condition.wait`` have ceilings of their own, each raising OverflowError
past it. So every wait is at most ``MAX_WAIT`` at a time, and the caller,
which re-checks its own deadline, waits again.
"""

import math
import socket
import threading
import time

MAX_WAIT = 86400.0                 # seconds of one blocking call at most
MAX_TIMEOUT = threading.TIMEOUT_MAX   # the largest timeout a socket takes


def capped(seconds):
    """``seconds`` (None: no limit) as one wait may take it: at most MAX_WAIT."""
    if seconds is None:
        return None
    return min(seconds, MAX_WAIT)


def poll_ms(seconds):
    """``seconds`` (None: no limit) for ``poll()``: whole milliseconds, at least 1
    (0 stays 0), at most MAX_WAIT."""
    if seconds is None:
        return None
    if seconds <= 0:
        return 0
    return max(1, int(math.ceil(min(seconds, MAX_WAIT) * 1000)))


def check_timeout(seconds):
    """A socket-style timeout: None, or a float in 0..MAX_TIMEOUT.

    Raises ValueError if negative and OverflowError if too large, as
    ``socket.settimeout`` does.
    """
    if seconds is None:
        return None
    seconds = float(seconds)
    if seconds < 0:
        raise ValueError("Timeout value out of range")
    if seconds > MAX_TIMEOUT:
        raise OverflowError("timeout doesn't fit into C timeval")
    return seconds


class Deadline(object):
    """The time left to a blocking call, ``timeout`` seconds (None: no limit) from now."""

    __slots__ = ("_end",)

    def __init__(self, timeout):
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self):
        """Seconds left for one wait (None: no limit); 0.0 once past the deadline.

        At most MAX_WAIT: every caller loops until its deadline.
        """
        if self._end is None:
            return None
        return capped(max(0.0, self._end - time.monotonic()))


def timeout_error(what):
    """The ``socket.timeout`` a blocking call that ran out of time raises."""
    return socket.timeout("%s timed out" % what)
