"""The adapter: put an unmodified TCP service (a database, sshd, an HTTP
server) behind a relay.

    $ python3 -m tcprelay.adapter relay.example 8080 127.0.0.1:5432
    203.0.113.5:8081          <- first line on stdout: the public address
                                 (relay.example:8081 if the relay has --public-host)

Every client's stream from the relay is joined to a new connection to the
local service, both ways, with half-close and resets carried across. It
reconnects to the relay when it goes away and keeps its port while the
lease holds. With --proxy-protocol the relay starts each stream with the
client's address, and the adapter passes that header on to the backend
(nginx, HAProxy and others read it).

Several services on one connection, each with a public port of its own
(docs/PROTOCOL.md, 2.11): give several targets, or ``--config FILE``; it
prints one ``name address`` line per tunnel.

    $ python3 -m tcprelay.adapter relay.example 8080 127.0.0.1:5432 127.0.0.1:6379
    127.0.0.1:5432 203.0.113.5:8081
    127.0.0.1:6379 203.0.113.5:8082

The config file has one section per tunnel, named by it: ``local`` (required,
``HOST:PORT``), ``port`` (the public port wanted) and ``proxy_protocol``
(``none``, ``v1``, ``v2``).
"""

import argparse
import collections
import configparser
import functools
import ipaddress
import logging
import socket
import sys
import threading
import time

from . import addresses, cli, clock, limits, servicecli
from .bridge import Bridge, Flusher
from .workers import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 1.0   # seconds the start-up check of the local service waits, at most
DEFAULT_DRAIN_TIMEOUT = 5.0   # seconds a local service gets to take a finished stream at close


class Adapter(servicecli.AnnouncingServer):
    """A RelayServer whose clients are joined to a local TCP service."""

    consume_proxy_header = False   # the backend reads it, not us

    def __init__(self, relay_address, local_address, connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                 drain_timeout=DEFAULT_DRAIN_TIMEOUT, probe_local=False, targets=None,
                 **options):
        # Several tunnels: targets is {name: {"local": (host, port), "port": public
        # port or None, "proxy_protocol": None, "v1" or "v2"}}, and local_address unused.
        self.targets = None if targets is None else collections.OrderedDict(
            (name, tuple(target["local"])) for name, target in targets.items())
        handlers = None
        if targets is not None:
            handlers = collections.OrderedDict((name, None) for name in targets)
            options["tunnel_options"] = dict(
                (name, dict((k, target[k]) for k in ("port", "proxy_protocol")
                            if target.get(k) is not None)) for name, target in targets.items())
            local_address = next(iter(self.targets.values()))
        self.local_address = tuple(local_address)
        self._families = dict((local, _numeric_family(local[0]))   # None: a host name
                              for local in self._locals())
        self.probe_local = probe_local   # try the local service once, at the first registration
        self.local_label = addresses.format_sockaddr(self.local_address)
        self.local_connect_timeout = connect_timeout
        self._log_unreachable = limits.LogGate(log)   # once a second, however many clients
        self.drain_timeout = drain_timeout
        self._bridges = set()
        self._bridges_lock = threading.Lock()
        self._drain_cut = False   # cut_close(): reset what the local service has not taken
        self.flusher = Flusher(name="adapter-flusher")
        self.workers = WorkerPool(name="adapter-pump")
        try:
            servicecli.AnnouncingServer.__init__(self, relay_address, handlers, **options)
        except BaseException:
            self._close_pumps()
            raise

    def _locals(self):
        return list(self.targets.values()) if self.targets is not None else [self.local_address]

    def registered(self, previous_address, connection):
        # Before the address is announced: a loop must not be handed out.
        publics = [connection.address] if connection.tunnels is None else \
            [t.address for t in connection.tunnels.values()]
        for local in self._locals():
            for public in publics:
                if _same_place(local, public):
                    raise servicecli.StartError(
                        "%s, the local service to expose, is this adapter's own public address "
                        "(%s): each client would come back through the relay to a new client, "
                        "for ever. Give the address of the service itself"
                        % (addresses.format_sockaddr(local), public))
        if self.probe_local and previous_address is None:
            for local in self._locals():
                _probe(local, min(self.local_connect_timeout, PROBE_TIMEOUT))
        servicecli.AnnouncingServer.registered(self, previous_address, connection)

    def process_request(self, request, client_address):
        self.workers.submit(self._join, request, client_address)

    def _join(self, stream, client_address):
        """Connect to the local service and pump until both directions end."""
        local = self.local_address if self.targets is None else self.targets[stream.tunnel]
        try:
            sock = self._connect_local(local)
        except OSError as exc:
            self._log_unreachable("cannot reach the local service at %s (%s); resetting the "
                                  "client's stream", addresses.format_sockaddr(local),
                                  getattr(exc, "strerror", None) or exc)
            stream.reset()
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s joined to %s on stream %d",
                      addresses.format_sockaddr(client_address),
                      addresses.format_sockaddr(local), stream.id)
        bridge = Bridge(sock, stream, self.flusher, name="client stream %d" % stream.id)
        with self._bridges_lock:
            self._bridges.add(bridge)
        try:
            bridge.run()
        finally:
            with self._bridges_lock:
                self._bridges.discard(bridge)

    def _connect_local(self, local):
        """A connected socket to the local service at ``local``; raises OSError."""
        timeout = min(self.local_connect_timeout, clock.MAX_TIMEOUT)
        family = self._families[local]
        if family is None:
            # A host name: resolved for each client, as its address may change.
            return socket.create_connection(local, timeout)
        # A numeric address: no resolver call per client.
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(local)
        except BaseException:
            sock.close()
            raise
        return sock

    def server_close(self):
        servicecli.AnnouncingServer.server_close(self)
        self._close_pumps()

    def cut_close(self):
        """Stop waiting for the local service at close: reset every client now."""
        with self._bridges_lock:
            self._drain_cut = True
            bridges = list(self._bridges)
        servicecli.AnnouncingServer.cut_close(self)
        for bridge in bridges:
            bridge.abort("quitting at once")

    def _close_pumps(self):
        # The relay's session has ended: a stream the relay had finished is
        # still delivered, but a local service that does not take it within
        # drain_timeout is reset (else close would wait on it for ever).
        with self._bridges_lock:
            bridges = list(self._bridges)
            cut = self._drain_cut
        if cut:
            for bridge in bridges:
                bridge.abort("quitting at once")
        end = time.monotonic() + self.drain_timeout
        waiting = [bridge for bridge in bridges if not bridge.join(0)]
        if waiting and not cut:
            log.info("giving the local service up to %gs to take the last bytes of %d "
                     "client streams (a second SIGINT or SIGTERM quits at once)",
                     self.drain_timeout, len(waiting))
        for bridge in waiting:
            if not bridge.join(max(0.0, end - time.monotonic())):
                log.info("the local service did not take stream %d's last bytes within %gs; "
                         "resetting it", bridge.stream.id, self.drain_timeout)
                bridge.abort("closing, and the local service stopped reading")
        self.workers.close()
        self.flusher.close()


