"""Waits a service or the relay can sit in, and what ends them.

- A wait in line lasts as long as the service is willing to wait: the relay
  repeats its ``waiting`` line every ``waiting_interval`` seconds, so the
  service can tell a queue (lines keep coming) from a dead relay (silence).
  A relay that never repeats it (older tcprelay) keeps the service in line
  until the session itself ends.
- Every stage of a ``RelayServer`` (connecting, registering, waiting in line,
  the backoff between attempts, serving) stops within about a second on
  ``shutdown()`` or ``server_close()``, and the service programs exit 0 on
  SIGINT or SIGTERM in each stage, with a log line and no traceback.

Timings are scaled down: the relay repeats ``waiting`` every 0.3 s, services
give up on a silent relay after 1 s, and a port is held for about 1.5 s
(half as long again as a service's timeout: one that gave up at its timeout
would be gone a good half second before).
"""

import re
import signal
import socket
import subprocess
import time

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, Worker, free_port_range, wait_until
from helpers.envs import Serving
from helpers.relay import echo_roundtrip
from tcprelay import muxado, service
from tcprelay.servicelink import ServiceLink
from tcprelay.echoserver import EchoHandler
from tcprelay.service import RelayGone, RelayServer, connect


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


@pytest.fixture
def procs(procs):
    """conftest's procs, as its plain start function: procs(module, *args)."""
    return procs.start


NOTICE = 0.3          # the relay's waiting_interval in these tests
SILENCE = 1.0         # the service's timeout: a relay silent this long is dead
HELD = 1.5            # how long a port stays taken while someone waits for it (1.5 x SILENCE)
PROMPT = 1.0          # "promptly": a stage cut short ends within this


def still_running_after(worker, seconds):
    """True if ``worker`` is still running ``seconds`` from now (a timed hold, not a sync)."""
    worker.join(seconds)
    return worker.is_alive()


def assert_prompt(fn, what):
    """Run ``fn`` in a thread; it must return within PROMPT seconds."""
    started = time.monotonic()
    worker = Worker(fn, name=what)
    worker.join(PROMPT)
    took = time.monotonic() - started
    assert not worker.is_alive(), "%s did not return within %gs" % (what, PROMPT)
    worker.finish()
    return took


