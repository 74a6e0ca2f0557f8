"""The muxado v1 codec on byte strings, against the traffic recorded from the 2014
Go programs (tests/data/muxado-v1-vectors.json). No sockets."""

import binascii
import hashlib
import json
import os

import pytest

from helpers.basics import DATA_DIR
from tcprelay import framesv1
from tcprelay.frames import FIN, SYN, ErrorCode, FrameHandler, ProtocolError
from tcprelay.framesv1 import (
    HEARTBEAT_TYPE, MAX_LENGTH, Data, FrameDecoder, GoAway, Rst, Syn, WndInc, code_from_wire,
    code_to_wire, decode_frames, encode_data_header, encode_goaway, encode_rst, encode_syn,
    encode_wndinc, opens_v1_session, with_syn,
)

with open(os.path.join(DATA_DIR, "muxado-v1-vectors.json"), encoding="utf-8") as f:
    VECTORS = json.load(f)


def unhex(text):
    return binascii.unhexlify(text)


def recorded_v1_streams():
    """(id, bytes, recorded frame dicts) for every direction that speaks v1."""
    out = []
    for s in VECTORS["scenarios"]:
        for direction in ("client_to_server", "server_to_client"):
            if direction + "_frames" in s:   # the v2 relay's side is *_frames_as_v2
                out.append(("%s/%s" % (s["name"], direction),
                            unhex(s[direction + "_hex"]), s[direction + "_frames"]))
    return out


RECORDED = recorded_v1_streams()
IDS = [r[0] for r in RECORDED]


def as_recorded(frame):
    """A decoded frame in the shape of the JSON's *_frames entries (the fields compared)."""
    if isinstance(frame, Syn):
        d = {"type": "SYN", "stream_id": frame.stream_id}
        if frame.priority is not None:
            d["priority"] = frame.priority
        if frame.stream_type is not None:
            d["stream_type"] = frame.stream_type
        return d
    if isinstance(frame, Data):
        d = {"type": "DATA", "stream_id": frame.stream_id, "length": len(frame.payload)}
        if len(frame.payload) > 64:
            d["payload_sha256"] = hashlib.sha256(frame.payload).hexdigest()
        else:
            d["payload_hex"] = binascii.hexlify(frame.payload).decode()
        return d
    if isinstance(frame, Rst):
        return {"type": "RST", "stream_id": frame.stream_id, "error_code": code_to_wire(frame.code)}
    if isinstance(frame, WndInc):
        return {"type": "WNDINC", "stream_id": frame.stream_id, "increment": frame.increment}
    return {"type": "GOAWAY", "last_stream_id": frame.last_stream_id,
            "error_code": code_to_wire(frame.code),
            "debug_hex": binascii.hexlify(frame.debug).decode()}


def recorded_shape(entry, decoded):
    return {k: entry[k] for k in as_recorded(decoded) if k in entry}


@pytest.mark.parametrize("name,data,recorded", RECORDED, ids=IDS)
def test_every_recorded_frame_decodes_as_recorded_and_reencodes_to_its_bytes(
        name, data, recorded):
    decoded = decode_frames(data)
    assert len(decoded) == len(recorded)
    for frame, entry in zip(decoded, recorded):
        assert as_recorded(frame) == recorded_shape(entry, frame), entry
        assert frame.encode()[:8] == unhex(entry["header_hex"])
    assert b"".join(f.encode() for f in decoded) == data


class Calls(FrameHandler):
    """Every handler call, with DATA payload pieces joined per frame."""

    def __init__(self):
        self.calls = []
        self._payload = None

    def data_begin(self, stream_id, flags, length):
        self._payload = bytearray()

    def data_chunk(self, chunk):
        self._payload += chunk

    def data_end(self, stream_id, flags):
        self.calls.append(("data", stream_id, flags, bytes(self._payload)))

    def data(self, stream_id, flags, payload):
        self.calls.append(("data", stream_id, flags, bytes(payload)))

    def extension_syn(self, stream_id, flags, priority, stream_type):
        self.calls.append(("extension_syn", stream_id, flags, priority, stream_type))

    def rst(self, stream_id, code):
        self.calls.append(("rst", stream_id, code))

    def wndinc(self, stream_id, increment):
        self.calls.append(("wndinc", stream_id, increment))

    def goaway(self, last_stream_id, code, debug):
        self.calls.append(("goaway", last_stream_id, code, debug))


def calls_for(*pieces):
    handler = Calls()
    decoder = FrameDecoder(handler)
    for piece in pieces:
        decoder.feed(piece)
    return handler.calls


@pytest.mark.parametrize("name,data,recorded", RECORDED, ids=IDS)
def test_split_at_every_byte_the_calls_are_the_same(name, data, recorded):
    whole = calls_for(data)
    assert whole
    for cut in range(1, len(data)):
        assert calls_for(data[:cut], data[cut:]) == whole, cut
    assert calls_for(*[data[i:i + 1] for i in range(len(data))]) == whole


def test_a_syn_is_an_empty_data_frame_with_syn_and_the_heartbeat_an_extension():
    first = unhex(VECTORS["first_bytes"]["v1_client_registration_syn_first"])
    assert calls_for(first) == [
        ("data", 3, SYN, b""),
        ("extension_syn", 5, 0, 0x7FFFFFFF, HEARTBEAT_TYPE),
    ]
    assert calls_for(encode_syn(7, fin=True)) == [("data", 7, SYN | FIN, b"")]
    # an ordinary stream type is not an extension's
    assert calls_for(encode_syn(9, stream_type=HEARTBEAT_TYPE - 1)) == [("data", 9, SYN, b"")]


