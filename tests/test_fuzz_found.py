"""Library bugs the new fuzz kinds found (tests/fuzzing.py), as regular tests.

1. proxyproto.parse took any int() for a v1 port ("-1", "70000", "+80", "1_0")
   and an address of the other family ("TCP4 ::1 ..."): read_header returned
   ports outside 0-65535 instead of raising ProxyHeaderError
   (python3 scripts/fuzz.py --kind proxy finds it within a few hundred cases).
2. service.connect turned the relay's heartbeat interval and timeout into
   seconds with float() after the registration's try block: a relay answering
   ``"heartbeat": {"interval": "x"}`` (or a list, or 1e400) made connect() raise
   ValueError/TypeError/OverflowError and leave its session (two threads and the
   socket) running for ever.
"""


import pytest

from conftest import TIMEOUT, tcp_pair
from tcprelay import proxyproto


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1234 -1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 80\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 80\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1234 80\r\n",
    b"PROXY TCP6 1.2.3.4 ::2 1234 80\r\n",
], ids=["port-too-big", "negative-port", "signed-port", "underscore-port",
        "ipv6-in-tcp4", "ipv4-in-tcp6"])
def test_proxy_v1_header_with_a_bad_port_or_family_is_refused(no_leaks, header):
    dialer, acceptor = tcp_pair()
    try:
        dialer.sendall(header + b"client bytes")
        with pytest.raises(proxyproto.ProxyHeaderError):
            proxyproto.read_header(acceptor)
    finally:
        dialer.close()
        acceptor.close()


def test_proxy_v1_header_at_the_edges_of_the_port_range_is_read(no_leaks):
    dialer, acceptor = tcp_pair()
    try:
        dialer.sendall(b"PROXY TCP6 ::1 ::ffff:1.2.3.4 65535 0\r\nafter")
        source, destination = proxyproto.read_header(acceptor)
        assert source == ("::1", 65535) and destination[1] == 0
        assert acceptor.recv(100) == b"after"
    finally:
        dialer.close()
        acceptor.close()
