"""Slowloris, floods and faults (issue 7), against a real relay process.

Each attack runs while a healthy service on the same relay keeps echoing:
its clients hash every byte they send and receive and must end with equal
checksums (``Streamer``). The relay's memory is read from /proc: VmRSS before
the attack, VmHWM (the peak) after it, and the growth must stay under a
stated bound; its threads and open files must come back to where they were.

Faults: kill -9 of a service mid-transfer (without and with a lease), kill -9
of the relay (services come back to their ports), a path that goes silent
(noticed within --keepalive), clients and service connections that reset.
A client cut off by a fault must see a reset or an early end, never a wrong
byte (``Streamer.intact``).

Only 127.0.0.1; every process is killed at the end; every wait has a deadline.
"""

import os
import re
import resource
import selectors
import socket
import time

import pytest

from helpers.basics import LOOPBACK, MIB, TIMEOUT, Worker, free_port_range, pool_args, wait_until
from helpers.proxies import Proxy
from helpers.relay import (
    RawService, Streamer, abort, accept_queue, checked_echo, connect_client, recv_exact,
)
from tcprelay import frames


@pytest.fixture
def procs(procs_no_listener_check):
    """Relays started here are not checked for their listeners (conftest)."""
    return procs_no_listener_check


MEMORY_LOG = []   # (test, figures) for the record; the bounds are asserted in each test
# Idle pump threads end after this (the relay's default is 2 s), so that
# Baseline.wait_back sees them gone without waiting seconds for it.
QUICK_PUMPS = ("--pump-idle-timeout", "0.2")


@pytest.fixture(autouse=True, scope="module")
def enough_files():
    """Room for a thousand clients (and the relay's side of them): the soft limit
    goes up to the hard limit if it is lower than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- measuring the relay ------------------------------------------------------------------------

def proc_status(process, field):
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/%d/status" % process.pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no %s in /proc/%d/status" % (field, process.pid))


class Baseline(object):
    """The relay's threads, open files and resident memory before an attack."""

    def __init__(self, relay):
        self.relay = relay
        self.threads = relay.threads()
        self.files = relay.open_files()
        self.rss = proc_status(relay, "VmRSS")

    def assert_memory_growth_below(self, bound, label):
        """The peak resident memory since the baseline grew by less than ``bound`` bytes."""
        peak = proc_status(self.relay, "VmHWM")
        growth = peak - self.rss
        MEMORY_LOG.append((label, self.rss, peak, growth, bound))
        print("memory %s: VmRSS before %.1f MiB, VmHWM after %.1f MiB, growth %.1f MiB "
              "(bound %.0f MiB)" % (label, self.rss / MIB, peak / MIB, growth / MIB, bound / MIB))
        assert growth < bound, "the relay grew by %.1f MiB (%s); bound %.0f MiB" % (
            growth / MIB, label, bound / MIB)

    def wait_back(self, timeout=TIMEOUT):
        """Threads and open files back to the baseline (idle pump threads end after
        QUICK_PUMPS' --pump-idle-timeout)."""
        def back():
            return (self.relay.threads(), self.relay.open_files()) == (self.threads, self.files)
        try:
            wait_until(back, timeout=timeout, what="the relay's threads and files to go back")
        except AssertionError:
            raise AssertionError("relay threads %d -> %d, open files %d -> %d" % (
                self.threads, self.relay.threads(), self.files, self.relay.open_files()))


def assert_clean_logs(*processes):
    for process in processes:
        text = process.stderr_text()
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


# -- clients that check every byte ----------------------------------------------------------------

def healthy_clients(port, count=2):
    streamers = [Streamer(port) for _ in range(count)]
    for streamer in streamers:
        streamer.wait_rounds(3)
    return streamers


