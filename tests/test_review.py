"""Review of the concurrency changes: races, lost wake-ups, window accounting
and the bridge's endings, each a case that failed before its fix."""

import socket
import threading

import pytest

from conftest import TIMEOUT
from relay_helpers import recv_exact, recv_to_eof
from test_endings_bridge import only_bridge
from test_service import env, logs  # noqa: F401  (fixtures)
from tcprelay import heartbeat


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


@pytest.mark.xfail(strict=True, reason="not fixed: HeartbeatSender pings with a blocking "
                   "sendall, and Session._send_data waits for the write lock with no bound")
def test_service_heartbeat_times_out_while_a_write_is_stuck(sessions):
    # A writer stuck in sendmsg holds the session's write lock until
    # write_timeout (or for ever, with write_timeout=None); held here by the
    # test. The relay is silent: the heartbeat must end the session after
    # its own timeout, not wait in line for the write lock to ping first.
    stream = sessions.client.open()
    stream.sendall(b"x")               # the stream exists at the relay's end
    accepted = sessions.server.accept(timeout=TIMEOUT)
    sessions.client._write_lock.acquire()
    sender = heartbeat.HeartbeatSender(sessions.client, stream, 0.1, 0.5, "test")
    try:
        sender.start()
        ended = sessions.client.wait(0.5 + 1.5)
    finally:
        sessions.client._write_lock.release()
        sender.stop()
        sender.join(TIMEOUT)
        accepted.close()
    assert ended, "the heartbeat waited for the write lock instead of timing out"
