"""Noticing a peer that vanished: TCP keepalive, and a heartbeat on the
registration stream.

TCP keepalive notices a machine that is gone, but not a path that went
silent with both ends still up (a NAT that dropped its mapping, a frozen
middlebox): its probes can be answered by whatever sits in the middle. So a
service may also ask, at registration, for a heartbeat: it sends
``{"ping": N}`` lines on the registration stream every ``interval`` seconds
and the relay answers ``{"pong": N}``. Either side that hears nothing for
``timeout`` seconds ends the session (docs/PROTOCOL.md).
"""

import json
import logging
import socket
import threading
import time

from . import muxado, registration

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE = 30.0   # seconds to notice a vanished peer


def enable_tcp_keepalive(sock, seconds):
    """Have the kernel notice a dead peer within about ``seconds``."""
    seconds = max(3, int(seconds))
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


def _line(body):
    return (json.dumps(body) + "\n").encode("ascii")


class _Lines(object):
    def __init__(self, stream):
        self._stream = stream
        stream.set_lead_reads(False)   # seconds between lines: let the session's reader read
        self._splitter = registration.LineReader(registration.MAX_REPLY)
        self._ready = []

    def next(self, timeout):
        """The next JSON line as a dict; None at EOF. Raises socket.timeout."""
        self._stream.settimeout(timeout)
        while not self._ready:
            data = self._stream.recv(registration.MAX_REPLY)
            if not data:
                return None
            self._ready.extend(self._splitter.feed(data))
        try:
            body = json.loads(self._ready.pop(0).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise registration.RegistrationError("heartbeat line is not JSON")
        if not isinstance(body, dict):
            raise registration.RegistrationError("heartbeat line is not a JSON object")
        return body


class HeartbeatResponder(object):
    """The relay's side: answer pings; end the session after ``timeout`` of silence."""

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
        lines = _Lines(self._stream)
        try:
            while True:
                body = lines.next(self._timeout)
                if body is None:
                    log.info("%s: closed its heartbeat stream", self._label)
                    return
                if "ping" in body:
                    self._stream.sendall(_line({"pong": body["ping"]}))
        except socket.timeout:
            log.warning("%s: no heartbeat for %gs; the service is gone, dropping it",
                        self._label, self._timeout)
            self._session.close()
        except registration.RegistrationError as exc:
            log.warning("%s: bad heartbeat (%s); dropping it", self._label, exc)
            self._session.close()
        except (muxado.MuxadoError, OSError):
            pass  # the session ended


class HeartbeatSender(object):
    """The service's side: ping every ``interval``; end the session if no pong
    comes within ``timeout``."""

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
        lines = _Lines(self._stream)
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                self._stream.sendall(_line({"ping": seq}))
                end = time.monotonic() + self._timeout
                while True:
                    body = lines.next(max(0.001, end - time.monotonic()))
                    if body is None:
                        raise muxado.SessionClosedError(muxado.ErrorCode.NO_ERROR,
                                                        "heartbeat stream closed")
                    if body.get("pong") == seq:
                        break
                if self._stop.wait(self._interval):
                    return
        except socket.timeout:
            log.warning("%s: no answer to a heartbeat for %gs; the relay is gone",
                        self._label, self._timeout)
            self._session.close()
        except registration.RegistrationError as exc:
            log.warning("%s: bad heartbeat answer (%s)", self._label, exc)
            self._session.close()
        except (muxado.MuxadoError, OSError):
            pass  # the session ended
