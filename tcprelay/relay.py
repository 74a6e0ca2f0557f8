"""The relay: services dial in over muxado; each gets a public port, and every
client of that port reaches the service as a new stream.

    python3 -m tcprelay.relay 8080

In-process, socketserver style::

    with Relay(("0.0.0.0", 8080), ports=range(8081, 8131)) as relay:
        relay.serve_forever()      # relay.shutdown() from another thread

Threads: ``serve_forever`` accepts services; each service gets one thread
(handshake, its wait in line, then its public port's accept loop); each
client gets one pump thread (``bridge.Bridge``); one ``Flusher`` thread
finishes writes to slow clients; each muxado session has its reader and
writer threads.
"""

import argparse
import binascii
import errno
import logging
import math
import secrets
import select
import signal
import socket
import sys
import threading
import time

from . import (addresses, auth, cli, clock, frames, limits, muxado, proxyproto, registration,
               resources, tls)
from .bridge import Bridge, Flusher
from .heartbeat import DEFAULT_KEEPALIVE, HeartbeatResponder, enable_tcp_keepalive
from .portpool import DEFAULT_RETRY_AFTER as DEFAULT_PORT_RETRY_AFTER
from .portpool import Cancelled, PoolError, PortPool
from .workers import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 50
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_WINDOW = 1 << 20         # per stream; 256 KiB stalls a fast stream on window updates
MAX_FRAME = DEFAULT_WINDOW // 2   # bulk data in fewer, bigger writes; half a window stays free
DEFAULT_LEASE_TIME = 30.0
# A service in line hears from us at least this often (a ``waiting`` line),
# so that it can tell a queue from a dead relay (docs/PROTOCOL.md, 2.3).
DEFAULT_WAITING_INTERVAL = 3.0
DEFAULT_MAX_WAITING = 100          # services waiting in line for a port
DEFAULT_MAX_CLIENTS = 1000         # clients at once per service
DEFAULT_REGISTRATION_RATE = 60     # new service connections per minute per address
DEFAULT_MAX_PENDING = 256          # connections not yet registered, in all
DEFAULT_MAX_PENDING_PER_HOST = 16  # ... and from one address
# What a connection may send before it has registered: a request (4 KiB at
# most, but an oversized one still fills a window to be refused with a
# reason), an authentication answer, and the frames around them.
PENDING_READ_BUDGET = muxado.DEFAULT_WINDOW + 64 * 1024
THREAD_STACK_SIZE = 256 * 1024   # thousands of pump threads stay cheap
LISTEN_BACKLOG = 1024            # bursts of new clients queue in the kernel, not fail
# The debug text of the GOAWAY a plain service gets from a TLS relay (the service
# library reads it: tcprelay.service).
TLS_REQUIRED = registration.TLS_REQUIRED
_EARLY_READ = 16 * 1024          # a new client's first bytes, sent with its SYN
# A service's first bytes are a muxado frame header (a SYN DATA frame: its first
# byte is 0 for any request under 64 KiB), a TLS record starts with 0x16: text
# like these is someone at the wrong port.
_HTTP_METHODS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN",
                 b"TRAC", b"PRI ")
_TLS_HANDSHAKE = 0x16
_GOODBYE_TIME = 1.0              # seconds to hand a wrong-port peer its answer
_GOODBYE_READ = 64 * 1024        # what we read away from it meanwhile, at most


def _address(addr):
    return addresses.format_sockaddr(addr)


class _RequestLines(object):
    """Lines from a registration stream, all within one deadline, each capped."""

    def __init__(self, stream, deadline):
        self._stream = stream
        self._deadline = deadline
        self._buffer = bytearray()
        self._eof = False

    def _fill(self):
        left = self._deadline - time.monotonic()
        if left <= 0:   # a 0 timeout would make the stream non-blocking, not time out
            raise socket.timeout("registration deadline passed")
        self._stream.settimeout(clock.capped(left))
        chunk = self._stream.recv(registration.MAX_REQUEST + 1)
        if not chunk:
            self._eof = True
        self._buffer += chunk

    def first(self):
        """The request: up to the first newline, or everything until EOF (minimal form)."""
        while b"\n" not in self._buffer and not self._eof:
            if len(self._buffer) > registration.MAX_REQUEST:
                raise registration.RegistrationError(
                    "request longer than %d bytes" % registration.MAX_REQUEST)
            self._fill()
        return self._take()

    def next(self):
        """The next line (a challenge's answer)."""
        while b"\n" not in self._buffer:
            if self._eof:
                raise registration.RegistrationError("the service closed the stream mid-handshake")
            if len(self._buffer) > registration.MAX_REQUEST:
                raise registration.RegistrationError(
                    "line longer than %d bytes" % registration.MAX_REQUEST)
            self._fill()
        return self._take()

    def _take(self):
        end = self._buffer.find(b"\n")
        end = len(self._buffer) if end < 0 else end + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line


