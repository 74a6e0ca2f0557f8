"""The access log (issue 15): one line per public client when it ends, on the
``tcprelay.access`` logger or in ``--access-log FILE`` (reopened on SIGHUP);
a file that cannot be written never stops relaying.

The lines' fields are checked against what each test did (bytes, port, the
service's name, the client's address, how it ended). All on 127.0.0.1 with
ephemeral ports; every blocking call has a timeout.
"""

import logging
import os
import re
import signal
import socket

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, FakeClock, free_port_range, pool_args, wait_until
from helpers.processes import MainRun, quick
from helpers.relay import abort, connect_client, echo_roundtrip, recv_exact, recv_to_eof
from tcprelay import accesslog, muxado
from tcprelay.bridge import _Abort

FIELDS = ["client", "service", "port", "duration", "in", "out", "end"]
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def fields(text):
    """An access line's ``key=value`` pairs, in order, quoted values decoded."""
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', text)
    assert " ".join("%s=%s" % pair for pair in pairs) == text, text   # nothing else on it
    return [(key, value[1:-1] if value.startswith('"') else value) for key, value in pairs]


# -- the line, in numbers and text ----------------------------------------------------------

def test_a_line_has_every_field_in_order():
    text = accesslog.line(("203.0.113.9", 51234), "db", 8081, 12.3454, 1234, 56789, "fin")
    assert text == ("client=203.0.113.9:51234 service=db port=8081 duration=12.345 "
                    "in=1234 out=56789 end=fin")
    reset = accesslog.line(("::1", 5, 0, 0), None, 8082, 0.0004, 0, 7, "service_reset",
                           "STREAM_RESET")
    assert reset == ("client=[::1]:5 service=- port=8082 duration=0.000 in=0 out=7 "
                     "end=service_reset code=STREAM_RESET")


def test_values_that_would_not_read_back_are_quoted():
    for name in ["my db", "-", 'say "hi"', "a=b", "back\\slash", ""]:
        text = accesslog.line(("10.0.0.1", 1), name, 1, 1.0, 0, 0, "fin")
        assert dict(fields(text))["service"] == name.replace("\\", "\\\\").replace('"', '\\"')
    assert "service=café" in accesslog.line(("10.0.0.1", 1), "café", 1, 1.0, 0, 0, "fin")


def test_the_file_timestamp_is_iso_8601_utc_to_the_millisecond():
    assert accesslog.timestamp(0.1234) == "1970-01-01T00:00:00.123Z"
    assert accesslog.timestamp(86399.9996) == "1970-01-02T00:00:00.000Z"
    assert re.match(TIMESTAMP + "$", accesslog.timestamp(1714564800.5))


class Stream(object):
    def __init__(self, error):
        self.error = error


class Ended(object):
    """What ``ending`` reads of a finished Bridge."""

    def __init__(self, abort=None, error=None):
        self._abort = abort
        self.stream = Stream(error)


def test_how_it_ended_comes_from_the_bridge_and_the_stream():
    reset = muxado.StreamResetError(muxado.ErrorCode.STREAM_RESET, "stream reset by peer")
    ended = muxado.SessionClosedError(muxado.ErrorCode.PEER_EOF, "peer closed")
    cases = [
        (Ended(), False, "fin"),
        (Ended(_Abort("idle for 5s", True)), False, "idle"),
        (Ended(_Abort("idle for 5s (the service takes nothing)", True)), False, "idle"),
        (Ended(_Abort("socket read failed: [Errno 104] reset", True)), False, "client_reset"),
        (Ended(_Abort("socket write failed: [Errno 32] pipe", True)), False, "client_reset"),
        (Ended(_Abort("the client reset while waiting for window", True)), False,
         "client_reset"),
        (Ended(_Abort(str(reset), False), reset), False, "service_reset"),
        (Ended(_Abort(str(ended), False), ended), False, "service_gone"),
        (Ended(_Abort(str(ended), False), ended), True, "relay_stopping"),
        (Ended(_Abort("the service has left and the client stopped reading", True)), False,
         "service_gone"),
        (Ended(_Abort("internal error", True)), False, "error"),
    ]
    for bridge, stopping, end in cases:
        assert accesslog.ending(bridge, stopping) == end, (bridge._abort, stopping)
        assert end in accesslog.ENDS


