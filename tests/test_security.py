"""Who may register, over what, and how much (issue 7): the shared secret's
challenge-response, TLS on the service port, --allow-from, and the limits
(--max-waiting, --max-clients, streams per session, the handshake timeout,
--idle-timeout, --registration-rate and the ban after failed authentication).

In-process ``Relay`` where the rule lives in the relay; real processes
(``python -m``) for the command-line rules. Everything binds 127.0.0.1 only,
every blocking call has a timeout, and in-process tests run under
``no_leaks`` and fail if tcprelay logs an error.

Time-based rules (a ban for a minute, 6 registrations a minute, refusals
logged once a second) are checked on the relay's own limiter objects with
their clock swapped for one the test moves, so nothing waits a minute.
"""

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import socketserver
import ssl
import stat
import threading
import time
import warnings

import pytest

from helpers.basics import (
    LOOPBACK, MIB, TIMEOUT, FakeClock, Worker, free_port_range, pool_args, wait_until,
)
from helpers.processes import MainRun, assert_clean_exit
from helpers.relay import (
    CA, CERT, KEY, checked_echo, connect_client, digest, echo_handler, echo_roundtrip, link_of,
    listeners, read_until_end, recv_exact, recv_to_eof, server_tls, trusting_tls,
)
from tcprelay import auth, frames, muxado, registration, tls
from tcprelay.muxado import ErrorCode
from tcprelay.service import RegistrationRefused, connect


@pytest.fixture
def env(security_env):
    """This module's tests run in a SecurityEnv (conftest)."""
    return security_env


@pytest.fixture
def logs(warning_logs):
    """WARNING and up unless told; wait_for returns every match (conftest)."""
    return warning_logs


@pytest.fixture
def procs(procs_no_listener_check):
    """Relays started here are not checked for their listeners (conftest)."""
    return procs_no_listener_check


SECRET = b"s3cret-" + binascii.hexlify(os.urandom(12))   # distinctive on the wire
METHOD = "hmac-sha256"


# -- helpers --------------------------------------------------------------------------------

def hmac_answer(secret, nonce):
    """The answer the issue specifies: HMAC-SHA256 keyed by the secret over a fixed
    context label and the nonce, in hex."""
    return hmac.new(secret, auth.CONTEXT + nonce, hashlib.sha256).hexdigest()


def answer_line(hex_answer):
    return (json.dumps({"hmac": hex_answer}) + "\n").encode("ascii")


def warnings_from(caplog, text, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("tcprelay") and r.levelno >= level and text in r.getMessage()]


def probe(address):
    """'admitted' or 'refused': send a bad request and see whether the relay answers
    it (admitted: an error reply comes back) or resets the connection unread."""
    try:
        sock = socket.create_connection(tuple(address[:2]), timeout=TIMEOUT)
    except ConnectionResetError:
        return "refused"
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.sendall(frames.encode_data(3, b"{not json\n", frames.SYN))
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return "refused"
        return "admitted" if data else "refused"
    finally:
        sock.close()


def challenge(service, body=None):
    """Start an authenticated registration; returns (registration, challenge reply)."""
    request = dict(body or {})
    request["auth"] = METHOD
    reg = service.register(request)
    reply = reg.reply()
    assert reply is not None and reply.get("status") == "challenge", reply
    return reg, reply


def connect_and_read(port):
    """(data, how) for a new client of ``port`` that only reads: how it ended
    ("eof" or the exception), a reset during connect() included."""
    try:
        sock = connect_client(port)
    except ConnectionResetError as exc:
        return b"", exc
    try:
        return read_until_end(sock)
    finally:
        sock.close()


# -- authentication: the challenge ------------------------------------------------------------

def test_a_secret_makes_registration_an_hmac_challenge_on_a_fresh_nonce(env, monkeypatch):
    compared = []
    real_compare = hmac.compare_digest

    def spying_compare(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spying_compare)
    relay = env.relay(ports=2, secret=SECRET)
    nonces = []
    for turn in range(2):
        service = env.service(relay)
        reg, reply = challenge(service, {"name": "svc-%d" % turn})
        assert reply["method"] == METHOD
        nonce = binascii.unhexlify(reply["nonce"])
        assert len(nonce) >= 16, "a %d-byte nonce" % len(nonce)
        nonces.append(nonce)
        expected = hmac_answer(SECRET, nonce)
        reg.stream.sendall(answer_line(expected))
        waiting, final = reg.final()
        reg.close()
        assert waiting == []
        assert (final["status"], final["port"]) == ("ok", relay.pool.ports[turn]), final
        # Checked in constant time, against exactly this answer.
        assert len(compared) == turn + 1
        assert expected.encode("ascii") in compared[-1]
        # The registered service really serves its port.
        client = env.client(final["port"])
        stream = service.accept()
        client.sendall(b"authenticated")
        assert recv_exact(stream, 13) == b"authenticated"
    assert nonces[0] != nonces[1], "the relay reused a nonce"


