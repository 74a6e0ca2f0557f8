"""tcprelay.proxyproto's bytes-only half on its own: encode, header_length, parse.

No sockets: each test runs in microseconds (read_header is covered by the fuzzer
and the relay's tests).
"""

import struct

import pytest

from tcprelay.proxyproto import (
    V1_MAX, V2_SIGNATURE, ProxyHeaderError, encode, header_length, parse,
)

SRC4, DST4 = ("192.0.2.1", 56324), ("198.51.100.7", 8081)
SRC6, DST6 = ("2001:db8::1", 56324), ("2001:db8::2", 8081)


def test_v1_is_haproxys_text_line():
    assert encode("v1", SRC4, DST4) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 8081\r\n"
    assert encode("v1", SRC6, DST6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 8081\r\n"
    assert encode("v1", SRC4, DST6) == b"PROXY UNKNOWN\r\n"   # mixed families


def test_v2_is_the_signature_then_command_family_length_and_addresses():
    header = encode("v2", SRC4, DST4)
    assert header == (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7])
                      + struct.pack(">HH", 56324, 8081))
    header6 = encode("v2", SRC6, DST6)
    assert header6[12:16] == b"\x21\x21\x00\x24" and len(header6) == 16 + 36
    assert encode("v2", SRC6, DST4) == V2_SIGNATURE + b"\x21\x00\x00\x00"


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("source, destination", [(SRC4, DST4), (SRC6, DST6)])
def test_what_is_encoded_parses_back_and_measures_its_own_length(version, source, destination):
    header = encode(version, source, destination)
    assert header_length(header + b"client bytes") == len(header)
    assert parse(header) == (source, destination)


def test_an_ipv6_zone_is_left_out():
    header = encode("v2", ("fe80::1%eth0", 1), ("fe80::2%eth0", 2))
    assert parse(header) == (("fe80::1", 1), ("fe80::2", 2))


def test_an_unknown_version_name_is_a_value_error():
    with pytest.raises(ValueError):
        encode("v3", SRC4, DST4)


def test_header_length_wants_more_bytes_until_it_can_tell():
    v2 = encode("v2", SRC4, DST4)
    for cut in range(16):
        assert header_length(v2[:cut]) is None, cut
    assert header_length(v2[:16]) == len(v2)
    v1 = encode("v1", SRC4, DST4)
    for cut in range(len(v1) - 1):
        assert header_length(v1[:cut]) is None, cut
    assert header_length(v1) == len(v1)


def test_header_length_refuses_what_cannot_start_a_header():
    with pytest.raises(ProxyHeaderError):
        header_length(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyHeaderError):
        header_length(b"PROXY " + b"x" * (V1_MAX - 6))   # no CRLF within the longest line
    assert header_length(b"PROXY " + b"x" * (V1_MAX - 7)) is None


def test_v2_local_and_unmapped_families_carry_no_addresses():
    assert parse(V2_SIGNATURE + b"\x20\x00\x00\x00") == (None, None)   # LOCAL
    local = encode("v2", SRC4, DST4)
    assert parse(local[:12] + b"\x20" + local[13:]) == (None, None)   # LOCAL, addresses ignored
    assert parse(V2_SIGNATURE + b"\x21\x31\x00\x00") == (None, None)   # AF_UNIX
    assert parse(b"PROXY UNKNOWN\r\n") == (None, None)


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),          # version 1 in a v2 header
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),           # too short for its addresses
    b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 8081\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 +80 8081\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 1_0 8081\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 70000 8081\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n",          # the wrong family
    b"PROXY TCP4 192.0.2.1 host 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n",
    b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2",                # no CRLF
    b"HELLO\r\n",
])
def test_malformed_headers_are_refused(header):
    with pytest.raises(ProxyHeaderError):
        parse(header)