class ServiceLink(object):
    """One service's connection: its session, registration, public port and clients."""

    def __init__(self, relay, sock, address):
        self.relay = relay
        self.address = address
        # One deadline from accept to registered: TLS and the request share it.
        self._handshake_deadline = time.monotonic() + relay.handshake_timeout
        self.name = None
        self.port = None
        self._sock = sock
        self._lock = threading.Lock()
        self._session = None
        self._ticket = None
        self._listener = None
        self._stopping = threading.Event()   # set when the public listener is shut down
        self._port_given_back = False        # before the session ended (_hand_over)
        self._ended = False
        self._draining = False
        self._closing = False       # close(): clients are reset, with no drain_timeout
        self._bridges = set()
        self._idle = threading.Condition(self._lock)   # a client left, or the session ended
        self._heartbeat = None
        self.request = None
        self.lease = None           # the token we handed out, once registered
        self.clients_served = 0
        # Its own gate: one service's overload says so once a second, whatever else is refused.
        self.log_over_max_clients = limits.LogGate(log, more="refusals")
        self._thread = threading.Thread(target=self._run, name="service %s" % _address(address))
        self._thread.daemon = True

    def __repr__(self):
        return "<ServiceLink %s%s>" % (self.name or _address(self.address),
                                       " port %d" % self.port if self.port else "")

    @property
    def label(self):
        if self.name:
            return "service %r (%s)" % (self.name, _address(self.address))
        return "service %s" % _address(self.address)

    def start(self):
        self._thread.start()

    def join(self, timeout=None):
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def client_count(self):
        with self._lock:
            return len(self._bridges)

    @property
    def said_goodbye(self):
        """True if the service ended its session on purpose (GOAWAY NO_ERROR)."""
        goaway = self._session.remote_goaway if self._session is not None else None
        return goaway is not None and goaway[1] == muxado.ErrorCode.NO_ERROR

    def goaway(self):
        """Refuse new clients and tell the service we are leaving; clients carry on."""
        with self._lock:
            self._draining = True
            ticket = self._ticket
        if ticket is not None:
            # Still in line: no port for it while we leave (a no-op once granted).
            ticket.cancel()
        self._stop_listening()
        session = self._session
        if session is not None:
            try:
                session.goaway(muxado.ErrorCode.NO_ERROR, b"relay shutting down")
            except muxado.MuxadoError:
                pass

    def close(self):
        """End the service's session: its clients are reset."""
        with self._lock:
            self._closing = True
        self._stop_listening()
        if self._session is not None:
            self._session.close()
        else:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the service thread -----------------------------------------------------------

    def _run(self):
        relay = self.relay
        granted = None
        try:
            enable_tcp_keepalive(self._sock, relay.keepalive)
            if self._wrong_port(self._peek()):
                return
            transport = self._sock
            if relay.tls_context is not None:
                transport = self._tls_handshake()
                if transport is None:
                    return
            # A service opens its registration stream and little else: small
            # limits bound what a hostile one can make us hold.
            # Until it has registered, a connection gets the smallest session
            # that can register: the protocol's least window, a small read
            # buffer and a budget of bytes, after which it is dropped.
            session = muxado.server(transport, name="service %s" % _address(self.address),
                                    max_streams=16, accept_backlog=8,
                                    max_frame_size=min(MAX_FRAME, relay.window_size),
                                    read_budget=PENDING_READ_BUDGET,
                                    write_timeout=relay.write_timeout)
            with self._lock:
                self._session = session
            session.add_done_callback(self._session_ended)
            request, stream = self._handshake(session)
            relay._registered(self)
            if request is None:
                return
            session.set_read_budget(None)
            session.set_window_size(relay.window_size)
            self.request = request
            granted = self._wait_for_port(request, stream)
            if granted is None:
                return
            self._announce(request, stream, granted[0])
            self._serve_clients(session)
            # Draining: open clients finish before the session goes (close() cuts it short).
            with self._lock:
                while self._draining and self._bridges and not self._ended:
                    self._idle.wait()
        except (muxado.MuxadoError, OSError) as exc:
            if resources.is_exhaustion(exc):
                log.warning("%s: out of file descriptors (%s); dropping this connection",
                            self.label, exc.strerror)
            elif self.request is None:   # never registered: anyone can do this
                relay._log_pending_ended("%s: connection ended: %s", self.label, exc)
            else:
                log.info("%s: connection ended: %s", self.label, exc)
        except Exception:
            log.exception("%s: failed", self.label)
        finally:
            self._close_listener()
            if self._session is not None:
                self._session.close()
            else:
                self._sock.close()
            with self._lock:
                bridges = list(self._bridges)
                grace = 0.0 if self._closing else relay.drain_timeout
            # A client may still be taking the service's last bytes: it gets
            # drain_timeout to read them, then a reset, so that a client that
            # never reads cannot hold the port for ever. (Not after close():
            # the relay is leaving, and Relay.drain has had its time.)
            end = time.monotonic() + grace
            for bridge in bridges:
                if not bridge.join(max(0.0, end - time.monotonic())):
                    log.info("%s: client on stream %d still had data to read %gs after the "
                             "service left; resetting it", self.label, bridge.stream.id, grace)
                    bridge.abort("the service has left and the client stopped reading")
            for bridge in bridges:
                bridge.join()
            if self._heartbeat is not None:
                self._heartbeat.join()
            if granted is not None and not self._port_given_back:
                held = relay._release_port(self, granted[0])
                log.info("%s: left; port %d is free again%s (%d clients served)",
                         self.label, granted[0],
                         " once its lease ends in %gs" % relay.lease_time if held else "",
                         self.clients_served)
            relay._registered(self)   # if it never got that far
            relay._forget_service(self)

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
        public = "%s, ports %s" % (relay.public_host, relay.pool.describe())
        if first[:4] in _HTTP_METHODS:
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
            relay._log_remote("tls", "%s: TLS failed: %s", self.label, exc)
            return None
        self._sock = sslsock   # closed by _run's cleanup from now on
        try:
            sslsock.settimeout(min(clock.MAX_TIMEOUT,
                                   max(0.0, self._handshake_deadline - time.monotonic())))
            sslsock.do_handshake()
        except (OSError, ValueError) as exc:
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
            relay._log_remote("silent", "%s: opened no registration stream within %gs; "
                              "dropping it", self.label, relay.handshake_timeout)
            return None, None
        lines = _RequestLines(stream, deadline)
        try:
            request = registration.parse_request(lines.first())
            self.name = request.name
            if relay.secret is not None and not self._authenticate(request, stream, lines):
                return None, None
        except socket.timeout:
            relay._log_remote("slow", "%s: did not finish registering within %gs; dropping it",
                              self.label, relay.handshake_timeout)
            self._refuse(stream, "registration not finished within %gs" % relay.handshake_timeout)
            return None, None
        except registration.RegistrationError as exc:
            relay._log_remote("bad request", "%s: bad registration request: %s", self.label, exc)
            self._refuse(stream, "bad registration request: %s" % exc)
            return None, None
        stream.settimeout(None)
        log.info("%s: registering (%s)", self.label,
                 "minimal form" if request.minimal else request)
        if request.port is not None and request.port not in relay.pool:
            self._refuse(stream, "port %d is not in this relay's pool (%s)"
                         % (request.port, relay.pool.describe()))
            return None, None
        return request, stream

    def _authenticate(self, request, stream, lines):
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
        stream.sendall(registration.encode_reply("challenge", method=auth.METHOD,
                                                 nonce=binascii.hexlify(nonce).decode("ascii")))
        answer = registration.parse_object(lines.next())
        if not auth.check(self.relay.secret, nonce, answer.get("hmac")):
            self._auth_failed(stream, "authentication failed")
            return False
        log.info("%s: authenticated", self.label)
        return True

    def _auth_failed(self, stream, reason):
        host = self.address[0]
        banned = self.relay.auth_failures.failed(host)
        self.relay._log_remote("ban" if banned else "auth", "%s: %s%s", self.label, reason,
                               "; too many failures, refusing %s for a minute" % host
                               if banned else "")
        self._refuse(stream, reason)

    def _refuse(self, stream, message):
        try:
            # The rest of the request is not wanted: dropped, so that the close
            # is a FIN after the reply, not the reset that unread data draws.
            stream.shutdown(socket.SHUT_RD)
            stream.sendall(registration.encode_reply("error", error=message))
            stream.close()
        except (muxado.MuxadoError, OSError):
            pass

    def _wait_for_port(self, request, stream):
        """Wait in line for a port, reporting the place if asked; returns (port, listener)."""
        relay = self.relay
        lease = prefer = None
        port = request.port
        if request.lease is not None:
            lease, prefer = relay._claim_lease(request.lease, self)
            if lease is not None:
                # A valid lease waits for its own port: an old connection may
                # still be letting go of it.
                port, prefer = prefer, None
        ticket = relay.pool.request(port, lease=lease, prefer=prefer)
        with self._lock:
            self._ticket = ticket
            ended = self._ended
        if ended:
            ticket.cancel()
        end = None if request.max_wait is None else time.monotonic() + request.max_wait
        # The waiting line is repeated every interval even when nobody moved.
        interval = relay.waiting_interval if request.notices else None
        reported = None
        next_notice = None
        try:
            granted = ticket.wait(0)   # a free port: no line to report
            if granted is None and relay.max_waiting is not None \
                    and relay.pool.waiting > relay.max_waiting:
                ticket.cancel()
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
                    why = relay.pool.why_waiting(ticket)
                    if ticket.port is None:
                        reason = "no port became free within %gs (%s)" % (request.max_wait, why)
                    else:
                        reason = "%s, and it did not become free within %gs" % (
                            why, request.max_wait)
                    log.info("%s: %s", self.label, reason)
                    self._refuse(stream, reason)
                    ticket.cancel()
                    return None
                wait = remaining
                if next_notice is not None:
                    until_notice = max(0.0, next_notice - now)
                    wait = until_notice if wait is None else min(wait, until_notice)
                granted = ticket.wait(wait, position=reported)
        except Cancelled:
            log.info("%s: left the line%s", self.label,
                     " (the relay is leaving)" if self._draining else "")
            return None
        except (muxado.MuxadoError, OSError):
            ticket.cancel()
            raise
        port, listener = granted
        self.port = port
        with self._lock:
            self._listener = listener
            ended = self._ended
        if ended:
            self._stop_listening()   # the session ended as the port came: don't serve it
        return granted

    @staticmethod
    def _waiting_line(position, interval, port=None, reason=None):
        fields = {"position": position}
        if reason is not None and reason != PortPool.ALL_TAKEN:
            fields["reason"] = reason   # said only when it is more than that
        if interval is not None:
            # A promise of the next line within that time, nobody moving or not.
            fields["interval"] = registration.seconds(interval)
        if port is not None:
            fields["port"] = port   # the one port this service waits for
        return registration.encode_reply("waiting", **fields)

    def _announce(self, request, stream, port):
        """Tell the service its public address, in the form it registered with."""
        relay = self.relay
        host = relay.public_host
        if host is None:
            # The address this service dialled reaches us from its side.
            host = addresses.dialled_host(self._sock.getsockname())
        address = addresses.join_host_port(host, port)
        if request.minimal:
            stream.sendall(address.encode("ascii"))
            stream.close()
            log.info("%s: registered; public address %s", self.label, address)
            return
        reply = {"address": address, "port": port, "version": registration.PROTOCOL_VERSION}
        if relay.lease_time > 0:
            self.lease = relay._issue_lease(self, port)
            reply.update(lease=self.lease, lease_seconds=registration.seconds(relay.lease_time))
        if request.heartbeat:
            # Whole seconds go out as integers; only a fraction makes a float.
            reply["heartbeat"] = {"interval": registration.seconds(relay.keepalive / 3.0),
                                  "timeout": registration.seconds(relay.keepalive)}
        stream.sendall(registration.encode_reply("ok", **reply))
        if request.heartbeat:
            # The registration stream carries the heartbeat from now on.
            self._heartbeat = HeartbeatResponder(self._session, stream, relay.keepalive,
                                                 self.label)
            self._heartbeat.start()
        else:
            stream.close()
        log.info("%s: registered; public address %s%s", self.label, address,
                 " (PROXY %s headers)" % request.proxy_protocol if request.proxy_protocol else "")

    def _serve_clients(self, session):
        relay = self.relay
        acceptor = resources.Acceptor(self._listener, self._stopping,
                                      "%s's port %d" % (self.label, self.port))
        refused = self.log_over_max_clients
        while True:
            owed = refused.owed()
            if owed is not None and not _readable(self._listener, owed):
                refused.flush()   # a burst's count, told within a second even if it ended
                continue
            try:
                conn, client_address = acceptor.accept()
            except OSError:
                return  # the listener was shut down: session ended, or the relay is leaving
            if relay.max_clients is not None and self.client_count >= relay.max_clients:
                # A raw TCP client can be told nothing: a reset at once says "refused"
                # (a FIN would look like a service that took it and hung up).
                _reset(conn)
                refused("%s: refused a client from %s: %d clients already (--max-clients)",
                        self.label, client_address[0], relay.max_clients)
                continue
            enable_tcp_keepalive(conn, relay.keepalive)   # notice a client that vanished
            stream = None
            try:
                # The SYN goes out here, in accept order, carrying what the
                # client sent with its connect if anything: one frame, not two.
                stream = session.open(announce=False)
                if self.request.proxy_protocol:
                    stream.sendall(proxyproto.encode(self.request.proxy_protocol,
                                                     client_address[:2], conn.getsockname()[:2]))
                early = _early_bytes(conn)
                if early:
                    stream.sendall(early)
                else:
                    stream.announce()   # the service may be the one to speak first
            except (muxado.MuxadoError, OSError) as exc:
                if stream is not None:
                    stream.reset(wait=False)
                _reset(conn)
                if session.closed:
                    log.info("%s: cannot open a stream for client %s: %s",
                             self.label, _address(client_address), exc)
                    return
                if getattr(exc, "code", None) == muxado.ErrorCode.STREAMS_EXHAUSTED:
                    self._hand_over(client_address)
                    return
                if (isinstance(exc, muxado.RemoteGoneAwayError)
                        or session.remote_goaway is not None):
                    # The service takes no new clients (it is shutting down):
                    # the ones it serves carry on, as when the relay drains. (Its
                    # GOAWAY may also come while the new stream's first frame goes out.)
                    log.info("%s: takes no new clients (%s); refusing %s, finishing the %d open",
                             self.label, exc, _address(client_address), self.client_count)
                    with self._lock:
                        self._draining = True
                    self._stop_listening()
                    return
                # This stream's own error (the service reset it, or the client
                # left already): it ends this client only.
                relay._log_refusal("%s: client %s refused: %s", self.label,
                                   _address(client_address), exc)
                continue
            bridge = Bridge(conn, stream, relay.flusher,
                            name="client %s" % _address(client_address),
                            on_close=self._client_closed, workers=relay.workers,
                            idle_timeout=relay.idle_timeout)
            bridge.bytes_up = len(early)
            with self._lock:
                self._bridges.add(bridge)
                self.clients_served += 1
            relay._client_opened()
            log.debug("%s: client %s on stream %d", self.label,
                      _address(client_address), stream.id)
            bridge.start()

    def _hand_over(self, client_address):
        """This session has used up its stream ids: GOAWAY asks the service to
        register a fresh session (its lease brings it the same port, which is
        given back now); the clients open here finish here."""
        log.info("%s: its session has used up its stream ids; refusing %s, asking the "
                 "service to register again and finishing the %d open here", self.label,
                 _address(client_address), self.client_count)
        with self._lock:
            self._draining = True
        self._stop_listening()
        self._close_listener()
        try:
            self._session.goaway(muxado.ErrorCode.NO_ERROR, b"stream ids exhausted; "
                                                            b"register again")
        except muxado.MuxadoError:
            pass
        port, self._port_given_back = self.port, True
        self.relay._release_port(self, port)

    def _client_closed(self, bridge):
        with self._lock:
            self._bridges.discard(bridge)
            self._idle.notify_all()
        log.debug("%s: client on stream %d done (%d bytes in, %d out)", self.label,
                  bridge.stream.id, bridge.bytes_up, bridge.bytes_down)
        self.relay._client_closed()

    def _session_ended(self, session):
        # The session's reader thread: wake whatever the service thread waits on.
        with self._lock:
            self._ended = True
            ticket = self._ticket
            self._idle.notify_all()
        if ticket is not None:
            ticket.cancel()
        self._stop_listening()

    def _stop_listening(self):
        self._stopping.set()
        with self._lock:
            listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
            except OSError:
                pass

    def _close_listener(self):
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()


