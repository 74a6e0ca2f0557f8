"""Addresses (issue 12): IPv6 literals in brackets (``[::1]:8081``) wherever an
address is handed out, logged or parsed; non-ASCII public host names (IDNA);
the wait for a requested port another service holds; the default public host
(the address the service dialled).

In process on 127.0.0.1 and ::1 (the IPv6 tests are skipped, with the reason,
on a machine without an IPv6 loopback), plus a few ``python -m`` runs.
"""

import re
import socket
import threading

import pytest

from helpers.basics import (
    IPV6_PROBLEM, LOOPBACK, TIMEOUT, Worker, free_port_range, wait_until,
)
from helpers.envs import Env
from helpers.processes import Process
from helpers.relay import recv_exact
from tcprelay import relay as relay_module
from tcprelay import adapter as adapter_module
from tcprelay import registrant, service
from tcprelay.relay import Relay


@pytest.fixture
def env(relay_env):
    """This module's tests run in a Env (conftest)."""
    return relay_env


needs_ipv6 = pytest.mark.skipif(IPV6_PROBLEM is not None, reason=IPV6_PROBLEM or "")


def _free_on_ipv6(port):
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.bind(("::1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def free_ports_both(count):
    """``count`` contiguous ports free on 127.0.0.1 and on ::1."""
    for _ in range(50):
        ports = free_port_range(count)
        if all(_free_on_ipv6(port) for port in ports):
            return ports
    raise RuntimeError("no %d contiguous ports free on both loopbacks" % count)


def relay_v6(env, ports=1, **options):
    """A started relay whose service port and public ports are on ::1."""
    options.setdefault("public_bind", "::1")
    options.setdefault("handshake_timeout", 5.0)
    options.setdefault("waiting_interval", None)
    relay = Relay(("::1", 0), ports=free_ports_both(ports), **options)
    thread = threading.Thread(target=relay.serve_forever, name="relay serve_forever")
    thread.start()
    env.defer(Env._stop_relay, relay, thread)
    return relay


def messages(caplog, name="tcprelay"):
    return [r.getMessage() for r in caplog.records if r.name.startswith(name)]


def assert_reaches(env, service_side, host, port):
    """A client of ``(host, port)`` reaches ``service_side`` (a Service stand-in)."""
    client = socket.create_connection((host, port), timeout=TIMEOUT)
    env.defer(client.close)
    client.settimeout(TIMEOUT)
    stream = service_side.accept()
    client.sendall(b"ping")
    assert recv_exact(stream, 4) == b"ping"


# -- 1. IPv6 literals in brackets ---------------------------------------------------------

@needs_ipv6
def test_ipv6_both_registration_forms_hand_out_bracketed_addresses(env, caplog):
    relay = relay_v6(env, ports=2, public_host="::1")
    first, second = relay.pool.ports
    minimal = env.service(relay)
    # Go's net.SplitHostPort cannot split "::1:8081"; it can "[::1]:8081".
    assert minimal.register_minimal() == ("[::1]:%d" % first).encode("ascii")
    extended = env.service(relay)
    registration = extended.register({"name": "v6"})
    waiting, reply = registration.final()
    registration.close()
    assert (waiting, reply["status"], reply["address"]) == ([], "ok", "[::1]:%d" % second)
    assert_reaches(env, minimal, "::1", first)
    assert_reaches(env, extended, "::1", second)
    logged = "\n".join(messages(caplog))
    assert "public address [::1]:%d" % first in logged, logged
    assert re.search(r"service connected from \[::1\]:\d+", logged), logged
    # No address printed unbracketed: "::1:" followed by a port number.
    assert not re.search(r"(?<!\[)::1:\d", logged), logged


@needs_ipv6
def test_ipv6_relay_server_and_adapter_split_the_address(env):
    relay = relay_v6(env, ports=2, public_host="::1")
    first, second = relay.pool.ports
    server = service.RelayServer(relay.server_address[:2], None)
    env.defer(server.server_close)
    assert server.public_address == "[::1]:%d" % first
    assert server.server_address == ("::1", first)
    # The adapter's HOST:PORT takes an IPv6 literal in brackets; unbracketed,
    # "::1:5432" is ambiguous and refused with the bracketed form to use.
    args = adapter_module.build_parser().parse_args(["::1", "8080", "[::1]:5432"])
    assert args.local == ("::1", 5432)
    adapter = adapter_module.Adapter(relay.server_address[:2], ("::1", 5432))
    env.defer(adapter.server_close)
    assert adapter.public_address == "[::1]:%d" % second
    assert adapter.server_address == ("::1", second)
    assert adapter.local_label == "[::1]:5432"


def test_adapter_refuses_an_unbracketed_ipv6_local_address(capsys):
    with pytest.raises(SystemExit) as exit_info:
        adapter_module.build_parser().parse_args(["::1", "8080", "::1:5432"])
    assert exit_info.value.code == 2
    assert "[::1]:5432" in capsys.readouterr().err


def test_host_options_take_ipv6_literals_in_brackets():
    args = relay_module.build_parser().parse_args(
        ["8080", "--host", "[::1]", "--public-bind", "[::1]", "--public-host", "[::1]"])
    assert (args.host, args.public_bind, args.public_host) == ("::1", "::1", "::1")
    args = relay_module.build_parser().parse_args(["8080", "--host", "::1"])
    assert args.host == "::1"


@needs_ipv6
def test_ipv6_relay_and_echo_server_processes_print_bracketed_addresses():
    ports = free_ports_both(2)
    relay_port, public = ports
    started = []
    try:
        relay = Process("tcprelay.relay", [relay_port, "--host", "::1", "--public-bind", "::1",
                                           "--public-host", "::1", "--ports", public,
                                           "--handshake-timeout", "1", "--drain-timeout", "1"])
        started.append(relay)
        wait_until(lambda: not relay.alive() or "listening" in relay.stderr_text(),
                   what="the relay to start")
        assert relay.alive(), relay.stderr_text()
        echo = Process("tcprelay.echoserver", ["::1", relay_port])
        started.append(echo)
        assert echo.readline() == "[::1]:%d" % public
        wait_until(lambda: "public address [::1]:%d" % public in relay.stderr_text(),
                   what="the relay's registered line")
        text = relay.stderr_text() + echo.stderr_text()
        assert "listening for services on [::1]:%d" % relay_port in text, text
        assert "registered with the relay at [::1]:%d" % relay_port in text, text
        assert not re.search(r"(?<!\[)::1:\d", text), text
        assert "Traceback" not in text, text
    finally:
        for process in reversed(started):
            process.close()


# -- 2. non-ASCII host names ----------------------------------------------------------------

def test_non_ascii_public_host_is_handed_out_in_idna(env):
    # The env fixture fails the test if the relay logs an error (a traceback).
    relay = env.relay(ports=2, public_host="bücher.example")
    first, second = relay.pool.ports
    minimal = env.service(relay)
    assert minimal.register_minimal() == ("xn--bcher-kva.example:%d" % first).encode("ascii")
    extended = env.service(relay)
    registration = extended.register({})
    waiting, reply = registration.final()
    registration.close()
    assert reply["address"] == "xn--bcher-kva.example:%d" % second
    assert_reaches(env, minimal, LOOPBACK, first)


def test_public_host_option_takes_idna_and_refuses_what_it_cannot_encode(capsys):
    parser = relay_module.build_parser()
    assert parser.parse_args(["8080", "--public-host", "Bücher.Example"]).public_host \
        == "xn--bcher-kva.example"
    for bad in ["a" * 64 + ".example", "two words", "relay.example:8081", "a..b"]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["8080", "--public-host", bad])
        assert exit_info.value.code == 2, bad
        err = capsys.readouterr().err
        assert "--public-host" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError):
        Relay((LOOPBACK, 0), ports=[1], public_host="two words", bind_and_activate=False)


