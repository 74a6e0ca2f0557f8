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
import errno
import logging
import signal
import socket
import sys
import threading
import time

from . import (addresses, auth, cli, clock, limits, muxado, registration, relaystatus,
               resources, scheduling, tls)
from .accesslog import AccessLog, AccessLogError
from .bridge import Flusher
from .groups import Groups, load_key
from .heartbeat import DEFAULT_KEEPALIVE, set_client_options
from .leases import Leases
from .portpool import DEFAULT_RETRY_AFTER as DEFAULT_PORT_RETRY_AFTER
from .portpool import PortPool
from .relaycounters import RelayCounters
from .servicelink import ServiceLink, _reset
from .statusserver import StatusAddressError, StatusServer, TokenError, load_token
from .workers import DEFAULT_IDLE_TIMEOUT as DEFAULT_PUMP_IDLE_TIMEOUT
from .workers import WorkerPool
# Names callers and tests have always taken from this module.
from .registrar import TLS_REQUIRED  # noqa: F401
from .servicelink import PENDING_READ_BUDGET, _early_bytes  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 50
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_LEASE_TIME = 30.0
# A service in line hears from us at least this often (a ``waiting`` line),
# so that it can tell a queue from a dead relay (docs/PROTOCOL.md, 2.3).
DEFAULT_WAITING_INTERVAL = 3.0
DEFAULT_MAX_WAITING = 100          # services waiting in line for a port
DEFAULT_MAX_CLIENTS = 1000         # clients at once per service
DEFAULT_REGISTRATION_RATE = 60     # new service connections per minute per address
DEFAULT_MAX_PENDING = 256          # connections not yet registered, in all
DEFAULT_MAX_PENDING_PER_HOST = 16  # ... and from one address
THREAD_STACK_SIZE = 256 * 1024   # thousands of pump threads stay cheap
LISTEN_BACKLOG = 1024            # bursts of new clients queue in the kernel, not fail


def _address(addr):
    return addresses.format_sockaddr(addr)