# -- the file, on its own -------------------------------------------------------------------

def test_the_file_is_appended_to_and_reopened_on_request(tmp_path):
    path = str(tmp_path / "access.log")
    with open(path, "w") as f:
        f.write("before\n")
    log = accesslog.AccessFile(path, wall_clock=lambda: 0.25)
    log.write("client=a end=fin")
    os.rename(path, path + ".1")          # logrotate
    log.write("client=b end=fin")         # still the open file: no reopen asked for
    log.reopen()                          # SIGHUP
    log.write("client=c end=fin")
    log.close()
    with open(path + ".1") as f:
        assert f.read() == ("before\n1970-01-01T00:00:00.250Z client=a end=fin\n"
                            "1970-01-01T00:00:00.250Z client=b end=fin\n")
    with open(path) as f:
        assert f.read() == "1970-01-01T00:00:00.250Z client=c end=fin\n"
    assert log.failures == 0


def test_a_file_that_cannot_be_opened_at_first_is_an_error(tmp_path):
    with pytest.raises(accesslog.AccessLogError) as raised:
        accesslog.AccessFile(str(tmp_path / "missing" / "access.log"))
    assert "cannot open the access log" in raised.value.strerror


def test_failed_writes_are_counted_and_told_once_a_minute(logs):
    clock, counted = FakeClock(), []
    log = accesslog.AccessFile("/dev/full", on_failure=lambda: counted.append(1), clock=clock)
    for _ in range(3):
        log.write("client=a end=fin")      # never raises
    assert log.failures == 3 and len(counted) == 3
    told = logs.messages("cannot write the access log", level=logging.WARNING)
    assert told == ["cannot write the access log /dev/full: No space left on device; "
                    "dropping its lines (1 so far), relaying goes on"]
    clock.advance(59)
    log.write("client=a end=fin")
    assert len(logs.messages("cannot write the access log", level=logging.WARNING)) == 1
    clock.advance(1)
    log.write("client=a end=fin")
    told = logs.messages("cannot write the access log", level=logging.WARNING)
    assert len(told) == 2 and told[1].endswith("(5 so far), relaying goes on "
                                               "(and 3 more failures)"), told
    log.close()


def test_a_reopen_that_fails_drops_lines_until_the_path_works_again(tmp_path, logs):
    folder = tmp_path / "logs"
    folder.mkdir()
    path = str(folder / "access.log")
    log = accesslog.AccessFile(path, clock=FakeClock())
    log.write("client=a end=fin")
    os.rename(str(folder), str(tmp_path / "old"))   # the directory is gone
    log.reopen()
    log.write("client=b end=fin")
    assert log.failures == 1
    assert logs.messages("cannot write the access log %s" % path, level=logging.WARNING)
    folder.mkdir()
    log.write("client=c end=fin")
    log.close()
    assert logs.messages("the access log %s is written again (1 lines dropped so far)" % path)
    with open(path) as f:
        assert [line.split(" ", 1)[1] for line in f] == ["client=c end=fin\n"]
    with open(str(tmp_path / "old" / "access.log")) as f:
        assert [line.split(" ", 1)[1] for line in f] == ["client=a end=fin\n"]


# -- a relay's clients ----------------------------------------------------------------------

@pytest.fixture
def env(service_env):
    return service_env


def named_service(env, name="db", **relay_options):
    """(relay, service, public port): a service registered as ``name``."""
    relay = env.relay(**relay_options)
    service = env.service(relay)
    return relay, service, service.register_ok({"name": name})


