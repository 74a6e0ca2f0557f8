"""The access log: one line per public client when it ends.

    client=203.0.113.9:51234 service=db port=8081 duration=12.345 in=1234 out=56789 end=fin

``key=value`` pairs, in this order, on one line: ``client`` (its address),
``service`` (the name it registered with; ``-`` if none), ``port`` (the
public port), ``duration`` (seconds, to the millisecond), ``in`` (bytes from
the client to the service), ``out`` (bytes from the service to the client),
``end`` (one of ENDS), and for ``end=service_reset`` the muxado error code's
name (``code=STREAM_RESET``). A value that is empty, has a space, a quote, a
backslash or ``=``, or is ``-`` itself, is a JSON string in double quotes.
Refused clients are not access lines: they never became a stream (the relay
counts them and logs them, rate-limited).

Without a file the lines go to the ``tcprelay.access`` logger at INFO (so
operators can route them). With ``--access-log FILE`` they are appended to
FILE instead, each after an ISO 8601 UTC timestamp (``2024-05-01T12:00:00.123Z``).
``reopen()`` (SIGHUP) makes the next line reopen FILE, for logrotate. A
write that fails (a full disk, a path gone) never stops relaying: the line
is dropped, counted (``access_log_failures``) and the failure logged at
most once a minute.
"""

import collections
import json
import logging
import re
import threading
import time

from . import addresses, limits
from .muxado import SessionClosedError, StreamResetError

ACCESS_LOGGER = "tcprelay.access"
log = logging.getLogger(ACCESS_LOGGER)
# The file's own troubles are the relay's lines, not access lines.
relay_log = logging.getLogger("tcprelay.relay")

# How a client's connection ended: the values of end=.
FIN = "fin"                        # both sides finished (or the service did, and left)
CLIENT_RESET = "client_reset"      # the client reset its connection (or it failed)
SERVICE_RESET = "service_reset"    # the service reset the stream: code= names why
IDLE = "idle"                      # nothing moved for --idle-timeout
SERVICE_GONE = "service_gone"      # the service's session ended
RELAY_STOPPING = "relay_stopping"  # the relay left before the client finished
ERROR = "error"                    # the relay's own failure (logged with a traceback)
ENDS = (FIN, CLIENT_RESET, SERVICE_RESET, IDLE, SERVICE_GONE, RELAY_STOPPING, ERROR)

# Bridge abort reasons (bridge.py, Bridge._abort_locked's callers), by how they start.
_IDLE_REASONS = ("idle for ",)
_CLIENT_REASONS = ("socket read failed", "socket write failed", "the client reset")
_ERROR_REASONS = ("internal error",)

FAILURE_LOG_INTERVAL = 60.0   # seconds between lines about a failing access log file

# A client's start: its address (a socket address) and time.monotonic() then.
Visit = collections.namedtuple("Visit", "address started")


def visit(address):
    """A ``Visit`` for a client from ``address`` that starts now."""
    return Visit(address, time.monotonic())


def ending(bridge, relay_stopping):
    """How ``bridge`` (a finished ``bridge.Bridge``) ended: one of ENDS.
    ``relay_stopping``: True if the relay was closing its service's session."""
    abort = bridge._abort
    if abort is None:
        return FIN
    if not abort.reset_stream:   # the stream's own failure ended it
        error = bridge.stream.error
        if isinstance(error, StreamResetError):
            return SERVICE_RESET
        if isinstance(error, SessionClosedError) or error is None:
            return RELAY_STOPPING if relay_stopping else SERVICE_GONE
        return ERROR
    reason = abort.reason
    if reason.startswith(_IDLE_REASONS):
        return IDLE
    if reason.startswith(_CLIENT_REASONS):
        return CLIENT_RESET
    if reason.startswith(_ERROR_REASONS):
        return ERROR
    # The relay reset it: its service had left and it did not finish in time.
    return RELAY_STOPPING if relay_stopping else SERVICE_GONE


_NEEDS_QUOTES = re.compile(r'[\s"\\=]')


def quote(value):
    """``value`` (text) as it goes after ``key=``: as is, or a JSON string if it
    would not read back as one token."""
    if (not value or value == "-" or _NEEDS_QUOTES.search(value)
            or not value.isprintable()):
        return json.dumps(value, ensure_ascii=False)
    return value


def line(client, service, port, duration, bytes_in, bytes_out, end, code=None):
    """One access line (no timestamp, no newline). ``client``: a socket address;
    ``service``: its name or None; ``duration``: seconds; ``code``: the reset's
    error code name, for ``end=service_reset``."""
    text = "client=%s service=%s port=%s duration=%.3f in=%d out=%d end=%s" % (
        quote(addresses.format_sockaddr(client)), "-" if service is None else quote(service),
        port, max(0.0, duration), bytes_in, bytes_out, end)
    if code is not None:
        text += " code=%s" % quote(code)
    return text


