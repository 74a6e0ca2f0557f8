"""A muxado stream's side of the session reader's work: a DATA frame admitted
against the stream's receive window, its payload buffered or handed to the
stream's receiver, the peer's FIN, and window updates for what we send.

``IncomingFrames`` is a base of ``stream.Stream`` and works on its state,
under its lock. These run on the thread leading the session's reads (see
``reader.SessionReader``), never block, and call back into the session
only after the stream's lock is released.
"""

from .frames import MAX_WINDOW
from .socketlike import CLOSED


class IncomingFrames(object):
    """The reader thread's calls into a stream (see the module docstring)."""

    def _admit(self, length):
        """Take a DATA frame of ``length`` against the window. 1 ok, 0 gone, -1 overrun."""
        with self._lock:
            if self._close_state is CLOSED or self._error is not None:
                return 0
            return 1 if self._window.admit(length) else -1

    def _receive(self, data, fin):
        """A whole DATA frame: window check, payload and FIN under one lock.

        Returns 1, 0 if the stream is gone, or -1 if the frame overran the window.
        """
        with self._lock:
            if self._close_state is CLOSED or self._error is not None:
                return 0
            if not self._window.admit(len(data)):
                return -1
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
            self._writer.queue_control(self._writer.encode_wndinc(self.id, grant))
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
            if self._close_state is CLOSED:
                return False
            grant = self._deliver_locked(data)
        if grant:
            self._writer.queue_control(self._writer.encode_wndinc(self.id, grant))
        return True

    def _deliver_locked(self, data):
        """Buffer ``data`` or hand it on; the WNDINC increment owed now, or 0."""
        if self._receiver is not None and not self._read_shut:
            used = self._receiver.stream_data(data)
            self._kept += len(data) - used
            return self._consumed(used)
        if self._read_shut or self._close_state is CLOSED:
            return self._consumed(len(data))
        self._buffer.append(data)
        if self._readers_waiting:
            self._reader.handoffs += 1   # a parked reader will come back for more
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