def test_an_answer_without_the_context_label_is_refused(env):
    relay = env.relay(ports=1, secret=SECRET)
    service = env.service(relay)
    reg, reply = challenge(service)
    nonce = binascii.unhexlify(reply["nonce"])
    bare = hmac.new(SECRET, nonce, hashlib.sha256).hexdigest()   # the right key, no label
    reg.stream.sendall(answer_line(bare))
    waiting, final = reg.final()
    assert final == {"status": "error", "error": "authentication failed"}


@pytest.mark.parametrize("how, reason", [
    ("wrong-secret", "authentication failed"),
    ("garbled-answer", "authentication failed"),
    ("no-answer-field", "authentication failed"),
    ("no-secret", "this relay requires a secret"),
    ("minimal-form", "this relay requires a secret"),
    ("unknown-method", "unknown authentication method 'md5' (this relay uses hmac-sha256)"),
])
def test_a_registration_without_the_secret_gets_an_error_reply_then_the_session_closes(
        env, caplog, how, reason):
    relay = env.relay(ports=1, secret=SECRET)
    service = env.service(relay)
    source = "127.0.0.1:%d" % service.session.getsockname()[1]
    if how == "minimal-form":
        raw = service.register_minimal()   # the empty request, Go-style
        assert raw.endswith(b"\n")
        final = json.loads(raw.decode("utf-8"))
    elif how == "no-secret":
        final = service.register({"name": "no-secret"}).final()[1]
    elif how == "unknown-method":
        final = service.register({"auth": "md5"}).final()[1]
    else:
        reg, reply = challenge(service)
        nonce = binascii.unhexlify(reply["nonce"])
        line = {"wrong-secret": answer_line(hmac_answer(b"not the secret", nonce)),
                "garbled-answer": answer_line("zz" * 32),
                "no-answer-field": b'{"answer": "%s"}\n' % hmac_answer(SECRET, nonce).encode()}
        reg.stream.sendall(line[how])
        final = reg.final()[1]
    assert final == {"status": "error", "error": reason}
    # The relay closes the session after its reply.
    assert service.session.wait(TIMEOUT), "the session outlived the refusal"
    # Logged as a failure, with where it came from.
    logged = warnings_from(caplog, reason)
    assert len(logged) == 1 and source in logged[0], logged
    # Nothing was registered: the port is still there for the secret's holder.
    connection = env.connect(relay.server_address, secret=SECRET)
    assert connection.port == relay.pool.ports[0]


@pytest.mark.parametrize("secret, reason", [
    (b"wrong secret", "authentication failed"),
    (None, "this relay requires a secret"),
])
def test_the_service_library_raises_registration_refused_with_the_reason(env, secret, reason):
    relay = env.relay(ports=1, secret=SECRET)
    with pytest.raises(RegistrationRefused) as info:
        connect(relay.server_address, secret=secret, timeout=TIMEOUT)
    assert info.value.reason == reason
    connection = env.connect(relay.server_address, secret=SECRET)
    assert connection.port == relay.pool.ports[0]


def _split_frames(data):
    """Raw muxado frames, each header and body, as in ``data``."""
    out = []
    offset = 0
    while offset + frames.HEADER_SIZE <= len(data):
        length = int.from_bytes(data[offset:offset + 3], "big")
        end = offset + frames.HEADER_SIZE + length
        out.append(bytes(data[offset:end]))
        offset = end
    return out


def test_the_secret_never_crosses_the_wire_and_a_recorded_exchange_cannot_be_replayed(env):
    relay = env.relay(ports=1, secret=SECRET)
    proxy = env.proxy(relay.server_address)
    connection = env.connect(proxy.address, secret=SECRET, heartbeat=False)
    loop = env.echo(connection)
    checked_echo(connection.port, 64 * 1024)
    loop.close()   # the service leaves: the proxy sees both directions end
    piped = proxy.connections[0]
    piped.join()   # both directions ended: everything is recorded
    up, down = bytes(piped.upstream), bytes(piped.downstream)
    for form in (SECRET, binascii.hexlify(SECRET), base64.b64encode(SECRET),
                 SECRET.decode("ascii").encode("utf-16-le")):
        assert form not in up and form not in down, "the secret (as %r) is on the wire" % form
    # What did cross: a nonce one way, its HMAC the other.
    nonces = re.findall(br'"nonce": "([0-9a-f]+)"', down)
    answers = re.findall(br'\{"hmac": "([0-9a-f]+)"\}\n', up)
    assert len(nonces) == 1 and len(answers) == 1, (nonces, answers)
    recorded_nonce = binascii.unhexlify(nonces[0])
    assert answers[0].decode() == hmac_answer(SECRET, recorded_nonce)

    # Replay 1: the service's recorded bytes, verbatim, up to its answer, on a new connection.
    recorded = _split_frames(up)
    cut = [i for i, frame in enumerate(recorded) if b'"hmac"' in frame][0]
    replay = env.raw(relay.server_address)
    replay.send(b"".join(recorded[:cut + 1]))
    replay.read_to_eof()
    replies = replay.lines(3)
    assert [r["status"] for r in replies] == ["challenge", "error"], replies
    assert binascii.unhexlify(replies[0]["nonce"]) != recorded_nonce
    assert replies[1]["error"] == "authentication failed"

    # Replay 2: the recorded answer, given to a fresh challenge.
    service = env.service(relay)
    reg, reply = challenge(service)
    assert binascii.unhexlify(reply["nonce"]) != recorded_nonce
    reg.stream.sendall(answer_line(answers[0].decode()))
    assert reg.final()[1] == {"status": "error", "error": "authentication failed"}


