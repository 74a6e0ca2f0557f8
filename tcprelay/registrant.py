"""The service's side of registration: the request, the relay's answers, the
challenge, the wait in line (docs/PROTOCOL.md, section 2).

``register`` runs the extended form over an open session, ``register_minimal``
the minimal one; ``service.connect`` dials, sets up the session and calls
them (and tells a relay that speaks only the minimal form). ``registration.py`` holds the bytes
of requests and replies; this module decides what to send and how long to
wait. The relay's side is ``registrar.py``.
"""

import binascii
import logging
import socket
import time

from . import auth, registration
from .muxerrors import StreamResetError
from .streamlines import DeadlinePassed, StreamLines

# The service library's lines, wherever its code lives: users filter them by this name.
log = logging.getLogger("tcprelay.service")

DEFAULT_TIMEOUT = 10.0
# Seconds the extended request waits for the relay's first answer before we
# take the relay for one that speaks only the minimal form (it waits for a FIN
# the extended form never sends). A tcprelay relay answers at once.
MINIMAL_GRACE = 2.0
MINIMAL_ONLY = ("the relay at %s speaks only the minimal registration form: no leases, "
                "no heartbeat, no PROXY headers, no waiting-line notices")


class MinimalRelay(registration.RegistrationError):
    """The relay answered our extended request as one that speaks only the
    minimal form does: with a bare ``host:port`` (``reply``, the ok reply:
    we are registered, in the minimal form), or not at all within the grace
    (``reply`` None: dial again in the minimal form)."""

    def __init__(self, reply=None):
        super(MinimalRelay, self).__init__("the relay speaks only the minimal form")
        self.reply = reply


class RegistrationRefused(Exception):
    """The relay refused to register us; ``reason`` says why. Retrying will not help.
    ``in_line`` is True when it refused us after putting us in line (``max_wait``
    ran out)."""

    def __init__(self, reason, in_line=False):
        super(RegistrationRefused, self).__init__(reason)
        self.reason = reason
        self.in_line = in_line


class NeedsExtendedForm(RegistrationRefused):
    """We asked for what only the extended form carries (``option``:
    ``"port"``, ``"proxy_protocol"`` or ``"secret"``), of a relay that
    speaks only the minimal form."""

    def __init__(self, where, option):
        super(NeedsExtendedForm, self).__init__(
            "the relay at %s speaks only the minimal registration form, which cannot carry "
            "%s= (leave it out, or use a relay that speaks the extended form)" % (where, option))
        self.option = option


def needs_extended_form(port=None, proxy_protocol=None, secret=None, allow=None, group=None):
    """The first option given (its parameter name) that the minimal form cannot
    carry, else None. A lease, a name, the heartbeat are dropped: harmless. An
    allow list or a group is never dropped: every client would reach us."""
    for option, value in (("port", port), ("proxy_protocol", proxy_protocol),
                          ("secret", secret), ("allow_clients", allow), ("group", group)):
        if value is not None:
            return option
    return None


def _next_reply(lines, silence, deadline, silent, first=False):
    """The relay's next reply, as a dict. The relay may be quiet ``silence``
    seconds at a time (None: as long as the session lasts), up to
    ``deadline`` (monotonic, or None). Raises ``socket.timeout`` saying
    ``silent % silence`` or why. The ``first`` reply of connect()'s attempt
    may be a minimal relay's bare ``host:port``, or nothing: then
    MinimalRelay is raised."""
    try:
        line = lines.read_line(silence, deadline)
    except DeadlinePassed:
        raise socket.timeout("gave no port within max_wait and the timeout")
    except socket.timeout:
        raise socket.timeout(silent % silence)
    bare = lines.rest if line is None else line
    if first and not bare:
        # Nothing at all, the session alive: a relay that answered the 2014
        # way (host:port, then close, unread) whose answer a reset cost us.
        raise MinimalRelay()
    if first and not bare.lstrip().startswith(b"{"):   # JSON may start with blanks
        raise MinimalRelay(registration.parse_minimal_reply(bare))
    if line is None:
        raise registration.RegistrationError(
            "the relay closed the registration stream without answering")
    return registration.parse_reply(line)


