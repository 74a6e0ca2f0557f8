"""The service's side of a group member's health checks (docs/PROTOCOL.md, 2.9):
which accepted streams are the relay's probes, and their answer.

The relay opens a probe stream whose first frame (the SYN) carries the probe
line the ``ok`` named, a random token no client can guess. The service library
answers it itself (``ok\\n``, then closes) and never hands it to a handler.
"""

import socket

from . import muxado

ANSWER = b"ok\n"
# A stream's first bytes arrive with its SYN, but the accepting thread may see
# the stream a moment before the reader has stored them: how long to wait for
# a first byte before taking it for a client that has sent nothing yet.
SETTLE = 0.02


def is_probe(stream, probe):
    """True if ``stream`` (just accepted) starts with ``probe`` (bytes). Reads
    nothing away; waits at most about 2 x SETTLE, and only on a stream with
    no data yet or whose first bytes could be the probe's."""
    try:
        stream.settimeout(SETTLE)
        try:
            first = stream.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return False   # a client with nothing to say yet (a banner protocol)
        if first != probe[:1]:
            return False
        try:
            start = stream.recv(len(probe), socket.MSG_PEEK | socket.MSG_WAITALL)
        except socket.timeout:
            return False
        return start == probe
    except (OSError, muxado.MuxadoError):
        return False
    finally:
        try:
            stream.settimeout(None)
        except (OSError, muxado.MuxadoError):
            pass


def answer(stream, probe):
    """Answer the ``probe`` on ``stream`` and close it (errors ignored: the relay
    counts them). The probe is read away first: a close with unread data is a
    reset, which would drop the answer."""
    try:
        stream.recv(len(probe), socket.MSG_WAITALL)   # buffered already (is_probe)
        stream.sendall(ANSWER)
    except (OSError, muxado.MuxadoError):
        pass
    finally:
        stream.close()
