"""The life of a service process (``tcprelay.echoserver``, ``tcprelay.adapter``):
its options, register, print the address, serve, stop."""

import argparse
import logging
import socket
import sys

from . import addresses, auth, registration, scheduling, tls
from .cli import (LOG_LEVELS, Parser, configure_logging, network, on_stop_signals,
                  port_number, positive)
from .muxado import MuxadoError
from .registration import MAX_WAIT, RegistrationError
from .service import (DEFAULT_TIMEOUT, NeedsExtendedForm, RegistrationRefused, RelayGone,
                      RelayServer, ServicePortError)

# The service programs' lines have always come from "tcprelay.cli" (their log
# format names it); they still do.
log = logging.getLogger("tcprelay.cli")


class StartError(Exception):
    """A service program cannot go on; the message says why and what to do
    (``run_service`` prints it as one line, exit code 1)."""


def max_wait_seconds(text):
    """--max-wait: seconds (float), 0 or more, at most what a relay takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError("%r is not a finite number (leave --max-wait out "
                                         "to wait for as long as it takes)" % text)
    if not 0 <= value <= MAX_WAIT:
        raise argparse.ArgumentTypeError("%r must be from 0 (fail at once) to %d seconds"
                                         % (text, MAX_WAIT))
    return value


def _relay_host(text):
    host_port = addresses.with_port(text)
    if host_port is not None:
        raise argparse.ArgumentTypeError(
            "%r is HOST:PORT; give the relay's host and its port as two arguments: %s %d"
            % ((text, addresses.bracketed(host_port[0])) + host_port[1:]))
    try:
        return addresses.host_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


# Stands for the relay positionals when --relay is given, so that the further
# positionals (the adapter's services) are not taken for them.
_NO_POSITIONAL = "\0"


def _or_none_given(parse):
    return lambda text: text if text == _NO_POSITIONAL else parse(text)


def _relay_option(text):
    """--relay HOST:PORT: (host, port)."""
    host_port = addresses.with_port(text)
    if host_port is None:
        raise argparse.ArgumentTypeError("%r is not HOST:PORT (a relay's host and its service "
                                         "port, such as relay-a:8080 or [::1]:8080)" % text)
    try:
        return addresses.host_option(host_port[0]), port_number(str(host_port[1]))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError("--relay %s: %s" % (text, exc))


class ServiceParser(Parser):
    """A service program's parser: the relay as ``RELAY_HOST RELAY_PORT`` or as
    ``--relay HOST:PORT``, repeatable; sets ``args.relays``, a list of (host,
    port), and ``relay_host``/``relay_port`` to the first's."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        options = any(a == "--relay" or a.startswith("--relay=") for a in args)
        if options:   # take the relay positionals' places; any further positionals follow
            args = [_NO_POSITIONAL, _NO_POSITIONAL] + args
        parsed, extra = Parser.parse_known_args(self, args, namespace)
        positional = [parsed.relay_host, parsed.relay_port]
        if options:
            if any(text != _NO_POSITIONAL for text in positional) or (
                    not hasattr(parsed, "local") and
                    any(not text.startswith("-") for text in extra)):
                self.error("give the relay either as RELAY_HOST RELAY_PORT or with --relay "
                           "HOST:PORT (repeatable), not both")
            parsed.relays = list(parsed.relay)
        elif parsed.relay_host is None:
            self.error("give the relay: RELAY_HOST RELAY_PORT, or --relay HOST:PORT for each "
                       "of several")
        elif parsed.relay_port is None:
            self.error("give the relay's port after its host, %s: RELAY_HOST RELAY_PORT"
                       % parsed.relay_host)
        else:
            parsed.relays = [(parsed.relay_host, parsed.relay_port)]
        parsed.relay_host, parsed.relay_port = parsed.relays[0]
        return parsed, extra


def relay_address(args):
    """What RelayServer takes for the relays of ``args``: (host, port) for one,
    a list of them for several."""
    return args.relays[0] if len(args.relays) == 1 else list(args.relays)


def _service_name(text):
    # The relay's rule, checked here: else the relay refuses it after we connect.
    if not text or len(text) > registration.MAX_NAME or not text.isprintable():
        raise argparse.ArgumentTypeError("%r must be printable text of 1 to %d characters"
                                         % (text[:registration.MAX_NAME + 1],
                                            registration.MAX_NAME))
    return text


