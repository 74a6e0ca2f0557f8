"""Dialling the relay for the service library: TCP (which another thread may
cut short: ``Attempt``), TLS, the link's muxado session, and, when registering
fails, what answered instead of a relay (``ServicePortError`` says what to try).
``service.connect`` is built on these; its errors are re-exported there.
"""

import logging
import socket
import ssl
import threading

from . import clock, muxado, registration
from .heartbeat import enable_tcp_keepalive
from .registrant import MinimalRelay, RegistrationRefused
from .tls import TLSTransport

# The service library's lines: operators know them by this name.
log = logging.getLogger("tcprelay.service")

# The relay opens one stream per client and caps clients itself, so a
# service takes far more streams than muxado's defaults for unknown peers.
DEFAULT_MAX_STREAMS = 65536
DEFAULT_ACCEPT_BACKLOG = 4096


class RelayGone(ConnectionError):
    """The connection to the relay ended."""


class ServicePortError(ConnectionError):
    """Registering failed because of what answered at the relay's address: not
    a tcprelay service port (a public port, another server), TLS on one side
    only, or a relay that closed the connection without a word. The message
    says which, and what to try; ``cause`` is the error as it came."""

    def __init__(self, message, cause=None):
        super(ServicePortError, self).__init__(message)
        self.cause = cause


class ConnectCancelled(RelayGone):
    """``connect()`` was cut short by ``Attempt.cancel()``."""


