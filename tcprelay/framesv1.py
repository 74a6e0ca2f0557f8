"""The muxado v1 frame codec (Go muxado of 2014), sans-IO, beside ``frames.py`` (v2).

The same interface as ``frames`` where the meaning is the same, so that a
``muxado.Session`` built with ``codec=framesv1`` reuses the v2 session's
writer, reader and streams: ``FrameDecoder`` calls a ``frames.FrameHandler``
(``data_begin``/``data_chunk``/``data_end``, ``rst``, ``wndinc``, ``goaway``),
and ``encode_*``, ``with_syn``, ``PAD_FRAME``, ``DEFAULT_WINDOW`` and
``MAX_LENGTH`` stand in for v2's. Error codes are v2's ``ErrorCode`` at this
interface and v1 numbers on the wire (``code_to_wire``, ``code_from_wire``).

Wire format (all integers big-endian; see docs/PROTOCOL.md, "muxado v1")::

    0-1  length     low 14 bits count: body length 0..16383
    2    flags      FIN 0x1; on SYN also PRIORITY 0x2, TYPE 0x4
    3    type       low 5 bits count: SYN 1, RST 2, DATA 3, WNDINC 4, GOAWAY 6
    4-7  stream id  low 31 bits count

What differs from v2, and how the decoder maps it:

- A stream opens with a SYN frame of its own (no payload; an optional
  priority and stream type). It decodes as an empty DATA frame with the SYN
  flag (``data_begin(id, SYN, 0)``, ``data_end``), so the v2 dispatch opens
  the stream. A SYN whose stream type is an extension's (0xFFFFFEFF up: the
  heartbeat) goes to ``handler.extension_syn(id, flags, priority, type)``.
  ``with_syn`` puts a SYN frame before a DATA header instead of setting a flag.
- Go v1 writes a GOAWAY whose length field claims 8 + len(debug) bytes more
  than it sends (it never sends the debug text, and closes the connection
  after). So ``goaway`` is called as soon as the 8 fixed bytes are in (with
  ``b""`` as the debug text); the claimed rest is then skipped if it comes,
  which keeps a correct peer in step. Our GOAWAYs are correct.
- No frame type is skipped: an unknown type ends the session (Go's too).
- A WNDINC of 0 is legal (it does nothing).
"""

import struct
from collections import namedtuple

from .frames import FIN, SYN, ErrorCode, FrameHandler, ProtocolError

__all__ = [
    "HEADER_SIZE", "MAX_LENGTH", "MAX_STREAM_ID", "DEFAULT_WINDOW", "HEARTBEAT_TYPE",
    "EXTENSION_TYPES", "FrameTypeV1", "PRIORITY", "STREAM_TYPE", "code_to_wire",
    "code_from_wire", "opens_v1_session", "Syn", "Data", "Rst", "WndInc", "GoAway",
    "FrameDecoder", "decode_frames", "encode_header", "encode_syn", "encode_data",
    "encode_data_header", "with_syn", "encode_rst", "encode_wndinc", "encode_goaway",
    "PAD_FRAME",
]

HEADER_SIZE = 8
MAX_LENGTH = 0x3FFF               # Go v1 refuses to write a longer body
MAX_STREAM_ID = 0x7FFFFFFF
DEFAULT_WINDOW = 64 * 1024        # each direction of each stream; never negotiated
EXTENSION_TYPES = 0xFFFFFEFF      # stream types from here up belong to extensions
HEARTBEAT_TYPE = 0xFFFFFEFF       # Go v1's heartbeat (3 s interval, 10 s tolerance)

# SYN flags beside FIN (0x1, as v2's): what its body holds
PRIORITY = 0x2
STREAM_TYPE = 0x4


class FrameTypeV1(object):
    SYN = 1
    RST = 2
    DATA = 3
    WNDINC = 4
    PRI = 5        # named by Go v1, never written, refused by its reader
    GOAWAY = 6