def register(session, port=None, name=None, max_wait=None, timeout=DEFAULT_TIMEOUT,
             on_waiting=None, lease=None, heartbeat=False, proxy_protocol=None, secret=None,
             allow=None, group=None, group_key=None, health=None, grace=None, tunnels=False):
    """Register over an open session (extended form).

    Returns ``(reply, stream)``: the relay's ok reply, and the registration
    stream if it now carries the heartbeat (else None: it is closed).
    ``on_waiting(position)`` is called when we join the line for a port and
    each time our place in it changes. With ``secret`` (bytes) we answer the
    relay's challenge. With ``allow`` (CIDR texts) only clients from those
    networks may reach us; a relay whose ``ok`` does not confirm it (an older
    one ignores the field) is ``RegistrationRefused`` too. With ``group`` (a
    name) and ``group_key`` (bytes) we join that group's shared public port,
    answering the relay's group challenge; ``health`` ({"interval": seconds,
    "failures": count}) asks for health checks (docs/PROTOCOL.md, 2.9); a relay
    whose ``ok`` does not confirm the group is ``RegistrationRefused``. With
    ``tunnels`` (and a ``name``), further tunnels may be registered on this
    session after it (docs/PROTOCOL.md, 2.11); a relay whose ``ok`` does not
    confirm it is ``RegistrationRefused``. Raises
    ``RegistrationRefused`` if the relay says no, ``socket.timeout`` if it
    goes silent (see below).

    Each answer must come within ``timeout`` seconds. Once in line we wait
    as long as ``max_wait`` allows (None: for ever), and silence means a
    dead relay only if the relay promised to repeat its ``waiting`` line
    (its ``interval``): then after ``max(timeout, 2 * interval)`` seconds.
    A relay that made no such promise (older tcprelay) keeps us in line
    until the session ends (TCP keepalive notices a vanished machine).

    With ``grace`` (seconds, or None), a first answer that is a bare
    ``host:port`` raises ``MinimalRelay`` (its ``reply`` the ok reply); so
    does silence for ``grace`` seconds, or a registration stream that ends
    without a byte (``reply`` None).
    """
    # The SYN goes with the request, in one frame: a relay that answers and
    # closes without reading (the 2014 style) gets no DATA on a closed stream
    # to answer with a reset, which would cost us its answer.
    stream = session.open(announce=False)
    keep = False
    try:
        request = registration.Request(port=port, name=name, max_wait=max_wait, notices=True,
                                       lease=lease, heartbeat=heartbeat,
                                       proxy_protocol=proxy_protocol,
                                       auth=auth.METHOD if secret is not None else None,
                                       allow=allow, group=group, health=health,
                                       tunnels=tunnels)
        stream.settimeout(timeout)
        stream.sendall(request.encode())
        reply, challenged = _until_ok(stream, timeout, max_wait, grace, on_waiting, secret,
                                      group, group_key)
        _check_ok(reply, unasked_secret=secret is not None and not challenged,
                  allow=allow, group=group, tunnels=tunnels)
        keep = heartbeat and isinstance(reply.get("heartbeat"), dict)
        return reply, (stream if keep else None)
    finally:
        if not keep:
            stream.close()


