"""The frame codec on byte strings, against the recorded Go traffic. No sockets."""

import binascii
import hashlib
import random
import struct

import pytest

from helpers.basics import load_vectors
from tcprelay import frames
from tcprelay.frames import (
    GOAWAY_DEBUG_LIMIT, MAX_LENGTH, MAX_STREAM_ID, MAX_WINDOW, PAD_FRAME, Data, ErrorCode,
    FrameDecoder, FrameHandler, GoAway, ProtocolError, Rst, Unknown, WndInc, decode_frames,
    encode_data, encode_goaway, encode_header, encode_rst, encode_unknown, encode_wndinc,
)

VECTORS = load_vectors()
SCENARIOS = {s["name"]: s for s in VECTORS["scenarios"]}
MALFORMED = {m["name"]: m for m in VECTORS["malformed"]}

# Malformed inputs that a frame decoder alone must reject. The others are
# well-formed frames that only a session can object to (or that are fine).
FRAME_LEVEL_FAULTS = ["rst-bad-length", "wndinc-zero", "data-stream-zero", "goaway-nonzero-stream"]
WELL_FORMED_INPUTS = [
    "syn-wrong-parity", "window-overrun", "data-unknown-stream", "fin-unknown-stream",
    "unknown-type-then-stream", "rst-unknown-stream", "goaway-from-client",
]

TYPE_NAMES = {0: "RST", 1: "DATA", 2: "WNDINC", 3: "GOAWAY"}


def unhex(text):
    return binascii.unhexlify(text)


def recorded_streams():
    """(id, bytes, expected frame dicts) for every recorded well-formed byte string."""
    out = []
    for s in VECTORS["scenarios"]:
        out.append(("%s/client_to_server" % s["name"], unhex(s["client_to_server_hex"]),
                    s["client_to_server_frames"]))
        out.append(("%s/server_to_client" % s["name"], unhex(s["server_to_client_hex"]),
                    s["server_to_client_frames"]))
    for m in VECTORS["malformed"]:
        out.append(("%s/output" % m["name"], unhex(m["output_hex"]), m["output_frames"]))
    for name in WELL_FORMED_INPUTS:
        m = MALFORMED[name]
        out.append(("%s/input" % name, unhex(m["input_hex"]), m["input_frames"]))
    return out


RECORDED = recorded_streams()
RECORDED_IDS = [r[0] for r in RECORDED]


def as_recorded(frame):
    """A decoded frame in the shape of the JSON's *_frames entries."""
    if isinstance(frame, Data):
        d = {"type": "DATA", "flags": (frames.FIN if frame.fin else 0) |
             (frames.SYN if frame.syn else 0), "stream_id": frame.stream_id,
             "length": len(frame.payload)}
        # The recording gives payloads over 64 bytes by SHA-256.
        if len(frame.payload) > 64:
            d["payload_sha256"] = hashlib.sha256(frame.payload).hexdigest()
        else:
            d["payload_hex"] = binascii.hexlify(frame.payload).decode()
        return d
    if isinstance(frame, Rst):
        return {"type": "RST", "flags": 0, "stream_id": frame.stream_id, "length": 4,
                "error_code": int(frame.code)}
    if isinstance(frame, WndInc):
        return {"type": "WNDINC", "flags": 0, "stream_id": frame.stream_id, "length": 4,
                "increment": frame.increment}
    if isinstance(frame, GoAway):
        return {"type": "GOAWAY", "flags": 0, "stream_id": 0, "length": 8 + len(frame.debug),
                "last_stream_id": frame.last_stream_id, "error_code": int(frame.code),
                "debug": frame.debug.decode("utf-8")}
    assert isinstance(frame, Unknown), frame
    return {"type": "UNKNOWN(%d)" % frame.type, "flags": frame.flags,
            "stream_id": frame.stream_id, "length": len(frame.body),
            "body_hex": binascii.hexlify(frame.body).decode()}