SECURITY_GROUP = "a relay with a secret or TLS (docs/SECURITY.md)"


def _add_relay_arguments(parser):
    """The relay, as RELAY_HOST RELAY_PORT or --relay HOST:PORT (see ServiceParser)."""
    parser.add_argument("relay_host", type=_or_none_given(_relay_host), nargs="?",
                        help="host name or address of the relay (IPv6 with or without "
                             "brackets)")
    parser.add_argument("relay_port", type=_or_none_given(port_number), nargs="?",
                        help="the relay's service port")
    parser.add_argument("--relay", action="append", type=_relay_option, metavar="HOST:PORT",
                        help="instead of RELAY_HOST RELAY_PORT: a relay's host and service "
                             "port; repeat it to register with several relays, each asked "
                             "for the same public port (--port, else the first relay's). "
                             "stdout then has one line per relay: 'HOST:PORT PUBLIC_ADDRESS' "
                             "(docs/DEPLOY.md)")


def service_parser(prog, description):
    """The options every service program takes."""
    parser = ServiceParser(prog=prog, description=description)
    _add_relay_arguments(parser)
    parser.add_argument("--port", type=port_number, default=None,
                        help="ask the relay for this public port (wait until it is free)")
    parser.add_argument("--max-wait", type=max_wait_seconds, default=None, metavar="SECONDS",
                        help="give up (exit 1) when the relay has no port for us within this "
                             "time: every public port taken, or the --port asked for held by "
                             "another service; 0 fails at once. It bounds every "
                             "registration, reconnects included (default: wait for as long "
                             "as it takes)")
    parser.add_argument("--name", default=None, type=_service_name,
                        help="our name in the relay's logs (printable, up to %d characters)"
                             % registration.MAX_NAME)
    parser.add_argument("--allow-client", action="append", default=None, metavar="CIDR",
                        type=network,
                        help="only clients from networks like this may reach us: the "
                             "relay resets the others; repeatable (default: any)")
    parser.add_argument("--retry", action="store_true",
                        help="keep trying if the relay cannot be reached at first "
                             "(by default that is an error at once)")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="exit when the relay goes away, instead of reconnecting "
                             "(with backoff, keeping the port while the lease holds)")
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT,
                        metavar="SECONDS",
                        help="give up on a relay that does not answer within this time "
                             "(connecting, each step of registering; in line, a relay "
                             "that stops saying we are waiting) (default: %g)"
                             % DEFAULT_TIMEOUT)
    parser.add_argument("--minimal", action="store_true",
                        help="register in the minimal form, for a relay that speaks only "
                             "that (no leases, heartbeat, PROXY headers or notices; "
                             "docs/PROTOCOL.md 2.1). Without it such a relay is found out "
                             "within 2 s, with a warning")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="how much to log to stderr (default: info)")
    scheduling.add_options(parser)
    security = parser.add_argument_group(SECURITY_GROUP)
    security.add_argument("--secret-file", metavar="PATH",
                          help="the relay's shared secret, to answer its challenge "
                               "(or set $TCPRELAY_SECRET)")
    security.add_argument("--tls", action="store_true", help="connect to the relay with TLS")
    _add_group_options(parser)
    security.add_argument("--tls-ca", metavar="FILE",
                          help="trust the relay's certificate if this CA signed it "
                               "(default: the system's store)")
    security.add_argument("--tls-insecure", action="store_true",
                          help="do not verify the relay's certificate (logs a warning; for "
                               "testing only)")
    return parser


def _add_group_options(parser):
    group = parser.add_argument_group("replicas behind one public port (docs/PROTOCOL.md, 2.9)")
    group.add_argument("--group", default=None, type=_service_name, metavar="NAME",
                       help="share the public port of group NAME with its other members; "
                            "the relay gives each new client to the member with the fewest")
    group.add_argument("--group-key-file", metavar="PATH",
                       help="the group's key (the relay's operator has the same: "
                            "--group-key NAME=PATH)")
    group.add_argument("--health-interval", type=positive(float), default=None,
                       metavar="SECONDS",
                       help="ask the relay to check us this often; after --health-failures "
                            "unanswered checks in a row we get no new clients until we "
                            "answer again (default: no checks)")
    group.add_argument("--health-failures", type=positive(int),
                       default=registration.DEFAULT_HEALTH_FAILURES, metavar="N",
                       help="see --health-interval (default: %d)"
                            % registration.DEFAULT_HEALTH_FAILURES)