def test_go_v1_goaway_is_reported_at_its_fixed_bytes_and_its_claimed_rest_skipped():
    go_goaway = unhex("001300060000000000000004" "00000002")   # claims 19, sends 8
    assert calls_for(go_goaway) == [("goaway", 4, ErrorCode.INTERNAL_ERROR, b"")]
    assert decode_frames(go_goaway) == [GoAway(4, ErrorCode.INTERNAL_ERROR, b"", 19)]
    # A correct GOAWAY keeps the decoder in step: the next frame is read.
    correct = encode_goaway(5, ErrorCode.NO_ERROR, b"bye")
    assert correct == unhex("000b000600000000" "00000005" "00000000") + b"bye"
    assert calls_for(correct + encode_wndinc(5, 4)) == [
        ("goaway", 5, ErrorCode.NO_ERROR, b""), ("wndinc", 5, 4)]


@pytest.mark.parametrize("frame,code", [
    (unhex("0000000000000003"), ErrorCode.PROTOCOL_ERROR),            # type 0
    (unhex("0000000500000003"), ErrorCode.PROTOCOL_ERROR),            # PRI: never accepted
    (unhex("0000001000000003"), ErrorCode.PROTOCOL_ERROR),            # type 16
    (unhex("0000001300000003"), ErrorCode.PROTOCOL_ERROR),            # a v2 DATA+SYN+FIN
    (unhex("0000000200000003"), ErrorCode.FRAME_SIZE_ERROR),          # RST without a code
    (unhex("0008000400000003") + bytes(8), ErrorCode.FRAME_SIZE_ERROR),   # WNDINC of 8
    (unhex("0004060100000003") + bytes(4), ErrorCode.FRAME_SIZE_ERROR),   # SYN: flags say 8
    (unhex("000c060100000003") + bytes(12), ErrorCode.FRAME_SIZE_ERROR),  # SYN over 8
    (unhex("0004000600000000") + bytes(4), ErrorCode.FRAME_SIZE_ERROR),   # GOAWAY under 8
    (unhex("0000000300000000"), ErrorCode.PROTOCOL_ERROR),            # DATA on stream 0
    (unhex("0000000100000000"), ErrorCode.PROTOCOL_ERROR),            # SYN on stream 0
    (unhex("0004000200000000") + bytes(4), ErrorCode.PROTOCOL_ERROR),     # RST on stream 0
])
def test_a_malformed_frame_raises_protocol_error_with_its_code(frame, code):
    with pytest.raises(ProtocolError) as caught:
        calls_for(frame)
    assert caught.value.code == code


def test_bits_go_v1_ignores_are_ignored():
    # top 2 bits of the length, top 3 of the type, top bit of the stream id
    frame = unhex("c003e12380000003") + b"abc"   # flags 0xe1: FIN and bits v1 ignores
    assert calls_for(frame) == [("data", 3, FIN, b"abc")]
    assert calls_for(frame[:5], frame[5:]) == [("data", 3, FIN, b"abc")]


def test_wndinc_of_zero_is_legal_in_v1():
    assert calls_for(encode_wndinc(3, 0)) == [("wndinc", 3, 0)]


def test_error_codes_map_between_v1_numbers_and_v2_meanings():
    assert [code_from_wire(n) for n in range(8)] == [
        ErrorCode.NO_ERROR, ErrorCode.PROTOCOL_ERROR, ErrorCode.INTERNAL_ERROR,
        ErrorCode.FLOW_CONTROL_ERROR, ErrorCode.STREAM_CLOSED, ErrorCode.FRAME_SIZE_ERROR,
        ErrorCode.STREAM_REFUSED, ErrorCode.STREAM_CANCELLED]
    assert code_from_wire(8) == ErrorCode.INTERNAL_ERROR
    for n in range(8):
        assert code_to_wire(code_from_wire(n)) == n
    # Go v1 refuses to write a code over 7: every v2 code maps into 0-7
    assert all(0 <= code_to_wire(code) <= 7 for code in ErrorCode)
    assert code_to_wire(ErrorCode.STREAM_RESET) == 7            # CANCEL
    assert code_to_wire(ErrorCode.ACCEPT_QUEUE_FULL) == 6       # REFUSED_STREAM
    assert encode_rst(4, ErrorCode.STREAM_REFUSED) == unhex("0004000200000004" "00000006")


def test_with_syn_puts_a_syn_frame_first_and_alone_for_an_empty_announcement():
    assert with_syn(encode_data_header(4, 0)) == unhex("0000000100000004")
    assert with_syn(encode_data_header(4, 0, FIN)) == unhex("0000000100000004" "0000010300000004")
    assert with_syn(encode_data_header(4, 13)) == unhex("0000000100000004" "000d000300000004")
    assert encode_data_header(6, MAX_LENGTH, FIN) == unhex("3fff010300000006")


def test_the_first_bytes_tell_v1_from_v2():
    first = VECTORS["first_bytes"]
    assert opens_v1_session(unhex(first["v1_client_registration_syn_first"]))
    assert opens_v1_session(unhex(first["v1_client_heartbeat_syn_first"]))
    assert not opens_v1_session(unhex(first["v2_client_open_halfclose"]))
    assert not opens_v1_session(unhex(first["v2_client_open_write_hello"]))
    assert not opens_v1_session(b"\x00\x00\x00")   # too short to tell
    assert not opens_v1_session(b"GET / HTTP/1.0\r\n")


def test_encoders_refuse_what_go_v1_cannot_read():
    with pytest.raises(ValueError):
        framesv1.encode_data(3, bytes(MAX_LENGTH + 1))
    with pytest.raises(ValueError):
        encode_syn(0)
    assert framesv1.PAD_FRAME == b""   # nothing may pad a v1 GOAWAY: v1 skips no frame