def connects_waiting_for(port):
    """How many TCP sockets are in SYN_SENT towards 127.0.0.1:``port`` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    target = "0100007F:%04X" % port
    return sum(1 for fields in rows if len(fields) > 3 and fields[2] == target
               and fields[3] == "02")


def exit_within(process, seconds):
    """The exit code if ``process`` ends within ``seconds``, else None."""
    try:
        return process.popen.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


# -- the relay repeats waiting -------------------------------------------------------------

def test_relay_repeats_waiting_lines_at_its_interval(env):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    holder = env.service(relay)
    holder.register_ok()
    waiter = env.service(relay)
    registration = waiter.register({"notices": True})
    lines = [registration.reply(timeout=TIMEOUT)]
    # Nobody moves in line, yet the relay speaks up every NOTICE seconds.
    for _ in range(4):
        lines.append(registration.reply(timeout=3 * NOTICE))
    assert lines == [{"status": "waiting", "position": 1, "interval": NOTICE}] * 5, lines
    registration.close()


def test_relay_without_a_waiting_interval_reports_only_moves(env):
    # The old behaviour, kept as an option (and to stand in for older relays).
    relay = env.relay(ports=1, waiting_interval=None)
    holder = env.service(relay)
    holder.register_ok()
    waiter = env.service(relay)
    registration = waiter.register({"notices": True})
    assert registration.reply(timeout=TIMEOUT) == {"status": "waiting", "position": 1}
    with pytest.raises(socket.timeout):
        registration.reply(timeout=3 * NOTICE)
    registration.close()


# -- a service waits in line as long as it is willing to ----------------------------------

@pytest.mark.parametrize("interval", [NOTICE, None], ids=["repeating-relay", "old-relay"])
def test_a_service_waits_in_line_longer_than_its_timeout(env, interval):
    relay = env.relay(ports=1, waiting_interval=interval)
    port = relay.pool.ports[0]
    first = connect(relay.server_address, timeout=TIMEOUT)
    positions = []
    second = Worker(lambda: connect(relay.server_address, timeout=SILENCE,
                                    on_waiting=positions.append), name="connect in line")
    try:
        assert still_running_after(second, HELD), (
            "the service gave up its place in line after %gs: %r"
            % (HELD, second.error))
    finally:
        first.close()
    connection = second.finish()
    env.defer(connection.close)
    assert connection.port == port
    assert positions == [1]   # reported once: repeats of the same place are not news
    env.assert_reaches(port, connection, b"after the wait")


def test_a_relay_gone_silent_while_we_wait_in_line_is_given_up(env):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    first = env.connect(relay.server_address)
    proxy = env.proxy(relay.server_address)
    in_line = []
    second = Worker(lambda: connect(proxy.address, timeout=SILENCE, on_waiting=in_line.append),
                    name="connect in line")
    wait_until(lambda: in_line or not second.is_alive(), what="the service to be in line")
    proxy.freeze()   # the relay's lines stop coming, and nothing closes
    started = time.monotonic()
    with pytest.raises(socket.timeout) as silent:
        second.finish()
    took = time.monotonic() - started
    assert SILENCE * 0.9 <= took <= SILENCE + 2 * NOTICE + 1.0, took
    assert "silent" in str(silent.value), silent.value
    assert first.port == relay.pool.ports[0]


def test_an_old_relay_that_ends_the_session_while_we_wait_is_noticed_at_once(env):
    relay = env.relay(ports=1, waiting_interval=None)
    first = env.connect(relay.server_address)
    in_line = []
    second = Worker(lambda: connect(relay.server_address, timeout=SILENCE,
                                    on_waiting=in_line.append), name="connect in line")
    wait_until(lambda: in_line or not second.is_alive(), what="the service to be in line")
    links = [link for link in relay.services if link.port is None]
    assert len(links) == 1, relay.services
    links[0].close()
    started = time.monotonic()
    with pytest.raises((OSError, muxado.MuxadoError)):
        second.finish()
    assert time.monotonic() - started < PROMPT
    assert not first.closed


def test_max_wait_still_bounds_the_wait(env):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    env.connect(relay.server_address)
    started = time.monotonic()
    with pytest.raises(service.RegistrationRefused) as refused:
        connect(relay.server_address, timeout=SILENCE, max_wait=HELD)
    took = time.monotonic() - started
    # 0.9 x HELD is past SILENCE: a service that gave up at its timeout fails this.
    assert HELD * 0.9 <= took < HELD + PROMPT, took
    assert "no port became free" in refused.value.reason


def test_the_echo_server_waits_in_line_longer_than_its_timeout(env, procs):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    port = relay.pool.ports[0]
    first = connect(relay.server_address, timeout=TIMEOUT)
    try:
        echo = procs("tcprelay.echoserver", LOOPBACK, relay.server_address[1],
                     "--timeout", SILENCE)
        wait_until(lambda: "waiting in line" in echo.stderr_text() or not echo.alive(),
                   what="the echo server to wait in line")
        code = exit_within(echo, HELD)
        assert code is None, "the echo server exited %r while in line:\n%s" % (
            code, echo.stderr_text())
    finally:
        first.close()
    assert echo.readline() == "127.0.0.1:%d" % port
    client = env.client(port)
    assert echo_roundtrip(client, b"served at last") == b"served at last"
    echo.send_signal(signal.SIGTERM)
    assert echo.wait() == 0, echo.stderr_text()
    assert "Traceback" not in echo.stderr_text()


def test_a_service_in_line_gets_no_port_while_the_relay_drains(env):
    relay = env.relay(ports=2, max_services=2, waiting_interval=NOTICE)
    staying, leaving = env.service(relay), env.service(relay)
    port = staying.register_ok()
    leaving.register_ok()
    staying.serve()
    client = env.client(port)   # keeps the drain waiting
    assert echo_roundtrip(client, b"open", half_close=False) == b"open"
    waiter = env.service(relay)
    registration = waiter.register({"notices": True})
    assert registration.reply()["status"] == "waiting"
    draining = Worker(relay.drain, TIMEOUT, name="drain")
    wait_until(lambda: waiter.session.remote_goaway is not None or waiter.session.closed,
               what="the relay's GOAWAY")
    leaving.close()   # a port frees up while the relay drains
    replies = registration.statuses()
    assert "ok" not in replies, "a port was handed out while the relay drained: %s" % replies
    client.close()
    assert draining.finish() is True


class InLineLast(set):
    """The relay's services, those still in line last when iterated."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), key=lambda link: link.port is None))