def _early_bytes(conn):
    """What a new client has already sent, without waiting (b"" if nothing yet)."""
    if conn.gettimeout() is not None:
        conn.settimeout(None)   # with a timeout, Python waits before even MSG_DONTWAIT reads
    try:
        return conn.recv(_EARLY_READ, socket.MSG_DONTWAIT)
    except OSError:
        return b""   # nothing yet; or a reset, which the pump's own read reports


def _readable(sock, timeout):
    """True if ``sock`` (a listener) has something for accept() (or was shut
    down) within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(int(math.ceil(min(timeout, clock.MAX_TIMEOUT) * 1000))))


def _reset(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


class Relay(object):
    """The relay server, socketserver style.

    ``server_address``: where services connect. ``ports``: the public port
    pool (default: the 50 ports after the service port). ``public_bind``:
    the address public ports listen on. ``public_host``: the host name in
    the address handed to services (None: the address each service dialled;
    a non-ASCII name goes out in IDNA; ValueError if it is no host name).
    ``waiting_interval``: seconds between
    the ``waiting`` lines a service in line gets even when nobody moved
    (None: only when its place changes, as relays before it did). ``write_timeout``: seconds a write to a
    service may make no progress before its session ends (muxado's). ``port_retry_after``:
    seconds a public port that could not be bound is skipped before it is tried again.
    """

    def __init__(self, server_address, ports=None, public_bind="", public_host=None,
                 max_services=None, handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
                 drain_timeout=DEFAULT_DRAIN_TIMEOUT, window_size=DEFAULT_WINDOW,
                 lease_time=DEFAULT_LEASE_TIME, keepalive=DEFAULT_KEEPALIVE,
                 secret=None, allow_from=(), tls_context=None, max_waiting=DEFAULT_MAX_WAITING,
                 max_clients=DEFAULT_MAX_CLIENTS, idle_timeout=None,
                 registration_rate=DEFAULT_REGISTRATION_RATE, max_pending=DEFAULT_MAX_PENDING,
                 max_pending_per_host=DEFAULT_MAX_PENDING_PER_HOST,
                 waiting_interval=DEFAULT_WAITING_INTERVAL,
                 write_timeout=muxado.DEFAULT_WRITE_TIMEOUT, bind_and_activate=True,
                 port_retry_after=DEFAULT_PORT_RETRY_AFTER):
        host, port = server_address[:2]
        if ports is None:
            if not port:
                raise ValueError("give ports= when the service port is chosen by the system")
            ports = range(port + 1, port + 1 + DEFAULT_POOL_SIZE)
        self.public_bind = public_bind
        self.public_host = None if public_host is None else addresses.public_host(public_host)
        self.handshake_timeout = handshake_timeout
        self.drain_timeout = drain_timeout
        self.window_size = window_size
        self.lease_time = lease_time
        self.keepalive = keepalive
        self.write_timeout = write_timeout
        self.secret = secret
        self.allow_from = limits.Networks(allow_from)
        self.tls_context = tls_context
        self.max_waiting = max_waiting
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.waiting_interval = waiting_interval
        self.auth_failures = limits.FailureBans(limit=5, window=60.0, ban=60.0)
        self.registration_rate = limits.RateLimit(per_minute=registration_rate,
                                                  burst=max(1, registration_rate // 3))
        self._log_refusal = limits.LogGate(log, more="refusals")
        # Lines anyone who reaches the service port can trigger, one gate per kind.
        self._log_remote = limits.LogGates(log)
        # Every new connection is told, unless they come faster than a person reads.
        self._log_connected = limits.LogGate(log, logging.INFO, per_second=5, burst=20)
        self._log_pending_ended = limits.LogGate(log, logging.INFO, per_second=5, burst=20)
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        self._pending = {}   # ServiceLink not yet registered -> its host
        self.pool = PortPool(ports, self._bind_public, limit=max_services,
                             retry_after=port_retry_after)
        self._leases = {}   # token -> [port, holding ServiceLink or None, expiry]
        self._lock = threading.Condition()
        self._services = set()
        self._clients = 0
        self._accepting = True
        self._stopping = threading.Event()   # set by _stop_accepting
        self._drain_cut = False              # cut_drain(): stop waiting for clients
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.flusher = None
        self.server_address = (host, port)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    socket.SOCK_STREAM)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.socket.close()
                raise
        self.flusher = Flusher(name="relay-flusher")
        self.workers = WorkerPool(name="relay-pump")

    # -- socketserver-style interface ------------------------------------------------

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self):
        self.socket.listen(LISTEN_BACKLOG)

    def fileno(self):
        return self.socket.fileno()

    def serve_forever(self, poll_interval=None):
        """Accept services until ``shutdown()``. ``poll_interval`` is ignored: no polling."""
        self._stopped.clear()
        self._serving.set()
        acceptor = resources.Acceptor(self.socket, self._stopping, "the service port")
        try:
            while True:
                try:
                    sock, address = acceptor.accept()
                except OSError:
                    if not self._accepting:
                        return
                    raise
                refusal = self._admission(address[0])
                if refusal is not None:
                    _reset(sock)
                    self._log_refusal("refused a service connection from %s: %s",
                                      address[0], refusal)
                    continue
                with self._lock:
                    if not self._accepting:
                        sock.close()
                        return
                    refusal = self._pending_refusal(address[0])
                    if refusal is None:
                        link = ServiceLink(self, sock, address)
                        self._services.add(link)
                        self._pending[link] = address[0]
                if refusal is not None:
                    _reset(sock)
                    self._log_refusal("refused a service connection from %s: %s",
                                      address[0], refusal)
                    continue
                self._log_connected("service connected from %s", _address(address))
                link.start()
        finally:
            self._serving.clear()
            self._stopped.set()

    def shutdown(self):
        """Stop ``serve_forever`` and wait for it to return. Services stay connected."""
        self._stop_accepting()
        self._stopped.wait()

    def drain(self, timeout=None):
        """Leave gracefully: no new services or clients, GOAWAY to every service, and
        wait up to ``timeout`` (default ``drain_timeout``) for open clients to finish.
        True if they all did."""
        self._stop_accepting()
        with self._lock:
            services = list(self._services)
        log.info("draining: %d services, %d clients open", len(services), self._clients)
        for link in services:
            link.goaway()
        end = time.monotonic() + (self.drain_timeout if timeout is None else timeout)
        with self._lock:
            while self._clients and not self._drain_cut:
                left = end - time.monotonic()
                if left <= 0:
                    log.info("drain timed out with %d clients open; resetting them", self._clients)
                    return False
                self._lock.wait(clock.capped(left))
            if self._clients:
                log.info("drain cut short with %d clients open; resetting them", self._clients)
                return False
        return True

    def cut_drain(self):
        """Make ``drain()`` (running or to come) return at once, as if its time were up."""
        with self._lock:
            self._drain_cut = True
            self._lock.notify_all()

    def server_close(self):
        """Close everything: services (their clients are reset), listeners, threads."""
        self._stop_accepting()
        self._stopped.wait()
        self.socket.close()
        with self._lock:
            services = list(self._services)
        for link in services:
            link.close()
        for link in services:
            link.join()
        if self.flusher is not None:
            self.workers.close()
            self.flusher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server_close()

    # -- internals ---------------------------------------------------------------------

    def _admission(self, host):
        """Why a connection from ``host`` may not even try to register, or None.

        Checked before any handshake work, so refusals cost almost nothing.
        """
        if self.allow_from and host not in self.allow_from:
            return "not in --allow-from (%s)" % self.allow_from
        if self.auth_failures.banned(host):
            return "too many failed authentications; refused for a minute"
        if not self.registration_rate.allow(host):
            return "too many registrations from this address (--registration-rate)"
        return None

    def _pending_refusal(self, host):
        """Why a new connection from ``host`` may not wait to register, or None (lock held)."""
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            return "%d connections are registering already (--max-pending)" % self.max_pending
        if self.max_pending_per_host is not None:
            from_host = sum(1 for h in self._pending.values() if h == host)
            if from_host >= self.max_pending_per_host:
                return ("%d connections from this address are registering already "
                        "(--max-pending-per-host)" % self.max_pending_per_host)
        return None

    def _registered(self, link):
        """``link`` is no longer pending: registered, refused or gone."""
        with self._lock:
            self._pending.pop(link, None)

    def _stop_accepting(self):
        with self._lock:
            self._accepting = False
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass

    def _bind_public(self, port):
        family = socket.AF_INET6 if ":" in self.public_bind else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.public_bind, port))
            listener.listen(LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        return listener

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

    def _forget_service(self, link):
        with self._lock:
            self._services.discard(link)
            self._lock.notify_all()

    def _client_opened(self):
        with self._lock:
            self._clients += 1

    def _client_closed(self):
        with self._lock:
            self._clients -= 1
            self._lock.notify_all()

    @property
    def services(self):
        with self._lock:
            return list(self._services)

    @property
    def client_count(self):
        with self._lock:
            return self._clients


# --- command line ---------------------------------------------------------------------


def _port_range(text):
    try:
        low, _, high = text.partition("-")
        low = int(low)
        high = int(high) if high else low
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port range like 8081-8130" % text)
    if not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port range within 1-65535" % text)
    return range(low, high + 1)


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("%r is not a finite number" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return value


def build_parser():
    parser = cli.Parser(
        prog="python3 -m tcprelay.relay",
        description="Relay TCP clients to services that dial in over muxado. Each service "
                    "gets a public port from a pool; each client of that port reaches the "
                    "service as a new stream.",
    )
    parser.add_argument("port", type=cli.port_number, help="port where services connect")
    parser.add_argument("--host", default="", type=_host,
                        help="address services connect to; an IPv6 one with or without "
                             "brackets (default: all interfaces)")
    parser.add_argument("--public-bind", default="", metavar="HOST", type=_host,
                        help="address the public ports listen on (default: all interfaces)")
    parser.add_argument("--public-host", default=None, metavar="NAME", type=_public_host,
                        help="host name or address put in the address handed to services, "
                             "as clients should reach the public ports; a non-ASCII name "
                             "goes out in IDNA (default: the address each service dialled, "
                             "so set this when clients reach the relay by another name, "
                             "or through NAT)")
    parser.add_argument("--ports", type=_port_range, metavar="LOW-HIGH",
                        help="the public port pool (default: PORT+1 to PORT+50)")
    parser.add_argument("--max-services", type=cli.positive(int), default=DEFAULT_POOL_SIZE,
                        metavar="N", help="services that may hold a port at once; "
                                          "more wait in line (default: 50)")
    parser.add_argument("--handshake-timeout", type=cli.positive(float),
                        default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                        help="drop a service that has not registered within this time "
                             "(default: 10)")
    parser.add_argument("--drain-timeout", type=cli.positive(float), default=DEFAULT_DRAIN_TIMEOUT,
                        metavar="SECONDS",
                        help="on SIGINT or SIGTERM, let open clients finish for this long; "
                             "and after a service left, let its clients take its last bytes "
                             "for this long before they are reset (default: 10)")
    parser.add_argument("--lease-time", type=_non_negative, default=DEFAULT_LEASE_TIME,
                        metavar="SECONDS",
                        help="a service that reconnects within this time with its lease "
                             "token gets its port back; 0 disables leases (default: 30)")
    parser.add_argument("--keepalive", type=cli.positive(float), default=DEFAULT_KEEPALIVE,
                        metavar="SECONDS",
                        help="notice a service that vanished (TCP keepalive, and the "
                             "heartbeat for services that ask) within this time (default: 30)")
    security = parser.add_argument_group("who may register (docs/SECURITY.md)")
    security.add_argument("--secret-file", metavar="PATH",
                          help="services must prove they know the secret in this file "
                               "(HMAC challenge; the secret never crosses the wire). "
                               "Or set $TCPRELAY_SECRET")
    security.add_argument("--allow-from", action="append", default=[], metavar="CIDR",
                          type=_network, help="only networks like this may register "
                                              "services; repeatable (default: any)")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="put TLS on the service port with this certificate (PEM)")
    security.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    security.add_argument("--registration-rate", type=cli.positive(int),
                          default=DEFAULT_REGISTRATION_RATE, metavar="N",
                          help="new service connections a minute from one address "
                               "(default: %d)" % DEFAULT_REGISTRATION_RATE)
    capacity = parser.add_argument_group("limits")
    capacity.add_argument("--max-waiting", type=cli.positive(int), default=DEFAULT_MAX_WAITING,
                          metavar="N", help="services that may wait in line for a port; "
                                            "more are refused (default: %d)" % DEFAULT_MAX_WAITING)
    capacity.add_argument("--max-clients", type=cli.positive(int), default=DEFAULT_MAX_CLIENTS,
                          metavar="N", help="clients at once per service; more are refused "
                                            "(default: %d)" % DEFAULT_MAX_CLIENTS)
    capacity.add_argument("--max-pending", type=cli.positive(int), default=DEFAULT_MAX_PENDING,
                          metavar="N", help="connections that may be registering at once "
                                            "(not yet registered); more are refused "
                                            "(default: %d)" % DEFAULT_MAX_PENDING)
    capacity.add_argument("--max-pending-per-host", type=cli.positive(int),
                          default=DEFAULT_MAX_PENDING_PER_HOST, metavar="N",
                          help="of those, from one address (default: %d)"
                               % DEFAULT_MAX_PENDING_PER_HOST)
    capacity.add_argument("--idle-timeout", type=cli.positive(float), default=None,
                          metavar="SECONDS", help="close a public client after this long with "
                                                  "no bytes either way (default: never)")
    parser.add_argument("--log-level", default="info", choices=cli.LOG_LEVELS,
                        help="how much to log to stderr (default: info)")
    return parser


def _host(text):
    try:
        return addresses.host_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _public_host(text):
    try:
        return addresses.public_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _network(text):
    try:
        limits.Networks([text])
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a network like 10.0.0.0/8" % text)
    return text


def _public_bind_problem(host):
    """Why no public port could listen on ``host`` (an address this machine lacks,
    say), or None. Checked once at start: otherwise every service would be told
    that every port is taken."""
    if not host:
        return None
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                          socket.SOCK_STREAM)
    try:
        probe.bind((host, 0))
    except (OSError, OverflowError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    finally:
        probe.close()
    return None


def _check_open_file_limit(args):
    """Raise the soft open-file limit to the hard one; warn if the limits cannot fit."""
    resources.preload_thread_exit()
    limit = resources.raise_open_file_limit()
    need = resources.descriptors_needed(args.max_services, args.max_clients, args.max_waiting)
    if limit is not None and limit < need:
        # A warning if one busy service can reach the limit; else worth knowing only.
        one_service = resources.descriptors_needed(1, args.max_clients, args.max_waiting)
        log.log(logging.WARNING if limit < one_service else logging.INFO,
                "the open file limit is %d, but --max-services %d with --max-clients %d "
                "may need about %d; past the limit new connections wait until others "
                "close. Raise the hard limit (ulimit -Hn, or LimitNOFILE= under systemd) "
                "or lower --max-clients", limit, args.max_services, args.max_clients, need)


@cli.interruptible
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    ports = args.ports if args.ports is not None else range(args.port + 1, args.port + 51)
    if ports[-1] > 65535:
        parser.error("the default pool %d-%d passes 65535; give --ports" % (ports[0], ports[-1]))
    if args.port in ports:
        parser.error("the pool %d-%d includes the service port %d"
                     % (ports[0], ports[-1], args.port))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    cli.configure_logging(args.log_level)
    try:
        secret = auth.load_secret(args.secret_file)
    except auth.SecretError as exc:
        parser.error(str(exc))
    tls_context = None
    if args.tls_cert:
        try:
            tls_context = tls.server_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:
            parser.error("cannot load the TLS certificate and key: %s" % exc)
    threading.stack_size(THREAD_STACK_SIZE)
    problem = _public_bind_problem(args.public_bind)
    if problem is not None:
        sys.stderr.write("tcprelay.relay: cannot listen on public ports at %s: %s (check "
                         "--public-bind)\n" % (args.public_bind, problem))
        return 1
    try:
        relay = Relay((args.host, args.port), ports=ports, public_bind=args.public_bind,
                      public_host=args.public_host, max_services=args.max_services,
                      handshake_timeout=args.handshake_timeout,
                      drain_timeout=args.drain_timeout, lease_time=args.lease_time,
                      keepalive=args.keepalive, secret=secret, allow_from=args.allow_from,
                      tls_context=tls_context, max_waiting=args.max_waiting,
                      max_clients=args.max_clients, idle_timeout=args.idle_timeout,
                      registration_rate=args.registration_rate,
                      max_pending=args.max_pending,
                      max_pending_per_host=args.max_pending_per_host)
    except OSError as exc:
        where = addresses.join_host_port(args.host or "*", args.port)
        if exc.errno == errno.EADDRINUSE:
            hint = "is another relay running? choose another port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "this machine has no such address: check --host"
        else:
            hint = "check --host and the port"
        sys.stderr.write("tcprelay.relay: cannot listen on %s: %s (%s)\n"
                         % (where, exc.strerror or exc, hint))
        return 1

    signalled = []

    def stop(signum, frame):
        # Threads, not here: the main thread may hold the locks they take.
        signalled.append(signum)
        if len(signalled) == 1:
            log.info("%s received; shutting down (once more to quit at once)",
                     signal.Signals(signum).name)
            threading.Thread(target=relay.shutdown, name="shutdown").start()
        elif len(signalled) == 2:
            log.info("%s received again; quitting now", signal.Signals(signum).name)
            threading.Thread(target=relay.cut_drain, name="quit").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _check_open_file_limit(args)
    log.info("listening for services on %s%s; public ports %s on %s",
             _address(relay.server_address), " (TLS)" if tls_context else "",
             relay.pool.describe(), args.public_bind or "all interfaces")
    if secret is None:
        log.warning("no secret (--secret-file or $TCPRELAY_SECRET): anyone who can reach "
                    "port %d can register a service", args.port)
    try:
        relay.serve_forever()
        relay.drain()
    finally:
        relay.server_close()
    log.info("stopped")
    return 130 if len(signalled) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
