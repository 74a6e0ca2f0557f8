"""The example service: echoes every client's bytes back, through a relay.

    $ python3 -m tcprelay.echoserver localhost 8080
    127.0.0.1:8081            <- first line on stdout: the public address

It is a plain socketserver-style handler on ``tcprelay.service.RelayServer``;
read it as a template for your own service.
"""

import logging
import socketserver
import sys

from . import cli, servicecli
from .service import RelayServer

log = logging.getLogger(__name__)

BUFFER_SIZE = 512 * 1024   # one frame from the relay per recv when bulk data flows


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


class EchoServer(servicecli.AnnouncingServer):
    # The handler keeps no per-thread state, so threads can be reused
    # between clients: starting a thread per client costs more than an echo.
    reuse_threads = True


def build_parser():
    parser = servicecli.service_parser(
        "python3 -m tcprelay.echoserver",
        "Register with a relay and echo every client's bytes back. The first line on "
        "stdout is the public address clients connect to.")
    parser.set_defaults(name="echo")
    return parser


@cli.interruptible
def main(argv=None):
    return servicecli.service_main(
        "tcprelay.echoserver", build_parser(), argv,
        lambda args, **kw: EchoServer(servicecli.relay_address(args), EchoHandler, **kw))


if __name__ == "__main__":
    # Run the module by its package name, not as __main__: its log lines then
    # say tcprelay.echoserver, and its classes exist once.
    from tcprelay.echoserver import main as _main
    sys.exit(_main())
