"""Leases: a service's way back to its port after its connection is lost.

A token is handed to a service when it registers. Re-registering with it
within ``lease_time`` gets the same port back; while the lease holds, the port
goes to no one else. A token this relay does not know (it restarted, or the
lease ran out) still names its port: taken if free, as a preference.

When a lease runs out is kept in one place: the port pool, which holds the
port back for the token (``PortPool.release(hold_for=...)``) and knows until when.
"""

import logging
import secrets
import threading

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")


class Lease(object):
    """One lease: its ``token`` (text), the public ``port`` it names, and its
    ``holder``, the ``ServiceLink`` registered with it (None once that left)."""

    __slots__ = ("token", "port", "holder")

    def __init__(self, token, port, holder):
        self.token = token
        self.port = port
        self.holder = holder

    def __repr__(self):
        return "<Lease port %d%s>" % (self.port, "" if self.holder else ", holder gone")


class Leases(object):
    """The leases a relay has handed out.

    ``pool``: the relay's ``PortPool``; ``lease_time``: seconds a lost
    service's port is held back for its lease (0: no leases are handed out).
    """

    def __init__(self, pool, lease_time):
        self._pool = pool
        self.lease_time = lease_time
        self._lock = threading.Lock()
        self._leases = {}   # token -> Lease

    def issue(self, link, port):
        """A new token for ``link``, registered on ``port``; older leases of that port end."""
        token = "%d-%s" % (port, secrets.token_hex(16))
        with self._lock:
            for old in [t for t, lease in self._leases.items() if lease.port == port]:
                del self._leases[old]
            self._leases[token] = Lease(token, port, link)
        return token

    def claim(self, token, link):
        """(lease token to wait with, preferred port) for ``link``, re-registering
        with ``token``: ``(token, its port)`` while the lease holds, else
        ``(None, the port the token names, or None)``. An old connection still
        holding the lease is closed, unless the pool's line is closed (the relay
        drains): then no port can follow, and its clients keep the drain:
        ``(None, None)``."""
        if not self._pool.line_open:
            return None, None
        with self._lock:
            lease = self._leases.get(token)
            # A lease whose service left holds while the pool holds its port for it.
            if lease is not None and lease.holder is None \
                    and self._pool.held_for(lease.port) != token:
                del self._leases[token]
                lease = None
            holder = lease.holder if lease is not None else None
        if lease is None:
            port = token.split("-", 1)[0]
            return None, int(port) if port.isdecimal() else None   # exactly what int() takes
        if holder is not None and holder is not link:
            # The service came back before we noticed it had gone: its old
            # connection gives way, and its port waits for this one.
            log.info("%s: presents the lease of %s; closing the old connection",
                     link.label, holder.label)
            holder.close()
        return token, lease.port

    def release(self, link, port, hold=True):
        """Give ``link``'s ``port`` back to the pool; True if it is held for the lease.

        A service that said goodbye (GOAWAY NO_ERROR, as muxado's close does)
        left on purpose: its port is free at once. One whose connection was
        lost keeps its port for ``lease_time``, to come back to, unless ``hold``
        is False (the relay is leaving).
        """
        with self._lock:
            lease = self._leases.get(link.lease) if link.lease else None
            if lease is None or lease.holder is not link:
                lease = None
            elif link.said_goodbye or not hold:
                del self._leases[link.lease]
                lease = None
            else:
                # Under the lock: a claim must not see the holder gone before the hold.
                lease.holder = None
                self._pool.release(port, hold_for=lease.token, hold_seconds=self.lease_time)
                return True
        self._pool.release(port)
        return False