def _until_ok(stream, timeout, max_wait, grace, on_waiting, secret, group, group_key):
    """The relay's answers to our request, up to its ``ok``: (that reply, whether
    it challenged us). Waiting lines are told, challenges answered (see register)."""
    replies = StreamLines(stream, registration.MAX_REPLY)
    # The relay answers max_wait's end with an error: we need wait no longer.
    deadline = None if max_wait is None else time.monotonic() + max_wait + timeout
    silence, silent = timeout, "did not answer within %gs"
    reported = None
    challenged = False
    in_line = False
    first = True
    while True:
        if first and grace is not None:
            try:
                reply = _next_reply(replies, min(grace, timeout), deadline, silent, True)
            except StreamResetError:
                if stream.session.remote_goaway is not None:
                    # The relay said GOAWAY (a TLS relay to a plain connection,
                    # say): its reason is the answer, not a minimal relay's.
                    raise
                raise MinimalRelay()   # as for an answer lost (above)
            except socket.timeout:
                # A reset, not a FIN: a minimal relay would take a FIN for the
                # end of a request, and answer it with a port.
                stream.reset()
                raise MinimalRelay()
        else:
            reply = _next_reply(replies, silence, deadline, silent)
        first = False
        status = reply["status"]
        if status == "waiting":
            in_line = True
            position = reply.get("position")
            silence = _silence_in_line(reply.get("interval"), timeout)
            silent = "went silent for %gs while we waited in line"
            if position != reported:
                log.info("%s; waiting in line (position %s)", _why_waiting(reply), position)
                reported = position
                if on_waiting is not None:
                    on_waiting(position)
        elif status == "ok":
            return reply, challenged
        elif status == "challenge" and "group" in reply:
            _answer_group_challenge(stream, reply, group, group_key)
            silence, silent = timeout, "did not answer within %gs"
        elif status == "challenge":
            _answer_challenge(stream, reply, secret)
            challenged = True
            silence, silent = timeout, "did not answer within %gs"
        elif status == "error":
            raise RegistrationRefused(str(reply.get("error", "refused")),
                                      in_line=in_line)
        else:
            raise registration.RegistrationError("unexpected reply status %r" % status)


def register_minimal(session, timeout=DEFAULT_TIMEOUT, max_wait=None, patient=True):
    """Register over an open session in the minimal form (docs/PROTOCOL.md 2.1).

    Returns the ok reply: a dict with ``address`` ("host:port") and ``port``.
    The relay is silent until it has a port for us: ``patient`` waits for as
    long as the session lasts, else the answer must come within ``timeout``
    seconds (``socket.timeout``). With ``max_wait`` (seconds) we give up
    after it and ``timeout`` more: ``RegistrationRefused`` (``in_line``), as
    for the relay's error line. ``RegistrationError`` for any other answer.
    """
    stream = session.open(announce=False)   # SYN and FIN in one frame, as Go sends it
    try:
        stream.close_write()
        replies = StreamLines(stream, registration.MAX_REPLY)
        deadline = None if max_wait is None else time.monotonic() + max_wait + timeout
        try:
            line = replies.read_line(None if patient else timeout, deadline)
        except DeadlinePassed:
            raise RegistrationRefused("no public port came within max_wait (%gs; a relay "
                                      "of the minimal form does not say why)" % max_wait,
                                      in_line=True)
        except socket.timeout:
            raise socket.timeout("answered neither the extended nor the minimal form within "
                                 "%gs (a relay of the minimal form with every port taken "
                                 "says nothing: --minimal waits for a port)" % timeout)
        answer = replies.rest if line is None else line
        if answer.lstrip().startswith(b"{"):
            reply = registration.parse_reply(answer)
            if reply["status"] == "error":
                raise RegistrationRefused(str(reply.get("error", "refused")))
            raise registration.RegistrationError("unexpected reply status %r to the minimal "
                                                 "form" % reply["status"])
        if not answer:
            raise registration.RegistrationError(
                "the relay closed the registration stream without answering")
        return registration.parse_minimal_reply(answer)
    finally:
        stream.close()


def extended_form(keepalive, request, session, noted):
    """connect()'s extended attempt: ``register`` with ``request`` (its
    keywords) and the grace, telling ``noted`` each place in line too.
    Returns (the ok reply, the heartbeat's (stream, interval, timeout) or
    None); ``keepalive`` (seconds) fills in terms the relay leaves out."""
    told = request.get("on_waiting")

    def waiting(position):
        noted(position)
        if told is not None:
            told(position)
    reply, stream = register(session, grace=MINIMAL_GRACE, **dict(request, on_waiting=waiting))
    noted(None)   # the relay answered: a bad heartbeat term is no sign of a wrong port
    if stream is None:
        return reply, None
    beat = reply["heartbeat"]
    return reply, (stream, _seconds(beat, "interval", keepalive / 3.0),
                   _seconds(beat, "timeout", keepalive))


def minimal_form(timeout, max_wait, patient, session, noted):
    """connect()'s minimal attempt: ``register_minimal``'s reply, and no heartbeat."""
    return register_minimal(session, timeout, max_wait, patient), None


