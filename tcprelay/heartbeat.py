"""Noticing a peer that vanished: TCP keepalive, and a heartbeat on the
registration stream.

TCP keepalive notices a machine that is gone, but not a path that went
silent with both ends still up (a NAT that dropped its mapping, a frozen
middlebox): its probes can be answered by whatever sits in the middle. So a
service may also ask, at registration, for a heartbeat: it sends
``{"ping": N}`` lines on the registration stream every ``interval`` seconds
and the relay answers ``{"pong": N}``. Either side that hears nothing at
all for ``timeout`` seconds ends the session (docs/PROTOCOL.md, 2.5).

Liveness counts bytes, not pings: any byte received on the session
(``Session.last_received``) proves the peer alive, so a pong stuck behind
a slow link's data is no reason to give up. The pings are how an idle
service keeps its promise to be heard from. The heartbeat stream ending
(FIN or RST, from either side) stops the ping/pong, not the timeout.
"""

import logging
import socket
import threading
import time

from . import clock, muxado, registration
from .streamlines import StreamLines

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE = 30.0   # seconds to notice a vanished peer
_MAX_KEEPALIVE = 3 * 32767   # so that the probes' idle time fits the kernel's limit


def enable_tcp_keepalive(sock, seconds):
    """Have the kernel notice a dead peer within about ``seconds``."""
    # The kernel takes at most 32,767 s between probes (MAX_TCP_KEEPIDLE) and an
    # int of milliseconds for TCP_USER_TIMEOUT: longer is "practically never".
    seconds = min(max(3, int(min(seconds, _MAX_KEEPALIVE))), _MAX_KEEPALIVE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, seconds // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 6))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
        # Data sent but never acknowledged also counts as a dead peer.
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18),
                        seconds * 1000)
    except (OSError, AttributeError):
        pass  # not TCP, or not Linux: the heartbeat still works


def set_client_options(listener, seconds):
    """Set on a listening socket what every connection it accepts needs:
    TCP keepalive within ``seconds`` and TCP_NODELAY.

    Accepted sockets inherit them (Linux copies a listener's options to each
    connection): no syscalls per connection. ``client_options_inherited``
    checks that once, on the first connection accepted.
    """
    enable_tcp_keepalive(listener, seconds)
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


_inherited = None   # whether accepted sockets inherit set_client_options (once known)