# -- authentication: failures, bans, rates, networks ------------------------------------------

def test_five_failed_authentications_in_a_minute_ban_the_address_for_a_minute(env, caplog,
                                                                               logs):
    relay = env.relay(ports=1, secret=SECRET, registration_rate=100000)
    clock = FakeClock()
    relay.auth_failures._clock = clock   # the relay's own limiter, on a clock we move

    def fail():
        with pytest.raises(RegistrationRefused) as info:
            connect(relay.server_address, secret=b"guess", timeout=TIMEOUT)
        assert info.value.reason == "authentication failed"

    for _ in range(4):
        fail()
    clock.advance(60.5)   # those four are more than a minute old
    for _ in range(4):
        fail()
    assert probe(relay.server_address) == "admitted"   # four in the last minute: still let in
    fail()   # the fifth within a minute
    assert len(warnings_from(caplog, "too many failures, refusing 127.0.0.1 for a minute")) == 1
    # Refused before any handshake work, even with the right secret.
    assert probe(relay.server_address) == "refused"
    with pytest.raises((OSError, registration.RegistrationError, muxado.MuxadoError)) as info:
        connect(relay.server_address, secret=SECRET, timeout=TIMEOUT)
    assert not isinstance(info.value, RegistrationRefused)
    logs.wait_for("refused a service connection from 127.0.0.1: too many failed "
                  "authentications")
    clock.advance(59.0)
    assert probe(relay.server_address) == "refused"
    clock.advance(1.5)    # the minute is over
    connection = env.connect(relay.server_address, secret=SECRET)
    assert connection.port == relay.pool.ports[0]


def test_registration_rate_limits_new_connections_per_address(env, logs):
    relay = env.relay(ports=1, registration_rate=6)   # 6 a minute, in bursts of 2
    clock = FakeClock()
    relay.registration_rate._clock = clock
    assert [probe(relay.server_address) for _ in range(3)] == ["admitted", "admitted", "refused"]
    logs.wait_for("refused a service connection from 127.0.0.1: too many registrations from "
                  "this address (--registration-rate)")
    clock.advance(10.0)   # one connection's worth at 6 a minute
    assert [probe(relay.server_address) for _ in range(2)] == ["admitted", "refused"]
    clock.advance(600.0)  # a long quiet spell earns a burst, no more
    assert [probe(relay.server_address) for _ in range(3)] == ["admitted", "admitted", "refused"]


def test_default_registration_rate_is_60_a_minute_in_bursts_of_20(env):
    relay = env.relay(ports=1)
    clock = FakeClock()
    relay.registration_rate._clock = clock
    outcomes = [probe(relay.server_address) for _ in range(21)]
    assert outcomes == ["admitted"] * 20 + ["refused"]
    clock.advance(1.0)
    assert [probe(relay.server_address) for _ in range(2)] == ["admitted", "refused"]


def test_allow_from_refuses_other_networks_before_any_handshake_work(env, caplog, logs):
    relay = env.relay(ports=1, secret=SECRET, tls_context=server_tls(),
                      allow_from=["10.0.0.0/8", "192.168.0.0/16"])
    started = time.monotonic()
    # A TLS relay waits for our ClientHello; this one resets the connection at once.
    # (Raw, not through ssl: Python's ssl module can leak the socket it wraps when the
    # connection is reset before the handshake starts.)
    try:
        sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    except ConnectionResetError:
        data, how = b"", ConnectionResetError()
    else:
        try:
            data, how = read_until_end(sock)
        finally:
            sock.close()
    assert data == b"" and isinstance(how, ConnectionResetError), how
    assert time.monotonic() - started < relay.handshake_timeout / 2
    logs.wait_for("refused a service connection from 127.0.0.1: not in --allow-from "
                  "(10.0.0.0/8, 192.168.0.0/16)")
    assert warnings_from(caplog, "TLS", level=logging.DEBUG) == []
    assert warnings_from(caplog, "service connected", level=logging.DEBUG) == []
    assert relay.services == []
    # A network in the list (the option repeats) may register.
    allowed = env.relay(ports=1, secret=SECRET, tls_context=server_tls(),
                        allow_from=["10.0.0.0/8", "127.0.0.0/8"])
    connection = env.connect(allowed.server_address, secret=SECRET, tls=trusting_tls())
    assert connection.port == allowed.pool.ports[0]


