"""The registration lines as bytes (tcprelay/registration.py, I/O-free), and
the one reader of lines over a stream (tcprelay/streamlines.py) on a stand-in
stream: no sockets, no sleeps."""

import json
import socket
import time

import pytest

from tcprelay import registration
from tcprelay.registration import (
    LineSplitter, LineTooLong, RegistrationError, Request, answer_line, challenge_line,
    error_line, ok_line, parse_object, parse_reply, parse_request, ping_line, pong_line,
    waiting_line,
)
from tcprelay.streamlines import DeadlinePassed, StreamLines


# -- the builders: exact bytes ----------------------------------------------------------------

def test_waiting_line_with_only_a_position():
    assert waiting_line(3) == b'{"position": 3, "status": "waiting"}\n'


def test_waiting_line_with_every_field_and_the_interval_in_json_seconds():
    line = waiting_line(1, interval=3.0, port=8081, reason="public port 8081 is held")
    assert line == (b'{"interval": 3, "port": 8081, "position": 1, '
                    b'"reason": "public port 8081 is held", "status": "waiting"}\n')
    assert parse_reply(line.rstrip(b"\n"))["interval"] == 3   # an int: Go refuses 3.0
    assert json.loads(waiting_line(1, interval=4 / 3.0).decode())["interval"] == 1.333


def test_ok_line_minimal():
    assert ok_line("relay.example:8081", 8081) == (
        b'{"address": "relay.example:8081", "port": 8081, "status": "ok", "version": 1}\n')


def test_ok_line_with_a_lease_and_the_heartbeat():
    body = json.loads(ok_line("[::1]:8081", 8081, lease="t0k", lease_time=60.0,
                              heartbeat_timeout=30.0).decode("utf-8"))
    assert body == {"status": "ok", "address": "[::1]:8081", "port": 8081, "version": 1,
                    "lease": "t0k", "lease_seconds": 60,
                    "heartbeat": {"interval": 10, "timeout": 30}}
    assert isinstance(body["heartbeat"]["interval"], int)


def test_ok_line_heartbeat_with_a_fraction():
    body = json.loads(ok_line("h:1", 1, heartbeat_timeout=10.0).decode("utf-8"))
    assert body["heartbeat"] == {"interval": 3.333, "timeout": 10}
    assert "lease" not in body and "lease_seconds" not in body


def test_error_line():
    assert error_line("port 9 is not in this relay's pool") == (
        b'{"error": "port 9 is not in this relay\'s pool", "status": "error"}\n')


def test_error_line_escapes_what_is_not_ascii():
    line = error_line("caf\u00e9\n")
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert line.decode("ascii")   # \u escapes: one line of ASCII
    assert parse_reply(line[:-1])["error"] == "caf\u00e9\n"


def test_challenge_line_carries_the_nonce_as_hex():
    assert challenge_line("hmac-sha256", b"\x00\xffab") == (
        b'{"method": "hmac-sha256", "nonce": "00ff6162", "status": "challenge"}\n')


def test_answer_ping_and_pong_lines():
    assert answer_line("ab12") == b'{"hmac": "ab12"}\n'
    assert ping_line(7) == b'{"ping": 7}\n'
    assert pong_line(7) == b'{"pong": 7}\n'
    # A pong echoes whatever the ping carried.
    assert pong_line([1, "x"]) == b'{"pong": [1, "x"]}\n'


def test_request_encode_and_parse_round_trip():
    request = Request(port=8081, name="web", max_wait=2.5, notices=True, lease="t",
                      heartbeat=True, proxy_protocol="v2", auth="hmac-sha256")
    line = request.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = parse_request(line)
    assert (back.port, back.name, back.max_wait, back.notices, back.lease, back.heartbeat,
            back.proxy_protocol, back.auth) == (8081, "web", 2.5, True, "t", True, "v2",
                                                "hmac-sha256")
    assert not back.minimal


def test_the_minimal_request_is_no_bytes():
    assert Request(minimal=True).encode() == b""
    assert parse_request(b"").minimal
    assert parse_request(b"  \n").minimal


def test_a_request_line_counts_its_newline_against_the_limit():
    body = b'{"name": "x", "pad": "' + b"a" * (registration.MAX_REQUEST - 25) + b'"}'
    assert len(body) == registration.MAX_REQUEST - 1
    assert parse_request(body + b"\n").name == "x"
    with pytest.raises(RegistrationError, match="request longer than 4096 bytes"):
        parse_request(body + b" \n")