def group_options(parser, args):
    """``group=``, ``group_key=`` and ``health=`` for connect(), from the parsed
    options (exits on error); {} without --group."""
    if args.group is None:
        if args.group_key_file or args.health_interval is not None:
            parser.error("--group-key-file and --health-interval need --group")
        return {}
    if not args.group_key_file:
        parser.error("--group needs --group-key-file")
    try:
        key = auth.load_secret(args.group_key_file)
    except auth.SecretError as exc:
        parser.error(str(exc).replace("secret", "group key"))
    options = {"group": args.group, "group_key": key}
    if args.health_interval is not None:
        if not registration.MIN_HEALTH_INTERVAL <= args.health_interval \
                <= registration.MAX_HEALTH_INTERVAL:
            parser.error("--health-interval must be from %g to %d seconds"
                         % (registration.MIN_HEALTH_INTERVAL, registration.MAX_HEALTH_INTERVAL))
        options["health"] = {"interval": args.health_interval,
                             "failures": args.health_failures}
    return options


def security_options(parser, args):
    """``secret=`` and ``tls=`` for connect(), from the parsed options (exits on error)."""
    try:
        secret = auth.load_secret(args.secret_file)
    except auth.SecretError as exc:
        parser.error(str(exc))
    context = None
    if args.tls or args.tls_ca or args.tls_insecure:
        try:
            context = tls.client_context(args.tls_ca, insecure=args.tls_insecure)
        except (OSError, ValueError) as exc:
            parser.error("cannot load the TLS CA file: %s" % exc)
    return {"secret": secret, "tls": context}


class AnnouncingServer(RelayServer):
    """Prints the public address on stdout: first, and again if it changes.
    With several relays each line is "RELAY PUBLIC_ADDRESS" (RELAY as host:port)."""

    def leave_relay(self):
        """End our sessions with the relay (with every relay), the current one and
        any the relay is leaving (after its GOAWAY): every client still connected
        is ended."""
        self._stop_registering()
        for server in [self] + list(self.relay_sessions or ()):
            with server._attempt_lock:
                connection = server.connection
            with server._threads_lock:
                retired = list(server._retired)
            for each in [connection] + retired:
                if each is not None:
                    each.close()

    def cut_close(self):
        """Make the close under way (or to come) end at once: a second signal.
        Subclasses that wait for more at close stop waiting too."""
        self.leave_relay()

    def registered(self, previous_address, connection):
        RelayServer.registered(self, previous_address, connection)
        relay = connection.relay + " " if self.relay_sessions is not None else ""
        if connection.tunnels is not None:
            # One "name address" line per tunnel: all of them first, then those that changed.
            lines = ["%s%s %s\n" % (relay, t.name, t.address)
                     for t in connection.tunnels.values()]
            new = [line for line in lines if line not in self._announced.get(relay, ())]
            announced = dict(self._announced)
            announced[relay] = set(lines)
            self._announced = announced
            if new:
                sys.stdout.write("".join(new))
                sys.stdout.flush()
        elif connection.address != previous_address:
            sys.stdout.write(relay + connection.address + "\n")
            sys.stdout.flush()

    # {relay prefix: the "name address" lines printed last} (several tunnels); replaced, not changed
    _announced = {}


def service_main(prog, parser, argv, make_server):
    """A service program's main(): parse, set up logging and security, run.

    ``make_server(args, **options)`` builds the server (an ``AnnouncingServer``);
    returns the exit code.
    """
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    security = security_options(parser, args)
    security.update(group_options(parser, args))
    if args.minimal:
        option = _extended_only(args, security["secret"])
        if option is not None:
            parser.error("%s needs the extended registration form: it cannot be used with "
                         "--minimal" % option)
    with scheduling.applied(args.cpu_policy, args.cpu):
        return run_service(prog, args, lambda **kw: make_server(args, **kw), **security)


