"""Several public ports on one service session (docs/PROTOCOL.md, 2.11).

A service whose first request said ``"tunnels": true`` may open further
registration streams on its session after its ``ok``: each is one more
tunnel, with its own request (name, port, lease, PROXY header, allow list),
its own public port from the pool and its own lease. Each tunnel is a
``TunnelLink``: a ``ServiceLink`` that shares the first one's session (it
neither opens nor closes it) and runs its own port's accept loop; every
client stream of such a session starts with the tunnel's preamble
(``tunnelwire``), so that the service knows which tunnel it came through.
"""

import logging
import threading
import time

from . import muxado, registration, tunnelwire
from .registrar import _request_bytes
from .servicelink import ServiceLink
from .streamlines import StreamLines

log = logging.getLogger("tcprelay.relay")

MAX_TUNNELS = 64    # tunnels on one session, the first included


def accept_further(first, session):
    """Start the thread that takes ``first``'s further registration streams
    (``first``: the ServiceLink that registered with ``"tunnels": true``)."""
    thread = threading.Thread(target=_accept_loop, args=(first, session),
                              name="tunnels of %s" % first.label)
    thread.daemon = True
    thread.start()
    return thread


def _accept_loop(first, session):
    relay = first.relay
    while True:
        try:
            stream = session.accept()
        except (muxado.MuxadoError, OSError):
            return   # the session ended
        link = TunnelLink(first, stream)
        with relay._lock:
            accepting = relay._accepting
            if accepting:
                relay._services.add(link)
        if not accepting:
            link._refuse(stream, "the relay is leaving")
            continue
        link.start()


class TunnelLink(ServiceLink):
    """A further tunnel of ``first``'s session, registered on ``stream``."""

    def __init__(self, first, stream):
        ServiceLink.__init__(self, first.relay, first._sock, first.address)
        self.first = first
        self._session = first._session
        self._registration_stream = stream

    def _serve(self):
        session = self._session
        session.add_done_callback(self._session_ended)
        request = self._tunnel_request(self._registration_stream)
        if request is None:
            return
        stream = self._registration_stream
        self.request = request
        self._stream_preamble = tunnelwire.encode(request.name)
        self.allowed_clients = type(self.allowed_clients)(request.allow or ())
        granted = self._wait_for_port(request, stream)
        if granted is None:
            return
        self._announce(request, stream, granted[0])
        self._serve_clients(session)
        with self._lock:
            while self._draining and self._bridges and not self._ended:
                self._idle.wait()

    def _tunnel_request(self, stream):
        """The further tunnel's request, checked; None if refused (answered so)."""
        relay = self.relay
        deadline = time.monotonic() + relay.handshake_timeout
        lines = StreamLines(stream, registration.MAX_REQUEST)
        try:
            request = registration.parse_request(_request_bytes(lines, deadline))
        except registration.RegistrationError as exc:
            self._refuse(stream, "bad registration request: %s" % exc)
            return None
        except (muxado.MuxadoError, OSError) as exc:   # the timeout included
            self._refuse(stream, "registration not finished: %s" % exc)
            return None
        stream.settimeout(None)
        self.name = request.name
        refusal = self._refusal(request)
        if refusal is not None:
            log.info("%s: further tunnel refused: %s", self.first.label, refusal)
            self._refuse(stream, refusal)
            return None
        request.heartbeat = False   # the session's heartbeat is the first stream's
        log.info("%s: registering a further tunnel (%s)", self.first.label, request)
        return request

    def _refusal(self, request):
        """Why ``request`` cannot be a further tunnel (text), or None; takes its name."""
        if request.minimal or request.name is None:
            return "a further tunnel needs a request with a 'name'"
        if request.group is not None:
            return "a group member cannot be a further tunnel: register it on a session of its own"
        if request.port is not None and request.port not in self.relay.pool:
            return "port %d is not in this relay's pool (%s)" % (
                request.port, self.relay.pool.describe())
        first = self.first
        with first._lock:
            names = first.tunnel_names
            if request.name in names:
                return "this session has a tunnel named %r already" % request.name
            if len(names) >= MAX_TUNNELS:
                return "a session may have %d tunnels at most" % MAX_TUNNELS
            names.add(request.name)
        return None

    def goaway(self):
        """Refuse new clients; the session's GOAWAY is the first tunnel's to send."""
        with self._lock:
            self._draining = True
            ticket = self._ticket
        if ticket is not None:
            ticket.cancel()
        self._stop_listening()

    def _end_session(self):
        pass   # the session is the first tunnel's: it ends it

    def _finish(self):
        try:
            ServiceLink._finish(self)
        finally:
            if self.request is not None:
                with self.first._lock:
                    self.first.tunnel_names.discard(self.request.name)
