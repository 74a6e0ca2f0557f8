"""The relay's status endpoint over HTTP (``--status``): ``StatusServer``.

    GET /             the status page (statuspage.py): HTML, its script fetches
                      /status.json every 2 s
    GET /status.json  ``relaystatus.snapshot`` as JSON
    GET /metrics      the same as Prometheus text (metrics.py)

Parsing and replies are ``http.server``'s; the accept loop is ours, so that
a slow or hostile HTTP client cannot harm relaying nor take the endpoint
for long: at most ``max_handlers`` connections are served at once (one
thread each; more get a 503 at once), and each has ``request_timeout``
seconds in all to send its request (not per byte: one header byte a second
does not keep a thread) and as long for each write of the reply. One
request per connection (HTTP/1.0).

With a token every path needs ``Authorization: Bearer <token>`` (401 and
``WWW-Authenticate: Bearer`` otherwise); ``/`` also takes ``?token=`` so that
a browser can open the page (docs/SECURITY.md).
"""

import hmac
import http.server
import io
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

from . import __version__, addresses, clock, metrics, statuspage

# The relay's lines: operators know them by this name.
log = logging.getLogger("tcprelay.relay")

DEFAULT_MAX_HANDLERS = 8
DEFAULT_REQUEST_TIMEOUT = 5.0
TOKEN_ENV = "TCPRELAY_STATUS_TOKEN"
_BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n")


class TokenError(Exception):
    """The status token could not be read, or is unusable."""


def load_token(path=None, environ=None):
    """The token (str) from ``path``, else $TCPRELAY_STATUS_TOKEN, else None.
    Surrounding whitespace is not part of it. Raises TokenError."""
    environ = os.environ if environ is None else environ
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise TokenError("cannot read the status token file %s: %s"
                             % (path, exc.strerror or exc))
        where = "the status token file %s" % path
    else:
        value = environ.get(TOKEN_ENV)
        if value is None:
            return None
        raw, where = value.encode("utf-8", "surrogateescape"), "$%s" % TOKEN_ENV
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError("%s is not ASCII text (a header carries the token)" % where)
    if not token or any(c.isspace() or ord(c) < 32 for c in token):
        raise TokenError("%s must hold one word, with no spaces" % where)
    return token


class StatusAddressError(OSError):
    """The status endpoint cannot listen on the address given (``--status``)."""


class StatusServer(object):
    """Serves ``snapshot()`` (a function returning ``relaystatus.snapshot``'s
    dict) on ``address`` ``(host, port)``; port 0 picks one (see
    ``server_address``). ``token``: str or None. Raises StatusAddressError if
    the address cannot be bound. ``start()`` serves on a thread of its own;
    ``close()`` stops it and every handler, and waits for their threads."""

    def __init__(self, address, snapshot, token=None, max_handlers=DEFAULT_MAX_HANDLERS,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT):
        host, port = address[:2]
        self.snapshot = snapshot
        self.token = token
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._lock = threading.Lock()
        self._handlers = {}   # thread -> its connection
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                       socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(64)
        except (OSError, OverflowError) as exc:
            self._listener.close()
            raise StatusAddressError(getattr(exc, "errno", None),
                                     getattr(exc, "strerror", None) or str(exc))
        self.server_address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="status %s"
                                        % addresses.format_sockaddr(self.server_address))
        self._thread.daemon = True

    @property
    def url(self):
        return "http://%s/" % addresses.format_sockaddr(self.server_address)

    def start(self):
        self._thread.start()

    def close(self):
        """Stop accepting, cut every open connection, and wait for the threads."""
        self._closing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        if self._thread.ident is not None:
            self._thread.join()
        self._listener.close()
        with self._lock:
            handlers = dict(self._handlers)
        for conn in handlers.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in handlers:
            thread.join()

    def _serve(self):
        while not self._closing.is_set():
            try:
                conn, client = self._listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                # Out of descriptors, say: relaying matters more; try again soon.
                log.warning("status endpoint: accept failed: %s", exc)
                self._closing.wait(0.5)
                continue
            if not self._slots.acquire(False):
                _busy(conn)
                continue
            thread = threading.Thread(target=self._handle, args=(conn, client),
                                      name="status client")
            thread.daemon = True
            with self._lock:
                self._handlers[thread] = conn
            thread.start()

    def _handle(self, conn, client):
        try:
            conn.settimeout(self.request_timeout)
            _Handler(conn, client, self)
        except Exception:
            log.debug("status endpoint: a request from %s failed", client[0], exc_info=True)
        finally:
            conn.close()
            with self._lock:
                self._handlers.pop(threading.current_thread(), None)
            self._slots.release()


def _busy(conn):
    try:
        conn.send(_BUSY_REPLY, socket.MSG_DONTWAIT)
    except OSError:
        pass
    conn.close()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, all within one deadline (monotonic seconds)."""

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request took too long")
        self._sock.settimeout(clock.capped(left))
        return self._sock.recv_into(buffer)


class _Writer(object):
    """What the handler writes to: whole writes (``sendall``)."""

    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        self._sock.sendall(data)
        return len(data)

    def flush(self):
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    _PATHS = ("/", "/status.json", "/metrics")

    def version_string(self):
        return "tcprelay/%s" % __version__

    def setup(self):
        self.connection = self.request
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.request, time.monotonic() + self.server.request_timeout))
        self.wfile = _Writer(self.request)

    def finish(self):
        pass   # the connection is closed by StatusServer._handle

    def log_message(self, format, *args):
        log.debug("status endpoint: %s %s", self.address_string(), format % args)

    def do_GET(self):
        url = urlsplit(self.path)
        if not self._authorized(url):
            return
        if url.path == "/status.json":
            body = json.dumps(self.server.snapshot(), indent=1, sort_keys=True)
            self._reply(200, body.encode("utf-8"), "application/json")
        elif url.path == "/metrics":
            self._reply(200, metrics.render(self.server.snapshot()).encode("utf-8"),
                        metrics.CONTENT_TYPE)
        elif url.path == "/":
            self._reply(200, statuspage.PAGE, "text/html; charset=utf-8",
                        statuspage.HEADERS)
        else:
            self._reply(404, b"not found: the status endpoint has /, /status.json and "
                             b"/metrics\n")

    def _not_allowed(self):
        url = urlsplit(self.path)
        if not self._authorized(url):
            return
        if url.path not in self._PATHS:
            self._reply(404, b"not found\n")
        else:
            self._reply(405, b"only GET\n", extra=[("Allow", "GET")])

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _authorized(self, url):
        """True if no token is needed or the request has it; else answers 401."""
        token = self.server.token
        if token is None:
            return True
        given = None
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif url.path == "/":
            given = (parse_qs(url.query).get("token") or [None])[0]
        if given is not None and hmac.compare_digest(
                given.encode("utf-8", "surrogateescape"), token.encode("ascii")):
            return True
        self._reply(401, b"this status endpoint needs its token: Authorization: Bearer "
                         b"<token> (or /?token=<token> to open the page)\n",
                    extra=[("WWW-Authenticate", 'Bearer realm="tcprelay"')])
        return False

    def _reply(self, code, body, content_type="text/plain; charset=utf-8", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
