"""Who may connect to a public port (issue 16): a service's allow list
(``allow_clients=``, ``--allow-client``, ``"allow"`` in the request) and the
relay's ceiling (``public_allow=``, ``--public-allow``).

A client outside the allowed networks is reset at once, counted on its
service's link (``clients_not_allowed``), logged once a second, and never
becomes a stream: the service's bounded ``accept`` must time out. Every
listener binds loopback only (127.0.0.1, and ::1 where the machine has it);
every blocking call has a timeout; in-process tests run under ``no_leaks``
and fail if tcprelay logs an error.
"""

import socket

import pytest

from helpers.basics import (
    IPV6_PROBLEM, LOOPBACK, TIMEOUT, FakeClock, free_port_range, pool_args, wait_until,
)
from helpers.processes import MainRun, assert_clean_exit
from helpers.relay import checked_echo, echo_roundtrip, link_of, read_until_end
from tcprelay import registration
from tcprelay.service import RegistrationRefused, connect

# How long a refused client's service waits for a stream that must never come.
# The relay decides before the client sees its reset, so this bounds nothing
# but the test's patience for a stream opened in error.
NO_STREAM_WAIT = 0.2


@pytest.fixture
def env(security_env):
    """This module's tests run in a SecurityEnv (conftest)."""
    return security_env


@pytest.fixture
def logs(warning_logs):
    """WARNING and up unless told; wait_for returns every match (conftest)."""
    return warning_logs


