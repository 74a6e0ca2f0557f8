"""Replicas behind one public port: the relay's groups (docs/PROTOCOL.md, 2.9).

Services that register with the same ``group`` name, and prove the group's
key, share one public port. The first member to come waits in line for a
port as any service does; later members join that port and take no pool slot
of their own. One listener per group; its accept loop (a thread per group)
gives each client to the live member with the fewest clients, ties in turn
(``pick``). A member's session ending resets its clients as for any service
(its ``ServiceLink`` does that); the port stays while any member lives and goes
back to the pool when the last leaves, held for the group for the lease time
if that one was lost. Health checks (``HealthCheck``) take a member out of
rotation after failures in a row and back in at its next answer.

The group keys are the operator's (``--group-key NAME=FILE``): see
docs/PROTOCOL.md for why a member cannot set its group's key itself.
"""

import logging
import secrets
import socket
import threading

from . import addresses, auth, limits, muxado, registration, resources
from .portpool import Cancelled
from .servicelink import _reset

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")

HEALTH_ANSWER = b"ok\n"          # what a healthy member writes back on a health stream
_PROBE_PREFIX = "tcprelay-health "


def pick(loads, after):
    """The index of the member to give a new client: the least loaded in ``loads``
    (clients per member, in the group's order), among equals the first after index
    ``after`` (the last one picked; -1 for none), round robin. None if empty."""
    if not loads:
        return None
    least = min(loads)
    count = len(loads)
    for step in range(1, count + 1):
        index = (after + step) % count
        if loads[index] == least:
            return index
    return None   # not reached: some load is the least


