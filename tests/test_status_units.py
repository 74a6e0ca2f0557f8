"""The status endpoint's I/O-free parts on numbers and text: the counters
(an injected clock), the token, the metrics of a hand-made snapshot, and
``tcprelay.status``'s tables."""

import pytest

from helpers.prometheus import parse_metrics
from tcprelay import metrics, relaycounters, status, statusserver


class Clock(object):
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_counters_count_by_label_and_keep_the_last_refusals_newest_first():
    clock = Clock()
    counters = relaycounters.RelayCounters(clock=clock)
    counters.count("registrations", "ok")
    counters.count("registrations", "ok")
    counters.count("auth_failures")
    for i in range(relaycounters.RECENT_REFUSALS + 3):
        clock.now += 1
        counters.refused("service_connections_refused", "banned", "10.0.0.%d" % i, "why")
    snap = counters.snapshot()
    assert list(snap["counts"]) == list(relaycounters.COUNTERS)
    assert snap["counts"]["registrations"] == {"ok": 2}
    assert snap["counts"]["auth_failures"] == {"": 1}
    assert snap["counts"]["service_connections_refused"] == {
        "banned": relaycounters.RECENT_REFUSALS + 3}
    recent = snap["recent_refusals"]
    assert len(recent) == relaycounters.RECENT_REFUSALS
    assert recent[0]["host"] == "10.0.0.%d" % (relaycounters.RECENT_REFUSALS + 2)
    assert recent[0]["time"] == clock.now and recent[-1]["host"] == "10.0.0.3"
    with pytest.raises(KeyError):
        counters.count("no_such_counter")


def test_label_escaping_follows_the_format():
    assert metrics.escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert metrics.escape_label(8081) == "8081"


def _snapshot():
    service = {"name": 'we"ird\\name\n', "port": 8081, "public_address": "h:8081",
               "remote_address": "10.1.1.1:5000", "since": 990.0, "requested_port": None,
               "clients": 2, "clients_served": 7, "bytes_in": 10, "bytes_out": 20,
               "heartbeat": None, "lease": True}
    counts = relaycounters.RelayCounters(clock=Clock()).snapshot()
    counts["counts"]["registrations"] = {"ok": 3, "auth_failed": 1}
    return {
        "relay": {"version": "0.1.0", "started": 900.0, "uptime": 100.0,
                  "service_address": "0.0.0.0:8080", "draining": False,
                  "pool": {"ports": "8081-8082", "size": 2, "free": 1, "in_use": 1,
                           "waiting": 1, "max_services": 2},
                  "pending": 0, "clients": 2, "clients_accepted": 7, "bytes_in": 110,
                  "bytes_out": 220, "options": {}},
        "services": [service],
        "waiting": [{"name": "next", "remote_address": "10.1.1.2:6000", "since": 995.0,
                     "requested_port": 8081, "position": 1}],
        "counters": counts["counts"],
        "recent_refusals": [{"time": 998.0, "kind": "registrations", "reason": "auth_failed",
                             "host": "10.9.9.9", "detail": "authentication failed"}],
        "process": {"threads": 12, "open_files": None, "rss_bytes": 4096},
    }


def test_metrics_of_a_snapshot_parse_back_to_its_numbers():
    samples, types = parse_metrics(metrics.render(_snapshot()))
    labels = (("service", 'we"ird\\name\n'), ("port", "8081"))
    assert samples[("tcprelay_service_clients", labels)] == 2
    assert samples[("tcprelay_service_bytes_total", labels + (("direction", "out"),))] == 20
    assert samples[("tcprelay_bytes_total", (("direction", "in"),))] == 110
    assert samples[("tcprelay_registrations_total", (("outcome", "auth_failed"),))] == 1
    assert samples[("tcprelay_waiting", ())] == 1
    assert samples[("tcprelay_auth_failures_total", ())] == 0
    assert ("tcprelay_process_open_fds", ()) not in samples   # unknown: no sample
    assert types["tcprelay_process_open_fds"] == "gauge"
    assert all(name.startswith("tcprelay_") for name in types)


def test_the_terminal_tables():
    lines = status.format_status(_snapshot(), now=1000.0)
    text = "\n".join(lines)
    assert lines[0] == "tcprelay 0.1.0 on 0.0.0.0:8080, up 100s"
    assert "services (1)" in text and "waiting (1)" in text
    (row,) = [line for line in lines if line.startswith("8081 ")]
    assert row.split()[2:5] == ["h:8081", "10s", "2"]
    (waiting,) = [line for line in lines if line.startswith("1 ")]
    assert waiting.split() == ["1", "next", "8081", "5s", "10.1.1.2:6000"]
    assert "10.9.9.9" in text


def test_the_token_is_one_ascii_word(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"  abc-123\n")
    assert statusserver.load_token(str(path)) == "abc-123"
    assert statusserver.load_token(None, environ={"TCPRELAY_STATUS_TOKEN": "t0k"}) == "t0k"
    assert statusserver.load_token(None, environ={}) is None
    for bad in [b"", b"two words", "caf\u00e9".encode("utf-8")]:
        path.write_bytes(bad)
        with pytest.raises(statusserver.TokenError):
            statusserver.load_token(str(path))
    with pytest.raises(statusserver.TokenError):
        statusserver.load_token(str(tmp_path / "missing"))
