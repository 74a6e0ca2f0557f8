"""The muxado v2 frame codec, sans-IO: bytes in, frames out, and back.

Nothing here touches a socket or a thread. ``FrameDecoder`` turns a byte
stream into calls on a handler; the ``encode_*`` functions build frames.
``muxado.Session`` does the I/O around both.

Wire format (all integers big-endian)::

    0-2  length     24 bits, body length
    3    type|flags high 4 bits type, low 4 bits flags
    4-7  stream id  32 bits, top bit reserved (must be 0)

Error texts match Go's ``muxado/v2`` so that a GOAWAY we send for a fault
reads the same as the one Go would send.
"""

import enum
import struct
from collections import namedtuple

__all__ = [
    "HEADER_SIZE", "MAX_LENGTH", "MAX_STREAM_ID", "MAX_WINDOW", "DEFAULT_WINDOW",
    "GOAWAY_DEBUG_LIMIT", "FIN", "SYN", "FrameType", "ErrorCode", "MuxadoError",
    "ProtocolError", "Data", "Rst", "WndInc", "GoAway", "Unknown", "FrameHandler",
    "FrameDecoder", "decode_frames", "encode_header", "encode_data", "encode_data_header",
    "with_syn", "encode_rst", "encode_wndinc", "encode_goaway", "encode_unknown", "PAD_FRAME",
]

HEADER_SIZE = 8
MAX_LENGTH = 0xFFFFFF
MAX_STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 256 * 1024       # both sides assume it; there is no negotiation
GOAWAY_DEBUG_LIMIT = 1 << 20      # Go reads at most 1 MiB of GOAWAY debug text

FIN = 0x1
SYN = 0x2

_RESERVED_BIT = 0x80000000
_HEADER = struct.Struct(">II")    # (length << 8 | type << 4 | flags, stream id)
_U32 = struct.Struct(">I")
_DATA_TYPE = 1 << 4                # FrameType.DATA in the header's type nibble
_U32X2 = struct.Struct(">II")


class FrameType(enum.IntEnum):
    RST = 0
    DATA = 1
    WNDINC = 2
    GOAWAY = 3


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    STREAM_REFUSED = 5
    STREAM_CANCELLED = 6
    STREAM_RESET = 7
    FRAME_SIZE_ERROR = 8
    ACCEPT_QUEUE_FULL = 9
    ENHANCE_YOUR_CALM = 10
    REMOTE_GONE_AWAY = 11
    STREAMS_EXHAUSTED = 12
    WRITE_TIMEOUT = 13
    SESSION_CLOSED = 14
    PEER_EOF = 15

    @classmethod
    def of(cls, value):
        """The member for ``value``, or the plain number if it is not one we know."""
        try:
            return cls(value)
        except ValueError:
            return value


def _code_name(code):
    return code.name if isinstance(code, ErrorCode) else "error code %d" % code


class MuxadoError(Exception):
    """A muxado failure; ``code`` is an ``ErrorCode`` (or a number we don't know)."""

    def __init__(self, code, message=None):
        self.code = ErrorCode.of(int(code))
        self.message = message if message is not None else _code_name(self.code)
        super(MuxadoError, self).__init__(self.message)

    def __str__(self):
        return "%s (%s)" % (self.message, _code_name(self.code))

    def __reduce__(self):
        return (type(self), (self.code, self.message))


class ProtocolError(MuxadoError):
    """The peer broke the wire protocol; the session ends with ``code``."""


# Frames as values, for encoding and for tests. The session's hot path uses
# the encode_* functions and the decoder's handler calls directly.

class Data(namedtuple("Data", "stream_id payload fin syn")):
    __slots__ = ()

    def __new__(cls, stream_id, payload=b"", fin=False, syn=False):
        return super(Data, cls).__new__(cls, stream_id, bytes(payload), fin, syn)

    def encode(self):
        flags = (FIN if self.fin else 0) | (SYN if self.syn else 0)
        return encode_data(self.stream_id, self.payload, flags)


class Rst(namedtuple("Rst", "stream_id code")):
    __slots__ = ()

    def encode(self):
        return encode_rst(self.stream_id, self.code)


