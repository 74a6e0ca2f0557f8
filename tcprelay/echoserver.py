"""The example service: echoes every client's bytes back through the relay.

Placeholder until the relay lands.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python3 -m tcprelay.echoserver",
        description="Register with a relay and echo every client's bytes back.",
    )
    parser.add_argument("relay_host", help="host name of the relay")
    parser.add_argument("relay_port", type=int, help="the relay's service port")
    return parser


def main(argv=None):
    build_parser().parse_args(argv)
    sys.stderr.write("tcprelay.echoserver: not implemented yet\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
