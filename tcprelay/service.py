"""The service side: put a service behind a relay, for legacy synchronous code.

    from tcprelay.service import connect, RelayServer

    svc = connect(("relay.example", 8080))     # registered; svc.address == "relay.example:8081"
    stream = svc.accept()                      # one muxado Stream per client

    with RelayServer(("relay.example", 8080), Handler) as server:   # socketserver style
        print(server.public_address)
        server.serve_forever()

Handlers get a ``muxado.Stream`` as ``request``; it behaves like a socket.
"""

import collections
import collections.abc
import functools
import logging
import random
import socket
import sys
import threading
import traceback

from . import (addresses, clock, healthprobe, limits, muxado, proxyproto, registration,
               tunnelwire)
from .heartbeat import DEFAULT_KEEPALIVE, HeartbeatSender
from .registrant import (DEFAULT_TIMEOUT, MINIMAL_ONLY, MinimalRelay, NeedsExtendedForm,
                         RegistrationRefused, extended_form, minimal_form, needs_extended_form,
                         register, register_minimal)
from .relaydial import (Attempt, ConnectCancelled, RelayGone, ServicePortError, _open_link,
                        _registered)
from .servicetunnels import Tunnel, add_further, check_specs
from .workers import WorkerPool

# The service library's public names (register and its errors live in registrant.py).
__all__ = ["Attempt", "Backoff", "ConnectCancelled", "DEFAULT_TIMEOUT", "NeedsExtendedForm",
           "RegistrationRefused", "RelayGone", "RelayServer", "ServiceConnection",
           "ServicePortError", "Tunnel", "connect", "register", "register_minimal"]

log = logging.getLogger(__name__)



class ServiceConnection(object):
    """A registered service: one muxado session to the relay and a public address."""

    def __init__(self, session, reply, heartbeat=None, proxy_protocol=None, minimal=False,
                 relay=None):
        self.session = session
        self.relay = relay                    # the relay's "host:port", as dialled
        health = reply.get("health")
        probe = health.get("probe") if isinstance(health, dict) else None
        # A group member's health probes, answered here (healthprobe): bytes, or None.
        self.health_probe = probe.encode("ascii", "replace") if isinstance(probe, str) \
            and probe else None
        self.reply = reply                    # the relay's whole ok reply (extended form)
        self.minimal = minimal                # registered in the minimal form: no lease
        self.address = reply.get("address")   # "host:port", as the relay hands it out
        self.port = reply.get("port")
        self.lease = reply.get("lease")       # the token to get this port back
        self.proxy_protocol = proxy_protocol  # each stream starts with a PROXY header
        self._heartbeat = heartbeat
        # With several tunnels (connect's tunnels=): {name: Tunnel}, the first one
        # first; each stream then starts with its tunnel's preamble (tunnelwire).
        self.tunnels = None

    def accept(self, timeout=None):
        """The next client's stream. Raises ``RelayGone`` once the relay is gone.
        The relay's health probes (a group member's) are answered, not returned."""
        deadline = None if self.health_probe is None else clock.Deadline(timeout)
        while True:
            try:
                stream = self.session.accept(timeout if deadline is None else deadline.remaining())
            except muxado.SessionClosedError as exc:
                raise RelayGone("connection to the relay ended: %s" % exc.message)
            if self.health_probe is None or not healthprobe.is_probe(stream, self.health_probe):
                return stream
            healthprobe.answer(stream, self.health_probe)

    def close(self):
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.session.close()
        if self._heartbeat is not None:
            self._heartbeat.join()

    @property
    def closed(self):
        return self.session.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "<ServiceConnection %s>" % self.address


