"""A relay's snapshot (``relaystatus.snapshot``) as Prometheus metrics: the
text exposition format 0.0.4, names prefixed ``tcprelay_``, counters ending
``_total``, a HELP and a TYPE line for each family.

Per-service labels are the service's name and public port, never a client's
address, so the series are bounded by the pool's size.
"""

from .relaycounters import COUNTERS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "tcprelay_"


def escape_label(value):
    """A label value as the format quotes it: backslash, double quote and
    newline escaped."""
    return (str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Families(object):
    """Families in the order added, each with its HELP, TYPE and samples."""

    def __init__(self):
        self._lines = []

    def family(self, name, kind, help_text, samples):
        """``samples``: [(labels as [(name, value)], number)]; a family with none
        still says what it is."""
        full = PREFIX + name
        self._lines.append("# HELP %s %s" % (full, _escape_help(help_text)))
        self._lines.append("# TYPE %s %s" % (full, kind))
        for labels, value in samples:
            self._lines.append("%s%s %s" % (full, _labels(labels), _number(value)))

    def text(self):
        return "\n".join(self._lines) + "\n"


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (name, escape_label(value)) for name, value in labels)


def _number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(status):
    """The exposition text (str) of ``status``, a ``relaystatus.snapshot``."""
    out = _Families()
    relay = status["relay"]
    pool = relay["pool"]
    out.family("info", "gauge", "The relay's version; always 1.",
               [([("version", relay["version"])], 1)])
    out.family("uptime_seconds", "gauge", "Seconds since the relay started.",
               [([], relay["uptime"])])
    out.family("services", "gauge", "Services holding a public port.",
               [([], len(status["services"]))])
    out.family("waiting", "gauge", "Services waiting in line for a public port.",
               [([], len(status["waiting"]))])
    out.family("pending", "gauge", "Connections to the service port not yet registered.",
               [([], relay["pending"])])
    out.family("pool_ports", "gauge", "Public ports in the pool.", [([], pool["size"])])
    out.family("pool_free", "gauge", "Public ports free (some may be held for a lease).",
               [([], pool["free"])])
    out.family("pool_in_use", "gauge", "Public ports in use by a service.",
               [([], pool["in_use"])])
    out.family("clients", "gauge", "Public clients connected now.", [([], relay["clients"])])
    out.family("clients_accepted_total", "counter",
               "Public clients accepted and joined to a service.",
               [([], relay["clients_accepted"])])
    out.family("bytes_total", "counter",
               "Bytes relayed; direction in: from public clients to services, out: to them.",
               [([("direction", "in")], relay["bytes_in"]),
                ([("direction", "out")], relay["bytes_out"])])
    _service_families(out, status["services"])
    _counter_families(out, status["counters"])
    _process_families(out, status["process"])
    return out.text()


def _service_families(out, services):
    def labels(service):
        return [("service", service["name"]), ("port", service["port"])]
    out.family("service_clients", "gauge", "Public clients connected now, per service.",
               [(labels(s), s["clients"]) for s in services])
    out.family("service_clients_served_total", "counter",
               "Public clients served, per service (since it registered).",
               [(labels(s), s["clients_served"]) for s in services])
    samples = []
    for s in services:
        samples.append((labels(s) + [("direction", "in")], s["bytes_in"]))
        samples.append((labels(s) + [("direction", "out")], s["bytes_out"]))
    out.family("service_bytes_total", "counter",
               "Bytes relayed per service (since it registered); direction as bytes_total.",
               samples)
    out.family("service_registered_timestamp_seconds", "gauge",
               "When the service got its port (Unix time).",
               [(labels(s), s["since"]) for s in services if s["since"] is not None])


def _counter_families(out, counts):
    for name, (help_text, label) in COUNTERS.items():
        by_label = counts.get(name, {})
        if label is None:
            samples = [([], by_label.get("", 0))]
        else:
            samples = [([(label, value)], count) for value, count in sorted(by_label.items())]
        out.family(name + "_total", "counter", help_text, samples)


def _process_families(out, process):
    figures = [("process_threads", "threads", "Threads of the relay's process."),
               ("process_open_fds", "open_files", "Open file descriptors of the process."),
               ("process_resident_memory_bytes", "rss_bytes", "Resident memory in bytes.")]
    for name, key, help_text in figures:
        value = process.get(key)
        out.family(name, "gauge", help_text, [] if value is None else [([], value)])
