"""Lines read from a muxado stream: the one reader of the registration stream,
on both sides (the relay's request and challenge answer, the service's
replies, the heartbeat's pings and pongs).

``registration.LineSplitter`` cuts the bytes into lines; this module reads
them off the stream within a deadline and the peer's allowed silence. The
callers parse the lines (``registration.parse_*``) and word the errors.
"""

import collections
import socket
import time

from . import clock, registration


class DeadlinePassed(socket.timeout):
    """``StreamLines.read_line`` ran out of its deadline (a plain
    ``socket.timeout``: of the peer's allowed silence)."""


class StreamLines(object):
    """The lines of a muxado ``stream``, each at most ``limit`` bytes.

    ``read_line`` gives one line at a time; ``rest`` the bytes after the
    last newline once the stream has ended (the minimal registration form
    is everything up to the FIN).
    """

    def __init__(self, stream, limit):
        self._stream = stream
        self._limit = limit
        self._splitter = registration.LineSplitter(limit)
        self._lines = collections.deque()
        self._eof = False

    def read_line(self, silence=None, deadline=None):
        """The next line (bytes, without its newline); None once the stream has ended.

        The peer may be quiet ``silence`` seconds at a time (None: as long as
        it likes), up to ``deadline`` (``time.monotonic()`` seconds, or None).
        Raises ``DeadlinePassed``, ``socket.timeout`` (the silence),
        ``registration.LineTooLong``, and the stream's errors.
        """
        while not self._lines:
            if self._eof:
                return None
            self._fill(silence, deadline)
        return self._lines.popleft()

    @property
    def rest(self):
        """The bytes read after the last complete line."""
        return self._splitter.pending

    def _fill(self, silence, deadline):
        wait = silence
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:   # a 0 timeout would make the stream non-blocking, not time out
                raise DeadlinePassed("the deadline passed")
            wait = left if wait is None else min(wait, left)
        self._stream.settimeout(None if wait is None else min(wait, clock.MAX_TIMEOUT))
        try:
            data = self._stream.recv(self._limit + 1)
        except socket.timeout:
            if silence is None or wait < silence:
                raise DeadlinePassed("the deadline passed")
            raise
        if not data:
            self._eof = True
            return
        self._lines.extend(self._splitter.feed(data))
