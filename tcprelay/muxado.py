"""muxado v2 sessions and streams, byte-compatible with Go's ``muxado/v2``.

A ``Session`` multiplexes many ``Stream`` objects over one socket. Streams
behave like sockets (``recv``, ``sendall``, ``shutdown``, ``makefile``,
timeouts, ``b""`` at EOF), so legacy code and ``socketserver`` handlers can
be handed one.

Threads and I/O:

- One reader thread per session reads the socket in big chunks, decodes
  frames with ``frames.FrameDecoder`` and appends payload to per-stream
  buffers. It never blocks on anything but the socket: frames it must send
  (RST and the like) go to a small writer thread, so two sessions whose
  sockets are both full can never deadlock each other.
- Everything else writes frames from the calling thread, whole, under one
  session write lock, header and payload in one ``sendmsg``.
- A write that cannot make progress for ``write_timeout`` seconds (the peer
  stopped reading) ends the session with WRITE_TIMEOUT; the socket's
  SO_SNDTIMEO enforces it without polling. Waiting for the write lock
  behind other writers does not count: they are making progress.
- ``Session.last_received`` is when the socket last gave us bytes (one
  clock read per socket read): liveness checks count any byte, not frames.

Flow control: every stream has a receive window (``window_size``, at least
the protocol's 256 KiB); a DATA frame longer than what is left of it is
refused with RST FLOW_CONTROL_ERROR before its body is read, so buffered
data per stream is bounded by its window. Window updates are batched: one
WNDINC per half window consumed.

Limits against hostile peers (each ends the session with GOAWAY):

- ``max_streams`` peer-opened streams at once; more are refused with RST
  STREAM_REFUSED. ``accept_backlog`` streams waiting for ``accept()``; more
  are refused with RST ACCEPT_QUEUE_FULL. By default the backlog is
  max_streams: a stream waiting for accept() already counts against
  max_streams and its data against its window, so a burst of new streams
  is refused only past max_streams (Go's reader waits briefly for room in
  its backlog of 128; ours must never block).
- ``flood_limit = (burst, per_second)``: a token bucket for frames that
  cost work but move no data (empty DATA frames without flags, frames of
  unknown type, DATA, WNDINC and RST on streams that do not exist; each
  stream closed gives back a few tokens for the peer's frames in flight) and
  one for streams the peer opens and then resets itself. A peer past either
  gets GOAWAY ENHANCE_YOUR_CALM. The default (10,000 burst, 1,000 a second)
  is far above what a healthy peer sends.
- ``set_read_budget``: a cap on all the bytes a not yet trusted peer may send.
"""

import collections
import errno
import functools
import io
import itertools
import logging
import select
import socket
import struct
import sys
import threading
import time

from .frames import (
    DEFAULT_WINDOW, FIN, HEADER_SIZE, MAX_LENGTH, MAX_STREAM_ID, MAX_WINDOW, PAD_FRAME,
    SYN, Data, ErrorCode, FrameDecoder, FrameHandler, GoAway, MuxadoError, ProtocolError,
    Rst, Unknown, WndInc, decode_frames, encode_goaway, encode_rst, encode_wndinc,
)
from . import clock
from .limits import LogGate

__all__ = [
    "Session", "Stream", "client", "server", "ErrorCode", "MuxadoError", "ProtocolError",
    "StreamResetError", "SessionClosedError", "StreamClosedError", "RemoteGoneAwayError",
    "Data", "Rst", "WndInc", "GoAway", "Unknown", "decode_frames",
    "DEFAULT_WINDOW", "DEFAULT_WRITE_TIMEOUT", "DEFAULT_FLOOD_LIMIT",
]

log = logging.getLogger(__name__)
# What a peer can make us log, once per session or stream it opens: rate-limited.
_log_peer_fault = LogGate(log, logging.WARNING, per_second=5, burst=20)
_log_stream_fault = LogGate(log, logging.INFO, per_second=5, burst=20)
_log_ending = LogGate(log, logging.INFO, per_second=5, burst=20)

DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_FLOOD_LIMIT = (10000, 1000.0)
GOAWAY_ON_CLOSE_TIMEOUT = 0.25    # as Go: a closing session tries this long to say GOAWAY
MAX_QUEUED_REPLIES = 10000        # frames the reader may owe the peer before it calls a flood
_MAX_IOV = 64                     # more buffers than this are joined (IOV_MAX is 1024)
LEAD_GRACE = 0.001                # how long the reader thread leaves the lead to a consumer
LEAD_WATCH_MAX = 0.064            # the longest the reader thread goes without a look
_BACKGROUND = "reader thread"
_CONSUMER = "consumer"
_RECV_SIZE = 1 << 20             # one recv_into; holds several whole 256 KiB frames
_FIRST_RECV_SIZE = 64 * 1024
_DATA_HEADER = struct.Struct(">II")
_RECV_FLAGS = socket.MSG_PEEK | socket.MSG_WAITALL
_DATA_TYPE = 1 << 4
_MAIN_THREAD = threading.main_thread()
_MAIN_IDENT = _MAIN_THREAD.ident
_STRAYS_PER_STREAM = 4   # frames a closed stream may still draw from the peer


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


def _byte_view(data):
    """A flat memoryview of bytes over any buffer."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _timeout_error(what):
    return socket.timeout("%s timed out" % what)


class _Deadline(object):
    """Remaining time of a blocking call, for Condition.wait."""

    __slots__ = ("_end",)

    def __init__(self, timeout):
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self):
        """Seconds left for one wait (None: no limit); 0.0 once past the deadline.

        At most clock.MAX_WAIT: every caller loops until its deadline.
        """
        if self._end is None:
            return None
        return clock.capped(max(0.0, self._end - time.monotonic()))


class _TokenBucket(object):
    __slots__ = ("_tokens", "_burst", "_rate", "_stamp")

    def __init__(self, burst, rate):
        self._tokens = float(burst)
        self._burst = float(burst)
        self._rate = float(rate)
        self._stamp = time.monotonic()

    def take(self):
        """Spend a token; False once the bucket is empty."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return self._tokens >= 0.0

    def refund(self, count):
        """Give back ``count`` tokens (up to the burst)."""
        self._tokens = min(self._burst, self._tokens + count)


# The early grant of a big window waits until the peer has used this much of
# its first one, unless it rides along with a frame of ours first: a short
# request and reply then costs no WNDINC frame of its own.
_EARLY_GRANT_AFTER = DEFAULT_WINDOW // 4