class Recorder(FrameHandler):
    """Every handler call as a plain tuple, DATA payload joined, raw flags kept."""

    def __init__(self):
        self.events = []
        self.chunk_sizes = []
        self._payload = None

    def data_begin(self, stream_id, flags, length):
        assert self._payload is None, "data_begin inside a DATA frame"
        self._payload = bytearray()
        self._begin = (stream_id, flags, length)

    def data_chunk(self, chunk):
        assert self._payload is not None, "data_chunk outside a DATA frame"
        self.chunk_sizes.append(len(chunk))
        self._payload += chunk   # a copy: the view is only valid during the call

    def data_end(self, stream_id, flags):
        assert (stream_id, flags) == self._begin[:2]
        assert len(self._payload) == self._begin[2]
        self.events.append(("DATA", stream_id, flags, bytes(self._payload)))
        self._payload = None

    def rst(self, stream_id, code):
        self.events.append(("RST", stream_id, code))

    def wndinc(self, stream_id, increment):
        self.events.append(("WNDINC", stream_id, increment))

    def goaway(self, last_stream_id, code, debug):
        self.events.append(("GOAWAY", last_stream_id, code, debug))

    def unknown(self, ftype, flags, stream_id, length, body):
        self.events.append(("UNKNOWN", ftype, flags, stream_id, length, body))


def feed_pieces(pieces, keep_unknown_bodies=True):
    recorder = Recorder()
    decoder = FrameDecoder(recorder, keep_unknown_bodies=keep_unknown_bodies)
    for piece in pieces:
        decoder.feed(piece)
    assert decoder.at_frame_boundary
    return recorder.events


def random_splits(data, rng, cuts):
    points = sorted(rng.randrange(len(data) + 1) for _ in range(cuts))
    bounds = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- the recorded traffic --------------------------------------------------------------


def test_vector_file_has_the_expected_cases():
    # A new malformed vector must be classified above, or it would go untested here.
    assert sorted(MALFORMED) == sorted(FRAME_LEVEL_FAULTS + WELL_FORMED_INPUTS)
    assert len(SCENARIOS) == 6


@pytest.mark.parametrize("name,data,expected", RECORDED, ids=RECORDED_IDS)
def test_recorded_frames_decode_to_the_recorded_values(name, data, expected):
    decoded = decode_frames(data)
    assert [as_recorded(f) for f in decoded] == expected


@pytest.mark.parametrize("name,data,expected", RECORDED, ids=RECORDED_IDS)
def test_recorded_frames_reencode_to_the_same_bytes(name, data, expected):
    decoded = decode_frames(data)
    assert len(decoded) == len(expected)
    assert b"".join(f.encode() for f in decoded) == data
    # and frame by frame, so a fault points at the frame
    pos = 0
    for frame in decoded:
        encoded = frame.encode()
        assert data[pos:pos + len(encoded)] == encoded, frame
        pos += len(encoded)


@pytest.mark.parametrize("name,data,expected", RECORDED, ids=RECORDED_IDS)
def test_recorded_frames_decode_the_same_in_every_split(name, data, expected):
    whole = feed_pieces([data])
    assert len(whole) == len(expected)
    # one byte at a time
    assert feed_pieces([data[i:i + 1] for i in range(len(data))]) == whole
    rng = random.Random(0x6D7578)   # fixed seed: a failure reproduces
    for _ in range(25):
        pieces = random_splits(data, rng, rng.randrange(1, 12))
        assert feed_pieces(pieces) == whole
    # memoryview and bytearray input too
    assert feed_pieces([memoryview(bytearray(data))]) == whole


def test_recorded_large_payload_is_the_documented_pattern():
    frames_ = decode_frames(unhex(SCENARIOS["large-write-window"]["client_to_server_hex"]))
    payload = b"".join(f.payload for f in frames_ if isinstance(f, Data))
    assert payload == bytes(i % 251 for i in range(300000))


@pytest.mark.parametrize("name", FRAME_LEVEL_FAULTS)
def test_malformed_input_raises_the_code_and_text_go_sent(name):
    vector = MALFORMED[name]
    go_answer = decode_frames(unhex(vector["output_hex"]))
    assert go_answer and isinstance(go_answer[0], GoAway)
    with pytest.raises(ProtocolError) as info:
        decode_frames(unhex(vector["input_hex"]))
    assert info.value.code == go_answer[0].code
    assert isinstance(info.value.code, ErrorCode)
    assert info.value.message == go_answer[0].debug.decode("utf-8")


@pytest.mark.parametrize("name", FRAME_LEVEL_FAULTS)
def test_malformed_input_raises_the_same_error_in_every_split(name):
    vector = MALFORMED[name]
    data = unhex(vector["input_hex"])
    expected = decode_frames(unhex(vector["output_hex"]))[0]
    splits = [[data[i:i + 1] for i in range(len(data))]]
    rng = random.Random(7)
    splits += [random_splits(data, rng, rng.randrange(1, 6)) for _ in range(10)]
    for pieces in splits:
        decoder = FrameDecoder(Recorder())
        with pytest.raises(ProtocolError) as info:
            for piece in pieces:
                decoder.feed(piece)
        assert (info.value.code, info.value.message) == (expected.code,
                                                         expected.debug.decode("utf-8"))


