"""The relay's side of registration: from a connection's first bytes to the
service's public address.

In order: a peek at the first bytes (a wrong-port peer is answered and
dropped), TLS, the registration request, the challenge if the relay has a
secret, refusals, the wait in line for a port, and the announcement of the
public address (docs/PROTOCOL.md). ``registration.py`` holds the bytes of
requests and replies; this module decides what to answer.

``Registrar`` is a part of ``servicelink.ServiceLink``: it uses the link's
``relay``, ``address``, ``label``, ``_sock``, ``_session``, ``_lock``,
``_handshake_deadline``, ``_ticket``, ``_listener``, ``_ended``,
``_draining`` and ``_heartbeat``.
"""

import ipaddress
import logging
import socket
import time

from . import addresses, auth, clock, frames, muxado, registration, tls
from .streamlines import StreamLines
from .heartbeat import HeartbeatResponder
from .portpool import Cancelled, PortPool

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")

# The debug text of the GOAWAY a plain service gets from a TLS relay (the service
# library reads it: tcprelay.service).
TLS_REQUIRED = registration.TLS_REQUIRED
# A service's first bytes are a muxado frame header (a SYN DATA frame: its first
# byte is 0 for any request under 64 KiB), a TLS record starts with 0x16: text
# like these is someone at the wrong port.
_HTTP_METHODS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN",
                 b"TRAC", b"PRI ")
_TLS_HANDSHAKE = 0x16
_GOODBYE_TIME = 1.0              # seconds to hand a wrong-port peer its answer
_GOODBYE_READ = 64 * 1024        # what we read away from it meanwhile, at most