def _check_ok(reply, unasked_secret, allow=None, group=None, tunnels=False):
    """Raise RegistrationError if the relay's ``ok`` gives no address, and
    RegistrationRefused if it does not confirm our ``allow`` list or ``group``;
    warn if we have a secret it did not ask for (``unasked_secret``)."""
    if not isinstance(reply.get("address"), str):
        raise registration.RegistrationError("the relay's ok has no address")
    joined = reply.get("group")
    if group is not None and not (isinstance(joined, dict) and joined.get("name") == group):
        # An older relay ignores "group": we would be alone on a port of our own.
        raise RegistrationRefused(
            "it did not confirm our group %r (an older relay ignores groups): upgrade the "
            "relay, or leave the group out" % group)
    if tunnels and reply.get("tunnels") is not True:
        # An older relay ignores "tunnels": it would take no further tunnel.
        raise RegistrationRefused(
            "it did not confirm several tunnels on one session (an older relay cannot "
            "carry them): upgrade the relay, or serve one tunnel per connection")
    if allow is not None and reply.get("allow") != list(allow):
        # Fail closed: a relay that ignored the list would let anyone in.
        raise RegistrationRefused(
            "it did not confirm our allow list (an older relay ignores it): clients "
            "from anywhere could reach us, so we do not serve through it; upgrade the "
            "relay, or leave the allow list out")
    if unasked_secret:
        log.warning("the relay did not ask for our secret: it lets anyone "
                    "register (no --secret-file), or it is not the relay meant")


def _answer_challenge(stream, reply, secret):
    """Answer the relay's ``challenge`` with ``secret`` (bytes, or None: we have
    none). Raises RegistrationRefused if we cannot, RegistrationError if the
    challenge is malformed."""
    if secret is None or reply.get("method") != auth.METHOD:
        raise RegistrationRefused("the relay asks for an authentication we cannot "
                                  "give (%s)" % reply.get("method"))
    try:
        nonce = binascii.unhexlify(reply.get("nonce", ""))
    except (TypeError, ValueError, binascii.Error):
        raise registration.RegistrationError("the relay's challenge is malformed")
    stream.sendall(registration.answer_line(auth.answer(secret, nonce)))


def _answer_group_challenge(stream, reply, group, key):
    """Answer the relay's challenge for ``group`` with its ``key`` (bytes).
    Raises RegistrationRefused if we cannot, RegistrationError if it is malformed."""
    if group is None or key is None or reply.get("group") != group \
            or reply.get("method") != auth.METHOD:
        raise RegistrationRefused("the relay asks for the key of group %r, which we cannot "
                                  "give" % (reply.get("group"),))
    try:
        nonce = binascii.unhexlify(reply.get("nonce", ""))
    except (TypeError, ValueError, binascii.Error):
        raise registration.RegistrationError("the relay's challenge is malformed")
    stream.sendall(registration.answer_line(auth.group_answer(key, nonce, group)))


def _why_waiting(reply):
    """What a ``waiting`` line says we wait for, and why (older relays say neither)."""
    port, reason = reply.get("port"), reply.get("reason")
    if not (isinstance(reason, str) and reason.isprintable() and 0 < len(reason) <= 200):
        reason = None
    if reason is not None:
        return reason
    if isinstance(port, int) and not isinstance(port, bool):
        return "public port %d is held by another service" % port
    return "every public port is taken"


def _seconds(beat, key, default):
    """The relay's heartbeat ``key`` (seconds): a positive finite number, else
    RegistrationError (a hostile relay's value must not escape as ValueError)."""
    value = beat.get(key, default)
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            pass
    if seconds is None or not 0 < seconds < float("inf"):
        raise registration.RegistrationError("the relay's heartbeat %s is not a positive "
                                             "number of seconds: %.60r" % (key, value))
    return seconds


def _silence_in_line(interval, timeout):
    """How long a relay that has put us in line may be silent (None: no limit)."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        return None   # no promise to repeat itself: silence is no sign of death
    try:
        silence = max(timeout, 2.0 * interval)
    except OverflowError:
        return None   # a promise for longer than a float holds: none
    if not interval > 0 or not silence < float("inf"):
        return None   # (an infinite timeout would overflow the stream's wait)
    return silence
