"""The registration handshake between a service and the relay (docs/PROTOCOL.md).

A service's first muxado stream is its registration stream. Two forms:

- minimal (the original Go tcp-relay contract): the service writes nothing
  and half-closes; the relay answers ``host:port`` (ASCII, no newline) and
  closes the stream.
- extended: the service writes one JSON object on one line; the relay
  answers with JSON lines: zero or more ``{"status": "waiting", ...}``,
  then one ``{"status": "ok", ...}`` or ``{"status": "error", ...}``.

This module only turns requests and replies into bytes and back.
"""

import binascii
import ipaddress
import json
import re

from . import addresses

PROTOCOL_VERSION = 1
MAX_REQUEST = 4096          # bytes of request the relay reads at most
# The debug text of the GOAWAY a TLS relay sends a plain connection, in plain
# muxado, before it closes: the service library tells its user to use TLS.
TLS_REQUIRED = b"this relay requires TLS"
MAX_REPLY = 64 * 1024       # bytes of one reply line a service reads at most
MAX_NAME = 64
MAX_WAIT = 10 ** 9          # seconds: the longest max_wait a relay takes
MAX_LEASE = 128
MAX_ALLOW = 64              # networks in one request's allow list
# A group member's health checks (docs/PROTOCOL.md, 2.9): seconds between them, and
# failures in a row that take it out of rotation.
MIN_HEALTH_INTERVAL = 0.05
MAX_HEALTH_INTERVAL = 3600
MAX_HEALTH_FAILURES = 100
DEFAULT_HEALTH_FAILURES = 3

# The link's muxado session, the same on both sides: the relay's and the
# service's streams get a bigger window than the codec's 256 KiB default
# (frames.DEFAULT_WINDOW), which stalls a fast stream on window updates.
LINK_WINDOW = 1 << 20              # bytes per stream
LINK_MAX_FRAME = LINK_WINDOW // 2  # bulk data in fewer, bigger writes; half a window stays free


class RegistrationError(Exception):
    """A request or reply that does not follow the protocol."""


class LineTooLong(RegistrationError):
    """A line without its newline past ``limit`` bytes."""

    def __init__(self, limit):
        super(LineTooLong, self).__init__("line longer than %d bytes" % limit)
        self.limit = limit


class Request(object):
    """What a service asks for. ``minimal`` is True for the empty request."""

    FIELDS = ("version", "port", "name", "max_wait", "notices", "lease", "heartbeat",
              "proxy_protocol", "auth", "allow", "group", "health", "tunnels")

    def __init__(self, port=None, name=None, max_wait=None, notices=False, lease=None,
                 heartbeat=False, proxy_protocol=None, auth=None, version=PROTOCOL_VERSION,
                 extra=None, minimal=False, allow=None, group=None, health=None,
                 tunnels=False):
        self.version = version
        self.port = port
        self.name = name
        self.max_wait = max_wait
        self.notices = notices
        self.lease = lease                    # a token from an earlier registration
        self.heartbeat = heartbeat            # keep the stream open for pings
        self.proxy_protocol = proxy_protocol  # "v1" or "v2": start each stream with a header
        self.auth = auth                      # "hmac-sha256": we will answer a challenge
        self.allow = allow                    # CIDR texts: only clients from these networks
        self.group = group                    # a group's name: share its public port
        self.health = health                  # {"interval": s, "failures": k}: health checks
        self.tunnels = tunnels                # further tunnels on this session (section 2.11)
        self.extra = dict(extra or {})   # fields later versions and extensions add
        self.minimal = minimal

    def __repr__(self):
        if self.minimal:
            return "<Request minimal>"
        fields = ", ".join("%s=%r" % (k, getattr(self, k) if k != "lease" else "...")
                           for k in self.FIELDS if getattr(self, k) not in (None, False))
        return "<Request %s>" % fields

    def encode(self):
        """The request line as bytes (empty for the minimal form)."""
        if self.minimal:
            return b""
        body = {"version": self.version}
        for key in ("port", "name", "max_wait", "lease", "proxy_protocol", "auth", "allow",
                    "group", "health"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if isinstance(self.max_wait, float):
            body["max_wait"] = seconds(self.max_wait)
        for key in ("notices", "heartbeat", "tunnels"):
            if getattr(self, key):
                body[key] = True
        body.update(self.extra)
        return (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")


def _number(body, key, low, high, integer):
    value = body.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise RegistrationError("%r must be %s from %s to %s" % (
            key, "an integer" if integer else "a number", low, high))
    return value


# Registration lines are flat; a line nested deeper than this is refused
# before json.loads sees it: its recursion can overflow a thread's C stack
# (the relay's threads have 256 KiB) and crash the process (CPython 3.13.0,
# at 4,000 levels), where a RecursionError was meant.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _load_json(line):
    """``line`` (bytes) as JSON; ValueError if it is not, or nests deeper than
    MAX_JSON_DEPTH."""
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b"", line)):
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ValueError("nested deeper than %d levels" % MAX_JSON_DEPTH)
    return json.loads(line.decode("utf-8"))


