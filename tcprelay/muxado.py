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
import socket
import itertools
import logging
import threading
import time

from . import frames
from .clock import Deadline, timeout_error
from .frames import (
    DEFAULT_WINDOW, MAX_LENGTH, MAX_STREAM_ID, MAX_WINDOW,
    Data, ErrorCode, GoAway, MuxadoError, ProtocolError, Rst, Unknown, WndInc, decode_frames,
)
from .limits import LogGate
from .mainthread import MAIN_IDENT, hold_again
from .reader import SessionReader
from .muxerrors import (
    RemoteGoneAwayError, SessionClosedError, StreamClosedError, StreamResetError,
)
from .stream import Stream
from .writer import DEFAULT_WRITE_TIMEOUT, GOAWAY_ON_CLOSE_TIMEOUT, FrameWriter

__all__ = [
    "Session", "Stream", "client", "server", "ErrorCode", "MuxadoError", "ProtocolError",
    "StreamResetError", "SessionClosedError", "StreamClosedError", "RemoteGoneAwayError",
    "Data", "Rst", "WndInc", "GoAway", "Unknown", "decode_frames",
    "DEFAULT_WINDOW", "DEFAULT_WRITE_TIMEOUT", "DEFAULT_FLOOD_LIMIT",
]

log = logging.getLogger(__name__)
_log_ending = LogGate(log, logging.INFO, per_second=5, burst=20)

