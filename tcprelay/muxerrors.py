"""The errors a muxado session and its streams raise.

Each is a ``frames.MuxadoError`` (with the muxado error ``code``) and also
the OSError a caller of a socket already catches, with its ``errno``:
a reset stream is a ConnectionResetError (ECONNRESET), an ended session a
ConnectionAbortedError (ECONNABORTED), a write after close_write a
BrokenPipeError (EPIPE), open() after the peer's GOAWAY a
ConnectionRefusedError (ECONNREFUSED).
"""

import errno

from .frames import MuxadoError

__all__ = ["StreamResetError", "SessionClosedError", "StreamClosedError", "RemoteGoneAwayError"]


class _OSErrorFlavour(MuxadoError):
    """A MuxadoError that is also the OSError callers already catch."""

    errno_value = None

    def __init__(self, code, message=None):
        super(_OSErrorFlavour, self).__init__(code, message)
        self.errno = self.errno_value
        self.strerror = self.message


class StreamResetError(_OSErrorFlavour, ConnectionResetError):
    """The stream was reset: by the peer, or locally for a protocol fault."""

    errno_value = errno.ECONNRESET


class SessionClosedError(_OSErrorFlavour, ConnectionAbortedError):
    """The session (or this stream) has ended; nothing more can be done with it."""

    errno_value = errno.ECONNABORTED


class StreamClosedError(_OSErrorFlavour, BrokenPipeError):
    """Writing to a stream whose write side is closed (``close_write``)."""

    errno_value = errno.EPIPE


class RemoteGoneAwayError(_OSErrorFlavour, ConnectionRefusedError):
    """``open()`` after the peer sent GOAWAY: it takes no new streams."""

    errno_value = errno.ECONNREFUSED
