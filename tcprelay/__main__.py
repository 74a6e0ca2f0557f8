"""``python3 -m tcprelay``: there are three programs; say which."""

import sys

USAGE = """\
tcprelay is three programs (each takes --help; README.md shows them at work):
  the relay:
    python3 -m tcprelay.relay PORT [options]
  a service that echoes, the example:
    python3 -m tcprelay.echoserver RELAY_HOST RELAY_PORT [options]
  the adapter, for any TCP service:
    python3 -m tcprelay.adapter RELAY_HOST RELAY_PORT LOCAL_HOST:LOCAL_PORT [options]
and what a relay started with --status is doing, as tables:
    python3 -m tcprelay.status [URL] [--token-file PATH]
"""

if __name__ == "__main__":
    sys.stderr.write(USAGE)
    sys.exit(2)