# -- the handshake timeout --------------------------------------------------------------------

def test_a_tls_handshake_that_never_starts_is_dropped_at_the_handshake_timeout(env, caplog):
    relay = env.relay(ports=1, tls_context=server_tls(), handshake_timeout=0.5)
    started = time.monotonic()
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    try:
        data, how = read_until_end(sock)   # says nothing; the relay hangs up
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    assert data == b"" and (how == "eof" or isinstance(how, ConnectionResetError)), how
    assert 0.4 <= elapsed < 3, elapsed
    assert len(warnings_from(caplog, "TLS handshake failed")) == 1


def test_a_challenge_left_unanswered_is_refused_at_the_handshake_timeout(env):
    relay = env.relay(ports=1, secret=SECRET, handshake_timeout=0.5)
    service = env.service(relay)
    started = time.monotonic()
    reg, reply = challenge(service)
    waiting, final = reg.final()   # we never answer
    elapsed = time.monotonic() - started
    assert final == {"status": "error", "error": "registration not finished within 0.5s"}
    assert 0.4 <= elapsed < 3, elapsed
    assert service.session.wait(TIMEOUT)


# -- TLS ---------------------------------------------------------------------------------------

def test_tls_carries_the_registration_and_data_exactly(env):
    relay = env.relay(ports=1, secret=SECRET, tls_context=server_tls())
    proxy = env.proxy(relay.server_address)
    connection = env.connect(proxy.address, secret=SECRET, tls=trusting_tls())
    env.echo(connection)
    # A few MiB each way, concurrently, through two clients.
    payloads = [os.urandom(3 * MIB + 17), os.urandom(2 * MIB + 5)]
    clients = [env.client(connection.port) for _ in payloads]
    workers = [Worker(echo_roundtrip, c, p) for c, p in zip(clients, payloads)]
    for worker, payload, client in zip(workers, payloads, clients):
        got = worker.finish(4 * TIMEOUT)
        assert len(got) == len(payload) and digest(got) == digest(payload)
        assert recv_to_eof(client) == b""
    # On the wire: TLS records from the first byte, and nothing in the clear.
    piped = proxy.connections[0]
    up, down = bytes(piped.upstream), bytes(piped.downstream)
    assert up[:1] == b"\x16" and down[:3] == b"\x16\x03\x03", (up[:5], down[:5])
    for text in (SECRET, METHOD.encode(), b'"status"', payloads[0][:64], payloads[1][:64]):
        assert text not in up and text not in down


def _tls11_only_client():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(context, "maximum_version"):
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        else:   # Python 3.6
            context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_2 | ssl.OP_NO_TLSv1_3
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(context, address):
    """The TLS version a handshake with ``address`` agreed on, or the SSLError."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    try:
        sslsock = context.wrap_socket(sock, server_hostname=LOOPBACK)
    except (ssl.SSLError, ConnectionResetError) as exc:
        sock.close()
        return exc
    version = sslsock.version()
    sslsock.close()
    return version


def _permissive_tls_server():
    """(address, thread): one TLS handshake accepted with TLS 1.1 allowed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if hasattr(context, "minimum_version"):
            context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(CERT, KEY)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        finally:
            listener.close()
        conn.settimeout(TIMEOUT)
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (OSError, ssl.SSLError):
            conn.close()

    return listener.getsockname(), Worker(serve)


def test_tls_needs_version_1_2_a_tls_1_1_only_client_fails(env, logs):
    relay = env.relay(ports=1, tls_context=server_tls(), handshake_timeout=2.0)
    # Control: this client really speaks TLS 1.1 (to a server that allows it).
    address, server = _permissive_tls_server()
    control = _handshake(_tls11_only_client(), address)
    server.finish()
    if control != "TLSv1.1":
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all (%s)" % control)
    outcome = _handshake(_tls11_only_client(), relay.server_address)
    assert isinstance(outcome, ssl.SSLError), outcome
    assert "protocol version" in str(outcome).lower() or "unsupported" in str(outcome).lower()
    logged = logs.wait_for("TLS handshake failed")
    assert len(logged) == 1 and "unsupported protocol" in logged[0].lower(), logged
    # TLS 1.2 is welcome.
    twelve = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    twelve.load_verify_locations(CA)
    if hasattr(twelve, "maximum_version"):
        twelve.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        twelve.options |= ssl.OP_NO_TLSv1_3
    assert _handshake(twelve, relay.server_address) == "TLSv1.2"


def test_tls_default_trust_store_does_not_trust_the_test_ca(env, caplog):
    relay = env.relay(ports=1, secret=SECRET, tls_context=server_tls())
    with pytest.raises(ssl.SSLError) as info:
        connect(relay.server_address, secret=SECRET, tls=tls.client_context(), timeout=TIMEOUT)
    assert "certificate verify failed" in str(info.value).lower()
    assert relay.pool.waiting == 0 and [l.port for l in relay.services] in ([], [None])
    # The same relay, trusted through --tls-ca, is fine.
    connection = env.connect(relay.server_address, secret=SECRET, tls=trusting_tls())
    assert connection.port == relay.pool.ports[0]