_T_SYN, _T_RST, _T_DATA, _T_WNDINC, _T_GOAWAY = 1, 2, 3, 4, 6
_HEADER = struct.Struct(">HBBI")  # length, flags, type, stream id
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")
_SYN_FLAGS = PRIORITY | STREAM_TYPE

# v2 ErrorCode -> v1 wire number. v1 knows 0-7 and Go refuses to write more;
# 5-7 mean other things than in v2.
_V1_FRAME_SIZE_ERROR, _V1_REFUSED_STREAM, _V1_CANCEL = 5, 6, 7
_TO_WIRE = {
    ErrorCode.NO_ERROR: 0,
    ErrorCode.PROTOCOL_ERROR: 1,
    ErrorCode.INTERNAL_ERROR: 2,
    ErrorCode.FLOW_CONTROL_ERROR: 3,
    ErrorCode.STREAM_CLOSED: 4,
    ErrorCode.STREAM_REFUSED: _V1_REFUSED_STREAM,
    ErrorCode.STREAM_CANCELLED: _V1_CANCEL,
    ErrorCode.STREAM_RESET: _V1_CANCEL,
    ErrorCode.FRAME_SIZE_ERROR: _V1_FRAME_SIZE_ERROR,
    ErrorCode.ACCEPT_QUEUE_FULL: _V1_REFUSED_STREAM,
    ErrorCode.ENHANCE_YOUR_CALM: 1,
    ErrorCode.REMOTE_GONE_AWAY: _V1_REFUSED_STREAM,
    ErrorCode.STREAMS_EXHAUSTED: 2,
    ErrorCode.WRITE_TIMEOUT: 2,
    ErrorCode.SESSION_CLOSED: 0,
    ErrorCode.PEER_EOF: 2,          # what Go v1 says when its peer hangs up
}
_FROM_WIRE = (ErrorCode.NO_ERROR, ErrorCode.PROTOCOL_ERROR, ErrorCode.INTERNAL_ERROR,
              ErrorCode.FLOW_CONTROL_ERROR, ErrorCode.STREAM_CLOSED,
              ErrorCode.FRAME_SIZE_ERROR, ErrorCode.STREAM_REFUSED,
              ErrorCode.STREAM_CANCELLED)


def code_to_wire(code):
    """The v1 number (0-7) for a v2 ``ErrorCode`` (or number); INTERNAL_ERROR's 2 for
    one v1 has no word for."""
    return _TO_WIRE.get(code, 2)


def code_from_wire(number):
    """The v2 ``ErrorCode`` that means what v1 ``number`` means; codes v1 does not
    define (8 and up) read as INTERNAL_ERROR."""
    if 0 <= number < len(_FROM_WIRE):
        return _FROM_WIRE[number]
    return ErrorCode.INTERNAL_ERROR


def opens_v1_session(first):
    """True if ``first``, a connection's first bytes (at least 4), begin a muxado v1
    session: byte 3 is a v1 SYN's (0x01). A v2 peer's first frame there has 0x12
    or 0x13 (DATA with SYN), which v1 would refuse as types 18 and 19."""
    return len(first) >= 4 and bytearray(first[3:4])[0] == _T_SYN


# Frames as values, for tests and tools (the session uses the handler calls).

class Syn(namedtuple("Syn", "stream_id fin priority stream_type")):
    __slots__ = ()

    def __new__(cls, stream_id, fin=False, priority=None, stream_type=None):
        return super(Syn, cls).__new__(cls, stream_id, fin, priority, stream_type)

    def encode(self):
        return encode_syn(self.stream_id, self.fin, self.priority, self.stream_type)


class Data(namedtuple("Data", "stream_id payload fin")):
    __slots__ = ()

    def __new__(cls, stream_id, payload=b"", fin=False):
        return super(Data, cls).__new__(cls, stream_id, bytes(payload), fin)

    def encode(self):
        return encode_data(self.stream_id, self.payload, self.fin)


class Rst(namedtuple("Rst", "stream_id code")):
    __slots__ = ()

    def encode(self):
        return encode_rst(self.stream_id, self.code)


