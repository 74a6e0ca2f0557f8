"""The relay's event counters: refusals, registrations by outcome, streams
reset, and the last refusals with who and why.

Counted where the relay already logs the event (a connection, a
registration, a client's end), never per chunk of bytes: the bytes each
client carried are the bridge's own counts (``relaystatus``). One lock,
innermost: nothing else is taken while it is held.
"""

import collections
import threading
import time

RECENT_REFUSALS = 20   # refusals kept with their address and reason, for the status page

# name -> (help text, label name or None). The metric is ``tcprelay_<name>_total``.
COUNTERS = collections.OrderedDict([
    ("service_connections_accepted",
     ("Connections accepted on the service port (before registration).", None)),
    ("service_connections_refused",
     ("Connections to the service port refused before registration, by reason.", "reason")),
    ("registrations",
     ("Registrations by outcome: ok, or why it was refused or ended.", "outcome")),
    ("auth_failures", ("Failed authentications (wrong or missing secret).", None)),
    ("bans", ("Addresses banned for a minute after repeated failed authentications.", None)),
    ("clients_refused", ("Public clients refused, by reason.", "reason")),
    ("streams_reset", ("Client streams that ended in a reset, by muxado error code.", "code")),
    ("access_log_failures", ("Access log lines dropped: the write to --access-log failed.", None)),
])


class RelayCounters(object):
    """Counts by name and label value; ``clock``: wall-clock seconds (for the
    times of recent refusals)."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = collections.Counter()   # (name, label value or None) -> count
        self._recent = collections.deque(maxlen=RECENT_REFUSALS)

    def count(self, name, label=None):
        """One more ``name`` (a key of COUNTERS), with ``label``'s value if it has one."""
        if name not in COUNTERS:
            raise KeyError(name)
        with self._lock:
            self._counts[(name, label)] += 1

    def refused(self, name, label, host, detail):
        """Count a refusal and keep it among the recent ones: ``host`` (an address,
        never a metric label), ``detail`` (the reason, as logged)."""
        entry = {"time": self._clock(), "kind": name, "reason": label, "host": host,
                 "detail": detail}
        with self._lock:
            self._counts[(name, label)] += 1
            self._recent.append(entry)

    def snapshot(self):
        """``{"counts": {name: {label value or "": count}}, "recent_refusals": [...]}``,
        every name of COUNTERS present, newest refusal first."""
        with self._lock:
            counts = dict(self._counts)
            recent = list(self._recent)
        by_name = collections.OrderedDict((name, {}) for name in COUNTERS)
        for (name, label), value in counts.items():
            by_name[name][label or ""] = value
        recent.reverse()
        return {"counts": by_name, "recent_refusals": recent}
