"""The example service: echoes every client's bytes back, through a relay.

    $ python3 -m tcprelay.echoserver localhost 8080
    localhost:8081            <- first line on stdout: the public address

It is a plain socketserver-style handler on ``tcprelay.service.RelayServer``;
read it as a template for your own service.
"""

import argparse
import logging
import signal
import socket
import socketserver
import sys
import threading

from .service import RegistrationRefused, RelayGone, RelayServer

log = logging.getLogger(__name__)

BUFFER_SIZE = 256 * 1024


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo each byte back as it arrives.

    ``self.request`` is a muxado stream, used exactly like a socket. When
    the client half-closes, ``recv`` returns b"" after the last byte; we
    have echoed everything by then, and RelayServer half-closes our side.
    """

    def handle(self):
        while True:
            data = self.request.recv(BUFFER_SIZE)
            if not data:
                return
            self.request.sendall(data)


class EchoServer(RelayServer):
    # The handler keeps no per-thread state, so threads can be reused
    # between clients: starting a thread per client costs more than an echo.
    reuse_threads = True


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def build_parser():
    parser = _Parser(
        prog="python3 -m tcprelay.echoserver",
        description="Register with a relay and echo every client's bytes back. The first "
                    "line on stdout is the public address clients connect to.",
    )
    parser.add_argument("relay_host", help="host name or address of the relay")
    parser.add_argument("relay_port", type=int, help="the relay's service port")
    parser.add_argument("--port", type=int, default=None,
                        help="ask the relay for this public port")
    parser.add_argument("--name", default="echo", help="our name in the relay's logs")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log to stderr (default: info)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    relay = "%s:%d" % (args.relay_host, args.relay_port)
    try:
        server = EchoServer((args.relay_host, args.relay_port), EchoHandler,
                             port=args.port, name=args.name)
    except RegistrationRefused as exc:
        sys.stderr.write("tcprelay.echoserver: the relay at %s refused us: %s\n"
                         % (relay, exc.reason))
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write("tcprelay.echoserver: cannot register with the relay at %s: %s\n"
                         % (relay, getattr(exc, "strerror", None) or exc))
        return 1
    sys.stdout.write(server.public_address + "\n")
    sys.stdout.flush()

    def stop(signum, frame):
        log.info("%s received; stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, name="shutdown").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    try:
        server.serve_forever()
    except RelayGone as exc:
        sys.stderr.write("tcprelay.echoserver: lost the relay at %s: %s\n" % (relay, exc))
        status = 1
    finally:
        server.connection.close()   # ends clients still connected
        server.server_close()
    return status


if __name__ == "__main__":
    sys.exit(main())