def test_tls_verifies_the_relays_host_name(env):
    relay = env.relay(ports=2, secret=SECRET, tls_context=server_tls())
    context = trusting_tls()
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED
    port = relay.server_address[1]
    # "127.1" reaches 127.0.0.1, but it is not a name in the certificate.
    with pytest.raises((ssl.SSLError, ssl.CertificateError)) as info:
        connect(("127.1", port), secret=SECRET, tls=trusting_tls(), timeout=TIMEOUT)
    assert "127.1" in str(info.value) and "match" in str(info.value).lower()
    # The certificate's names pass (127.0.0.1 is in its subjectAltName).
    connection = env.connect((LOOPBACK, port), secret=SECRET, tls=trusting_tls())
    assert connection.port == relay.pool.ports[0]
    # And a name check on our own context, without connect(): a stranger's name fails.
    sock = socket.create_connection(relay.server_address, timeout=TIMEOUT)
    try:
        with pytest.raises((ssl.SSLError, ssl.CertificateError)):
            trusting_tls().wrap_socket(sock, server_hostname="relay.example.test")
    finally:
        sock.close()


def test_tls_insecure_skips_verification_and_warns(env, caplog):
    relay = env.relay(ports=1, secret=SECRET, tls_context=server_tls())
    context = tls.client_context(insecure=True)
    logged = warnings_from(caplog, "--tls-insecure")
    assert len(logged) == 1, logged
    connection = env.connect(relay.server_address, secret=SECRET, tls=context)
    env.echo(connection)
    checked_echo(connection.port, 256 * 1024)


# -- limits -------------------------------------------------------------------------------------

def test_max_waiting_refuses_the_excess_with_an_error_reply(env, caplog):
    relay = env.relay(ports=1, max_waiting=2)
    port = relay.pool.ports[0]
    holder = env.service(relay)
    assert holder.register_ok() == port
    lines = []
    for place in (1, 2):
        waiter = env.service(relay)
        reg = waiter.register({"notices": True, "name": "waiter-%d" % place})
        assert reg.reply() == {"status": "waiting", "position": place}
        lines.append((waiter, reg))
    excess = env.service(relay)
    waiting, final = excess.register({"notices": True, "name": "excess"}).final()
    assert waiting == []
    assert final == {"status": "error", "error": "too many services are waiting for a port "
                                                 "(2); try again later"}
    assert len(warnings_from(caplog, "(--max-waiting)")) == 1
    # Only the excess: the line moves on as before.
    holder.close()
    first, first_reg = lines[0]
    waiting, final = first_reg.final()
    assert (final["status"], final["port"]) == ("ok", port)
    assert lines[1][1].reply() == {"status": "waiting", "position": 1}
    again = env.service(relay)
    reg = again.register({"notices": True})
    assert reg.reply() == {"status": "waiting", "position": 2}


def test_max_clients_refuses_the_excess_at_once_and_logs_once_a_second(env, logs):
    relay = env.relay(ports=1, max_clients=3)
    clock = FakeClock()
    service = env.service(relay)
    port = service.register_ok()
    gate = link_of(relay, port).log_over_max_clients   # the service's once-a-second limiter
    gate._clock, gate._stamp = clock, clock.now
    service.serve(echo_handler)
    admitted = [env.client(port) for _ in range(3)]
    for client in admitted:
        assert echo_roundtrip(client, b"in", half_close=False) == b"in"
    started = time.monotonic()
    for _ in range(10):
        data, how = connect_and_read(port)
        assert data == b"" and isinstance(how, ConnectionResetError), how
    assert time.monotonic() - started < 2.0, "refusals were not immediate"
    clock.wait_calls(10)   # the relay logs (or counts) each refusal just after the reset
    link = link_of(relay, port)
    assert link.clients_served == 3   # no stream was opened for any of them
    refusals = logs.wait_for("clients already (--max-clients)")
    assert refusals == ["service 127.0.0.1:%d: refused a client from 127.0.0.1: 3 clients "
                        "already (--max-clients)" % service.session.getsockname()[1]]
    clock.advance(1.0)
    # The burst's count is told within a second, with no further refusal: the
    # last line left out, and how many more were.
    refusals = logs.wait_for("clients already (--max-clients)", count=2)
    assert len(refusals) == 2 and refusals[1].endswith("(and 8 more refusals)"), refusals
    # The admitted ones never noticed.
    for client in admitted:
        data = os.urandom(256 * 1024)
        assert digest(echo_roundtrip(client, data, half_close=False)) == digest(data)
    # One leaves: a new client gets its place.
    admitted[0].shutdown(socket.SHUT_WR)
    assert recv_to_eof(admitted[0]) == b""
    wait_until(lambda: link.client_count == 2, what="the relay to see the client leave")
    newcomer = env.client(port)
    assert echo_roundtrip(newcomer, b"my turn", half_close=False) == b"my turn"