class WndInc(namedtuple("WndInc", "stream_id increment")):
    __slots__ = ()

    def encode(self):
        return encode_wndinc(self.stream_id, self.increment)


class GoAway(namedtuple("GoAway", "last_stream_id code debug length")):
    """``length``: the length field as sent, where it is not 8 + len(debug) (Go v1's)."""
    __slots__ = ()

    def __new__(cls, last_stream_id, code, debug=b"", length=None):
        return super(GoAway, cls).__new__(cls, last_stream_id, code, bytes(debug), length)

    def encode(self):
        return encode_goaway(self.last_stream_id, self.code, self.debug, self.length)


# Encoding.

def encode_header(ftype, flags, stream_id, length):
    if not 0 <= ftype <= 0x1F or not 0 <= flags <= 0xFF:
        raise ValueError("frame type is 5 bits and flags 8, not %r, %r" % (ftype, flags))
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError("frame length %d does not fit in 14 bits" % length)
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid stream id: %d" % stream_id)
    return _HEADER.pack(length, flags, ftype, stream_id)


def encode_syn(stream_id, fin=False, priority=None, stream_type=None):
    """A SYN frame; ``priority`` and ``stream_type`` (32-bit) are sent when not None."""
    if not 0 < stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid stream id: %d" % stream_id)
    flags = FIN if fin else 0
    body = b""
    if priority is not None:
        flags |= PRIORITY
        body += _U32.pack(priority & MAX_STREAM_ID)
    if stream_type is not None:
        flags |= STREAM_TYPE
        body += _U32.pack(stream_type)
    return _HEADER.pack(len(body), flags, _T_SYN, stream_id) + body


def encode_data(stream_id, payload=b"", fin=False):
    if not 0 < stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid stream id: %d" % stream_id)
    return encode_header(_T_DATA, FIN if fin else 0, stream_id, len(payload)) + bytes(payload)


def encode_data_header(stream_id, length, flags=0):
    """The 8-byte header of a DATA frame (``flags``: FIN or 0), for a payload written
    after it. No checks: the session keeps ``length`` within MAX_LENGTH."""
    return _HEADER.pack(length, flags & FIN, _T_DATA, stream_id)


_EMPTY_DATA = (0, 0, _T_DATA)


def with_syn(header):
    """What opens a stream in front of ``header`` (a DATA header from
    ``encode_data_header``): a SYN frame, then the header. An empty DATA frame
    without FIN only announces the stream: then the SYN alone."""
    length, flags, ftype, stream_id = _HEADER.unpack(header)
    syn = _HEADER.pack(0, 0, _T_SYN, stream_id)
    if (length, flags, ftype) == _EMPTY_DATA:
        return syn
    return syn + bytes(header)


def encode_rst(stream_id, code):
    """RST with the v1 number for ``code`` (a v2 ErrorCode)."""
    return _HEADER.pack(4, 0, _T_RST, stream_id) + _U32.pack(code_to_wire(code))


def encode_wndinc(stream_id, increment):
    if not 0 <= increment <= MAX_STREAM_ID:
        raise ValueError("invalid window increment: %d" % increment)
    return _HEADER.pack(4, 0, _T_WNDINC, stream_id) + _U32.pack(increment)


def encode_goaway(last_stream_id, code, debug=b"", length=None):
    """GOAWAY with the v1 number for ``code``, correct: the length is 8 + the debug
    text's (a Go v1 reader stays in step). ``length`` forces the length field
    (to reproduce Go v1's frames in tests)."""
    if not 0 <= last_stream_id <= MAX_STREAM_ID:
        raise ValueError("invalid last stream id: %r" % (last_stream_id,))
    debug = bytes(debug)[:MAX_LENGTH - 8]
    body = _U32X2.pack(last_stream_id, code_to_wire(code)) + debug
    return encode_header(_T_GOAWAY, 0, 0, len(body) if length is None else length) + body


# v1 has no frame a peer skips: nothing may follow a GOAWAY as padding.
PAD_FRAME = b""


# Decoding.

_HEAD, _PAYLOAD, _FIXED, _GOAWAY_REST = range(4)