def access_line(logs, count=1):
    """The access lines on the tcprelay.access logger, once there are ``count``."""
    lines = logs.wait_for("end=", count=count, name="tcprelay.access")
    assert len(logs.messages("end=", name="tcprelay.access")) == count
    return [dict(fields(text)) for text in lines]


def address_of(sock):
    return "%s:%d" % sock.getsockname()[:2]


def assert_client(line, client, port, service="db"):
    """``client``: its address (``address_of``)."""
    assert line["client"] == client
    assert line["port"] == str(port)
    assert line["service"] == service
    assert 0.0 <= float(line["duration"]) < TIMEOUT


def test_a_client_that_finishes_gets_a_fin_line(env, logs):
    relay, service, port = named_service(env)
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"u" * 1000)
    client.shutdown(socket.SHUT_WR)
    stream = service.accept()
    assert recv_exact(stream, 1000) == b"u" * 1000
    assert recv_to_eof(stream) == b""
    stream.sendall(b"d" * 3000)
    stream.close()
    assert recv_to_eof(client) == b"d" * 3000
    client.close()
    line, = access_line(logs)
    assert [key for key, _ in fields(logs.messages("end=", name="tcprelay.access")[0])] == FIELDS
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"]) == ("1000", "3000", "fin")


def test_a_client_that_resets_gets_a_client_reset_line(env, logs):
    relay, service, port = named_service(env, name="web app")
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"hello")
    stream = service.accept()
    assert recv_exact(stream, 5) == b"hello"
    stream.sendall(b"hi")
    assert recv_exact(client, 2) == b"hi"
    abort(client)
    line, = access_line(logs)
    assert line["client"] == where
    assert (line["service"], line["port"]) == ("web app", str(port))
    assert (line["in"], line["out"], line["end"]) == ("5", "2", "client_reset")


def test_a_stream_the_service_resets_gets_its_code(env, logs):
    relay, service, port = named_service(env)
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"abc")
    stream = service.accept()
    assert recv_exact(stream, 3) == b"abc"
    stream.sendall(b"1234567")
    assert recv_exact(client, 7) == b"1234567"
    stream.reset(muxado.ErrorCode.STREAM_RESET)
    line, = access_line(logs)
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"], line["code"]) == (
        "3", "7", "service_reset", "STREAM_RESET")


def test_an_idle_client_gets_an_idle_line(env, logs):
    relay, service, port = named_service(env, idle_timeout=0.3)
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"x" * 10)
    stream = service.accept()
    assert recv_exact(stream, 10) == b"x" * 10
    line, = access_line(logs)
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"]) == ("10", "0", "idle")
    assert float(line["duration"]) >= 0.3


def test_a_client_whose_service_goes_away_gets_a_service_gone_line(env, logs):
    relay, service, port = named_service(env)
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"four")
    stream = service.accept()
    assert recv_exact(stream, 4) == b"four"
    service.close()   # its session ends
    line, = access_line(logs)
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"]) == ("4", "0", "service_gone")


def test_a_client_the_stopping_relay_cuts_gets_a_relay_stopping_line(env, logs):
    relay, service, port = named_service(env)
    client = env.client(port)
    where = address_of(client)
    client.sendall(b"12")
    stream = service.accept()
    assert recv_exact(stream, 2) == b"12"
    env.stop_relay(relay)
    line, = access_line(logs)
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"]) == ("2", "0", "relay_stopping")


def test_a_refused_client_gets_no_access_line(env, logs):
    relay, service, port = named_service(env, max_clients=1)
    first = env.client(port)
    where = address_of(first)
    service.accept()
    try:
        refused = connect_client(port)   # over max_clients: reset at once
    except ConnectionResetError:
        pass   # before connect() returned
    else:
        env.defer(refused.close)
    wait_until(lambda: relay.status()["counters"]["clients_refused"], what="the refusal")
    abort(first)
    line, = access_line(logs)
    assert_client(line, where, port)