def test_a_service_that_opens_many_streams_gets_them_refused(env):
    relay = env.relay(ports=1)
    raw = env.raw(relay.server_address)
    raw.open(3, b'{"name": "greedy"}\n', fin=True)
    assert raw.read_until(lambda: any(l.get("status") == "ok" for l in raw.lines(3)))
    opened = [5 + 2 * i for i in range(40)]
    for stream_id in opened:
        raw.open(stream_id, b"x" * 100)

    def refusals():
        return dict((f.stream_id, f.code) for f in raw.frames
                    if isinstance(f, frames.Rst) and f.stream_id in opened)

    # The relay never accepts streams from a registered service: the first 8
    # fill its accept backlog, and every later one is refused as Go's muxado
    # refuses a full backlog.
    backlog = 8
    assert raw.read_until(lambda: len(refusals()) >= len(opened) - backlog), "the relay hung up"
    codes = refusals()
    assert sorted(codes) == opened[backlog:], "held %s" % sorted(set(opened) - set(codes))
    assert set(codes.values()) == {ErrorCode.ACCEPT_QUEUE_FULL}, \
        "refused with %s" % sorted(set(ErrorCode(c).name for c in codes.values()))
    # The session itself carries on: a client still reaches the service.
    client = env.client(relay.pool.ports[0])
    assert raw.read_until(lambda: any(isinstance(f, frames.Data) and f.syn and f.stream_id % 2 == 0
                                      for f in raw.frames))
    client.close()


def _paced(send, seconds, stop, record):
    """Send 1 KiB every 50 ms for ``seconds``; keep what was sent in ``record``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        block = os.urandom(1024)
        send(block)
        record += block
        stop.wait(0.05)


def test_idle_timeout_closes_quiet_clients_only(env):
    relay = env.relay(ports=1, idle_timeout=0.5)
    service = env.service(relay)
    port = service.register_ok()
    quiet = env.client(port)
    quiet_stream = service.accept()
    talker = env.client(port)
    talker_stream = service.accept()
    listener = env.client(port)
    listener_stream = service.accept()
    started = time.monotonic()
    stop = threading.Event()
    up, down = bytearray(), bytearray()
    # The talker only sends; the listener only receives: both stay well past the timeout.
    talking = Worker(_paced, talker.sendall, 1.6, stop, up)
    listening = Worker(_paced, listener_stream.sendall, 1.6, stop, down)
    reading = [Worker(recv_to_eof, talker_stream), Worker(recv_to_eof, listener)]
    try:
        data, how = read_until_end(quiet)
        quiet_for = time.monotonic() - started
        assert data == b"" and isinstance(how, ConnectionResetError), how
        assert 0.45 <= quiet_for < 3, quiet_for
        with pytest.raises(ConnectionResetError):
            quiet_stream.recv(1)   # the service learns of it too
        talking.finish()
        listening.finish()
    finally:
        stop.set()
    assert time.monotonic() - started >= 1.5
    talker.shutdown(socket.SHUT_WR)
    listener_stream.close_write()
    got_up, got_down = reading[0].finish(), reading[1].finish()
    assert len(got_up) == len(up) > 0 and digest(got_up) == digest(bytes(up))
    assert len(got_down) == len(down) > 0 and digest(got_down) == digest(bytes(down))


# -- the command line ---------------------------------------------------------------------------

class LocalEcho(object):
    """A plain TCP echo server on 127.0.0.1: the adapter's local service."""

    def __init__(self):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(TIMEOUT)
                try:
                    while True:
                        data = self.request.recv(256 * 1024)
                        if not data:
                            break
                        self.request.sendall(data)
                    self.request.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((LOOPBACK, 0), Handler)
        self.address = "%s:%d" % self.server.server_address[:2]
        self.worker = Worker(self.server.serve_forever, 0.05, name="local echo")

    def close(self):
        self.server.shutdown()
        self.worker.finish()
        self.server.server_close()


@pytest.fixture
def local_echo():
    server = LocalEcho()
    yield server
    server.close()


def secret_file(tmp_path, secret, name="secret"):
    path = tmp_path / name
    path.write_bytes(secret + b"\n")   # a trailing newline is not part of the secret
    os.chmod(str(path), stat.S_IRUSR | stat.S_IWUSR)
    return str(path)


