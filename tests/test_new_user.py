"""A new user's mistakes (issue 12, helper E): what a fresh user of the README
typed, and what tcprelay should have said.

- an HTTP client at the service port of a relay without --public-host is told
  the host to dial, not "None";
- a relay host given as HOST:PORT in one argument (``localhost:8080``,
  ``[::1]:8080``) is refused saying to give the host and the port apart;
- the adapter names an IPv6 local service in brackets;
- a --name the relay would refuse is an argument error at once, not a
  refusal after connecting.

Everything on 127.0.0.1; every blocking call has a timeout.
"""

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, free_port_range
from helpers.relay import read_until_end
from tcprelay import adapter, echoserver, registration, relay as relay_module, servicecli
from tcprelay import limits
from tcprelay.service import RelayServer, connect


@pytest.fixture
def env(relay_env):
    """This module's tests run in a Env (conftest)."""
    return relay_env


def parse_error(parser, argv, capsys):
    """The one-line error ``parser`` exits 2 with for ``argv``."""
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# -- an HTTP client at the service port ------------------------------------------------------

def test_an_http_request_at_the_service_port_names_the_host_clients_dial(env, caplog):
    # No --public-host: services are handed the address they dialled, so the
    # 400 names that too, never "None".
    ports = free_port_range(2)
    relay = env.relay(ports=ports)
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data, how = read_until_end(sock)
    finally:
        sock.close()
    assert how == "eof", how
    body = data.partition(b"\r\n\r\n")[2]
    assert b"None" not in body, body
    assert b"host 127.0.0.1, ports %d-%d" % (ports[0], ports[-1]) in body, body
    logged = [r.getMessage() for r in caplog.records
              if "an HTTP request on the service port" in r.getMessage()]
    assert len(logged) == 1 and "None" not in logged[0], logged
    assert "host 127.0.0.1, ports %d-%d" % (ports[0], ports[-1]) in logged[0], logged


def test_an_http_request_names_the_public_host_when_one_is_set(env):
    ports = free_port_range(1)
    relay = env.relay(ports=ports, public_host="relay.example.test")
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data, _ = read_until_end(sock)
    finally:
        sock.close()
    assert b"host relay.example.test, ports %d" % ports[0] in data, data


# -- HOST:PORT where a host goes -------------------------------------------------------------

@pytest.mark.parametrize("argv, apart", [
    (["localhost:8080"], "localhost 8080"),
    (["localhost:8080", "8080"], "localhost 8080"),
    (["[::1]:8080", "8080"], "[::1] 8080"),
    (["relay.example:8080", "8080"], "relay.example 8080"),
])
def test_a_relay_host_given_with_its_port_says_to_give_them_apart(capsys, argv, apart):
    for parser in (echoserver.build_parser(), adapter.build_parser()):
        err = parse_error(parser, argv + ["127.0.0.1:5432"] * (parser.prog.endswith("adapter")
                                                               and len(argv) == 2), capsys)
        assert "relay_host" in err and apart in err, err


def test_the_relay_host_option_given_with_a_port_says_to_give_it_alone(capsys):
    err = parse_error(relay_module.build_parser(), ["8080", "--host", "127.0.0.1:8080"], capsys)
    assert "--host" in err and "'127.0.0.1'" in err, err
    err = parse_error(relay_module.build_parser(), ["8080", "--public-host", "relay.example:81"],
                      capsys)
    assert "--public-host" in err and "'relay.example'" in err, err


def test_hosts_without_a_port_still_parse():
    parser = echoserver.build_parser()
    for host, parsed in [("::1", "::1"), ("[::1]", "::1"), ("localhost", "localhost"),
                         ("fe80::1%lo", "fe80::1%lo"), ("127.0.0.1", "127.0.0.1")]:
        assert parser.parse_args([host, "8080"]).relay_host == parsed, host


# -- the adapter's local service, IPv6 ----------------------------------------------------------