def test_a_port_freed_as_the_drain_begins_goes_to_no_service_in_line(env, monkeypatch):
    # drain() tells the services to leave one by one. One without clients leaves
    # at once and gives its port back; a service still in line must not get it
    # before its own turn to be told (found under load: ['ok'] above).
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    idle = env.service(relay)
    idle.register_ok()
    waiter = env.service(relay)
    registration = waiter.register({"notices": True})
    assert registration.reply()["status"] == "waiting"
    # The order that loses the port: the registered service is told first, and
    # the one in line only once that one's port is back.
    relay._services = InLineLast(relay._services)
    told = ServiceLink.goaway

    def told_last(link):
        if link.port is None:
            wait_until(lambda: relay.pool.stats()["in_use"] == 0, what="the port back")
        told(link)
    monkeypatch.setattr(ServiceLink, "goaway", told_last)
    draining = Worker(relay.drain, TIMEOUT, name="drain")
    replies = registration.statuses()
    assert "ok" not in replies, "a port was handed out while the relay drained: %s" % replies
    assert draining.finish() is True


# -- shutdown() and server_close() cut every stage short -----------------------------------

STOPS = ["shutdown", "server_close"]


def _stop_promptly(server, how):
    assert_prompt(getattr(server, how), "RelayServer.%s()" % how)


def _assert_activation_ends(activating):
    """server_activate, cut short, raises RelayGone promptly."""
    activating.join(PROMPT)
    assert not activating.is_alive(), "registering went on after shutdown"
    with pytest.raises(RelayGone):
        activating.finish()


@pytest.mark.parametrize("how", STOPS)
def test_stop_while_registering_with_a_peer_that_never_answers(env, how):
    silent = env.listener()   # accepts TCP, never speaks muxado
    server = RelayServer(silent.getsockname(), EchoHandler, bind_and_activate=False,
                         timeout=TIMEOUT)
    env.defer(server.server_close)
    activating = Worker(server.server_activate, name="server_activate")
    conn, _ = silent.accept()
    env.defer(conn.close)
    conn.settimeout(TIMEOUT)
    assert conn.recv(65536)   # the registration request: now it waits for an answer
    _stop_promptly(server, how)
    _assert_activation_ends(activating)
    assert server.connection is None


@pytest.mark.parametrize("how", STOPS)
def test_stop_while_the_tcp_connect_gets_no_answer(env, how):
    # A listener whose backlog is full drops further SYNs: connect() hangs.
    full = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    env.defer(full.close)
    full.bind((LOOPBACK, 0))
    full.listen(0)
    queued = socket.create_connection(full.getsockname(), timeout=TIMEOUT)
    env.defer(queued.close)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        with pytest.raises(socket.timeout):   # the premise: this connect hangs
            probe.connect(full.getsockname())
    finally:
        probe.close()
    server = RelayServer(full.getsockname(), EchoHandler, bind_and_activate=False,
                         timeout=TIMEOUT)
    env.defer(server.server_close)
    activating = Worker(server.server_activate, name="server_activate")
    wait_until(lambda: connects_waiting_for(full.getsockname()[1]) or not activating.is_alive(),
               what="the server's SYN to go unanswered")
    _stop_promptly(server, how)
    _assert_activation_ends(activating)


@pytest.mark.parametrize("how", STOPS)
def test_stop_while_waiting_in_line_for_the_first_registration(env, how):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    env.connect(relay.server_address)
    in_line = []
    server = RelayServer(relay.server_address, EchoHandler, bind_and_activate=False,
                         timeout=SILENCE, on_waiting=in_line.append)
    env.defer(server.server_close)
    activating = Worker(server.server_activate, name="server_activate")
    wait_until(lambda: in_line or not activating.is_alive(), what="the server to be in line")
    _stop_promptly(server, how)
    _assert_activation_ends(activating)
    # It left the line: the relay forgets it.
    wait_until(lambda: relay.pool.waiting == 0, what="the relay to see it leave the line")


@pytest.mark.parametrize("how", STOPS)
def test_stop_while_waiting_in_line_after_losing_the_relay(env, how):
    relay = env.relay(ports=1, waiting_interval=NOTICE, lease_time=0)
    port = relay.pool.ports[0]
    in_line = []
    server = RelayServer(relay.server_address, EchoHandler, timeout=TIMEOUT,
                         on_waiting=in_line.append)
    env.defer(server.server_close)
    serving = Serving(server, reconnect=True)
    other_in_line = []
    other = Worker(lambda: connect(relay.server_address, timeout=TIMEOUT,
                                   on_waiting=other_in_line.append), name="other service")
    wait_until(lambda: other_in_line or not other.is_alive(), what="the other to be in line")
    # The relay drops our server; the other service gets the port, and our
    # server, reconnecting, waits in line behind it.
    [link] = [link for link in relay.services if link.port == port]
    link.close()
    env.defer(other.finish().close)
    wait_until(lambda: in_line or not serving.worker.is_alive(),
               what="the server to wait in line again")
    _stop_promptly(server, how)
    assert serving.result(PROMPT) is None


