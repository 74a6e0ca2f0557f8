"""Replicas behind one public port (issue 16, groups): services that register
with the same ``group`` and prove its key share one public port; the relay
gives each new client to the member in rotation with the fewest clients, ties
in turn; a member's end resets only its clients; health checks take a member
out of rotation and back; the port returns to the pool with the last member.

Real loopback sockets; every blocking call has a timeout; in-process tests
run under ``no_leaks`` and fail if tcprelay logs an error. Waits are on log
lines, clients' own ends, or (``wait_until``) relay state only polling shows.
"""

import os
import socket
import threading

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, free_port_range, pool_args, wait_until
from helpers.processes import assert_clean_exit, quick
from helpers.relay import Streamer, connect_client, echo_handler, echo_roundtrip
from tcprelay import auth, muxado, registration
from tcprelay.groups import pick
from tcprelay.service import RegistrationRefused, RelayGone

KEY = b"the web group's key"
KEYS = {"web": KEY}
# A member quickly out of rotation; back in, a probe still has 0.25 s to be
# answered (at 0.05 s a loaded machine's stall took it out again: CI, 3.9).
FAST_HEALTH = {"interval": 0.25, "failures": 2}
# A member that must stay in rotation under a loaded machine's delays.
PATIENT_HEALTH = {"interval": 1.0, "failures": 5}


@pytest.fixture
def env(security_env):
    """This module's tests run in a SecurityEnv (conftest)."""
    return security_env


@pytest.fixture
def logs(warning_logs):
    return warning_logs


class Member(object):
    """A group member served by the test: every stream echoed, the streams that
    carried data counted (``served``)."""

    def __init__(self, env, relay, **options):
        options.setdefault("group", "web")
        options.setdefault("group_key", KEY)
        self.connection = env.connect(relay.server_address, **options)
        self.served = 0
        self._lock = threading.Lock()
        self._thread = None
        self._handlers = []
        env.defer(self.stop)

    def serve(self):
        self._thread = threading.Thread(target=self._run, name="test group member")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _run(self):
        while True:
            try:
                stream = self.connection.accept()
            except (OSError, muxado.MuxadoError):
                return
            stream.settimeout(TIMEOUT)
            handler = threading.Thread(target=self._echo, args=(stream,), name="test echo")
            handler.daemon = True
            with self._lock:
                self._handlers.append(handler)
            handler.start()

    def _echo(self, stream):
        try:
            first = stream.recv(256 * 1024)
        except (OSError, muxado.MuxadoError):
            stream.close()
            return
        if first:
            with self._lock:
                self.served += 1
            try:
                stream.sendall(first)
            except (OSError, muxado.MuxadoError):
                pass
        echo_handler(stream)

    def link(self, relay):
        """The relay's ServiceLink of this member."""
        here = self.connection.session.getsockname()
        links = [link for link in relay.services if link.address[:2] == here[:2]]
        assert len(links) == 1, relay.services
        return links[0]

    def kill(self):
        """The member's connection is lost: no goodbye, as when its process dies."""
        self.connection.session._sock.shutdown(socket.SHUT_RDWR)

    def stop(self):
        self.connection.close()
        if self._thread is not None:
            self._thread.join(TIMEOUT)
            assert not self._thread.is_alive(), "member still accepting"
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.join(TIMEOUT)
            assert not handler.is_alive(), "echo handler still running"


def group_relay(env, ports=1, **options):
    options.setdefault("group_keys", KEYS)
    return env.relay(ports=ports, **options)


def held_clients(port, count):
    """``count`` clients of ``port``, each echoed once and left open."""
    clients = []
    for index in range(count):
        sock = connect_client(port)
        clients.append(sock)
        data = b"client %d" % index
        sock.sendall(data)
        assert sock.recv(len(data)) == data
    return clients


def close_all(socks):
    for sock in socks:
        sock.close()


# -- the choice of a member, in numbers ---------------------------------------------------

@pytest.mark.parametrize("loads, after, chosen", [
    ([], -1, None),
    ([0, 0, 0], -1, 0),
    ([0, 0, 0], 0, 1),
    ([0, 0, 0], 2, 0),              # ties go round
    ([3, 1, 2], -1, 1),             # the least loaded, wherever the turn is
    ([3, 1, 2], 1, 1),
    ([1, 0, 0, 1], 1, 2),
    ([1, 0, 0, 1], 2, 1),
])
def test_pick_takes_the_least_loaded_member_ties_in_turn(loads, after, chosen):
    assert pick(loads, after) == chosen


def test_picking_with_no_client_leaving_spreads_exactly_evenly():
    loads, last = [0, 0, 0], -1
    for _ in range(90):
        last = pick(loads, last)
        loads[last] += 1
    assert loads == [30, 30, 30]