# -- 4. a requested port that another service holds -----------------------------------------

def test_a_requested_port_held_by_another_service_is_named_in_the_wait(env, caplog):
    relay = env.relay(ports=3)
    wanted = relay.pool.ports[1]
    holder = env.service(relay)
    assert holder.register_ok({"port": wanted}) == wanted
    waiter = env.service(relay)
    registration = waiter.register({"port": wanted, "notices": True, "name": "waiter"})
    line = registration.reply()
    # Two ports are free: the line says which port it waits for, and why.
    assert line == {"status": "waiting", "position": 1, "port": wanted,
                    "reason": "port %d is held by another service" % wanted}, line
    logged = [m for m in messages(caplog, "tcprelay.relay") if "'waiter'" in m and "line" in m]
    assert logged and "port %d" % wanted in logged[0] and "held" in logged[0], logged
    assert not any("every port is taken" in m for m in messages(caplog)), messages(caplog)
    # One that will not wait is told at once why.
    impatient = env.service(relay)
    refused = impatient.register({"port": wanted, "max_wait": 0})
    waiting, reply = refused.final()
    refused.close()
    assert reply["status"] == "error", reply
    assert "port %d" % wanted in reply["error"] and "held" in reply["error"], reply
    # The holder leaves: the waiter gets its port.
    holder.close()
    waiting, reply = registration.final()
    registration.close()
    assert (reply["status"], reply["port"]) == ("ok", wanted), reply


