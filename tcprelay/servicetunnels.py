"""The service's side of several tunnels on one session (docs/PROTOCOL.md, 2.11).

``connect(..., tunnels=[...])`` registers the first tunnel with
``"tunnels": true``, then each further one on a registration stream of its
own (``register_further``). Every client stream of such a session starts
with its tunnel's preamble (``tunnelwire``): ``RelayServer`` reads it to pick
the tunnel's handler.
"""

import collections

from . import registration
from .registrant import register

# One registered tunnel: its name, public "host:port" and port, its lease token
# (or None), its PROXY header ("v1", "v2" or None) and the relay's whole ok reply.
Tunnel = collections.namedtuple("Tunnel", "name address port lease proxy_protocol reply")

# What a further tunnel may ask for (the keys of connect()'s ``tunnels`` entries).
TUNNEL_OPTIONS = ("name", "port", "lease", "proxy_protocol", "allow_clients")


def check_specs(name, tunnels):
    """connect()'s ``tunnels`` (a sequence of dicts with TUNNEL_OPTIONS keys,
    ``name`` required), checked before dialling: a list of dicts. Raises ValueError."""
    specs = [dict(spec) for spec in tunnels]
    names = [name] + [spec.get("name") for spec in specs]
    if any(not isinstance(each, str) or not each for each in names):
        raise ValueError("with tunnels, every tunnel needs a name (name= for the first)")
    if len(set(names)) != len(names):
        raise ValueError("tunnel names must differ: %s" % ", ".join(names))
    for spec in specs:
        unknown = sorted(set(spec) - set(TUNNEL_OPTIONS))
        if unknown:
            raise ValueError("a tunnel takes %s, not %s" % (", ".join(TUNNEL_OPTIONS),
                                                             ", ".join(unknown)))
        if spec.get("allow_clients") is not None:
            try:
                spec["allow_clients"] = registration.allow_list(spec["allow_clients"])
            except ValueError as exc:
                raise ValueError("tunnel %r: allow_clients %s" % (spec["name"], exc))
    return specs


def add_further(connection, name, specs, timeout, max_wait):
    """Register the further tunnels ``specs`` on ``connection`` (a
    ``ServiceConnection`` whose first tunnel is ``name``) and fill in its
    ``tunnels``; on an error the connection is closed and it is raised."""
    try:
        further = register_further(connection.session, specs, timeout, max_wait)
    except BaseException:
        connection.close()
        raise
    reply = connection.reply
    first = Tunnel(name, reply.get("address"), reply.get("port"), reply.get("lease"),
                   connection.proxy_protocol, reply)
    connection.tunnels = collections.OrderedDict(
        (tunnel.name, tunnel) for tunnel in [first] + further)


def register_further(session, specs, timeout, max_wait):
    """Register each further tunnel of ``specs`` (from ``check_specs``) on
    ``session``, in order: a list of ``Tunnel``. Raises as ``register`` does."""
    registered = []
    for spec in specs:
        reply, _ = register(session, port=spec.get("port"), name=spec["name"],
                            max_wait=max_wait, timeout=timeout, lease=spec.get("lease"),
                            proxy_protocol=spec.get("proxy_protocol"),
                            allow=spec.get("allow_clients"))
        registered.append(Tunnel(spec["name"], reply.get("address"), reply.get("port"),
                                 reply.get("lease"), spec.get("proxy_protocol"), reply))
    return registered