def test_a_group_answer_is_bound_to_its_group_and_nonce():
    nonce = b"n" * 32
    mac = auth.group_answer(KEY, nonce, "web")
    assert auth.check_group(KEY, nonce, "web", mac)
    assert not auth.check_group(KEY, nonce, "api", mac)
    assert not auth.check_group(KEY, b"m" * 32, "web", mac)
    assert not auth.check_group(b"another key", nonce, "web", mac)
    assert not auth.check(KEY, nonce, mac)   # not an answer to the relay's own challenge


# -- sharing one port ----------------------------------------------------------------------

def test_three_members_share_one_port_and_clients_spread_within_20_percent(env):
    relay = group_relay(env, ports=1)   # one port: a member with a slot of its own would wait
    members = [Member(env, relay).serve() for _ in range(3)]
    ports = set(member.connection.port for member in members)
    assert len(ports) == 1
    assert [m.connection.reply["group"] for m in members] == [
        {"name": "web", "members": count} for count in (1, 2, 3)]
    assert "lease" not in members[1].connection.reply   # the port is the group's
    port = ports.pop()
    clients = held_clients(port, 90)
    try:
        served = [member.served for member in members]
        assert sum(served) == 90
        assert all(abs(count - 30) <= 6 for count in served), served
    finally:
        close_all(clients)
    # Least connections: until the relay has seen them go, members differ.
    wait_until(lambda: relay.client_count == 0, what="the held clients gone")
    # Clients that come and go, one after another: the spread holds too.
    for index in range(60):
        sock = connect_client(port)
        try:
            assert echo_roundtrip(sock, b"one of many %d" % index) == b"one of many %d" % index
        finally:
            sock.close()
    later = [member.served for member in members]
    assert sum(later) == 150
    assert all(abs(count - 50) <= 10 for count in later), later


def test_a_killed_member_resets_only_its_clients_and_new_clients_go_to_the_rest(env):
    relay = group_relay(env, ports=1)
    members = [Member(env, relay).serve() for _ in range(3)]
    port = members[0].connection.port
    streamers = [Streamer(port, block_size=16 * 1024) for _ in range(30)]
    for streamer in streamers:
        streamer.wait_rounds(1)
    victim = members[1]
    with victim.link(relay)._lock:
        theirs = set(bridge.sock.getpeername() for bridge in victim.link(relay)._bridges)
    assert len(theirs) == 10
    cut = [s for s in streamers if s.sock.getsockname() in theirs]
    victim.kill()
    kept = [s for s in streamers if s not in cut]
    for streamer in cut:
        streamer.assert_cut_off(("reset",))
    for streamer in kept:
        streamer.more_rounds(3)
    for streamer in kept:
        streamer.assert_whole()   # every byte back, in order
    group = relay.groups.get("web")
    wait_until(lambda: len(group.members) == 2, what="the killed member out of the group")
    before = [members[0].served, members[2].served]
    for index in range(20):
        sock = connect_client(port)
        try:
            assert echo_roundtrip(sock, b"after the kill %d" % index) == b"after the kill %d" % index
        finally:
            sock.close()
    assert members[0].served + members[2].served == sum(before) + 20
    assert victim.served == 10


def test_a_member_failing_its_health_checks_gets_no_new_clients_until_it_answers(env, logs):
    relay = group_relay(env, ports=1)
    healthy = Member(env, relay, health=PATIENT_HEALTH).serve()
    silent = Member(env, relay, health=FAST_HEALTH)   # accepts nothing: answers no probe
    probe = silent.connection.health_probe
    assert probe.startswith(b"tcprelay-health ") and probe != healthy.connection.health_probe
    (line,) = logs.wait_for("failed 2 health checks in a row")
    assert line.startswith(silent.link(relay).label), line
    port = healthy.connection.port
    held = held_clients(port, 12)
    try:
        assert (healthy.served, silent.served) == (12, 0)
        silent.serve()   # its accept answers the probes from now on
        logs.wait_for("answers its health check again", level=0)
        # The fewest clients: every new one goes to the member back in rotation.
        more = held_clients(port, 12)
        close_all(more)
        assert (healthy.served, silent.served) == (12, 12)
    finally:
        close_all(held)


# -- keys ----------------------------------------------------------------------------------------