def _numeric_family(host):
    """AF_INET or AF_INET6 for a numeric address, None for a host name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _resolve(host, port):
    """The set of (address, port) ``host`` resolves to; raises OSError or
    UnicodeError (a name that cannot be one)."""
    return set((info[4][0], info[4][1])
               for info in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))


def _this_machine(address):
    """True for an address that reaches this machine whatever its interfaces:
    loopback, or the unspecified address (connect() takes it as loopback)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _same_place(local, public):
    """True if ``local`` (host, port) and the public ``host:port`` name the same
    listener (a name that does not resolve here: False)."""
    host, _, port = public.rpartition(":")
    try:
        theirs = _resolve(host.strip("[]"), int(port))
        ours = _resolve(*local)
    except (OSError, ValueError):
        return False
    if ours & theirs:
        return True
    return any(_this_machine(a) and p == local[1] for a, p in theirs) and \
        any(_this_machine(a) for a, _ in ours)


def check_local(local):
    """At start: raise ``servicecli.StartError`` if the local service's name does not resolve."""
    try:
        _resolve(*local)
    except (OSError, UnicodeError) as exc:
        raise servicecli.StartError("cannot resolve the local service %s: %s (check "
                                    "LOCAL_HOST:LOCAL_PORT)" % (addresses.join_host_port(*local),
                                                         getattr(exc, "strerror", None) or exc))


def _probe(local, timeout):
    """Warn if the local service does not take a connection (it may start later)."""
    try:
        probe = socket.create_connection(local, timeout)
    except OSError as exc:
        log.warning("cannot connect to the local service at %s (%s): clients will be "
                    "reset until it accepts connections", addresses.join_host_port(*local),
                    getattr(exc, "strerror", None) or exc)
    else:
        probe.close()


def _host_port(text):
    try:
        return addresses.split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def build_parser():
    parser = servicecli.service_parser(
        "python3 -m tcprelay.adapter",
        "Expose a local TCP service through a relay. The first line on stdout is the "
        "public address clients connect to.")
    parser.add_argument("local", type=_host_port, metavar="LOCAL_HOST:LOCAL_PORT", nargs="?",
                        help="the service to expose, for example 127.0.0.1:5432; give "
                             "several to share one connection, each with a public port of "
                             "its own, named by this text")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the services to expose, one section per tunnel (its name): "
                             "local = HOST:PORT, and optionally port and proxy_protocol")
    parser.parse_args = functools.partial(_parse_args, parser)
    parser.add_argument("--proxy-protocol", choices=["none", "v1", "v2"], default="none",
                        help="start each connection to the local service with a PROXY "
                             "protocol header carrying the client's address, for backends "
                             "that read it (nginx, HAProxy) (default: none)")
    parser.add_argument("--connect-timeout", type=cli.positive(float),
                        default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                        help="give up on connecting to the local service after this long; "
                             "the client is reset (default: 5)")
    return parser


