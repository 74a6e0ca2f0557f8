"""Issue 12's leftovers: --max-wait on the service programs, a second Ctrl-C
while a service program stops, the echo server's option table in the README.

The relay runs in process (its state is read to synchronise); the service
programs run as subprocesses, except where the test needs the adapter's
insides to know it is in its close: there ``servicecli.run_service`` runs in this
process's main thread and gets real signals. Everything on 127.0.0.1; every
blocking call has a timeout.
"""

import os
import signal
import socket
import threading
import time

import pytest

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, Worker, bindable, free_port_range, wait_until
from helpers.docs import help_groups, option_tables, readme, section
from helpers.envs import Env
from helpers.processes import assert_clean_exit
from helpers.relay import (
    echo_roundtrip, fill_until_the_adapter_holds, listening_socket, read_until_end,
)
from tcprelay import adapter, echoserver, servicecli
from tcprelay.relay import Relay


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


MIB = 1024 * 1024
SERVICE_PROGRAMS = ["tcprelay.echoserver", "tcprelay.adapter"]


def start_service(procs, module, relay_port, *args):
    """``python -m module 127.0.0.1 RELAY_PORT [127.0.0.1:9] args...`` (the adapter's
    target is never dialled in these tests: they end before any client)."""
    local = ("127.0.0.1:9",) if module == "tcprelay.adapter" else ()
    return procs.start(module, LOOPBACK, relay_port, *(local + args))


# -- item 1: --max-wait -------------------------------------------------------------------

@pytest.mark.parametrize("module", SERVICE_PROGRAMS)
def test_max_wait_0_fails_at_once_when_the_port_asked_for_is_held(env, procs, module):
    relay = env.relay(ports=2)
    held = relay.pool.ports[0]
    env.connect(relay.server_address, port=held)
    started = time.monotonic()
    process = start_service(procs, module, relay.server_address[1], "--port", held,
                            "--max-wait", "0", "--log-level", "warning")
    line = assert_clean_exit(process, 1, "%s: the relay at 127.0.0.1:%d refused us: port %d "
                             "is held by another service"
                             % (module, relay.server_address[1], held))
    assert time.monotonic() - started < 5.0, "it did not fail at once"
    # The problem, and what to do about it, on one line.
    assert "--max-wait 0: give a longer one" in line and "without --port" in line, line
    assert process.stderr_lines() == [line]
    assert process.stdout_rest() == ""
    wait_until(lambda: relay.pool.waiting == 0, what="the relay to forget it")


def test_max_wait_gives_up_when_every_port_stays_taken(env, procs):
    relay = env.relay(ports=1)
    env.connect(relay.server_address)
    started = time.monotonic()
    process = start_service(procs, "tcprelay.echoserver", relay.server_address[1],
                            "--max-wait", "0.5")
    line = assert_clean_exit(process, 1, "tcprelay.echoserver: the relay at")
    assert time.monotonic() - started >= 0.5, "it gave up before --max-wait"
    assert "no port became free within 0.5s" in line and "--max-wait 0.5: give a longer" in line
    assert "--port" not in line, line   # none was asked for
    assert process.stdout_rest() == ""


def test_max_wait_long_enough_gets_the_port_when_it_frees(env, procs):
    relay = env.relay(ports=2)
    held = relay.pool.ports[1]
    holder = env.connect(relay.server_address, port=held)
    process = start_service(procs, "tcprelay.echoserver", relay.server_address[1],
                            "--port", held, "--max-wait", str(TIMEOUT))
    wait_until(lambda: relay.pool.waiting == 1, what="the echo server in line")
    holder.close()
    assert process.readline() == "127.0.0.1:%d" % held
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr_text()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon", "1e10"])
@pytest.mark.parametrize("module", SERVICE_PROGRAMS)
def test_max_wait_bad_values_are_one_line_and_exit_2(procs, module, value):
    process = start_service(procs, module, 9, "--max-wait=" + value)
    assert process.wait() == 2
    lines = process.stderr_lines()
    assert len(lines) == 1, lines
    assert "error: argument --max-wait: %r" % value in lines[0], lines


@pytest.mark.parametrize("module", SERVICE_PROGRAMS)
def test_help_describes_max_wait(procs, module):
    process = procs.start(module, "--help")
    assert process.wait() == 0
    text = " ".join(process.stdout_rest().split())
    assert "--max-wait SECONDS give up (exit 1) when the relay has no port for us" in text, text
    assert "0 fails at once" in text and "(default: wait for as long as it takes)" in text


# -- item 2: a second Ctrl-C quits at once -------------------------------------------------

