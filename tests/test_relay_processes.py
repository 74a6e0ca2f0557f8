"""The relay and the echo server as real processes (``python -m``), as a user runs them.

Each test starts its own relay on a random free port range in 20000-32000,
bound to 127.0.0.1 only, and kills every process it started when it ends.
State of another process that nothing can be joined on (its /proc entries,
its log file, the kernel's socket table) is polled with a deadline.
"""

import os
import re
import signal
import socket
import time

import pytest

from helpers.basics import LOOPBACK, MIB, TIMEOUT, Worker, free_port_range, pool_args, wait_until
from helpers.processes import MainRun, assert_no_traceback, quick
from helpers.relay import (
    Streamer, connect_client, echo_roundtrip, listeners, read_until_end, recv_to_eof, sendall_then,
)

OPTIONS = ["--host", "--public-bind", "--public-host", "--ports", "--max-services",
           "--handshake-timeout", "--drain-timeout", "--log-level"]


# -- the transcript ---------------------------------------------------------------------------

def test_transcript_relay_and_echo_server(procs):
    ports = free_port_range(51)   # the service port and its default pool of 50
    relay_port = ports[0]
    relay = procs.relay(relay_port, *quick())
    echo = procs.start("tcprelay.echoserver", LOOPBACK, relay_port)
    # The first stdout line, flushed at once while the server keeps running.
    assert echo.readline() == "127.0.0.1:%d" % (relay_port + 1)
    assert echo.alive()
    # Bound where asked, and only there.
    assert listeners(relay_port) == [LOOPBACK]
    assert listeners(relay_port + 1) == [LOOPBACK]
    # Bytes come back exactly; the client's half-close lands after the last
    # byte in flight, and the echo server half-closes once it has echoed it all.
    data = os.urandom(2 * MIB) + b"end"
    client = connect_client(relay_port + 1)
    try:
        writer = Worker(sendall_then, client, data, lambda: client.shutdown(socket.SHUT_WR))
        assert recv_to_eof(client) == data   # not padded, nothing after
        writer.finish()
    finally:
        client.close()
    small = connect_client(relay_port + 1)
    try:
        small.sendall(b"hello")
        small.shutdown(socket.SHUT_WR)
        assert recv_to_eof(small) == b"hello"
    finally:
        small.close()
    # Both keep running; nothing went wrong.
    assert relay.alive() and echo.alive()
    assert_no_traceback(relay)
    assert_no_traceback(echo)


def test_default_pool_is_the_50_ports_after_the_service_port(procs):
    ports = free_port_range(51)
    relay_port = ports[0]
    procs.relay(relay_port, *quick())
    last, last_port = procs.echo(relay_port, "--port", relay_port + 50)
    assert last_port == relay_port + 50
    beyond = procs.start("tcprelay.echoserver", LOOPBACK, relay_port,
                         "--port", relay_port + 51)
    assert beyond.wait() > 0   # refused: not in the pool
    assert beyond.stdout_rest() == ""
    lines = beyond.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("tcprelay.echoserver: "), lines
    assert str(relay_port + 51) in lines[0]


# -- the command line -------------------------------------------------------------------------

def test_help_describes_every_option(procs):
    process = procs.start("tcprelay.relay", "--help")
    assert process.wait() == 0
    text = process.stdout_rest()
    described = {}
    for option in OPTIONS:
        # "  --option METAVAR   help text", the help text maybe on indented lines below.
        match = re.search(r"^\s+%s(?:[ =]\S+)?(.*(?:\n\s{6,}\S.*)*)" % re.escape(option),
                          text, re.M)
        assert match, "%s missing from --help:\n%s" % (option, text)
        described[option] = " ".join(match.group(1).split())
        assert len(described[option].split()) >= 3, \
            "%s has no help text: %r" % (option, described[option])
    assert "the address each service dialled" in described["--public-host"], \
        described["--public-host"]


