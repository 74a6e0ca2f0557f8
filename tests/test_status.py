"""The status endpoint (issue 15) over a real in-process relay: /status.json,
/metrics (read by a small exposition-format parser), the page, the token,
HTTP clients that are slow on purpose, and ``python3 -m tcprelay.status``.

All on 127.0.0.1 with ephemeral ports; every blocking call has a timeout.
"""

import base64
import hashlib
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers.basics import LOOPBACK, TIMEOUT, free_port_range, wait_until
from helpers.processes import MainRun
from helpers.prometheus import parse_metrics
from helpers.relay import Service, abort, connect_client, recv_exact
from tcprelay.relay import Relay

TOKEN = "s3cret-token"


# -- a Prometheus text format 0.0.4 parser, strict -----------------------------------------

def test_the_parser_refuses_what_is_not_the_format():
    good = "# HELP tcprelay_x_total X.\n# TYPE tcprelay_x_total counter\ntcprelay_x_total 1\n"
    assert parse_metrics(good)[0] == {("tcprelay_x_total", ()): 1.0}
    for bad in [good[:-1],                                           # no final newline
                good.replace("tcprelay_x_total 1", "tcprelay_x_total"),   # no value
                good.replace("# TYPE tcprelay_x_total counter\n", ""),    # no TYPE
                good.replace("x_total", "x"),                        # counter without _total
                good + 'tcprelay_x_total{a="b} 1\n',                 # unclosed label
                good + "tcprelay_x_total 2\n"]:                      # the same sample twice
        with pytest.raises(AssertionError):
            parse_metrics(bad)


# -- the relay under test ---------------------------------------------------------------


class StatusEnv(object):
    """A started relay with a status endpoint, services and clients, torn down newest first."""

    def __init__(self):
        self._cleanups = []

    def relay(self, ports=1, **options):
        options.setdefault("public_bind", LOOPBACK)
        options.setdefault("waiting_interval", None)
        options.setdefault("status_address", (LOOPBACK, 0))
        relay = Relay((LOOPBACK, 0), ports=free_port_range(ports), **options)
        thread = threading.Thread(target=relay.serve_forever, name="relay serve_forever")
        thread.start()

        def stop():
            relay.shutdown()
            thread.join(TIMEOUT)
            relay.server_close()
        self._cleanups.append(stop)
        return relay

    def service(self, relay):
        service = Service(relay.server_address)
        self._cleanups.append(service.close)
        return service

    def client(self, port):
        sock = connect_client(port)
        self._cleanups.append(sock.close)
        return sock

    def close(self):
        while self._cleanups:
            self._cleanups.pop()()


@pytest.fixture
def env(no_leaks, caplog):
    caplog.set_level(logging.INFO, logger="tcprelay")
    environment = StatusEnv()
    yield environment
    environment.close()
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