def test_a_second_ctrl_c_cuts_the_adapters_wait_for_a_local_service_short(env):
    # A client uploads, then finishes; the local service takes none of it. On
    # SIGINT the adapter gives it up to 5 s (DEFAULT_DRAIN_TIMEOUT) to take the
    # rest; a second SIGINT must end that wait at once, exit code 130.
    assert adapter.DEFAULT_DRAIN_TIMEOUT >= 5.0
    relay = env.relay(ports=1)
    cleanups = []
    env.defer(lambda: [fn() for fn in reversed(cleanups)])
    # Small buffers: the adapter keeps part of the upload waiting for the service.
    backend = listening_socket(cleanups, backlog=4, receive_buffer=4096)
    args = adapter.build_parser().parse_args(
        [LOOPBACK, str(relay.server_address[1]), "%s:%d" % backend.getsockname()])
    made = []

    def make(**options):
        made.append(adapter.Adapter((args.relay_host, args.relay_port), args.local, **options))
        return made[0]

    def drive():
        """The client, the local service and the two signals; returns when the
        second was sent, with (the local service's connection, when)."""
        port = wait_until(lambda: made and made[0].server_address, what="the adapter")[1]
        client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        cleanups.append(client.close)
        conn, _ = backend.accept()   # the local service never reads
        cleanups.append(conn.close)
        conn.settimeout(TIMEOUT)
        bridge = fill_until_the_adapter_holds(made[0], client)
        os.kill(os.getpid(), signal.SIGINT)
        # The adapter has left the relay: it is in its close, waiting on the local service.
        wait_until(lambda: relay.pool.stats()["free"] == 1, what="the adapter to leave")
        assert not bridge.join(0), "the adapter did not wait for the local service"
        second = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        return conn, second

    stray = []
    saved = dict((s, signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM))
    driver = Worker(drive, name="driver")
    try:
        code = servicecli.run_service("tcprelay.adapter", args, make)
        ended = time.monotonic()
        conn, second = driver.finish()
    finally:
        for signum in saved:
            signal.signal(signum, lambda number, frame: stray.append(number))
        driver.join(TIMEOUT)
        if driver.is_alive() and made:
            made[0].cut_close()   # a driver stuck on the adapter: end it
        driver.join(TIMEOUT)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert not stray, "signals came after run_service returned: %s" % stray
    assert code == 130, "exit code %r after the second SIGINT" % code
    assert ended - second < 2.0, "the second SIGINT did not cut the close short: %.1fs" % (
        ended - second)
    # The local service's connection is reset, not left half-delivered.
    with pytest.raises(ConnectionResetError):
        while conn.recv(MIB):
            pass


# -- the README's echo server options -------------------------------------------------------

def test_readme_echo_server_options_are_every_option_grouped_as_help():
    lines = section(readme(), "### The echo server's options")
    groups = help_groups(echoserver.build_parser())
    assert option_tables(lines) == [options for _, options in groups]
    text = "\n".join(lines)
    for title, _ in groups[1:]:
        title = title.split(" (")[0]
        assert '"%s"' % title in text, "the README does not name the group %r" % title


# -- sibling: every session ends on a stop, the ones the relay is leaving too ----------------

def start_relay(env, address, ports):
    """A started relay on ``address`` (another relay's, once that one stops accepting)."""
    relay = Relay(address, ports=ports, public_bind=LOOPBACK, handshake_timeout=5.0,
                  waiting_interval=None)
    thread = threading.Thread(target=relay.serve_forever, name="relay serve_forever")
    thread.start()
    env.defer(Env._stop_relay, relay, thread)
    return relay


def test_stopping_ends_clients_on_the_session_a_relay_is_leaving(env, procs):
    # A relay restart: the old relay drains (GOAWAY; its clients may finish for
    # --drain-timeout), the echo server registers with the new one. SIGTERM
    # must end the echo server's clients on the old session too, not wait for
    # them (it waited for the old relay's drain to end).
    ports = free_port_range(2)
    old = env.relay(ports=ports[:1], drain_timeout=TIMEOUT)
    echo, port = procs.echo(old.server_address[1])
    client = env.client(port)
    assert echo_roundtrip(client, b"on the old relay", half_close=False) == b"on the old relay"
    draining = Worker(old.drain, name="old relay draining")
    wait_until(lambda: bindable(old.server_address), what="the old relay to stop listening")
    start_relay(env, old.server_address, ports[1:])
    assert echo.readline() == "127.0.0.1:%d" % ports[1]   # registered with the new relay
    started = time.monotonic()
    echo.send_signal(signal.SIGTERM)
    assert echo.wait() == 0, echo.stderr_text()
    assert time.monotonic() - started < 3.0, "the stop waited for the old relay's drain"
    data, how = read_until_end(client)   # ended with the echo server, not left open
    assert data == b""
    draining.finish()


# -- docs/PROTOCOL.md tells a third party what the relay answers at its service port ------

def test_protocol_md_gives_the_wrong_port_answers_as_the_relay_sends_them():
    from tcprelay import registrar, registration
    with open(os.path.join(ROOT, "docs", "PROTOCOL.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert "debug text `%s`" % registration.TLS_REQUIRED.decode("ascii") in text
    assert "`HTTP/1.0 400 Bad Request`" in text
    for method in registrar._HTTP_METHODS:
        assert "`%s`" % method.decode("ascii") in text, method