class Relay(object):
    """The relay server, socketserver style.

    ``server_address``: where services connect. ``ports``: the public port
    pool (default: the 50 ports after the service port). ``public_bind``:
    the address public ports listen on. ``public_host``: the host name in
    the address handed to services (None: ``public_bind`` if that is one
    address, else the address each service dialled; a non-ASCII name goes out in IDNA; ValueError if it is no host name).
    ``waiting_interval``: seconds between
    the ``waiting`` lines a service in line gets even when nobody moved
    (None: only when its place changes, as relays before it did). ``write_timeout``: seconds a write to a
    service may make no progress before its session ends (muxado's). ``port_retry_after``:
    seconds a public port that could not be bound is skipped before it is tried again.
    ``pump_idle_timeout``: seconds an idle pump thread waits for a new client before it ends.
    ``public_allow``: CIDR texts; if any, only clients from those networks reach any
    service (a ceiling: a service's own ``allow`` narrows it further); ValueError if one
    is not a network. ``allow_from``: the same for services registering.
    ``status_address``: ``(host, port)`` of the status endpoint (``statusserver``; None: no
    endpoint; StatusAddressError if it cannot listen), ``status_token``: the token it
    requires (str, or None); see ``status()`` for what it shows. The endpoint serves
    from construction until ``server_close()``, through ``shutdown()`` and ``drain()``
    (a draining relay is worth watching). ``access_log``: a file the access lines
    (``accesslog``) are appended to (None: the ``tcprelay.access`` logger; AccessLogError
    if it cannot be opened); ``access_log.reopen()`` reopens it (logrotate).
    ``group_keys``: {group name: key (bytes)}: services that prove a group's key
    share one public port (docs/PROTOCOL.md, 2.9); no other group may form.
    """

    def __init__(self, server_address, ports=None, public_bind="", public_host=None,
                 max_services=None, handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
                 drain_timeout=DEFAULT_DRAIN_TIMEOUT, window_size=registration.LINK_WINDOW,
                 lease_time=DEFAULT_LEASE_TIME, keepalive=DEFAULT_KEEPALIVE,
                 secret=None, allow_from=(), tls_context=None, max_waiting=DEFAULT_MAX_WAITING,
                 max_clients=DEFAULT_MAX_CLIENTS, idle_timeout=None,
                 registration_rate=DEFAULT_REGISTRATION_RATE, max_pending=DEFAULT_MAX_PENDING,
                 max_pending_per_host=DEFAULT_MAX_PENDING_PER_HOST,
                 waiting_interval=DEFAULT_WAITING_INTERVAL,
                 write_timeout=muxado.DEFAULT_WRITE_TIMEOUT, bind_and_activate=True,
                 port_retry_after=DEFAULT_PORT_RETRY_AFTER, status_address=None,
                 pump_idle_timeout=DEFAULT_PUMP_IDLE_TIMEOUT, status_token=None,
                 public_allow=(), access_log=None, group_keys=None):
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
        self.public_allow = limits.Networks(public_allow)
        self.tls_context = tls_context
        self.max_waiting = max_waiting
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.waiting_interval = waiting_interval
        self._set_limits(registration_rate, max_pending, max_pending_per_host)
        self.pool = PortPool(ports, self._bind_public, limit=max_services,
                             retry_after=port_retry_after)
        self.leases = Leases(self.pool, lease_time)
        self.groups = Groups(self, group_keys)
        self._lock = threading.Condition()
        self._services = set()
        self._clients = 0
        self._accepting = True
        self._stopping = threading.Event()   # set by _stop_accepting
        self._drain_cut = False              # cut_drain(): stop waiting for clients
        self._stopped = threading.Event()
        self._stopped.set()
        self.flusher = self.access_log = None
        self.server_address = (host, port)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    socket.SOCK_STREAM)
        if bind_and_activate:
            self._bind_and_activate()
        self.flusher = Flusher(name="relay-flusher")
        self.workers = WorkerPool(name="relay-pump", idle_timeout=pump_idle_timeout)
        self._open_status(status_address, status_token)
        self.access_log = self._open_access_log(access_log)

    def _set_limits(self, registration_rate, max_pending, max_pending_per_host):
        """Who may try and how often (limits.py), and the log gates of refusals."""
        self.auth_failures = limits.FailureBans(limit=5, window=60.0, ban=60.0)
        self.registration_rate = limits.RateLimit(per_minute=registration_rate,
                                                  burst=max(1, registration_rate // 3))
        self._open_log_gates()
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        self._pending = {}   # ServiceLink not yet registered -> its host

    def _open_status(self, address, token):
        """What the status endpoint reads, and the endpoint if ``address`` is given."""
        self.counters = RelayCounters()
        self.started_at = time.time()
        # Counted under _lock, where the relay counts clients and services already.
        self.clients_accepted = 0
        self.bytes_in_ended = 0    # carried by clients of services that left, to them
        self.bytes_out_ended = 0   # ... and from them
        self.status_server = None
        if address is None:
            return
        try:
            self.status_server = StatusServer(address, self.status, token=token)
        except OSError:
            self.server_close()
            raise
        self.status_server.start()

    def _open_access_log(self, path):
        """Where the access lines go (``accesslog``): ``path``, or the log."""
        try:
            return AccessLog(path, self.counters)
        except AccessLogError:
            self.server_close()
            raise

    def _open_log_gates(self):
        self._log_refusal = limits.LogGate(log, more="refusals")
        # Lines anyone who reaches the service port can trigger, one gate per kind.
        self._log_remote = limits.LogGates(log)
        # Every new connection is told, unless they come faster than a person reads.
        self._log_connected = limits.LogGate(log, logging.INFO, per_second=5, burst=20)
        self._log_pending_ended = limits.LogGate(log, logging.INFO, per_second=5, burst=20)

    def _bind_and_activate(self):
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.socket.close()
            raise

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
                    self._refuse_connection(sock, address, refusal)
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
                    self._refuse_connection(sock, address, refusal)
                    continue
                self.counters.count("service_connections_accepted")
                self._log_connected("service connected from %s", _address(address))
                link.start()
        finally:
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
        self.pool.close_line()   # before any service leaves and frees its port
        with self._lock:
            services = list(self._services)
        log.info("draining: %d services, %d clients open", len(services), self._clients)
        self.groups.stop_listening()
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
        if self.status_server is not None:
            self.status_server.close()
        if self.access_log is not None:
            self.access_log.close()   # after every client's line

    def status(self):
        """What the relay is doing, as plain dicts: ``relaystatus.snapshot``."""
        return relaystatus.snapshot(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.server_close()

    # -- internals ---------------------------------------------------------------------

    def _admission(self, host):
        """Why a connection from ``host`` may not even try to register: ``(reason,
        text)`` (reason: a metric label), or None.

        Checked before any handshake work, so refusals cost almost nothing.
        """
        if self.allow_from and host not in self.allow_from:
            return "allow_from", "not in --allow-from (%s)" % self.allow_from
        if self.auth_failures.banned(host):
            return "banned", "too many failed authentications; refused for a minute"
        if not self.registration_rate.allow(host):
            return ("registration_rate",
                    "too many registrations from this address (--registration-rate)")
        return None

    def _pending_refusal(self, host):
        """Why a new connection from ``host`` may not wait to register, as
        ``_admission``'s, or None (lock held)."""
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            return ("max_pending", "%d connections are registering already (--max-pending)"
                    % self.max_pending)
        if self.max_pending_per_host is not None:
            from_host = sum(1 for h in self._pending.values() if h == host)
            if from_host >= self.max_pending_per_host:
                return ("max_pending_per_host",
                        "%d connections from this address are registering already "
                        "(--max-pending-per-host)" % self.max_pending_per_host)
        return None

    def _refuse_connection(self, sock, address, refusal):
        reason, text = refusal
        _reset(sock)
        self.counters.refused("service_connections_refused", reason, address[0], text)
        self._log_refusal("refused a service connection from %s: %s", address[0], text)

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
            # Keepalive notices a client that vanished; clients inherit it.
            set_client_options(listener, self.keepalive)
            listener.bind((self.public_bind, port))
            listener.listen(LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        return listener

    def _release_port(self, link, port):
        """Give ``link``'s port back; True if it is held for the service's lease."""
        return self.leases.release(link, port, hold=self._accepting)

    def _forget_service(self, link):
        with self._lock:
            self._services.discard(link)
            # Its clients are all done: their bytes join the relay's totals here.
            self.bytes_in_ended += link.bytes_in_ended
            self.bytes_out_ended += link.bytes_out_ended
            self._lock.notify_all()

    def _client_opened(self):
        with self._lock:
            self._clients += 1
            self.clients_accepted += 1

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


def build_parser():
    parser = cli.Parser(
        prog="python3 -m tcprelay.relay",
        description="Relay TCP clients to services that dial in over muxado. Each service "
                    "gets a public port from a pool; each client of that port reaches the "
                    "service as a new stream.",
    )
    parser.add_argument("port", type=cli.port_number, help="port where services connect")
    parser.add_argument("--host", default="", type=cli.host,
                        help="address services connect to; an IPv6 one with or without "
                             "brackets (default: all interfaces)")
    parser.add_argument("--public-bind", default="", metavar="HOST", type=cli.host,
                        help="address the public ports listen on (default: all interfaces)")
    parser.add_argument("--public-host", default=None, metavar="NAME", type=cli.public_host,
                        help="host name or address put in the address handed to services, "
                             "as clients should reach the public ports; set it when "
                             "clients reach the relay by another name, or through NAT; a "
                             "non-ASCII name goes out in IDNA (default: the address each "
                             "service dialled; the --public-bind address if that is one "
                             "address)")
    parser.add_argument("--public-allow", action="append", default=[], metavar="CIDR",
                        type=cli.network,
                        help="only clients from networks like this reach the public "
                             "ports, whatever a service allows; repeatable (default: any)")
    parser.add_argument("--ports", type=cli.port_range, metavar="LOW-HIGH",
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
                             "and after a service left, let its clients take its last "
                             "bytes for this long before they are reset (default: 10)")
    parser.add_argument("--lease-time", type=cli.non_negative, default=DEFAULT_LEASE_TIME,
                        metavar="SECONDS",
                        help="a service that reconnects within this time with its lease "
                             "token gets its port back; 0 disables leases (default: 30)")
    parser.add_argument("--keepalive", type=cli.positive(float), default=DEFAULT_KEEPALIVE,
                        metavar="SECONDS",
                        help="notice a service that vanished (TCP keepalive, and the "
                             "heartbeat for services that ask) within this time (default: 30)")
    _add_security_options(parser)
    _add_limit_options(parser)
    _add_status_options(parser)
    parser.add_argument("--access-log", metavar="FILE",
                        help="append the access line of each public client that ends "
                             "to FILE (README, \"Access log\"); reopened after SIGHUP "
                             "(default: the log on stderr)")
    parser.add_argument("--log-level", default="info", choices=cli.LOG_LEVELS,
                        help="how much to log to stderr (default: info)")
    scheduling.add_options(parser)
    # Not in --help: for tests that wait for the relay's threads to go back.
    parser.add_argument("--pump-idle-timeout", type=cli.positive(float),
                        default=DEFAULT_PUMP_IDLE_TIMEOUT, help=argparse.SUPPRESS)
    return parser


def _add_security_options(parser):
    security = parser.add_argument_group("who may register (docs/SECURITY.md)")
    security.add_argument("--secret-file", metavar="PATH",
                          help="services must prove they know the secret in this file "
                               "(HMAC challenge; the secret never crosses the wire). "
                               "Or set $TCPRELAY_SECRET")
    security.add_argument("--allow-from", action="append", default=[], metavar="CIDR",
                          type=cli.network, help="only networks like this may register "
                                                 "services; repeatable (default: any)")
    security.add_argument("--group-key", action="append", default=[], metavar="NAME=FILE",
                          type=_group_key,
                          help="services that prove the key in FILE share one public port "
                               "as group NAME (HMAC challenge); repeatable, one per group")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="put TLS on the service port with this certificate (PEM)")
    security.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    security.add_argument("--registration-rate", type=cli.positive(int),
                          default=DEFAULT_REGISTRATION_RATE, metavar="N",
                          help="new service connections a minute from one address "
                               "(default: %d)" % DEFAULT_REGISTRATION_RATE)


def _add_limit_options(parser):
    capacity = parser.add_argument_group("limits")
    capacity.add_argument("--max-waiting", type=cli.positive(int), default=DEFAULT_MAX_WAITING,
                          metavar="N", help="services that may wait in line for a port; "
                                            "more are refused (default: %d)" % DEFAULT_MAX_WAITING)
    capacity.add_argument("--max-clients", type=cli.positive(int), default=DEFAULT_MAX_CLIENTS,
                          metavar="N", help="clients at once per service; more are reset "
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


def _add_status_options(parser):
    status = parser.add_argument_group("status page and metrics (README)")
    status.add_argument("--status", metavar="HOST:PORT", type=cli.status_address,
                        help="serve the status page (/), /status.json and Prometheus "
                             "/metrics over HTTP here; a bare PORT listens on 127.0.0.1 "
                             "(default: no status endpoint)")
    status.add_argument("--status-token-file", metavar="PATH",
                        help="the status endpoint requires 'Authorization: Bearer TOKEN' "
                             "with the token in this file, on every path. Or set "
                             "$TCPRELAY_STATUS_TOKEN (docs/SECURITY.md)")


def _group_key(text):
    try:
        return load_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


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


def _settings(parser, args):
    """The public ports, the secret and the TLS context the options give
    (exits with a usage error if they do not fit)."""
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
    try:
        args.status_token = load_token(args.status_token_file)
    except TokenError as exc:
        parser.error(str(exc))
    if args.status_token_file and not args.status:
        parser.error("--status-token-file needs --status")
    if args.access_log == "-":
        parser.error("--access-log takes a file; without it the lines go to the log on "
                     "stderr, and /dev/stdout puts them on stdout")
    if args.status and args.status[1] in ports:
        parser.error("--status port %d is in the public port pool %d-%d: choose one outside it"
                     % (args.status[1], ports[0], ports[-1]))
    tls_context = None
    if args.tls_cert:
        try:
            tls_context = tls.server_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:
            parser.error("cannot load the TLS certificate and key: %s" % exc)
    return ports, secret, tls_context


def _start_relay(args, ports, secret, tls_context):
    """The listening ``Relay``, or None once the reason it cannot listen is on stderr."""
    problem = _public_bind_problem(args.public_bind)
    if problem is not None:
        sys.stderr.write("tcprelay.relay: cannot listen on public ports at %s: %s (check "
                         "--public-bind)\n" % (args.public_bind, problem))
        return None
    try:
        return Relay((args.host, args.port), ports=ports, public_bind=args.public_bind,
                     public_host=args.public_host, max_services=args.max_services,
                     handshake_timeout=args.handshake_timeout,
                     drain_timeout=args.drain_timeout, lease_time=args.lease_time,
                     keepalive=args.keepalive, secret=secret, allow_from=args.allow_from,
                     tls_context=tls_context, max_waiting=args.max_waiting,
                     max_clients=args.max_clients, idle_timeout=args.idle_timeout,
                     registration_rate=args.registration_rate,
                     max_pending=args.max_pending,
                     max_pending_per_host=args.max_pending_per_host,
                     pump_idle_timeout=args.pump_idle_timeout,
                     public_allow=args.public_allow, group_keys=dict(args.group_key),
                     status_address=args.status, status_token=args.status_token,
                     access_log=args.access_log)
    except AccessLogError as exc:
        sys.stderr.write("tcprelay.relay: %s (check --access-log)\n" % exc.strerror)
        return None
    except StatusAddressError as exc:
        sys.stderr.write("tcprelay.relay: cannot serve --status on %s: %s\n"
                         % (addresses.join_host_port(*args.status), exc.strerror))
        return None
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
        return None


def _handle_signals(relay):
    """SIGINT and SIGTERM: the first drains the relay, the second cuts the drain
    short; SIGHUP reopens the access log file (only a flag: the next line reopens
    it). Returns the list the signals received are appended to."""
    if relay.access_log.file is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: relay.access_log.reopen())
    return cli.on_stop_signals(log, "shutting down", relay.shutdown, relay.cut_drain)


@cli.interruptible
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    ports, secret, tls_context = _settings(parser, args)
    previous = threading.stack_size(THREAD_STACK_SIZE)   # put back: main() may run in-process
    try:
        with scheduling.applied(args.cpu_policy, args.cpu):
            return _run(args, ports, secret, tls_context)
    finally:
        threading.stack_size(previous)


def _run(args, ports, secret, tls_context):
    relay = _start_relay(args, ports, secret, tls_context)
    if relay is None:
        return 1
    signalled = _handle_signals(relay)
    resources.prepare_descriptors(args.max_services, args.max_clients, args.max_waiting)
    log.info("listening for services on %s%s; public ports %s on %s",
             _address(relay.server_address), " (TLS)" if tls_context else "",
             relay.pool.describe(), args.public_bind or "all interfaces")
    if relay.status_server is not None:
        log.info("status page on %s (/status.json, /metrics)%s", relay.status_server.url,
                 "" if args.status_token else "; no token: anyone who can reach it can read it")
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
    # Run the module by its package name, not as __main__: its log lines then
    # say tcprelay.relay, and its classes exist once.
    from tcprelay.relay import main as _main
    sys.exit(_main())