class WndInc(namedtuple("WndInc", "stream_id increment")):
    __slots__ = ()

    def encode(self):
        return encode_wndinc(self.stream_id, self.increment)


class GoAway(namedtuple("GoAway", "last_stream_id code debug")):
    __slots__ = ()

    def encode(self):
        return encode_goaway(self.last_stream_id, self.code, self.debug)


class Unknown(namedtuple("Unknown", "type flags stream_id body")):
    __slots__ = ()

    def encode(self):
        return encode_unknown(self.type, self.flags, self.stream_id, self.body)


# Encoding.

def _check_code(code):
    if not 0 <= int(code) <= 0xFFFFFFFF:
        raise ValueError("error code %r does not fit in 32 bits" % (code,))


def encode_header(ftype, flags, stream_id, length):
    if not 0 <= ftype <= 15 or not 0 <= flags <= 15:
        raise ValueError("frame type and flags are 4 bits each, not %r, %r" % (ftype, flags))
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError("frame length %d does not fit in 24 bits" % length)
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid stream id: %d" % stream_id)
    return _HEADER.pack(length << 8 | ftype << 4 | flags, stream_id)


def encode_data(stream_id, payload=b"", flags=0):
    return encode_header(FrameType.DATA, flags, stream_id, len(payload)) + bytes(payload)


def encode_data_header(stream_id, length, flags=0):
    """The 8-byte header of a DATA frame, for a payload written after it.

    The hot path of every write: no range checks. The caller keeps
    ``length`` within MAX_LENGTH, ``flags`` within FIN|SYN and ``stream_id``
    a valid id (``encode_data`` checks them all).
    """
    return _HEADER.pack(length << 8 | _DATA_TYPE | flags, stream_id)


def with_syn(header):
    """``header`` (a DATA frame's 8 bytes) with the SYN flag set: the frame opens its stream."""
    word, stream_id = _HEADER.unpack(header)
    return _HEADER.pack(word | SYN, stream_id)


def encode_rst(stream_id, code):
    _check_code(code)
    return encode_header(FrameType.RST, 0, stream_id, 4) + _U32.pack(int(code))


def encode_wndinc(stream_id, increment):
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError("invalid window increment: %d" % increment)
    return encode_header(FrameType.WNDINC, 0, stream_id, 4) + _U32.pack(increment)


def encode_goaway(last_stream_id, code, debug=b""):
    _check_code(code)
    if not 0 <= last_stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid last stream id: %r" % (last_stream_id,))
    body = _U32X2.pack(last_stream_id, int(code)) + bytes(debug)
    return encode_header(FrameType.GOAWAY, 0, 0, len(body)) + body


def encode_unknown(ftype, flags, stream_id, body=b""):
    if ftype in (0, 1, 2, 3) or not 0 <= ftype <= 15:
        raise ValueError("not an unknown frame type: %r" % ftype)
    return encode_header(ftype, flags, stream_id, len(body)) + bytes(body)


# An empty frame of an unknown type. Sent right after a GOAWAY that is not the
# last frame: a correct parser skips it; Go's GOAWAY reader, which swallows
# 8 bytes too many, swallows it instead of the next real frame.
PAD_FRAME = encode_unknown(15, 0, 0)


# Decoding.

class FrameHandler(object):
    """What ``FrameDecoder`` calls. Subclass and override what you need.

    ``data_chunk`` gets a memoryview that is valid only during the call:
    copy it to keep it. A DATA frame is ``data_begin``, zero or more
    ``data_chunk`` calls with its payload in order, then ``data_end``.
    """

    def data_begin(self, stream_id, flags, length):
        pass

    def data_chunk(self, chunk):
        pass

    def data_end(self, stream_id, flags):
        pass

    def data(self, stream_id, flags, payload):
        """A whole DATA frame at once (its payload was all in one buffer).

        The decoder's fast path; by default the same as the three calls.
        """
        self.data_begin(stream_id, flags, len(payload))
        if len(payload):
            self.data_chunk(payload)
        self.data_end(stream_id, flags)

    def rst(self, stream_id, code):
        pass

    def wndinc(self, stream_id, increment):
        pass

    def goaway(self, last_stream_id, code, debug):
        pass

    def unknown(self, ftype, flags, stream_id, length, body):
        """``body`` is the frame body if the decoder keeps them, else None."""