def drain_all(socks, timeout=TIMEOUT):
    """Read every socket to its end at once (one selector).

    ``socks`` is a list of (socket, time connected); returns a list of
    (bytes received, "eof" or "reset", seconds from connect to the end, when it ended).
    The end is seen when it is read: never early, maybe late.
    """
    results = [None] * len(socks)
    received = [bytearray() for _ in socks]
    selector = selectors.DefaultSelector()
    for index, (sock, _) in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    deadline = time.monotonic() + timeout
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            assert left > 0, "%d connections still open after %gs" % (len(selector.get_map()),
                                                                      timeout)
            for key, _ in selector.select(left):
                index = key.data
                sock, connected = socks[index]
                try:
                    data = sock.recv(65536)
                    how = "eof"
                except ConnectionResetError:
                    data, how = b"", "reset"
                if data:
                    received[index] += data
                    continue
                selector.unregister(sock)
                now = time.monotonic()
                results[index] = (bytes(received[index]), how, now - connected, now)
    finally:
        selector.close()
        for sock, _ in socks:
            sock.close()
    return results


def logged_count(text, phrase):
    """How often ``phrase`` was logged, counting what a log gate left out
    ("... (and N more left out)")."""
    count = 0
    for line in text.splitlines():
        if phrase in line:
            more = re.search(r"\(and (\d+) more left out\)$", line)
            count += 1 + (int(more.group(1)) if more else 0)
    return count


def public_port(line):
    match = re.match(r"^127\.0\.0\.1:(\d+)$", line)
    assert match, "first line %r" % line
    return int(match.group(1))


# -- slowloris ------------------------------------------------------------------------------------

def test_500_handshakes_that_never_finish_are_dropped_at_the_handshake_timeout(procs):
    ports = free_port_range(3)
    # The pending caps (tested on their own) are lifted: this tests the timeout.
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--handshake-timeout", "0.5",
                        "--registration-rate", "100000",
                        "--max-pending", "1000", "--max-pending-per-host", "1000",
                        *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port)
    base = Baseline(relay)
    socks = []
    for i in range(500):
        sock = socket.create_connection((LOOPBACK, ports[0]), timeout=TIMEOUT)
        if i % 3 == 1:    # a registration stream and half a request line
            sock.sendall(frames.encode_data(3, b'{"name": "slo', frames.SYN))
        elif i % 3 == 2:  # half a frame header
            sock.sendall(frames.encode_data(3, b"{}\n", frames.SYN)[:5])
        socks.append((sock, time.monotonic()))
    for streamer in healthy:   # the service echoes on while they hang
        streamer.more_rounds()
    results = drain_all(socks)
    lasted = [r[2] for r in results]
    assert min(lasted) >= 0.45, "dropped after %.2fs, before the handshake timeout" % min(lasted)
    assert max(lasted) < 5.0, "a connection lasted %.2fs" % max(lasted)
    for i, (data, how, _, _) in enumerate(results):
        replies = frames.decode_frames(data)
        said = b"".join(f.payload for f in replies if isinstance(f, frames.Data))
        if i % 3 == 1:
            assert b'"error": "registration not finished within 0.5s"' in said, replies
        else:
            assert said == b"", replies
            assert [type(f) for f in replies] in ([frames.GoAway], []), replies
    text = relay.stderr_text()
    # Lines anyone can trigger are rate-limited: the first, then "and N more" a
    # second (the last second's may never be told: nothing came after them).
    for phrase, count in (("opened no registration stream within 0.5s", 333),
                          ("did not finish registering within 0.5s", 167)):
        lines = [line for line in text.splitlines() if phrase in line]
        assert 1 <= len(lines) <= 6, lines
        assert logged_count(text, phrase) <= count
    for streamer in healthy:
        streamer.more_rounds()
    base.assert_memory_growth_below(96 * MIB, "500 unfinished handshakes")
    base.wait_back()
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)