def connect(relay_address, port=None, name=None, timeout=DEFAULT_TIMEOUT, max_wait=None,
            on_waiting=None, lease=None, heartbeat=True, proxy_protocol=None,
            keepalive=DEFAULT_KEEPALIVE, secret=None, tls=None, attempt=None,
            allow_clients=None, group=None, group_key=None, health=None, minimal=False,
            tunnels=None, **session_options):
    """Dial the relay, register, and return a ``ServiceConnection``.

    ``port`` asks for a particular public port, ``name`` labels us in the
    relay's logs, ``max_wait`` bounds the wait for a free port, ``lease``
    (a token from an earlier connection) asks for the same port back.
    ``heartbeat`` pings the relay to notice it vanishing; ``proxy_protocol``
    ("v1" or "v2") asks for each stream to start with the client's address.
    ``secret`` (bytes) answers the relay's challenge; ``tls`` (an
    ``ssl.SSLContext``, see ``tcprelay.tls.client_context``) puts TLS on the
    connection. ``allow_clients`` (CIDR texts, such as ``["10.0.0.0/8"]``)
    lets only clients from those networks reach us: the relay resets the
    others (ValueError at once for a text that is no network;
    ``RegistrationRefused`` from a relay that does not confirm the list).
    ``group`` (a name) and ``group_key`` (bytes, the operator's key for it)
    join a group: replicas sharing one public port; ``health`` (``{"interval":
    seconds, "failures": count}``) asks the relay to check us, and our streams'
    ``accept`` answers its probes (docs/PROTOCOL.md, 2.9).
    ``timeout`` bounds connecting and each answer from the relay
    (the wait in line: see ``register``). ``attempt`` (an ``Attempt``) lets
    another thread cut it all short: then ``ConnectCancelled`` is raised.

    A relay that speaks only the minimal form (docs/PROTOCOL.md 2.1) gets it,
    with a warning: one that answers a bare ``host:port``, or nothing within
    ``MINIMAL_GRACE`` seconds (then we dial again). ``minimal=True`` uses it
    from the start. ``port``, ``proxy_protocol`` and ``secret`` need the
    extended form: ``NeedsExtendedForm`` with such a relay, ValueError with
    ``minimal=True``; a lease, the name and the heartbeat are dropped.

    ``tunnels`` (a sequence of dicts: ``name``, and optionally ``port``,
    ``lease``, ``proxy_protocol``, ``allow_clients``) registers further tunnels
    on the same session, each with a public port of its own; the first tunnel
    is the one the other arguments describe, and needs ``name``. The
    connection's ``tunnels`` is then {name: ``Tunnel``}, and each stream starts
    with its tunnel's preamble (``tunnelwire.read``; docs/PROTOCOL.md, 2.11).
    """
    where = addresses.join_host_port(*relay_address[:2])
    allow_clients = _check_options(allow_clients, group, group_key, health)
    if attempt is None:
        attempt = Attempt()
    specs = None if tunnels is None else check_specs(name, tunnels)
    option = needs_extended_form(port, proxy_protocol, secret, allow_clients, group) \
        or ("tunnels" if specs is not None else None)
    if minimal and option is not None:
        raise ValueError("%s= needs the extended registration form: not with minimal=True"
                         % option)
    link = functools.partial(_open_link, relay_address, where, timeout, keepalive, tls,
                             attempt, session_options)
    if minimal:
        run = functools.partial(minimal_form, timeout, max_wait, True)
    else:
        run = functools.partial(extended_form, keepalive, dict(
            port=port, name=name, max_wait=max_wait, timeout=timeout, on_waiting=on_waiting,
            lease=lease, heartbeat=heartbeat, proxy_protocol=proxy_protocol, secret=secret,
            allow=allow_clients, group=group, group_key=group_key, health=health,
            tunnels=specs is not None))
    session = link()
    try:
        reply, beat = _registered(session, where, tls, attempt, run)
    except MinimalRelay as exc:
        session, reply = _minimal_after_all(exc, session, link, option, where, tls, attempt,
                                            timeout, max_wait)
        minimal, beat = True, None
    sender = None
    if beat is not None:
        sender = HeartbeatSender(session, *(beat + ("relay %s" % where,)))
        sender.start()
    connection = ServiceConnection(session, reply, heartbeat=sender,
                                   proxy_protocol=proxy_protocol, minimal=minimal, relay=where)
    if specs is not None:
        add_further(connection, name, specs, timeout, max_wait)
    return connection


def _minimal_after_all(exc, session, link, option, where, tls, attempt, timeout, max_wait):
    """The relay turned out to speak only the minimal form (``exc``, a
    MinimalRelay): (the session, the ok reply) registered in that form, with a
    warning; NeedsExtendedForm if ``option`` needs the extended form."""
    if exc.reply is None or option is not None:
        session.close()
    if option is not None:
        raise NeedsExtendedForm(where, option)
    log.warning(MINIMAL_ONLY, where)
    reply = exc.reply
    if reply is None:   # it waits for a FIN on that stream: a fresh session
        session = link()
        reply, _ = _registered(session, where, tls, attempt, functools.partial(
            minimal_form, timeout, max_wait, False))
    return session, reply