# Decoder states.
_HEAD, _PAYLOAD, _FIXED, _DEBUG, _SKIP = range(5)


class FrameDecoder(object):
    """Incremental muxado frame decoder.

    ``feed(data)`` consumes any number of bytes and calls the handler for
    every frame (or piece of DATA payload) they complete. A malformed frame
    raises ``ProtocolError`` with the code Go would use; the decoder is then
    dead and must not be fed again.

    Memory is bounded: a DATA payload is passed on in pieces as it arrives,
    a GOAWAY keeps at most ``GOAWAY_DEBUG_LIMIT`` bytes of debug text, and
    unknown frame bodies are skipped unless ``keep_unknown_bodies`` is set.
    """

    def __init__(self, handler, keep_unknown_bodies=False):
        self._handler = handler
        self._keep_unknown = keep_unknown_bodies
        self._state = _HEAD
        self._partial = bytearray()   # an incomplete header or fixed body
        self._remaining = 0           # body bytes still to come in this frame
        self._type = 0
        self._flags = 0
        self._stream_id = 0
        self._length = 0
        self._debug = None
        self._fixed_size = 0          # 4 for RST and WNDINC, 8 for GOAWAY
        self._fixed = b""             # a GOAWAY's 8 fixed bytes

    def feed(self, data):
        """Decode ``data`` (any bytes-like), calling the handler for each frame
        or piece of one; a frame may span calls. Raises ProtocolError."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        pos = 0
        end = len(view)
        handler = self._handler
        while pos < end:
            state = self._state
            if state == _HEAD:
                if self._partial or end - pos < HEADER_SIZE:
                    take = min(HEADER_SIZE - len(self._partial), end - pos)
                    self._partial += view[pos:pos + take]
                    pos += take
                    if len(self._partial) < HEADER_SIZE:
                        return
                    word, stream_id = _HEADER.unpack(self._partial)
                    del self._partial[:]
                else:
                    word, stream_id = _HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                    length = word >> 8
                    if (word & 0xF0) == 0x10 and 0 < stream_id <= MAX_STREAM_ID \
                            and end - pos >= length:
                        # Fast path: a whole DATA frame in this buffer.
                        handler.data(stream_id, word & 0xF, view[pos:pos + length])
                        pos += length
                        continue
                self._begin(word >> 8, (word >> 4) & 0xF, word & 0xF, stream_id)
            elif state == _PAYLOAD:
                n = min(self._remaining, end - pos)
                handler.data_chunk(view[pos:pos + n])
                pos += n
                self._remaining -= n
                if not self._remaining:
                    self._state = _HEAD
                    handler.data_end(self._stream_id, self._flags)
            else:
                pos = self._feed_body(state, view, pos, end)

    def _feed_body(self, state, view, pos, end):
        """The body of a frame other than DATA, from ``view[pos:end]``; the new pos."""
        if state == _FIXED:
            take = min(self._fixed_size - len(self._partial), end - pos)
            self._partial += view[pos:pos + take]
            self._remaining -= take
            if len(self._partial) == self._fixed_size:
                self._fixed_body_done()
            return pos + take
        n = min(self._remaining, end - pos)
        if state == _DEBUG:
            room = GOAWAY_DEBUG_LIMIT - len(self._debug)
            if room > 0:
                self._debug += view[pos:pos + min(n, room)]
            self._remaining -= n
            if not self._remaining:
                self._finish_goaway()
        else:  # _SKIP
            if self._debug is not None:
                self._debug += view[pos:pos + n]
            self._remaining -= n
            if not self._remaining:
                self._finish_unknown()
        return pos + n

    def _begin(self, length, ftype, flags, stream_id):
        if stream_id & _RESERVED_BIT:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                "stream id has the reserved bit set: 0x%x" % stream_id)
        self._type = ftype
        self._flags = flags
        self._stream_id = stream_id
        self._length = length
        self._remaining = length
        if ftype == FrameType.DATA:
            if stream_id == 0:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "DATA frame stream id must not be zero, got: 0")
            self._handler.data_begin(stream_id, flags, length)
            if length:
                self._state = _PAYLOAD
            else:
                self._handler.data_end(stream_id, flags)
        elif ftype == FrameType.RST or ftype == FrameType.WNDINC:
            if length != 4:
                raise ProtocolError(
                    ErrorCode.FRAME_SIZE_ERROR,
                    "illegal %s frame length: 0x%x" % (FrameType(ftype).name, length))
            self._fixed_size = 4
            self._state = _FIXED
        elif ftype == FrameType.GOAWAY:
            if length < 8:
                raise ProtocolError(
                    ErrorCode.FRAME_SIZE_ERROR,
                    "illegal GOAWAY frame length: 0x%x" % length)
            self._fixed_size = 8
            self._state = _FIXED
        else:
            self._debug = bytearray() if self._keep_unknown else None
            if length:
                self._state = _SKIP
            else:
                self._finish_unknown()

    def _fixed_body_done(self):
        body = bytes(self._partial)
        del self._partial[:]
        ftype = self._type
        stream_id = self._stream_id
        self._state = _HEAD
        if ftype == FrameType.RST:
            if stream_id == 0:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "RST stream id must not be zero")
            self._handler.rst(stream_id, ErrorCode.of(_U32.unpack(body)[0]))
        elif ftype == FrameType.WNDINC:
            if stream_id == 0:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "WNDINC stream id must not be zero, got: 0")
            increment = _U32.unpack(body)[0] & MAX_WINDOW
            if increment == 0:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "WNDINC increment must not be zero, got: 0")
            self._handler.wndinc(stream_id, increment)
        else:  # GOAWAY: the 8 fixed bytes are in; the debug text follows
            if stream_id != 0:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    "GOAWAY stream id must be zero, not: %d" % stream_id)
            self._fixed = body
            self._debug = bytearray()
            if self._remaining:
                self._state = _DEBUG
            else:
                self._finish_goaway()

    def _finish_goaway(self):
        last_id, code = _U32X2.unpack(self._fixed)
        debug = bytes(self._debug)
        self._debug = None
        self._state = _HEAD
        self._handler.goaway(last_id & MAX_STREAM_ID, ErrorCode.of(code), debug)

    def _finish_unknown(self):
        body = bytes(self._debug) if self._debug is not None else None
        self._debug = None
        self._state = _HEAD
        self._handler.unknown(self._type, self._flags, self._stream_id, self._length, body)

    @property
    def at_frame_boundary(self):
        """True between frames: nothing partial is held."""
        return self._state == _HEAD and not self._partial


class _FrameCollector(FrameHandler):
    def __init__(self):
        self.frames = []
        self._payload = None

    def data_begin(self, stream_id, flags, length):
        self._payload = bytearray()

    def data_chunk(self, chunk):
        self._payload += chunk

    def data_end(self, stream_id, flags):
        self.frames.append(Data(stream_id, self._payload, bool(flags & FIN), bool(flags & SYN)))

    def data(self, stream_id, flags, payload):
        self.frames.append(Data(stream_id, payload, bool(flags & FIN), bool(flags & SYN)))

    def rst(self, stream_id, code):
        self.frames.append(Rst(stream_id, code))

    def wndinc(self, stream_id, increment):
        self.frames.append(WndInc(stream_id, increment))

    def goaway(self, last_stream_id, code, debug):
        self.frames.append(GoAway(last_stream_id, code, debug))

    def unknown(self, ftype, flags, stream_id, length, body):
        self.frames.append(Unknown(ftype, flags, stream_id, body))


def decode_frames(data):
    """Every whole frame in ``data``, as a list of frame values.

    Raises ``ProtocolError`` for a malformed frame and ``ValueError`` if
    ``data`` ends inside a frame.
    """
    collector = _FrameCollector()
    decoder = FrameDecoder(collector, keep_unknown_bodies=True)
    decoder.feed(data)
    if not decoder.at_frame_boundary:
        raise ValueError("data ends inside a frame")
    return collector.frames
