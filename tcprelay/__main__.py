"""``python3 -m tcprelay``: there are three programs; say which."""

import sys

USAGE = """\
tcprelay is three programs:
  python3 -m tcprelay.relay PORT [options]                                           the relay
  python3 -m tcprelay.echoserver RELAY_HOST RELAY_PORT [options]                     an example service
  python3 -m tcprelay.adapter RELAY_HOST RELAY_PORT LOCAL_HOST:LOCAL_PORT [options]  any TCP service
Each takes --help. README.md shows them at work.
"""

if __name__ == "__main__":
    sys.stderr.write(USAGE)
    sys.exit(2)
