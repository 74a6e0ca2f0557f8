"""PROXY protocol headers, versions 1 and 2, as HAProxy specifies them.

A relay that opens a stream for a client can start it with one of these
headers, so that the service learns the client's real address. ``encode_*``
and ``parse`` work on bytes only; ``read_header`` takes exactly one header
off a socket or stream, leaving the client's own bytes in place.
"""

import ipaddress
import re
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107                      # the longest version 1 header, CRLF included
_V2_FIXED = 16
_PORT = re.compile(r"[0-9]{1,5}\Z")
_V2_ADDRESSES = {0x11: (socket.AF_INET, 12), 0x21: (socket.AF_INET6, 36)}


class ProxyHeaderError(ValueError):
    """Bytes that should start with a PROXY header do not."""


def _family(host):
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def encode_v1(source, destination):
    """The text header for a TCP connection from ``source`` to ``destination`` (host, port)."""
    family = _family(source[0])
    if _family(destination[0]) != family:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if family == socket.AF_INET else "TCP6"
    return ("PROXY %s %s %s %d %d\r\n" % (proto, source[0], destination[0],
                                           source[1], destination[1])).encode("ascii")


def encode_v2(source, destination):
    """The binary header for a TCP connection from ``source`` to ``destination``."""
    family = _family(source[0])
    if _family(destination[0]) != family:
        return V2_SIGNATURE + b"\x21\x00\x00\x00"   # PROXY, UNSPEC: no addresses
    fam = 0x11 if family == socket.AF_INET else 0x21
    body = (socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
            + struct.pack(">HH", source[1], destination[1]))
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack(">H", len(body)) + body


def _unzoned(address):
    # A header has no room for an IPv6 zone ("fe80::1%eth0"), which means
    # nothing off this machine anyway.
    return (address[0].split("%", 1)[0], address[1])


def encode(version, source, destination):
    """``version`` is "v1" or "v2"; ``source`` and ``destination`` are (host, port)."""
    source, destination = _unzoned(source), _unzoned(destination)
    if version == "v1":
        return encode_v1(source, destination)
    if version == "v2":
        return encode_v2(source, destination)
    raise ValueError("PROXY protocol version must be 'v1' or 'v2', not %r" % (version,))


def header_length(data):
    """The length of the header at the start of ``data``, or None if more bytes are needed.

    Raises ``ProxyHeaderError`` if ``data`` cannot start a header.
    """
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        if len(data) < _V2_FIXED:
            return None
        return _V2_FIXED + struct.unpack(">H", data[14:16])[0]
    if data[:6] == b"PROXY "[:len(data)]:
        end = data.find(b"\r\n")
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than %d bytes" % V1_MAX)
        return None
    raise ProxyHeaderError("the stream does not start with a PROXY header")


def parse(header):
    """``(source, destination)`` from one whole header; each None when not given."""
    if header.startswith(V2_SIGNATURE):
        ver_cmd, fam = header[12], header[13]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError("unsupported PROXY header version %d" % (ver_cmd >> 4))
        if ver_cmd & 0xF == 0 or fam not in _V2_ADDRESSES:
            return None, None   # LOCAL, or an address family we do not map
        family, size = _V2_ADDRESSES[fam]
        body = header[_V2_FIXED:]
        if len(body) < size:
            raise ProxyHeaderError("PROXY v2 header too short for its addresses")
        half = (size - 4) // 2
        src_port, dst_port = struct.unpack(">HH", body[2 * half:2 * half + 4])
        return ((socket.inet_ntop(family, body[:half]), src_port),
                (socket.inet_ntop(family, body[half:2 * half]), dst_port))
    if header.startswith(b"PROXY ") and header.endswith(b"\r\n"):
        fields = header[6:-2].decode("ascii", "replace").split(" ")
        if fields[0] == "UNKNOWN":
            return None, None
        if fields[0] not in ("TCP4", "TCP6") or len(fields) != 5:
            raise ProxyHeaderError("malformed PROXY v1 header: %r" % header[:V1_MAX])
        try:
            hosts = [ipaddress.ip_address(field) for field in fields[1:3]]
        except ValueError:
            raise ProxyHeaderError("malformed PROXY v1 header: %r" % header[:V1_MAX])
        # Ports in decimal, 0 to 65535 (int() would take "-1", "+80", "1_0", "70000"),
        # and addresses of the family the protocol names.
        version = 4 if fields[0] == "TCP4" else 6
        if any(host.version != version for host in hosts) or not all(
                _PORT.match(field) and int(field) <= 65535 for field in fields[3:5]):
            raise ProxyHeaderError("malformed PROXY v1 header: %r" % header[:V1_MAX])
        return ((str(hosts[0]), int(fields[3])), (str(hosts[1]), int(fields[4])))
    raise ProxyHeaderError("not a PROXY header")


def read_header(conn):
    """Take one PROXY header off ``conn`` (a socket or muxado stream).

    Reads exactly the header, so what the client sent after it stays to be
    read. Returns ``(source, destination)``. Blocks as ``conn``'s timeout says.
    """
    peeked = conn.recv(V1_MAX, socket.MSG_PEEK)   # what is there now, at least a byte
    while True:
        if not peeked:
            raise ProxyHeaderError("the connection ended before a PROXY header")
        length = header_length(peeked)
        if length is not None:
            break
        # Wait for the 16 fixed bytes of v2, or one more byte of a v1 line.
        want = _V2_FIXED if peeked[:1] == V2_SIGNATURE[:1] else len(peeked) + 1
        more = conn.recv(max(want, len(peeked) + 1), socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(more) <= len(peeked):
            raise ProxyHeaderError("the connection ended inside a PROXY header")
        peeked = more
    header = conn.recv(length, socket.MSG_WAITALL)
    if len(header) < length:
        raise ProxyHeaderError("the connection ended inside a PROXY header")
    return parse(header)