def test_a_wrong_group_key_is_refused_and_counted(env, logs):
    relay = group_relay(env, ports=2)
    member = Member(env, relay).serve()
    with pytest.raises(RegistrationRefused) as refused:
        env.connect(relay.server_address, group="web", group_key=b"a guess")
    assert refused.value.reason == "wrong key for group 'web'"
    with pytest.raises(RegistrationRefused) as unknown:
        env.connect(relay.server_address, group="api", group_key=KEY)
    assert unknown.value.reason.startswith("no group 'api' on this relay"), unknown.value.reason
    assert relay.groups.refused == 2
    # In /status.json and /metrics too, as the relay's own failed authentications.
    counts = relay.counters.snapshot()["counts"]
    assert counts["auth_failures"][""] == 2, counts
    assert counts["registrations"]["group_refused"] == 2, counts
    assert len(logs.wait_for("wrong key for group 'web'")) == 1
    assert len(relay.groups.get("web").members) == 1
    assert relay.pool.stats()["free"] == 1   # the refused took no port
    sock = connect_client(member.connection.port)
    try:
        assert echo_roundtrip(sock, b"still served") == b"still served"
    finally:
        sock.close()


def test_a_relay_whose_ok_does_not_confirm_the_group_is_not_served_through(env, monkeypatch):
    """An older relay ignores "group" and would hand a member a port of its own:
    the service library sees no "group" in the ok and refuses to go on."""
    real_ok_line = registration.ok_line

    def older_ok_line(*args, **kwargs):
        kwargs.pop("group", None)
        return real_ok_line(*args, **kwargs)

    monkeypatch.setattr(registration, "ok_line", older_ok_line)
    relay = group_relay(env, ports=1)
    with pytest.raises(RegistrationRefused) as refused:
        env.connect(relay.server_address, group="web", group_key=KEY)
    assert "did not confirm our group 'web'" in refused.value.reason
    wait_until(lambda: relay.pool.stats()["free"] == 1, what="the port to be free again")


# -- the port ------------------------------------------------------------------------------------

def test_the_port_stays_while_a_member_lives_and_returns_with_the_last(env):
    relay = group_relay(env, ports=1)
    first, second = Member(env, relay).serve(), Member(env, relay).serve()
    port = first.connection.port
    first.stop()   # leaves on purpose
    wait_until(lambda: len(relay.groups.get("web").members) == 1, what="the first gone")
    for index in range(3):
        sock = connect_client(port)
        try:
            assert echo_roundtrip(sock, b"to the second %d" % index) == b"to the second %d" % index
        finally:
            sock.close()
    assert second.served == 3
    assert relay.pool.stats()["free"] == 0
    second.stop()
    wait_until(lambda: relay.pool.stats()["free"] == 1, what="the port back in the pool")
    assert relay.groups.get("web") is None
    assert relay.pool.held_for(port) is None   # left on purpose: no hold
    lone = env.connect(relay.server_address)
    assert lone.port == port


def test_a_lost_last_member_leaves_the_port_held_for_its_group(env):
    relay = group_relay(env, ports=2, lease_time=30.0)
    member = Member(env, relay).serve()
    port = member.connection.port
    member.kill()
    wait_until(lambda: relay.pool.held_for(port) == "group web", what="the group's hold")
    lone = env.connect(relay.server_address)
    assert lone.port != port
    back = Member(env, relay).serve()
    assert back.connection.port == port


# -- the command line ---------------------------------------------------------------------------

def test_cli_group_of_two_echo_servers_and_a_wrong_key(procs, tmp_path):
    key_file = tmp_path / "web.key"
    key_file.write_bytes(os.urandom(32).hex().encode("ascii") + b"\n")
    key_file.chmod(0o600)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"not the key\n")
    wrong.chmod(0o600)
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--group-key", "web=%s" % key_file,
                        *quick(*pool_args(ports[1:])))
    group = ["--group", "web", "--group-key-file", str(key_file)]
    _, port_a = procs.echo(ports[0], "--name", "a", *group)
    _, port_b = procs.echo(ports[0], "--name", "b", *group)
    assert port_a == port_b == ports[1]
    for index in range(4):
        sock = connect_client(port_a)
        try:
            assert echo_roundtrip(sock, b"cli %d" % index) == b"cli %d" % index
        finally:
            sock.close()
    process = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], *group[:3] + [str(wrong)])
    line = assert_clean_exit(process, 1, "tcprelay.echoserver: ")
    assert "refused us: wrong key for group 'web'" in line, line
    assert "Traceback" not in relay.stderr_text(), relay.stderr_text()


def test_a_member_joining_an_open_group_as_the_relay_drains_is_not_let_in(env):
    relay = group_relay(env, ports=2)
    member = Member(env, relay).serve()
    relay.pool.close_line()   # the drain's first step
    with pytest.raises((RelayGone, muxado.MuxadoError)):
        env.connect(relay.server_address, group="web", group_key=KEY)
    assert len(relay.groups.get("web").members) == 1
    sock = connect_client(member.connection.port)
    try:
        assert echo_roundtrip(sock, b"still served") == b"still served"
    finally:
        sock.close()
