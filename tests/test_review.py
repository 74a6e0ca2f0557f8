"""Review of the concurrency changes: races, lost wake-ups, window accounting
and the bridge's endings, each a case that failed before its fix."""

import socket
import threading

import pytest

from helpers.basics import TIMEOUT, Worker, wait_until
from helpers.relay import only_bridge, recv_exact, recv_to_eof
from tcprelay import frames, heartbeat, muxado


@pytest.fixture
def env(service_env):
    """This module's tests run in a ServiceEnv (conftest)."""
    return service_env


# -- the bridge's idle timeout ------------------------------------------------------------

def test_idle_timeout_counts_an_upload_that_ends_with_a_fin(env):
    # The client uploads for longer than the idle timeout, the service
    # sending nothing back, then half-closes. Its FIN is activity: the
    # service has a whole idle timeout from then to answer, as it would if
    # the client had not half-closed.
    idle = 1.0
    relay = env.relay(ports=1, idle_timeout=idle)
    service = env.service(relay)
    port = service.register_ok()
    client = env.client(port)
    stream = service.accept()
    bridge = only_bridge(relay, port)
    pace = threading.Event()   # never set: paces the upload
    for _ in range(8):         # 1.6 s of upload, nothing down
        client.sendall(b"u" * 100)
        assert recv_exact(stream, 100) == b"u" * 100
        pace.wait(idle / 5)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(stream) == b""
    assert not bridge.join(idle / 2), "reset at once after the client's FIN: %s" % bridge._aborted
    stream.sendall(b"reply")
    stream.close()
    assert recv_to_eof(client) == b"reply"


# -- the heartbeat ------------------------------------------------------------------------

KEEPALIVE = 1.0   # the relay's heartbeat timeout in these tests


def test_relay_heartbeat_starts_counting_silence_when_the_port_is_granted(env):
    # A service waits in line longer than the heartbeat timeout; it has
    # nothing to say while it waits (the relay talks). Its promise to be
    # heard from every timeout starts with the ok: the relay must not drop
    # it the moment its port comes.
    relay = env.relay(ports=1, keepalive=KEEPALIVE, lease_time=0)
    holder = env.service(relay)
    holder.register_ok()
    waiter = env.service(relay)
    registration = waiter.register({"heartbeat": True, "notices": True})
    assert registration.reply()["status"] == "waiting"
    assert not waiter.session.wait(1.5 * KEEPALIVE), "dropped while in line"
    holder.session.close()
    reply = registration.reply()
    while reply["status"] == "waiting":
        reply = registration.reply()
    assert reply["status"] == "ok", reply
    assert not waiter.session.wait(KEEPALIVE / 2), \
        "the relay dropped the service as its port came, for its silence in line"
    registration.stream.sendall(b'{"ping": 1}\n')
    assert registration.reply() == {"pong": 1}


def test_service_heartbeat_times_out_while_a_write_is_stuck(raw_peer):
    # A writer stuck in sendmsg to a relay that stopped reading holds the
    # session's write lock (for ever, with write_timeout=None). The relay is
    # silent: the heartbeat must end the session after its own timeout, not
    # wait in line for the write lock to ping first.
    peer = raw_peer(client=True, write_timeout=None)
    heartbeat_stream = peer.session.open()          # announced: its SYN is out
    bulk = peer.session.open()
    peer.send(frames.encode_wndinc(bulk.id, 1 << 30))   # room for far more than the socket holds
    wait_until(lambda: bulk._send_window > 1 << 29, what="the window to arrive")
    writer = Worker(_send_until_it_fails, bulk)
    wait_until(lambda: peer.session._writer.lock.locked(), what="the writer to get stuck")
    sender = heartbeat.HeartbeatSender(peer.session, heartbeat_stream, 0.1, 0.5, "test")
    sender.start()
    try:
        ended = peer.session.wait(0.5 + 1.5)
    finally:
        sender.stop()
        peer.session.close()
        sender.join(TIMEOUT)
        writer.finish()
    assert ended, "the heartbeat waited for the write lock instead of timing out"


def _send_until_it_fails(stream):
    block = b"x" * (1 << 20)
    try:
        while True:
            stream.sendall(block)
    except (OSError, muxado.MuxadoError):
        pass
