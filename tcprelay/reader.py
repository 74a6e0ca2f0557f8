"""Reading a muxado session: the reader thread, leader/follower reads, and
applying decoded frames to the session's streams.

Exactly one thread at a time, the leader, reads the socket and applies
frames: the session's reader thread, or a thread about to block on one of
its streams (see SessionReader). ``FrameDispatch`` turns what
``frames.FrameDecoder`` decodes into calls on the session and its streams.
"""

import logging
import select
import socket
import threading
import time

from . import clock
from .frames import FIN, SYN, ErrorCode, FrameHandler, ProtocolError
from .limits import LogGate
from .mainthread import MAIN_THREAD

log = logging.getLogger("tcprelay.muxado")
# What a peer can make us log, once per session or stream it opens: rate-limited.
_log_peer_fault = LogGate(log, logging.WARNING, per_second=5, burst=20)
_log_stream_fault = LogGate(log, logging.INFO, per_second=5, burst=20)

LEAD_GRACE = 0.001                # how long the reader thread leaves the lead to a consumer
LEAD_WATCH_MAX = 0.064            # the longest the reader thread goes without a look
_BACKGROUND = "reader thread"
_CONSUMER = "consumer"
RECV_SIZE = 1 << 20               # one recv_into; holds several whole 256 KiB frames
_FIRST_RECV_SIZE = 64 * 1024


