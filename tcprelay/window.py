"""A muxado stream's receive window, in numbers: no I/O, no locks, no clock.

The peer may send us ``size`` bytes past what it has been granted back.
Consumed bytes go back in batches (one WNDINC per half window), a window
bigger than the protocol's 256 KiB is granted early, and a MSG_WAITALL
read for more than the window gets window back while it waits. Each
method returns the WNDINC increment to send now (0: none); the caller
sends it and holds the stream's lock around every call.

Source: the window rules of muxado v2 (Go's ``muxado/v2`` stream.go:
initial window 256 KiB, WNDINC adds to the sender's window) and yamux's
batching of window updates at half the window.
"""

from .frames import DEFAULT_WINDOW

# The early grant of a big window waits until the peer has used this much of
# its first one (a quarter), unless it rides along with a frame of ours first:
# a short request and reply then costs no WNDINC frame of its own.
EARLY_GRANT_AFTER = DEFAULT_WINDOW // 4


class ReceiveWindow(object):
    """What the peer may still send on one stream, and what we owe it back.

    ``size`` (bytes) is the window we keep, at least ``initial``, the
    protocol's window (v2's 256 KiB, DEFAULT_WINDOW; v1's 64 KiB): the peer
    starts with ``initial`` and gets the rest as the early grant.
    """

    __slots__ = ("size", "available", "threshold", "unacked", "granted_ahead", "grant_pending",
                 "early_after")

    def __init__(self, size, initial=DEFAULT_WINDOW):
        self.size = size
        self.available = size           # what the peer may still send us
        self.threshold = max(1, size // 2)   # a WNDINC goes once this much is owed
        self.unacked = 0                # consumed, not yet granted back
        self.granted_ahead = 0          # buffered, granted back before it was read (MSG_WAITALL)
        self.grant_pending = size - initial   # the early grant of a big window
        self.early_after = initial // 4       # EARLY_GRANT_AFTER for v2

    def admit(self, length):
        """Take a DATA frame of ``length`` bytes; False if it overruns the window."""
        if length > self.available:
            return False
        self.available -= length
        return True

    def take_grant(self):
        """The early grant, if still owed, to ride along with a frame of ours."""
        grant = self.grant_pending
        if grant:
            self.grant_pending = 0
        return grant

    def untake_grant(self, grant):
        """Owe again a grant taken for a frame that never went out."""
        self.grant_pending += grant

    def consumed(self, n, buffered, ended):
        """``n`` bytes read (or dropped, or passed on); the increment owed now.

        ``buffered``: bytes received and not yet read. ``ended``: the peer
        sends no more (FIN or reset), so nothing is granted back.
        """
        if self.granted_ahead:
            early = min(n, self.granted_ahead)   # their window went back already
            self.granted_ahead -= early
            n -= early
        if not n and not self.grant_pending:
            return 0
        self.unacked += n
        if ended:
            return 0
        if self.unacked >= self.threshold or (
                self.grant_pending and self.unacked + buffered >= self.early_after):
            grant = self.unacked + self.grant_pending
            self.available += self.unacked
            self.unacked = 0
            self.grant_pending = 0
            return grant
        return 0

    def flush(self):
        """All that is owed, granted now whatever the batching (a FIN is going out)."""
        grant = self.grant_pending + self.unacked
        self.grant_pending = 0
        self.unacked = 0
        return grant

    def settle_due(self, unsettled, waiting):
        """Whether ``unsettled`` bytes read but not yet accounted make a WNDINC due.

        ``waiting``: a MSG_WAITALL read waits for more (it needs window back).
        """
        return unsettled > 0 and (self.grant_pending > 0 or waiting
                                  or self.unacked + unsettled >= self.threshold)

    def early_return(self, want, buffered, ended):
        """(increment, of it granted ahead) owed now to a MSG_WAITALL read of ``want`` bytes.

        A caller waiting for more than the window must not wait for its own
        read to return the window. So while it waits, what is consumed and
        not yet granted goes back, and so do buffered bytes, ahead of their
        reading, but only as far as lets ``want`` bytes in: the buffer stays
        within max(window, want). Batched as any WNDINC (half a window).
        Nothing once ``ended`` (the peer sends no more, or reads are shut).
        """
        if ended:
            return 0, 0
        unread = buffered - self.granted_ahead   # buffered, window not yet returned
        if self.unacked + unread < self.threshold:
            return 0, 0
        ahead = max(0, min(unread, want - self.size - self.granted_ahead))
        return self.unacked + ahead, ahead

    def grant_while_waiting(self, want, buffered, ended):
        """The increment to send now for a MSG_WAITALL read of ``want`` bytes, accounted."""
        # The early grant of a big window first: the peer may not send
        # more than the first window without it.
        grant = self.take_grant()
        if grant:
            return grant
        grant, ahead = self.early_return(want, buffered, ended)
        if grant:
            self.available += grant
            self.unacked = 0
            self.granted_ahead += ahead
        return grant