def test_a_low_registration_rate_refuses_a_handshake_flood_at_once(procs):
    ports = free_port_range(3)
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--handshake-timeout", "0.5",
                        "--registration-rate", "6",
                        *pool_args(ports[1:]))   # bursts of 2: the echo server takes one
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port)
    base = Baseline(relay)
    started = time.monotonic()
    socks, refused_at_connect = [], 0
    for _ in range(500):
        try:
            sock = socket.create_connection((LOOPBACK, ports[0]), timeout=TIMEOUT)
        except ConnectionResetError:
            refused_at_connect += 1
            continue
        socks.append((sock, time.monotonic()))
    connected = time.monotonic()
    results = drain_all(socks)
    flood_took = time.monotonic() - started
    assert flood_took < 10, "the flood took %.1fs: the bucket may have refilled" % flood_took
    admitted = [r for r in results if r[0]]          # the relay spoke: a GOAWAY at the timeout
    refused = [r for r in results if not r[0]]       # reset unread
    assert len(admitted) == 1, admitted
    assert len(refused) + refused_at_connect == 499
    assert admitted[0][2] >= 0.45   # held until the handshake timeout
    assert set(r[1] for r in refused) == {"reset"}
    # Refused at once, not held for the handshake timeout: every refusal is seen
    # (late, if anything) before the last connection made is half a second old.
    late = max((r[3] for r in refused), default=connected) - connected
    assert late < 0.45, "a refusal came %.2fs after the flood" % late
    wait_until(lambda: "too many registrations from this address" in relay.stderr_text(),
               what="the refusals logged")
    text = relay.stderr_text()
    assert text.count("service connected from") == 2   # the echo server and the one let in
    logged = [l for l in text.splitlines() if "too many registrations from this address" in l]
    skipped = sum(int(n) for n in re.findall(r"\(and (\d+) more refusals\)", "\n".join(logged)))
    # Logged at most once a second, counting the ones it did not log.
    assert 1 <= len(logged) <= flood_took + 2, logged
    assert len(logged) + skipped <= 499
    for streamer in healthy:
        streamer.more_rounds()
    base.assert_memory_growth_below(32 * MIB, "500 handshakes refused by the rate limit")
    base.wait_back()
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)


def test_1000_idle_public_clients(procs):
    ports = free_port_range(3)
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--max-clients", "1100", *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port)
    base = Baseline(relay)
    idle = []
    try:
        for _ in range(1000):
            idle.append(connect_client(port))
        for client in idle:   # each one really has its stream through to the service
            client.sendall(b"hi")
        for client in idle:
            assert recv_exact(client, 2) == b"hi"
        assert relay.open_files() == base.files + 1000
        for streamer in healthy:
            streamer.more_rounds()
        base.assert_memory_growth_below(96 * MIB, "1,000 idle clients")
    finally:
        for client in idle:
            client.close()
    base.wait_back()
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)


def _push_until_blocked(sock):
    """Send until the relay stops taking bytes for half a second; the count sent."""
    sock.settimeout(0.5)
    block = os.urandom(256 * 1024)
    sent = 0
    try:
        while sent < 256 * MIB:
            sent += sock.send(block)
    except socket.timeout:
        return sent
    raise AssertionError("the relay took 256 MiB from a client of a service that never reads")