@pytest.mark.parametrize("module, args", [
    ("tcprelay.relay", ["--secret", "hunter2"]),
    ("tcprelay.relay", ["--secret-file", "/nonexistent/secret"]),
    ("tcprelay.relay", ["--secret-file", "EMPTY"]),
    ("tcprelay.relay", ["--allow-from", "not-a-network"]),
    ("tcprelay.relay", ["--tls-cert", CERT]),
    ("tcprelay.relay", ["--tls-cert", "/nonexistent.pem", "--tls-key", KEY]),
    ("tcprelay.relay", ["--max-waiting", "0"]),
    ("tcprelay.relay", ["--max-clients", "-1"]),
    ("tcprelay.relay", ["--idle-timeout", "0"]),
    ("tcprelay.relay", ["--registration-rate", "none"]),
    ("tcprelay.echoserver", ["--secret", "hunter2"]),
    ("tcprelay.echoserver", ["--secret-file", "/nonexistent/secret"]),
    ("tcprelay.adapter", ["--tls-ca", "/nonexistent-ca.pem"]),
], ids=["relay-secret", "relay-secret-file-missing", "relay-secret-file-empty",
        "relay-allow-from-bad", "relay-cert-without-key", "relay-cert-missing",
        "relay-max-waiting-0", "relay-max-clients-negative", "relay-idle-timeout-0",
        "relay-registration-rate-text", "echo-secret", "echo-secret-file-missing",
        "adapter-tls-ca-missing"])
def test_security_options_errors_exit_2(procs, tmp_path, module, args):
    port = free_port_range(1)[0]
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    os.chmod(str(empty), stat.S_IRUSR | stat.S_IWUSR)
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if module == "tcprelay.relay":
        argv = [port, "--host", LOOPBACK, "--public-bind", LOOPBACK] + args
    elif module == "tcprelay.adapter":
        argv = [LOOPBACK, port, "127.0.0.1:9"] + args
    else:
        argv = [LOOPBACK, port] + args
    # Two cases as a child (``python -m``), the rest through main(argv) in this process.
    child = module != "tcprelay.adapter" and args[0] == "--secret"
    process = procs.start(module, *argv) if child else MainRun(module, argv)
    line = assert_clean_exit(process, 2, "")
    assert "error" in line and len(process.stderr_lines()) == 1, process.stderr_text()
    assert listeners(port) == []
    if "hunter2" in args:
        # No --secret option: the value is never taken as a secret.
        help_text = MainRun(module, ["--help"])
        assert help_text.wait() == 0
        options = re.findall(r"--[a-z-]+", help_text.stdout_rest())
        assert "--secret-file" in options and "--secret" not in options


@pytest.mark.parametrize("relay_from, service_from, program", [
    ("file", "env", "tcprelay.echoserver"),
    ("env", "file", "tcprelay.adapter"),
    ("file", "file", "tcprelay.adapter"),
])
def test_cli_secret_from_a_file_or_the_environment(procs, tmp_path, local_echo,
                                                    relay_from, service_from, program):
    ports = free_port_range(2)
    path = secret_file(tmp_path, SECRET)
    if relay_from == "file":
        relay = procs.relay(ports[0], "--secret-file", path, *pool_args(ports[1:]))
    else:
        relay = procs.relay(ports[0], *pool_args(ports[1:]), secret_env=SECRET.decode())
    assert "no secret" not in relay.stderr_text()
    args = [local_echo.address] if program == "tcprelay.adapter" else []
    if service_from == "file":
        process, port = procs.service(program, ports[0], *(args + ["--secret-file", path]))
    else:
        process, port = procs.service(program, ports[0], *args,
                                      secret_env=SECRET.decode() + "\n")
    assert port == ports[1]
    checked_echo(port, MIB)
    assert "authenticated" in relay.stderr_text()
    for p in (relay, process):
        assert "Traceback" not in p.stderr_text(), p.stderr_text()


@pytest.mark.parametrize("program", ["tcprelay.echoserver", "tcprelay.adapter"])
@pytest.mark.parametrize("secret, reason", [
    (b"not-the-secret", "authentication failed"),
    (None, "this relay requires a secret"),
], ids=["wrong-secret", "no-secret"])
def test_cli_a_refusal_is_final_even_with_retry(procs, tmp_path, program, secret, reason):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--secret-file", secret_file(tmp_path, SECRET),
                        *pool_args(ports[1:]))
    args = ["--retry"]
    if secret is not None:
        args += ["--secret-file", secret_file(tmp_path, secret, name="wrong")]
    if program == "tcprelay.adapter":
        args = ["127.0.0.1:9"] + args
    process = procs.start(program, LOOPBACK, ports[0], *args)
    assert_clean_exit(process, 1, "%s: the relay at 127.0.0.1:%d refused us: %s"
                      % (program, ports[0], reason))
    assert process.stdout_rest() == ""
    text = relay.stderr_text()
    assert text.count("service connected from") == 1, text   # it did not try again
    failures = [l for l in text.splitlines() if reason in l]
    assert len(failures) == 1 and " WARNING " in failures[0] and "127.0.0.1:" in failures[0]