class SessionReader(object):
    """The read side of one session: its reader thread and the lead.

    ``owner`` is the Session. The reader reads its ``name``, ``error`` (set: ended) and
    ``_streams``, sets ``last_received``, ends it (``_die``) on a transport
    error or a protocol fault, and calls ``_finish`` once the reads are over.
    Streams call ``try_lead``, ``lead_until``, ``park`` and ``wake_leader``
    and count ``handoffs``.
    """

    def __init__(self, owner, sock, read_budget):
        self._owner = owner
        self._sock = sock
        self._lead_lock = threading.Lock()
        self._lead = threading.Condition(self._lead_lock)
        self._leader = None          # _BACKGROUND, _CONSUMER, or None
        self._leading_for = None     # the stream a _CONSUMER leader waits on (None: accept)
        self._lead_urgent = False    # someone is parked: the reader thread must read now
        self._lead_released = 0.0    # when a consumer last let go of the lead
        self._lead_epoch = 0         # counts consumer leads, to see activity
        self._parked = 0             # threads blocked on a stream's data or window
        self.handoffs = 0            # parked readers woken by the current leader
        # Starts small (idle and half-open sessions stay cheap); the first
        # read that fills it grows it to RECV_SIZE.
        self._read_budget = read_budget   # bytes the peer may still send (set_read_budget)
        self._recv_buffer = bytearray(_FIRST_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._decoder = owner.codec.FrameDecoder(FrameDispatch(owner))
        self._poller = None
        self._wake_r, self._wake_w = socket.socketpair()   # see wake_leader
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self.run, name=owner.name)
        self._thread.daemon = True

    def start(self):
        self._thread.start()

    def join(self):
        """Wait for the reader thread to end (it ends once the session has)."""
        if self._thread is not threading.current_thread():
            self._thread.join()

    def set_read_budget(self, nbytes):
        self._read_budget = None if nbytes is None else int(nbytes)

    def session_ended(self):
        """Wake the reader thread to see that the session has ended."""
        with self._lead_lock:
            self._lead.notify_all()

    # Reading is leader/follower. Exactly one thread at a time, the leader,
    # reads the socket and applies frames. A thread about to block on a
    # stream takes the lead if it is free, so that in request/response
    # traffic the reply wakes the very thread waiting for it: a thread
    # handoff costs tens of microseconds, more than the whole round trip.
    # The reader thread leads whenever no consumer does: at once if anyone
    # is parked waiting, else after LEAD_GRACE, giving a consumer that just
    # got its data the chance to come back and lead again.

    def run(self):
        try:
            while self._wait_to_lead():
                try:
                    alive = self.read_once()
                finally:
                    self._release_lead(background=True)
                if not alive:
                    break
        except Exception:
            log.exception("%s: reader thread failed", self._owner.name)
            self._owner._die(ErrorCode.INTERNAL_ERROR, "reader thread failed",
                             goaway=(ErrorCode.INTERNAL_ERROR, b"internal error"))
        finally:
            self._owner._die(ErrorCode.SESSION_CLOSED, "session closed")
            with self._lead_lock:
                # A consumer may still be leading; the shut socket ends its read soon.
                while self._leader is not None:
                    self._lead.wait()
                self._leader = _BACKGROUND   # for good: nobody reads a closed socket
            self._recv_view.release()
            self._wake_r.close()
            self._wake_w.close()
            self._owner._finish()

    def read_once(self, timeout=None, consumer=False):
        """Read what the socket has and apply it (the leader only).

        A consumer first waits for input (at most ``timeout``), or for a wake-up
        (see wake_leader). Returns False once the session has ended.
        """
        if consumer and not self._input_within(timeout):
            return self._owner.error is None
        try:
            n = self._sock.recv_into(self._recv_buffer)
        except OSError as exc:
            self._owner._die(ErrorCode.SESSION_CLOSED, "transport read failed: %s" % exc)
            return False
        if n:
            self._owner.last_received = time.monotonic()
        else:
            self._owner._die(ErrorCode.PEER_EOF, "read EOF from remote peer",
                      goaway=(ErrorCode.PEER_EOF, b"read EOF from remote peer"))
            return False
        if self._read_budget is not None:
            self._read_budget -= n
            if self._read_budget < 0:
                _log_peer_fault("%s: the peer sent more than its budget before it was "
                                "trusted; ending the session", self._owner.name)
                self._owner._die(ErrorCode.ENHANCE_YOUR_CALM, "read budget exceeded",
                          goaway=(ErrorCode.ENHANCE_YOUR_CALM, b"read budget exceeded"))
                return False
        view = self._recv_view
        if n == len(view) and n < RECV_SIZE and self._read_budget is None:
            # Busy: read bigger from now on (the decoder keeps no reference).
            self._recv_buffer = bytearray(RECV_SIZE)
            self._recv_view = memoryview(self._recv_buffer)
        try:
            self._decoder.feed(view[:n])
        except ProtocolError as exc:
            if self._owner.error is None:
                _log_peer_fault("%s: peer broke the protocol: %s; ending the session",
                                self._owner.name, exc.message)
            self._owner._die(exc.code, exc.message, goaway=(exc.code, exc.message.encode()))
            return False
        except BaseException:
            # The decoder may be mid-frame: the session cannot go on.
            log.exception("%s: failed while reading", self._owner.name)
            self._owner._die(ErrorCode.INTERNAL_ERROR, "failed while reading",
                      goaway=(ErrorCode.INTERNAL_ERROR, b"internal error"))
            raise
        return self._owner.error is None

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

    def wake_leader(self, stream=None):
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

    def try_lead(self, stream):
        """Take the lead if nobody reads the socket now (a consumer about to block).

        ``stream`` is the one the consumer waits on, or None for accept. It is
        set before the caller drops the stream's lock, so whoever changes that
        stream next sees it (see wake_leader).
        """
        if threading.current_thread() is MAIN_THREAD:
            # Signal handlers run in the main thread and may raise anywhere
            # (KeyboardInterrupt, a timeout's alarm): never in the middle of
            # frames that the whole session depends on. It waits instead.
            return False
        with self._lead_lock:
            if self._leader is None and self._owner.error is None:
                self._leader = _CONSUMER
                self._leading_for = stream
                self._lead_epoch += 1
                return True
            return False

    def lead_until(self, ready, deadline):
        """Read the socket until ``ready()``, the deadline, or the session's end."""
        try:
            while not ready() and self._owner.error is None:
                timeout = deadline.remaining()
                if timeout == 0.0:
                    break
                if not self.read_once(timeout, consumer=True):
                    break
        finally:
            self._release_lead(background=False)

    def _release_lead(self, background):
        with self._lead_lock:
            self._leader = None
            self._leading_for = None
            woken, self.handoffs = self.handoffs, 0
            waiting = self._parked - woken
            if background:
                if woken and waiting <= 0:
                    # The reader we woke will likely be back soon: let it lead.
                    self._lead_released = time.monotonic()
                return
            if waiting > 0 or self._owner.error is not None:
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
                if self._owner.error is not None:
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

    def park(self, delta):
        with self._lead_lock:
            self._parked += delta
            if delta > 0 and self._leader is None:
                # Nobody reads, and someone now waits: the reader thread must.
                self._lead_urgent = True
                self._lead.notify_all()


class FrameDispatch(FrameHandler):
    """Applies decoded frames to a session (runs in its reader thread)."""

    def __init__(self, session):
        self._session = session
        self._encode_rst = session.codec.encode_rst
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
            self._session._writer.reply(self._encode_rst(stream_id, ErrorCode.STREAM_CLOSED))

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
                    session._writer.reply(self._encode_rst(stream_id, ErrorCode.STREAM_CLOSED))
                return
            if length == 0 and not flags:
                session._pointless_frame("empty DATA frames")
                return
        if length:
            admitted = stream._admit(length)
            if admitted == 0:
                session._writer.reply(self._encode_rst(stream_id, ErrorCode.STREAM_CLOSED))
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
            self._session._writer.reply(self._encode_rst(target.id, ErrorCode.STREAM_CLOSED))

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

    def extension_syn(self, stream_id, flags, priority, stream_type):
        """A stream opened for a protocol extension (v1's heartbeat; framesv1)."""
        self._session._on_extension_syn(stream_id, stream_type)

    def unknown(self, ftype, flags, stream_id, length, body):
        self._session._pointless_frame("frames of unknown type")