DEFAULT_FLOOD_LIMIT = (10000, 1000.0)
_STRAYS_PER_STREAM = 4   # frames a closed stream may still draw from the peer


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
    - ``codec``: the wire protocol, a module with ``frames``' names (default
      ``frames``, muxado v2; ``framesv1`` for v1, see ``muxadov1``). The
      window's least size and the largest frame are the codec's.
    - ``on_extension_stream``: ``callback(stream, stream_type)`` for a stream
      the peer opens for a protocol extension (v1's heartbeat), which is not
      queued for ``accept()``; it runs on the reader thread and must not
      block. None: such streams are reset (STREAM_CLOSED).

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
                 read_budget=None, codec=frames, on_extension_stream=None):
        self.codec = codec
        self._initial_window = codec.DEFAULT_WINDOW   # each stream's, both ways
        if not codec.DEFAULT_WINDOW <= window_size <= MAX_WINDOW:
            raise ValueError("window_size must be between %d and %d"
                             % (codec.DEFAULT_WINDOW, MAX_WINDOW))
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
        self._max_frame = min(int(max_frame_size), codec.MAX_LENGTH)
        self._on_extension_stream = on_extension_stream
        self._pointless = _TokenBucket(*flood_limit)
        self._self_resets = _TokenBucket(*flood_limit)

        self._lock = threading.RLock()           # streams, ids, accept queue, state
        self._accept_ready = threading.Condition(self._lock)
        self._streams = {}
        self._accept_queue = collections.deque()
        self._remote_streams = 0
        self._next_id = 3 if client else 2       # as Go: the client's first stream is 3
        self._last_remote_id = 0 if client else 1  # reported in GOAWAY, as Go does
        self._local_parity = 1 if client else 0
        self._local_goaway = False
        self.remote_goaway = None                # (last_stream_id, code, debug) once received
        # The end, in three steps, each stored once: ``error`` is set (the
        # session has ended, and why: ``closed``); _die has tried its GOAWAY
        # and shut the socket (_goodbye_done); the threads are done and the
        # socket closed (_ended, what wait() waits for).
        self.error = None
        self._goodbye_done = threading.Event()
        self._ended = threading.Event()
        self._done_callbacks = []
        # time.monotonic() of the last read that got bytes: any byte proves the peer alive
        self.last_received = time.monotonic()

        self._peername = self._sockname = None
        try:
            self._peername = sock.getpeername()
            self._sockname = sock.getsockname()
        except OSError:
            pass
        sock.settimeout(None)
        self._writer = FrameWriter(self, sock, write_timeout)
        self._reader = SessionReader(self, sock, read_budget)
        self._writer.start()   # first: a reader that ends at once joins the writer
        self._reader.start()
        log.debug("%s: started on %s <-> %s", self.name, self._sockname, self._peername)

    def __repr__(self):
        return "<muxado.Session %s%s>" % (self.name, " closed" if self.closed else "")

    # -- public interface ------------------------------------------------------------

    @property
    def closed(self):
        return self.error is not None

    def open(self, announce=True):
        """Open a new stream.

        With ``announce`` (the default) the peer learns of it at once, from an
        empty DATA+SYN frame, so that protocols where the server speaks first
        work. ``announce=False`` sends the SYN with the first frame, as Go does.
        """
        with self._lock:
            if self.error is not None:
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
                grant = stream._window.take_grant()
            try:
                self._writer.send_data(stream, b"", 0, grant)
            except MuxadoError:
                self._forget(stream)
                raise
        return stream

    def set_window_size(self, window_size):
        """The receive window (bytes) of streams opened from now on, by either side.

        Raises ValueError outside 256 KiB .. 2**31-1, as the constructor does.
        """
        if not self._initial_window <= window_size <= MAX_WINDOW:
            raise ValueError("window_size must be between %d and %d"
                             % (self._initial_window, MAX_WINDOW))
        self._window_size = int(window_size)

    def set_read_budget(self, nbytes):
        """Let the peer send at most ``nbytes`` more bytes in all (frames included);
        past that the session ends with ENHANCE_YOUR_CALM. None lifts the cap.

        For a peer not yet trusted (before it has registered): what it can make
        us read, buffer and decode is bounded, whatever frames it sends. While a
        budget is set, the read buffer stays small.
        """
        self._reader.set_read_budget(nbytes)

    def accept(self, timeout=None):
        """The next stream the peer opened.

        Raises ``socket.timeout`` after ``timeout`` seconds, and
        ``SessionClosedError`` once the session has ended, or once this side
        has sent GOAWAY and no opened stream is left to accept.
        """
        deadline = Deadline(timeout)
        with self._lock:
            while not self._accept_queue:
                if self.error is not None:
                    raise self._ended_error()
                if self._local_goaway:
                    raise SessionClosedError(ErrorCode.NO_ERROR,
                                             "no new streams: this side sent GOAWAY")
                remaining = deadline.remaining()
                if remaining == 0.0:
                    raise timeout_error("accept")
                if self._reader.try_lead(None):
                    # Read the socket ourselves: the SYN then wakes this thread.
                    self._lock.release()
                    try:
                        self._reader.lead_until(self._accept_ready_now, deadline)
                    finally:
                        self._lock.acquire()
                    continue
                # Not counted as parked: a new stream can wait out LEAD_GRACE.
                try:
                    self._accept_ready.wait(remaining)
                finally:
                    if threading.get_ident() == MAIN_IDENT:
                        hold_again(self._lock)
            return self._accept_queue.popleft()

    def _accept_ready_now(self):
        return self._accept_queue or self.error is not None or self._local_goaway

    def goaway(self, code=ErrorCode.NO_ERROR, debug=b""):
        """Refuse new streams from the peer; open streams carry on (a drain)."""
        with self._lock:
            if self.error is not None:
                raise self._ended_error()
            self._local_goaway = True
            last_id = self._last_remote_id
            self._accept_ready.notify_all()
        self._reader.wake_leader()
        # The pad keeps a Go v2 peer in step: its GOAWAY reader swallows 8 bytes
        # too many. (v1 has none: it skips no frame type.)
        goodbye = [self.codec.encode_goaway(last_id, code, debug)]
        if self.codec.PAD_FRAME:
            goodbye.append(self.codec.PAD_FRAME)
        self._writer.write(goodbye)

    def close(self):
        """GOAWAY, then close the transport and end every stream. Idempotent.

        Returns once the session's threads have ended and its socket is closed.
        """
        self._die(ErrorCode.SESSION_CLOSED, "session closed",
                  goaway=(ErrorCode.NO_ERROR, b"no error"))
        self._reader.join()
        self._writer.join()

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

    # -- the reader thread's calls (see reader.FrameDispatch) ------------------------

    def _on_syn(self, stream_id, queued=True):
        """A peer-opened stream; returns it, or None if refused (reader thread).

        ``queued``: for ``accept()``; else the caller takes it (an extension's).
        """
        with self._lock:
            if self.error is not None:
                # Ended by another thread while the reader applied the rest of
                # its chunk: nothing would ever end this stream.
                return None
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
                    if queued:
                        self._accept_queue.append(stream)
                        self._accept_ready.notify()
                    return stream
        self._writer.reply(self.codec.encode_rst(stream_id, refuse))
        return None

    def _on_extension_syn(self, stream_id, stream_type):
        """A stream the peer opened for a protocol extension (reader thread)."""
        stream = self._on_syn(stream_id, queued=False)
        if stream is None:
            return
        if self._on_extension_stream is None:
            self._abort_stream(stream, ErrorCode.STREAM_CLOSED, "no such extension")
        else:
            self._on_extension_stream(stream, stream_type)

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
        self._writer.reply(self.codec.encode_rst(stream.id, code))

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
            if self.error is not None:
                return
            self.error = SessionClosedError(code, message)
            streams = list(self._streams.values())
            self._streams.clear()
            self._accept_ready.notify_all()
        try:
            if goaway is not None:
                self._writer.try_goaway(self._last_remote_id, *goaway)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self._goodbye_done.set()
        self._writer.session_ended()
        self._reader.session_ended()
        ended = SessionClosedError(code, message)
        for stream in streams:
            stream._set_error(ended)
        if code in (ErrorCode.SESSION_CLOSED, ErrorCode.PEER_EOF, ErrorCode.NO_ERROR):
            log.debug("%s: closing: %s", self.name, message)
        else:
            _log_ending("%s: ending: %s (%s)", self.name, message, ErrorCode.of(code))

    def _finish(self):
        """The reader thread, once the reads are over: close the transport, end."""
        # The thread that ended the session may not have sent its GOAWAY yet:
        # closing the socket under it would lose it.
        self._goodbye_done.wait(2 * GOAWAY_ON_CLOSE_TIMEOUT)
        self._writer.close_socket()
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


def client(sock, **options):
    """A session on the side that dialed the connection."""
    return Session(sock, client=True, **options)


def server(sock, **options):
    """A session on the side that accepted the connection."""
    return Session(sock, client=False, **options)
