"""Running out of file descriptors: the relay logs it, waits, and goes on.

The relay runs as a process with a low RLIMIT_NOFILE (soft and hard), as
under `ulimit -n 200`. Every blocking call has a timeout; the relay's state
in another process (its log, /proc) is polled with a deadline.
"""

import re
import socket

import pytest

from helpers.basics import LOOPBACK, free_port_range, wait_until
from helpers.relay import connect_client, echo_roundtrip

pytest.importorskip("resource", reason="RLIMIT_NOFILE is a POSIX feature")

LIMIT = 200


@pytest.fixture
def procs(procs):
    """(conftest's procs, a list of sockets the test hands over to be closed first)."""
    sockets = []
    try:
        yield procs, sockets
    finally:
        for sock in sockets:
            sock.close()


def _pool(count=2):
    ports = free_port_range(count + 1)
    return ports[0], ["--ports", "%d-%d" % (ports[1], ports[-1])]


def test_out_of_descriptors_harms_nobody(procs):
    starter, sockets = procs
    port, pool = _pool()
    relay = starter.relay(port, *pool, open_files=(LIMIT, LIMIT))
    echo, public = starter.echo(port)
    first = connect_client(public)
    sockets.append(first)
    echo_roundtrip(first, b"before", half_close=False)
    # More clients than the relay has descriptors for: the rest wait in the backlog.
    for _ in range(LIMIT + 20):
        sockets.append(connect_client(public))
    wait_until(lambda: not relay.alive() or re.search("cannot accept|left; port|Traceback",
                                                      relay.stderr_text()),
               what="the relay to run out of descriptors")
    assert "left; port" not in relay.stderr_text()   # the service was not dropped
    # A new service connection at the same moment must not kill the relay.
    knock = socket.create_connection((LOOPBACK, port), timeout=5)
    sockets.append(knock)
    wait_until(lambda: not relay.alive() or re.search(
        "the service port: cannot accept|out of file descriptors", relay.stderr_text()),
        what="the service port to hit the limit")
    assert relay.alive(), relay.stderr_text()
    # The service and its clients are unharmed.
    echo_roundtrip(first, b"during", half_close=False)
    assert "left; port" not in relay.stderr_text()
    # Once descriptors are free again, the clients that waited are served.
    for sock in sockets[1:120]:
        sock.close()
    last = sockets[-2]
    echo_roundtrip(last, b"after", half_close=False)
    assert relay.alive()
    text = relay.stderr_text()
    assert "Traceback" not in text, text
    assert "open file limit is %d" % LIMIT in text   # warned at start: defaults cannot fit


def test_soft_open_file_limit_is_raised_to_the_hard_one(procs):
    starter, _ = procs
    port, pool = _pool(1)
    relay = starter.relay(port, *pool, "--max-clients", "10", open_files=(128, 4096))
    with open("/proc/%d/limits" % relay.pid) as f:
        line = [row for row in f if row.startswith("Max open files")][0]
    assert line.split()[3:5] == ["4096", "4096"], line
    assert "open file limit" not in relay.stderr_text()   # 4096 fits these limits