def _check_options(allow_clients, group, group_key, health):
    """connect()'s options that a relay would refuse, checked before dialling:
    the allow list as the wire carries it. Raises ValueError."""
    if allow_clients is not None:
        try:
            allow_clients = registration.allow_list(allow_clients)
        except ValueError as exc:
            raise ValueError("allow_clients %s" % exc)
    if (group is None) != (group_key is None) or (health is not None and group is None):
        raise ValueError("group and group_key go together, and health needs them")
    return allow_clients


class Backoff(object):
    """Delays between attempts: exponential with jitter, from ``first`` up to ``cap``."""

    def __init__(self, first=0.5, cap=30.0):
        self._first = first
        self._cap = cap
        self._attempt = 0

    def next(self):
        base = min(self._cap, self._first * 2 ** self._attempt)
        self._attempt += 1
        return min(self._cap, base * random.uniform(0.75, 1.25))


class RelayServer(object):
    """A socketserver-style server whose clients arrive through a relay.

    Like ``socketserver.ThreadingTCPServer``: one thread per client, the
    handler gets a stream as ``request``. ``server_address`` and
    ``public_address`` are the address clients use.

    ``serve_forever(reconnect=True)`` dials the relay again when it goes
    away, with backoff, and gets the same port back while its lease holds.
    ``retry=True`` retries the first connection too; without it a relay
    that cannot be reached is an error at once. A relay that refuses us
    (``RegistrationRefused``) is final either way. ``minimal=True`` registers
    in the minimal form (see ``connect``); a relay found to speak only that
    form gets it on every reconnect too, without the grace and the warning.

    Other keyword arguments (``allow_clients``, ``secret``, ``tls``, ...) go
    to ``connect()`` at every registration.

    Several relays (docs/DEPLOY.md): give ``relay_address`` as a list of
    (host, port) addresses. The server registers with each, asking every one
    for the same public port (``port``, else the one the first relay gave),
    serves clients from all of them, and reconnects to each on its own, with
    its own lease (``relay_sessions``: one ``relaysessions.RelaySession`` per
    relay, in order). ``public_address`` is the first relay's; ``registered``
    is called for each relay's registrations (``connection.relay`` names it).
    ``serve_forever`` without ``reconnect`` raises ``RelayGone`` once every
    relay is gone; with ``retry``, a relay after the first that cannot be
    reached at start is tried again while the others serve.

    Several tunnels on one connection (docs/PROTOCOL.md, 2.11): give
    ``RequestHandlerClass`` as a mapping {tunnel name: handler class} and,
    optionally, ``tunnel_options`` {tunnel name: {"port": ..., "proxy_protocol":
    ..., "allow_clients": ...}}. Each tunnel gets a public port of its own
    (``public_addresses``: {name: "host:port"}; ``public_address`` is the
    first's) and its own lease; each stream goes to its tunnel's handler, and
    its ``tunnel`` attribute names the tunnel. ``port``, ``name`` and
    ``proxy_protocol`` are then unused.

    ``shutdown()`` and ``server_close()`` cut every stage short within
    about a second: connecting, registering, waiting in line, the backoff
    between attempts. A registration they cut short raises ``RelayGone``
    from ``server_activate`` (``serve_forever`` just returns).
    """

    daemon_threads = False
    block_on_close = True
    timeout = None
    # True runs handlers on reused threads: cheaper per client, but a
    # handler then must not rely on fresh threading.local state.
    reuse_threads = False
    # With proxy_protocol, take the PROXY header off each stream (False
    # passes it on to the handler, for backends that read it themselves).
    consume_proxy_header = True

    def __init__(self, relay_address, RequestHandlerClass, port=None, name=None,
                 timeout=DEFAULT_TIMEOUT, bind_and_activate=True, retry=False,
                 proxy_protocol=None, heartbeat=True, minimal=False, tunnel_options=None,
                 **connect_options):
        several = not isinstance(relay_address[0], (str, bytes))
        # Every relay we register with, in order: (host, port) tuples.
        self.relay_addresses = [tuple(a[:2]) for a in relay_address] if several \
            else [tuple(relay_address[:2])]
        self.relay_address = self.relay_addresses[0]
        self.RequestHandlerClass = RequestHandlerClass
        # Several tunnels: {name: handler class}, in order, and their options; else None.
        self.tunnel_handlers = None
        if isinstance(RequestHandlerClass, collections.abc.Mapping):
            self.tunnel_handlers = collections.OrderedDict(RequestHandlerClass)
        self.tunnel_options = dict(tunnel_options or {})
        self.public_addresses = None    # with several tunnels: {name: "host:port"}
        self._leases = {}               # with several tunnels: {name: lease token}
        self.requested_port = port
        self.name = name
        self.connect_timeout = timeout
        self.retry = retry
        self.proxy_protocol = proxy_protocol
        self.heartbeat = heartbeat
        self.minimal = minimal   # the minimal form: asked for, or the relay's only one
        self.connect_options = connect_options
        self.connection = None
        self.public_address = None
        self.server_address = None
        self._lease = None
        self._threads = set()
        self._threads_lock = threading.Condition()
        self._pooled_active = 0
        self._workers = None
        self._shutdown_requested = threading.Event()
        self._attempt = None                 # the registration under way, to cancel
        self._retired = []                   # sessions the relay is leaving, clients finishing
        self._attempt_lock = threading.Lock()
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        # Lines any client (or the relay) can trigger: at most one a second each.
        self._log_dropped = limits.LogGate(log)
        self._log_client_gone = limits.LogGate(log, logging.INFO)
        self._log_handler_error = limits.LogGate(log, logging.ERROR)
        # With several relays: one RelaySession per relay; else None.
        self.relay_sessions = None
        if several:
            from . import relaysessions   # it builds on this module's RelayServer
            self.relay_sessions = relaysessions.sessions_for(self)
        if bind_and_activate:
            self.server_activate()

    @property
    def relay_label(self):
        return addresses.join_host_port(*self.relay_address)

    def server_activate(self):
        """Connect to the relay and register (socketserver's bind + listen)."""
        if self.relay_sessions is not None:
            from . import relaysessions
            relaysessions.register_all(self)
            return
        self._register(retry=self.retry)

    def _register(self, retry):
        backoff = Backoff()
        while True:
            attempt = Attempt()
            with self._attempt_lock:
                if self._shutdown_requested.is_set():
                    raise RelayGone("shut down while registering with the relay")
                self._attempt = attempt
            options = dict(self.connect_options)
            told = options.pop("on_waiting", None)
            in_line = []

            def on_waiting(position):
                in_line.append(position)
                if told is not None:
                    told(position)

            try:
                options.update(self._registration_options())
                connection = connect(self.relay_address, timeout=self.connect_timeout,
                                     heartbeat=self.heartbeat, attempt=attempt,
                                     on_waiting=on_waiting, minimal=self.minimal, **options)
            except RegistrationRefused:
                raise
            except (OSError, registration.RegistrationError, muxado.MuxadoError) as exc:
                if self._shutdown_requested.is_set():
                    raise RelayGone("shut down while registering with the relay")
                # A relay that had us in line was reachable and took us: it
                # went away (a restart, say), so we try again, --retry or not.
                if not retry and not in_line:
                    raise
                delay = backoff.next()
                log.warning("cannot register with the relay at %s: %s; trying again in %.1fs",
                            self.relay_label, getattr(exc, "strerror", None) or exc, delay)
                if self._shutdown_requested.wait(delay):
                    raise RelayGone("shut down while reconnecting to the relay")
                continue
            finally:
                with self._attempt_lock:
                    self._attempt = None
            # A shutdown that came as the registration finished still wins:
            # server_close() must leave no connection behind.
            with self._attempt_lock:
                stopped = self._shutdown_requested.is_set()
                if not stopped:
                    previous = self.public_address
                    self.connection = connection
            if stopped:
                connection.close()
                raise RelayGone("shut down while registering with the relay")
            break
        self._lease = connection.lease
        self.minimal = connection.minimal   # found once: reconnects neither wait nor warn again
        self.public_address = connection.address
        if connection.tunnels is not None:
            self._leases = dict((t.name, t.lease) for t in connection.tunnels.values())
            self.public_addresses = collections.OrderedDict(
                (t.name, t.address) for t in connection.tunnels.values())
        self.server_address = addresses.split_host_port(self.public_address)
        log.info("registered with the relay at %s; public address %s",
                 self.relay_label, self.public_address)
        self.registered(previous, connection)

    def _registration_options(self):
        """connect()'s options for what we register: one tunnel, or several."""
        if self.tunnel_handlers is None:
            return dict(port=self.requested_port, name=self.name, lease=self._lease,
                        proxy_protocol=self.proxy_protocol)
        specs = []
        allow = self.connect_options.get("allow_clients")   # every tunnel's, unless its own
        for name in self.tunnel_handlers:
            spec = dict(self.tunnel_options.get(name, {}), name=name)
            if allow is not None:
                spec.setdefault("allow_clients", allow)
            if self._leases.get(name) is not None:
                spec["lease"] = self._leases[name]
            specs.append(spec)
        first = specs.pop(0)
        return dict(first, tunnels=specs)

    def registered(self, previous_address, connection):
        """Called after each registration (the first, and every reconnect)."""
        if previous_address is not None and previous_address != connection.address:
            log.warning("the public address changed from %s to %s",
                        previous_address, connection.address)

    def serve_forever(self, poll_interval=0.5, reconnect=False):
        """Handle clients until ``shutdown()``, which is noticed within
        ``poll_interval`` seconds (as with socketserver; None means 0.5).

        If the relay goes away: with ``reconnect`` dial it again (see the
        class docstring), else raise ``RelayGone``.
        """
        if poll_interval is None:
            poll_interval = 0.5   # never block for good: shutdown() must get through
        self._stopped.clear()
        self._serving.set()
        try:
            if self.relay_sessions is not None:
                from . import relaysessions
                return relaysessions.serve_all(self, poll_interval, reconnect)
            while not self._shutdown_requested.is_set():
                if reconnect and self.connection.session.remote_goaway is not None:
                    # The relay is leaving (a restart, say): our clients on it
                    # finish there, and new ones come over a fresh session at once.
                    if not self._move_on(poll_interval):
                        return
                    continue
                try:
                    stream = self.connection.accept(poll_interval)
                except socket.timeout:
                    self.service_actions()
                    continue
                except RelayGone as exc:
                    if self._shutdown_requested.is_set():
                        return
                    if not reconnect:
                        raise
                    log.warning("lost the relay at %s (%s); reconnecting",
                                self.relay_label, exc)
                    self.connection.close()
                    try:
                        self._register(retry=True)
                    except RelayGone:
                        return   # shut down while reconnecting
                    continue
                self._handle(stream)
                self.service_actions()
        finally:
            self._shutdown_requested.clear()   # as socketserver: serve_forever can run again
            self._serving.clear()
            self._stopped.set()

    def _handle(self, stream):
        """One client's stream, socketserver style."""
        try:
            if self.tunnel_handlers is not None:
                stream.tunnel = self._tunnel_of(stream)
                if stream.tunnel not in self.tunnel_handlers:
                    self._log_dropped("resetting a client stream for tunnel %r, which we "
                                      "do not serve", stream.tunnel)
                    stream.reset()
                    return
            client_address = self.client_address_of(stream)
        except (proxyproto.ProxyHeaderError, tunnelwire.PreambleError, OSError,
                muxado.MuxadoError) as exc:
            self._log_dropped("dropping a client stream: %s", exc)
            stream.reset()
            return
        if self.verify_request(stream, client_address):
            try:
                self.process_request(stream, client_address)
            except Exception:
                self.handle_error(stream, client_address)
                self.shutdown_request(stream)
        else:
            self.shutdown_request(stream)

    def _move_on(self, poll_interval):
        """The relay sent GOAWAY: register a fresh session; False if shut down meanwhile.

        Streams it opened before its GOAWAY are still served; the old session
        stays until the relay ends it (its clients done), or server_close().
        """
        old = self.connection
        while True:
            try:
                self._handle(old.accept(0))
            except (socket.timeout, RelayGone):
                break
        with self._threads_lock:
            ended = [c for c in self._retired if c.closed]
            self._retired = [c for c in self._retired if not c.closed] + [old]
        for connection in ended:
            connection.close()   # joins its heartbeat thread
        log.info("the relay at %s is going away; registering again while the clients it "
                 "has finish", self.relay_label)
        try:
            self._register(retry=True)
        except RelayGone:
            return False
        return True

    @property
    def shutdown_requested(self):
        return self._shutdown_requested.is_set()

    def shutdown(self):
        """Stop ``serve_forever`` and wait for it; clients being served carry on.

        As with socketserver, the server stays registered: ``serve_forever``
        may run again, and ``server_close`` leaves the relay. A registration
        under way (the first, or a reconnect) is cut short.
        """
        self._stop_registering()
        self._stopped.wait()

    def _stop_registering(self):
        self._shutdown_requested.set()
        with self._attempt_lock:
            attempt = self._attempt
        if attempt is not None:
            attempt.cancel()
        for session in self.relay_sessions or ():
            session._stop_registering()

    def server_close(self):
        """Wait for clients being served (``block_on_close``), then leave the relay."""
        self._stop_registering()
        with self._attempt_lock:
            connection = self.connection
        if connection is not None or self.relay_sessions is not None:
            if self.block_on_close:
                with self._threads_lock:
                    threads = list(self._threads)
                    while self._pooled_active:
                        self._threads_lock.wait()
                for thread in threads:
                    thread.join()
            if connection is not None:
                connection.close()
        with self._threads_lock:
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()
        for session in self.relay_sessions or ():
            session.server_close()   # its loop thread ended: serve_forever's finally joins it
        if self._workers is not None:
            self._workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server_close()

    # -- the socketserver contract ------------------------------------------------------

    def client_address_of(self, stream):
        """The address handlers see as ``client_address``.

        With ``proxy_protocol`` it is the client's own, from the PROXY header
        the relay put first on the stream; else it is the relay's.
        """
        if self._proxy_protocol_of(stream) and self.consume_proxy_header:
            stream.settimeout(self.connect_timeout)
            source, _ = proxyproto.read_header(stream)
            stream.settimeout(None)
            if source is not None:
                return source
        # The relay's address: the stream's own (with several relays, the one it came by).
        session = getattr(stream, "session", None) or self.connection.session
        return session.getpeername()

    def _tunnel_of(self, stream):
        """The tunnel ``stream`` came through: its preamble, read off."""
        stream.settimeout(self.connect_timeout)
        name = tunnelwire.read(stream)
        stream.settimeout(None)
        return name

    def _proxy_protocol_of(self, stream):
        """The PROXY header version ``stream`` starts with (after its preamble), or None."""
        if self.tunnel_handlers is None:
            return self.proxy_protocol
        return self.tunnel_options.get(stream.tunnel, {}).get("proxy_protocol")

    def service_actions(self):
        pass

    def verify_request(self, request, client_address):
        return True

    def process_request(self, request, client_address):
        if self.reuse_threads:
            with self._threads_lock:
                if self._workers is None:
                    self._workers = WorkerPool(name="relay-server")
                self._pooled_active += 1
            self._workers.submit(self._process_pooled, request, client_address)
            return
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address),
                                  name="client stream %d" % request.id)
        thread.daemon = self.daemon_threads
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def process_request_thread(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _process_pooled(self, request, client_address):
        threading.current_thread().name = "client stream %d" % request.id
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._threads_lock:
                self._pooled_active -= 1
                self._threads_lock.notify_all()

    def finish_request(self, request, client_address):
        if self.tunnel_handlers is not None:
            self.tunnel_handlers[request.tunnel](request, client_address, self)
            return
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request):
        try:
            request.shutdown(socket.SHUT_WR)
        except (OSError, muxado.MuxadoError):
            pass
        self.close_request(request)

    def close_request(self, request):
        request.close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, muxado.MuxadoError)):
            self._log_client_gone("client %s: %s", addresses.format_sockaddr(client_address),
                                  sys.exc_info()[1])
            return
        self._log_handler_error("exception while handling a client from %s:\n%s",
                                addresses.format_sockaddr(client_address),
                                traceback.format_exc().rstrip())

    def fileno(self):
        raise OSError("a RelayServer has no file descriptor to select on")
