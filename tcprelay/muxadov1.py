"""muxado v1 sessions (Go muxado of 2014): a ``muxado.Session`` on the v1 codec,
plus the v1 heartbeat extension's answer.

Everything but the bytes on the wire is the v2 session's: streams, flow
control, limits, endings. What v1 adds is its heartbeat: a Go v1 peer opens
one stream of type 0xFFFFFEFF at the start of every session, writes a 4-byte
token on it every 3 s and closes the session if no echo comes back within
10 s (or if the stream is reset or half-closed). ``server`` echoes those
tokens, as Go v1's own server does, and never closes that stream; the
stream is kept apart from ``accept()``. We open no heartbeat stream of our
own: the peer's tokens already show it alive (``Session.last_received``).
"""

import functools
import logging

from . import framesv1, muxado
from .frames import ErrorCode, MuxadoError

log = logging.getLogger("tcprelay.muxado")

__all__ = ["server", "client", "HeartbeatEcho", "heartbeat_of"]


class HeartbeatEcho(object):
    """The receiver (``Stream.set_receiver``) of a peer's v1 heartbeat stream:
    every byte goes back unchanged on the same stream, and its window with it.

    The reader thread hands the bytes over; the echo is written from the
    session's writer thread, which holds no stream lock (a receiver may not
    call back into its stream), without ever blocking it (``send_nowait``).
    """

    def __init__(self, stream):
        self._stream = stream
        self._defer = stream.session._writer.defer
        self.echoed = 0   # bytes sent back (the writer thread's count)

    def stream_data(self, data):
        self._defer(functools.partial(self._echo, bytes(data)))
        return 0   # kept until echoed: consumed() returns the window

    def stream_end(self, error):
        return None   # the peer's session ends with its heartbeat

    def _echo(self, data):
        stream = self._stream
        try:
            stream.send_nowait(data)
        except BlockingIOError:
            # The peer grants the window back for each echo it reads; one
            # that does not gets no more echoes (and its session times out).
            log.info("%s: no window for a heartbeat echo on stream %d; dropped",
                     stream.session.name, stream.id)
        except (MuxadoError, OSError):
            return   # the stream or session has ended
        else:
            self.echoed += len(data)
        stream.consumed(len(data))


def _extension_stream(stream, stream_type):
    """A v1 peer's extension stream (reader thread): its heartbeat is answered;
    a second one, or another type, is reset as Go v1 does (STREAM_CLOSED)."""
    session = stream.session
    if stream_type == framesv1.HEARTBEAT_TYPE and heartbeat_of(session) is None:
        session._v1_heartbeat = echo = HeartbeatEcho(stream)
        stream.set_receiver(echo)
        return
    log.debug("%s: refused extension stream %d of type 0x%x", session.name, stream.id,
              stream_type)
    session._abort_stream(stream, ErrorCode.STREAM_CLOSED, "unknown extension")


def heartbeat_of(session):
    """The ``HeartbeatEcho`` answering ``session``'s peer, or None before its
    heartbeat stream came (or for a v2 session)."""
    return getattr(session, "_v1_heartbeat", None)


def _options(options):
    options.setdefault("window_size", framesv1.DEFAULT_WINDOW)
    options["codec"] = framesv1
    options["on_extension_stream"] = _extension_stream
    return options


def server(sock, **options):
    """A v1 session on the side that accepted the connection (a relay's), answering
    the peer's heartbeat. Options as ``muxado.Session``'s; the window defaults to
    v1's 64 KiB, and frames are at most 16,383 bytes whatever ``max_frame_size``."""
    return muxado.Session(sock, client=False, **_options(options))


def client(sock, **options):
    """A v1 session on the side that dialed (for tests: our services speak v2).
    It answers the peer's heartbeat and sends none of its own."""
    return muxado.Session(sock, client=True, **_options(options))