def client_options_inherited(conn):
    """Whether ``conn``, accepted from a listener given ``set_client_options``,
    has them already; if not (the system does not copy them), the caller sets
    them on each connection. Learnt from the first connection, then known."""
    global _inherited
    if _inherited is None:
        try:
            _inherited = bool(conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                              and conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except (OSError, AttributeError):
            _inherited = False
    return _inherited


def _lines(stream):
    """The heartbeat's lines on ``stream``."""
    stream.set_lead_reads(False)   # seconds between lines: let the session's reader read
    return StreamLines(stream, registration.MAX_REPLY)


def _next_object(lines, timeout):
    """The next line as a dict; None at EOF. Raises socket.timeout after
    ``timeout`` seconds of silence (callers loop on their deadline)."""
    line = lines.read_line(silence=timeout)
    if line is None:
        return None
    try:
        return registration.parse_object(line)
    except registration.RegistrationError:
        raise registration.RegistrationError("heartbeat line is not a JSON object")


def _silence_left(session, timeout, started):
    """Seconds until ``session`` has been silent for ``timeout`` (<= 0: it has).

    Silence counts from ``started`` (the heartbeat's start) at the earliest:
    the promise to be heard from begins with the ok, whatever came before
    (a service waits in line in silence).
    """
    return max(session.last_received, started) + timeout - time.monotonic()


class HeartbeatResponder(object):
    """The relay's side: answer pings; end the session once nothing at all
    has come from the service for ``timeout`` seconds.

    A FIN or RST on the heartbeat stream only means no more pings: the
    timeout holds on the session as a whole all the same.
    """

    def __init__(self, session, stream, timeout, label):
        self._session = session
        self._stream = stream
        self._timeout = timeout
        self._label = label
        self._thread = threading.Thread(target=self._run, name="heartbeat %s" % label)
        self._thread.daemon = True

    def start(self):
        self._thread.start()

    def join(self, timeout=None):
        self._thread.join(timeout)

    def _run(self):
        session = self._session
        started = time.monotonic()
        lines = _lines(self._stream)
        pings = True   # the service may still ping
        try:
            while True:
                left = _silence_left(session, self._timeout, started)
                if left <= 0:
                    log.warning("%s: no heartbeat for %gs, nor any other byte; the service "
                                "is gone, dropping it", self._label, self._timeout)
                    session.close()
                    return
                if not pings:
                    if session.wait(clock.capped(left)):
                        return
                    continue
                try:
                    body = _next_object(lines, left)
                except socket.timeout:
                    continue   # no ping; other bytes may have come
                except muxado.StreamResetError:
                    log.info("%s: reset its heartbeat stream; it must still be heard from "
                             "every %gs", self._label, self._timeout)
                    pings = False
                    continue
                if body is None:
                    log.info("%s: closed its heartbeat stream; it must still be heard from "
                             "every %gs", self._label, self._timeout)
                    pings = False
                    try:
                        self._stream.close()   # our side too: the stream is done
                    except (muxado.MuxadoError, OSError):
                        pass
                    continue
                if "ping" in body:
                    try:
                        self._stream.send_nowait(registration.pong_line(body["ping"]))
                    except BlockingIOError:
                        raise registration.RegistrationError(
                            "it does not read its heartbeat stream")
        except registration.RegistrationError as exc:
            log.warning("%s: bad heartbeat (%s); dropping it", self._label, exc)
            session.close()
        except (muxado.MuxadoError, OSError):
            pass  # the session ended


class HeartbeatSender(object):
    """The service's side: ping every ``interval``; end the session once
    nothing at all has come from the relay for ``timeout`` seconds.

    The relay's pongs are what an idle service hears; a pong late behind
    the relay's data is fine, since the data counts too. If the relay
    half-closes the heartbeat stream we keep pinging; if it resets it we
    cannot: either way the timeout holds on the session as a whole.
    """

    def __init__(self, session, stream, interval, timeout, label):
        self._session = session
        self._stream = stream
        self._interval = interval
        self._timeout = timeout
        self._label = label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat %s" % label)
        self._thread.daemon = True

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()

    def join(self, timeout=None):
        self._thread.join(timeout)

    def _run(self):
        session = self._session
        lines = _lines(self._stream)
        seq = 0
        started = next_ping = time.monotonic()
        pongs = pings = True   # the relay may still answer; we may still ping
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if pings and now >= next_ping:
                    seq += 1
                    next_ping = now + self._interval
                    try:
                        # Never waits (for window, or for the write lock behind a
                        # write to a stuck relay): the silence check keeps its time.
                        self._stream.send_nowait(registration.ping_line(seq))
                    except BlockingIOError:
                        pass   # the relay has not read our last pings: no more now
                    except muxado.StreamResetError:
                        pings = pongs = self._heartbeat_ended("reset")
                left = _silence_left(session, self._timeout, started)
                if left <= 0:
                    if session.closed:
                        return
                    log.warning("%s: no answer to a heartbeat for %gs, nor any other byte; "
                                "the relay is gone", self._label, self._timeout)
                    session.close()
                    return
                wait = min(left, next_ping - time.monotonic()) if pings else left
                if not pongs:
                    if self._stop.wait(clock.capped(max(0.0, wait))) or session.closed:
                        return
                    continue
                try:
                    body = _next_object(lines, max(0.001, wait))
                except socket.timeout:
                    continue
                except muxado.StreamResetError:
                    pings = pongs = self._heartbeat_ended("reset")
                    continue
                if body is None:
                    pongs = self._heartbeat_ended("half-closed")
        except registration.RegistrationError as exc:
            log.warning("%s: bad heartbeat answer (%s)", self._label, exc)
            session.close()
        except (muxado.MuxadoError, OSError):
            pass  # the session ended

    def _heartbeat_ended(self, how):
        if not self._session.closed:
            log.info("%s: the relay %s the heartbeat stream; it must still be heard from "
                     "every %gs", self._label, how, self._timeout)
        return False