def test_frames_before_a_fault_are_delivered_before_the_error():
    # wndinc-zero: the DATA+SYN ahead of the bad WNDINC must reach the handler.
    recorder = Recorder()
    with pytest.raises(ProtocolError):
        FrameDecoder(recorder).feed(unhex(MALFORMED["wndinc-zero"]["input_hex"]))
    assert recorder.events == [("DATA", 3, frames.SYN, b"x")]


# -- codec rules ---------------------------------------------------------------------------


def raw_header(length, ftype, flags, stream_id):
    """A header without encode_header's checks, for frames it refuses to build."""
    return struct.pack(">II", length << 8 | ftype << 4 | flags, stream_id)


@pytest.mark.parametrize("ftype,body", [
    (1, b"hi"), (0, b"\0\0\0\4"), (2, b"\0\0\0\1"), (3, b"\0" * 8), (7, b""), (15, b"x"),
], ids=["DATA", "RST", "WNDINC", "GOAWAY", "type7", "type15"])
def test_reserved_stream_id_bit_is_a_protocol_error(ftype, body):
    data = raw_header(len(body), ftype, 0, 0x80000000 | 3) + body
    with pytest.raises(ProtocolError) as info:
        decode_frames(data)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_reserved_bit_alone_on_stream_zero_is_still_an_error():
    with pytest.raises(ProtocolError) as info:
        decode_frames(raw_header(8, 3, 0, 0x80000000) + b"\0" * 8)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_wndinc_increment_top_bit_is_masked_off():
    data = raw_header(4, 2, 0, 3) + struct.pack(">I", 0x80000005)
    assert decode_frames(data) == [WndInc(3, 5)]
    assert feed_pieces([data[:9], data[9:]]) == [("WNDINC", 3, 5)]


def test_wndinc_of_only_the_top_bit_is_a_zero_increment():
    data = raw_header(4, 2, 0, 3) + struct.pack(">I", 0x80000000)
    with pytest.raises(ProtocolError) as info:
        decode_frames(data)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert info.value.message == "WNDINC increment must not be zero, got: 0"


@pytest.mark.parametrize("ftype,length", [(0, 0), (0, 5), (2, 3), (2, 8), (3, 0), (3, 7)])
def test_fixed_size_bodies_of_the_wrong_length_are_frame_size_errors(ftype, length):
    data = raw_header(length, ftype, 0, 0 if ftype == 3 else 3) + b"\1" * length
    with pytest.raises(ProtocolError) as info:
        decode_frames(data)
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert info.value.message == "illegal %s frame length: 0x%x" % (TYPE_NAMES[ftype], length)


@pytest.mark.parametrize("ftype", [0, 2])
def test_rst_and_wndinc_on_stream_zero_are_protocol_errors(ftype):
    with pytest.raises(ProtocolError) as info:
        decode_frames(raw_header(4, ftype, 0, 0) + b"\0\0\0\1")
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_goaway_debug_is_kept_up_to_the_limit_and_the_rest_skipped():
    debug = bytes(i % 253 for i in range(GOAWAY_DEBUG_LIMIT + 5000))
    after = encode_data(3, b"after", frames.FIN)
    data = encode_goaway(7, ErrorCode.INTERNAL_ERROR, debug) + after
    expected = [GoAway(7, ErrorCode.INTERNAL_ERROR, debug[:GOAWAY_DEBUG_LIMIT]),
                Data(3, b"after", fin=True)]
    assert decode_frames(data) == expected
    # The decoder stays in step however the bytes arrive, including a piece
    # that straddles the limit and one that ends exactly on it.
    limit_at = 16 + GOAWAY_DEBUG_LIMIT
    events = [("GOAWAY", 7, ErrorCode.INTERNAL_ERROR, debug[:GOAWAY_DEBUG_LIMIT]),
              ("DATA", 3, frames.FIN, b"after")]
    assert feed_pieces([data[:limit_at - 3], data[limit_at - 3:]]) == events
    assert feed_pieces([data[:limit_at], data[limit_at:]]) == events
    assert feed_pieces([data[i:i + 4093] for i in range(0, len(data), 4093)]) == events


