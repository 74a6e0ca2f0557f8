"""Who may try, and how often: allowed networks, bans after failed
authentication, per-address rate limits, and logging that does not flood."""

import collections
import ipaddress
import logging
import threading
import time


class Networks(object):
    """A list of CIDR networks an address may belong to (--allow-from)."""

    def __init__(self, cidrs):
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __bool__(self):
        return bool(self._networks)

    def __contains__(self, host):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks
                   if network.version == address.version)

    def __str__(self):
        return ", ".join(str(n) for n in self._networks)


class FailureBans(object):
    """After ``limit`` failures from one address within ``window`` seconds, refuse
    that address for ``ban`` seconds."""

    def __init__(self, limit=5, window=60.0, ban=60.0, clock=time.monotonic):
        self._limit = limit
        self._window = window
        self._ban = ban
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = {}    # host -> deque of failure times
        self._banned = {}      # host -> until

    def banned(self, host):
        with self._lock:
            until = self._banned.get(host)
            if until is None:
                return False
            if until <= self._clock():
                del self._banned[host]
                return False
            return True

    def failed(self, host):
        """Record a failure; True if ``host`` is now banned."""
        now = self._clock()
        with self._lock:
            times = self._failures.setdefault(host, collections.deque())
            times.append(now)
            while times and times[0] <= now - self._window:
                times.popleft()
            if len(times) >= self._limit:
                self._banned[host] = now + self._ban
                del self._failures[host]
                return True
            self._prune(now)
            return False

    def _prune(self, now):
        # Bounded memory under a spray of addresses: forget stale entries.
        if len(self._failures) > 10000:
            for host in [h for h, t in self._failures.items() if not t or t[-1] <= now - self._window]:
                del self._failures[host]


class RateLimit(object):
    """At most ``per_minute`` events per address, with bursts of ``burst``."""

    def __init__(self, per_minute, burst, clock=time.monotonic):
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = {}   # host -> [tokens, stamp]

    def allow(self, host):
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(host)
            if bucket is None:
                if len(self._buckets) > 10000:
                    self._buckets = dict((h, b) for h, b in self._buckets.items()
                                         if b[0] + (now - b[1]) * self._rate < self._burst)
                bucket = self._buckets[host] = [self._burst, now]
            bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
            bucket[1] = now
            if bucket[0] < 1.0:
                return False
            bucket[0] -= 1.0
            return True


class LogGate(object):
    """A log line that a remote party can trigger at will, rate-limited: up to
    ``burst`` at once, then ``per_second``; a line that comes after some were
    left out says how many ("(and N more left out)"). One gate per kind of line.
    The default, one a second, is the relay's refusals' rule.
    """

    def __init__(self, logger, level=logging.WARNING, per_second=1.0, burst=1,
                 more="left out", clock=time.monotonic):
        self._logger = logger
        self._level = level
        self._more = more
        self._rate = float(per_second)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()
        self._skipped = 0
        self._last = None   # the last line left out: (message, args)
        self._lock = threading.Lock()

    def _refill(self):
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def __call__(self, message, *args):
        with self._lock:
            self._refill()
            if self._tokens < 1.0:
                self._skipped += 1
                self._last = (message, args)
                return
            self._tokens -= 1.0
            skipped, self._skipped, self._last = self._skipped, 0, None
        if skipped:
            message += " (and %d more %s)" % (skipped, self._more)
        self._logger.log(self._level, message, *args)

    def owed(self):
        """Seconds until lines left out may be told (by ``flush``); None if none were."""
        with self._lock:
            if not self._skipped:
                return None
            self._refill()
            return max(0.0, (1.0 - self._tokens) / self._rate)

    def flush(self):
        """Tell the lines left out, if the rate allows now: the last one, with how
        many more there were. Without this a burst's count waits for the next line,
        which may never come."""
        with self._lock:
            if not self._skipped:
                return
            self._refill()
            if self._tokens < 1.0:
                return
            self._tokens -= 1.0
            (message, args), skipped = self._last, self._skipped - 1
            self._skipped, self._last = 0, None
        if skipped:
            message += " (and %d more %s)" % (skipped, self._more)
        self._logger.log(self._level, message, *args)


class LogGates(object):
    """A ``LogGate`` for each kind of line, made on first use: ``gates(kind, message, *args)``.
    ``clock``: monotonic seconds, as for ``LogGate``."""

    def __init__(self, logger, level=logging.WARNING, clock=time.monotonic):
        self._logger = logger
        self._level = level
        self._clock = clock
        self._gates = {}
        self._lock = threading.Lock()

    def __call__(self, kind, message, *args):
        with self._lock:
            gate = self._gates.get(kind)
            if gate is None:
                gate = self._gates[kind] = LogGate(self._logger, self._level, clock=self._clock)
        gate(message, *args)