def bad_arguments():
    port = 25000   # never bound: every case fails before the relay binds anything
    return [
        ([], "no-port"),
        (["eighty"], "port-not-a-number"),
        (["0"], "port-0"),
        (["70000"], "port-too-big"),
        ([port, "--ports", "abc"], "ports-not-a-range"),
        ([port, "--ports", "25010-25005"], "ports-backwards"),
        ([port, "--ports", "0-10"], "ports-from-0"),
        ([port, "--ports", "65530-65540"], "ports-past-65535"),
        ([port, "--ports", "%d-%d" % (port - 1, port + 1)], "pool-has-service-port"),
        (["65500"], "default-pool-past-65535"),
        ([port, "--max-services", "0"], "max-services-0"),
        ([port, "--max-services", "many"], "max-services-text"),
        ([port, "--handshake-timeout", "-1"], "handshake-negative"),
        ([port, "--drain-timeout", "soon"], "drain-text"),
        ([port, "--log-level", "chatty"], "log-level-unknown"),
        ([port, "--no-such-option"], "unknown-option"),
        ([port, "extra"], "extra-argument"),
    ]


# These run as a child, ``python -m``; the others through main(argv) in this process.
AS_A_CHILD = {"no-port", "pool-has-service-port"}


def run_program(procs, child, module, *args):
    """``module`` run with ``args``, as a child or (for an argument error) in-process."""
    return procs.start(module, *args) if child else MainRun(module, args)


@pytest.mark.parametrize("args, child", [(a, i in AS_A_CHILD) for a, i in bad_arguments()],
                         ids=[i for _, i in bad_arguments()])
def test_bad_arguments_one_line_error_exit_2(procs, args, child):
    # (Were one accepted after all, the relay would bind to 127.0.0.1 only.)
    process = run_program(procs, child, "tcprelay.relay",
                          *(args + ["--host", LOOPBACK, "--public-bind", LOOPBACK]))
    assert process.wait() == 2
    assert process.stdout_rest() == ""
    lines = process.stderr_lines()
    assert len(lines) == 1, process.stderr_text()
    assert "error" in lines[0]
    assert_no_traceback(process)


def test_service_port_in_use_clear_message_exit_1(procs):
    port = free_port_range(1)[0]
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind((LOOPBACK, port))
        holder.listen(1)
        process = procs.start("tcprelay.relay", port, "--host", LOOPBACK,
                              "--public-bind", LOOPBACK)
        assert process.wait() == 1
    finally:
        holder.close()
    lines = process.stderr_lines()
    assert len(lines) == 1, process.stderr_text()
    assert str(port) in lines[0]
    assert "in use" in lines[0].lower()
    assert_no_traceback(process)


@pytest.mark.parametrize("option, value", [
    ("--public-bind", "192.0.2.1"),   # TEST-NET-1: an address this machine does not have
    ("--host", "192.0.2.1"),
])
def test_an_address_this_machine_lacks_is_one_line_and_exit_1(procs, option, value):
    # Nothing is sent anywhere: bind() fails at once for an address not ours.
    port = free_port_range(1)[0]
    args = ["--host", LOOPBACK, "--public-bind", LOOPBACK, option, value]
    process = procs.start("tcprelay.relay", port, *args)
    assert process.wait() == 1
    lines = process.stderr_lines()
    assert len(lines) == 1, process.stderr_text()
    assert value in lines[0] and "check %s" % option in lines[0], lines[0]
    assert "another relay" not in lines[0]   # that hint is for a port in use only
    assert_no_traceback(process)


@pytest.mark.parametrize("module, option", [
    ("tcprelay.relay", "--idle-timeout"), ("tcprelay.relay", "--keepalive"),
    ("tcprelay.relay", "--lease-time"), ("tcprelay.echoserver", "--timeout"),
])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_durations_must_be_finite(procs, module, option, value):
    port = free_port_range(1)[0]
    first = [port] if module == "tcprelay.relay" else [LOOPBACK, port]
    child = (module, option, value) == ("tcprelay.echoserver", "--timeout", "nan")
    process = run_program(procs, child, module, *(first + [option, value]))
    assert process.wait() == 2
    lines = process.stderr_lines()
    assert len(lines) == 1 and "not a finite number" in lines[0], process.stderr_text()


def test_ports_and_public_host_options(procs):
    ports = free_port_range(5)
    relay_port, pool = ports[0], ports[3:5]   # a pool that is not PORT+1...
    procs.relay(relay_port, *quick("--ports", "%d-%d" % tuple(pool),
                                   "--public-host", "relay.example.test"))
    lines = []
    for _ in pool:
        echo = procs.start("tcprelay.echoserver", LOOPBACK, relay_port)
        lines.append(echo.readline())
    assert lines == ["relay.example.test:%d" % port for port in pool]
    assert [listeners(port) for port in pool] == [[LOOPBACK], [LOOPBACK]]
    assert listeners(relay_port + 1) == []