def test_the_service_library_says_which_port_it_waits_for(env, caplog):
    relay = env.relay(ports=3)
    wanted = relay.pool.ports[2]
    holder = env.service(relay)
    assert holder.register_ok({"port": wanted}) == wanted
    in_line = threading.Event()
    worker = Worker(service.connect, relay.server_address, wanted, "second", TIMEOUT, None,
                    lambda position: in_line.set())
    try:
        assert in_line.wait(TIMEOUT)
        said = [m for m in messages(caplog, "tcprelay.service") if "line" in m]
        assert said and "port %d" % wanted in said[0] and "held" in said[0], said
        assert "every public port is taken" not in said[0], said
    finally:
        holder.close()
        connection = worker.finish()
        connection.close()
    assert connection.port == wanted


# -- 5. the default public host --------------------------------------------------------------

def test_default_public_host_is_the_address_the_service_dialled(env):
    relay = env.relay(ports=1)   # no public_host
    service_side = env.service(relay)
    assert service_side.register_minimal() == ("127.0.0.1:%d" % relay.pool.ports[0]).encode()


@needs_ipv6
def test_default_public_host_of_an_ipv6_relay_is_its_ipv6_address(env):
    relay = relay_v6(env, ports=1)   # no public_host: never "localhost" here
    service_side = env.service(relay)
    registration = service_side.register({})
    waiting, reply = registration.final()
    registration.close()
    assert reply["address"] == "[::1]:%d" % relay.pool.ports[0]


def test_relay_help_says_what_the_default_public_host_is():
    text = relay_module.build_parser().format_help()
    match = re.search(r"^\s+--public-host(?:[ =]\S+)?(.*(?:\n\s{6,}\S.*)*)", text, re.M)
    described = " ".join(match.group(1).split())
    assert "dialled" in described and "default: localhost" not in described, described


# -- siblings: every address handed on ---------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_of_a_link_local_client_drops_the_zone(version):
    # getpeername() of a link-local IPv6 client carries our interface's zone,
    # which no PROXY header can hold (v2 raised OSError; v1 wrote it, unparseable).
    from tcprelay import proxyproto
    header = proxyproto.encode(version, ("fe80::1%eth0", 1234), ("fe80::2%eth0", 8081))
    assert proxyproto.parse(header) == (("fe80::1", 1234), ("fe80::2", 8081))


def test_the_service_library_logs_an_older_relays_waiting_line_as_before():
    assert registrant._why_waiting({"status": "waiting", "position": 2}) \
        == "every public port is taken"
    assert registrant._why_waiting({"status": "waiting", "position": 1, "port": 8081}) \
        == "public port 8081 is held by another service"
    # A relay's text is logged only if it is short printable text.
    assert registrant._why_waiting({"status": "waiting", "port": 8081, "reason": "x\x1b[2J"}) \
        == "public port 8081 is held by another service"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:5432", ("127.0.0.1", 5432)),
    ("[::1]:5432", ("::1", 5432)),
    ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ("db.example:5432", ("db.example", 5432)),
])
def test_split_host_port_takes_what_go_joins(text, expected):
    from tcprelay import addresses
    assert addresses.split_host_port(text) == expected
    assert addresses.join_host_port(*expected) == text


@pytest.mark.parametrize("text", ["::1:5432", "5432", "host:", "host:0", "host:65536",
                                  "[::1]5432", "[::1", "[db.example]:80", ":80"])
def test_split_host_port_refuses_with_a_reason(text):
    from tcprelay import addresses
    with pytest.raises(ValueError) as refused:
        addresses.split_host_port(text)
    assert repr(text) in str(refused.value)


def test_dialled_host_unmaps_ipv4_and_drops_the_zone():
    from tcprelay import addresses
    assert addresses.dialled_host(("::ffff:127.0.0.1", 8080, 0, 0)) == "127.0.0.1"
    assert addresses.dialled_host(("fe80::1%eth0", 8080, 0, 2)) == "fe80::1"
    assert addresses.dialled_host(("10.0.0.1", 8080)) == "10.0.0.1"
