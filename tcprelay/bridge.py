"""Joining a TCP socket and a muxado stream, both ways.

The relay bridges each public client to a stream; the adapter bridges each
stream to a connection to its local service. One ``Bridge`` per connection,
with one pump thread:

- socket -> stream: the pump thread reads the socket (blocking) and sends on
  the stream. The socket's EOF becomes the stream's FIN; a reset becomes an
  RST.
- stream -> socket: the session's reader thread hands data straight to the
  bridge (``Stream.set_receiver``), which sends it without blocking. What the
  socket cannot take at once waits in the bridge, bounded by the stream's
  window, and the ``Flusher`` thread writes it when the socket drains. So a
  slow client never holds up the session reader or any other client, and no
  thread handoff sits on this path. The stream's FIN becomes
  ``shutdown(SHUT_WR)`` once everything before it is out; an RST or the
  session's end closes the socket with a TCP reset (SO_LINGER 0) -- unless
  the stream's FIN came first: then the service has finished, and what it
  sent is still delivered (see ``stream_end``).

Client sockets stay in blocking mode with no Python timeout: with one,
CPython polls for room before even a ``MSG_DONTWAIT`` send, which would
block the session reader and the flusher on one slow client. The idle
timeout bounds the pump's reads with ``SO_RCVTIMEO`` instead.

Whichever direction ends last closes the socket and the stream: the pump
thread goes back to its pool as soon as the client's side is done, rather than
waiting (a wake-up per connection) for the service's side.
"""

import collections
import logging
import select
import selectors
import socket
import struct
import threading
import time

try:
    import fcntl
    import termios
    _OUTQ = termios.TIOCOUTQ   # = SIOCOUTQ: bytes a TCP socket has not had acknowledged
except (ImportError, AttributeError):   # not Linux: only our own sends count as activity
    fcntl = _OUTQ = None

from . import clock
from .muxado import ErrorCode, MuxadoError, SessionClosedError, StreamResetError

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)   # close() sends RST, not FIN
_SMALL_READ = 16 * 1024                   # idle connections stay cheap...
_BIG_READ = 512 * 1024                    # ...bulk ones read big
_WINDOW_CHECK = 1.0   # seconds between checks for a client reset while waiting for window
_DISCARD_READS = 64   # 64 KiB reads of unread client input before a close (else it sends RST)

# A bridge's states, each a field of its own guarded by the bridge's lock.
# Bridge._down, stream -> socket (an abort ends it in any of these: see _down_done):
DOWN_OPEN = "open"                 # no FIN from the stream yet: its data goes to the socket
DOWN_FIN_PENDING = "fin pending"   # the stream's FIN has come; what is pending goes out first
DOWN_SHUT = "shut"                 # the FIN has gone on: shutdown(SHUT_WR)
# Bridge._up, socket -> stream: does the stream take the client's data
UP_OPEN = "open"
UP_CUT = "cut"       # the peer left after its FIN: we stopped reading the socket (SHUT_RD)
# Bridge._pump_state: the pump thread's life, and how it ended
PUMPING = "pumping"
PUMP_CLIENT_FIN = "ended at the client's FIN"   # not at our own SHUT_RD
PUMP_ENDED = "ended"                            # a cut, a reset or an error ended it
# Bridge._ending: closing the socket and the stream once both directions are done
RUNNING = "running"
FINISHING = "finishing"   # _finish is claimed, by whichever direction ended last
CLOSED = "closed"         # _finish has closed them

# Bridge._abort, once the connection is being reset: why, and whether the stream
# is to be reset too (not when the stream's own failure is the reason)
_Abort = collections.namedtuple("_Abort", "reason reset_stream")


