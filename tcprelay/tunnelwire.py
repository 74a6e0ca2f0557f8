"""The tunnel preamble (docs/PROTOCOL.md, 2.11): on a session that registered
several tunnels, each client stream starts with ``tcprelay-tunnel NAME\\n``,
before the PROXY header (if that tunnel asked for one) and the client's bytes.

Both sides use it: the relay writes it, the service library reads it.
"""

import socket

PREFIX = b"tcprelay-tunnel "
# The prefix, a name of up to 64 characters in UTF-8 (4 bytes each at most), the newline.
MAX_PREAMBLE = len(PREFIX) + 64 * 4 + 1


class PreambleError(ValueError):
    """A stream on a tunnels session that does not start with a tunnel preamble."""


def encode(name):
    """The preamble naming the tunnel ``name`` (text), as bytes."""
    return PREFIX + name.encode("utf-8") + b"\n"


def read(stream):
    """Take the preamble off ``stream`` (a muxado stream: its MSG_PEEK with
    MSG_WAITALL waits, a socket's may not): the tunnel's name (text). Reads exactly the preamble; blocks as the stream's
    timeout says. Raises ``PreambleError`` for anything else."""
    peeked = stream.recv(MAX_PREAMBLE, socket.MSG_PEEK)   # all of it, normally: the SYN's
    while b"\n" not in peeked:
        if not PREFIX.startswith(peeked[:len(PREFIX)]) or not peeked \
                or len(peeked) >= MAX_PREAMBLE:
            raise PreambleError("the stream does not start with a tunnel preamble")
        more = stream.recv(len(peeked) + 1, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(more) <= len(peeked):
            raise PreambleError("the stream ended inside a tunnel preamble")
        peeked = more
    line = peeked[:peeked.index(b"\n") + 1]
    if not line.startswith(PREFIX):
        raise PreambleError("the stream does not start with a tunnel preamble")
    stream.recv(len(line), socket.MSG_WAITALL)
    try:
        return line[len(PREFIX):-1].decode("utf-8")
    except UnicodeDecodeError:
        raise PreambleError("a tunnel preamble whose name is not UTF-8")
