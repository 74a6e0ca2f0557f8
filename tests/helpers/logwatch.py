"""``LogWatcher``: tcprelay's log messages kept in memory, so that a test can
wait for one logged on another thread (its fixtures are in conftest.py)."""

import logging
import threading
import time

from helpers.basics import TIMEOUT


class LogWatcher(logging.Handler):
    """Keeps every record it is given as (logger name, level, message).

    ``default_level``: the least level ``messages`` and ``wait_for`` look at
    unless told. ``wait_returns_all``: ``wait_for`` returns every matching
    message once there are ``count`` (to assert there is no extra one), else
    only the first ``count``.
    """

    def __init__(self, default_level=logging.DEBUG, wait_returns_all=False):
        logging.Handler.__init__(self, logging.DEBUG)
        self.default_level = default_level
        self.wait_returns_all = wait_returns_all
        self._cond = threading.Condition()
        self._records = []   # (logger name, level, message)

    def emit(self, record):
        try:
            message = record.getMessage()
        except Exception:   # a bad format string is not this handler's business
            message = str(record.msg)
        with self._cond:
            self._records.append((record.name, record.levelno, message))
            self._cond.notify_all()

    def messages(self, text="", level=None, name=None):
        """Every message so far containing ``text`` at ``level`` or above (None: the
        default level), from logger ``name`` (None: any), in order."""
        if level is None:
            level = self.default_level
        with self._cond:
            return [m for n, lv, m in self._records
                    if text in m and lv >= level and (name is None or n == name)]

    def wait_for(self, text, count=1, timeout=TIMEOUT, level=None, name=None):
        """The messages containing ``text`` (see ``wait_returns_all``) once there
        are ``count``; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.messages(text, level, name)
                if len(found) >= count:
                    return found if self.wait_returns_all else found[:count]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no %d log messages containing %r within %gs; got:\n%s"
                                         % (count, text, timeout, "\n".join(self.messages())))
                self._cond.wait(left)
