"""A parser of the Prometheus text exposition format 0.0.4, strict enough for
tests: every line well formed, HELP and TYPE before samples, counters end _total."""

import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(r"^(%s)(\{.*\})? (\S+)$" % _NAME)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)')


def parse_metrics(text):
    """``{(name, ((label, value), ...)): number}`` and ``{name: type}``; fails on
    any line that is not well formed, a sample before its TYPE, a family
    declared twice, or a counter not ending ``_total``."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    samples, types, helps = {}, {}, set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.match("^%s$" % _NAME, name) and name not in helps, line
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types, line
            assert name in helps, "TYPE before HELP: %s" % line
            assert kind != "counter" or name.endswith("_total"), line
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, "malformed line: %r" % line
        name, labels, value = match.groups()
        assert name in types, "sample before its TYPE: %r" % line
        assert name.startswith("tcprelay_"), line
        pairs = []
        if labels:
            rest = labels[1:-1]
            while rest:
                label = _LABEL.match(rest)
                assert label, "malformed labels: %r" % line
                pairs.append((label.group(1), _unescape(label.group(2))))
                rest = rest[label.end():]
        key = (name, tuple(pairs))
        assert key not in samples, "duplicate sample: %r" % line
        samples[key] = float(value)
    return samples, types


def _unescape(value):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)