class FrameDecoder(object):
    """Incremental muxado v1 decoder, with ``frames.FrameDecoder``'s interface.

    ``feed(data)`` calls the handler for every frame (or piece of DATA
    payload) the bytes complete; a malformed frame raises ``ProtocolError``
    (then the decoder is dead): PROTOCOL_ERROR for an unknown type or a zero
    stream id, FRAME_SIZE_ERROR for a body length the type does not allow.
    The handler needs ``extension_syn(stream_id, flags, priority, stream_type)``
    besides ``frames.FrameHandler``'s calls. After a SYN, ``syn_priority`` and
    ``syn_stream_type`` hold its body (None where absent); after a GOAWAY,
    ``goaway_length`` its length field.
    """

    def __init__(self, handler):
        self._handler = handler
        self._state = _HEAD
        self._partial = bytearray()   # an incomplete header or fixed body
        self._remaining = 0
        self._type = 0
        self._flags = 0
        self._stream_id = 0
        self._fixed_size = 0
        self._debug = bytearray()
        self.syn_priority = None
        self.syn_stream_type = None
        self.goaway_length = None

    def feed(self, data):
        """Decode ``data`` (any bytes-like); a frame may span calls. Raises ProtocolError."""
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
                    length, flags, ftype, stream_id = _HEADER.unpack(self._partial)
                    del self._partial[:]
                else:
                    length, flags, ftype, stream_id = _HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                    length &= MAX_LENGTH
                    stream_id &= MAX_STREAM_ID
                    if ftype & 0x1F == _T_DATA and stream_id and end - pos >= length:
                        # Fast path: a whole DATA frame in this buffer.
                        handler.data(stream_id, flags & FIN, view[pos:pos + length])
                        pos += length
                        continue
                self._begin(length & MAX_LENGTH, flags, ftype & 0x1F, stream_id & MAX_STREAM_ID)
            elif state == _PAYLOAD:
                n = min(self._remaining, end - pos)
                handler.data_chunk(view[pos:pos + n])
                pos += n
                self._remaining -= n
                if not self._remaining:
                    self._state = _HEAD
                    handler.data_end(self._stream_id, self._flags)
            elif state == _FIXED:
                take = min(self._fixed_size - len(self._partial), end - pos)
                self._partial += view[pos:pos + take]
                pos += take
                self._remaining -= take
                if len(self._partial) == self._fixed_size:
                    self._fixed_body_done()
            else:  # _GOAWAY_REST: the debug text, if the peer sends it at all
                n = min(self._remaining, end - pos)
                self._debug += view[pos:pos + n]
                pos += n
                self._remaining -= n
                if not self._remaining:
                    self._state = _HEAD
                    debug_done = getattr(handler, "goaway_debug", None)
                    if debug_done is not None:
                        debug_done(bytes(self._debug))

    def _begin(self, length, flags, ftype, stream_id):
        self._type = ftype
        self._flags = flags
        self._stream_id = stream_id
        self._remaining = length
        if ftype == _T_DATA:
            if stream_id == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA frame on stream 0")
            self._flags = flags = flags & FIN
            self._handler.data_begin(stream_id, flags, length)
            if length:
                self._state = _PAYLOAD
            else:
                self._handler.data_end(stream_id, flags)
            return
        if ftype == _T_SYN:
            if stream_id == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SYN frame on stream 0")
            size = 4 * (bool(flags & PRIORITY) + bool(flags & STREAM_TYPE))
            if length != size:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                    "SYN frame length %d, its flags say %d" % (length, size))
        elif ftype == _T_RST or ftype == _T_WNDINC:
            if length != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "%s frame length %d, not 4"
                                    % ("RST" if ftype == _T_RST else "WNDINC", length))
            if stream_id == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "%s frame on stream 0"
                                    % ("RST" if ftype == _T_RST else "WNDINC"))
            size = 4
        elif ftype == _T_GOAWAY:
            if length < 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                    "GOAWAY frame length %d, less than 8" % length)
            size = 8
            self.goaway_length = length
        else:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "illegal frame type: %d" % ftype)
        self._fixed_size = size
        if size:
            self._state = _FIXED
        else:
            self._fixed_body_done()

    def _fixed_body_done(self):
        body = bytes(self._partial)
        del self._partial[:]
        ftype = self._type
        stream_id = self._stream_id
        handler = self._handler
        self._state = _HEAD
        if ftype == _T_SYN:
            self._syn(stream_id, self._flags, body)
        elif ftype == _T_RST:
            handler.rst(stream_id, code_from_wire(_U32.unpack(body)[0]))
        elif ftype == _T_WNDINC:
            handler.wndinc(stream_id, _U32.unpack(body)[0] & MAX_STREAM_ID)
        else:  # GOAWAY: at once, since Go v1 never sends the rest it claims
            last_id, code = _U32X2.unpack(body)
            del self._debug[:]
            if self._remaining:
                self._state = _GOAWAY_REST
            handler.goaway(last_id & MAX_STREAM_ID, code_from_wire(code), b"")

    def _syn(self, stream_id, flags, body):
        priority = stream_type = None
        if flags & PRIORITY:
            priority = _U32.unpack_from(body)[0] & MAX_STREAM_ID
            body = body[4:]
        if flags & STREAM_TYPE:
            stream_type = _U32.unpack(body)[0]
        self.syn_priority = priority
        self.syn_stream_type = stream_type
        handler = self._handler
        fin = flags & FIN
        if stream_type is not None and stream_type >= EXTENSION_TYPES:
            handler.extension_syn(stream_id, fin, priority, stream_type)
            return
        handler.data_begin(stream_id, SYN | fin, 0)
        handler.data_end(stream_id, SYN | fin)

    @property
    def at_frame_boundary(self):
        """True between frames: nothing partial is held."""
        return self._state == _HEAD and not self._partial