def parse_request(data):
    """The ``Request`` in ``data`` (the bytes before the first newline, or all)."""
    if len(data) > MAX_REQUEST:
        raise RegistrationError("request longer than %d bytes" % MAX_REQUEST)
    line = data.split(b"\n", 1)[0].strip()
    if not line:
        return Request(minimal=True)
    try:
        body = _load_json(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested input; it is still just a bad request.
        raise RegistrationError("request is not a JSON object on one line: %s"
                                % (exc if not isinstance(exc, RecursionError) else "nested too deeply"))
    if not isinstance(body, dict):
        raise RegistrationError("request must be a JSON object")
    version = body.get("version", PROTOCOL_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistrationError("'version' must be a positive integer")
    if version > PROTOCOL_VERSION:
        raise RegistrationError("protocol version %d is not supported; this relay speaks %d"
                                % (version, PROTOCOL_VERSION))
    name = _label(body, "name")
    group = _label(body, "group")
    health = _health(body.get("health"))
    if health is not None and group is None:
        raise RegistrationError("'health' is for the members of a group: give 'group' too")
    if body.get("tunnels", False) is True and (name is None or group is not None):
        raise RegistrationError("'tunnels' needs a 'name' (it names this first tunnel) "
                                "and no 'group'")
    for flag in ("notices", "heartbeat", "tunnels"):
        if not isinstance(body.get(flag, False), bool):
            raise RegistrationError("%r must be true or false" % flag)
    lease = body.get("lease")
    if lease is not None and (not isinstance(lease, str) or not 0 < len(lease) <= MAX_LEASE
                              or not lease.isprintable()):
        raise RegistrationError("'lease' must be the token a relay handed out")
    proxy_protocol = body.get("proxy_protocol")
    if proxy_protocol not in (None, "v1", "v2"):
        raise RegistrationError("'proxy_protocol' must be \"v1\" or \"v2\"")
    auth = body.get("auth")
    if auth is not None and not isinstance(auth, str):
        raise RegistrationError("'auth' must name a method, such as \"hmac-sha256\"")
    allow = body.get("allow")
    if allow is not None:
        try:
            allow = allow_list(allow)
        except ValueError as exc:
            raise RegistrationError("'allow' %s" % exc)
    extra = dict((k, v) for k, v in body.items() if k not in Request.FIELDS)
    return Request(
        port=_number(body, "port", 1, 65535, integer=True),
        name=name,
        max_wait=_number(body, "max_wait", 0, MAX_WAIT, integer=False),
        notices=body.get("notices", False),
        lease=lease,
        heartbeat=body.get("heartbeat", False),
        proxy_protocol=proxy_protocol,
        auth=auth,
        version=version,
        extra=extra,
        allow=allow,
        group=group,
        health=health,
        tunnels=body.get("tunnels", False),
    )


def _label(body, key):
    """The text field ``key`` (a name or a group's): printable, 1 to MAX_NAME characters."""
    value = body.get(key)
    if value is not None:
        if not isinstance(value, str) or not value or len(value) > MAX_NAME \
                or not value.isprintable():
            raise RegistrationError("%r must be printable text of 1 to %d characters"
                                    % (key, MAX_NAME))
    return value


def _health(health):
    """The request's ``health`` ({"interval": seconds, "failures": count}, failures
    optional) with the default filled in, or None."""
    if health is None:
        return None
    if not isinstance(health, dict):
        raise RegistrationError("'health' must be an object like {\"interval\": 5, "
                                "\"failures\": 3}")
    try:
        interval = _number(health, "interval", MIN_HEALTH_INTERVAL, MAX_HEALTH_INTERVAL, False)
        failures = _number(health, "failures", 1, MAX_HEALTH_FAILURES, integer=True)
    except RegistrationError as exc:
        raise RegistrationError("'health': %s" % exc)
    if interval is None:
        raise RegistrationError("'health' needs an 'interval' (seconds)")
    return {"interval": interval,
            "failures": DEFAULT_HEALTH_FAILURES if failures is None else failures}


def allow_list(networks):
    """``networks`` (an iterable of CIDR texts such as "10.0.0.0/8" or "::1/128";
    host bits may be set) as a list of those texts, checked: 1 to MAX_ALLOW of
    them. Raises ValueError saying what is wrong (the text follows a field or
    option name)."""
    if isinstance(networks, (str, bytes, dict)):
        raise ValueError("must be a list of networks like \"10.0.0.0/8\"")
    try:
        networks = list(networks)
    except TypeError:
        raise ValueError("must be a list of networks like \"10.0.0.0/8\"")
    if not 1 <= len(networks) <= MAX_ALLOW:
        raise ValueError("must list 1 to %d networks" % MAX_ALLOW)
    for network in networks:
        # Text only: ipaddress also takes integers and bytes, which a peer's JSON must not pass as networks.
        if not isinstance(network, str):
            raise ValueError("must hold network texts like \"10.0.0.0/8\", not %.40r" % (network,))
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError("holds %.60r, which is not a network like \"10.0.0.0/8\"" % network)
    return networks


# JSON integers are exact up to here in every decoder (JavaScript's doubles too).
_EXACT_INTEGER = 2 ** 53


def seconds(value):
    """A duration in seconds as a JSON number: an ``int`` when whole (Go's
    decoder refuses ``30.0`` for an int field), else a ``float`` rounded to
    the millisecond (``4 / 3`` gives 1.333), or as it is if that would make
    it 0. Whole values past 2**53 stay floats. ``value``: a finite number."""
    value = float(value)
    rounded = round(value, 3)
    if rounded == 0 and value != 0:
        return value   # a sub-millisecond duration must not read as none
    if rounded.is_integer() and abs(rounded) < _EXACT_INTEGER:
        return int(rounded)
    return rounded


def encode_reply(status, **fields):
    """One reply line: ``{"status": status, ...}`` and a newline."""
    body = {"status": status}
    body.update(fields)
    return _line(body)


def _line(body):
    return (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")


# -- the lines of the extended form, as bytes (docs/PROTOCOL.md, 2.2 to 2.6) --

def waiting_line(position, interval=None, port=None, reason=None):
    """The relay's ``waiting`` line: ``position`` in line (1 is next), the
    ``interval`` (seconds) within which it promises the next one, the one
    ``port`` waited for, and ``reason`` (text); None leaves a field out."""
    fields = {"position": position}
    if reason is not None:
        fields["reason"] = reason
    if interval is not None:
        fields["interval"] = seconds(interval)
    if port is not None:
        fields["port"] = port
    return encode_reply("waiting", **fields)


def ok_line(address, port, lease=None, lease_time=None, heartbeat_timeout=None, allow=None,
            group=None, health=None, tunnels=False):
    """The relay's ``ok``: the public ``address`` ("host:port") and ``port``;
    the ``lease`` token and its ``lease_time`` (seconds) if one was issued;
    with ``heartbeat_timeout`` (seconds), the heartbeat's terms: a ping
    every third of it; with ``allow`` (CIDR texts), the service's allow list,
    as the relay holds it: the service's proof that this relay enforces it; with
    ``group`` ({"name": text, "members": count}), the group joined; with ``health``
    ({"interval": seconds, "failures": count, "probe": text}), the health checks' terms;
    with ``tunnels``, ``"tunnels": true``: further tunnels may follow (section 2.11)."""
    fields = {"address": address, "port": port, "version": PROTOCOL_VERSION}
    if tunnels:
        fields["tunnels"] = True
    if allow is not None:
        fields["allow"] = list(allow)
    if group is not None:
        fields["group"] = dict(group)
    if health is not None:
        fields["health"] = dict(health, interval=seconds(health["interval"]))
    if lease is not None:
        fields.update(lease=lease, lease_seconds=seconds(lease_time))
    if heartbeat_timeout is not None:
        # Whole seconds go out as integers; only a fraction makes a float.
        fields["heartbeat"] = {"interval": seconds(heartbeat_timeout / 3.0),
                               "timeout": seconds(heartbeat_timeout)}
    return encode_reply("ok", **fields)


def error_line(message):
    """The relay's refusal, saying why (text)."""
    return encode_reply("error", error=message)


def challenge_line(method, nonce, group=None):
    """The relay's challenge: the ``method`` to answer with and the ``nonce``
    (bytes); with ``group`` (a name), to be answered with that group's key."""
    fields = {"method": method, "nonce": binascii.hexlify(nonce).decode("ascii")}
    if group is not None:
        fields["group"] = group
    return encode_reply("challenge", **fields)


def answer_line(mac):
    """The service's answer to a challenge: ``mac``, the hex text of its HMAC."""
    return _line({"hmac": mac})


def ping_line(seq):
    """The service's heartbeat ping number ``seq``."""
    return _line({"ping": seq})


def pong_line(seq):
    """The relay's answer to a ping: the ping's ``seq`` (any JSON value), as it came."""
    return _line({"pong": seq})


def parse_object(line):
    """One line holding a JSON object, as a dict."""
    try:
        body = _load_json(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RegistrationError("not a JSON object on one line")
    if not isinstance(body, dict):
        raise RegistrationError("not a JSON object on one line")
    return body


def parse_minimal_reply(data):
    """The minimal form's reply (``host:port``, ASCII, a newline tolerated) as
    an ``ok`` reply dict with ``address`` and ``port``. Raises
    RegistrationError for anything else (a JSON line is the caller's to read)."""
    try:
        text = data.decode("ascii").rstrip("\r\n")
        port = addresses.split_host_port(text)[1]
    except (UnicodeDecodeError, ValueError):
        raise RegistrationError("the relay's answer is neither a JSON line nor host:port: "
                                "%.60r" % data)
    if not text.isprintable() or " " in text:
        raise RegistrationError("the relay's answer is not host:port: %.60r" % data)
    return {"status": "ok", "address": text, "port": port}


def parse_reply(line):
    """A reply line as a dict with at least ``status``."""
    body = parse_object(line)
    if not isinstance(body.get("status"), str):
        raise RegistrationError("relay reply has no status")
    return body


class LineSplitter(object):
    """Cuts bytes fed to it into lines; reads nothing itself.

    A line may be of any length once its newline has come; what is buffered
    without one may be ``limit`` bytes at most (else ``LineTooLong``).
    """

    def __init__(self, limit):
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, data):
        """The complete lines (bytes, without newline) that ``data`` finishes.
        Raises ``LineTooLong`` if more than ``limit`` bytes then wait for a newline."""
        self._buffer += data
        lines = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[:end + 1]
        if len(self._buffer) > self._limit:
            raise LineTooLong(self._limit)
        return lines

    @property
    def pending(self):
        """The bytes after the last newline."""
        return bytes(self._buffer)