class Flusher(object):
    """One thread that writes out what slow sockets could not take at once.

    It also times out idle bridges whose pump has ended (see ``watch_idle``).
    """

    def __init__(self, name="flusher"):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)   # watch_idle must never block
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._idle = set()        # bridges with an idle timeout and no pump to apply it
        self._next_sweep = None   # monotonic time of the earliest idle deadline, or None
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.daemon = True
        self._thread.start()

    def watch(self, bridge):
        """Call ``bridge._flush()`` whenever its socket can take more (bridge lock held)."""
        if bridge._watched:
            return
        with self._lock:
            if self._closed:
                return
            self._selector.register(bridge.sock, selectors.EVENT_WRITE, bridge)
            bridge._watched = True

    def unwatch(self, bridge):
        """Stop watching ``bridge`` (bridge lock held)."""
        if not bridge._watched:
            return
        with self._lock:
            bridge._watched = False
            if not self._closed:
                self._selector.unregister(bridge.sock)

    def watch_idle(self, bridge):
        """Reset ``bridge`` once nothing has moved for its idle timeout (bridge lock held).

        For a bridge whose pump has ended (the client half-closed) while the
        service's side goes on: no read of the pump's times it out any more.
        """
        deadline = bridge._idle_deadline()
        with self._lock:
            if self._closed:
                return
            self._idle.add(bridge)
            if self._next_sweep is not None and self._next_sweep <= deadline:
                return
            self._next_sweep = deadline
        try:
            self._wake_w.send(b"t")   # select() again, with the new deadline
        except OSError:
            pass   # full: a wake-up is pending anyway

    def unwatch_idle(self, bridge):
        """Stop timing ``bridge`` (bridge lock held)."""
        with self._lock:
            self._idle.discard(bridge)

    def _sweep(self, now):
        """Reset the idle bridges whose time is up; the next deadline, or None."""
        with self._lock:
            bridges = list(self._idle)
        for bridge in bridges:
            if bridge._idle_deadline() <= now:
                if bridge._client_took_bytes():
                    bridge._last_down = now   # its pump has ended: only we look at it
                    continue
                self.unwatch_idle(bridge)
                bridge.abort("idle for %gs" % bridge._idle_timeout)
        with self._lock:
            # Over every bridge, those added during the sweep included.
            self._next_sweep = min((bridge._idle_deadline() for bridge in self._idle),
                                   default=None)
            return self._next_sweep

    def _run(self):
        timeout = None
        while True:
            for key, _ in self._selector.select(clock.capped(timeout)):
                if key.data is None:
                    with self._lock:
                        if self._closed:
                            return
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                key.data._flush()
            due = self._next_sweep   # a plain read: no lock per event
            if due is None:
                timeout = None
                continue
            now = time.monotonic()
            if now >= due:
                due = self._sweep(now)
                if due is None:
                    timeout = None
                    continue
            timeout = max(0.0, due - now)

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass   # full: a wake-up is pending anyway
        self._thread.join()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class Bridge(object):
    """Pumps bytes between ``sock`` and ``stream`` until both directions end.

    ``on_close(bridge)`` runs once the socket and the stream are closed
    (on whichever thread ends last). With ``workers`` (a ``WorkerPool``) the
    pump runs on a pooled thread instead of a thread of its own. The bridge
    owns ``stream``: it sets its timeout (the pump's waits for window end
    every ``_WINDOW_CHECK`` seconds to look for a client reset).

    ``idle_timeout`` (seconds, or None) resets the connection once nothing
    has moved either way for that long, in every half-close state. Moving
    down means bytes handed to the socket (at once or by the flusher) or
    the client taking bytes from its socket's send queue; moving up means
    bytes read from the socket or sent on the stream.

    ``nodelay``: set TCP_NODELAY on ``sock`` (False: it has it already, say
    from its listener).
    """

    def __init__(self, sock, stream, flusher, name=None, on_close=None, workers=None,
                 idle_timeout=None, nodelay=True):
        self.sock = sock
        self.stream = stream
        self.name = name or "bridge-%d" % stream.id
        self._flusher = flusher
        self._on_close = on_close
        self._workers = workers
        self._idle_timeout = idle_timeout
        self._last_down = time.monotonic()    # when data last went stream -> socket
        self._up_ended = 0.0                  # when the pump ended (its last read: EOF, say)
        self._finished = threading.Event()
        self._lock = threading.Lock()
        # Guarded by self._lock (the states: see the module's constants):
        self._pending = collections.deque()   # stream data the socket has not taken yet
        self._down = DOWN_OPEN                # stream -> socket
        self._up = UP_OPEN                    # socket -> stream: does the stream take data
        self._pump_state = PUMPING            # the pump's life, and how it ended
        self._ending = RUNNING                # closing both, once both directions are done
        self._abort = None                    # an _Abort once the connection is being reset
        self._watched = False                 # the flusher watches our socket (Flusher sets it)
        self._read_timeout = None             # the SO_RCVTIMEO set, in seconds
        self._poll = None                     # polls the socket for an error (_client_gone)
        self._last_queued = None              # the socket's send queue at the last idle check
        self.bytes_up = 0                     # socket -> stream
        self.bytes_down = 0                   # stream -> socket
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        if nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def run(self):
        """Pump in the calling thread until both directions end."""
        self.stream.set_receiver(self)
        self._pump()
        self._finished.wait()

    def start(self):
        """Pump on a thread of ``workers``, or a thread of its own."""
        self.stream.set_receiver(self)
        if self._workers is not None:
            self._workers.submit(self._pump)
        else:
            thread = threading.Thread(target=self._pump, name=self.name)
            thread.daemon = True
            thread.start()

    def join(self, timeout=None):
        """Wait for the pump to finish; True once it has."""
        return self._finished.wait(timeout)

    def abort(self, reason="aborted"):
        """Reset both sides now."""
        with self._lock:
            self._abort_locked(reason, reset_stream=True)
            finish = self._finisher_locked()
        if finish is not None:
            finish()

    # -- stream -> socket: the session reader thread, stream lock held; never blocks --

    def stream_data(self, data):
        with self._lock:
            if self._abort is not None or self._ending == CLOSED:
                return len(data)   # dropped; the window goes back
            if self._pending:
                self._pending.append(data)
                return 0
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._abort_locked("socket write failed: %s" % exc, reset_stream=True)
                if self._pump_state != PUMPING:
                    # No pump to finish, and the stream's lock is held here: the
                    # flusher sees the failed socket at once and finishes.
                    self._flusher.watch(self)
                return len(data)
            self.bytes_down += sent
            if self._idle_timeout is not None:
                self._last_down = time.monotonic()
            if sent < len(data):
                self._pending.append(memoryview(data)[sent:])
                self._flusher.watch(self)
            return sent

    def stream_end(self, error):
        with self._lock:
            if error is None:
                if self._pending:
                    self._down = DOWN_FIN_PENDING   # the flusher shuts, once they are out
                else:
                    self._shut_write_locked()
            elif self._service_done and _only_ends_sending(error):
                # The peer finished this stream before its session ended (or
                # before it closed the stream): what it sent is still
                # delivered; only socket -> stream ends.
                self._cut_up_locked()
            else:
                self._abort_locked(str(error), reset_stream=False)
            return self._finisher_locked()   # the stream calls it once its lock is free

    # -- the flusher thread ----------------------------------------------------------

    def _flush(self):
        with self._lock:
            if self._abort is not None or self._ending == CLOSED:
                self._flusher.unwatch(self)
                sent, finish = 0, self._finisher_locked()
            else:
                sent, finish = self._flush_locked()
        if sent:
            self.stream.consumed(sent)
        if finish is not None:
            finish()

    def _flush_locked(self):
        """Write what the socket takes now: (bytes written, the finisher or None)."""
        sent_total = 0
        while self._pending:
            chunk = self._pending[0]
            try:
                sent = self.sock.send(chunk, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._abort_locked("socket write failed: %s" % exc, reset_stream=True)
                return 0, self._finisher_locked()
            sent_total += sent
            if sent < len(chunk):
                self._pending[0] = memoryview(chunk)[sent:]
                break
            self._pending.popleft()
        self.bytes_down += sent_total
        if sent_total and self._idle_timeout is not None:
            self._last_down = time.monotonic()
        finish = None
        if not self._pending:
            self._flusher.unwatch(self)
            if self._fin_pending:
                self._shut_write_locked()
                finish = self._finisher_locked()
        return sent_total, finish

    # -- shared (bridge lock held) ------------------------------------------------------

    @property
    def _service_done(self):
        """The stream's FIN has come: the peer finished (an abort does not undo it)."""
        return self._down != DOWN_OPEN

    @property
    def _fin_pending(self):
        """The stream's FIN has come and waits for _pending to go out."""
        return self._down == DOWN_FIN_PENDING and self._abort is None

    @property
    def _down_done(self):
        """stream -> socket has ended: its FIN has gone on, or we are resetting."""
        return self._down == DOWN_SHUT or self._abort is not None

    @property
    def _up_done(self):
        """socket -> stream has ended: the pump is done."""
        return self._pump_state != PUMPING

    @property
    def _aborted(self):
        """Why the connection is being reset, or None."""
        return None if self._abort is None else self._abort.reason

    def _shut_write_locked(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._down = DOWN_SHUT

    def _cut_up_locked(self):
        """The stream takes no more data: stop reading the socket, keep delivering."""
        if self._up == UP_CUT:
            return
        self._up = UP_CUT
        if self._pump_state == PUMPING:
            try:
                self.sock.shutdown(socket.SHUT_RD)   # wakes the pump's recv
            except OSError:
                pass

    def _abort_locked(self, reason, reset_stream):
        """Start resetting the connection, once: what is pending is dropped,
        stream -> socket ends (see _down_done), the pump's recv is woken."""
        if self._abort is not None or self._ending == CLOSED:
            return
        self._abort = _Abort(reason, reset_stream)
        self._pending.clear()
        self._flusher.unwatch(self)
        try:
            # RST on close, and wake the pump's recv (SHUT_RD sends nothing).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # -- socket -> stream: the pump thread ---------------------------------------------

    def _idle_deadline(self):
        """When the flusher resets this bridge, its pump ended, unless something moves."""
        return max(self._last_down, self._up_ended) + self._idle_timeout

    def _set_read_timeout(self, seconds):
        """Bound the pump's next reads with SO_RCVTIMEO: sends are unaffected (see top)."""
        seconds = min(seconds, clock.MAX_TIMEOUT)   # any size, as socket timeouts
        whole = int(seconds)
        micro = int((seconds - whole) * 1e6)
        if not whole and not micro:
            micro = 1   # zero would mean no timeout at all
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micro))
        self._read_timeout = seconds

    def _idle(self):
        """After a read timed out: True if nothing moved either way for idle_timeout."""
        now = time.monotonic()
        quiet = now - self._last_down
        if quiet >= self._idle_timeout:
            if not self._client_took_bytes():
                return True
            self._last_down, quiet = now, 0.0
        self._set_read_timeout(self._idle_timeout - quiet)   # the other direction was busy
        return False

    def _stalled_idle(self, stalled_since, now):
        """Waiting for window since ``stalled_since``: True if nothing moved either way
        for idle_timeout."""
        if now - max(stalled_since, self._last_down) < self._idle_timeout:
            return False
        if self._client_took_bytes():
            self._last_down = now
            return False
        return True

    def _client_took_bytes(self):
        """At an idle deadline: True if the client read from what its socket held for it.

        A slow reader takes its bytes from the socket's send queue for long
        stretches with no write of ours; the queue shrinking shows it.
        One ioctl per idle deadline, none per chunk.
        """
        queued = self._queued_out()
        if queued is None:
            return False
        last, self._last_queued = self._last_queued, queued
        if last is None:
            return queued > 0   # first look: bytes in flight may be moving; look again later
        return queued != last

    def _client_has_all(self):
        """True if the client's end has acknowledged all we wrote (our FIN aside)."""
        queued = self._queued_out()
        return queued is not None and queued <= 1   # the FIN takes a sequence number

    def _queued_out(self):
        """Bytes written to the socket and not yet acknowledged (None: unknown)."""
        if _OUTQ is None:
            return None
        try:
            return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return None

    def _client_gone(self):
        """While waiting for window: True if the client reset its connection.

        A FIN is not its going away (what it sent is still delivered): only
        an error on the socket, or a failed write to it, counts.
        """
        with self._lock:
            if self._abort is not None:
                return True
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, 0)   # POLLERR is always reported
        return any(events & select.POLLERR for _, events in self._poll.poll(0))

    def _send_up(self, view):
        """Send ``view`` on the stream: False if this direction has ended."""
        stream = self.stream
        stalled_since = None
        while view:
            try:
                sent = stream.send(view)
            except socket.timeout:
                # No window for _WINDOW_CHECK (nothing was sent): is the client still there?
                if self._client_gone():
                    with self._lock:
                        self._abort_locked("the client reset while waiting for window",
                                           reset_stream=True)
                    return False
                now = time.monotonic()
                if stalled_since is None:
                    stalled_since = now - _WINDOW_CHECK
                if self._idle_timeout is not None and self._stalled_idle(stalled_since, now):
                    with self._lock:
                        self._abort_locked("idle for %gs (the service takes nothing)"
                                           % self._idle_timeout, reset_stream=True)
                    return False
                continue
            except (MuxadoError, OSError) as exc:
                self._stream_write_failed(exc)
                return False
            stalled_since = None
            view = view[sent:]
        return True

    def _stream_write_failed(self, exc):
        with self._lock:
            if self._abort is None and self._up == UP_CUT:
                return   # the peer finished and left: its data is still on its way down
            self._abort_locked("stream write failed: %s" % exc, reset_stream=False)

    def _pump(self):
        threading.current_thread().name = self.name
        stream = self.stream
        idle_timeout = self._idle_timeout
        client_fin = False
        try:
            if idle_timeout is not None:
                self._set_read_timeout(idle_timeout)
            # The waits for window end every _WINDOW_CHECK to look at the client;
            # nothing else waits on this stream (its data goes to stream_data).
            stream.settimeout(_WINDOW_CHECK)
            client_fin = self._pump_up()
            self._end_up()
        except Exception:
            log.exception("bridge for stream %d failed", stream.id)
            with self._lock:
                self._abort_locked("internal error", reset_stream=True)
            stream.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            # The other direction may go on for as long as the peer likes:
            # whichever side ends last finishes (see _finisher_locked).
            with self._lock:
                self._pump_state = PUMP_CLIENT_FIN if client_fin else PUMP_ENDED
                self._up_ended = time.monotonic()   # the client's FIN is activity too
                finish = self._finisher_locked()
                if (finish is None and idle_timeout is not None and self._abort is None
                        and self._ending != CLOSED):
                    self._flusher.watch_idle(self)   # no read of ours times it out now
            if finish is not None:
                finish()

    def _pump_up(self):
        """socket -> stream until the client's EOF, an error, an abort or the idle timeout.

        True if it ended at the client's FIN (not at our own SHUT_RD).
        """
        sock = self.sock
        idle_timeout = self._idle_timeout
        buf = bytearray(_SMALL_READ)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    # SO_RCVTIMEO ran out (only set with an idle timeout)
                    if idle_timeout is None or not self._idle():
                        continue
                    with self._lock:
                        self._abort_locked("idle for %gs" % idle_timeout, reset_stream=True)
                    return False
                except OSError as exc:
                    with self._lock:
                        self._abort_locked("socket read failed: %s" % exc, reset_stream=True)
                    return False
                if not n:
                    with self._lock:
                        return self._up == UP_OPEN   # else: our own SHUT_RD
                if idle_timeout is not None and self._read_timeout != idle_timeout:
                    self._set_read_timeout(idle_timeout)   # after a shortened wait
                if not self._send_up(view[:n]):
                    return False
                self.bytes_up += n
                if n == len(buf) and len(buf) < _BIG_READ:
                    view.release()
                    buf = bytearray(_BIG_READ)
                    view = memoryview(buf)
        finally:
            view.release()

    def _end_up(self):
        """Pass on how socket -> stream ended: the client's FIN, or a reset."""
        with self._lock:
            abort = self._abort
            cut = self._up == UP_CUT
        if abort is None and not cut:
            try:
                self.stream.close_write()
            except (MuxadoError, OSError) as exc:
                self._stream_write_failed(exc)
        elif abort is not None and abort.reset_stream:
            self.stream.reset(ErrorCode.STREAM_RESET)

    # -- the end: both directions done -------------------------------------------------

    def _discard_input(self):
        """Read away what the client sent that the stream could no longer take.

        Closing a socket with unread input sends RST, which would lose what
        is still on its way to the client.
        """
        scratch = bytearray(64 * 1024)
        for _ in range(_DISCARD_READS):
            try:
                if not self.sock.recv_into(scratch, 0, socket.MSG_DONTWAIT):
                    return
            except OSError:
                return

    def _finisher_locked(self):
        """``_finish`` if both directions are done and nobody has claimed it, else None."""
        if self._pump_state != PUMPING and self._down_done and self._ending == RUNNING:
            self._ending = FINISHING
            return self._finish
        return None

    def _finish(self):
        """Close the socket and the stream (no bridge or stream lock held).

        It may run on the session's reader thread or the flusher, which serve
        other connections too: it never blocks, and never lets an error out.
        """
        stream = self.stream
        try:
            with self._lock:
                self._ending = CLOSED
                self._pending.clear()
                self._flusher.unwatch(self)
                if self._idle_timeout is not None:
                    self._flusher.unwatch_idle(self)
                abort = self._abort   # CLOSED: no abort comes after this
                discard = self._up == UP_CUT and abort is None
                client_fin = self._pump_state == PUMP_CLIENT_FIN
            if discard:
                self._discard_input()
                if not client_fin and self._client_has_all():
                    # The client may still be sending, to a socket shut for
                    # reading: that socket would answer with a zero window, not
                    # a reset, and leave it hanging. Everything it was owed has
                    # reached it, so a reset loses nothing, as TCP's close does.
                    try:
                        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
            try:
                if abort is not None and abort.reset_stream:   # a no-op if the pump has reset it
                    stream.reset(ErrorCode.STREAM_RESET, wait=False)
            finally:
                self.sock.close()
            stream.close()
            if abort is not None:
                log.debug("stream %d: reset: %s", stream.id, abort.reason)
            if self._on_close is not None:
                self._on_close(self)
        except Exception:
            log.exception("bridge for stream %d failed while closing", stream.id)
        finally:
            self._finished.set()


def _only_ends_sending(error):
    """True if ``error``, after the peer's FIN, ends only our sending on the stream:
    the session's end, or the peer refusing data on a stream it has closed."""
    if isinstance(error, SessionClosedError):
        return True
    return isinstance(error, StreamResetError) and error.code == ErrorCode.STREAM_CLOSED
