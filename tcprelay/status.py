"""What a running relay is doing, in the terminal: its status endpoint's
``/status.json`` as tables (services, ports, clients, traffic, waiting).

    python3 -m tcprelay.status                        # http://127.0.0.1:8079/
    python3 -m tcprelay.status http://10.0.0.5:8079/ --token-file /etc/tcprelay/status.token

The relay must run with ``--status`` (and the token, if it has
``--status-token-file``: ``--token-file`` here, or $TCPRELAY_STATUS_TOKEN).
"""

import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from . import cli
from .statusserver import TokenError, load_token

DEFAULT_URL = "http://127.0.0.1:8079/"
TIMEOUT = 10.0


class StatusError(Exception):
    """The status could not be fetched; the message says what to do."""


def fetch(url, token=None, timeout=TIMEOUT):
    """``/status.json`` of the endpoint at ``url`` (its base, or any of its
    paths), as a dict. Raises StatusError."""
    if url.isdigit():
        url = "127.0.0.1:" + url   # a bare port, as --status takes one: loopback
    parts = urlsplit(url if "//" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusError("%s is not an http:// URL of a relay's --status endpoint" % url)
    json_url = urljoin("%s://%s/" % (parts.scheme, parts.netloc), "status.json")
    request = urllib.request.Request(json_url, headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status = json.loads(reply.read().decode("utf-8"))
        if not (isinstance(status, dict) and isinstance(status.get("relay"), dict)):
            raise ValueError("its answer is JSON, but not a relay's status")
        return status
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError("%s needs the status token: %s" % (
                json_url, "the one given was refused" if token is not None else
                "give --token-file (or set $TCPRELAY_STATUS_TOKEN)"))
        raise StatusError("%s answered %d %s" % (json_url, exc.code, exc.reason))
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise StatusError("cannot reach %s: connection refused; is the relay running "
                              "with --status %s?" % (json_url, parts.netloc))
        raise StatusError("cannot reach %s: %s" % (json_url, getattr(reason, "strerror", None)
                                                   or reason))
    except (socket.timeout, OSError) as exc:
        raise StatusError("cannot read %s: %s" % (json_url, exc))
    except http.client.HTTPException as exc:
        raise StatusError("%s is not a tcprelay status endpoint (it does not answer HTTP: "
                          "%s); give the address of the relay's --status" % (json_url, exc))
    except ValueError as exc:
        raise StatusError("%s is not a tcprelay status endpoint (%s)" % (json_url, exc))


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0
    return "%.1f TiB" % n


def _age(then, now):
    if then is None:
        return "-"
    seconds = max(0, int(now - then))
    if seconds < 120:
        return "%ds" % seconds
    if seconds < 7200:
        return "%dm" % (seconds // 60)
    if seconds < 172800:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd" % (seconds // 86400)


def table(headers, rows):
    """Rows of text as columns padded to fit, headers first (a list of lines)."""
    # A name is printable text by the protocol; a terminal is not trusted with it anyway.
    rows = [["".join(ch if ch.isprintable() else "?" for ch in str(c)) for c in row]
            for row in rows]
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return lines


def format_status(status, now=None):
    """``status`` (a /status.json dict) as the lines the terminal shows."""
    if now is None:   # the relay's clock: ages are right whatever ours says
        now = status["relay"].get("time", time.time())
    relay, pool = status["relay"], status["relay"]["pool"]
    lines = ["tcprelay %s on %s, up %s%s" % (relay["version"], relay["service_address"],
                                             _age(relay["started"], now),
                                             ", DRAINING" if relay["draining"] else ""),
             "ports %s: %d free of %d; %d clients; %s in, %s out" % (
                 pool["ports"], pool["free"], pool["size"], relay["clients"],
                 _size(relay["bytes_in"]), _size(relay["bytes_out"])),
             ""]
    services = status["services"]
    lines.append("services (%d)" % len(services))
    if services:
        lines += table(["port", "service", "public address", "since", "clients", "served",
                        "in", "out", "from"],
                       [[s["port"], s["name"] or "-", s["public_address"] or "-",
                         _age(s["since"], now), s["clients"], s["clients_served"],
                         _size(s["bytes_in"]), _size(s["bytes_out"]), s["remote_address"]]
                        for s in services])
    waiting = status["waiting"]
    lines += ["", "waiting (%d)" % len(waiting)]
    if waiting:
        lines += table(["#", "service", "port asked", "since", "from"],
                       [[w["position"], w["name"] or "-", w["requested_port"] or "any",
                         _age(w["since"], now), w["remote_address"]] for w in waiting])
    refusals = status["recent_refusals"]
    if refusals:
        lines += ["", "recent refusals"]
        lines += table(["ago", "what", "from", "why"],
                       [[_age(r["time"], now), r["kind"] + (" %s" % r["reason"]
                                                            if r["reason"] else ""),
                         r["host"], r["detail"]] for r in refusals])
    return lines


def build_parser():
    parser = cli.Parser(prog="python3 -m tcprelay.status",
                        description="Show what a relay is doing (its --status endpoint) "
                                    "as tables: services, ports, clients, traffic, waiting.")
    parser.add_argument("url", nargs="?", default=DEFAULT_URL,
                        help="the relay's status endpoint (default: %s)" % DEFAULT_URL)
    parser.add_argument("--token-file", metavar="PATH",
                        help="the token of the relay's --status-token-file "
                             "(or set $TCPRELAY_STATUS_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print /status.json as it is")
    return parser


@cli.interruptible
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        parser.error(str(exc))
    try:
        status = fetch(args.url, token)
    except StatusError as exc:
        sys.stderr.write("tcprelay.status: %s\n" % exc)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(status, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(format_status(status)) + "\n")
    return 0


if __name__ == "__main__":
    # Run the module by its package name, not as __main__: its log lines then
    # say tcprelay.status, and its classes exist once.
    from tcprelay.status import main as _main
    sys.exit(_main())