@cli.interruptible
def main(argv=None):
    def make(args, **options):
        proxy = None if args.proxy_protocol == "none" else args.proxy_protocol
        targets = args.targets
        for target in targets.values():
            check_local(target["local"])
        if len(targets) > 1:
            return Adapter(servicecli.relay_address(args), None, targets=targets,
                           connect_timeout=args.connect_timeout, probe_local=True, **options)
        (name, target), = targets.items()
        if args.config is not None:   # one section: the one-tunnel form, named by it
            options.update(name=options.get("name") or name,
                           port=target.get("port") or options.get("port"))
            proxy = target.get("proxy_protocol")
        return Adapter(servicecli.relay_address(args), target["local"],
                       connect_timeout=args.connect_timeout, proxy_protocol=proxy,
                       probe_local=True, **options)
    return servicecli.service_main("tcprelay.adapter", build_parser(), argv, make)


def _parse_args(parser, argv=None, namespace=None):
    """``parser.parse_args``, which also takes further targets anywhere among the
    options (argparse takes a list of positionals in one place only): sets
    ``args.targets`` (``_targets``); ``args.local`` is the first target."""
    args, extra = parser.parse_known_args(argv, namespace)
    locals_given = [args.local] if args.local is not None else []
    for text in extra:
        if text.startswith("-"):
            parser.error("unrecognized arguments: %s" % " ".join(extra))
        try:
            locals_given.append(_host_port(text))
        except argparse.ArgumentTypeError as exc:
            parser.error("argument LOCAL_HOST:LOCAL_PORT: %s" % exc)
    args.local = locals_given[0] if locals_given else None
    _targets(parser, args, locals_given)
    return args


def _targets(parser, args, locals_given):
    """args.targets: {name: {"local", "port", "proxy_protocol"}} from the
    command line's targets or --config (parser.error if wrong)."""
    if bool(locals_given) == (args.config is not None):
        parser.error("give the service to expose (LOCAL_HOST:LOCAL_PORT, one or more) "
                     "or --config FILE, one of the two")
    if args.config is None:
        if len(locals_given) > 1 and args.port is not None:
            parser.error("--port is for one service: with several, use --config and give "
                         "each section its port")
        proxy = None if args.proxy_protocol == "none" else args.proxy_protocol
        args.targets = collections.OrderedDict(
            (addresses.join_host_port(*local), {"local": local, "proxy_protocol": proxy})
            for local in locals_given)
        if len(args.targets) != len(locals_given):
            parser.error("the same service is given twice")
        return
    try:
        args.targets = read_config(args.config)
    except (OSError, ValueError, configparser.Error) as exc:
        parser.error("--config %s: %s" % (args.config, exc))


def read_config(path):
    """The tunnels in the config file at ``path``: {section name: {"local": (host,
    port), "port": int or None, "proxy_protocol": None, "v1" or "v2"}}, in order.
    Raises OSError, configparser.Error, or ValueError saying what is wrong."""
    config = configparser.ConfigParser()
    with open(path, encoding="utf-8") as f:
        config.read_file(f)
    targets = collections.OrderedDict()
    for name in config.sections():
        section = config[name]
        unknown = sorted(set(section) - {"local", "port", "proxy_protocol"})
        if unknown or "local" not in section:
            raise ValueError("section [%s] needs local = HOST:PORT, and takes port and "
                             "proxy_protocol only%s" % (name, " (not %s)" % ", ".join(unknown)
                                                        if unknown else ""))
        proxy = section.get("proxy_protocol", "none")
        if proxy not in ("none", "v1", "v2"):
            raise ValueError("section [%s]: proxy_protocol is none, v1 or v2" % name)
        port = section.getint("port") if "port" in section else None
        if port is not None and not 0 < port < 65536:
            raise ValueError("section [%s]: port %d is no port" % (name, port))
        targets[name] = {"local": addresses.split_host_port(section["local"]), "port": port,
                         "proxy_protocol": None if proxy == "none" else proxy}
    if not targets:
        raise ValueError("no section: give one per service to expose")
    return targets


if __name__ == "__main__":
    # Run the module by its package name, not as __main__: its log lines then
    # say tcprelay.adapter, and its classes exist once.
    from tcprelay.adapter import main as _main
    sys.exit(_main())
