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
"""

import argparse
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
                 drain_timeout=DEFAULT_DRAIN_TIMEOUT, probe_local=False, **options):
        self.local_address = tuple(local_address)
        self._local_family = _numeric_family(self.local_address[0])   # None: a host name
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
            servicecli.AnnouncingServer.__init__(self, relay_address, None, **options)
        except BaseException:
            self._close_pumps()
            raise

    def registered(self, previous_address, connection):
        # Before the address is announced: a loop must not be handed out.
        loop = _same_place(self.local_address, connection.address)
        if loop:
            raise servicecli.StartError(
                "%s, the local service to expose, is this adapter's own public address "
                "(%s): each client would come back through the relay to a new client, "
                "for ever. Give the address of the service itself" % (self.local_label,
                                                                      connection.address))
        if self.probe_local and previous_address is None:
            _probe(self.local_address, min(self.local_connect_timeout, PROBE_TIMEOUT))
        servicecli.AnnouncingServer.registered(self, previous_address, connection)

    def process_request(self, request, client_address):
        self.workers.submit(self._join, request, client_address)

    def _join(self, stream, client_address):
        """Connect to the local service and pump until both directions end."""
        try:
            sock = self._connect_local()
        except OSError as exc:
            self._log_unreachable("cannot reach the local service at %s (%s); resetting the "
                                  "client's stream", self.local_label,
                                  getattr(exc, "strerror", None) or exc)
            stream.reset()
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s joined to %s on stream %d",
                      addresses.format_sockaddr(client_address), self.local_label, stream.id)
        bridge = Bridge(sock, stream, self.flusher, name="client stream %d" % stream.id)
        with self._bridges_lock:
            self._bridges.add(bridge)
        try:
            bridge.run()
        finally:
            with self._bridges_lock:
                self._bridges.discard(bridge)

    def _connect_local(self):
        """A connected socket to the local service; raises OSError."""
        timeout = min(self.local_connect_timeout, clock.MAX_TIMEOUT)
        if self._local_family is None:
            # A host name: resolved for each client, as its address may change.
            return socket.create_connection(self.local_address, timeout)
        # A numeric address: no resolver call per client.
        sock = socket.socket(self._local_family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.local_address)
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
    parser.add_argument("local", type=_host_port, metavar="LOCAL_HOST:LOCAL_PORT",
                        help="the service to expose, for example 127.0.0.1:5432")
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
        check_local(args.local)
        return Adapter((args.relay_host, args.relay_port), args.local,
                       connect_timeout=args.connect_timeout, proxy_protocol=proxy,
                       probe_local=True, **options)
    return servicecli.service_main("tcprelay.adapter", build_parser(), argv, make)


if __name__ == "__main__":
    # Run the module by its package name, not as __main__: its log lines then
    # say tcprelay.adapter, and its classes exist once.
    from tcprelay.adapter import main as _main
    sys.exit(_main())