def test_goaway_debug_exactly_at_the_limit_is_kept_whole():
    debug = b"d" * GOAWAY_DEBUG_LIMIT
    data = encode_goaway(1, ErrorCode.NO_ERROR, debug) + encode_wndinc(3, 9)
    assert decode_frames(data) == [GoAway(1, ErrorCode.NO_ERROR, debug), WndInc(3, 9)]


def test_goaway_with_empty_debug_is_eight_bytes_of_body():
    data = encode_goaway(0, ErrorCode.NO_ERROR)
    assert data == raw_header(8, 3, 0, 0) + b"\0" * 8
    assert decode_frames(data + encode_wndinc(5, 1)) == [
        GoAway(0, ErrorCode.NO_ERROR, b""), WndInc(5, 1)]


@pytest.mark.parametrize("ftype", range(4, 16))
def test_unknown_frame_types_are_skipped_and_bodies_kept_only_on_request(ftype):
    data = (encode_unknown(ftype, 0x5, 7, b"junk body") + encode_unknown(ftype, 0, 0)
            + encode_data(3, b"next", frames.SYN))
    after = ("DATA", 3, frames.SYN, b"next")
    assert feed_pieces([data], keep_unknown_bodies=False) == [
        ("UNKNOWN", ftype, 0x5, 7, 9, None), ("UNKNOWN", ftype, 0, 0, 0, None), after]
    kept = [("UNKNOWN", ftype, 0x5, 7, 9, b"junk body"), ("UNKNOWN", ftype, 0, 0, 0, b""), after]
    assert feed_pieces([data], keep_unknown_bodies=True) == kept
    assert feed_pieces([data[i:i + 1] for i in range(len(data))]) == kept
    assert decode_frames(data) == [Unknown(ftype, 5, 7, b"junk body"), Unknown(ftype, 0, 0, b""),
                                   Data(3, b"next", syn=True)]


def test_large_unknown_body_is_skipped_in_step():
    body = b"u" * 300000
    data = encode_unknown(9, 0, 1, body) + encode_rst(3, ErrorCode.STREAM_CANCELLED)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    assert feed_pieces(pieces, keep_unknown_bodies=False) == [
        ("UNKNOWN", 9, 0, 1, 300000, None), ("RST", 3, ErrorCode.STREAM_CANCELLED)]


def test_data_payload_is_streamed_in_pieces_not_buffered_whole():
    size = 1 << 20
    payload = bytes(i % 241 for i in range(size))
    data = encode_data(5, payload, frames.FIN) + encode_wndinc(5, 1)
    calls = []

    class Spy(Recorder):
        def data_begin(self, stream_id, flags, length):
            calls.append(("begin", stream_id, flags, length))
            Recorder.data_begin(self, stream_id, flags, length)

        def data_chunk(self, chunk):
            assert isinstance(chunk, memoryview)
            calls.append(("chunk", len(chunk)))
            Recorder.data_chunk(self, chunk)

        def data_end(self, stream_id, flags):
            calls.append(("end", stream_id, flags))
            Recorder.data_end(self, stream_id, flags)

    recorder = Spy()
    decoder = FrameDecoder(recorder)
    # The header and the first 1000 payload bytes: those 1000 are handed on at once.
    decoder.feed(data[:8 + 1000])
    assert calls == [("begin", 5, frames.FIN, size), ("chunk", 1000)]
    assert not decoder.at_frame_boundary
    # The rest in 64 KiB pieces: each piece is passed on as it comes, none held back.
    piece = 65536
    pos = 8 + 1000
    while pos < 8 + size:
        before = len(calls)
        end = min(pos + piece, 8 + size)
        decoder.feed(data[pos:end])
        got = sum(c[1] for c in calls[before:] if c[0] == "chunk")
        assert got == end - pos
        pos = end
    assert calls[-1] == ("end", 5, frames.FIN)
    assert max(recorder.chunk_sizes) <= piece
    decoder.feed(data[pos:])
    assert recorder.events == [("DATA", 5, frames.FIN, payload), ("WNDINC", 5, 1)]
    assert decoder.at_frame_boundary


def test_empty_data_frame_is_begin_then_end_with_no_chunk():
    calls = []

    class Spy(FrameHandler):
        def data_begin(self, stream_id, flags, length):
            calls.append(("begin", stream_id, flags, length))

        def data_chunk(self, chunk):
            calls.append(("chunk", len(chunk)))

        def data_end(self, stream_id, flags):
            calls.append(("end", stream_id, flags))

    FrameDecoder(Spy()).feed(encode_data(3, b"", frames.SYN | frames.FIN))
    assert calls == [("begin", 3, 3, 0), ("end", 3, 3)]