def load_key(text):
    """``--group-key NAME=FILE``: (name, key bytes). Raises ValueError saying why."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError("%r is not NAME=FILE" % text)
    if not name or len(name) > registration.MAX_NAME or not name.isprintable():
        raise ValueError("the group name %r must be printable text of 1 to %d characters"
                         % (name, registration.MAX_NAME))
    try:
        return name, auth.load_secret(path)
    except auth.SecretError as exc:
        raise ValueError(str(exc).replace("secret", "group key"))


class Groups(object):
    """A relay's groups: their keys (``keys``: name -> bytes, the operator's)
    and the groups that have members now."""

    def __init__(self, relay, keys=None):
        self.relay = relay
        self.keys = dict(keys or {})
        self.refused = 0            # wrong keys and unknown groups, since the start
        self._lock = threading.Lock()
        self._groups = {}           # name -> Group with members

    def __len__(self):
        with self._lock:
            return len(self._groups)

    def get(self, name):
        """The ``Group`` called ``name`` if it has members now, else None."""
        with self._lock:
            return self._groups.get(name)

    # -- registration (a member's ServiceLink thread) ----------------------------------

    def prove(self, link, request, stream, lines, deadline):
        """The group challenge (docs/PROTOCOL.md, 2.9); False if refused (the
        service was told why and the refusal counted)."""
        name = request.group
        key = self.keys.get(name)
        if key is None:
            return self._refuse(link, stream, "no group %r on this relay (its operator "
                                "gives each group's key: --group-key %s=FILE)" % (name, name))
        nonce = auth.new_nonce()
        stream.sendall(registration.challenge_line(auth.METHOD, nonce, group=name))
        answer = lines.read_line(deadline=deadline)
        if answer is None:
            raise registration.RegistrationError("the service closed the stream mid-handshake")
        answer = registration.parse_object(answer)
        if not auth.check_group(key, nonce, name, answer.get("hmac")):
            return self._refuse(link, stream, "wrong key for group %r" % name)
        return True

    def _refuse(self, link, stream, reason):
        relay = self.relay
        with self._lock:
            self.refused += 1
        host = link.address[0]
        banned = relay.auth_failures.failed(host)
        # Counted as the relay's own failed authentications are (registrar).
        relay.counters.count("auth_failures")
        relay.counters.refused("registrations", "group_refused", host, reason)
        if banned:
            relay.counters.refused("bans", None, host, "too many failed authentications")
        relay._log_remote("group", "%s: %s%s", link.label, reason,
                          "; too many failures, refusing %s for a minute" % link.address[0]
                          if banned else "")
        link._refuse(stream, reason)
        return False

    def join(self, link, request, stream):
        """Make ``link`` a member of its request's group: the group's port, after
        a wait in line if the group has none yet; None if refused or it left the
        line. It takes no clients before ``enter``."""
        if not self.relay.pool.line_open:
            return None   # the relay drains: no port for anyone, an open group's included
        with self._lock:
            group = self._groups.get(request.group)
            if group is None:
                group = self._groups[request.group] = Group(self, request.group)
            group.members.append(link)
            link.group = group
            port = group.port
        if port is None:
            port = self._wait_for_port(group, link, request, stream)
        if port is not None and request.port is not None and request.port != port:
            link._refuse(stream, "group %r serves port %d; ask for that one, or for none"
                         % (group.name, port))
            return None
        if port is not None:
            link.port = port
        return port

    def _wait_for_port(self, group, link, request, stream):
        """The first members' wait in line: the first granted opens the group's
        port; the others, woken (their tickets cancelled), join it."""
        relay = self.relay
        # The group's own hold: a port it lost with its last member waits for it.
        ticket = relay.pool.request(request.port, lease=group.token)
        with link._lock:
            link._ticket = ticket
            ended = link._ended
        with self._lock:
            if group.port is not None:
                ended = True   # opened meanwhile: no need to wait
            group.tickets.add(ticket)
        if ended:
            ticket.cancel()
        try:
            granted = link._wait_in_line(ticket, request, stream)
        except Cancelled:
            granted = None
            with self._lock:
                port = group.port
            if port is not None and not (link._ended or link._draining):
                return port
            log.info("%s: left the line%s", link.label,
                     " (the relay is leaving)" if link._draining else "")
            return None
        except (muxado.MuxadoError, OSError):
            ticket.cancel()
            raise
        finally:
            with self._lock:
                group.tickets.discard(ticket)
        if granted is None:
            return None   # refused (max_wait, --max-waiting): it was told why
        port, listener = granted
        with self._lock:
            opened = group.port is None
            if opened:
                group.port, group.listener = port, listener
                waiting = list(group.tickets)
        if not opened:   # another member opened it first: this port goes back
            listener.close()
            relay.pool.release(port)
            return group.port
        for other in waiting:
            other.cancel()
        group.start()
        return port

    def health_check(self, link, terms):
        """A ``HealthCheck`` of ``link`` on the request's ``terms`` (not started)."""
        return HealthCheck(link, terms["interval"], terms["failures"])

    def enter(self, link):
        """``link``, announced, takes clients from now on."""
        link.in_rotation = True
        log.info("%s: in rotation in group %r on port %d (%d members)", link.label,
                 link.group.name, link.port, len(link.group.members))

    def withdraw(self, link):
        """``link`` takes no more clients; returns once none is being handed to it."""
        group = link.group
        if group is not None:
            group.withdraw(link)

    def leave(self, link):
        """``link`` has left (its clients finished); the port goes back if it was the last."""
        group = link.group
        if group is None:
            return
        group.withdraw(link)
        with self._lock:
            if link in group.members:
                group.members.remove(link)
            last = not group.members
            if last and self._groups.get(group.name) is group:
                del self._groups[group.name]
        if last:
            group.close(link)

    def stop_listening(self):
        """The relay is leaving: no group takes new clients."""
        with self._lock:
            groups = list(self._groups.values())
        for group in groups:
            group.stop_listening()