@pytest.mark.parametrize("line, says", [
    (b"[1]", "must be a JSON object"),
    (b"{not json", "not a JSON object on one line"),
    (b'{"version": 2}', "version 2 is not supported"),
    (b'{"port": 0}', "'port' must be an integer from 1 to 65535"),
    (b'{"port": true}', "'port' must be an integer"),
    (b'{"heartbeat": "yes"}', "'heartbeat' must be true or false"),
    (b'{"proxy_protocol": "v3"}', "'proxy_protocol'"),
])
def test_parse_request_refuses(line, says):
    with pytest.raises(RegistrationError, match=says):
        parse_request(line)


def test_parse_reply_and_parse_object():
    assert parse_reply(b'{"status": "ok", "port": 1}') == {"status": "ok", "port": 1}
    with pytest.raises(RegistrationError, match="no status"):
        parse_reply(b'{"port": 1}')
    with pytest.raises(RegistrationError, match="no status"):
        parse_reply(b'{"status": 1}')
    assert parse_object(b'{"hmac": "x"}') == {"hmac": "x"}
    for bad in (b"[]", b"\xff", b"nul", b"[" * 100000):
        with pytest.raises(RegistrationError, match="not a JSON object on one line"):
            parse_object(bad)


# -- LineSplitter: bytes in, lines out ----------------------------------------------------------

def test_splitter_gives_complete_lines_and_keeps_the_rest():
    splitter = LineSplitter(16)
    assert splitter.feed(b"ab") == []
    assert splitter.pending == b"ab"
    assert splitter.feed(b"c\n\nde\nf") == [b"abc", b"", b"de"]
    assert splitter.pending == b"f"
    assert splitter.feed(b"\n") == [b"f"]
    assert splitter.pending == b""


def test_splitter_limits_only_what_waits_for_a_newline():
    splitter = LineSplitter(4)
    assert splitter.feed(b"123456789\n1234") == [b"123456789"]   # complete: any length
    with pytest.raises(LineTooLong) as raised:
        splitter.feed(b"5")
    assert isinstance(raised.value, RegistrationError)
    assert raised.value.limit == 4
    assert str(raised.value) == "line longer than 4 bytes"


# -- StreamLines, on a stand-in stream ----------------------------------------------------------

class ScriptedStream(object):
    """Gives its chunks to recv in order (an exception in the list is raised),
    then b"" (the FIN); records the timeouts set."""

    def __init__(self, *chunks):
        self.chunks = list(chunks)
        self.timeouts = []
        self.asked = []

    def settimeout(self, timeout):
        self.timeouts.append(timeout)

    def recv(self, size):
        self.asked.append(size)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk


def test_stream_lines_reads_only_until_a_line_is_complete():
    stream = ScriptedStream(b'{"a"', b': 1}\n{"b": 2}\nrest', b"more")
    lines = StreamLines(stream, 64)
    assert lines.read_line(silence=5.0) == b'{"a": 1}'
    assert stream.chunks == [b"more"]      # the second line came with the first
    assert lines.read_line(silence=5.0) == b'{"b": 2}'
    assert stream.chunks == [b"more"]
    assert lines.read_line(silence=5.0) is None   # "more", then the FIN
    assert lines.rest == b"restmore"
    assert lines.read_line() is None
    assert stream.timeouts == [5.0, 5.0, 5.0, 5.0]
    assert set(stream.asked) == {65}


def test_stream_lines_silence_is_a_plain_timeout():
    lines = StreamLines(ScriptedStream(socket.timeout("quiet")), 64)
    with pytest.raises(socket.timeout) as raised:
        lines.read_line(silence=2.0)
    assert not isinstance(raised.value, DeadlinePassed)


def test_stream_lines_deadline_binding_the_wait_is_deadline_passed():
    stream = ScriptedStream(socket.timeout("quiet"))
    lines = StreamLines(stream, 64)
    with pytest.raises(DeadlinePassed):
        lines.read_line(silence=3600.0, deadline=time.monotonic() + 60.0)
    assert 0 < stream.timeouts[0] <= 60.0


def test_stream_lines_deadline_passed_reads_nothing():
    stream = ScriptedStream(b"x\n")
    with pytest.raises(DeadlinePassed):
        StreamLines(stream, 64).read_line(deadline=time.monotonic() - 1.0)
    assert stream.asked == []


def test_stream_lines_waits_unbounded_without_silence_or_deadline():
    stream = ScriptedStream(b"x\n")
    assert StreamLines(stream, 64).read_line() == b"x"
    assert stream.timeouts == [None]


def test_stream_lines_refuses_a_line_past_its_limit():
    lines = StreamLines(ScriptedStream(b"a" * 5), 4)
    with pytest.raises(LineTooLong):
        lines.read_line()