class Registrar(object):
    """A service link's registration: its handshake, authentication, refusals,
    wait in line and announcement (a part of ``ServiceLink``)."""

    def _peek(self):
        """The connection's first bytes (up to 8), left unread; b"" if it ends,
        fails or says nothing within the handshake deadline."""
        left = self._handshake_deadline - time.monotonic()
        if left <= 0:
            return b""
        try:
            self._sock.settimeout(clock.capped(left))
            return self._sock.recv(8, socket.MSG_PEEK)
        except OSError:   # the timeout included: the handshake's own paths report it
            return b""
        finally:
            try:
                self._sock.settimeout(None)
            except OSError:
                pass

    def _wrong_port(self, first):
        """Answer and log a peer that is plainly not a service we can serve (an
        HTTP client, TLS on one side only); True if it was one (then we are done)."""
        relay = self.relay
        public = "host %s, ports %s" % (self._public_host(), relay.pool.describe())
        if first[:4] in _HTTP_METHODS:
            relay.counters.count("registrations", "http_request")
            relay._log_remote("http", "%s: an HTTP request on the service port: a client "
                              "sent to the wrong port? Clients connect to the public ports "
                              "(%s); answered 400", self.label, public)
            body = ("This is a tcprelay service port: services register here, in muxado, "
                    "not HTTP. Clients connect to a public port: %s.\n" % public).encode("ascii")
            self._goodbye(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; "
                          b"charset=us-ascii\r\nContent-Length: %d\r\nConnection: close"
                          b"\r\n\r\n%s" % (len(body), body))
            return True
        if not first:
            return False
        if relay.tls_context is None and first[0] == _TLS_HANDSHAKE:
            # Said here; the session then ends it as any bytes that are not muxado.
            relay._log_remote("tls on plain", "%s: a TLS handshake on this plain service "
                              "port: the service uses --tls, but this relay has no "
                              "--tls-cert (or it dialed the wrong port)", self.label)
            return False
        if relay.tls_context is not None and first[0] != _TLS_HANDSHAKE:
            relay.counters.count("registrations", "plain_on_tls")
            relay._log_remote("plain on tls", "%s: a plain (non-TLS) connection on this TLS "
                              "service port: the service needs --tls (or it is not a "
                              "tcprelay service); closing", self.label)
            # In plain muxado, which is what such a service reads.
            self._goodbye(frames.encode_goaway(0, muxado.ErrorCode.PROTOCOL_ERROR,
                                               TLS_REQUIRED))
            return True
        return False

    def _goodbye(self, reply):
        """Send ``reply`` and close with a FIN, within _GOODBYE_TIME. What the
        peer sent is read away first: a close with unread data is a reset,
        which may destroy the reply before the peer reads it."""
        sock = self._sock
        end = time.monotonic() + _GOODBYE_TIME
        taken = 0
        try:
            sock.settimeout(_GOODBYE_TIME)
            taken += len(sock.recv(_GOODBYE_READ, socket.MSG_DONTWAIT))
            if reply:
                sock.sendall(reply)
            sock.shutdown(socket.SHUT_WR)
            while taken < _GOODBYE_READ:
                left = end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                chunk = sock.recv(_GOODBYE_READ)
                if not chunk:
                    break
                taken += len(chunk)
        except OSError:
            pass   # it left, or took too long: the close below is all it gets

    def _tls_handshake(self):
        """The TLS handshake, within the handshake timeout; the transport, or None."""
        relay = self.relay
        try:
            sslsock = relay.tls_context.wrap_socket(self._sock, server_side=True,
                                                    do_handshake_on_connect=False)
        except OSError as exc:
            relay.counters.count("registrations", "tls_failed")
            relay._log_remote("tls", "%s: TLS failed: %s", self.label, exc)
            return None
        self._sock = sslsock   # closed by _run's cleanup from now on
        try:
            sslsock.settimeout(min(clock.MAX_TIMEOUT,
                                   max(0.0, self._handshake_deadline - time.monotonic())))
            sslsock.do_handshake()
        except (OSError, ValueError) as exc:
            relay.counters.count("registrations", "tls_failed")
            relay._log_remote("tls", "%s: TLS handshake failed: %s", self.label, exc)
            return None
        return tls.TLSTransport(sslsock)

    def _handshake(self, session):
        """Read the registration request: (request, stream), or (None, None) if refused."""
        relay = self.relay
        deadline = self._handshake_deadline
        try:
            stream = session.accept(timeout=max(0.0, deadline - time.monotonic()))
        except socket.timeout:
            relay.counters.count("registrations", "silent")
            relay._log_remote("silent", "%s: opened no registration stream within %gs; "
                              "dropping it", self.label, relay.handshake_timeout)
            return None, None
        lines = StreamLines(stream, registration.MAX_REQUEST)
        try:
            request = registration.parse_request(_request_bytes(lines, deadline))
            self.name = request.name
            if relay.secret is not None \
                    and not self._authenticate(request, stream, lines, deadline):
                return None, None
            if request.group is not None \
                    and not relay.groups.prove(self, request, stream, lines, deadline):
                return None, None
        except socket.timeout:
            relay.counters.count("registrations", "slow")
            relay._log_remote("slow", "%s: did not finish registering within %gs; dropping it",
                              self.label, relay.handshake_timeout)
            self._refuse(stream, "registration not finished within %gs" % relay.handshake_timeout)
            return None, None
        except registration.RegistrationError as exc:
            relay.counters.count("registrations", "bad_request")
            relay._log_remote("bad request", "%s: bad registration request: %s", self.label, exc)
            self._refuse(stream, "bad registration request: %s" % exc)
            return None, None
        stream.settimeout(None)
        log.info("%s: registering (%s)", self.label,
                 "minimal form" if request.minimal else request)
        if request.port is not None and request.port not in relay.pool:
            relay.counters.count("registrations", "port_not_in_pool")
            self._refuse(stream, "port %d is not in this relay's pool (%s)"
                         % (request.port, relay.pool.describe()))
            return None, None
        return request, stream

    def _authenticate(self, request, stream, lines, deadline):
        """The challenge-response (docs/PROTOCOL.md, 2.6); False if refused."""
        if request.auth != auth.METHOD:
            if request.auth is None:
                reason = "this relay requires a secret"
            else:
                reason = "unknown authentication method %r (this relay uses %s)" % (
                    request.auth, auth.METHOD)
            self._auth_failed(stream, reason)
            return False
        nonce = auth.new_nonce()
        stream.sendall(registration.challenge_line(auth.METHOD, nonce))
        answer = lines.read_line(deadline=deadline)
        if answer is None:
            raise registration.RegistrationError("the service closed the stream mid-handshake")
        answer = registration.parse_object(answer)
        if not auth.check(self.relay.secret, nonce, answer.get("hmac")):
            self._auth_failed(stream, "authentication failed")
            return False
        log.info("%s: authenticated", self.label)
        return True

    def _auth_failed(self, stream, reason):
        host = self.address[0]
        counters = self.relay.counters
        banned = self.relay.auth_failures.failed(host)
        counters.count("auth_failures")
        counters.refused("registrations", "auth_failed", host, reason)
        if banned:
            counters.refused("bans", None, host, "too many failed authentications")
        self.relay._log_remote("ban" if banned else "auth", "%s: %s%s", self.label, reason,
                               "; too many failures, refusing %s for a minute" % host
                               if banned else "")
        self._refuse(stream, reason)

    def _refuse(self, stream, message):
        try:
            # The rest of the request is not wanted: dropped, so that the close
            # is a FIN after the reply, not the reset that unread data draws.
            stream.shutdown(socket.SHUT_RD)
            stream.sendall(registration.error_line(message))
            stream.close()
        except (muxado.MuxadoError, OSError):
            pass

    def _wait_for_port(self, request, stream):
        """Wait in line for a port, reporting the place if asked: ``(port, listener)``,
        or None if refused or the line was left."""
        ticket = self._join_line(request)
        try:
            granted = self._wait_in_line(ticket, request, stream)
        except Cancelled:
            self.relay.counters.count("registrations", "left_line")
            log.info("%s: left the line%s", self.label,
                     " (the relay is leaving)" if self._draining else "")
            return None
        except (muxado.MuxadoError, OSError):
            ticket.cancel()
            raise
        if granted is None:
            return None
        port, listener = granted
        self.port = port
        with self._lock:
            # In one hold with the listener: goaway() either sees it or is seen here.
            self._listener = listener
            ended, draining = self._ended, self._draining
        if ended or draining:
            self._stop_listening()   # the session ended, or the relay is leaving, as the port came
        if draining:
            self.relay.counters.count("registrations", "left_line")
            log.info("%s: left the line (the relay is leaving) as its port came", self.label)
            return None   # its _finish gives the port back
        return granted

    def _join_line(self, request):
        """The ticket for the port ``request`` asks for (its lease's, if that holds)."""
        relay = self.relay
        lease = prefer = None
        port = request.port
        if request.lease is not None:
            lease, prefer = relay.leases.claim(request.lease, self)
            if lease is not None:
                # A valid lease waits for its own port: an old connection may
                # still be letting go of it.
                port, prefer = prefer, None
        ticket = relay.pool.request(port, lease=lease, prefer=prefer)
        self.waiting_since = time.time()
        with self._lock:
            self._ticket = ticket
            ended = self._ended
        if ended:
            ticket.cancel()
        return ticket

    def _wait_in_line(self, ticket, request, stream):
        """``ticket.wait`` until granted, with the ``waiting`` lines and the
        refusals: ``(port, listener)``, or None if refused. Raises ``Cancelled``."""
        relay = self.relay
        end = None if request.max_wait is None else time.monotonic() + request.max_wait
        # The waiting line is repeated every interval even when nobody moved.
        interval = relay.waiting_interval if request.notices else None
        reported = None
        next_notice = None
        granted = ticket.wait(0)   # a free port: no line to report
        if granted is None and relay.max_waiting is not None \
                and relay.pool.waiting > relay.max_waiting:
            ticket.cancel()
            relay.counters.refused("registrations", "max_waiting", self.address[0],
                                   "%d services already wait (--max-waiting)" % relay.max_waiting)
            log.warning("%s: refused: %d services already wait for a port (--max-waiting)",
                        self.label, relay.max_waiting)
            self._refuse(stream, "too many services are waiting for a port (%d); try "
                         "again later" % relay.max_waiting)
            return None
        while granted is None:
            position = ticket.position
            now = time.monotonic()
            due = next_notice is not None and now >= next_notice
            if position and (position != reported or due):
                why = relay.pool.why_waiting(ticket)
                if reported is None:
                    log.info("%s: %s; waiting in line for %s at position %d", self.label,
                             why, "it" if ticket.port is not None else "a port", position)
                if request.notices:
                    stream.sendall(self._waiting_line(position, interval, ticket.port, why))
                reported = position
                next_notice = None if interval is None else now + interval
            remaining = None if end is None else max(0.0, end - now)
            if remaining == 0.0:
                self._refuse_after_max_wait(ticket, request, stream)
                return None
            wait = remaining
            if next_notice is not None:
                until_notice = max(0.0, next_notice - now)
                wait = until_notice if wait is None else min(wait, until_notice)
            granted = ticket.wait(wait, position=reported)
        return granted

    def _refuse_after_max_wait(self, ticket, request, stream):
        why = self.relay.pool.why_waiting(ticket)
        if ticket.port is None:
            reason = "no port became free within %gs (%s)" % (request.max_wait, why)
        else:
            reason = "%s, and it did not become free within %gs" % (why, request.max_wait)
        log.info("%s: %s", self.label, reason)
        self.relay.counters.count("registrations", "max_wait")
        self._refuse(stream, reason)
        ticket.cancel()

    @staticmethod
    def _waiting_line(position, interval, port=None, reason=None):
        if reason == PortPool.ALL_TAKEN:
            reason = None   # said only when it is more than that
        # interval: a promise of the next line within that time, nobody moving or not.
        return registration.waiting_line(position, interval, port, reason)

    def _public_host(self):
        """--public-host; else the one address the public ports listen on; else
        the address this service dialled (it reaches us from its side)."""
        relay = self.relay
        if relay.public_host is not None:
            return relay.public_host
        if relay.public_bind and not _unspecified(relay.public_bind):
            return addresses.dialled_host((relay.public_bind,))
        return addresses.dialled_host(self._sock.getsockname())

    def _announce(self, request, stream, port):
        """Tell the service its public address, in the form it registered with."""
        relay = self.relay
        address = addresses.join_host_port(self._public_host(), port)
        self.public_address, self.registered_at = address, time.time()
        relay.counters.count("registrations", "ok")
        if request.minimal:
            stream.sendall(address.encode("ascii"))
            stream.close()
            log.info("%s: registered; public address %s", self.label, address)
            return
        lease = None
        if relay.lease_time > 0 and self.group is None:   # a group's port is held for it
            lease = self.lease = relay.leases.issue(self, port)
        if request.health is not None:
            self._health = relay.groups.health_check(self, request.health)
        stream.sendall(registration.ok_line(
            address, port, lease=lease, lease_time=relay.lease_time,
            heartbeat_timeout=relay.keepalive if request.heartbeat else None,
            allow=request.allow,
            group=self.group.describe() if self.group is not None else None,
            health=self._health.terms() if self._health is not None else None,
            tunnels=request.tunnels))
        if self._health is not None:
            self._health.start()
        if request.heartbeat:
            # The registration stream carries the heartbeat from now on.
            self._heartbeat = HeartbeatResponder(self._session, stream, relay.keepalive,
                                                 self.label)
            self._heartbeat.start()
        else:
            stream.close()
        log.info("%s: registered; public address %s%s%s", self.label, address,
                 " (PROXY %s headers)" % request.proxy_protocol if request.proxy_protocol else "",
                 "; clients from %s only" % ", ".join(request.allow) if request.allow else "")


def _request_bytes(lines, deadline):
    """The request: its line, newline included (the limit counts it), or, with
    no newline, everything up to the stream's end (the minimal form)."""
    try:
        line = lines.read_line(deadline=deadline)
    except registration.LineTooLong as exc:
        raise registration.RegistrationError("request longer than %d bytes" % exc.limit)
    return lines.rest if line is None else line + b"\n"


def _unspecified(host):
    """True for 0.0.0.0 or :: (every interface); False for a name."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False
