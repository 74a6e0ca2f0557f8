"""The relay's public ports: a counting semaphore with a first-come line.

Services ask for a port (any, or one in particular) and wait in arrival order
until one is free. A port that cannot be bound (another program holds it) is
skipped and tried again later, never lost from the pool. A released port can
be held back for a while for one holder of a lease token, so that a service
that reconnects gets its old port back.
"""

import logging
import threading
import time

from . import clock

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5.0   # seconds a port that could not be bound is skipped

LINE_OPEN = "open"           # requests join the line and are granted in turn
LINE_CLOSED = "closed"       # nothing more is granted (the relay is leaving)


class PoolError(Exception):
    """A request the pool can never grant (a port outside it, say)."""


class Cancelled(Exception):
    """The ticket was cancelled while waiting (its service went away)."""


class Ticket(object):
    """One place in the line. Get one from ``PortPool.request``."""

    def __init__(self, pool, port, lease, prefer):
        self._pool = pool
        self.port = port           # the port asked for, or None for any
        self.lease = lease         # a lease token that may unlock a held-back port
        self.prefer = prefer       # taken if free, else any port
        self.cancelled = False
        self.binding = False       # a port is being bound for it (counted in _binding)
        self.granted = None        # (port, listener) once granted

    @property
    def position(self):
        """1 for the head of the line; 0 once out of it."""
        return self._pool._position(self)

    def wait(self, timeout=None, position=None):
        """Wait for a port: ``(port, listener)`` once granted.

        Returns None if ``timeout`` passed or this ticket's place in line
        differs from ``position`` (by default, its place when the wait
        began), so the caller can report it. Pass the position you last
        reported: a change between reading it and waiting is then not
        missed. Raises ``Cancelled``.
        """
        return self._pool._wait(self, timeout, position)

    def cancel(self):
        """Leave the line at once (safe from any thread, any number of times)."""
        self._pool._cancel(self)