def get(relay, path, token=None, headers=None):
    """(status, headers, body bytes) of a GET on the relay's status endpoint."""
    request = urllib.request.Request(relay.status_server.url + path.lstrip("/"),
                                     headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def raw_request(relay, data):
    """Send ``data`` as is, read the reply to EOF: the status line and the rest."""
    with socket.create_connection(relay.status_server.server_address, timeout=TIMEOUT) as sock:
        sock.sendall(data)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk


def status_json(relay, token=None):
    code, headers, body = get(relay, "/status.json", token)
    assert code == 200 and headers["Content-Type"] == "application/json"
    return json.loads(body.decode("utf-8"))


def scrape(relay, token=None):
    code, headers, body = get(relay, "/metrics", token)
    assert code == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_metrics(body.decode("utf-8"))


def assert_reset(port):
    """A client of ``port`` is reset at once (maybe while it connects)."""
    try:
        sock = connect_client(port)
    except ConnectionResetError:
        return
    with sock:
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def echo(sock, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    sock.sendall(data)
    assert recv_exact(sock, size) == data


# -- what an operator asks ----------------------------------------------------------------


def test_who_holds_the_port_since_when_with_how_many_clients_and_who_waits(env):
    relay = env.relay(ports=1, max_clients=5)
    before = time.time()
    alpha = env.service(relay)
    port = alpha.register_ok({"name": "alpha"})
    alpha.serve()
    first, second = env.client(port), env.client(port)
    echo(first, 1000)
    echo(second, 3000)
    first.close()   # its bytes move from the live bridge to the service's totals
    beta = env.service(relay)
    line = beta.register({"name": "beta", "notices": True})
    assert line.reply()["status"] == "waiting"

    wait_until(lambda: status_json(relay)["services"][0]["clients"] == 1, what="one client left")
    status = status_json(relay)
    (service,) = status["services"]
    assert service["name"] == "alpha" and service["port"] == port
    assert service["public_address"] == "%s:%d" % (LOOPBACK, port)
    assert before <= service["since"] <= time.time()
    assert service["clients_served"] == 2
    assert (service["bytes_in"], service["bytes_out"]) == (4000, 4000)
    (waiting,) = status["waiting"]
    assert waiting["name"] == "beta" and waiting["position"] == 1
    assert waiting["requested_port"] is None and before <= waiting["since"] <= time.time()
    assert status["relay"]["pool"]["free"] == 0 and status["relay"]["pool"]["size"] == 1
    assert status["counters"]["registrations"] == {"ok": 1}
    assert status["relay"]["clients"] == 1 and status["relay"]["clients_accepted"] == 2

    samples, types = scrape(relay)
    labels = (("service", "alpha"), ("port", str(port)))
    assert samples[("tcprelay_service_clients", labels)] == 1
    assert samples[("tcprelay_service_clients_served_total", labels)] == 2
    assert samples[("tcprelay_service_bytes_total", labels + (("direction", "in"),))] == 4000
    assert samples[("tcprelay_service_bytes_total", labels + (("direction", "out"),))] == 4000
    assert samples[("tcprelay_services", ())] == 1
    assert samples[("tcprelay_waiting", ())] == 1
    assert samples[("tcprelay_pool_free", ())] == 0
    assert samples[("tcprelay_registrations_total", (("outcome", "ok"),))] == 1
    assert samples[("tcprelay_process_threads", ())] >= 1
    assert types["tcprelay_bytes_total"] == "counter" and types["tcprelay_services"] == "gauge"
    line.close()


def test_counters_only_grow_across_scrapes_and_match_what_was_done(env):
    relay = env.relay(ports=1, max_clients=1)
    service = env.service(relay)
    port = service.register_ok({"name": "svc"})
    service.serve()
    client = env.client(port)
    echo(client, 500)
    first, types = scrape(relay)

    echo(client, 700)
    assert_reset(port)   # over --max-clients
    client.close()
    wait_until(lambda: status_json(relay)["relay"]["clients"] == 0, what="the client's end")
    second, _ = scrape(relay)

    counters = [key for key in first if types[key[0]] == "counter"]
    assert counters
    for key in counters:
        assert second[key] >= first[key], key
    labels = (("service", "svc"), ("port", str(port)))
    assert second[("tcprelay_service_bytes_total", labels + (("direction", "in"),))] == 1200
    assert second[("tcprelay_bytes_total", (("direction", "out"),))] == 1200
    assert second[("tcprelay_clients_refused_total", (("reason", "max_clients"),))] == 1
    assert second[("tcprelay_clients_accepted_total", ())] == 1


def test_relay_totals_keep_the_bytes_of_services_that_left(env):
    relay = env.relay(ports=1, lease_time=0)
    service = env.service(relay)
    port = service.register_ok({"name": "gone"})
    service.serve()
    client = env.client(port)
    echo(client, 2048)
    client.close()
    service.close()
    wait_until(lambda: not status_json(relay)["services"], what="the service's end")
    samples, _ = scrape(relay)
    assert samples[("tcprelay_bytes_total", (("direction", "in"),))] == 2048
    assert samples[("tcprelay_bytes_total", (("direction", "out"),))] == 2048
    assert samples[("tcprelay_services", ())] == 0


def test_streams_reset_are_counted_by_code(env):
    relay = env.relay(ports=1)
    service = env.service(relay)
    port = service.register_ok({"name": "resets"})
    client = env.client(port)
    stream = service.accept()
    abort(client)   # the client's reset: the relay resets its stream
    with pytest.raises(ConnectionResetError):
        stream.recv(1)
    stream.close()
    wait_until(lambda: status_json(relay)["counters"]["streams_reset"], what="the count")
    assert status_json(relay)["counters"]["streams_reset"] == {"STREAM_RESET": 1}


def test_label_values_are_escaped(env):
    relay = env.relay(ports=1)
    name = 'say "hi" \\ bye'
    service = env.service(relay)
    port = service.register_ok({"name": name})
    samples, _ = scrape(relay)
    assert samples[("tcprelay_service_clients", (("service", name), ("port", str(port))))] == 0


def test_refusals_are_counted_with_who_and_why(env):
    relay = env.relay(ports=1, secret=b"the secret")
    service = env.service(relay)
    line = service.register({"name": "intruder"})   # no secret: refused
    assert line.final()[1]["status"] == "error"
    status = status_json(relay)
    assert status["counters"]["auth_failures"] == {"": 1}
    assert status["counters"]["registrations"] == {"auth_failed": 1}
    (refusal,) = status["recent_refusals"]
    assert refusal["host"] == LOOPBACK and refusal["reason"] == "auth_failed"
    assert "requires a secret" in refusal["detail"]


def test_a_client_refused_by_an_allow_list_is_among_the_recent_refusals(env):
    # Counted before, but missing from the list the page shows.
    relay = env.relay(ports=1)
    service = env.service(relay)
    port = service.register_ok({"name": "picky", "allow": ["10.0.0.0/8"]})
    try:
        client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    except ConnectionResetError:
        pass   # the relay's reset may come while it connects
    else:
        client.close()
    refusals = wait_until(lambda: status_json(relay)["recent_refusals"],
                          what="the refusal in /status.json")
    (refusal,) = refusals
    assert refusal["kind"] == "clients_refused" and refusal["reason"] == "not_allowed"
    assert refusal["host"] == LOOPBACK and "10.0.0.0/8" in refusal["detail"], refusal


# -- the page, the methods and the token ----------------------------------------------------


def test_the_page_is_html_and_its_data_calls_are_answered_with_the_same_token(env):
    relay = env.relay(ports=1, status_token=TOKEN)
    code, headers, page = get(relay, "/", TOKEN)
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    html = page.decode("utf-8")
    assert '<meta name="viewport"' in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")   # no external assets
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    assert "'sha256-%s'" % digest in headers["Content-Security-Policy"]
    calls = re.findall(r'fetch\("([^"]+)"', script)
    assert calls == ["status.json"]
    assert '"Bearer " + token' in script
    for call in calls:   # as the page asks, with the token it was opened with
        code, headers, body = get(relay, "/" + call, TOKEN)
        assert code == 200 and "services" in json.loads(body.decode("utf-8"))
    code, _, _ = get(relay, "/?token=" + TOKEN)   # opening the page from a link
    assert code == 200


def test_a_token_is_required_on_every_path(env):
    relay = env.relay(ports=1, status_token=TOKEN)
    for path in ["/", "/status.json", "/metrics", "/nowhere"]:
        for token in [None, "wrong", TOKEN + "x"]:
            code, headers, _ = get(relay, path, token)
            assert code == 401, (path, token)
            assert headers["WWW-Authenticate"].startswith("Bearer")
    assert get(relay, "/status.json?token=" + TOKEN)[0] == 401   # only / takes ?token=
    assert get(relay, "/metrics", TOKEN)[0] == 200
    assert get(relay, "/nowhere", TOKEN)[0] == 404


def test_other_methods_and_paths(env):
    relay = env.relay(ports=1)
    head = raw_request(relay, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 405 ") and b"\r\nAllow: GET\r\n" in head
    assert head.endswith(b"\r\n\r\n")   # no body after HEAD
    post = raw_request(relay, b"POST /status.json HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.0 405 ")
    assert raw_request(relay, b"GET /nope HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    assert raw_request(relay, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").startswith(
        b"HTTP/1.0 200 ")


# -- hostile HTTP clients ------------------------------------------------------------------


def test_a_slowloris_on_the_status_port_leaves_relaying_and_the_endpoint_working(env):
    relay = env.relay(ports=1)
    relay.status_server.request_timeout = 1.0   # each slow client's time in all
    service = env.service(relay)
    port = service.register_ok({"name": "echo"})
    service.serve()
    stop = threading.Event()
    cut = []

    def drip(sock):   # one header byte at a time, never finishing
        try:
            while not stop.is_set():
                sock.send(b"X")
                stop.wait(0.05)
        except OSError:
            cut.append(time.monotonic())

    started = time.monotonic()
    slow = [socket.create_connection(relay.status_server.server_address, timeout=TIMEOUT)
            for _ in range(4)]
    drippers = [threading.Thread(target=drip, args=(s,)) for s in slow]
    for thread in drippers:
        thread.start()
    try:
        client = env.client(port)
        t0 = time.monotonic()
        echo(client, 64)
        assert time.monotonic() - t0 < 1.0, "relaying waited on the status endpoint"
        assert status_json(relay)["services"][0]["name"] == "echo"
        # Each slow client has request_timeout in all, however often it sends.
        for thread in drippers:
            thread.join(TIMEOUT)
        assert len(cut) == 4 and max(cut) - started < 1.0 + 2.0
    finally:
        stop.set()
        for thread in drippers:
            thread.join(TIMEOUT)
        for sock in slow:
            sock.close()


def test_handler_threads_are_bounded_and_the_extra_get_503_at_once(no_leaks):
    from tcprelay.statusserver import StatusServer
    server = StatusServer((LOOPBACK, 0), lambda: {}, max_handlers=2, request_timeout=TIMEOUT)
    server.start()
    held = [socket.create_connection(server.server_address, timeout=TIMEOUT)
            for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"G")   # started, never finished
        wait_until(lambda: len(server._handlers) == 2, what="two handlers busy")
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as extra:
            extra.settimeout(TIMEOUT)
            assert extra.recv(100).startswith(b"HTTP/1.0 503 ")
    finally:
        server.close()   # cuts the held ones: its threads end with it
        for sock in held:
            sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.server_address, timeout=TIMEOUT).close()


def test_server_close_ends_the_status_endpoint(no_leaks):
    relay = Relay((LOOPBACK, 0), ports=free_port_range(1), public_bind=LOOPBACK,
                  status_address=(LOOPBACK, 0))
    address = relay.status_server.server_address
    with socket.create_connection(address, timeout=TIMEOUT):
        pass
    relay.server_close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()


# -- the command lines ----------------------------------------------------------------------


def test_tcprelay_status_prints_the_tables(env, tmp_path):
    relay = env.relay(ports=1, status_token=TOKEN)
    service = env.service(relay)
    port = service.register_ok({"name": "tables"})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    run = MainRun("tcprelay.status", [relay.status_server.url, "--token-file", str(token_file)])
    assert run.wait() == 0, run.stderr_text()
    out = run.stdout_rest()
    assert "services (1)" in out and "waiting (0)" in out
    row = [line for line in out.splitlines() if line.startswith(str(port))]
    assert row and "tables" in row[0] and "%s:%d" % (LOOPBACK, port) in row[0]
    run = MainRun("tcprelay.status", [relay.status_server.url])
    assert run.wait() == 1 and "give --token-file" in run.stderr_text()


def test_tcprelay_status_says_when_nothing_listens():
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    address = probe.getsockname()
    probe.close()   # a port nothing listens on
    run = MainRun("tcprelay.status", ["http://%s:%d/" % address])
    assert run.wait() == 1
    assert "is the relay running with --status" in run.stderr_text()
    assert "Traceback" not in run.stderr_text()


def test_relay_status_address_that_cannot_be_bound_is_a_clear_error():
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen(1)
    try:
        ports = free_port_range(3)
        run = MainRun("tcprelay.relay", [ports[0], "--ports", "%d-%d" % (ports[1], ports[2]),
                                         "--status", "%s:%d" % taken.getsockname()])
        assert run.wait() == 1
        assert "--status" in run.stderr_text() and "Traceback" not in run.stderr_text()
    finally:
        taken.close()


@pytest.mark.parametrize("answer", [b"220 banner ready\r\n", b"GET /status.json HTTP/1.1\r\n",
                                    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[]",
                                    b'HTTP/1.0 200 OK\r\n\r\n{"relay": 1}'],
                         ids=["banner", "echo", "json-list", "json-not-a-status"])
def test_tcprelay_status_at_something_else_says_so_in_one_line(answer):
    # A public port (an echo service, a banner) or another HTTP server given by
    # mistake: a traceback before (BadStatusLine, KeyError).
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT)

    def answer_once():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            conn.recv(4096)
            conn.sendall(answer)

    server = threading.Thread(target=answer_once)
    server.start()
    try:
        run = MainRun("tcprelay.status", ["http://%s:%d/" % listener.getsockname()])
        assert run.wait() == 1
        assert "not a tcprelay status endpoint" in run.stderr_text(), run.stderr_text()
        assert "Traceback" not in run.stderr_text()
    finally:
        server.join(TIMEOUT)
        listener.close()


def test_tcprelay_status_takes_a_bare_port_as_loopback_as_status_does(env):
    relay = env.relay(ports=1)
    run = MainRun("tcprelay.status", [str(relay.status_server.server_address[1])])
    assert run.wait() == 0, run.stderr_text()
    assert "services (0)" in run.stdout_rest()
