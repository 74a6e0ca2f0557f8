"""Review of the concurrency changes: races, lost wake-ups, window accounting
and the bridge's endings, each a case that failed before its fix."""

import socket
import threading

from conftest import TIMEOUT
from relay_helpers import recv_exact, recv_to_eof
from test_endings_bridge import only_bridge
from test_service import env, logs  # noqa: F401  (fixtures)


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