class PortPool(object):
    """Hands out ``ports`` in arrival order, at most ``limit`` at a time.

    ``bind(port)`` returns a listening socket or raises OSError; a port that
    fails is skipped for ``retry_after`` seconds. ``clock``: monotonic seconds,
    the time of holds, skips and the deadlines of waits (a test's clock that
    stands still suits waits with timeout 0 only).
    """

    def __init__(self, ports, bind, limit=None, retry_after=DEFAULT_RETRY_AFTER,
                 clock=time.monotonic):
        self._ports = sorted(set(int(p) for p in ports))
        if not self._ports:
            raise ValueError("the port pool is empty")
        self._bind = bind
        self._limit = len(self._ports) if limit is None else max(1, int(limit))
        self._retry_after = retry_after
        self._clock = clock
        self._cond = threading.Condition()
        self._free = set(self._ports)
        self._cooldown = {}      # port -> monotonic time it may be tried again
        self._held = {}          # port -> (lease token, monotonic expiry)
        self._line = []          # tickets in arrival order
        self._line_state = LINE_OPEN
        self._binding = 0        # grants in progress (bind running outside the lock)

    @property
    def ports(self):
        return list(self._ports)

    @property
    def limit(self):
        """How many ports may be in use at once (``limit``, or every port)."""
        return self._limit

    def __contains__(self, port):
        return port in self._free or port in self._ports

    def request(self, port=None, lease=None, prefer=None):
        """Join the line for ``port`` (None for any). Raises PoolError if impossible.

        ``lease`` unlocks a port held back for that token; ``prefer`` is a
        port to take if it is free, with any other port as good otherwise.
        """
        if port is not None and port not in self._ports:
            raise PoolError("port %d is not in this relay's pool (%s)" % (port, self.describe()))
        ticket = Ticket(self, port, lease, prefer)
        with self._cond:
            if self._line_state is LINE_CLOSED:
                ticket.cancelled = True   # its wait raises Cancelled at once
                return ticket
            self._line.append(ticket)
            self._cond.notify_all()
        return ticket

    @property
    def line_open(self):
        """False once ``close_line`` ran: nothing will be granted."""
        with self._cond:
            return self._line_state is LINE_OPEN

    def close_line(self):
        """Grant nothing from now on: every ticket in line, and every later
        request, is cancelled (their waits raise ``Cancelled``). Ports in use
        stay theirs. For a relay that is leaving: a port given back while it
        drains must not go to a service that will be told to leave next."""
        with self._cond:
            self._line_state = LINE_CLOSED
            for ticket in self._line:
                ticket.cancelled = True
            del self._line[:]
            self._cond.notify_all()

    def release(self, port, hold_for=None, hold_seconds=0.0):
        """Give ``port`` back; with ``hold_for`` only that lease token may take it for a while."""
        with self._cond:
            if hold_for is not None and hold_seconds > 0:
                self._held[port] = (hold_for, self._clock() + hold_seconds)
            self._free.add(port)
            self._cond.notify_all()

    def held_for(self, port):
        """The lease token ``port`` is held back for, or None (not held, or the hold ended)."""
        with self._cond:
            held = self._held.get(port)
            if held is None or held[1] <= self._clock():
                return None
            return held[0]

    def describe(self):
        low, high = self._ports[0], self._ports[-1]
        if high - low + 1 == len(self._ports):
            return "%d-%d" % (low, high)
        return ", ".join(str(p) for p in self._ports)

    def stats(self):
        with self._cond:
            return {"free": len(self._free), "in_use": self._taken() - self._binding,
                    "waiting": len(self._line)}

    ALL_TAKEN = "every public port is taken"

    def why_waiting(self, ticket):
        """Why ``ticket`` has no port yet, as a phrase for logs and replies
        (``ALL_TAKEN`` when that is all there is to say)."""
        with self._cond:
            now = self._clock()
            port = ticket.port
            if port is not None:
                if port not in self._free:
                    return "port %d is held by another service" % port
                held = self._held.get(port)
                if held is not None and held[1] > now and held[0] != ticket.lease:
                    return ("port %d is held for the lease of the service that had it"
                            % port)
                if self._cooldown.get(port, now) > now:
                    return "port %d cannot be bound now (another program has it)" % port
            if port is None and not self._free:
                return self.ALL_TAKEN
            if self._taken() >= self._limit:
                return ("the relay serves as many services as it may at once (%d), with "
                        "ports free" % self._limit)
            if port is not None:
                return "port %d is promised to a service ahead in line" % port
            unbindable = held = 0
            for free in self._free:
                if self._cooldown.get(free, now) > now:
                    unbindable += 1
                elif self._held.get(free, (None, now))[1] > now:
                    held += 1
            parts = []
            if unbindable:
                parts.append("%d cannot be bound now (another program has it)" % unbindable)
            if held:
                parts.append("%d held for the leases of services that left" % held)
            if len(self._free) > unbindable + held:
                parts.append("%d promised to services ahead in line"
                             % (len(self._free) - unbindable - held))
            return "of the free ports, " + ", ".join(parts)

    @property
    def waiting(self):
        with self._cond:
            return len(self._line)

    # -- internals (self._cond held where noted) ------------------------------------

    def _position(self, ticket):
        with self._cond:
            try:
                return self._line.index(ticket) + 1
            except ValueError:
                return 0

    def _cancel(self, ticket):
        with self._cond:
            ticket.cancelled = True
            if ticket in self._line:
                self._line.remove(ticket)
                self._cond.notify_all()

    def _usable(self, port, ticket, now):
        """Whether ``ticket`` may take the free ``port`` now (lock held)."""
        retry = self._cooldown.get(port)
        if retry is not None:
            if retry > now:
                return False
            del self._cooldown[port]
        held = self._held.get(port)
        if held is not None:
            token, expiry = held
            if expiry <= now:
                del self._held[port]
            elif ticket.lease != token:
                return False
        return True

    def _assign(self, me, now):
        """The port ``me`` gets if the line is served in order now, else None (lock held)."""
        if self._taken() >= self._limit:
            return None
        taken = set()
        slots = self._limit - self._taken()
        for ticket in self._line:
            if ticket.binding:
                continue   # its slot is already counted in self._binding
            if slots <= 0:
                return None
            if ticket.port is not None:
                candidates = [ticket.port] if ticket.port in self._free else []
            else:
                # A lease's own held-back port first, then the preferred one,
                # then the lowest free one.
                def rank(p, ticket=ticket):
                    mine = ticket.lease is not None and self._held.get(p, (None,))[0] == ticket.lease
                    return (not mine, p != ticket.prefer, p)
                candidates = sorted(self._free, key=rank)
            port = None
            for candidate in candidates:
                if candidate not in taken and self._usable(candidate, ticket, now):
                    port = candidate
                    break
            if port is not None:
                if ticket is me:
                    return port
                taken.add(port)
                slots -= 1
        return None

    def _taken(self):
        """Ports not free: in use, or being bound for a grant (lock held)."""
        return len(self._ports) - len(self._free)

    def _next_change(self, now):
        """Seconds until a cooled-down or held-back port may become usable (lock held)."""
        times = list(self._cooldown.values()) + [expiry for _, expiry in self._held.values()]
        future = [t - now for t in times if t > now]
        return min(future) if future else None

    def _wait(self, ticket, timeout, start_position=None):
        end = None if timeout is None else self._clock() + timeout
        with self._cond:
            if start_position is None:
                start_position = self._position_locked(ticket)
            while True:
                if ticket.cancelled:
                    raise Cancelled()
                now = self._clock()
                port = self._assign(ticket, now)
                if port is not None:
                    self._free.discard(port)
                    self._held.pop(port, None)
                    self._binding += 1
                    ticket.binding = True
                    self._cond.release()
                    try:
                        listener = self._bind(port)
                    except OSError as exc:
                        listener = None
                        log.warning("public port %d cannot be bound (%s); skipping it for %gs",
                                    port, exc, self._retry_after)
                    finally:
                        self._cond.acquire()
                        self._binding -= 1
                        ticket.binding = False
                    if listener is None:
                        self._free.add(port)
                        self._cooldown[port] = self._clock() + self._retry_after
                        self._cond.notify_all()
                        continue
                    if ticket.cancelled:
                        listener.close()
                        self._free.add(port)
                        self._cond.notify_all()
                        raise Cancelled()
                    self._line.remove(ticket)
                    ticket.granted = (port, listener)
                    self._cond.notify_all()
                    return ticket.granted
                if self._position_locked(ticket) != start_position:
                    return None
                wait = self._next_change(now)
                if end is not None:
                    left = end - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(clock.capped(wait))

    def _position_locked(self, ticket):
        try:
            return self._line.index(ticket) + 1
        except ValueError:
            return 0
