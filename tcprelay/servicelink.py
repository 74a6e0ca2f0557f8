"""One service's connection at the relay: ``ServiceLink``.

Its thread registers the service (``registrar.Registrar``), then runs the
accept loop of its public port: each client becomes a stream of the
service's session, joined to the client by a ``bridge.Bridge``. When the
session ends, open clients get ``drain_timeout`` to read the service's last
bytes, and the port goes back to the pool (held for the service's lease if
it left without saying goodbye).
"""

import functools
import logging
import math
import select
import socket
import threading
import time

from . import (
    accesslog, addresses, clock, framesv1, limits, muxado, muxadov1, proxyproto, registrarv1,
    registration, resources, tunnelwire,
)
from .bridge import Bridge
from .heartbeat import client_options_inherited, enable_tcp_keepalive
from .registrar import Registrar

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")

# What a connection may send before it has registered: a request (4 KiB at
# most, but an oversized one still fills a window to be refused with a
# reason), an authentication answer, and the frames around them.
PENDING_READ_BUDGET = muxado.DEFAULT_WINDOW + 64 * 1024
_EARLY_READ = 16 * 1024          # a new client's first bytes, sent with its SYN


def _address(addr):
    return addresses.format_sockaddr(addr)


class ServiceLink(Registrar):
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
        self.group = None           # its groups.Group, if it registered as a member
        self.in_rotation = False    # a member that may take clients (announced, not leaving)
        self.health_failing = False  # a member out of rotation after failed health checks
        self._health = None         # its groups.HealthCheck, if it asked for one
        self.muxado_version = 2     # 1 for a service on Go muxado v1 (from its first bytes)
        self.request = None
        self._stream_preamble = b""  # a tunnel's name before each client's bytes (tunnels.py)
        self.tunnel_names = set()    # with "tunnels": the session's tunnels, by name
        self._tunnels_thread = None  # takes the further tunnels' registration streams
        self.lease = None           # the token we handed out, once registered
        self.clients_served = 0
        self.clients_not_allowed = 0   # reset at once: outside --public-allow or the service's allow
        self.allowed_clients = limits.Networks(())   # the service's "allow" (empty: any)
        # For the status endpoint (relaystatus): wall-clock times, and the bytes
        # of clients that ended (live ones are their bridges' counts), under _lock.
        self.connected_at = time.time()
        self.waiting_since = None     # joined the line for a port
        self.registered_at = None     # got its port
        self.public_address = None    # "host:port", as announced
        self.bytes_in_ended = 0       # from its clients, to the service
        self.bytes_out_ended = 0      # to its clients
        # Its own gates: one service's overload says so once a second, whatever else is refused.
        self.log_over_max_clients = limits.LogGate(log, more="refusals")
        self.log_not_allowed = limits.LogGate(log, more="refusals")
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
        try:
            self._serve()
        except (muxado.MuxadoError, OSError) as exc:
            if resources.is_exhaustion(exc):
                log.warning("%s: out of file descriptors (%s); dropping this connection",
                            self.label, exc.strerror)
            elif self.request is None:   # never registered: anyone can do this
                self.relay._log_pending_ended("%s: connection ended: %s", self.label, exc)
            else:
                log.info("%s: connection ended: %s", self.label, exc)
        except Exception:
            log.exception("%s: failed", self.label)
        finally:
            self._finish()

    def _serve(self):
        """Register the service, then serve its public port until its session ends."""
        relay = self.relay
        enable_tcp_keepalive(self._sock, relay.keepalive)
        session = self._open_session()
        if session is None:
            return
        if self.muxado_version == 1:
            request, stream = registrarv1.handshake(self, session)
        else:
            request, stream = self._handshake(session)
        relay._registered(self)
        if request is None:
            return
        session.set_read_budget(None)
        session.set_window_size(relay.window_size)
        self.request = request
        self.allowed_clients = limits.Networks(request.allow or ())
        if request.group is not None:
            if not self._serve_in_group(request, stream):
                return
        else:
            granted = self._wait_for_port(request, stream)
            if granted is None:
                return
            self._announce(request, stream, granted[0])
            if request.tunnels:
                self._take_further_tunnels(request, session)
            self._serve_clients(session)
        # Draining: open clients finish before the session goes (close() cuts it short).
        with self._lock:
            while self._draining and self._bridges and not self._ended:
                self._idle.wait()

    def _take_further_tunnels(self, request, session):
        """From now on the service may register further tunnels on ``session``
        (docs/PROTOCOL.md, 2.11); this first one's clients get its preamble too."""
        from . import tunnels   # it builds on this module
        with self._lock:
            self.tunnel_names.add(request.name)
        self._stream_preamble = tunnelwire.encode(request.name)
        self._tunnels_thread = tunnels.accept_further(self, session)

    def _serve_in_group(self, request, stream):
        """A group member's life: join (the group's port), announce, take clients
        from the group's accept loop until it stops. False if it never joined."""
        groups = self.relay.groups
        port = groups.join(self, request, stream)
        if port is None:
            return False
        self._announce(request, stream, port)
        groups.enter(self)
        self._stopping.wait()   # session ended, the service's GOAWAY, or the relay leaving
        groups.withdraw(self)
        return True

    def _open_session(self):
        """The connection's muxado session, after TLS if the relay has it; None if
        the peer was answered as a wrong-port one, or TLS failed."""
        relay = self.relay
        first = self._peek()
        if self._wrong_port(first):
            return None
        new_session = muxado.server
        if relay.tls_context is None and framesv1.opens_v1_session(first):
            self.muxado_version = 1
            new_session = muxadov1.server
        transport = self._sock
        if relay.tls_context is not None:
            transport = self._tls_handshake()
            if transport is None:
                return None
        # A service opens its registration stream and little else: small
        # limits bound what a hostile one can make us hold.
        # Until it has registered, a connection gets the smallest session
        # that can register: the protocol's least window, a small read
        # buffer and a budget of bytes, after which it is dropped.
        session = new_session(transport, name="service %s" % _address(self.address),
                                max_streams=16, accept_backlog=8,
                                max_frame_size=min(registration.LINK_MAX_FRAME, relay.window_size),
                                read_budget=PENDING_READ_BUDGET,
                                write_timeout=relay.write_timeout)
        with self._lock:
            self._session = session
        session.add_done_callback(self._session_ended)
        return session

    def _finish(self):
        """The service thread's end: session, clients, heartbeat, port."""
        relay = self.relay
        self._close_listener()
        relay.groups.withdraw(self)   # a member: no client is being handed to it after this
        self._end_session()
        self._let_clients_finish()
        if self._tunnels_thread is not None:
            self._tunnels_thread.join()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._health is not None:
            self._health.join()
        if self.group is not None:
            relay.groups.leave(self)   # the group's port goes back with its last member
        elif self.port is not None and not self._port_given_back:
            held = relay._release_port(self, self.port)
            log.info("%s: left; port %d is free again%s (%d clients served)",
                     self.label, self.port,
                     " once its lease ends in %gs" % relay.lease_time if held else "",
                     self.clients_served)
        relay._registered(self)   # if it never got that far
        relay._forget_service(self)

    def _end_session(self):
        if self._session is not None:
            self._session.close()
        else:
            self._sock.close()

    def _let_clients_finish(self):
        with self._lock:
            bridges = list(self._bridges)
            grace = 0.0 if self._closing else self.relay.drain_timeout
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

    def _serve_clients(self, session):
        """The public port's accept loop: each client becomes a stream of ``session``."""
        acceptor = resources.Acceptor(self._listener, self._stopping,
                                      "%s's port %d" % (self.label, self.port))
        gates = (self.log_over_max_clients, self.log_not_allowed)
        while True:
            owed = [wait for wait in (gate.owed() for gate in gates) if wait is not None]
            if owed and not _readable(self._listener, min(owed)):
                for gate in gates:
                    gate.flush()   # a burst's count, told within a second even if it ended
                continue
            try:
                conn, client_address = acceptor.accept()
            except OSError:
                return  # the listener was shut down: session ended, or the relay is leaving
            if self._take_client(session, conn, client_address):
                return

    def _take_client(self, session, conn, client_address):
        """The new client ``conn`` becomes a stream of ``session``, joined to it; or
        it is refused, or its stream fails. True if that ends this service's accept
        loop (also called by a group's accept loop: groups.Group)."""
        relay = self.relay
        if self._refused(conn, client_address[0]):
            return False
        if not client_options_inherited(conn):   # from the listener (set_client_options)
            enable_tcp_keepalive(conn, relay.keepalive)   # notice a client that vanished
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            stream, early = self._open_stream(session, conn, client_address)
        except (muxado.MuxadoError, OSError) as exc:
            return self._stream_failed(session, exc, client_address)
        self._start_bridge(conn, stream, early, client_address)
        return False

    def _refused(self, conn, host):
        """True if the new client ``conn`` from ``host`` was refused: outside the
        allowed networks, or over --max-clients. A raw TCP client can be told
        nothing: a reset at once says "refused" (a FIN would look like a service
        that took it and hung up); the reason goes to the log."""
        relay = self.relay
        outside = self._outside(host)
        if outside is not None:
            # Counted (and kept among the recent refusals) before the client knows.
            relay.counters.refused("clients_refused", "not_allowed", host,
                                   "%s: not in %s" % (self.label, outside))
            _reset(conn)
            self.clients_not_allowed += 1   # this thread's alone: a plain int
            self.log_not_allowed("%s: refused a client from %s: not in %s", self.label,
                                 host, outside)
            return True
        if relay.max_clients is not None and self.client_count >= relay.max_clients:
            relay.counters.refused("clients_refused", "max_clients", host,
                                   "%s: %d clients already (--max-clients)"
                                   % (self.label, relay.max_clients))
            _reset(conn)
            self.log_over_max_clients("%s: refused a client from %s: %d clients already "
                                      "(--max-clients)", self.label, host, relay.max_clients)
            return True
        return False

    def _outside(self, host):
        """Which allowed networks leave ``host`` out (text for the log), or None if it
        may connect: it must be in the relay's --public-allow and the service's allow."""
        ceiling = self.relay.public_allow
        if ceiling and host not in ceiling:
            return "--public-allow (%s)" % ceiling
        if self.allowed_clients and host not in self.allowed_clients:
            return "the service's allowed networks (%s)" % self.allowed_clients
        return None

    def _open_stream(self, session, conn, client_address):
        """A new stream of ``session`` for the client ``conn``, with what it sent
        already: ``(stream, those bytes)``. On an error both are reset, and it is raised."""
        stream = None
        try:
            # The SYN goes out here, in accept order, carrying what the
            # client sent with its connect if anything: one frame, not two.
            stream = session.open(announce=False)
            header = self._stream_preamble   # a tunnel's name, first (tunnels.py)
            if self.request.proxy_protocol:
                header += proxyproto.encode(self.request.proxy_protocol,
                                            client_address[:2], conn.getsockname()[:2])
            if header:
                stream.sendall(header)
            early = _early_bytes(conn)
            if early:
                stream.sendall(early)
            else:
                stream.announce()   # the service may be the one to speak first
            return stream, early
        except (muxado.MuxadoError, OSError):
            if stream is not None:
                stream.reset(wait=False)
            _reset(conn)
            raise

    def _stream_failed(self, session, exc, client_address):
        """A client's stream could not open (``exc``); True if that ends the port's
        accept loop, False if it ends this client only."""
        if session.closed:
            log.info("%s: cannot open a stream for client %s: %s",
                     self.label, _address(client_address), exc)
            return True
        if getattr(exc, "code", None) == muxado.ErrorCode.STREAMS_EXHAUSTED:
            self._hand_over(client_address)
            return True
        if isinstance(exc, muxado.RemoteGoneAwayError) or session.remote_goaway is not None:
            # The service takes no new clients (it is shutting down):
            # the ones it serves carry on, as when the relay drains. (Its
            # GOAWAY may also come while the new stream's first frame goes out.)
            log.info("%s: takes no new clients (%s); refusing %s, finishing the %d open",
                     self.label, exc, _address(client_address), self.client_count)
            with self._lock:
                self._draining = True
            self._stop_listening()
            return True
        # This stream's own error (the service reset it, or the client
        # left already): it ends this client only.
        self.relay.counters.count("clients_refused", "stream_failed")
        self.relay._log_refusal("%s: client %s refused: %s", self.label,
                                _address(client_address), exc)
        return False

    def _start_bridge(self, conn, stream, early, client_address):
        """Join the client ``conn`` to its ``stream``; ``early``: bytes already sent up."""
        relay = self.relay
        bridge = Bridge(conn, stream, relay.flusher,
                        name="client %s" % _address(client_address),
                        on_close=functools.partial(self._client_closed,
                                                   visit=accesslog.visit(client_address)),
                        workers=relay.workers,
                        idle_timeout=relay.idle_timeout, nodelay=False)
        bridge.bytes_up = len(early)
        with self._lock:
            self._bridges.add(bridge)
            self.clients_served += 1
        relay._client_opened()
        if log.isEnabledFor(logging.DEBUG):   # the label and address cost more than a line
            log.debug("%s: client %s on stream %d", self.label, _address(client_address),
                      stream.id)
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
        if self.group is None:   # a group's port is the group's
            port, self._port_given_back = self.port, True
            self.relay._release_port(self, port)

    def _client_closed(self, bridge, visit):
        with self._lock:
            self._bridges.discard(bridge)
            # In the same hold as the discard: a status read sees these bytes once.
            self.bytes_in_ended += bridge.bytes_up
            self.bytes_out_ended += bridge.bytes_down
            self._idle.notify_all()
        code = _reset_code(bridge.stream)
        if code is not None:
            self.relay.counters.count("streams_reset", code)
        self.relay.access_log.client_ended(self, bridge, visit, code)
        if log.isEnabledFor(logging.DEBUG):
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


def _reset_code(stream):
    """The name of the muxado error code that reset ``stream`` (by either side),
    or None if it was not reset."""
    error = stream.error
    if not isinstance(error, muxado.StreamResetError):
        return None
    # A code we do not know is "other": a service cannot make labels without end.
    return getattr(muxado.ErrorCode.of(error.code), "name", "other")


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