def test_a_partial_header_is_copied_not_referenced():
    # The caller may reuse its buffer after feed() returns.
    data = encode_data(3, b"abc") + encode_rst(3, ErrorCode.STREAM_RESET)
    buf = bytearray(data[:5])
    recorder = Recorder()
    decoder = FrameDecoder(recorder)
    decoder.feed(buf)
    buf[:] = b"\xff" * 5
    decoder.feed(data[5:])
    assert recorder.events == [("DATA", 3, 0, b"abc"), ("RST", 3, ErrorCode.STREAM_RESET)]


def test_decode_frames_refuses_data_that_ends_inside_a_frame():
    data = encode_data(3, b"hello")
    for cut in (3, 8, 10):
        with pytest.raises(ValueError):
            decode_frames(data[:cut])
    assert decode_frames(b"") == []


def test_data_flags_other_than_fin_and_syn_reach_the_handler():
    data = raw_header(2, 1, 0xC | frames.FIN, 3) + b"hi"
    assert feed_pieces([data]) == [("DATA", 3, 0xC | frames.FIN, b"hi")]


def test_unknown_error_codes_are_kept_as_numbers():
    data = (encode_rst(3, 99) + encode_goaway(5, 0xFFFFFFFF, b"why")
            + encode_rst(5, ErrorCode.ACCEPT_QUEUE_FULL))
    rst, goaway, known = decode_frames(data)
    assert rst == Rst(3, 99) and type(rst.code) is int
    assert goaway == GoAway(5, 0xFFFFFFFF, b"why") and type(goaway.code) is int
    assert known.code is ErrorCode.ACCEPT_QUEUE_FULL
    assert ErrorCode.of(99) == 99 and not isinstance(ErrorCode.of(99), ErrorCode)
    assert ErrorCode.of(15) is ErrorCode.PEER_EOF
    error = frames.MuxadoError(99)
    assert error.code == 99 and "99" in str(error)
    assert frames.MuxadoError(3).code is ErrorCode.FLOW_CONTROL_ERROR


def test_error_codes_have_the_documented_numbers():
    names = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
             "STREAM_CLOSED", "STREAM_REFUSED", "STREAM_CANCELLED", "STREAM_RESET",
             "FRAME_SIZE_ERROR", "ACCEPT_QUEUE_FULL", "ENHANCE_YOUR_CALM", "REMOTE_GONE_AWAY",
             "STREAMS_EXHAUSTED", "WRITE_TIMEOUT", "SESSION_CLOSED", "PEER_EOF"]
    assert [(c.name, int(c)) for c in ErrorCode] == [(n, i) for i, n in enumerate(names)]


def test_pad_frame_is_an_empty_type_15_frame_on_stream_zero():
    assert PAD_FRAME == b"\x00\x00\x00\xf0\x00\x00\x00\x00"
    assert len(PAD_FRAME) == 8
    assert decode_frames(PAD_FRAME) == [Unknown(15, 0, 0, b"")]
    # after a GOAWAY it is skipped and the next frame is read in step
    data = encode_goaway(3, ErrorCode.NO_ERROR, b"drain") + PAD_FRAME + encode_data(3, b"x")
    assert feed_pieces([data], keep_unknown_bodies=False) == [
        ("GOAWAY", 3, ErrorCode.NO_ERROR, b"drain"), ("UNKNOWN", 15, 0, 0, 0, None),
        ("DATA", 3, 0, b"x")]


def test_encoders_build_the_documented_layout():
    assert encode_header(1, frames.SYN, 3, 5) == b"\x00\x00\x05\x12\x00\x00\x00\x03"
    assert encode_data(MAX_STREAM_ID, b"", frames.FIN) == b"\x00\x00\x00\x11\x7f\xff\xff\xff"
    assert encode_rst(3, ErrorCode.STREAM_CLOSED) == unhex("000004000000000300000004")
    assert encode_wndinc(3, MAX_WINDOW) == unhex("00000420000000037fffffff")
    assert encode_goaway(1, ErrorCode.NO_ERROR, b"no error") == unhex(
        "0000103000000000" "00000001" "00000000" "6e6f206572726f72")
    assert encode_header(0, 0, 0, MAX_LENGTH)[:3] == b"\xff\xff\xff"
    assert len(encode_data(3, b"z" * MAX_LENGTH)) == 8 + MAX_LENGTH