def test_a_service_that_opens_streams_and_never_reads(procs):
    ports = free_port_range(7)
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--lease-time", "0", *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port)
    base = Baseline(relay)
    hostile = []
    clients = []
    try:
        for n in range(4):
            raw = RawService((LOOPBACK, ports[0]))
            hostile.append(raw)
            raw.open(3, b'{"name": "hostile-%d"}\n' % n, fin=True)
            assert raw.read_until(lambda: any(l.get("status") == "ok" for l in raw.lines(3)))
        # From now on they never read. Each opens 100 streams with 192 KiB on each.
        payload = os.urandom(192 * 1024)
        for raw in hostile:
            for i in range(100):
                raw.open(5 + 2 * i, payload)
        # And their own clients push at them until the relay stops taking bytes.
        hostile_ports = [raw.lines(3)[-1]["port"] for raw in hostile]
        clients = [connect_client(p) for p in hostile_ports for _ in range(2)]
        pushers = [Worker(_push_until_blocked, c) for c in clients]
        pushed = [w.finish(4 * TIMEOUT) for w in pushers]
        assert all(n > 0 for n in pushed)
        for streamer in healthy:
            streamer.more_rounds()
        checked_echo(port, MIB)   # a new client of the healthy service, while this goes on
        base.assert_memory_growth_below(64 * MIB, "4 services opening 400 streams, never reading")
    finally:
        for client in clients:
            abort(client)
        for raw in hostile:
            abort(raw.sock)
    base.wait_back()
    # Their ports are free again (no lease): a new service gets the first of them.
    newcomer, newport = procs.echo(ports[0], "--log-level", "warning")
    assert newport == ports[2]
    checked_echo(newport, 64 * 1024)
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)


def test_a_flood_of_registrations(procs):
    ports = free_port_range(11)   # the service port and 10 public ports
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--lease-time", "0", "--max-waiting", "20",
                        "--registration-rate", "100000", "--max-pending-per-host", "1000",
                        *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port)
    base = Baseline(relay)
    flood = []
    try:
        for n in range(300):
            raw = RawService((LOOPBACK, ports[0]))
            flood.append(raw)
            raw.open(3, b'{"notices": true, "name": "flood-%d"}\n' % n)
        # Read every one's first answer at once.
        selector = selectors.DefaultSelector()
        for raw in flood:
            selector.register(raw.sock, selectors.EVENT_READ, raw)
        deadline = time.monotonic() + 2 * TIMEOUT
        while selector.get_map():
            left = deadline - time.monotonic()
            assert left > 0, "%d registrations unanswered" % len(selector.get_map())
            for key, _ in selector.select(left):
                raw = key.data
                try:
                    data = raw.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                raw.feed(data)
                if raw.eof or raw.lines(3):
                    selector.unregister(raw.sock)
        selector.close()
        firsts = [raw.lines(3)[0] if raw.lines(3) else None for raw in flood]
        statuses = [f["status"] if f else "nothing" for f in firsts]
        ok = [f for f in firsts if f and f["status"] == "ok"]
        waiting = statuses.count("waiting")
        errors = [f["error"] for f in firsts if f and f["status"] == "error"]
        assert len(ok) == 9 and sorted(f["port"] for f in ok) == ports[2:], statuses
        assert waiting <= 20 and waiting + len(errors) == 291, statuses
        assert set(errors) == {"too many services are waiting for a port (20); try again later"}
        for streamer in healthy:
            streamer.more_rounds()
        base.assert_memory_growth_below(64 * MIB, "300 registrations at once")
    finally:
        for raw in flood:
            raw.close()
    base.wait_back()
    # All their ports are free again (no lease): the next service gets the first.
    newcomer, newport = procs.echo(ports[0], "--log-level", "warning")
    assert newport == ports[2]
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)


def test_service_connections_that_reset_at_once_leave_no_trace(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *QUICK_PUMPS, "--registration-rate", "100000",
                        *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port, count=1)
    base = Baseline(relay)
    for _ in range(100):
        abort(socket.create_connection((LOOPBACK, ports[0]), timeout=TIMEOUT))
    wait_until(lambda: accept_queue(ports[0]) == 0, what="the relay to accept them all")
    base.wait_back()
    healthy[0].more_rounds()
    healthy[0].assert_whole()
    assert_clean_logs(relay, echo)


# -- faults ---------------------------------------------------------------------------------------

