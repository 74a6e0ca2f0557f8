"""A relay that drains grants no port (review of PortPool.close_line): a grant
that completed just before the drain reached its service serves no client."""

import socket

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, Worker, wait_until
from helpers.relay import echo_roundtrip, link_of
from tcprelay import muxado
from tcprelay.service import RelayGone


@pytest.fixture
def env(service_env):
    return service_env


def test_a_port_granted_as_the_drain_reaches_its_service_takes_no_client(env, monkeypatch):
    # The order that leaves the port open: the pool grants the port, then the
    # drain tells the service to leave before the service's link has the
    # listener (so its GOAWAY cannot shut it), then the link serves the port.
    relay = env.relay(ports=1)
    pool = relay.pool
    wait = pool._wait
    drains = []

    def granted_then_drained(ticket, timeout, position=None):
        granted = wait(ticket, timeout, position)
        if granted is not None and not drains:
            link = next(l for l in list(relay._services) if l._ticket is ticket)
            drains.append(Worker(relay.drain, TIMEOUT, name="drain"))
            wait_until(lambda: link._draining, what="the relay's GOAWAY to the service")
        return granted
    monkeypatch.setattr(pool, "_wait", granted_then_drained)
    service = env.service(relay)
    registration = service.register({})
    service.serve()
    replies = registration.statuses()
    assert drains, "the port was never granted"
    served = None
    try:
        client = socket.create_connection((LOOPBACK, pool.ports[0]), timeout=TIMEOUT)
    except OSError:
        pass   # refused: nobody listens there
    else:
        with client:
            try:
                served = echo_roundtrip(client, b"during the drain")
            except OSError:
                pass
    assert served is None, "a client was relayed while the relay drained (%s)" % replies
    assert "ok" not in replies, "a port was handed out while the relay drained: %s" % replies
    assert drains[0].finish() is True


def test_a_lease_presented_once_the_line_closed_leaves_its_holder_connected(env):
    # A service that reconnects with its lease as the drain begins gets no port
    # (the line is closed): its old connection, whose clients have the drain to
    # finish, must not be closed for it.
    relay = env.relay(ports=2)
    port = relay.pool.ports[0]
    holder = env.connect(relay.server_address)
    assert holder.port == port
    holder_link = link_of(relay, port)
    relay.pool.close_line()   # the drain's first step
    with pytest.raises((RelayGone, muxado.MuxadoError)):   # it ends what it cannot grant
        env.connect(relay.server_address, lease=holder.lease)
    assert not holder.session.closed, "the holder's connection was closed for a lease " \
                                      "that could get no port"
    assert link_of(relay, port) is holder_link
    env.assert_reaches(port, holder, b"still here")