def _extended_only(args, secret):
    """The first option given that only the extended form carries, as the user
    gave it (None if none): the minimal form cannot carry it."""
    if args.port is not None:
        return "--port"
    if getattr(args, "proxy_protocol", "none") != "none":
        return "--proxy-protocol"
    if secret is not None:
        return "--secret-file" if args.secret_file else "$%s" % auth.SECRET_ENV
    if getattr(args, "allow_client", None):
        return "--allow-client"
    if getattr(args, "group", None) is not None:
        return "--group"
    if len(getattr(args, "targets", None) or ()) > 1:
        return "several services on one connection"
    return None


def _refusal_hint(exc, args):
    """What to try when the relay refused us (may be empty)."""
    if not (exc.in_line and args.max_wait is not None):
        return ""
    hint = (" (--max-wait %g: give a longer one, or leave it out to wait for as long as "
            "it takes" % args.max_wait)
    if args.port is not None:
        hint += "; without --port any free port will do"
    return hint + ")"


def _registration_hint(exc, args):
    """What to try when registering failed with ``exc`` (may be empty)."""
    retry = "" if args.retry else "; --retry keeps trying"
    if isinstance(exc, ServicePortError):
        return ""   # it says what to try
    if isinstance(exc, socket.gaierror):
        return " (check the relay's host name, %r: this machine cannot resolve it)" \
            % args.relay_host
    if isinstance(exc, socket.timeout):
        return (" (is the relay's address right, and %s its service port, not a public "
                "port? --timeout waits longer)"
                % addresses.join_host_port(args.relay_host, args.relay_port))
    if isinstance(exc, ConnectionRefusedError) and not isinstance(exc, MuxadoError):
        return " (is the relay running on that port?%s)" % (" --retry keeps trying" if not args.retry else "")
    if isinstance(exc, (ConnectionError, MuxadoError, RegistrationError)):
        return (" (the relay may be busy or refusing this address, it may require --tls, "
                "or %s may not be a tcprelay service port%s)"
                % (addresses.join_host_port(args.relay_host, args.relay_port), retry))
    return ""


def run_service(prog, args, make_server, **server_options):
    """Register, serve until a signal or (without reconnecting) the relay goes; exit code.

    SIGINT and SIGTERM stop it at any stage (connecting, waiting in line,
    backing off, serving) within about a second, with exit code 0; clients
    still connected are ended. A second signal while it stops (the adapter
    gives a local service time to take its last bytes) quits at once, exit
    code 130.
    """
    relay = ", ".join(addresses.join_host_port(*each) for each in args.relays)
    try:
        server = make_server(port=args.port, name=args.name, retry=args.retry,
                             timeout=args.timeout, max_wait=args.max_wait,
                             allow_clients=args.allow_client, minimal=args.minimal,
                             bind_and_activate=False, **server_options)
    except StartError as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return 1
    signalled = on_stop_signals(log, "stopping", server.shutdown, server.cut_close)
    status = 0
    try:
        server.server_activate()
        server.serve_forever(reconnect=not args.no_reconnect)
    except NeedsExtendedForm:
        sys.stderr.write("%s: the relay at %s speaks only the minimal registration form, which "
                         "cannot carry %s: leave it out, or use a relay that speaks the "
                         "extended form\n" % (prog, relay, _extended_only(
                             args, server_options.get("secret"))))
        status = 1
    except RegistrationRefused as exc:
        sys.stderr.write("%s: the relay at %s refused us: %s%s\n"
                         % (prog, relay, exc.reason, _refusal_hint(exc, args)))
        status = 1
    except StartError as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        status = 1
    except RelayGone as exc:
        if server.public_address is not None and not signalled and not server.shutdown_requested:
            sys.stderr.write("%s: lost the relay at %s: %s\n" % (prog, relay, exc))
            status = 1
    except (OSError, ValueError, RegistrationError) as exc:
        sys.stderr.write("%s: cannot register with the relay at %s: %s%s\n"
                         % (prog, relay, getattr(exc, "strerror", None) or exc,
                            _registration_hint(exc, args)))
        status = 1
    finally:
        server.leave_relay()   # ends clients still connected, on every session
        server.server_close()
    if signalled:
        log.info("stopped")
    return 130 if len(signalled) > 1 else status
