"""Leases: a service's way back to its port after its connection is lost."""

import logging
import secrets
import time

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")


class Leases(object):
    """A part of ``relay.Relay``: uses its ``_lock``, ``_leases``, ``pool``,
    ``lease_time`` and ``_accepting``."""

    # Leases: a token handed to a service at registration. Re-registering with
    # it within lease_time gets the same port back; while the lease holds, the
    # port goes to no one else. A token this relay does not know (it restarted,
    # or the lease ran out) still names its port: taken if free, as a preference.

    def _issue_lease(self, link, port):
        token = "%d-%s" % (port, secrets.token_hex(16))
        with self._lock:
            for old in [t for t, entry in self._leases.items() if entry[0] == port]:
                del self._leases[old]
            self._leases[token] = [port, link, None]
        return token

    def _claim_lease(self, token, link):
        """(lease token to wait with, preferred port) for a re-registering service."""
        now = time.monotonic()
        with self._lock:
            entry = self._leases.get(token)
            if entry is not None and entry[2] is not None and entry[2] <= now:
                del self._leases[token]
                entry = None
            holder = entry[1] if entry is not None else None
        if entry is None:
            port = token.split("-", 1)[0]
            return None, int(port) if port.isdecimal() else None   # exactly what int() takes
        if holder is not None and holder is not link:
            # The service came back before we noticed it had gone: its old
            # connection gives way, and its port waits for this one.
            log.info("%s: presents the lease of %s; closing the old connection",
                     link.label, holder.label)
            holder.close()
        return token, entry[0]

    def _release_port(self, link, port):
        """Give ``link``'s port back; True if it is held for the service's lease.

        A service that said goodbye (GOAWAY NO_ERROR, as muxado's close does)
        left on purpose: its port is free at once. One whose connection was
        lost keeps its port for lease_time, to come back to.
        """
        with self._lock:
            entry = self._leases.get(link.lease) if link.lease else None
            if entry is not None and entry[1] is link:
                if link.said_goodbye:
                    del self._leases[link.lease]
                    entry = None
                else:
                    entry[1] = None
                    entry[2] = time.monotonic() + self.lease_time
            else:
                entry = None
        if entry is not None and self._accepting:
            self.pool.release(port, hold_for=link.lease, hold_seconds=self.lease_time)
            return True
        self.pool.release(port)
        return False
