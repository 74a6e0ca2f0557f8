"""What the relay is doing, as plain dicts: ``snapshot(relay)``.

It reads the relay's, its service links' and the pool's fields directly (the
relay's ``_services``, a link's ``_bridges`` and ``_ticket``): the one module
outside them that does, so that they carry no status code of their own.

The one reader of a relay's state for the status endpoint (``/status.json``,
``/metrics``, the page, ``python3 -m tcprelay.status``). Each lock is held
only to copy what it guards; nothing is written to anyone under it.

Bytes are counted by the bridges themselves (``Bridge.bytes_up`` and
``bytes_down``, plain ints their pump and flusher add to): a service's
totals are what its ended clients carried (added once, as each ends) plus
what its live bridges say now, so counting costs the byte path nothing.
"""

import os
import threading
import time

from . import __version__, addresses

# Field names: "in" is from public clients to the service, "out" to the clients.


def snapshot(relay, now=None):
    """The relay's state: a dict of dicts, lists, strings and numbers (JSON as is).

    Keys: ``relay`` (version, times, options, pool, totals), ``services`` (by
    port), ``waiting`` (in line order), ``counters`` (``RelayCounters``'s
    counts), ``recent_refusals``, ``process``. Times are Unix seconds; ``now``:
    the wall clock to measure ages from (default: time.time()).
    """
    now = time.time() if now is None else now
    with relay._lock:
        links = list(relay._services)
        clients = relay._clients
        pending = len(relay._pending)
        accepting = relay._accepting
        clients_accepted = relay.clients_accepted
        bytes_in, bytes_out = relay.bytes_in_ended, relay.bytes_out_ended
    services, waiting = [], []
    for link in links:
        entry = _service(link, now)
        if entry is None:
            continue
        bytes_in += entry["bytes_in"]
        bytes_out += entry["bytes_out"]
        if entry["port"] is not None:
            services.append(entry)
        elif entry["position"]:
            waiting.append(entry)
    services.sort(key=lambda s: s["port"])
    waiting.sort(key=lambda s: s["position"])
    for entry in services:
        del entry["position"]
    for entry in waiting:
        for key in ("port", "public_address", "bytes_in", "bytes_out", "clients",
                    "clients_served", "heartbeat", "lease"):
            del entry[key]
    counted = relay.counters.snapshot()
    return {
        "relay": _relay(relay, now, accepting, pending, clients, clients_accepted,
                        bytes_in, bytes_out),
        "services": services,
        "waiting": waiting,
        "counters": counted["counts"],
        "recent_refusals": counted["recent_refusals"],
        "process": process_figures(),
    }


def _relay(relay, now, accepting, pending, clients, clients_accepted, bytes_in, bytes_out):
    pool = relay.pool
    stats = pool.stats()
    return {
        "version": __version__,
        "time": now,   # ages are measured from it: the reader's clock may differ
        "started": relay.started_at,
        "uptime": max(0.0, now - relay.started_at),
        "service_address": _address(relay.server_address),
        "draining": not accepting,
        "options": {
            "public_bind": relay.public_bind or None,
            "public_host": relay.public_host,
            "tls": relay.tls_context is not None,
            "secret": relay.secret is not None,
            "max_clients": relay.max_clients,
            "max_waiting": relay.max_waiting,
            "lease_time": relay.lease_time,
            "idle_timeout": relay.idle_timeout,
            "keepalive": relay.keepalive,
        },
        "pool": {"ports": pool.describe(), "size": len(pool.ports), "free": stats["free"],
                 "in_use": stats["in_use"], "waiting": stats["waiting"],
                 "max_services": pool.limit},
        "pending": pending,
        "clients": clients,
        "clients_accepted": clients_accepted,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }


def _service(link, now):
    """One service link as a dict, or None if it has not registered a request yet."""
    with link._lock:
        bridges = list(link._bridges)
        bytes_in, bytes_out = link.bytes_in_ended, link.bytes_out_ended
        ticket = link._ticket
        served = link.clients_served
    request = link.request
    if request is None:
        return None
    # Ints only grow, and a bridge's end moves its counts into the link's in
    # the same hold as its removal: read together they never go back.
    for bridge in bridges:
        bytes_in += bridge.bytes_up
        bytes_out += bridge.bytes_down
    port = link.port
    position = 0
    if port is None and ticket is not None and ticket.granted is None:
        position = ticket.position
    return {
        "name": link.name or "",
        "port": port,
        "public_address": link.public_address,
        "remote_address": _address(link.address),
        "since": link.registered_at if port is not None else link.waiting_since,
        "requested_port": request.port,
        "position": position,
        "clients": len(bridges),
        "clients_served": served,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "heartbeat": _heartbeat(link, now),
        "lease": link.lease is not None,
    }


def _heartbeat(link, now):
    """The heartbeat's state: None if the service did not ask for it, else the
    seconds since anything came from it and the allowed silence."""
    if link._heartbeat is None or link._session is None:
        return None
    silent = max(0.0, time.monotonic() - link._session.last_received)
    return {"silent_for": round(silent, 3), "timeout": link.relay.keepalive}


def process_figures():
    """This process's threads, open files and resident memory (bytes); a figure
    the system cannot tell is None."""
    figures = {"threads": threading.active_count(), "open_files": None, "rss_bytes": None}
    try:
        figures["open_files"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    try:
        with open("/proc/self/statm") as statm:
            figures["rss_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return figures


def _address(addr):
    return addresses.format_sockaddr(addr)