class _FrameCollector(FrameHandler):
    def __init__(self):
        self.frames = []
        self.decoder = None
        self._payload = None

    def _syn_value(self, stream_id, fin):
        return Syn(stream_id, bool(fin), self.decoder.syn_priority, self.decoder.syn_stream_type)

    def extension_syn(self, stream_id, flags, priority, stream_type):
        self.frames.append(self._syn_value(stream_id, flags & FIN))

    def data_begin(self, stream_id, flags, length):
        self._payload = bytearray()

    def data_chunk(self, chunk):
        self._payload += chunk

    def data_end(self, stream_id, flags):
        if flags & SYN:
            self.frames.append(self._syn_value(stream_id, flags & FIN))
        else:
            self.frames.append(Data(stream_id, self._payload, bool(flags & FIN)))

    def data(self, stream_id, flags, payload):
        self.frames.append(Data(stream_id, payload, bool(flags & FIN)))

    def rst(self, stream_id, code):
        self.frames.append(Rst(stream_id, code))

    def wndinc(self, stream_id, increment):
        self.frames.append(WndInc(stream_id, increment))

    def goaway(self, last_stream_id, code, debug):
        length = self.decoder.goaway_length
        self.frames.append(GoAway(last_stream_id, code, debug, None if length == 8 else length))

    def goaway_debug(self, debug):
        last = self.frames[-1]
        self.frames[-1] = GoAway(last.last_stream_id, last.code, debug)


def decode_frames(data):
    """Every whole frame in ``data``, as a list of frame values.

    Go v1's GOAWAY (a length field bigger than what follows) may end the
    data: it comes back with ``length`` set. Raises ``ProtocolError`` for a
    malformed frame and ``ValueError`` if ``data`` ends inside another frame.
    """
    collector = _FrameCollector()
    decoder = collector.decoder = FrameDecoder(collector)
    decoder.feed(data)
    if decoder._state == _GOAWAY_REST and not decoder._debug:
        return collector.frames   # Go v1's GOAWAY: the claimed text never comes
    if not decoder.at_frame_boundary:
        raise ValueError("data ends inside a frame")
    return collector.frames
