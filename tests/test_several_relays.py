"""A service registered with several relays (issue 18): ``RelayServer`` given a
list of relay addresses, and ``--relay HOST:PORT`` repeated on the service
programs.

Two relays on one machine cannot both listen on one public port of one
address, so relay B's public ports are on 127.0.0.2 (Linux routes all of
127/8 to loopback). Every test runs under ``no_leaks`` (thread and fd counts
return) and fails if tcprelay logs an error.
"""

import queue
import re
import signal
import socket

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, free_port_range, wait_until
from helpers.processes import MainRun
from helpers.relay import echo_roundtrip, recv_to_eof
from tcprelay.echoserver import EchoHandler
from tcprelay.service import RelayGone, RelayServer

SECOND_HOST = "127.0.0.2"


@pytest.fixture
def env(service_env):
    return service_env


class RecordingServer(RelayServer):
    """Reports each registration: (relay, public address)."""

    def __init__(self, *args, **kwargs):
        self.registrations = queue.Queue()
        RelayServer.__init__(self, *args, **kwargs)

    def registered(self, previous_address, connection):
        RelayServer.registered(self, previous_address, connection)
        self.registrations.put((connection.relay, connection.address))


def assert_echoes(host, port, data):
    client = socket.create_connection((host, port), TIMEOUT)
    try:
        client.settimeout(TIMEOUT)
        assert echo_roundtrip(client, data) == data
        assert recv_to_eof(client) == b""
    finally:
        client.close()


def two_relays(env, relay_ports=None):
    """Relays A (public ports on 127.0.0.1) and B (on 127.0.0.2) with the same
    two-port pool, whose lower port someone holds at A: (a, b, pool)."""
    ports = free_port_range(4)
    relay_ports = relay_ports or (0, 0)
    pool = ports[:2]
    a = env.relay(pool, port=relay_ports[0], public_bind=LOOPBACK)
    b = env.relay(pool, port=relay_ports[1], public_bind=SECOND_HOST)
    holder = env.connect(a.server_address)
    assert holder.port == pool[0]
    return a, b, pool


def label(relay):
    return "%s:%d" % relay.server_address[:2]


def test_one_server_gets_the_first_relays_port_on_every_relay_and_serves_both(env):
    a, b, pool = two_relays(env)
    server = env.server([a.server_address, b.server_address], EchoHandler,
                        cls=RecordingServer, timeout=TIMEOUT)
    # B's lower port is free: B gave the higher one because A did.
    got = set([server.registrations.get(timeout=TIMEOUT) for _ in range(2)])
    assert got == set([(label(a), "127.0.0.1:%d" % pool[1]),
                       (label(b), "%s:%d" % (SECOND_HOST, pool[1]))])
    assert server.public_address == "127.0.0.1:%d" % pool[1]
    assert server.relay_addresses == [a.server_address[:2], b.server_address[:2]]
    env.serve(server, reconnect=True)
    assert_echoes(LOOPBACK, pool[1], b"through A")
    assert_echoes(SECOND_HOST, pool[1], b"through B")


def test_port_asks_every_relay_for_that_port(env):
    a, b, pool = two_relays(env)
    server = env.server([a.server_address, b.server_address], EchoHandler,
                        cls=RecordingServer, port=pool[1], timeout=TIMEOUT)
    got = set(address for _, address in
              [server.registrations.get(timeout=TIMEOUT) for _ in range(2)])
    assert got == set(["127.0.0.1:%d" % pool[1], "%s:%d" % (SECOND_HOST, pool[1])])


def test_a_relay_lost_the_other_serves_on_and_the_lost_one_is_back_on_the_same_port(env, logs):
    relay_ports = free_port_range(2, low=32100, high=32700)
    a, b, pool = two_relays(env, relay_ports)
    server = env.server([a.server_address, b.server_address], EchoHandler,
                        cls=RecordingServer, timeout=TIMEOUT)
    for _ in range(2):
        server.registrations.get(timeout=TIMEOUT)
    lease_at_b = server.relay_sessions[1].connection.lease
    assert lease_at_b
    serving = env.serve(server, reconnect=True)
    env.stop_relay(b)
    # Its GOAWAY or its connection's end comes first, as it happens: either says it left.
    wait_until(lambda: logs.messages("lost the relay at %s" % label(b))
               or logs.messages("the relay at %s is going away" % label(b)),
               what="the service to notice relay B left")
    assert_echoes(LOOPBACK, pool[1], b"A still serves")
    assert serving.worker.is_alive()
    # B comes back on its address, its lower port free: we get ours back.
    env.relay(pool, port=relay_ports[1], public_bind=SECOND_HOST)
    assert server.registrations.get(timeout=TIMEOUT) == (label(b), "%s:%d" % (SECOND_HOST,
                                                                              pool[1]))
    assert_echoes(SECOND_HOST, pool[1], b"B is back")
    assert_echoes(LOOPBACK, pool[1], b"A never left")
    assert server.relay_sessions[1].connection.lease not in (None, lease_at_b)