def test_kill_9_of_a_service_mid_transfer_resets_its_clients_and_frees_its_port(procs):
    ports = free_port_range(4)
    relay = procs.relay(ports[0], "--lease-time", "0", *pool_args(ports[1:]))
    victim, victim_port = procs.echo(ports[0], "--name", "victim")
    other, other_port = procs.echo(ports[0], "--name", "other")
    doomed = healthy_clients(victim_port, 3)
    healthy = healthy_clients(other_port, 3)
    victim.kill()   # SIGKILL, mid-transfer
    for streamer in doomed:
        streamer.assert_cut_off(("reset",))
    # The port is free at once: a service asking for it by number gets it.
    started = time.monotonic()
    comer, comer_port = procs.echo(ports[0], "--name", "comer", "--port", victim_port)
    assert comer_port == victim_port
    assert time.monotonic() - started < 3
    wait_until(lambda: "left; port %d is free again (" % victim_port in relay.stderr_text(),
               what="the relay to free the port")
    text = relay.stderr_text()
    assert "'comer'" not in "".join(l for l in text.splitlines() if "waiting in line" in l)
    fresh = healthy_clients(comer_port, 1)
    for streamer in healthy + fresh:
        streamer.assert_whole()
    assert_clean_logs(relay, other, comer)


def test_kill_9_of_a_service_with_a_lease_holds_its_port_for_the_lease_time(procs):
    ports = free_port_range(4)
    relay = procs.relay(ports[0], "--lease-time", "2", *pool_args(ports[1:]))
    victim, victim_port = procs.echo(ports[0], "--name", "victim")
    other, other_port = procs.echo(ports[0], "--name", "other")
    doomed = healthy_clients(victim_port, 2)
    healthy = healthy_clients(other_port, 2)
    killed = time.monotonic()
    victim.kill()
    for streamer in doomed:
        streamer.assert_cut_off(("reset",))
    wait_until(lambda: "left; port %d is free again once its lease ends in 2s" % victim_port
               in relay.stderr_text(), what="the relay to hold the port")
    # Held: a service asking for that port waits; one asking for any port gets another.
    comer = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--name", "comer",
                        "--port", victim_port)
    wait_until(lambda: re.search(r"'comer'.*waiting in line", relay.stderr_text()),
               what="the comer to wait in line")
    anyone, anyone_port = procs.echo(ports[0], "--name", "anyone")
    assert anyone_port not in (victim_port, other_port)
    # Then back after the lease time.
    assert public_port(comer.readline()) == victim_port
    held = time.monotonic() - killed
    assert 1.8 <= held < 6, "the port came back after %.2fs, lease 2s" % held
    fresh = healthy_clients(victim_port, 1)
    for streamer in healthy + fresh:
        streamer.assert_whole()
    assert_clean_logs(relay, other, comer, anyone)


def test_kill_9_of_the_relay_services_come_back_to_their_ports(procs):
    ports = free_port_range(5)
    relay_args = ["--lease-time", "30"] + pool_args(ports[1:])
    first = procs.relay(ports[0], *relay_args)
    gone, gone_port = procs.echo(ports[0], "--name", "gone")
    b, b_port = procs.echo(ports[0], "--name", "b")
    c, c_port = procs.echo(ports[0], "--name", "c")
    assert (gone_port, b_port, c_port) == tuple(ports[1:4])
    gone.kill()
    doomed = healthy_clients(b_port, 2) + healthy_clients(c_port, 2)
    first.kill()   # SIGKILL: no GOAWAY, every connection just ends
    for streamer in doomed:
        streamer.assert_cut_off(("reset", "cut"))
    second = procs.relay(ports[0], *relay_args)

    def registered():
        text = second.stderr_text()
        return all(re.search(r"'%s' \(.*\): registered; public address 127\.0\.0\.1:(\d+)" % name,
                             text) for name in ("b", "c"))

    wait_until(registered, timeout=2 * TIMEOUT, what="b and c to register again")
    text = second.stderr_text()
    again = dict((name, int(re.search(r"'%s' \(.*\): registered; public address "
                                      r"127\.0\.0\.1:(\d+)" % name, text).group(1)))
                 for name in ("b", "c"))
    # The new relay never issued their tokens, but a token names its port: each gets
    # its own back, although a lower port (the gone service's) is free.
    assert again == {"b": b_port, "c": c_port}, again
    assert b.alive() and c.alive()
    fresh = healthy_clients(b_port, 1) + healthy_clients(c_port, 1)
    for streamer in fresh:
        streamer.assert_whole()
    # And the free port still goes to a newcomer.
    newcomer, new_port = procs.echo(ports[0], "--name", "newcomer")
    assert new_port == gone_port
    assert_clean_logs(second, b, c)