@pytest.mark.parametrize("call", [
    lambda: encode_header(1, 0, 3, MAX_LENGTH + 1),
    lambda: encode_header(1, 0, 3, -1),
    lambda: encode_header(1, 0, MAX_STREAM_ID + 1, 0),
    lambda: encode_header(1, 0, -1, 0),
    lambda: encode_header(16, 0, 3, 0),
    lambda: encode_header(-1, 0, 3, 0),
    lambda: encode_header(1, 16, 3, 0),
    lambda: encode_header(1, -1, 3, 0),
    lambda: encode_data(3, b"\0" * (MAX_LENGTH + 1)),
    lambda: encode_data(0x80000003, b"x"),
    lambda: encode_data(3, b"x", 0x10),
    lambda: encode_rst(0x80000003, ErrorCode.STREAM_RESET),
    lambda: encode_rst(3, -1),
    lambda: encode_rst(3, 1 << 32),
    lambda: encode_wndinc(3, 0),
    lambda: encode_wndinc(3, -5),
    lambda: encode_wndinc(3, MAX_WINDOW + 1),
    lambda: encode_wndinc(0x80000003, 1),
    lambda: encode_goaway(MAX_STREAM_ID + 1, ErrorCode.NO_ERROR),
    lambda: encode_goaway(-1, ErrorCode.NO_ERROR),
    lambda: encode_goaway(0, 1 << 32),
    lambda: encode_goaway(0, -1),
    lambda: encode_goaway(0, ErrorCode.NO_ERROR, b"\0" * (MAX_LENGTH - 7)),
    lambda: encode_unknown(0, 0, 0),
    lambda: encode_unknown(3, 0, 0),
    lambda: encode_unknown(16, 0, 0),
    lambda: encode_unknown(-1, 0, 0),
    lambda: encode_unknown(9, 0, 0, b"\0" * (MAX_LENGTH + 1)),
    lambda: encode_unknown(9, 16, 0),
], ids=[
    "header-length-too-big", "header-length-negative", "header-stream-reserved-bit",
    "header-stream-negative", "header-type-16", "header-type-negative", "header-flags-16",
    "header-flags-negative", "data-too-long", "data-stream-reserved-bit", "data-flags-16",
    "rst-stream-reserved-bit", "rst-code-negative", "rst-code-33-bits", "wndinc-zero",
    "wndinc-negative", "wndinc-over-2^31-1", "wndinc-stream-reserved-bit",
    "goaway-last-id-reserved-bit", "goaway-last-id-negative", "goaway-code-33-bits",
    "goaway-code-negative", "goaway-debug-too-long", "unknown-type-0", "unknown-type-3",
    "unknown-type-16", "unknown-type-negative", "unknown-body-too-long", "unknown-flags-16",
])
def test_encoders_reject_out_of_range_values(call):
    with pytest.raises(ValueError):
        call()


def test_encoders_accept_the_range_limits():
    # The edges themselves are valid; the tests above must not pass by refusing everything.
    assert decode_frames(encode_rst(MAX_STREAM_ID, 0xFFFFFFFF)) == [Rst(MAX_STREAM_ID, 0xFFFFFFFF)]
    assert decode_frames(encode_wndinc(1, 1)) == [WndInc(1, 1)]
    assert decode_frames(encode_goaway(MAX_STREAM_ID, 0xFFFFFFFF, b"")) == [
        GoAway(MAX_STREAM_ID, 0xFFFFFFFF, b"")]
    assert decode_frames(encode_unknown(4, 0xF, MAX_STREAM_ID)) == [
        Unknown(4, 0xF, MAX_STREAM_ID, b"")]
    assert decode_frames(encode_header(1, 0xF, 3, 0)) == [Data(3, b"", fin=True, syn=True)]


def test_the_data_header_packer_matches_the_checked_encoder():
    from tcprelay.frames import FIN, SYN, encode_data_header, with_syn
    assert encode_data_header(7, 3, FIN) + b"abc" == encode_data(7, b"abc", FIN)
    assert with_syn(encode_data_header(9, 0)) == encode_data(9, b"", SYN)
    assert with_syn(encode_data_header(9, 5, FIN)) == frames.encode_header(
        frames.FrameType.DATA, SYN | FIN, 9, 5)