def test_the_lease_is_asked_for_at_the_relay_that_comes_back(env, monkeypatch):
    a, b, pool = two_relays(env)
    server = env.server([a.server_address, b.server_address], EchoHandler, timeout=TIMEOUT)
    at_b = server.relay_sessions[1]
    lease = at_b.connection.lease
    options = at_b._registration_options()
    assert options["lease"] == lease and options["port"] == pool[1]


def test_without_reconnect_serve_forever_raises_once_every_relay_is_gone(env):
    a, b, pool = two_relays(env)
    server = env.server([a.server_address, b.server_address], EchoHandler, timeout=TIMEOUT)
    serving = env.serve(server, reconnect=False)
    env.stop_relay(b)
    assert_echoes(LOOPBACK, pool[1], b"A still serves")
    assert serving.worker.is_alive()
    env.stop_relay(a)
    with pytest.raises(RelayGone):
        serving.result()


def test_shutdown_ends_serve_forever_and_every_relays_thread(env):
    a, b, pool = two_relays(env)
    server = env.server([a.server_address, b.server_address], EchoHandler, timeout=TIMEOUT)
    serving = env.serve(server, reconnect=True)
    assert_echoes(SECOND_HOST, pool[1], b"serving")
    server.shutdown()
    assert serving.result() is None
    server.server_close()


def test_an_unreachable_second_relay_is_an_error_at_once_without_retry(env):
    a, _, pool = two_relays(env)
    dead = ("127.0.0.1", free_port_range(1, low=32701, high=32760)[0])
    with pytest.raises(ConnectionRefusedError):
        RelayServer([a.server_address, dead], EchoHandler, timeout=TIMEOUT)


def test_with_retry_a_relay_down_at_start_is_registered_when_it_comes_up(env, logs):
    pool = free_port_range(2)
    b_port = free_port_range(1, low=32100, high=32700)[0]
    a = env.relay(pool, public_bind=LOOPBACK)
    env.connect(a.server_address)   # holds pool[0] at A
    server = env.server([a.server_address, (LOOPBACK, b_port)], EchoHandler,
                        cls=RecordingServer, retry=True, timeout=TIMEOUT)
    assert server.registrations.get(timeout=TIMEOUT) == (label(a), "127.0.0.1:%d" % pool[1])
    logs.wait_for("cannot register with the relay at 127.0.0.1:%d yet" % b_port)
    env.serve(server, reconnect=True)
    assert_echoes(LOOPBACK, pool[1], b"A serves meanwhile")
    b = env.relay(pool, port=b_port, public_bind=SECOND_HOST)
    assert server.registrations.get(timeout=TIMEOUT) == (label(b), "%s:%d" % (SECOND_HOST,
                                                                              pool[1]))
    assert_echoes(SECOND_HOST, pool[1], b"B too")


# -- the service programs ------------------------------------------------------------------

def test_echoserver_with_relay_repeated_prints_one_line_per_relay(env, procs):
    a, b, pool = two_relays(env)
    process = procs.start("tcprelay.echoserver", "--relay", label(a), "--relay", label(b))
    lines = set([process.readline(), process.readline()])
    assert lines == set(["%s 127.0.0.1:%d" % (label(a), pool[1]),
                         "%s %s:%d" % (label(b), SECOND_HOST, pool[1])])
    assert_echoes(LOOPBACK, pool[1], b"A")
    assert_echoes(SECOND_HOST, pool[1], b"B")
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr_text()


@pytest.mark.parametrize("args, message", [
    (["--relay", "127.0.0.1:9", "127.0.0.1", "9"], "either"),
    ([], "give the relay: RELAY_HOST RELAY_PORT, or --relay HOST:PORT"),
    (["--relay", "nowhere"], "'nowhere' is not HOST:PORT"),
    (["127.0.0.1"], "the relay's port after its host"),
])
def test_relay_option_errors(args, message):
    run = MainRun("tcprelay.echoserver", args)
    assert run.wait() == 2
    assert re.search(message, run.stderr_lines()[-1]), run.stderr_text()


def test_adapter_takes_relay_repeated(env, procs):
    a, b, pool = two_relays(env)
    local = env.listener()
    process = procs.start("tcprelay.adapter", "--relay", label(a), "--relay", label(b),
                          "127.0.0.1:%d" % local.getsockname()[1])
    lines = set([process.readline(), process.readline()])
    assert lines == set(["%s 127.0.0.1:%d" % (label(a), pool[1]),
                         "%s %s:%d" % (label(b), SECOND_HOST, pool[1])])
    client = socket.create_connection((SECOND_HOST, pool[1]), TIMEOUT)
    try:
        served, _ = local.accept()
        served.close()
    finally:
        client.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr_text()