def test_with_a_file_the_lines_go_there_not_to_the_logger(env, logs, tmp_path):
    path = str(tmp_path / "access.log")
    relay, service, port = named_service(env, access_log=path)
    service.serve()
    client = env.client(port)
    where = address_of(client)
    assert echo_roundtrip(client, b"e" * 100) == b"e" * 100
    assert recv_to_eof(client) == b""
    client.close()
    env.stop_relay(relay)   # every line is written once it has closed
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and re.match(TIMESTAMP + " client=", lines[0]), lines
    line = dict(fields(lines[0].split(" ", 1)[1]))
    assert_client(line, where, port)
    assert (line["in"], line["out"], line["end"]) == ("100", "100", "fin")
    assert logs.messages("end=", name="tcprelay.access") == []


def test_a_file_that_cannot_be_written_never_stops_relaying(env, warning_logs):
    relay, service, port = named_service(env, access_log="/dev/full")
    service.serve()
    for _ in range(2):
        client = env.client(port)
        assert echo_roundtrip(client, b"z" * 50) == b"z" * 50
        assert recv_to_eof(client) == b""
        client.close()
    wait_until(lambda: relay.status()["counters"]["access_log_failures"].get("") == 2,
               what="both lines counted as dropped")
    told = warning_logs.wait_for("cannot write the access log /dev/full")
    assert len(told) == 1, told


# -- the command line -----------------------------------------------------------------------

def test_access_log_file_reopened_on_sighup(procs, tmp_path):
    ports = free_port_range(3)
    path = str(tmp_path / "access.log")
    relay = procs.relay(ports[0], *quick("--access-log", path, *pool_args(ports[1:])))
    echo, port = procs.echo(ports[0], "--name", "echo one")

    def one_client(data):
        client = connect_client(port)
        try:
            assert echo_roundtrip(client, data) == data
            assert recv_to_eof(client) == b""
            return address_of(client)
        finally:
            client.close()

    def lines(name):
        try:
            with open(name) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    clients = [one_client(b"a" * 11)]
    wait_until(lambda: lines(path), what="the first access line")
    os.rename(path, path + ".1")
    relay.send_signal(signal.SIGHUP)

    def reopened():
        # The handler runs when the signal is delivered, at a time of the kernel's
        # choosing: lines until then still go to the moved file.
        clients.append(one_client(b"b" * 22))
        wait_until(lambda: len(lines(path + ".1")) + len(lines(path)) == len(clients),
                   what="the client's access line")
        return lines(path)

    wait_until(reopened, what="an access line in the reopened file")
    assert relay.alive(), relay.stderr_text()
    old, new = lines(path + ".1"), lines(path)
    assert len(new) == 1 and len(old) == len(clients) - 1, (old, new)
    for text, client, size in zip(old + new, clients, ["11"] + ["22"] * len(clients)):
        assert re.match(TIMESTAMP + " ", text), text
        line = dict(fields(text.split(" ", 1)[1]))
        assert (line["client"], line["service"], line["port"]) == (client, "echo one", str(port))
        assert (line["in"], line["out"], line["end"]) == (size, size, "fin")
    assert "tcprelay.access" not in relay.stderr_text()
    assert "Traceback" not in relay.stderr_text()


def test_access_log_that_cannot_be_opened_stops_the_start(tmp_path):
    ports = free_port_range(2)
    run = MainRun("tcprelay.relay", [ports[0], "--host", LOOPBACK, "--public-bind", LOOPBACK,
                                     "--access-log", str(tmp_path / "missing" / "a.log")]
                  + pool_args(ports[1:]))
    assert run.wait() == 1
    last = run.stderr_lines()[-1]
    assert last.startswith("tcprelay.relay: cannot open the access log "), last
    assert last.endswith("No such file or directory (check --access-log)"), last