def test_max_services_option(procs):
    ports = free_port_range(3)
    # No leases: a killed service's port must go straight to the one in line.
    relay = procs.relay(ports[0], *quick("--max-services", "1", "--lease-time", "0",
                                         *pool_args(ports[1:])))
    first, first_port = procs.echo(ports[0])
    assert first_port == ports[1]
    second = procs.start("tcprelay.echoserver", LOOPBACK, ports[0])
    # The relay says it put the second one in line although a port is free...
    wait_until(lambda: "waiting in line" in relay.stderr_text(), what="the second in line")
    first.kill()
    # ...and hands it the port the first one held.
    assert second.readline() == "127.0.0.1:%d" % ports[1]


def test_handshake_timeout_option_drops_a_silent_service(procs):
    ports = free_port_range(2)
    procs.relay(ports[0], "--handshake-timeout", "0.5", *pool_args(ports[1:]))
    silent = socket.create_connection((LOOPBACK, ports[0]), timeout=TIMEOUT)
    try:
        started = time.monotonic()
        data, how = read_until_end(silent)   # says nothing; the relay hangs up
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert how == "eof" or isinstance(how, ConnectionResetError), how
    assert 0.4 <= elapsed < 5, elapsed   # 0.5 s, not the default's 10 s


@pytest.mark.parametrize("level, present, absent", [
    ("warning", None, [" INFO ", " DEBUG "]),
    ("debug", " DEBUG ", []),
])
def test_log_level_option(procs, level, present, absent):
    ports = free_port_range(2)
    relay = procs.start("tcprelay.relay", ports[0], "--host", LOOPBACK,
                        "--public-bind", LOOPBACK, "--log-level", level,
                        *quick(*pool_args(ports[1:])))
    wait_until(lambda: not relay.alive() or listeners(ports[0]), what="the relay to listen")
    echo, public = procs.echo(ports[0])
    client = connect_client(public)
    try:
        assert echo_roundtrip(client, b"log me") == b"log me"
        assert recv_to_eof(client) == b""
    finally:
        client.close()
    relay.send_signal(signal.SIGTERM)
    assert relay.wait() == 0
    text = relay.stderr_text()
    if present:
        assert present in text, text
    for word in absent:
        assert word not in text, text


# -- shutdown -------------------------------------------------------------------------------

def test_sigterm_drains_open_clients_then_exits_0(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--handshake-timeout", "1", "--drain-timeout", "10",
                        *pool_args(ports[1:]))
    # --no-reconnect: an echo server that exits when the relay leaves (not the default).
    echo, public = procs.echo(ports[0], "--no-reconnect")
    client = connect_client(public)
    try:
        assert echo_roundtrip(client, b"before", half_close=False) == b"before"
        relay.send_signal(signal.SIGTERM)
        # It stops accepting services and clients...
        wait_until(lambda: not listeners(public) and not listeners(ports[0]),
                   what="the relay to stop listening")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, public), timeout=TIMEOUT).close()
        # ...while the open client carries on to its end.
        assert relay.alive()
        assert echo_roundtrip(client, b"during the drain") == b"during the drain"
        assert recv_to_eof(client) == b""
    finally:
        client.close()
    # The last client is done: exit 0 well before the drain timeout.
    assert relay.wait(timeout=5) == 0
    assert_no_traceback(relay)
    # The relay went away: this echo server says so on one line and exits non-zero.
    assert echo.wait() > 0
    assert echo.stderr_lines()[-1].startswith("tcprelay.echoserver: ")
    assert_no_traceback(echo)


def test_sigint_drain_timeout_resets_the_lingering_client_exits_0(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--handshake-timeout", "1", "--drain-timeout", "1",
                        *pool_args(ports[1:]))
    echo, public = procs.echo(ports[0])
    client = connect_client(public)
    try:
        assert echo_roundtrip(client, b"linger", half_close=False) == b"linger"
        started = time.monotonic()
        relay.send_signal(signal.SIGINT)
        data, how = read_until_end(client)   # the client never finishes
        assert relay.wait() == 0
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert isinstance(how, ConnectionResetError), "client saw %r, not a reset" % (how,)
    assert data == b""
    assert 0.8 <= elapsed < TIMEOUT, "the relay gave the client %.2fs, not ~1s" % elapsed
    assert_no_traceback(relay)