def test_a_transport_that_goes_silent_is_noticed_within_keepalive(procs):
    ports = free_port_range(3)
    relay = procs.relay(ports[0], "--keepalive", "1.5", "--lease-time", "10",
                        *pool_args(ports[1:]))
    proxy = Proxy((LOOPBACK, ports[0]))
    try:
        # "silent" reaches the relay through the proxy; "steady" directly.
        silent = procs.start("tcprelay.echoserver", LOOPBACK, proxy.port, "--name", "silent")
        silent_port = public_port(silent.readline())
        steady, steady_port = procs.echo(ports[0], "--name", "steady")
        doomed = healthy_clients(silent_port, 2)
        healthy = healthy_clients(steady_port, 2)
        frozen = time.monotonic()
        proxy.freeze()   # no bytes either way, no FIN, no RST
        wait_until(lambda: "no heartbeat for 1.5s" in relay.stderr_text(), interval=0.01,
                   what="the relay to notice")
        relay_noticed = time.monotonic() - frozen
        wait_until(lambda: "no answer to a heartbeat for 1.5s" in silent.stderr_text(),
                   interval=0.01, what="the service to notice")
        service_noticed = time.monotonic() - frozen
        print("silent path noticed by the relay after %.2fs, by the service after %.2fs "
              "(--keepalive 1.5)" % (relay_noticed, service_noticed))
        # The relay hears a ping every 0.5s (keepalive/3) and gives up 1.5s after the
        # last one: between 1.0 and 1.5s after the silence began (+ scheduling).
        assert 0.8 <= relay_noticed <= 1.5 + 0.4, relay_noticed
        # The service waits 1.5s for each pong, pinging every 0.5s: at most 2.0s
        # (docs/PROTOCOL.md 2.5).
        assert 0.8 <= service_noticed <= 1.5 + 0.5 + 0.5, service_noticed
        # Its clients are reset, not left hanging.
        for streamer in doomed:
            streamer.assert_cut_off(("reset",))
        for streamer in healthy:
            streamer.more_rounds()
        # The path heals: the service comes back, to its port, with its lease.
        proxy.thaw()

        def registrations():
            return len(re.findall(r"'silent' \(.*\): registered; public address 127\.0\.0\.1:%d$"
                                  % silent_port, relay.stderr_text(), re.M))

        wait_until(lambda: registrations() == 2, what="the service to register again")
        fresh = healthy_clients(silent_port, 1)
        for streamer in healthy + fresh:
            streamer.assert_whole()
    finally:
        proxy.close()
    assert_clean_logs(relay, steady, silent)


def test_clients_that_reset_mid_stream_cost_no_one_else_a_byte(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *QUICK_PUMPS, *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--log-level", "warning")
    healthy = healthy_clients(port, 3)
    base = Baseline(relay)
    for n in range(20):
        client = connect_client(port)
        data = os.urandom(256 * 1024)
        client.sendall(data)
        got = recv_exact(client, 32 * 1024 * (1 + n % 4))
        assert got == data[:len(got)]
        abort(client)   # RST with echoed bytes unread and more on the way
        if n % 5 == 4:
            for streamer in healthy:
                streamer.more_rounds(1)
    for streamer in healthy:
        streamer.more_rounds()
    base.wait_back()
    checked_echo(port, MIB)
    for streamer in healthy:
        streamer.assert_whole()
    assert_clean_logs(relay, echo)
