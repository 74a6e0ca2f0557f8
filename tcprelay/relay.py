"""The relay: services dial in over muxado, clients reach them on public ports.

Placeholder until the relay lands: it parses its command line so that
``--help`` works, and refuses to run.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python3 -m tcprelay.relay",
        description="Relay TCP clients to services that dial in over muxado.",
    )
    parser.add_argument("port", type=int, help="port where services connect")
    return parser


def main(argv=None):
    build_parser().parse_args(argv)
    sys.stderr.write("tcprelay.relay: not implemented yet\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