def timestamp(seconds):
    """``seconds`` (Unix time) in ISO 8601, UTC, to the millisecond: ``...T12:00:00.123Z``."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)), millis)


class AccessLogError(OSError):
    """The access log file cannot be opened (``--access-log``)."""


class AccessFile(object):
    """Lines appended to ``path``, one ``write`` each (an unbuffered O_APPEND file,
    so a failed write drops that line and no more).

    ``reopen()`` only sets a flag (safe in a signal handler: no lock); the next
    line reopens the file. A failed open or write is counted (``failures``,
    and ``on_failure()``) and logged at most once every ``FAILURE_LOG_INTERVAL``
    seconds of ``clock``; the line is dropped. AccessLogError if ``path`` cannot
    be opened at first.
    """

    def __init__(self, path, on_failure=None, clock=time.monotonic, wall_clock=time.time):
        self.path = path
        self.failures = 0                # lines dropped
        self._on_failure = on_failure
        self._wall_clock = wall_clock
        self._log_failure = limits.LogGate(relay_log, logging.WARNING,
                                           per_second=1.0 / FAILURE_LOG_INTERVAL,
                                           more="failures", clock=clock)
        self._lock = threading.Lock()    # the file, and the failure state
        self._reopen = False             # set by reopen(), read under _lock
        self._failing = False            # the last line was dropped
        self._closed = False             # close(): lines after it are dropped, uncounted
        try:
            self._file = self._open()
        except OSError as exc:
            raise AccessLogError(exc.errno, "cannot open the access log %s: %s"
                                 % (path, exc.strerror or exc))

    def _open(self):
        return open(self.path, "ab", buffering=0)

    def reopen(self):
        """Reopen the file before the next line (after logrotate moved it)."""
        self._reopen = True

    def write(self, text):
        """Append ``text`` and a newline after a timestamp; never raises."""
        data = ("%s %s\n" % (timestamp(self._wall_clock()), text)).encode("utf-8")
        with self._lock:
            if self._closed:
                return
            try:
                self._write_locked(data)
            except (OSError, ValueError) as exc:
                self._failed_locked(exc)
                return
            recovered, self._failing = self._failing, False
        if recovered:
            relay_log.info("the access log %s is written again (%d lines dropped so far)",
                           self.path, self.failures)

    def _write_locked(self, data):
        if self._reopen or self._file is None:
            self._reopen = False
            self._close_locked()
            self._file = self._open()
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]

    def _failed_locked(self, exc):
        self.failures += 1
        self._failing = True
        if self._on_failure is not None:
            self._on_failure()
        self._log_failure("cannot write the access log %s: %s; dropping its lines "
                          "(%d so far), relaying goes on", self.path,
                          getattr(exc, "strerror", None) or exc, self.failures)

    def _close_locked(self):
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self):
        with self._lock:
            self._closed = True
            self._close_locked()


class AccessLog(object):
    """Where a relay's access lines go: ``ACCESS_LOGGER`` at INFO, or the file at
    ``path`` (an ``AccessFile``; AccessLogError if it cannot be opened).
    ``counters``: the relay's ``RelayCounters``, which count failed writes."""

    def __init__(self, path=None, counters=None):
        self.file = None
        if path is not None:
            count = None if counters is None else (
                lambda: counters.count("access_log_failures"))
            self.file = AccessFile(path, on_failure=count)

    def client_ended(self, link, bridge, visit, code=None):
        """Write ``bridge``'s line: a client of ``link`` (a ``ServiceLink``) that came
        as ``visit``; ``code``: the name of the error code that reset its stream.
        Never raises: it runs where a bridge closes."""
        if self.file is None and not log.isEnabledFor(logging.INFO):
            return   # nowhere to go: not even formatted
        try:
            end = ending(bridge, link._closing)
            text = line(visit.address, link.name, link.port, time.monotonic() - visit.started,
                        bridge.bytes_up, bridge.bytes_down, end,
                        code if end == SERVICE_RESET else None)
        except Exception:
            relay_log.exception("%s: no access line for a client", link.label)
            return
        if self.file is not None:
            self.file.write(text)
        else:
            log.info("%s", text)

    def reopen(self):
        """Reopen the file before the next line (SIGHUP); nothing without a file."""
        if self.file is not None:
            self.file.reopen()

    def close(self):
        if self.file is not None:
            self.file.close()