class Attempt(object):
    """A ``connect()`` in progress that another thread may cut short.

    ``cancel()`` ends it at whatever stage it is: the TCP connect, TLS,
    registration, the wait in line. ``connect()`` then raises
    ``ConnectCancelled``. A cancel after ``connect()`` returned closes the
    connection it made.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._target = None      # the socket or session that cancel() ends
        self.cancelled = False

    def cancel(self):
        """Cut the attempt short (safe from any thread, any number of times)."""
        with self._lock:
            self.cancelled = True
            target = self._target
        _cut(target)

    def hold(self, target):
        """From now on ``cancel()`` ends ``target`` (a socket or a muxado session).

        Raises ``ConnectCancelled`` (having ended ``target``) if it was cancelled already.
        """
        with self._lock:
            if not self.cancelled:
                self._target = target
                return
        _cut(target)
        raise ConnectCancelled("connecting to the relay was cancelled")


def _cut(target):
    """End what a blocked connect(), TLS handshake or recv waits on, from another thread."""
    if target is None:
        return
    if isinstance(target, muxado.Session):
        target.close()
        return
    try:
        # Linux aborts even a connect() still waiting for its SYN-ACK.
        target.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _dial(relay_address, timeout, attempt):
    """socket.create_connection, with each socket held by ``attempt`` while it connects."""
    host, port = relay_address[:2]
    error = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0,
                                                                socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            attempt.hold(sock)
            sock.settimeout(None if timeout is None else min(timeout, clock.MAX_TIMEOUT))
            sock.connect(address)
            return sock
        except BaseException as exc:
            sock.close()
            if attempt.cancelled:
                raise ConnectCancelled("connecting to the relay was cancelled")
            if not isinstance(exc, OSError):
                raise
            error = exc
    raise error if error is not None else OSError("no address for %s" % host)


def _open_link(relay_address, where, timeout, keepalive, tls, attempt, options):
    """Dial the relay: the muxado session, with TCP keepalive and ``tls`` (or None)."""
    sock = _dial(relay_address, timeout, attempt)
    enable_tcp_keepalive(sock, keepalive)
    if tls is not None:
        sock = _start_tls(sock, tls, relay_address[0], where, attempt)
    return _link_session(sock, where, options)


def _registered(session, where, tls, attempt, run):
    """``run(session, on_waiting)``'s (reply, stream), registering over
    ``session``; on failure the session is closed and the error says what
    answered. ``MinimalRelay`` passes through, the session left open."""
    in_line = []   # the relay answered: what goes wrong from then on is no wrong port
    try:
        attempt.hold(session)
        return run(session, in_line.append)
    except MinimalRelay:
        if attempt.cancelled:
            session.close()
            raise ConnectCancelled("connecting to the relay was cancelled")
        raise
    except BaseException as exc:
        session.close()
        if attempt.cancelled:
            raise ConnectCancelled("connecting to the relay was cancelled")
        if isinstance(exc, socket.timeout):
            raise socket.timeout("the relay at %s %s" % (where, exc))
        if not in_line:
            failure = _what_answered(where, session, exc, tls is not None)
            if failure is not None:
                raise failure
        raise


def _link_session(sock, where, options):
    """The muxado client session to the relay over ``sock``: the link's window
    and frame size, and room for a stream per client, unless ``options`` say."""
    options = dict(options)
    options.setdefault("window_size", registration.LINK_WINDOW)
    options.setdefault("max_frame_size", registration.LINK_MAX_FRAME)
    options.setdefault("max_streams", DEFAULT_MAX_STREAMS)
    options.setdefault("accept_backlog", DEFAULT_ACCEPT_BACKLOG)
    return muxado.client(sock, name="relay %s" % where, **options)


def _start_tls(sock, context, server_hostname, where, attempt):
    """TLS over the dialled ``sock``: the transport for the session. Raises
    ConnectCancelled, or ServicePortError if what answered seems not to speak
    TLS (a certificate the relay's name does not match is raised as it is)."""
    try:
        sslsock = context.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException as exc:
        sock.close()
        if attempt.cancelled:
            raise ConnectCancelled("connecting to the relay was cancelled")
        if isinstance(exc, OSError) and not _trust_failure(exc) \
                and not isinstance(exc, socket.timeout):
            raise ServicePortError(
                "TLS with %s failed: %s (it may not use TLS: try without --tls; or %s "
                "may not be a tcprelay service port)" % (where, _reason(exc), where), exc)
        raise
    return TLSTransport(sslsock)


# The session died of bytes that are not muxado (or not a relay's muxado).
_NOT_A_RELAY = frozenset((muxado.ErrorCode.PROTOCOL_ERROR, muxado.ErrorCode.FRAME_SIZE_ERROR,
                          muxado.ErrorCode.FLOW_CONTROL_ERROR))
_HUNG_UP = frozenset((muxado.ErrorCode.PEER_EOF, muxado.ErrorCode.SESSION_CLOSED))


def _reason(exc):
    return getattr(exc, "strerror", None) or getattr(exc, "message", None) or str(exc)


def _trust_failure(exc):
    """True for a TLS error about the relay's certificate (it does speak TLS)."""
    return (isinstance(exc, ssl.CertificateError)
            or getattr(exc, "reason", None) == "CERTIFICATE_VERIFY_FAILED")


def _what_answered(where, session, exc, tls):
    """A ServicePortError saying what to try, for ``exc`` raised while registering
    before the relay answered anything; None if ``exc`` says it well already."""
    if isinstance(exc, (RegistrationRefused, socket.timeout)):
        return None
    goaway = session.remote_goaway
    if goaway is not None:
        if goaway[2].startswith(registration.TLS_REQUIRED):
            return ServicePortError("the relay at %s requires TLS: connect with --tls "
                                    "(tls= in connect())" % where, exc)
        return None   # a relay, which said why
    error = session.error if session.error is not None else exc
    code = getattr(error, "code", None)
    if isinstance(exc, registration.RegistrationError) or code in _NOT_A_RELAY:
        return ServicePortError(
            "%s does not look like a tcprelay service port (%s): is it a public port, or "
            "another kind of server? Services dial the relay's service port"
            % (where, _reason(error if code in _NOT_A_RELAY else exc)), exc)
    if code in _HUNG_UP or isinstance(exc, ConnectionError):
        maybe = "refuse this address (--allow-from, rate limits)"
        if not tls:
            maybe = "require TLS (--tls), " + maybe
        return ServicePortError(
            "the relay at %s closed the connection before answering (%s): it may %s, or %s "
            "may not be a tcprelay service port" % (where, _reason(error), maybe, where), exc)
    return None