def test_the_adapter_names_an_ipv6_local_service_in_brackets(caplog):
    caplog.set_level(logging.WARNING, logger="tcprelay.adapter")
    # Nothing listens there (or this machine has no IPv6): either way a warning.
    adapter._probe(("::1", free_port_range(1)[0]), 0.5)
    warned = [r.getMessage() for r in caplog.records if r.name == "tcprelay.adapter"]
    assert len(warned) == 1, warned
    assert "[::1]:" in warned[0] and " ::1:" not in warned[0], warned


def unresolvable(*args, **kwargs):
    # No lookup leaves the machine: the resolver's answer for a name it lacks.
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_the_adapter_names_an_unresolvable_ipv6_zone_in_brackets(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    with pytest.raises(servicecli.StartError) as info:
        adapter.check_local(("fe80::1%no-such-interface", 5432))
    assert "[fe80::1%no-such-interface]:5432" in str(info.value), info.value


# -- a --name the relay would refuse -------------------------------------------------------------

@pytest.mark.parametrize("name", ["n" * (registration.MAX_NAME + 1), "bad\nname", "\x1b[31m",
                                  "n" * 5000], ids=["65", "newline", "escape", "5000"])
def test_a_name_the_relay_would_refuse_is_an_argument_error(capsys, name):
    for parser in (echoserver.build_parser(), adapter.build_parser()):
        argv = [LOOPBACK, "8080", "--name", name]
        if parser.prog.endswith("adapter"):
            argv.append("127.0.0.1:5432")
        err = parse_error(parser, argv, capsys)
        assert "--name" in err and str(registration.MAX_NAME) in err, err


def test_names_the_relay_takes_still_parse():
    for name in ["echo", "Zürich-服务", "n" * registration.MAX_NAME, "with space"]:
        assert echoserver.build_parser().parse_args([LOOPBACK, "8080", "--name", name]).name \
            == name
        registration.parse_request(registration.Request(name=name).encode())


def test_the_timeout_hint_names_an_ipv6_relay_in_brackets():
    args = echoserver.build_parser().parse_args(["::1", "8080"])
    hint = servicecli._registration_hint(socket.timeout("timed out"), args)
    assert "[::1]:8080" in hint and " ::1:8080" not in hint, hint


# -- the README's printed addresses ------------------------------------------------------------

def readme_printed_addresses():
    """``(relay_host, public_host, printed)`` for every README block line that starts
    a service program and is followed by the address it prints; ``public_host`` is
    the block's --public-host, or None."""
    blocks, block = [], None
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        for line in f:
            if line.strip().startswith("```"):
                if block is not None:
                    blocks.append("".join(block))
                block = [] if block is None else None
            elif block is not None:
                block.append(line)
    found = []
    for block in blocks:
        lines = re.sub(r"\\\n\s*", "", block).splitlines()   # join continued lines
        public = re.search(r"--public-host (\S+)", block)
        for i, line in enumerate(lines[:-1]):
            command = re.match(r"\$ python3 -m tcprelay\.(echoserver|adapter) (\S+) ", line)
            if command:
                printed = lines[i + 1].split("#")[0].strip()
                found.append((command.group(2), public and public.group(1), printed))
    return found


def test_the_readme_shows_the_address_a_service_prints(env):
    examples = readme_printed_addresses()
    assert len(examples) >= 6, examples   # Usage, four adapters, the two security ones
    relay = env.relay(ports=1)
    dialled = {}
    for relay_host, public_host, printed in examples:
        host = printed.rpartition(":")[0]
        if public_host is not None:
            assert host == public_host, (relay_host, printed)
            continue
        if relay_host not in dialled:
            connection = connect((relay_host, relay.server_address[1]), timeout=TIMEOUT)
            dialled[relay_host] = connection.address.rpartition(":")[0]
            connection.close()
        assert host == dialled[relay_host], (
            "the README shows %s after dialling %s; a service prints %s:PORT"
            % (printed, relay_host, dialled[relay_host]))


# -- the service's log of a client it lost -----------------------------------------------------

def test_a_lost_client_is_logged_with_its_address_as_text(no_leaks, caplog):
    caplog.set_level(logging.INFO, logger="tcprelay.service")
    server = RelayServer((LOOPBACK, 1), None, bind_and_activate=False)
    try:
        for address, text in [(("127.0.0.1", 8095), "127.0.0.1:8095"),
                              (("::1", 8095, 0, 0), "[::1]:8095")]:
            caplog.clear()
            server._log_client_gone = limits.LogGate(logging.getLogger("tcprelay.service"),
                                                     logging.INFO)
            try:
                raise ConnectionResetError("reset by the relay")
            except ConnectionResetError:
                server.handle_error(None, address)
            logged = [r.getMessage() for r in caplog.records]
            assert logged == ["client %s: reset by the relay" % text], logged
    finally:
        server.server_close()


# -- --public-bind on one address ----------------------------------------------------------------

def test_a_relay_whose_public_ports_listen_on_one_address_hands_out_that_address(env):
    # The service dials 127.0.0.1; the public ports listen on 127.0.0.2 only
    # (Linux routes all of 127.0.0.0/8 to loopback), so 127.0.0.1:PORT is refused.
    relay = env.relay(ports=1, public_bind="127.0.0.2")
    port = relay.pool.ports[0]
    connection = connect(relay.server_address, timeout=TIMEOUT)
    try:
        assert connection.address == "127.0.0.2:%d" % port
        client = socket.create_connection(("127.0.0.2", port), timeout=TIMEOUT)
        client.close()
    finally:
        connection.close()


@pytest.mark.parametrize("bind", ["0.0.0.0", ""])
def test_public_ports_on_every_interface_hand_out_the_address_dialled(env, bind):
    relay = env.relay(ports=1, public_bind=bind)
    connection = connect(relay.server_address, timeout=TIMEOUT)
    try:
        assert connection.address == "127.0.0.1:%d" % relay.pool.ports[0]
    finally:
        connection.close()


# -- the programs' names ----------------------------------------------------------------------

def test_python_m_tcprelay_names_the_three_programs():
    result = subprocess.run([sys.executable, "-m", "tcprelay"], cwd=ROOT, timeout=TIMEOUT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "cannot be directly executed" not in \
        result.stderr, result.stderr
    for program in ("tcprelay.relay", "tcprelay.echoserver", "tcprelay.adapter"):
        assert "python3 -m %s" % program in result.stderr, result.stderr


@pytest.mark.parametrize("module, script", [(relay_module, "tcprelay-relay"),
                                            (echoserver, "tcprelay-echoserver"),
                                            (adapter, "tcprelay-adapter")])
def test_a_console_script_calls_itself_by_its_own_name(monkeypatch, module, script):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/" + script])
    assert module.build_parser().prog == script
    monkeypatch.setattr(sys, "argv", [module.__file__])   # python3 -m tcprelay.X
    assert module.build_parser().prog == "python3 -m tcprelay." + script.split("-")[1]


# -- a service with a secret at a relay without one ----------------------------------------------

SECRET = b"s" * 32


@pytest.mark.parametrize("relay_secret, warned", [(None, True), (SECRET, False)])
def test_a_service_with_a_secret_is_warned_when_the_relay_does_not_ask_for_it(
        env, caplog, relay_secret, warned):
    caplog.set_level(logging.INFO, logger="tcprelay.service")
    relay = env.relay(ports=1, secret=relay_secret)
    connection = connect(relay.server_address, secret=SECRET, timeout=TIMEOUT)
    connection.close()
    said = [r for r in caplog.records if r.name == "tcprelay.service"
            and "did not ask for our secret" in r.getMessage()]
    assert len(said) == (1 if warned else 0), [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in said)


def test_a_relay_host_that_does_not_resolve_is_named_with_what_to_check(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    args = echoserver.build_parser().parse_args(["relay.invalid", "8080"])
    try:
        connect((args.relay_host, args.relay_port), timeout=TIMEOUT)
    except OSError as exc:
        hint = servicecli._registration_hint(exc, args)
    else:
        raise AssertionError("connect() resolved relay.invalid")
    assert "check the relay's host name, 'relay.invalid'" in hint, hint
