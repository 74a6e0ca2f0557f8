"""A muxado stream: a socket-like, file-like byte pipe within a session.

Data the session's reader thread applies (``_receive``, ``_deliver``) is
buffered per stream, within its receive window; ``recv`` and friends read
it. Frames go out through the session's ``FrameWriter``; a thread blocked
here may lead the session's reads (``SessionReader.try_lead``).

Its errors (muxerrors) subclass the OSErrors that callers of sockets
already catch.
"""

import collections
import errno
import functools
import socket
import threading

from .clock import Deadline, timeout_error
from .frames import FIN, ErrorCode, MuxadoError
from .mainthread import MAIN_IDENT, hold_again
from .muxerrors import SessionClosedError, StreamClosedError, StreamResetError
from .socketlike import CLOSE_PENDING, CLOSED, OPEN, SocketLike
from .streamincoming import IncomingFrames
from .streambuffer import ReceiveBuffer
from .window import ReceiveWindow

# As plain ints: socket.MSG_* are IntFlag members, and their operators are
# Python calls on every recv.
_MSG_PEEK = int(socket.MSG_PEEK)
_MSG_WAITALL = int(socket.MSG_WAITALL)
_RECV_FLAGS = _MSG_PEEK | _MSG_WAITALL



def _byte_view(data):
    """A flat memoryview of bytes over any buffer."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


class Stream(SocketLike, IncomingFrames):
    """One muxado stream: a socket-like, file-like byte pipe.

    Get one from ``Session.open()`` or ``Session.accept()``.
    """

    def __init__(self, session, stream_id, window_size, announced):
        self.id = stream_id
        self.session = session
        self._writer = session._writer
        self._reader = session._reader
        # An RLock for its owner check only (see mainthread.hold_again): never taken
        # twice. So a signal handler must not call into a stream the main
        # thread may be in: it would run on half-updated state.
        self._lock = threading.RLock()
        self._readable = threading.Condition(self._lock)
        self._writable = threading.Condition(self._lock)
        self._timeout = None
        # receive side. A read commits by one store to the buffer's read_pos,
        # so an exception (a signal handler's, in the main thread) can land
        # anywhere in it and leave the buffer whole; the window accounting
        # catches up with read_pos later (_settle).
        self._buffer = ReceiveBuffer()
        self._accounted = 0            # reads up to here are in the window accounting
        self._waitall_want = 0         # a MSG_WAITALL read in the main thread waits for this
        self._window = ReceiveWindow(window_size, session._initial_window)
        self._kept = 0                 # handed to the receiver, not yet reported consumed
        self._fin_received = False
        self._read_shut = False
        self._readers_waiting = 0      # threads parked in recv on this stream
        self._receiver = None          # takes incoming data instead of the buffer (set_receiver)
        self._may_lead = True          # a thread blocked here may read the socket (set_lead_reads)
        # send side
        self._send_window = session._initial_window   # the protocol's: no negotiation
        self._fin_sent = False
        # SYN goes out with the first frame (Go's lazy open). Written only
        # under the session's write lock (FrameWriter.write), with the frame.
        self._unannounced = not announced
        # end states
        self._close_state = OPEN
        self._error = None             # a reset, or the session's end
        self._io_refs = 0              # makefile() objects still open
        self._io_lock = threading.Lock()   # guards _io_refs only; no allocation under it

    def __repr__(self):
        return "<muxado.Stream id=%d session=%r>" % (self.id, self.session.name)

    # -- socket-like interface -------------------------------------------------

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
        waitall = flags & _MSG_WAITALL
        buffer = self._buffer
        start = end = None
        try:
            with self._lock:
                self._wait_readable(bufsize if waitall else 1)
                start = buffer.read_pos
                if start == buffer.end:
                    return b""
                if flags & _MSG_PEEK:
                    return buffer.copy_out(start, bufsize, True)
                data = buffer.copy_out(start, bufsize, bool(waitall))
                end = start + len(data)
                buffer.read_pos = end                  # the commit
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
                start = self._buffer.read_pos
                n = self._buffer.copy_into(view, start, nbytes)
                end = start + n
                self._buffer.read_pos = end            # the commit
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
        return self._send_some(view, Deadline(self._timeout))

    def sendall(self, data, flags=0):
        """Send all of ``data``, waiting for window as needed; the timeout covers the call."""
        view = self._outgoing(data, flags)
        if not len(view):
            return None
        deadline = Deadline(self._timeout)
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
                grant = self._window.take_grant()
            self._writer.send_data(self, view[:n], 0, grant, written)
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
            self._window.untake_grant(grant)
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
        self._writer.queue_control(self._writer.encode_data_header(self.id, n) + bytes(view))

    def announce(self):
        """Tell the peer of this stream now, if no frame has yet (see Session.open).

        Sends an empty DATA+SYN frame for a stream opened with
        ``announce=False``; does nothing once the SYN has gone out.
        """
        with self._lock:
            if (not self._unannounced or self._fin_sent or self._close_state is not OPEN
                    or self._error is not None):
                return
            grant = self._window.take_grant()
        self._writer.send_data(self, b"", 0, grant)

    def close_write(self):
        """Half-close: send FIN. The peer reads EOF; we can still read."""
        with self._lock:
            if self._close_state is not OPEN:
                raise self._closed_error()
            if self._fin_sent or self._error is not None:
                return
            self._fin_sent = True
            done = self._fin_received
            grant = self._window.take_grant()
        written = collections.deque()
        try:
            self._writer.send_data(self, b"", FIN, grant, written)
        except BaseException as exc:
            if not written and not isinstance(exc, MuxadoError):
                # Cut short before the FIN went (a signal handler's
                # exception): a later close_write() or close() sends it.
                with self._lock:
                    self._fin_sent = False
                    self._window.untake_grant(grant)
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
                if self._close_state is not OPEN:
                    raise self._closed_error()
                self._read_shut = True
                self._buffer.drop()   # consumed, as far as the window goes
                grant = self._settle()
                self._readable.notify_all()
                self._reader.wake_leader(self)
            if grant:
                self._writer.send_wndinc(self, grant)
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.close_write()

    def reset(self, code=ErrorCode.STREAM_RESET, wait=True):
        """Abort the stream: RST to the peer, local calls fail with StreamResetError.

        With ``wait=False`` the RST never waits for the session's socket: it goes
        out at once if the socket has room, else from the session's writer thread.
        """
        if self._set_error(StreamResetError(code, "stream reset locally")):
            self._writer.send_rst(self, code, wait)
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
            for end, chunk in self._buffer.take_unread():
                self._accounted = end
                took = receiver.stream_data(chunk)
                self._kept += len(chunk) - took
                used += took
            grant += self._consumed(used)
            if self._fin_received:
                after = receiver.stream_end(None)
            elif self._error is not None:
                after = receiver.stream_end(self._error)
        if grant:
            self._writer.queue_control(self._writer.encode_wndinc(self.id, grant))
        if after is not None:
            after()

    def consumed(self, nbytes):
        """A receiver has passed on ``nbytes`` it had kept: give the window back."""
        with self._lock:
            self._kept -= nbytes
            grant = self._consumed(nbytes)
        if grant:
            self._writer.queue_control(self._writer.encode_wndinc(self.id, grant))

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
                self._close_state = CLOSE_PENDING
                return
        with self._lock:
            if self._close_state is CLOSED:
                return
            peer_sending = not self._fin_received and self._error is None
            abort = peer_sending and (self._unread() or self._kept)
            send_fin = not self._fin_sent and self._error is None and not abort
            grant = 0
            if peer_sending and not abort:
                grant = self._settle() + self._window.flush()
            self._finish_close_locked()
            self._fin_sent = True
        try:
            if abort:
                self._writer.send_rst(self, ErrorCode.STREAM_CLOSED)
            elif send_fin:
                self._writer.send_data(self, b"", FIN, grant)
            elif grant:
                self._writer.send_wndinc(self, grant)
        except (MuxadoError, OSError):
            pass
        self.session._forget(self)

    def _finish_close_locked(self):
        self._close_state = CLOSED
        self._buffer.drop()
        self._readable.notify_all()
        self._writable.notify_all()
        self._reader.wake_leader(self)

    def _decref_socketios(self):
        # May run from a file object's finaliser, in any thread, even one that
        # holds self._lock: so no stream lock and no I/O here. The writer
        # thread finishes a close that was waiting for the last file object.
        with self._io_lock:
            self._io_refs -= 1
            final = self._io_refs <= 0 and self._close_state is CLOSE_PENDING
            if final:
                self._close_state = OPEN
        if final:
            if self.session.closed:
                self._close_state = CLOSED   # nothing left to tell the peer
            else:
                self._writer.defer_from_finaliser(self.close)

    @property
    def closed(self):
        return self._close_state is CLOSED

    @property
    def error(self):
        """What ended the stream abnormally: a ``StreamResetError`` (by either side)
        or the session's end; None while it has not, or after a clean close."""
        return self._error

    # -- internals (callers hold self._lock where noted) ------------------------

    def _closed_error(self):
        return SessionClosedError(ErrorCode.STREAM_CLOSED, "stream is closed")

    def _after_read(self):
        """The window owed after a read: (increment to send now, position to settle later).

        Lock held. The main thread leaves the accounting to the writer thread
        (see _settle_later), which no signal handler interrupts; it only says
        up to where, when a WNDINC may be due (else 0).
        """
        if threading.get_ident() != MAIN_IDENT:
            return self._settle(), 0
        self._waitall_want = 0
        return 0, self._buffer.read_pos if self._settle_due() else 0

    def _return_window(self, grant, later):
        """Send what _after_read owes: a WNDINC now, or a settle on the writer thread."""
        if grant:
            self._writer.send_wndinc(self, grant)
        elif later:
            self._writer.defer(functools.partial(self._settle_later, later))

    def _settle_due(self):
        unsettled = self._buffer.read_pos - self._accounted
        return self._window.settle_due(unsettled, self._waitall_want > 0)

    def _settle(self, upto=None):
        """Bring the window accounting up to the read position, or ``upto`` (lock held).

        Returns the WNDINC increment owed now.
        """
        position = self._buffer.read_pos if upto is None else min(upto, self._buffer.read_pos)
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
            self._writer.send_wndinc(self, grant)

    def _give_back(self, start, end):
        """Undo a read that an exception cut short before it returned (main thread).

        Only while nobody has read on since and the bytes are still buffered.
        A second exception meanwhile waits until it is done.
        """
        interrupted = None
        while True:
            try:
                with self._lock:
                    buffer = self._buffer
                    if buffer.read_pos == end and buffer.holds_from(start):
                        buffer.read_pos = start
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
        buffer = self._buffer
        if buffer.end - buffer.read_pos >= want:
            return
        deadline = None
        while True:
            if self._close_state is CLOSED:
                raise self._closed_error()
            if self._unread() >= want or self._fin_received or self._read_shut:
                return
            if self._error is not None:
                if self._unread():
                    return
                raise self._error
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no data ready on stream %d" % self.id)
            if deadline is None:
                deadline = Deadline(self._timeout)
            remaining = deadline.remaining()
            if remaining == 0.0:
                raise timeout_error("recv")
            if threading.get_ident() == MAIN_IDENT:
                self._leave_window_to_writer(want)
                ready = None   # the main thread never leads reads
            elif want == 1:
                ready = self._input_ready
                if self._buffer.read_pos != self._accounted:   # the main thread read here too
                    if self._grant_unlocked(self._settle()):
                        continue
            else:
                if self._grant_unlocked(self._settle() + self._grant_while_waiting(want)):
                    continue

                def ready():
                    return (self._unread() >= want
                            or self._fin_received or self._read_shut
                            or self._error is not None or self._close_state is CLOSED
                            or self._early_return(want)[0] > 0)
            self._wait_on(self._readable, ready, deadline, remaining, True)

    def _leave_window_to_writer(self, want):
        """Main thread, about to wait: the writer thread returns the window (see _after_read)."""
        self._waitall_want = want if want > 1 else 0
        if self._settle_due() or want > 1 and (
                self._window.grant_pending or self._early_return(want)[0] > 0):
            self._writer.defer(functools.partial(self._settle_later, self._buffer.read_pos))

    def _grant_unlocked(self, grant):
        """Send a WNDINC of ``grant`` (if any) with the lock let go meanwhile; True if sent."""
        if not grant:
            return False
        self._lock.release()
        try:
            self._writer.queue_control(self._writer.encode_wndinc(self.id, grant))
        finally:
            self._lock.acquire()
        return True

    def _early_return(self, want):
        """(increment, of it granted ahead) owed now to a MSG_WAITALL of ``want`` (lock held)."""
        return self._window.early_return(want, self._unread(),
                                         self._peer_done() or self._read_shut)

    def _grant_while_waiting(self, want):
        """The WNDINC increment to send now for a MSG_WAITALL read, accounted (lock held)."""
        return self._window.grant_while_waiting(want, self._unread(),
                                                self._peer_done() or self._read_shut)

    def _unread(self):
        """Bytes buffered and not yet read (lock held)."""
        return self._buffer.end - self._buffer.read_pos

    def _peer_done(self):
        """The peer sends no more on this stream: FIN, or the stream ended (lock held)."""
        return self._fin_received or self._error is not None

    def _input_ready(self):
        return (self._unread() or self._fin_received or self._read_shut
                or self._error is not None or self._close_state is CLOSED)

    def _window_ready(self):
        return (self._send_window > 0 or self._error is not None or self._fin_sent
                or self._close_state is CLOSED)

    def _wait_on(self, condition, ready, deadline, remaining, reading):
        """Block until ``ready()`` may have changed (lock held, released while waiting).

        If nobody is reading the session's socket, read it ourselves (see
        SessionReader.lead_until): the data we wait for then wakes this very
        thread, with no handoff from the reader thread.
        """
        reader = self._reader
        if self._may_lead and reader.try_lead(self):
            self._lock.release()
            try:
                reader.lead_until(ready, deadline)
            finally:
                self._lock.acquire()
            return
        if reading:
            self._readers_waiting += 1
        reader.park(1)
        try:
            condition.wait(remaining)
        finally:
            if threading.get_ident() == MAIN_IDENT:
                hold_again(self._lock)
            reader.park(-1)
            if reading:
                self._readers_waiting -= 1

    def _check_writable(self):
        if self._close_state is CLOSED:
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
                raise timeout_error("send")
            self._wait_on(self._writable, self._window_ready, deadline, remaining, False)

    def _consumed(self, n):
        """Account for ``n`` bytes consumed (lock held); the WNDINC increment to send, or 0."""
        window = self._window
        if not n and not window.grant_pending:
            return 0
        buffer = self._buffer   # inline: this runs for every frame and every read
        return window.consumed(n, buffer.end - buffer.read_pos,
                               self._fin_received or self._error is not None)

    def _set_error(self, error):
        """Make ``error`` terminal; False if the stream had already ended."""
        after = None
        with self._lock:
            if self._error is not None or self._close_state is CLOSED:
                return False
            self._error = error
            if isinstance(error, StreamResetError):
                # A reset is abortive, as with TCP: unread data is dropped.
                self._buffer.drop()
            self._readable.notify_all()
            self._writable.notify_all()
            if self._receiver is not None:
                after = self._receiver.stream_end(error)
            self._reader.wake_leader(self)
        if after is not None:
            after()
        return True
