"""Writing a muxado session's frames: whole, in order, one unit at a time.

Every thread writes its own frames, under the session's one write lock,
header and payload in one ``sendmsg``. The session's reader thread never
blocks on the socket: frames it owes the peer (RST, WNDINC) go out at once
if the socket has room, else from this module's writer thread. A write
that makes no progress for ``write_timeout`` seconds ends the session
(the socket's SO_SNDTIMEO enforces it, without polling).
"""

import collections
import logging
import socket
import struct
import sys
import threading

from .frames import ErrorCode, MuxadoError, ProtocolError
from .mainthread import MAIN_IDENT

log = logging.getLogger("tcprelay.muxado")

DEFAULT_WRITE_TIMEOUT = 30.0
GOAWAY_ON_CLOSE_TIMEOUT = 0.25    # as Go: a closing session tries this long to say GOAWAY
MAX_QUEUED_REPLIES = 10000        # frames the reader may owe the peer before it calls a flood
_MAX_IOV = 64                     # more buffers than this are joined (IOV_MAX is 1024)


class FrameWriter(object):
    """The write side of one session: the write lock, the socket's writes,
    and the writer thread that sends what the reader thread owes the peer.

    ``owner`` is the Session; the writer reads its ``name``, ``codec`` and ``error``
    (set: ended), and a failed write ends it (``_die``). Methods raise
    SessionClosedError once the session has ended. The codec's encoders are
    bound here once (``encode_data_header``, ``encode_wndinc``, ``encode_rst``),
    for the session's streams too.
    """

    def __init__(self, owner, sock, write_timeout):
        self._owner = owner
        codec = owner.codec
        self.encode_data_header = codec.encode_data_header
        self.encode_wndinc = codec.encode_wndinc
        self.encode_rst = codec.encode_rst
        self._with_syn = codec.with_syn
        self._encode_goaway = codec.encode_goaway
        self._sock = sock
        self.write_timeout = write_timeout
        self.lock = threading.Lock()             # one whole frame (or batch) at a time
        self._control = collections.deque()      # frames from the reader, for the writer thread
        # Conditions are entered by their locks (a C __enter__): a signal
        # handler's exception in Condition.__enter__, Python code, could
        # leave the lock taken for good.
        self._control_lock = threading.RLock()   # see defer_from_finaliser
        self._control_ready = threading.Condition(self._control_lock)
        self.use_sendmsg = not _is_tls(sock) and hasattr(sock, "sendmsg")
        _tune_socket(sock, write_timeout)
        self._thread = threading.Thread(target=self._control_loop, name=owner.name + "-writer")
        self._thread.daemon = True

    def start(self):
        self._thread.start()

    def join(self):
        """Wait for the writer thread to end (after the session has)."""
        if self._thread is not threading.current_thread():
            self._thread.join()

    def session_ended(self):
        """Wake the writer thread to see that the session has ended."""
        with self._control_lock:
            self._control_ready.notify_all()

    def close_socket(self):
        """Close the transport once no writer is inside a syscall on it."""
        with self.lock:
            try:
                self._sock.close()
            except OSError:
                pass

    def write(self, buffers, written=None, stream=None):
        """Write whole frames, in order, as one unit. Raises SessionClosedError.

        ``written``, a deque, is not empty once the unit's first bytes went
        out (then all of it did, see _sendv_shielded): a caller whose call an
        exception cut short learns whether the frames were sent. ``stream``:
        the stream whose DATA frame comes first; if the peer has not heard
        of it yet, that frame carries its SYN.
        """
        if written is None and stream is not None:
            written = collections.deque()
        # No timeout here: a writer queued behind others on a slow link is
        # not a stuck peer. The holder's SO_SNDTIMEO bounds a write that
        # makes no progress, and its failure ends the session for us all.
        failure = None
        with self.lock:   # a C __enter__: no exception between taking and try
            announcing = False
            try:
                if self._owner.error is not None:
                    raise self._owner._ended_error()
                if stream is not None and stream._unannounced:
                    # Cleared before the write, as an RST from another thread
                    # must know that the peer hears of the stream now.
                    announcing = True
                    stream._unannounced = False
                    if stream._error is not None:
                        # Reset before its first frame went: the RST was
                        # skipped (send_rst), so the peer must never hear of it.
                        stream._unannounced = True
                        return
                    buffers = (self._with_syn(buffers[0]),) + tuple(buffers[1:])
                self._sendv(buffers, written)
            except OSError as exc:
                failure = exc
            except BaseException:
                if announcing and not written:
                    stream._unannounced = True   # cut short before the SYN went
                raise
        if failure is not None:
            self._write_failed(failure)

    def _write_failed(self, exc):
        if isinstance(exc, BlockingIOError) or isinstance(exc, socket.timeout):
            log.warning("%s: peer stopped reading; write timed out after %ss",
                        self._owner.name, self.write_timeout)
            self._owner._die(ErrorCode.WRITE_TIMEOUT, "write timed out")
        else:
            self._owner._die(ErrorCode.SESSION_CLOSED, "transport write failed: %s" % exc)
        raise self._owner._ended_error()

    def send_data(self, stream, payload, flags, grant, written=None):
        """One DATA frame for ``stream`` (plus its early window grant, if owed).

        ``written`` as for ``write``.
        """
        header = self.encode_data_header(stream.id, len(payload), flags)
        if grant:
            self.write((header, payload, self.encode_wndinc(stream.id, grant)), written, stream)
        elif payload:
            self.write((header, payload), written, stream)
        else:
            self.write((header,), written, stream)

    def send_wndinc(self, stream, increment):
        try:
            self.write((self.encode_wndinc(stream.id, increment),))
        except MuxadoError:
            pass  # the session has ended; the stream's next call says so

    def send_rst(self, stream, code, wait=True):
        """RST for ``stream``, whose error is set already (see Stream.reset)."""
        if stream._unannounced:
            # The peer never heard of it. A first frame about to go sees the
            # error and is dropped (write): the SYN is cleared before the
            # error is read there, and the error set before this read.
            return
        if not wait:
            self.queue_control(self.encode_rst(stream.id, code))
            return
        try:
            self.write((self.encode_rst(stream.id, code),))
        except MuxadoError:
            pass

    def _sendv(self, buffers, written=None):
        """Write ``buffers`` whole (write lock held).

        ``written``, a deque, gets the count of each write appended.
        """
        sock = self._sock
        if threading.get_ident() == MAIN_IDENT:
            self._sendv_shielded(buffers, collections.deque() if written is None else written)
            return
        if not self.use_sendmsg or len(buffers) > _MAX_IOV:
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
        if not self.use_sendmsg:
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

    def reply(self, frame):
        """A frame the reader thread owes the peer (an RST, say), via the writer.

        The queue is bounded: a peer that keeps sending frames that need an
        answer while it does not read ours is flooding us.
        """
        if len(self._control) >= MAX_QUEUED_REPLIES:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM,
                                "too many replies queued: the peer does not read them")
        self.queue_control(frame)

    def queue_control(self, frame):
        """Send a small frame without ever blocking: the reader must not block.

        Waking the writer thread costs more than the frame, so first try to
        send it at once: if nobody is writing and the socket has room, it
        goes out now. Otherwise the writer thread sends it.
        """
        # Not in the main thread: nothing there may stand between a
        # non-blocking acquire and the try that releases (a signal handler
        # may raise there); the writer thread sends it instead.
        if (self.use_sendmsg and threading.get_ident() != MAIN_IDENT
                and self.lock.acquire(False)):
            failure = None
            sent = 0
            try:
                if not self._control and self._owner.error is None:
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
                self.lock.release()
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

    def defer(self, action):
        """Run ``action()`` on the writer thread, which holds no stream lock."""
        self._hand_to_writer(action)

    def defer_from_finaliser(self, action):
        """``defer`` for a finaliser, which runs wherever the garbage collector
        does: on any thread, the writer thread too, inside its own hold of
        the queue's lock (an RLock for this). Holders of that lock wait for
        nothing else, so taking it from another thread cannot deadlock."""
        self._control.append(action)   # one C call: atomic
        with self._control_lock:
            self._control_ready.notify()

    def _control_loop(self):
        try:
            while True:
                with self._control_lock:
                    while not self._control and self._owner.error is None:
                        self._control_ready.wait()
                    if self._owner.error is not None:
                        return
                    # popleft, not list() and clear(): a finaliser may append
                    # meanwhile, even on this thread (defer_from_finaliser)
                    items = []
                    while self._control:
                        items.append(self._control.popleft())
                frames = []
                for item in items:
                    if callable(item):
                        if frames:
                            self.write(frames)
                            frames = []
                        item()
                    else:
                        frames.append(item)
                if frames:
                    self.write(frames)
        except MuxadoError:
            pass
        except Exception:
            log.exception("%s: writer thread failed", self._owner.name)
            self._owner._die(ErrorCode.INTERNAL_ERROR, "writer thread failed")

    def try_goaway(self, last_stream_id, code, debug):
        """The closing GOAWAY, best effort: at most GOAWAY_ON_CLOSE_TIMEOUT for
        the write lock, and no wait for room on the socket (over TLS, at most
        as long again)."""
        if not self.lock.acquire(True, GOAWAY_ON_CLOSE_TIMEOUT):
            return
        try:
            frame = self._encode_goaway(last_stream_id, code, debug)
            if self.use_sendmsg:
                self._sock.send(frame, socket.MSG_DONTWAIT)
            else:
                _set_send_timeout(self._sock, GOAWAY_ON_CLOSE_TIMEOUT)
                self._sock.sendall(frame)
        except OSError:
            pass
        finally:
            self.lock.release()


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