def test_cli_tls_trust_host_names_and_insecure(procs, tmp_path, local_echo):
    ports = free_port_range(4)
    path = secret_file(tmp_path, SECRET)
    relay = procs.relay(ports[0], "--tls-cert", CERT, "--tls-key", KEY, "--secret-file", path,
                        *pool_args(ports[1:]))
    assert "(TLS)" in relay.stderr_text()
    # The adapter over TLS, trusting the test CA: bytes arrive exactly.
    adapter, port = procs.service("tcprelay.adapter", ports[0], local_echo.address, "--tls",
                                  "--tls-ca", CA, "--secret-file", path)
    checked_echo(port, 2 * MIB)
    # Without --tls-ca the system store is used: the test CA is not in it.
    untrusted = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--tls",
                            "--secret-file", path)
    line = assert_clean_exit(untrusted, 1, "tcprelay.echoserver: cannot register")
    assert "certificate verify failed" in line.lower()
    # Host names are checked: 127.1 reaches the relay but is not in its certificate.
    stranger = procs.start("tcprelay.echoserver", "127.1", ports[0], "--tls", "--tls-ca", CA,
                           "--secret-file", path)
    line = assert_clean_exit(stranger, 1, "tcprelay.echoserver: cannot register")
    assert "127.1" in line and "match" in line.lower()
    # A plain-text service gets nowhere with a TLS relay.
    plain = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--secret-file", path)
    assert plain.wait() == 1
    # --tls-insecure: works, and says what it gave up.
    insecure, port = procs.echo(ports[0], "--tls-insecure", "--secret-file", path)
    checked_echo(port, 256 * 1024)
    warned = [l for l in insecure.stderr_lines() if "--tls-insecure" in l]
    assert len(warned) == 1 and " WARNING " in warned[0], insecure.stderr_text()
    assert "--tls-insecure" not in adapter.stderr_text()
    assert "Traceback" not in relay.stderr_text(), relay.stderr_text()


@pytest.mark.parametrize("networks, allowed", [
    (["10.0.0.0/8"], False),
    (["10.0.0.0/8", "127.0.0.1/32"], True),
])
def test_cli_allow_from(procs, networks, allowed):
    ports = free_port_range(2)
    args = []
    for network in networks:
        args += ["--allow-from", network]
    relay = procs.relay(ports[0], *(args + pool_args(ports[1:])))
    if allowed:
        echo, port = procs.echo(ports[0])
        checked_echo(port, 64 * 1024)
        assert "--allow-from" not in relay.stderr_text()
    else:
        echo = procs.start("tcprelay.echoserver", LOOPBACK, ports[0])
        assert_clean_exit(echo, 1, "tcprelay.echoserver: cannot register with the relay at "
                                   "127.0.0.1:%d" % ports[0])
        wait_until(lambda: "refused a service connection from 127.0.0.1: not in --allow-from "
                           "(10.0.0.0/8)" in relay.stderr_text(), what="the refusal logged")
        assert "service connected" not in relay.stderr_text()


def test_cli_registration_rate(procs):
    ports = free_port_range(3)
    relay = procs.relay(ports[0], "--registration-rate", "3", *pool_args(ports[1:]))  # bursts of 1
    echo, port = procs.echo(ports[0])
    second = procs.start("tcprelay.echoserver", LOOPBACK, ports[0])
    assert_clean_exit(second, 1, "tcprelay.echoserver: cannot register with the relay at "
                                 "127.0.0.1:%d" % ports[0])
    wait_until(lambda: "too many registrations from this address (--registration-rate)"
               in relay.stderr_text(), what="the refusal logged")
    checked_echo(port, 64 * 1024)   # the first one is unaffected


def test_cli_max_waiting_max_clients_and_idle_timeout(procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], "--max-waiting", "1", "--max-clients", "2",
                        "--idle-timeout", "0.6", *pool_args(ports[1:]))
    echo, port = procs.echo(ports[0], "--name", "holder")
    waiter = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--name", "waiter")
    wait_until(lambda: "'waiter'" in relay.stderr_text() and "waiting in line"
               in relay.stderr_text(), what="the second service to wait in line")
    excess = procs.start("tcprelay.echoserver", LOOPBACK, ports[0], "--name", "excess")
    assert_clean_exit(excess, 1, "tcprelay.echoserver: the relay at 127.0.0.1:%d refused us: "
                                 "too many services are waiting for a port (1); try again later"
                      % ports[0])
    assert waiter.alive()
    clients = [connect_client(port) for _ in range(2)]
    try:
        for client in clients:
            assert echo_roundtrip(client, b"hello", half_close=False) == b"hello"
        last_traffic = time.monotonic()
        data, how = connect_and_read(port)
        assert data == b"" and isinstance(how, ConnectionResetError), how
        assert time.monotonic() - last_traffic < 0.5, "the third client was not refused at once"
        wait_until(lambda: "clients already (--max-clients)" in relay.stderr_text(),
                   what="the refusal in the relay's log")
        for client in clients:
            data, how = read_until_end(client)
            assert data == b"" and isinstance(how, ConnectionResetError), how
        idle_for = time.monotonic() - last_traffic
        assert 0.55 <= idle_for < 3, idle_for
    finally:
        for client in clients:
            client.close()
    assert "Traceback" not in relay.stderr_text(), relay.stderr_text()