class Group(object):
    """One group with members: its public ``port`` and ``listener`` (None until
    the first member's wait in line ends), its ``members`` (``ServiceLink``, in
    the order they came) and the accept loop that shares clients among them."""

    def __init__(self, groups, name):
        self.groups = groups
        self.relay = groups.relay
        self.name = name
        self.token = "group %s" % name   # the pool holds a lost group's port for this
        self.port = None
        self.listener = None
        self.members = []
        self.tickets = set()             # members' tickets while the port is to come
        self.clients_reset = 0           # clients no member could take
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._last = -1                  # index (among those eligible) last picked
        self._handing = None             # the member a client is being handed to
        self._thread = None
        self._log_no_member = None

    def __repr__(self):
        return "<Group %r port %s, %d members>" % (self.name, self.port, len(self.members))

    @property
    def label(self):
        return "group %r (port %s)" % (self.name, self.port)

    def describe(self):
        """The ``group`` field of a member's ``ok`` line."""
        return {"name": self.name, "members": len(self.members)}

    def start(self):
        self._log_no_member = limits.LogGate(log, more="refusals")
        self._thread = threading.Thread(target=self._accept_loop, name="group %s" % self.name)
        self._thread.daemon = True
        self._thread.start()

    def eligible(self):
        """The members that may take a new client now, in order."""
        return [m for m in list(self.members)
                if m.in_rotation and not m.health_failing and not m._draining
                and not m._ended and not m._closing]

    def _choose(self, host):
        """The member for a new client from ``host`` (marked as being handed one),
        or None. Members whose allow lists take the client go first."""
        with self._lock:
            members = self.eligible()
            allowing = [m for m in members if m._outside(host) is None]
            members = allowing or members
            index = pick([m.client_count for m in members], self._last)
            if index is None:
                return None
            self._last = index
            self._handing = members[index]
            return self._handing

    def _accept_loop(self):
        acceptor = resources.Acceptor(self.listener, self._stopping, "%s" % self.label)
        while True:
            try:
                conn, client_address = acceptor.accept()
            except OSError:
                return   # the listener was shut down: the last member left, or the relay
            member = self._choose(client_address[0])
            if member is None:
                _reset(conn)
                self.clients_reset += 1
                self._log_no_member("%s: reset a client from %s: no member in rotation",
                                    self.label, addresses.format_sockaddr(client_address))
                continue
            try:
                member._take_client(member._session, conn, client_address)
            except Exception:
                log.exception("%s: handing a client to %s failed", self.label, member.label)
            finally:
                with self._lock:
                    self._handing = None
                    self._lock.notify_all()

    def withdraw(self, link):
        link.in_rotation = False
        with self._lock:
            while self._handing is link:
                self._lock.wait()

    def stop_listening(self):
        self._stopping.set()
        listener = self.listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
            except OSError:
                pass

    def close(self, last):
        """The last member, ``last``, has left: the listener closes and the port
        goes back, held for the group if ``last`` was lost (not on purpose)."""
        self.stop_listening()
        if self._thread is not None:
            self._thread.join()
        if self.listener is None:
            return
        self.listener.close()
        relay = self.relay
        hold = relay._accepting and relay.lease_time > 0 and not last.said_goodbye
        if hold:
            relay.pool.release(self.port, hold_for=self.token, hold_seconds=relay.lease_time)
        else:
            relay.pool.release(self.port)
        log.info("%s: its last member left; port %d is free again%s", self.label, self.port,
                 " once the group's hold ends in %gs" % relay.lease_time if hold else "")


class HealthCheck(object):
    """A member's health checks: every ``interval`` seconds a stream that starts
    with ``probe`` (bytes), answered ``HEALTH_ANSWER`` within the interval. After
    ``failures`` failures in a row the member takes no new clients
    (``link.health_failing``), and again at its first answer. One thread."""

    def __init__(self, link, interval, failures):
        self.link = link
        self.interval = interval
        self.failures = failures
        self.failed = 0                  # failures in a row
        self.probes = 0
        self.probe = (_PROBE_PREFIX + secrets.token_hex(16) + "\n").encode("ascii")
        self._thread = threading.Thread(target=self._run, name="health %s" % link.label)
        self._thread.daemon = True

    def terms(self):
        """The ``health`` field of the member's ``ok`` line."""
        return {"interval": self.interval, "failures": self.failures,
                "probe": self.probe.decode("ascii")}

    def start(self):
        self._thread.start()

    def join(self):
        self._thread.join()

    def _run(self):
        link = self.link
        while not link._stopping.wait(self.interval):
            healthy = self._check()
            self.probes += 1
            if healthy:
                was_failing = link.health_failing
                self.failed = 0
                link.health_failing = False   # before the line says so: a reader acts on it
                if was_failing:
                    log.info("%s: answers its health check again; back in rotation",
                             link.label)
                continue
            self.failed += 1
            if self.failed == self.failures and not link._stopping.is_set():
                link.health_failing = True
                log.warning("%s: failed %d health checks in a row; no new clients until "
                            "it answers again", link.label, self.failed)

    def _check(self):
        """One probe: True if the member answered it in time."""
        stream = None
        healthy = False
        try:
            stream = self.link._session.open(announce=False)
            stream.settimeout(self.interval)
            stream.sendall(self.probe)   # the SYN frame carries it
            stream.close_write()
            answer = bytearray()
            while len(answer) <= len(HEALTH_ANSWER):
                chunk = stream.recv(16)
                if not chunk:
                    break
                answer += chunk
            healthy = bytes(answer) == HEALTH_ANSWER
        except (muxado.MuxadoError, OSError):
            pass
        finally:
            if stream is not None:
                if healthy:
                    stream.close()
                else:
                    stream.reset(wait=False)
        return healthy