@pytest.mark.parametrize("how", STOPS)
def test_stop_during_the_backoff_before_the_first_registration(env, logs, how):
    nowhere = (LOOPBACK, free_port_range(1)[0])
    server = RelayServer(nowhere, EchoHandler, bind_and_activate=False, retry=True)
    env.defer(server.server_close)
    activating = Worker(server.server_activate, name="server_activate")
    logs.wait_for("trying again")
    _stop_promptly(server, how)
    _assert_activation_ends(activating)


@pytest.mark.parametrize("how", STOPS)
def test_stop_during_the_backoff_between_reconnects(env, logs, how):
    relay = env.relay(ports=1)
    server = RelayServer(relay.server_address, EchoHandler, timeout=SILENCE)
    env.defer(server.server_close)
    serving = Serving(server, reconnect=True)
    env.stop_relay(relay)
    logs.wait_for("trying again")
    _stop_promptly(server, how)
    assert serving.result(PROMPT) is None


def test_server_close_during_a_reconnect_leaves_no_registration_behind(env):
    # server_close() from another thread while serve_forever reconnects: the
    # connection being made must not outlive it (and hold the port).
    relay = env.relay(ports=1, waiting_interval=NOTICE, lease_time=0)
    port = relay.pool.ports[0]
    holder = env.connect(relay.server_address)
    in_line = []
    server = RelayServer(relay.server_address, EchoHandler, bind_and_activate=False,
                         timeout=SILENCE, on_waiting=in_line.append)
    activating = Worker(server.server_activate, name="server_activate")
    wait_until(lambda: in_line or not activating.is_alive(), what="the server to be in line")
    _stop_promptly(server, "server_close")
    _assert_activation_ends(activating)
    holder.close()
    # The port is free for someone else: nobody registered behind our back.
    after = env.connect(relay.server_address, max_wait=PROMPT)
    assert after.port == port


# -- the service programs on SIGINT and SIGTERM, in each stage -----------------------------

SIGNALS = [signal.SIGTERM, signal.SIGINT]


def _stage_waiting(env, procs, program, extra):
    relay = env.relay(ports=1, waiting_interval=NOTICE)
    env.connect(relay.server_address)
    process = procs(program, LOOPBACK, relay.server_address[1], "--timeout", SILENCE, *extra)
    wait_until(lambda: "waiting in line" in process.stderr_text() or not process.alive(),
               what="%s to wait in line" % program)
    return process


def _stage_connecting(env, procs, program, extra):
    silent = env.listener()
    process = procs(program, LOOPBACK, silent.getsockname()[1], *extra)
    conn, _ = silent.accept()
    env.defer(conn.close)
    conn.settimeout(TIMEOUT)
    assert conn.recv(65536)   # its request: it now waits for an answer that never comes
    return process


def _stage_backoff(env, procs, program, extra):
    nowhere = free_port_range(1)[0]
    process = procs(program, LOOPBACK, nowhere, "--retry", *extra)
    wait_until(lambda: "trying again" in process.stderr_text() or not process.alive(),
               what="%s to back off" % program)
    return process


def _stage_serving(env, procs, program, extra):
    relay = env.relay(ports=1)
    process = procs(program, LOOPBACK, relay.server_address[1], *extra)
    assert process.readline() == "127.0.0.1:%d" % relay.pool.ports[0]
    return process


STAGES = {"connecting": _stage_connecting, "waiting-in-line": _stage_waiting,
          "backoff": _stage_backoff, "serving": _stage_serving}


def _assert_stops_cleanly(process, signum):
    process.send_signal(signum)
    code = exit_within(process, PROMPT + 1.0)   # + the interpreter's own exit
    text = process.stderr_text()
    assert code == 0, "exit %r after %s:\n%s" % (code, signum.name, text)
    assert "Traceback" not in text, text
    assert "%s received; stopping" % signum.name in text, text
    assert re.search(r"INFO tcprelay\.cli: stopped", text), text


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_echo_server_stops_on_a_signal_in_every_stage(env, procs, stage, signum):
    process = STAGES[stage](env, procs, "tcprelay.echoserver", [])
    assert process.alive(), process.stderr_text()
    _assert_stops_cleanly(process, signum)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_the_adapter_stops_on_a_signal_while_waiting_in_line(env, procs, signum):
    backend = env.listener()
    process = _stage_waiting(env, procs, "tcprelay.adapter",
                             ["%s:%d" % backend.getsockname()])
    assert process.alive(), process.stderr_text()
    _assert_stops_cleanly(process, signum)
