"""What makes a muxado Stream a drop-in for a socket beyond recv and send:
timeouts, ``makefile``, socket options, context managers, and the
``io.RawIOBase`` methods that ``socket.SocketIO`` and file-like callers use.
"""

import errno
import io
import socket

from .clock import check_timeout

_READ_CHUNK = 1 << 20             # read() until EOF: one recv this big at a time

# A stream's close state (Stream._close_state), as a socket's
OPEN = "open"
CLOSE_PENDING = "close pending"   # close() called; makefile() objects still open (as sockets)
CLOSED = "closed"                 # closed and forgotten: every call fails


class SocketLike(object):
    """A base for Stream. It builds on the stream's ``recv``, ``recv_into``,
    ``send``, ``close``, ``closed`` and ``session``, and keeps ``_timeout``
    and the count of open ``makefile()`` objects (``_io_refs``, guarded by
    ``_io_lock``), which the stream's close waits for, as a socket's does.
    """

    def settimeout(self, timeout):
        """As ``socket.settimeout``: None, 0 or seconds of any size a socket takes."""
        self._timeout = check_timeout(timeout)

    def gettimeout(self):
        return self._timeout

    def setblocking(self, flag):
        self.settimeout(None if flag else 0.0)

    def getblocking(self):
        return self._timeout != 0.0

    def makefile(self, mode="r", buffering=None, encoding=None, errors=None, newline=None):
        """A file object reading and/or writing this stream, as ``socket.makefile``."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError("invalid mode %r (only r, w, b allowed)" % (mode,))
        writing = "w" in mode
        reading = "r" in mode or not writing
        assert reading or writing
        binary = "b" in mode
        rawmode = ""
        if reading:
            rawmode += "r"
        if writing:
            rawmode += "w"
        raw = socket.SocketIO(self, rawmode)
        with self._io_lock:
            self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        if reading and writing:
            buf = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buf = io.BufferedReader(raw, buffering)
        else:
            buf = io.BufferedWriter(raw, buffering)
        if binary:
            return buf
        text = io.TextIOWrapper(buf, encoding, errors, newline)
        text.mode = mode
        return text

    def getpeername(self):
        return self.session.getpeername()

    def getsockname(self):
        return self.session.getsockname()

    def setsockopt(self, level, optname, value, optlen=None):
        """Accepts and ignores TCP_NODELAY (frames are always written at once)."""
        if level == socket.IPPROTO_TCP and optname == socket.TCP_NODELAY:
            return
        raise OSError(errno.ENOPROTOOPT, "muxado streams do not support this socket option")

    def getsockopt(self, level, optname, buflen=None):
        if level == socket.IPPROTO_TCP and optname == socket.TCP_NODELAY:
            return 1
        raise OSError(errno.ENOPROTOOPT, "muxado streams do not support this socket option")

    def fileno(self):
        raise io.UnsupportedOperation("a muxado stream has no file descriptor")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- file-like interface (io.RawIOBase style) -------------------------------

    def readable(self):
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        return True

    def writable(self):
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        return True

    def seekable(self):
        return False

    def isatty(self):
        return False

    def flush(self):
        pass

    def readinto(self, buffer):
        return self.recv_into(buffer)

    def read(self, size=-1):
        """Up to ``size`` bytes (``b""`` at EOF); with no size, everything until EOF."""
        if size is None or size < 0:
            parts = []
            while True:
                data = self.recv(_READ_CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        return self.recv(size)

    def readall(self):
        return self.read()

    def write(self, data):
        return self.send(data)