class Stream(object):
    """One muxado stream: a socket-like, file-like byte pipe.

    Get one from ``Session.open()`` or ``Session.accept()``.
    """

    def __init__(self, session, stream_id, window_size, announced):
        self.id = stream_id
        self.session = session
        # An RLock for its owner check only (see _hold_again): never taken
        # twice. So a signal handler must not call into a stream the main
        # thread may be in: it would run on half-updated state.
        self._lock = threading.RLock()
        self._readable = threading.Condition(self._lock)
        self._writable = threading.Condition(self._lock)
        self._timeout = None
        # receive side. Positions count the stream's buffered bytes from its
        # start: a read commits by one store to _read_pos, so an exception
        # (a signal handler's, in the main thread) can land anywhere in it
        # and leave the buffer whole; the window accounting catches up with
        # _read_pos later (_settle).
        self._chunks = collections.deque()   # (end position, bytes), in order
        self._read_pos = 0             # all before it has been read
        self._buffer_end = 0           # end of the last chunk
        self._accounted = 0            # reads up to here are in the window accounting
        self._waitall_want = 0         # a MSG_WAITALL read in the main thread waits for this
        self._recv_window = window_size   # what the peer may still send us
        self._window_size = window_size
        self._wndinc_threshold = max(1, window_size // 2)
        self._unacked = 0              # consumed, not yet granted back
        self._granted_ahead = 0        # buffered, granted back before it was read (MSG_WAITALL)
        self._kept = 0                 # handed to the receiver, not yet reported consumed
        self._grant_pending = window_size - DEFAULT_WINDOW  # the early grant for a big window
        self._fin_received = False
        self._read_shut = False
        self._readers_waiting = 0      # threads parked in recv on this stream
        self._receiver = None          # takes incoming data instead of the buffer (set_receiver)
        self._may_lead = True          # a thread blocked here may read the socket (set_lead_reads)
        # send side
        self._send_window = DEFAULT_WINDOW
        self._fin_sent = False
        self._unannounced = not announced  # SYN goes out with the first frame (Go's lazy open)
        # end states
        self._closed = False           # close() was called
        self._error = None             # a reset, or the session's end
        self._io_refs = 0              # makefile() objects still open
        self._io_lock = threading.Lock()   # guards _io_refs only; no allocation under it

    def __repr__(self):
        return "<muxado.Stream id=%d session=%r>" % (self.id, self.session.name)

    # -- socket-like interface -------------------------------------------------

    def settimeout(self, timeout):
        """As ``socket.settimeout``: None, 0 or seconds of any size a socket takes."""
        self._timeout = clock.check_timeout(timeout)

    def gettimeout(self):
        return self._timeout

    def setblocking(self, flag):
        self.settimeout(None if flag else 0.0)

    def getblocking(self):
        return self._timeout != 0.0

    def recv(self, bufsize, flags=0):
        """Up to ``bufsize`` bytes; ``b""`` once the peer has half-closed.

        As with sockets, ``MSG_PEEK`` leaves the data to be read again and
        ``MSG_WAITALL`` waits for all ``bufsize`` bytes (or EOF); it returns
        window to the peer while it waits, so ``bufsize`` may exceed the
        window (the stream then buffers up to ``bufsize`` bytes).
        """
        if flags & ~_RECV_FLAGS:
            raise ValueError("muxado streams take only MSG_PEEK and MSG_WAITALL")
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if bufsize == 0:
            return b""
        waitall = flags & socket.MSG_WAITALL
        start = end = None
        try:
            with self._lock:
                self._wait_readable(bufsize if waitall else 1)
                start = self._read_pos
                if start == self._buffer_end:
                    return b""
                if flags & socket.MSG_PEEK:
                    return self._copy_out(start, bufsize, True)
                data = self._copy_out(start, bufsize, bool(waitall))
                end = start + len(data)
                self._read_pos = end                  # the commit
                grant, later = self._after_read()
            self._return_window(grant, later)
            return data
        except BaseException:
            if end is not None:
                self._give_back(start, end)
            raise

    def recv_into(self, buffer, nbytes=0, flags=0):
        """Read into ``buffer``; returns the count, 0 once the peer has half-closed."""
        if flags:
            raise ValueError("muxado streams take no recv flags")
        view = _byte_view(buffer)
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes == 0 or nbytes > len(view):
            nbytes = len(view)
        if nbytes == 0:
            return 0
        start = end = None
        try:
            with self._lock:
                self._wait_readable()
                start = self._read_pos
                n = self._copy_into(view, start, nbytes)
                end = start + n
                self._read_pos = end                  # the commit
                grant, later = self._after_read()
            self._return_window(grant, later)
            return n
        except BaseException:
            if end is not None:
                self._give_back(start, end)
            raise

    def send(self, data, flags=0):
        """Send what the peer's window allows now (at least one byte); returns the count."""
        view = self._outgoing(data, flags)
        if not len(view):
            return 0
        return self._send_some(view, _Deadline(self._timeout))

    def sendall(self, data, flags=0):
        """Send all of ``data``, waiting for window as needed; the timeout covers the call."""
        view = self._outgoing(data, flags)
        if not len(view):
            return None
        deadline = _Deadline(self._timeout)
        while view:
            view = view[self._send_some(view, deadline):]
        return None

    def _outgoing(self, data, flags):
        """``data`` as a byte view; with nothing in it, the stream must still be writable."""
        if flags:
            raise ValueError("muxado streams take no send flags")
        view = _byte_view(data)
        if not len(view):
            with self._lock:
                self._check_writable()
        return view

    def _send_some(self, view, deadline):
        """One DATA frame of as much of ``view`` as the window allows; the count sent."""
        taken = None
        grant = 0
        written = collections.deque()
        try:
            with self._lock:
                self._wait_writable(deadline)
                n = min(len(view), self._send_window, self.session._max_frame)
                self._send_window -= n
                taken = n
                grant = self._take_grant()
            self.session._send_data(self, view[:n], 0, grant, written)
            return n
        except BaseException:
            if taken is not None and not written:
                # Cut short before the frame went (a signal handler's
                # exception, say): its window is ours again.
                self._unsend(taken, grant)
            raise

    def _unsend(self, n, grant):
        with self._lock:
            self._send_window += n
            self._grant_pending += grant
            self._writable.notify_all()

    def send_nowait(self, data):
        """Send all of ``data`` (a small message) without blocking the caller.

        The frame goes out at once if nobody is writing and the socket has
        room, else from the session's writer thread, in order with this
        stream's other ``send_nowait`` frames. Raises BlockingIOError if the
        peer's window cannot take it all now. For a heartbeat, whose thread must
        keep its own time even while a write to a stuck peer holds the
        session's write lock (the stream must be announced already).
        """
        view = self._outgoing(data, 0)
        n = len(view)
        with self._lock:
            self._check_writable()
            if self._unannounced:
                raise ValueError("send_nowait on a stream the peer has not heard of")
            if self._send_window < n:
                raise BlockingIOError(errno.EAGAIN, "no send window on stream %d" % self.id)
            self._send_window -= n
        self.session._queue_control(_DATA_HEADER.pack(n << 8 | _DATA_TYPE, self.id)
                                    + bytes(view))

    def announce(self):
        """Tell the peer of this stream now, if no frame has yet (see Session.open).

        Sends an empty DATA+SYN frame for a stream opened with
        ``announce=False``; does nothing once the SYN has gone out.
        """
        with self._lock:
            if not self._unannounced or self._fin_sent or self._closed or self._error is not None:
                return
            grant = self._take_grant()
        self.session._send_data(self, b"", 0, grant)

    def close_write(self):
        """Half-close: send FIN. The peer reads EOF; we can still read."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._fin_sent or self._error is not None:
                return
            self._fin_sent = True
            done = self._fin_received
            grant = self._take_grant()
        written = collections.deque()
        try:
            self.session._send_data(self, b"", FIN, grant, written)
        except BaseException as exc:
            if not written and not isinstance(exc, MuxadoError):
                # Cut short before the FIN went (a signal handler's
                # exception): a later close_write() or close() sends it.
                with self._lock:
                    self._fin_sent = False
                    self._grant_pending += grant
                done = False
            raise
        finally:
            if done:
                self.session._forget(self)

    def shutdown(self, how):
        """Like ``socket.shutdown``: SHUT_WR sends FIN, SHUT_RD drops further input.

        SHUT_RD drops what is buffered and what comes after, and gives its
        window back, so the peer is never left waiting; with nothing left
        unread, a close() after it is a FIN (see close).
        """
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError("invalid shutdown mode: %r" % (how,))
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                self._read_shut = True
                self._chunks.clear()
                self._read_pos = self._buffer_end   # dropped: consumed, as far as the window goes
                grant = self._settle()
                self._readable.notify_all()
                self.session._wake_leader(self)
            if grant:
                self.session._send_wndinc(self, grant)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.close_write()

    def reset(self, code=ErrorCode.STREAM_RESET, wait=True):
        """Abort the stream: RST to the peer, local calls fail with StreamResetError.

        With ``wait=False`` the RST never waits for the session's socket: it goes
        out at once if the socket has room, else from the session's writer thread.
        """
        if self._set_error(StreamResetError(code, "stream reset locally")):
            self.session._send_rst(self, code, wait)
        self.session._forget(self)

    def set_lead_reads(self, lead):
        """Whether a thread blocked on this stream may read the session's socket itself.

        On by default: the data it waits for then wakes that very thread. Turn
        it off for a stream that waits long between messages, such as a
        heartbeat: a thread leading must poll() so that it can be woken, which
        costs every other stream of the session a syscall per read.
        """
        self._may_lead = bool(lead)

    def set_receiver(self, receiver):
        """Hand incoming data to ``receiver`` instead of buffering it for recv().

        For forwarding without a thread per direction. The session's reader
        thread calls, with this stream's lock held:

        - ``receiver.stream_data(data)``: returns how many bytes it passed on
          at once; it keeps the rest and reports them with ``consumed(n)``
          once they are gone. Kept bytes count against the window, so they
          stay bounded by it.
        - ``receiver.stream_end(error)``: ``None`` for the peer's FIN, else
          the exception that ended the stream (reset, session end).

        Neither may block or call back into this stream. ``stream_end`` may
        return a function, which is called once the stream's lock is released
        (it may call into the stream). Data and an end that arrived before this
        call are handed over at once, in order.
        """
        after = None
        with self._lock:
            if self._receiver is not None:
                raise ValueError("stream %d already has a receiver" % self.id)
            self._receiver = receiver
            grant = self._settle()
            used = 0
            while self._chunks:
                end, chunk = self._chunks.popleft()
                if end <= self._read_pos:
                    continue
                offset = self._read_pos - (end - len(chunk))
                if offset:
                    chunk = memoryview(chunk)[offset:]
                self._read_pos = self._accounted = end
                took = receiver.stream_data(chunk)
                self._kept += len(chunk) - took
                used += took
            grant += self._consumed(used)
            if self._fin_received:
                after = receiver.stream_end(None)
            elif self._error is not None:
                after = receiver.stream_end(self._error)
        if grant:
            self.session._queue_control(encode_wndinc(self.id, grant))
        if after is not None:
            after()

    def consumed(self, nbytes):
        """A receiver has passed on ``nbytes`` it had kept: give the window back."""
        with self._lock:
            self._kept -= nbytes
            grant = self._consumed(nbytes)
        if grant:
            self.session._queue_control(encode_wndinc(self.id, grant))

    def close(self):
        """Close the stream and forget it; the peer is told, as by a TCP close.

        - Unread data (buffered, or kept by a receiver) while the peer may
          still send: RST STREAM_CLOSED instead of FIN, so that a peer
          waiting for window is not left waiting (TCP sends RST here too).
          The peer's calls then fail with its StreamResetError; data of ours
          it has not read yet is lost to it, as over TCP.
        - Else FIN if not sent yet, with the window consumed and not yet
          granted back if the peer may still send: its next DATA draws
          RST STREAM_CLOSED (as with Go) rather than a wait for window.
        - After the peer's FIN nothing more can come: a clean FIN, even
          with data left unread.

        makefile() objects keep the stream open until they are closed too,
        as with sockets.
        """
        with self._io_lock:
            if self._io_refs > 0:
                self._closed = "pending"
                return
        with self._lock:
            if self._closed is True:
                return
            peer_sending = not self._fin_received and self._error is None
            abort = peer_sending and (self._buffer_end != self._read_pos or self._kept)
            send_fin = not self._fin_sent and self._error is None and not abort
            grant = 0
            if peer_sending and not abort:
                grant = self._settle() + self._take_grant() + self._unacked
                self._unacked = 0
            self._finish_close_locked()
            self._fin_sent = True
        try:
            if abort:
                self.session._send_rst(self, ErrorCode.STREAM_CLOSED)
            elif send_fin:
                self.session._send_data(self, b"", FIN, grant)
            elif grant:
                self.session._send_wndinc(self, grant)
        except (MuxadoError, OSError):
            pass
        self.session._forget(self)

    def _finish_close_locked(self):
        self._closed = True
        self._chunks.clear()
        self._read_pos = self._buffer_end
        self._readable.notify_all()
        self._writable.notify_all()
        self.session._wake_leader(self)

    def _decref_socketios(self):
        # May run from a file object's finaliser, in any thread, even one that
        # holds self._lock: so no stream lock and no I/O here. The writer
        # thread finishes a close that was waiting for the last file object.
        with self._io_lock:
            self._io_refs -= 1
            final = self._io_refs <= 0 and self._closed == "pending"
            if final:
                self._closed = False
        if final:
            if self.session.closed:
                self._closed = True   # nothing left to tell the peer
            else:
                self.session._defer(self.close)

    @property
    def closed(self):
        return self._closed is True

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
                data = self.recv(_RECV_SIZE)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        return self.recv(size)

    def readall(self):
        return self.read()

    def write(self, data):
        return self.send(data)

    # -- internals (callers hold self._lock where noted) ------------------------

    def _closed_error(self):
        return SessionClosedError(ErrorCode.STREAM_CLOSED, "stream is closed")

    def _copy_out(self, start, bufsize, whole):
        """Up to ``bufsize`` buffered bytes from position ``start`` (lock held); no state changes.

        ``whole``: only all ``bufsize`` bytes, or all there are, will do
        (MSG_WAITALL, MSG_PEEK); else a first chunk that fits is returned as
        it is, without a copy.
        """
        chunks = self._chunks
        while chunks and chunks[0][0] <= start:
            chunks.popleft()          # read before: only dropping is left
        end, chunk = chunks[0]
        offset = start - (end - len(chunk))
        if offset == 0 and (len(chunk) == bufsize or len(chunk) < bufsize and (
                len(chunks) == 1 or not whole)):
            return chunk if type(chunk) is bytes else bytes(chunk)
        data = bytearray()
        for end, chunk in chunks:
            if offset:
                data += memoryview(chunk)[offset:offset + bufsize - len(data)]
                offset = 0
            else:
                data += memoryview(chunk)[:bufsize - len(data)]
            if len(data) >= bufsize:
                break
        return bytes(data)

    def _copy_into(self, view, start, nbytes):
        """Copy up to ``nbytes`` from position ``start`` into ``view`` (lock held); the count."""
        chunks = self._chunks
        while chunks and chunks[0][0] <= start:
            chunks.popleft()
        n = 0
        for end, chunk in chunks:
            offset = start + n - (end - len(chunk))
            take = min(len(chunk) - offset, nbytes - n)
            view[n:n + take] = memoryview(chunk)[offset:offset + take]
            n += take
            if n >= nbytes:
                break
        return n

    def _after_read(self):
        """The window owed after a read: (increment to send now, position to settle later).

        Lock held. The main thread leaves the accounting to the writer thread
        (see _settle_later), which no signal handler interrupts; it only says
        up to where, when a WNDINC may be due (else 0).
        """
        if threading.get_ident() != _MAIN_IDENT:
            return self._settle(), 0
        self._waitall_want = 0
        return 0, self._read_pos if self._settle_due() else 0

    def _return_window(self, grant, later):
        """Send what _after_read owes: a WNDINC now, or a settle on the writer thread."""
        if grant:
            self.session._send_wndinc(self, grant)
        elif later:
            self.session._defer(functools.partial(self._settle_later, later))

    def _settle_due(self):
        unsettled = self._read_pos - self._accounted
        return unsettled > 0 and (self._grant_pending > 0 or self._waitall_want > 0
                                  or self._unacked + unsettled >= self._wndinc_threshold)

    def _settle(self, upto=None):
        """Bring the window accounting up to _read_pos, or ``upto`` (lock held).

        Returns the WNDINC increment owed now.
        """
        position = self._read_pos if upto is None else min(upto, self._read_pos)
        n = position - self._accounted
        if n <= 0:
            return 0
        self._accounted = position
        return self._consumed(n)

    def _settle_later(self, upto):
        """The writer thread settles main-thread reads up to ``upto`` (see _after_read).

        Up to where the read stood, not further, so that WNDINCs come in the
        same steps as from any other thread.
        """
        with self._lock:
            grant = self._settle(upto)
            if self._waitall_want:
                grant += self._grant_while_waiting(self._waitall_want)
        if grant:
            self.session._send_wndinc(self, grant)

    def _give_back(self, start, end):
        """Undo a read that an exception cut short before it returned (main thread).

        Only while nobody has read on since and the bytes are still buffered.
        A second exception meanwhile waits until it is done.
        """
        interrupted = None
        while True:
            try:
                with self._lock:
                    if self._read_pos == end and self._chunks:
                        first_end, first = self._chunks[0]
                        if first_end - len(first) <= start:
                            self._read_pos = start
                            # _accounted may stay ahead: what it covers was
                            # given back to the peer already and is not
                            # counted twice (see _settle).
                break
            except BaseException as exc:
                if interrupted is None:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _wait_readable(self, want=1):
        """Wait until ``want`` bytes are buffered, or EOF, or an error (lock held).

        Buffered data is returned before an error is raised.
        """
        if self._buffer_end - self._read_pos >= want:
            return
        deadline = None
        while True:
            if self._closed is True:
                raise self._closed_error()
            if self._buffer_end - self._read_pos >= want or self._fin_received or self._read_shut:
                return
            if self._error is not None:
                if self._buffer_end != self._read_pos:
                    return
                raise self._error
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no data ready on stream %d" % self.id)
            if deadline is None:
                deadline = _Deadline(self._timeout)
            remaining = deadline.remaining()
            if remaining == 0.0:
                raise _timeout_error("recv")
            if threading.get_ident() == _MAIN_IDENT:
                # The writer thread returns the window (see _after_read);
                # ready() is not used, as the main thread never leads reads.
                self._waitall_want = want if want > 1 else 0
                if self._settle_due() or want > 1 and (
                        self._grant_pending or self._early_return(want)[0] > 0):
                    self.session._defer(functools.partial(self._settle_later, self._read_pos))
                ready = None
            elif want == 1:
                ready = self._input_ready
                if self._read_pos != self._accounted:   # the main thread read here too
                    grant = self._settle()
                    if grant:
                        self._lock.release()
                        try:
                            self.session._queue_control(encode_wndinc(self.id, grant))
                        finally:
                            self._lock.acquire()
                        continue
            else:
                grant = self._settle() + self._grant_while_waiting(want)
                if grant:
                    self._lock.release()
                    try:
                        self.session._queue_control(encode_wndinc(self.id, grant))
                    finally:
                        self._lock.acquire()
                    continue

                def ready():
                    return (self._buffer_end - self._read_pos >= want
                            or self._fin_received or self._read_shut
                            or self._error is not None or self._closed is True
                            or self._early_return(want)[0] > 0)
            self._wait_on(self._readable, ready, deadline, remaining, True)

    def _early_return(self, want):
        """(increment, of it granted ahead) a MSG_WAITALL for ``want`` bytes owes now (lock held).

        A caller waiting for more than the window must not wait for its own
        read to return the window. So while it waits, what is consumed and
        not yet granted goes back, and so do buffered bytes, ahead of their
        reading, but only as far as lets ``want`` bytes in: the buffer stays
        within max(window, want). Batched as any WNDINC (half a window).
        """
        if self._fin_received or self._error is not None or self._read_shut:
            return 0, 0
        # buffered, window not yet returned
        unread = self._buffer_end - self._read_pos - self._granted_ahead
        if self._unacked + unread < self._wndinc_threshold:
            return 0, 0
        ahead = max(0, min(unread, want - self._window_size - self._granted_ahead))
        return self._unacked + ahead, ahead

    def _grant_while_waiting(self, want):
        """The WNDINC increment to send now for a MSG_WAITALL read, accounted (lock held)."""
        # The early grant of a big window first: the peer may not send
        # more than the first window without it.
        grant = self._take_grant()
        if grant:
            return grant
        grant, ahead = self._early_return(want)
        if grant:
            self._recv_window += grant
            self._unacked = 0
            self._granted_ahead += ahead
        return grant

    def _input_ready(self):
        return (self._buffer_end != self._read_pos or self._fin_received or self._read_shut
                or self._error is not None or self._closed is True)

    def _window_ready(self):
        return (self._send_window > 0 or self._error is not None or self._fin_sent
                or self._closed is True)

    def _wait_on(self, condition, ready, deadline, remaining, reading):
        """Block until ``ready()`` may have changed (lock held, released while waiting).

        If nobody is reading the session's socket, read it ourselves (see
        Session._lead_until): the data we wait for then wakes this very
        thread, with no handoff from the reader thread.
        """
        session = self.session
        if self._may_lead and session._try_lead(self):
            self._lock.release()
            try:
                session._lead_until(ready, deadline)
            finally:
                self._lock.acquire()
            return
        if reading:
            self._readers_waiting += 1
        session._park(1)
        try:
            condition.wait(remaining)
        finally:
            if threading.get_ident() == _MAIN_IDENT:
                _hold_again(self._lock)
            session._park(-1)
            if reading:
                self._readers_waiting -= 1

    def _check_writable(self):
        if self._closed is True:
            raise self._closed_error()
        if self._error is not None:
            raise self._error
        if self._fin_sent:
            raise StreamClosedError(ErrorCode.STREAM_CLOSED, "stream is closed for writing")

    def _wait_writable(self, deadline):
        """Wait for send window (lock held). Raises on error or timeout."""
        while True:
            self._check_writable()
            if self._send_window > 0:
                return
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no send window on stream %d" % self.id)
            remaining = deadline.remaining()
            if remaining == 0.0:
                raise _timeout_error("send")
            self._wait_on(self._writable, self._window_ready, deadline, remaining, False)

    def _consumed(self, n):
        """Account for ``n`` bytes consumed (lock held); the WNDINC increment to send, or 0."""
        if self._granted_ahead:
            early = min(n, self._granted_ahead)   # their window went back already
            self._granted_ahead -= early
            n -= early
        if not n and not self._grant_pending:
            return 0
        self._unacked += n
        if self._fin_received or self._error is not None:
            return 0
        if self._unacked >= self._wndinc_threshold or (
                self._grant_pending
                and self._unacked + self._buffer_end - self._read_pos >= _EARLY_GRANT_AFTER):
            grant = self._unacked + self._grant_pending
            self._recv_window += self._unacked
            self._unacked = 0
            self._grant_pending = 0
            return grant
        return 0

    def _take_grant(self):
        """The early window grant, if still owed, to ride along with a frame (lock held)."""
        grant = self._grant_pending
        if grant:
            self._grant_pending = 0
        return grant

    def _set_error(self, error):
        """Make ``error`` terminal; False if the stream had already ended."""
        after = None
        with self._lock:
            if self._error is not None or self._closed is True:
                return False
            self._error = error
            if isinstance(error, StreamResetError):
                # A reset is abortive, as with TCP: unread data is dropped.
                self._chunks.clear()
                self._read_pos = self._buffer_end
            self._readable.notify_all()
            self._writable.notify_all()
            if self._receiver is not None:
                after = self._receiver.stream_end(error)
            self.session._wake_leader(self)
        if after is not None:
            after()
        return True

    # -- called by the session's reader thread ------------------------------------

    def _admit(self, length):
        """Take a DATA frame of ``length`` against the window. 1 ok, 0 gone, -1 overrun."""
        with self._lock:
            if self._closed is True or self._error is not None:
                return 0
            if length > self._recv_window:
                return -1
            self._recv_window -= length
            return 1

    def _receive(self, data, fin):
        """A whole DATA frame: window check, payload and FIN under one lock.

        Returns 1, 0 if the stream is gone, or -1 if the frame overran the window.
        """
        with self._lock:
            if self._closed is True or self._error is not None:
                return 0
            if len(data) > self._recv_window:
                return -1
            self._recv_window -= len(data)
            grant = self._deliver_locked(data)
            done = False
            after = None
            if fin:
                self._fin_received = True
                self._readable.notify_all()
                if self._receiver is not None:
                    after = self._receiver.stream_end(None)
                done = self._fin_sent
        if grant:
            self.session._queue_control(encode_wndinc(self.id, grant))
        if done:
            self.session._forget(self)
        if after is not None:
            after()
        return 1

    def _deliver(self, data):
        """A piece of a DATA frame; False if the stream was closed since (answer RST)."""
        with self._lock:
            if self._error is not None:
                return True     # reset mid-frame: dropped (the peer has our RST)
            if self._closed is True:
                return False
            grant = self._deliver_locked(data)
        if grant:
            self.session._queue_control(encode_wndinc(self.id, grant))
        return True

    def _deliver_locked(self, data):
        """Buffer ``data`` or hand it on; the WNDINC increment owed now, or 0."""
        if self._receiver is not None and not self._read_shut:
            used = self._receiver.stream_data(data)
            self._kept += len(data) - used
            return self._consumed(used)
        if self._read_shut or self._closed is True:
            return self._consumed(len(data))
        self._buffer_end += len(data)
        self._chunks.append((self._buffer_end, data))
        if self._readers_waiting:
            self.session._handoffs += 1   # a parked reader will come back for more
            # All: a waiter that a signal handler's exception abandoned
            # must not take the one wake-up (see _hold_again).
            self._readable.notify_all()
        return 0

    def _on_fin(self):
        after = None
        with self._lock:
            self._fin_received = True
            self._readable.notify_all()
            if self._receiver is not None:
                after = self._receiver.stream_end(None)
            done = self._fin_sent
        if after is not None:
            after()
        return done

    def _on_window(self, increment):
        """Add to the send window; False if it would pass 2^31-1."""
        with self._lock:
            window = self._send_window + increment
            if window > MAX_WINDOW:
                return False
            self._send_window = window
            self._writable.notify_all()
            return True


class _FrameDispatch(FrameHandler):
    """Applies decoded frames to a session (runs in its reader thread)."""

    def __init__(self, session):
        self._session = session
        self._target = None    # stream taking the current DATA frame's payload
        self._fin_target = None

    def data(self, stream_id, flags, payload):
        # The hot path: one lookup and one lock round-trip per frame.
        stream = self._session._streams.get(stream_id)
        if stream is None or flags & SYN or not len(payload):
            FrameHandler.data(self, stream_id, flags, payload)
            return
        status = stream._receive(payload.tobytes(), flags & FIN)
        if status < 0:
            self._overrun(stream)
        elif status == 0:
            self._session._reply(encode_rst(stream_id, ErrorCode.STREAM_CLOSED))

    def _overrun(self, stream):
        session = self._session
        _log_stream_fault("%s: stream %d overran its receive window; resetting it",
                          session.name, stream.id)
        session._abort_stream(stream, ErrorCode.FLOW_CONTROL_ERROR, "flow control violated")

    def data_begin(self, stream_id, flags, length):
        session = self._session
        self._target = None
        self._fin_target = None
        if flags & SYN:
            stream = session._on_syn(stream_id)
            if stream is None:
                return
        else:
            stream = session._streams.get(stream_id)
            if stream is None:
                session._pointless_frame("frames on unknown streams")
                if not (length == 0 and flags & FIN):
                    session._reply(encode_rst(stream_id, ErrorCode.STREAM_CLOSED))
                return
            if length == 0 and not flags:
                session._pointless_frame("empty DATA frames")
                return
        if length:
            admitted = stream._admit(length)
            if admitted == 0:
                session._reply(encode_rst(stream_id, ErrorCode.STREAM_CLOSED))
                return
            if admitted < 0:
                self._overrun(stream)
                return
            self._target = stream
        self._fin_target = stream

    def data_chunk(self, chunk):
        target = self._target
        if target is not None and not target._deliver(chunk.tobytes()):
            # Closed mid-frame: the rest is dropped (its FIN too), and the peer told so.
            self._target = None
            self._fin_target = None
            self._session._reply(encode_rst(target.id, ErrorCode.STREAM_CLOSED))

    def data_end(self, stream_id, flags):
        stream = self._fin_target
        self._target = None
        self._fin_target = None
        if stream is not None and flags & FIN:
            if stream._on_fin():
                self._session._forget(stream)

    def rst(self, stream_id, code):
        self._session._on_rst(stream_id, code)

    def wndinc(self, stream_id, increment):
        session = self._session
        stream = session._streams.get(stream_id)
        if stream is None:
            session._pointless_frame("frames on unknown streams")
        elif not stream._on_window(increment):
            _log_stream_fault("%s: WNDINC overflows stream %d's window; resetting it",
                              session.name, stream_id)
            session._abort_stream(stream, ErrorCode.FLOW_CONTROL_ERROR,
                                  "send window overflow")

    def goaway(self, last_stream_id, code, debug):
        self._session._on_goaway(last_stream_id, code, debug)

    def unknown(self, ftype, flags, stream_id, length, body):
        self._session._pointless_frame("frames of unknown type")


_session_ids = itertools.count(1)


class Session(object):
    """A muxado session over a connected socket, which it owns from now on.

    ``client`` is True on the side that dialed. Options:

    - ``window_size``: each stream's receive window (default and minimum
      256 KiB; more is granted to the peer with an early WNDINC)
    - ``accept_backlog``: streams waiting for ``accept()`` (default None:
      ``max_streams``). More are refused with RST ACCEPT_QUEUE_FULL. The
      reader never waits for room, so a smaller backlog refuses bursts that
      an application accepting at once would have taken; the memory of
      queued streams is bounded anyway, by max_streams times the window.
    - ``max_streams``: peer-opened streams open at once (default 1024);
      more are refused with RST STREAM_REFUSED
    - ``write_timeout``: seconds a write may make no progress before the
      session ends with WRITE_TIMEOUT (default 30; None for no limit)
    - ``max_frame_size``: largest DATA payload we send (default 256 KiB)
    - ``flood_limit``: (burst, per second) for pointless frames and
      self-reset streams (default 10,000 and 1,000)
    - ``name``: for logs and thread names
    - ``read_budget``: bytes the peer may send in all (default: no cap)

    ``set_read_budget`` caps what the peer may send in all (say, before it
    has authenticated); ``set_window_size`` changes the window of streams
    opened from then on.

    ``last_received`` is the ``time.monotonic()`` of the last socket read
    that got bytes (at first, the session's start): a heartbeat counts any
    byte from the peer as a sign of life.
    """

    def __init__(self, sock, client=True, window_size=DEFAULT_WINDOW, accept_backlog=None,
                 max_streams=1024, write_timeout=DEFAULT_WRITE_TIMEOUT,
                 max_frame_size=DEFAULT_WINDOW, flood_limit=DEFAULT_FLOOD_LIMIT, name=None,
                 read_budget=None):
        if not DEFAULT_WINDOW <= window_size <= MAX_WINDOW:
            raise ValueError("window_size must be between %d and %d" % (DEFAULT_WINDOW, MAX_WINDOW))
        if not 1 <= max_frame_size <= MAX_LENGTH:
            raise ValueError("max_frame_size must be between 1 and %d" % MAX_LENGTH)
        if accept_backlog is None:
            accept_backlog = max_streams
        if accept_backlog < 1 or max_streams < 1:
            raise ValueError("accept_backlog and max_streams must be at least 1")
        self.client = bool(client)
        self.name = name or "muxado-%s-%d" % ("client" if client else "server", next(_session_ids))
        self._sock = sock
        self._window_size = int(window_size)
        self._accept_backlog = int(accept_backlog)
        self._max_streams = int(max_streams)
        self._max_frame = int(max_frame_size)
        self._write_timeout = write_timeout
        self._pointless = _TokenBucket(*flood_limit)
        self._self_resets = _TokenBucket(*flood_limit)

        self._lock = threading.RLock()           # streams, ids, accept queue, state
        self._accept_ready = threading.Condition(self._lock)
        self._write_lock = threading.Lock()      # one whole frame (or batch) at a time
        self._control = collections.deque()      # frames from the reader, for the writer thread
        # Conditions are entered by their locks (a C __enter__): a signal
        # handler's exception in Condition.__enter__, Python code, could
        # leave the lock taken for good.
        self._control_lock = threading.Lock()
        self._control_ready = threading.Condition(self._control_lock)
        self._streams = {}
        self._accept_queue = collections.deque()
        self._remote_streams = 0
        self._next_id = 3 if client else 2       # as Go: the client's first stream is 3
        self._last_remote_id = 0 if client else 1  # reported in GOAWAY, as Go does
        self._local_parity = 1 if client else 0
        self._local_goaway = False
        self.remote_goaway = None                # (last_stream_id, code, debug) once received
        self._dead = False
        self.error = None                        # why the session ended, once it has
        self._ended = threading.Event()
        self._goodbye_done = threading.Event()   # _die has tried its GOAWAY and shut the socket
        self._done_callbacks = []
        # time.monotonic() of the last read that got bytes: any byte proves the peer alive
        self.last_received = time.monotonic()

        # Reading: whoever holds the lead reads the socket (see _lead_until).
        self._lead_lock = threading.Lock()
        self._lead = threading.Condition(self._lead_lock)
        self._leader = None          # _BACKGROUND, _CONSUMER, or None
        self._leading_for = None     # the stream a _CONSUMER leader waits on (None: accept)
        self._lead_urgent = False    # someone is parked: the reader thread must read now
        self._lead_released = 0.0    # when a consumer last let go of the lead
        self._lead_epoch = 0         # counts consumer leads, to see activity
        self._parked = 0             # threads blocked on a stream's data or window
        self._handoffs = 0           # parked readers woken by the current leader
        # Starts small (idle and half-open sessions stay cheap); the first
        # read that fills it grows it to _RECV_SIZE.
        self._read_budget = read_budget   # bytes the peer may still send (set_read_budget)
        self._recv_buffer = bytearray(_FIRST_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._decoder = FrameDecoder(_FrameDispatch(self))
        self._poller = None
        self._wake_r, self._wake_w = socket.socketpair()   # see _wake_leader
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        self._peername = self._sockname = None
        try:
            self._peername = sock.getpeername()
            self._sockname = sock.getsockname()
        except OSError:
            pass
        sock.settimeout(None)
        self._use_sendmsg = not _is_tls(sock) and hasattr(sock, "sendmsg")
        _tune_socket(sock, write_timeout)

        self._reader = threading.Thread(target=self._read_loop, name=self.name)
        self._reader.daemon = True
        self._writer = threading.Thread(target=self._control_loop, name=self.name + "-writer")
        self._writer.daemon = True
        self._writer.start()   # first: a reader that ends at once joins the writer
        self._reader.start()
        log.debug("%s: started on %s <-> %s", self.name, self._sockname, self._peername)

    def __repr__(self):
        return "<muxado.Session %s%s>" % (self.name, " closed" if self._dead else "")

    # -- public interface ------------------------------------------------------------

    @property
    def closed(self):
        return self._dead

    def open(self, announce=True):
        """Open a new stream.

        With ``announce`` (the default) the peer learns of it at once, from an
        empty DATA+SYN frame, so that protocols where the server speaks first
        work. ``announce=False`` sends the SYN with the first frame, as Go does.
        """
        with self._lock:
            if self._dead:
                raise self._ended_error()
            if self.remote_goaway is not None:
                raise RemoteGoneAwayError(ErrorCode.REMOTE_GONE_AWAY, "remote gone away")
            stream_id = self._next_id
            if stream_id > MAX_STREAM_ID:
                raise MuxadoError(ErrorCode.STREAMS_EXHAUSTED, "streams exhausted")
            self._next_id += 2
            stream = Stream(self, stream_id, self._window_size, announced=False)
            self._streams[stream_id] = stream
        if announce:
            with stream._lock:
                grant = stream._take_grant()
            try:
                self._send_data(stream, b"", 0, grant)
            except MuxadoError:
                self._forget(stream)
                raise
        return stream

    def set_window_size(self, window_size):
        """The receive window (bytes) of streams opened from now on, by either side.

        Raises ValueError outside 256 KiB .. 2**31-1, as the constructor does.
        """
        if not DEFAULT_WINDOW <= window_size <= MAX_WINDOW:
            raise ValueError("window_size must be between %d and %d" % (DEFAULT_WINDOW, MAX_WINDOW))
        self._window_size = int(window_size)

    def set_read_budget(self, nbytes):
        """Let the peer send at most ``nbytes`` more bytes in all (frames included);
        past that the session ends with ENHANCE_YOUR_CALM. None lifts the cap.

        For a peer not yet trusted (before it has registered): what it can make
        us read, buffer and decode is bounded, whatever frames it sends. While a
        budget is set, the read buffer stays small.
        """
        self._read_budget = None if nbytes is None else int(nbytes)

    def accept(self, timeout=None):
        """The next stream the peer opened.

        Raises ``socket.timeout`` after ``timeout`` seconds, and
        ``SessionClosedError`` once the session has ended, or once this side
        has sent GOAWAY and no opened stream is left to accept.
        """
        deadline = _Deadline(timeout)
        with self._lock:
            while not self._accept_queue:
                if self._dead:
                    raise self._ended_error()
                if self._local_goaway:
                    raise SessionClosedError(ErrorCode.NO_ERROR,
                                             "no new streams: this side sent GOAWAY")
                remaining = deadline.remaining()
                if remaining == 0.0:
                    raise _timeout_error("accept")
                if self._try_lead(None):
                    # Read the socket ourselves: the SYN then wakes this thread.
                    self._lock.release()
                    try:
                        self._lead_until(self._accept_ready_now, deadline)
                    finally:
                        self._lock.acquire()
                    continue
                # Not counted as parked: a new stream can wait out LEAD_GRACE.
                try:
                    self._accept_ready.wait(remaining)
                finally:
                    if threading.get_ident() == _MAIN_IDENT:
                        _hold_again(self._lock)
            return self._accept_queue.popleft()

    def _accept_ready_now(self):
        return self._accept_queue or self._dead or self._local_goaway

    def goaway(self, code=ErrorCode.NO_ERROR, debug=b""):
        """Refuse new streams from the peer; open streams carry on (a drain)."""
        with self._lock:
            if self._dead:
                raise self._ended_error()
            self._local_goaway = True
            last_id = self._last_remote_id
            self._accept_ready.notify_all()
        self._wake_leader()
        # The pad keeps a Go peer in step: its GOAWAY reader swallows 8 bytes too many.
        self._write([encode_goaway(last_id, code, debug), PAD_FRAME])

    def close(self):
        """GOAWAY, then close the transport and end every stream. Idempotent.

        Returns once the session's threads have ended and its socket is closed.
        """
        self._die(ErrorCode.SESSION_CLOSED, "session closed",
                  goaway=(ErrorCode.NO_ERROR, b"no error"))
        me = threading.current_thread()
        for thread in (self._reader, self._writer):
            if thread is not me:
                thread.join()

    def wait(self, timeout=None):
        """Wait for the session to end; True once it has (threads done, socket closed)."""
        return self._ended.wait(timeout)

    def add_done_callback(self, callback):
        """Call ``callback(session)`` once the session has ended (at once if it has).

        It runs on the session's reader thread and must not block.
        """
        with self._lock:
            if not self._ended.is_set():
                self._done_callbacks.append(callback)
                return
        callback(self)

    def getpeername(self):
        return self._peername

    def getsockname(self):
        return self._sockname

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- writing ------------------------------------------------------------------------

    def _write(self, buffers):
        """Write whole frames, in order, as one unit. Raises SessionClosedError."""
        # No timeout here: a writer queued behind others on a slow link is
        # not a stuck peer. The holder's SO_SNDTIMEO bounds a write that
        # makes no progress, and its failure ends the session for us all.
        failure = None
        with self._write_lock:   # a C __enter__: no exception between taking and try
            try:
                if self._dead:
                    raise self._ended_error()
                self._sendv(buffers)
            except OSError as exc:
                failure = exc
        if failure is not None:
            self._write_failed(failure)

    def _write_failed(self, exc):
        if isinstance(exc, BlockingIOError) or isinstance(exc, socket.timeout):
            log.warning("%s: peer stopped reading; write timed out after %ss",
                        self.name, self._write_timeout)
            self._die(ErrorCode.WRITE_TIMEOUT, "write timed out")
        else:
            self._die(ErrorCode.SESSION_CLOSED, "transport write failed: %s" % exc)
        raise self._ended_error()

    def _send_data(self, stream, payload, flags, grant, written=None):
        """One DATA frame for ``stream`` (plus its early window grant, if owed).

        ``written``, a deque, is not empty once the frame's first bytes went
        out (then all of it did, see _sendv_shielded): a caller whose call an
        exception cut short learns whether the frame was sent.
        """
        if written is None:
            written = collections.deque()
        header = _DATA_HEADER.pack(len(payload) << 8 | _DATA_TYPE | flags, stream.id)
        # No timeout here: a writer queued behind others on a slow link is
        # not a stuck peer. The holder's SO_SNDTIMEO bounds a write that
        # makes no progress, and its failure ends the session for us all.
        failure = None
        with self._write_lock:
            announcing = False
            try:
                if self._dead:
                    raise self._ended_error()
                if stream._unannounced:
                    # Cleared before the write, as an RST from another thread
                    # must know that the peer hears of the stream now.
                    announcing = True
                    stream._unannounced = False
                    header = _DATA_HEADER.pack(len(payload) << 8 | _DATA_TYPE | flags | SYN,
                                               stream.id)
                if grant:
                    self._sendv((header, payload, encode_wndinc(stream.id, grant)), written)
                elif payload:
                    self._sendv((header, payload), written)
                else:
                    self._sendv((header,), written)
            except OSError as exc:
                failure = exc
            except BaseException:
                if announcing and not written:
                    stream._unannounced = True   # cut short before the SYN went
                raise
        if failure is not None:
            self._write_failed(failure)

    def _send_wndinc(self, stream, increment):
        try:
            self._write((encode_wndinc(stream.id, increment),))
        except MuxadoError:
            pass  # the session has ended; the stream's next call says so

    def _send_rst(self, stream, code, wait=True):
        if stream._unannounced:
            return  # the peer never heard of it
        if not wait:
            self._queue_control(encode_rst(stream.id, code))
            return
        try:
            self._write((encode_rst(stream.id, code),))
        except MuxadoError:
            pass

    def _sendv(self, buffers, written=None):
        """Write ``buffers`` whole (write lock held).

        ``written``, a deque, gets the count of each write appended.
        """
        sock = self._sock
        if threading.get_ident() == _MAIN_IDENT:
            self._sendv_shielded(buffers, collections.deque() if written is None else written)
            return
        if not self._use_sendmsg or len(buffers) > _MAX_IOV:
            sock.sendall(b"".join(buffers))
            if written is not None:
                written.append(1)
            return
        sent = sock.sendmsg(buffers)
        if written is not None:
            written.append(sent)
        remaining = 0
        for buf in buffers:
            remaining += len(buf)
        if sent == remaining:
            return
        pending = collections.deque(memoryview(b) for b in buffers)
        while True:
            remaining -= sent
            if remaining <= 0:
                return
            while sent:
                first = pending[0]
                if sent >= len(first):
                    sent -= len(first)
                    pending.popleft()
                else:
                    pending[0] = first[sent:]
                    sent = 0
            sent = sock.sendmsg(list(pending))

    def _sendv_shielded(self, buffers, written):
        """_sendv for the main thread, where a signal handler may raise anywhere.

        Each write's count is appended by C code (``deque.extend`` over
        ``map``), so that no exception can come between a write and the
        record of it. If nothing went, an exception goes on at once (the
        caller may take the frame back); once part of the unit went, the
        rest goes too and the exception is raised after: half a frame
        would leave the peer reading garbage.
        """
        sock = self._sock
        if not self._use_sendmsg:
            # A TLS transport writes records in Python code: not shielded.
            # Counted as begun, so that a frame cut short never gives its
            # window back twice over (a stall is the lesser harm).
            written.append(0)
            sock.sendall(b"".join(buffers))
            return
        interrupted = None
        try:
            if len(buffers) <= _MAX_IOV:
                written.extend(map(sock.sendmsg, (buffers,)))
            else:
                written.extend(map(sock.send, (b"".join(buffers),)))
        except OSError:
            raise
        except BaseException as exc:
            if not written:
                raise
            interrupted = exc
        data = None
        while True:
            try:
                if data is None:
                    data = memoryview(b"".join(buffers))
                done = sum(written)
                if done >= len(data):
                    break
                written.extend(map(sock.send, (data[done:],)))
            except OSError:
                raise
            except BaseException as exc:
                if interrupted is None:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _reply(self, frame):
        """A frame the reader thread owes the peer (an RST, say), via the writer.

        The queue is bounded: a peer that keeps sending frames that need an
        answer while it does not read ours is flooding us.
        """
        if len(self._control) >= MAX_QUEUED_REPLIES:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM,
                                "too many replies queued: the peer does not read them")
        self._queue_control(frame)

    def _queue_control(self, frame):
        """Send a small frame without ever blocking: the reader must not block.

        Waking the writer thread costs more than the frame, so first try to
        send it at once: if nobody is writing and the socket has room, it
        goes out now. Otherwise the writer thread sends it.
        """
        # Not in the main thread: nothing there may stand between a
        # non-blocking acquire and the try that releases (a signal handler
        # may raise there); the writer thread sends it instead.
        if (self._use_sendmsg and threading.get_ident() != _MAIN_IDENT
                and self._write_lock.acquire(False)):
            failure = None
            sent = 0
            try:
                if not self._control and not self._dead:
                    try:
                        sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        pass   # the writer thread meets the error and ends the session
                    if 0 < sent < len(frame):
                        # A partial frame must be finished before anything
                        # else: a few bytes, only when the socket was all
                        # but full, and bounded by write_timeout.
                        try:
                            self._sendv((memoryview(frame)[sent:],))
                        except OSError as exc:
                            failure = exc
            finally:
                self._write_lock.release()
            if failure is not None:
                self._write_failed_quietly(failure)
            if sent:
                return
        self._hand_to_writer(frame)

    def _hand_to_writer(self, item):
        with self._control_lock:
            self._control.append(item)
            self._control_ready.notify()

    def _write_failed_quietly(self, exc):
        try:
            self._write_failed(exc)
        except MuxadoError:
            pass

    def _defer(self, action):
        """Run ``action()`` on the writer thread, which holds no stream lock."""
        self._hand_to_writer(action)

    def _control_loop(self):
        try:
            while True:
                with self._control_lock:
                    while not self._control and not self._dead:
                        self._control_ready.wait()
                    if self._dead:
                        return
                    items = list(self._control)
                    self._control.clear()
                frames = []
                for item in items:
                    if callable(item):
                        if frames:
                            self._write(frames)
                            frames = []
                        item()
                    else:
                        frames.append(item)
                if frames:
                    self._write(frames)
        except MuxadoError:
            pass
        except Exception:
            log.exception("%s: writer thread failed", self.name)
            self._die(ErrorCode.INTERNAL_ERROR, "writer thread failed")

    # -- reading (reader thread) ------------------------------------------------------

    # Reading is leader/follower. Exactly one thread at a time, the leader,
    # reads the socket and applies frames. A thread about to block on a
    # stream takes the lead if it is free, so that in request/response
    # traffic the reply wakes the very thread waiting for it: a thread
    # handoff costs tens of microseconds, more than the whole round trip.
    # The reader thread leads whenever no consumer does: at once if anyone
    # is parked waiting, else after LEAD_GRACE, giving a consumer that just
    # got its data the chance to come back and lead again.

    def _read_loop(self):
        try:
            while self._wait_to_lead():
                try:
                    alive = self._read_once()
                finally:
                    self._release_lead(background=True)
                if not alive:
                    break
        except Exception:
            log.exception("%s: reader thread failed", self.name)
            self._die(ErrorCode.INTERNAL_ERROR, "reader thread failed",
                      goaway=(ErrorCode.INTERNAL_ERROR, b"internal error"))
        finally:
            self._die(ErrorCode.SESSION_CLOSED, "session closed")
            with self._lead_lock:
                # A consumer may still be leading; the shut socket ends its read soon.
                while self._leader is not None:
                    self._lead.wait()
                self._leader = _BACKGROUND   # for good: nobody reads a closed socket
            self._recv_view.release()
            # The thread that ended the session may not have sent its GOAWAY yet:
            # closing the socket under it would lose it.
            self._goodbye_done.wait(2 * GOAWAY_ON_CLOSE_TIMEOUT)
            # No writer can be inside a syscall on the socket while we hold this.
            with self._write_lock:
                try:
                    self._sock.close()
                except OSError:
                    pass
            self._wake_r.close()
            self._wake_w.close()
            self._writer.join()
            with self._lock:
                self._ended.set()
                callbacks, self._done_callbacks = self._done_callbacks, []
            log.debug("%s: ended: %s", self.name, self.error)
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("%s: done callback %r failed", self.name, callback)

    def _read_once(self, timeout=None, consumer=False):
        """Read what the socket has and apply it (the leader only).

        A consumer first waits for input (at most ``timeout``), or for a wake-up
        (see _wake_leader). Returns False once the session has ended.
        """
        if consumer and not self._input_within(timeout):
            return not self._dead
        try:
            n = self._sock.recv_into(self._recv_buffer)
        except OSError as exc:
            self._die(ErrorCode.SESSION_CLOSED, "transport read failed: %s" % exc)
            return False
        if n:
            self.last_received = time.monotonic()
        else:
            self._die(ErrorCode.PEER_EOF, "read EOF from remote peer",
                      goaway=(ErrorCode.PEER_EOF, b"read EOF from remote peer"))
            return False
        if self._read_budget is not None:
            self._read_budget -= n
            if self._read_budget < 0:
                _log_peer_fault("%s: the peer sent more than its budget before it was "
                                "trusted; ending the session", self.name)
                self._die(ErrorCode.ENHANCE_YOUR_CALM, "read budget exceeded",
                          goaway=(ErrorCode.ENHANCE_YOUR_CALM, b"read budget exceeded"))
                return False
        view = self._recv_view
        if n == len(view) and n < _RECV_SIZE and self._read_budget is None:
            # Busy: read bigger from now on (the decoder keeps no reference).
            self._recv_buffer = bytearray(_RECV_SIZE)
            self._recv_view = memoryview(self._recv_buffer)
        try:
            self._decoder.feed(view[:n])
        except ProtocolError as exc:
            if not self._dead:
                _log_peer_fault("%s: peer broke the protocol: %s; ending the session",
                                self.name, exc.message)
            self._die(exc.code, exc.message, goaway=(exc.code, exc.message.encode()))
            return False
        except BaseException:
            # The decoder may be mid-frame: the session cannot go on.
            log.exception("%s: failed while reading", self.name)
            self._die(ErrorCode.INTERNAL_ERROR, "failed while reading",
                      goaway=(ErrorCode.INTERNAL_ERROR, b"internal error"))
            raise
        return not self._dead

    def _input_within(self, timeout):
        """Wait for input on the socket; False on timeout or a wake-up (consumer leader)."""
        pending = getattr(self._sock, "pending", None)
        if pending is not None and pending():
            return True   # TLS: decrypted bytes wait inside, not on the socket
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._sock, select.POLLIN)
            self._poller.register(self._wake_r, select.POLLIN)
        ms = clock.poll_ms(timeout)
        if ms == 0:
            ms = 1
        ready = False
        for fd, _ in self._poller.poll(ms):
            if fd == self._wake_r.fileno():
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            else:
                ready = True
        return ready

    def _wake_leader(self, stream=None):
        """Make a consumer leading the reads look again at what it waits for.

        A thread leading is in poll(), where no condition variable reaches it:
        a stream closed, reset or shut from another thread, or a GOAWAY, writes
        a byte to the session's wake-up socket instead. A change to ``stream``
        wakes only a leader that waits on that stream (each wake-up costs a
        few syscalls, and streams close all the time); ``None`` wakes any.
        """
        if self._leader is _CONSUMER and (stream is None or stream is self._leading_for):
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass   # full (a wake-up is already pending) or closed

    def _try_lead(self, stream):
        """Take the lead if nobody reads the socket now (a consumer about to block).

        ``stream`` is the one the consumer waits on, or None for accept. It is
        set before the caller drops the stream's lock, so whoever changes that
        stream next sees it (see _wake_leader).
        """
        if threading.current_thread() is _MAIN_THREAD:
            # Signal handlers run in the main thread and may raise anywhere
            # (KeyboardInterrupt, a timeout's alarm): never in the middle of
            # frames that the whole session depends on. It waits instead.
            return False
        with self._lead_lock:
            if self._leader is None and not self._dead:
                self._leader = _CONSUMER
                self._leading_for = stream
                self._lead_epoch += 1
                return True
            return False

    def _lead_until(self, ready, deadline):
        """Read the socket until ``ready()``, the deadline, or the session's end."""
        try:
            while not ready() and not self._dead:
                timeout = deadline.remaining()
                if timeout == 0.0:
                    break
                if not self._read_once(timeout, consumer=True):
                    break
        finally:
            self._release_lead(background=False)

    def _release_lead(self, background):
        with self._lead_lock:
            self._leader = None
            self._leading_for = None
            woken, self._handoffs = self._handoffs, 0
            waiting = self._parked - woken
            if background:
                if woken and waiting <= 0:
                    # The reader we woke will likely be back soon: let it lead.
                    self._lead_released = time.monotonic()
                return
            if waiting > 0 or self._dead:
                # Someone parked needs the socket read now: no grace.
                self._lead_urgent = True
                self._lead.notify_all()
            else:
                # The reader thread notices on its own (see _wait_to_lead);
                # waking it here would cost more than the read we save.
                self._lead_released = time.monotonic()

    def _wait_to_lead(self):
        """The reader thread: wait until it should read; False once the session ended."""
        with self._lead_lock:
            watch = LEAD_GRACE
            seen = None
            while True:
                if self._dead:
                    return False
                if self._leader is None:
                    if self._lead_urgent:
                        break
                    idle = time.monotonic() - self._lead_released
                    if idle >= LEAD_GRACE:
                        break
                    self._lead.wait(LEAD_GRACE - idle)
                    continue
                # A consumer leads. Look again later, and less often while the
                # same one keeps the lead (an idle session costs little).
                if self._lead_epoch == seen:
                    watch = min(watch * 2, LEAD_WATCH_MAX)
                else:
                    seen = self._lead_epoch
                    watch = LEAD_GRACE
                self._lead.wait(watch)
            self._leader = _BACKGROUND
            self._lead_urgent = False
            return True

    def _park(self, delta):
        with self._lead_lock:
            self._parked += delta
            if delta > 0 and self._leader is None:
                # Nobody reads, and someone now waits: the reader thread must.
                self._lead_urgent = True
                self._lead.notify_all()

    def _on_syn(self, stream_id):
        """A peer-opened stream; returns it, or None if refused (reader thread)."""
        with self._lock:
            if self._local_goaway:
                refuse = ErrorCode.STREAM_REFUSED
            elif stream_id & 1 == self._local_parity:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "initiated stream id has wrong parity for remote endpoint: 0x%x" % stream_id)
            elif stream_id in self._streams:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "duplicate SYN for stream id 0x%x" % stream_id)
            else:
                self._last_remote_id = stream_id
                if self._remote_streams >= self._max_streams:
                    refuse = ErrorCode.STREAM_REFUSED
                elif len(self._accept_queue) >= self._accept_backlog:
                    refuse = ErrorCode.ACCEPT_QUEUE_FULL
                else:
                    stream = Stream(self, stream_id, self._window_size, announced=True)
                    self._streams[stream_id] = stream
                    self._remote_streams += 1
                    self._accept_queue.append(stream)
                    self._accept_ready.notify()
                    return stream
        self._reply(encode_rst(stream_id, refuse))
        return None

    def _on_rst(self, stream_id, code):
        stream = self._streams.get(stream_id)
        if stream is None:
            self._pointless_frame("frames on unknown streams")
            return
        if stream_id & 1 != self._local_parity and not self._self_resets.take():
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM,
                                "too many streams opened and reset by the peer")
        stream._set_error(StreamResetError(code, "stream reset by peer"))
        self._forget(stream)

    def _on_goaway(self, last_stream_id, code, debug):
        with self._lock:
            self.remote_goaway = (last_stream_id, code, debug)
            doomed = [s for sid, s in self._streams.items()
                      if sid & 1 == self._local_parity and sid > last_stream_id]
        log.debug("%s: peer sent GOAWAY (%s, last stream %d): %r",
                  self.name, code, last_stream_id, debug[:200])
        for stream in doomed:
            stream._set_error(StreamResetError(ErrorCode.REMOTE_GONE_AWAY, "remote gone away"))
            self._forget(stream)

    def _pointless_frame(self, what):
        if not self._pointless.take():
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many %s" % what)

    def _abort_stream(self, stream, code, message):
        """Reset a stream from the reader thread (the RST goes via the writer).

        A stream still waiting in the accept queue stays there, so that the
        application learns of the reset from the stream itself.
        """
        stream._set_error(StreamResetError(code, message))
        self._forget(stream, keep_queued=True)
        self._reply(encode_rst(stream.id, code))

    # -- shared ---------------------------------------------------------------------------

    def _forget(self, stream, keep_queued=False):
        with self._lock:
            if self._streams.get(stream.id) is stream:
                del self._streams[stream.id]
                # A closed stream may still draw a few frames the peer sent
                # before it knew (a WNDINC, an RST): those are not a flood.
                self._pointless.refund(_STRAYS_PER_STREAM)
                if stream.id & 1 != self._local_parity:
                    self._remote_streams -= 1
                    if not keep_queued:
                        try:
                            self._accept_queue.remove(stream)
                        except ValueError:
                            pass

    def _ended_error(self):
        error = self.error
        if error is None:
            return SessionClosedError(ErrorCode.SESSION_CLOSED, "session closed")
        return SessionClosedError(error.code, error.message)

    def _die(self, code, message, goaway=None):
        """End the session once: GOAWAY if asked (briefly), shut the socket, end streams."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
            self.error = SessionClosedError(code, message)
            streams = list(self._streams.values())
            self._streams.clear()
            self._accept_ready.notify_all()
        try:
            if goaway is not None:
                self._try_goaway(*goaway)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self._goodbye_done.set()
        with self._control_lock:
            self._control_ready.notify_all()
        with self._lead_lock:
            self._lead.notify_all()
        ended = SessionClosedError(code, message)
        for stream in streams:
            stream._set_error(ended)
        if code in (ErrorCode.SESSION_CLOSED, ErrorCode.PEER_EOF, ErrorCode.NO_ERROR):
            log.debug("%s: closing: %s", self.name, message)
        else:
            _log_ending("%s: ending: %s (%s)", self.name, message, ErrorCode.of(code))

    def _try_goaway(self, code, debug):
        if not self._write_lock.acquire(True, GOAWAY_ON_CLOSE_TIMEOUT):
            return
        try:
            frame = encode_goaway(self._last_remote_id, code, debug)
            if self._use_sendmsg:
                self._sock.send(frame, socket.MSG_DONTWAIT)
            else:
                _set_send_timeout(self._sock, GOAWAY_ON_CLOSE_TIMEOUT)
                self._sock.sendall(frame)
        except OSError:
            pass
        finally:
            self._write_lock.release()


def _hold_again(lock):
    """Hold ``lock`` (an RLock) again after a Condition wait, whatever was raised in it.

    In the main thread a signal handler's exception can leave Condition.wait
    between releasing the lock and taking it back; the caller's ``with``
    must still find it held.
    """
    while not lock._is_owned():
        try:
            lock.acquire()
        except BaseException:   # another signal: the first exception goes on
            pass


def _is_tls(sock):
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def _set_send_timeout(sock, seconds):
    """Bound how long a write may make no progress (SO_SNDTIMEO, or the
    transport's own set_write_timeout, as tls.TLSTransport has)."""
    if hasattr(sock, "set_write_timeout"):
        sock.set_write_timeout(seconds)
        return
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _tune_socket(sock, write_timeout):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not TCP (a socketpair in tests, say)
    if write_timeout is not None:
        try:
            _set_send_timeout(sock, write_timeout)
        except (OSError, AttributeError, struct.error):
            log.debug("SO_SNDTIMEO unavailable; writes are not time-limited")


def client(sock, **options):
    """A session on the side that dialed the connection."""
    return Session(sock, client=True, **options)


def server(sock, **options):
    """A session on the side that accepted the connection."""
    return Session(sock, client=False, **options)
