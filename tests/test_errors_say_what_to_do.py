"""Errors that say what to do (issue 12): a wrong port, TLS on one side only,
an HTTP client at the service port, Ctrl-C, --version, the adapter's target,
--max-clients.

In process where the relay's logs are read, through the CLIs (subprocesses)
where stderr and exit codes are the point. Everything on 127.0.0.1; every
blocking call has a timeout.
"""

import logging
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, Worker, free_port_range, wait_until
from helpers.processes import assert_clean_exit
from helpers.relay import echo_handler, echo_roundtrip, read_until_end, server_tls, trusting_tls
import tcprelay
from tcprelay.service import ServicePortError, connect


@pytest.fixture
def env(security_env):
    """This module's tests run in a SecurityEnv (conftest)."""
    return security_env


@pytest.fixture
def logs(warning_logs):
    """WARNING and up unless told; wait_for returns every match (conftest)."""
    return warning_logs


@pytest.fixture
def procs(procs_no_listener_check):
    """Relays started here are not checked for their listeners (conftest)."""
    return procs_no_listener_check


NOT_A_SERVICE_PORT = "does not look like a tcprelay service port"


def _serve_once(handle):
    """A one-connection TCP server on 127.0.0.1 that runs ``handle(sock)``:
    (address, worker to finish)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)

    def serve():
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        with sock:
            sock.settimeout(TIMEOUT)
            handle(sock)

    return listener.getsockname(), Worker(serve, name="one-shot server")


# -- items 6 and 7: what answered at the relay's address -----------------------------------

@pytest.mark.parametrize("options", [{}, {"port": 1}, {"secret": b"a secret of enough length"},
                                     {"allow_clients": ["127.0.0.0/8"]}],
                         ids=["plain", "port", "secret", "allow"])
def test_a_plain_service_at_a_tls_relay_is_told_the_relay_requires_tls(env, logs, options):
    # With an option only the extended form carries, the relay's GOAWAY (which
    # resets our registration stream) was taken for a minimal relay's lost
    # answer: the user was told to drop the option, not to use --tls.
    relay = env.relay(ports=1, tls_context=server_tls())
    if "port" in options:
        options = {"port": relay.pool.ports[0]}
    with pytest.raises(ServicePortError) as info:
        connect(relay.server_address, timeout=TIMEOUT, **options)
    assert "requires TLS" in str(info.value) and "--tls" in str(info.value), info.value
    logged = logs.wait_for("a plain (non-TLS) connection on this TLS service port")
    assert len(logged) == 1 and "needs --tls" in logged[0], logged
    # TLS services are unaffected.
    connection = env.connect(relay.server_address, tls=trusting_tls())
    assert connection.port == relay.pool.ports[0]


def test_a_tls_service_at_a_plain_relay_is_told_to_try_without_tls(env, logs):
    relay = env.relay(ports=1)
    with pytest.raises(ServicePortError) as info:
        connect(relay.server_address, tls=trusting_tls(), timeout=TIMEOUT)
    assert "may not use TLS: try without --tls" in str(info.value), info.value
    logged = logs.wait_for("a TLS handshake on this plain service port")
    assert len(logged) == 1 and "no --tls-cert" in logged[0], logged


def test_a_service_pointed_at_a_public_port_is_told_it_is_not_a_service_port(env):
    # The public port of an echo service echoes our own frames back: a stream
    # "opened" with our parity, which muxado calls a protocol error.
    relay = env.relay(ports=1)
    holder = env.service(relay)
    port = holder.register_ok()
    holder.serve(echo_handler)
    with pytest.raises(ServicePortError) as info:
        connect((LOOPBACK, port), timeout=TIMEOUT)
    message = str(info.value)
    assert NOT_A_SERVICE_PORT in message and "public port" in message, message
    assert "127.0.0.1:%d" % port in message


def test_a_service_pointed_at_another_kind_of_server_is_told_so(no_leaks):
    # An SSH-like server speaks first.
    def banner(sock):
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        read_until_end(sock)

    address, server = _serve_once(banner)
    with pytest.raises(ServicePortError) as info:
        connect(address, timeout=TIMEOUT)
    server.finish()
    assert NOT_A_SERVICE_PORT in str(info.value), info.value


def test_a_server_that_hangs_up_at_once_gets_every_likely_cause(no_leaks):
    address, server = _serve_once(lambda sock: None)
    with pytest.raises(ServicePortError) as info:
        connect(address, timeout=TIMEOUT)
    server.finish()
    message = str(info.value)
    assert "closed the connection before answering" in message, message
    assert "require TLS (--tls)" in message and "not be a tcprelay service port" in message


def test_the_service_cli_says_what_to_try(env, procs):
    tls_relay = env.relay(ports=1, tls_context=server_tls())
    plain = procs.start("tcprelay.echoserver", LOOPBACK, tls_relay.server_address[1])
    line = assert_clean_exit(plain, 1, "tcprelay.echoserver: cannot register")
    assert "requires TLS: connect with --tls" in line, line
    relay = env.relay(ports=1)
    holder = env.service(relay)
    port = holder.register_ok()
    holder.serve(echo_handler)
    lost = procs.start("tcprelay.echoserver", LOOPBACK, port)
    line = assert_clean_exit(lost, 1, "tcprelay.echoserver: cannot register")
    assert NOT_A_SERVICE_PORT in line and "public port" in line, line


# -- item 8: an HTTP client at the service port ---------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_an_http_request_at_the_service_port_gets_a_400_naming_the_public_ports(env, logs,
                                                                                 method):
    ports = free_port_range(3)
    relay = env.relay(ports=ports)
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    try:
        sock.sendall(b"%s / HTTP/1.1\r\nHost: localhost\r\n\r\n" % method.encode())
        data, how = read_until_end(sock)
    finally:
        sock.close()
    assert how == "eof", how   # a FIN after the answer, not a reset
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 Bad Request\r\n"), data
    assert b"Content-Length: %d" % len(body) in head
    assert b"%d-%d" % (ports[0], ports[-1]) in body and b"public port" in body, body
    logged = logs.wait_for("an HTTP request on the service port")
    assert len(logged) == 1 and "%d-%d" % (ports[0], ports[-1]) in logged[0], logged
    assert "WNDINC" not in " ".join(logs.messages("", level=logging.DEBUG))
    # Services still register as before.
    assert env.connect(relay.server_address).port in ports


def test_http_requests_at_the_service_port_are_logged_once_a_second(env, logs):
    relay = env.relay(ports=1)
    for _ in range(5):
        sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
        try:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data, how = read_until_end(sock)
        finally:
            sock.close()
        assert data.startswith(b"HTTP/1.0 400 "), data
    assert len(logs.messages("an HTTP request on the service port")) == 1


# -- item 11: --version -------------------------------------------------------------------

@pytest.mark.parametrize("module", ["tcprelay.relay", "tcprelay.echoserver", "tcprelay.adapter"])
def test_every_cli_has_version(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["python3", "-m", module, "(tcprelay)",
                                            tcprelay.__version__], done.stdout


def test_setup_py_reads_the_one_version():
    with open(ROOT + "/setup.py", encoding="utf-8") as f:
        setup = f.read()
    assert "version=version" in setup and tcprelay.__version__ not in setup


# -- item 10: Ctrl-C ----------------------------------------------------------------------

def test_a_second_ctrl_c_while_draining_quits_at_once(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--ports", "%d-%d" % (ports[1], ports[1]),
                        "--drain-timeout", "60")
    echo, port = procs.echo(ports[0])
    client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        assert echo_roundtrip(client, b"held open", half_close=False) == b"held open"
        relay.send_signal(signal.SIGINT)
        wait_until(lambda: "draining: 1 services, 1 clients open" in relay.stderr_text(),
                   what="the relay to drain")
        started = time.monotonic()
        relay.send_signal(signal.SIGINT)
        assert relay.wait(5.0) == 130
        assert time.monotonic() - started < 5.0
        data, how = read_until_end(client)   # the held client is reset, not left hanging
        assert data == b""
    finally:
        client.close()
    text = relay.stderr_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "SIGINT received again; quitting now" in text, text


def test_one_ctrl_c_still_drains_and_exits_0(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--ports", "%d-%d" % (ports[1], ports[1]),
                        "--drain-timeout", "60")
    relay.send_signal(signal.SIGINT)
    assert relay.wait() == 0
    assert "Traceback" not in relay.stderr_text()


# -- item 12: the adapter's local target ------------------------------------------------------

def test_the_adapter_refuses_its_own_public_address_as_its_target(env, procs):
    ports = free_port_range(1)
    relay = env.relay(ports=ports)
    for target in ("127.0.0.1:%d" % ports[0], "localhost:%d" % ports[0]):
        adapter = procs.start("tcprelay.adapter", LOOPBACK, relay.server_address[1], target)
        line = assert_clean_exit(adapter, 1, "tcprelay.adapter: %s, the local service" % target)
        assert "own public address (127.0.0.1:%d)" % ports[0] in line, line
        assert adapter.stdout_rest() == ""   # no address was announced
        wait_until(lambda: relay.pool.stats()["free"] == 1, what="the port to be free again")


def test_the_adapter_says_at_start_when_its_target_does_not_resolve(env, procs):
    relay = env.relay(ports=1)
    # A label over 63 characters is no host name: refused without any lookup.
    target = "%s.test:5432" % ("a" * 64)
    adapter = procs.start("tcprelay.adapter", LOOPBACK, relay.server_address[1], target)
    line = assert_clean_exit(adapter, 1, "tcprelay.adapter: cannot resolve the local service")
    assert "check LOCAL_HOST:LOCAL_PORT" in line, line
    assert relay.services == []   # it never dialed the relay


def test_the_adapter_warns_at_start_when_its_target_refuses(env, procs):
    relay = env.relay(ports=1)
    closed = free_port_range(1)[0]   # nothing listens there
    adapter, port = procs.service("tcprelay.adapter", relay.server_address[1],
                                  "127.0.0.1:%d" % closed)
    warned = [l for l in adapter.stderr_lines() if "cannot connect to the local service" in l]
    assert len(warned) == 1 and " WARNING " in warned[0] and "refused" in warned[0], \
        adapter.stderr_text()
    assert adapter.alive()   # it serves: the local service may start later


# -- item 13: over --max-clients ----------------------------------------------------------------

def test_over_max_clients_a_bursts_count_is_logged_within_a_second(env, logs):
    relay = env.relay(ports=1, max_clients=1)
    holder = env.service(relay)
    port = holder.register_ok()
    holder.serve(echo_handler)
    admitted = env.client(port)
    assert echo_roundtrip(admitted, b"in", half_close=False) == b"in"
    started = time.monotonic()
    for _ in range(5):
        try:
            sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        except ConnectionResetError:
            continue   # refused so fast that connect() saw the reset
        try:
            data, how = read_until_end(sock)
        finally:
            sock.close()
        assert data == b"" and isinstance(how, ConnectionResetError), how   # refused at once
    # No sixth refusal comes: the count must not wait for one.
    refusals = logs.wait_for("clients already (--max-clients)", count=2, timeout=3.0)
    assert time.monotonic() - started < 2.5
    assert len(refusals) == 2, refusals
    assert "1 clients already" in refusals[0] and "more" not in refusals[0], refusals
    assert refusals[1].endswith("(and 3 more refusals)"), refusals   # 1 + 1 + 3 = 5
    # A refused service connection elsewhere does not swallow these lines.
    assert "refused a service connection" not in " ".join(logs.messages(""))