def client_outcome(port, host=LOOPBACK):
    """(data, how) for a new client of ``host``:``port`` that only reads: how it
    ended ("eof" or the exception), a reset during connect() included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect((host, port))
        except ConnectionResetError as exc:
            return b"", exc
        return read_until_end(sock)
    finally:
        sock.close()


def assert_refused(connection, port, host=LOOPBACK):
    """A client of ``port`` is reset, and the service never gets its stream."""
    data, how = client_outcome(port, host)
    assert data == b"" and isinstance(how, ConnectionResetError), how
    with pytest.raises(socket.timeout):
        connection.accept(NO_STREAM_WAIT)


def client(port, host=LOOPBACK):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect((host, port))
    return sock


# -- the service's allow list ----------------------------------------------------------------

def test_a_client_outside_the_services_allow_list_is_reset_and_never_reaches_it(env, logs):
    relay = env.relay(ports=1)
    connection = env.connect(relay.server_address, allow_clients=["10.0.0.0/8"])
    assert connection.reply["allow"] == ["10.0.0.0/8"]   # the relay confirms it enforces it
    assert_refused(connection, connection.port)
    link = link_of(relay, connection.port)
    assert (link.clients_not_allowed, link.clients_served) == (1, 0)
    assert logs.wait_for("not in the service's allowed networks") == [
        "service 127.0.0.1:%d: refused a client from 127.0.0.1: not in the service's "
        "allowed networks (10.0.0.0/8)" % connection.session.getsockname()[1]]


def test_a_client_inside_the_services_allow_list_is_served(env):
    relay = env.relay(ports=1)
    connection = env.connect(relay.server_address, allow_clients=["10.0.0.0/8", "127.0.0.1"])
    assert connection.reply["allow"] == ["10.0.0.0/8", "127.0.0.1"]
    env.echo(connection)
    sock = env.client(connection.port)
    assert echo_roundtrip(sock, b"let in") == b"let in"
    link = link_of(relay, connection.port)
    assert (link.clients_not_allowed, link.clients_served) == (0, 1)


def test_refusals_are_counted_each_and_logged_once_a_second(env, logs):
    relay = env.relay(ports=1)
    connection = env.connect(relay.server_address, allow_clients=["192.0.2.0/24"])
    link = link_of(relay, connection.port)
    clock = FakeClock()
    gate = link.log_not_allowed
    gate._clock, gate._stamp = clock, clock.now
    for _ in range(10):
        data, how = client_outcome(connection.port)
        assert isinstance(how, ConnectionResetError), how
    wait_until(lambda: link.clients_not_allowed == 10, what="ten refusals counted")
    clock.wait_calls(10)   # each refusal is logged (or left out) just after it is counted
    assert len(logs.wait_for("allowed networks (192.0.2.0/24)")) == 1
    clock.advance(1.0)
    # The burst's count is told within a second with no further refusal.
    lines = logs.wait_for("allowed networks (192.0.2.0/24)", count=2)
    assert len(lines) == 2 and lines[1].endswith("(and 8 more refusals)"), lines
    with pytest.raises(socket.timeout):
        connection.accept(NO_STREAM_WAIT)


# -- the relay's ceiling -----------------------------------------------------------------------

@pytest.mark.parametrize("ceiling, service_allows, refused_by", [
    (["10.0.0.0/8"], None, "--public-allow (10.0.0.0/8)"),
    (["10.0.0.0/8"], ["127.0.0.0/8"], "--public-allow (10.0.0.0/8)"),
    (["127.0.0.0/8"], ["127.0.0.2/32"], "the service's allowed networks (127.0.0.2/32)"),
    (["127.0.0.0/8", "10.0.0.0/8"], None, None),
    (["127.0.0.0/8"], ["127.0.0.1/32"], None),
], ids=["ceiling-excludes", "ceiling-excludes-service-includes", "service-narrows-ceiling",
        "ceiling-includes", "both-include"])
def test_a_client_must_be_inside_the_relays_ceiling_and_the_services_list(
        env, logs, ceiling, service_allows, refused_by):
    relay = env.relay(ports=1, public_allow=ceiling)
    connection = env.connect(relay.server_address, allow_clients=service_allows)
    link = link_of(relay, connection.port)
    if refused_by is None:
        env.echo(connection)
        assert echo_roundtrip(env.client(connection.port), b"inside") == b"inside"
        assert link.clients_not_allowed == 0
        return
    assert_refused(connection, connection.port)
    assert link.clients_not_allowed == 1
    (line,) = logs.wait_for("refused a client from 127.0.0.1")
    assert line.endswith(": not in " + refused_by), line


def test_the_relay_does_not_tell_a_service_its_ceiling(env):
    relay = env.relay(ports=1, public_allow=["127.0.0.0/8"])
    connection = env.connect(relay.server_address)
    assert "allow" not in connection.reply


def test_a_relay_that_ignores_the_allow_list_is_not_served_through(env, monkeypatch):
    """An older relay takes "allow" as an unknown field and lets anyone in: the
    service library sees no "allow" in the ok and refuses to go on."""
    real_ok_line = registration.ok_line

    def older_ok_line(*args, **kwargs):
        kwargs.pop("allow", None)
        return real_ok_line(*args, **kwargs)

    monkeypatch.setattr(registration, "ok_line", older_ok_line)
    relay = env.relay(ports=1)
    with pytest.raises(RegistrationRefused) as refused:
        env.connect(relay.server_address, allow_clients=["127.0.0.0/8"])
    assert "did not confirm our allow list" in refused.value.reason
    wait_until(lambda: relay.pool.stats()["free"] == 1, what="the port to be free again")


# -- IPv6 ----------------------------------------------------------------------------------------

needs_ipv6 = pytest.mark.skipif(IPV6_PROBLEM is not None, reason=IPV6_PROBLEM or "")


@needs_ipv6
@pytest.mark.parametrize("service_allows, served", [
    (["::1/128"], True),
    (["127.0.0.0/8"], False),    # an IPv4 network never holds an IPv6 client
    (["2001:db8::/32"], False),
], ids=["v6-included", "v4-list", "v6-excluded"])
def test_ipv6_clients_are_held_to_the_allow_list(env, service_allows, served):
    relay = env.relay(ports=1, public_bind="::1")
    connection = env.connect(relay.server_address, allow_clients=service_allows)
    if served:
        env.echo(connection)
        sock = client(connection.port, "::1")
        try:
            assert echo_roundtrip(sock, b"over six") == b"over six"
        finally:
            sock.close()
    else:
        assert_refused(connection, connection.port, "::1")
    assert link_of(relay, connection.port).clients_not_allowed == (0 if served else 1)


# -- bad networks ------------------------------------------------------------------------------

@pytest.mark.parametrize("allow, said", [
    (["not-a-network"], "'allow' holds 'not-a-network', which is not a network"),
    (["10.0.0.0/33"], "'allow' holds '10.0.0.0/33', which is not a network"),
    ("10.0.0.0/8", "'allow' must be a list of networks"),
    ([], "'allow' must list 1 to 64 networks"),
    ([167772160], "'allow' must hold network texts"),
], ids=["text", "prefix-33", "not-a-list", "empty", "integer"])
def test_a_bad_allow_list_in_a_request_is_refused_with_a_reason(env, allow, said):
    relay = env.relay(ports=1)
    service = env.service(relay)
    waiting, reply = service.register({"allow": allow}).final()
    assert waiting == [] and reply["status"] == "error", reply
    assert reply["error"].startswith("bad registration request: " + said), reply
    assert relay.pool.stats()["free"] == 1


def test_a_bad_network_in_allow_clients_is_a_value_error_before_dialling():
    with pytest.raises(ValueError) as error:
        # Port 9 on loopback: were it dialled, the error would be a refused connection.
        connect((LOOPBACK, 9), allow_clients=["10.0.0.300/8"])
    assert "allow_clients holds '10.0.0.300/8'" in str(error.value)


@pytest.mark.parametrize("module, option", [
    ("tcprelay.echoserver", "--allow-client"),
    ("tcprelay.adapter", "--allow-client"),
    ("tcprelay.relay", "--public-allow"),
])
def test_a_bad_network_on_the_command_line_is_one_line_naming_the_option(module, option):
    port = free_port_range(1)[0]
    if module == "tcprelay.relay":
        argv = [port, "--host", LOOPBACK, "--public-bind", LOOPBACK]
    elif module == "tcprelay.adapter":
        argv = [LOOPBACK, port, "127.0.0.1:9"]
    else:
        argv = [LOOPBACK, port]
    process = MainRun(module, argv + [option, "127.0.0.0/8", option, "10.0.0.0/33"])
    line = assert_clean_exit(process, 2, "")
    assert len(process.stderr_lines()) == 1, process.stderr_text()
    assert "argument %s: '10.0.0.0/33' is not a network like 10.0.0.0/8" % option in line, line


def test_cli_allow_client_and_public_allow(procs):
    ports = free_port_range(3)
    relay = procs.relay(ports[0], "--public-allow", "127.0.0.0/8", *pool_args(ports[1:]))
    kept_out, port = procs.echo(ports[0], "--allow-client", "10.0.0.0/8", "--name", "kept")
    data, how = client_outcome(port)   # the reset may come while it connects
    assert data == b"" and isinstance(how, ConnectionResetError), how
    wait_until(lambda: "not in the service's allowed networks (10.0.0.0/8)"
               in relay.stderr_text(), what="the refusal in the relay's log")
    let_in, port = procs.echo(ports[0], "--allow-client", "10.0.0.0/8",
                              "--allow-client", "127.0.0.1", "--name", "let-in")
    checked_echo(port, 64 * 1024)
    assert "Traceback" not in relay.stderr_text(), relay.stderr_text()