# -- the echo server when the relay is missing ------------------------------------------------

def test_echo_server_exits_when_the_relay_is_unreachable(procs):
    port = free_port_range(1)[0]   # nothing listens there
    echo = procs.start("tcprelay.echoserver", LOOPBACK, port)
    assert echo.wait() > 0
    assert echo.stdout_rest() == ""
    lines = echo.stderr_lines()
    assert len(lines) == 1, echo.stderr_text()
    assert lines[0].startswith("tcprelay.echoserver: ") and str(port) in lines[0]


def test_echo_server_exits_when_the_relay_is_killed(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *quick(*pool_args(ports[1:])))
    # Reconnecting is the default (see the service tests); this is the other choice.
    echo = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--log-level", "warning",
                       "--no-reconnect")
    assert echo.readline() == "127.0.0.1:%d" % ports[1]
    relay.kill()   # SIGKILL: no GOAWAY, just gone
    assert echo.wait() > 0
    lines = echo.stderr_lines()
    assert len(lines) == 1, echo.stderr_text()
    assert lines[0].startswith("tcprelay.echoserver: ") and str(ports[0]) in lines[0]


# -- resources ----------------------------------------------------------------------------------

def _echo_once(port, size):
    """One complete client: connect, send, half-close, read it all back."""
    client = connect_client(port)
    try:
        data = os.urandom(size)
        writer = Worker(sendall_then, client, data, lambda: client.shutdown(socket.SHUT_WR))
        got = recv_to_eof(client)
        writer.finish()
        return got == data
    finally:
        client.close()


def _echo_many(port, count, size):
    return sum(_echo_once(port, size) for _ in range(count))


def test_resources_return_to_baseline_after_services_killed_mid_transfer(procs):
    ports = free_port_range(7)
    relay_port, pool = ports[0], ports[1:]
    # No leases: killed services' ports must come straight back to the pool. Idle
    # pump threads end after 0.2 s (2 s by default), so the wait for the baseline is short.
    relay = procs.relay(relay_port, *quick("--lease-time", "0", "--pump-idle-timeout", "0.2",
                                           *pool_args(pool)),
                        ready="listening for services")
    base_threads, base_files = relay.threads(), relay.open_files()

    echoes = [procs.echo(relay_port) for _ in range(5)]
    assert sorted(port for _, port in echoes) == pool[:5]

    # 150 clients come and go, 30 per service, several at a time.
    workers = [Worker(_echo_many, port, 10, 32 * 1024) for _, port in echoes for _ in range(3)]
    assert sum(worker.finish(4 * TIMEOUT) for worker in workers) == 150

    # 50 more, in the middle of transfers when three of the services are killed.
    streamers = [[Streamer(port, block_size=64 * 1024) for _ in range(10)] for _, port in echoes]
    for group in streamers:
        for streamer in group:
            assert streamer.started.wait(TIMEOUT) and streamer.rounds > 0
    for echo, _ in echoes[:3]:
        echo.kill()
    for group in streamers[:3]:
        outcomes = [streamer.worker.finish() for streamer in group]
        assert outcomes == ["reset"] * 10, outcomes
    for group in streamers[3:]:
        for streamer in group:
            streamer.stop.set()
        outcomes = [streamer.worker.finish() for streamer in group]
        assert outcomes == ["eof"] * 10, outcomes
    for echo, _ in echoes[3:]:
        echo.kill()

    # Everything it took for them is given back...
    def back_to_baseline():
        return (relay.threads(), relay.open_files()) == (base_threads, base_files)
    try:
        wait_until(back_to_baseline, what="the relay's threads and files to go back")
    except AssertionError:
        raise AssertionError("relay threads %d -> %d, open files %d -> %d"
                             % (base_threads, relay.threads(), base_files, relay.open_files()))
    # ...ports included: a new service gets the lowest one, and works.
    echo, port = procs.echo(relay_port)
    assert port == pool[0]
    assert _echo_once(port, 1000)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait() == 0
    assert_no_traceback(relay)
