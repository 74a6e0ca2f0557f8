"""The status page (``GET /`` of the status endpoint): one self-contained HTML
document, no external assets. Its script fetches ``/status.json`` every 2 s
with the page's token (``Authorization: Bearer``), keeps each service's
traffic history in the browser and draws it as an inline SVG graph.

Every value from the relay (service names are chosen by services) goes into
the page as text (``textContent``), never as HTML. ``HEADERS``: the reply's
security headers; the content security policy allows this page's own script
(by its hash) and its calls to this endpoint, nothing else.
"""

import base64
import hashlib

_STYLE = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d232b; --dim:#5d6875; --line:#dde2e8;
        --in:#2b7bd0; --out:#d0702b; --bad:#b3261e; --ok:#2e7d32; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#14181d; --card:#1d232b; --ink:#e7ebef; --dim:#9aa5b1; --line:#2e3742; } }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       background:var(--bg); color:var(--ink); }
header { padding:12px 16px; border-bottom:1px solid var(--line); background:var(--card); }
h1 { font-size:18px; margin:0 0 4px; }
h2 { font-size:16px; margin:20px 16px 8px; }
main { padding-bottom:24px; }
.facts { display:flex; flex-wrap:wrap; gap:4px 18px; color:var(--dim); font-size:14px; }
.facts b { color:var(--ink); font-weight:600; }
.banner { margin:12px 16px; padding:10px 12px; border-radius:6px; background:var(--bad);
          color:#fff; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(300px, 1fr)); gap:12px;
        padding:0 16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px;
        padding:12px; min-width:0; }
.card h3 { margin:0 0 2px; font-size:16px; overflow-wrap:anywhere; }
.card .addr { font-family:ui-monospace, monospace; font-size:14px; overflow-wrap:anywhere; }
.card dl { display:grid; grid-template-columns:auto 1fr; gap:2px 10px; margin:8px 0;
           font-size:14px; }
.card dt { color:var(--dim); } .card dd { margin:0; overflow-wrap:anywhere; }
svg { width:100%; height:64px; display:block; border-bottom:1px solid var(--line); }
polyline { fill:none; stroke-width:2px; } .g-in { stroke:var(--in); } .g-out { stroke:var(--out); }
.legend { font-size:12px; color:var(--dim); }
.legend .in { color:var(--in); } .legend .out { color:var(--out); }
.wrap { overflow-x:auto; padding:0 16px; }
table { border-collapse:collapse; width:100%; background:var(--card); font-size:14px; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line);
         white-space:nowrap; }
th { color:var(--dim); font-weight:600; }
.empty { color:var(--dim); padding:0 16px; }
form { margin:12px 16px; } input { font:inherit; padding:6px; width:min(100%, 320px); }
"""

_SCRIPT = r"""
"use strict";
var HISTORY = 60, history = {}, timer = null;
(function takeToken() {
  var params = new URLSearchParams(location.search), token = params.get("token");
  if (token) {
    sessionStorage.setItem("tcprelay-token", token);
    history_replace();
  }
  function history_replace() {
    params.delete("token");
    var q = params.toString();
    window.history.replaceState(null, "", location.pathname + (q ? "?" + q : ""));
  }
})();
function el(tag, text, cls) {
  var node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function bytes(n) {
  var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function ago(t, now) {
  if (t === null || t === undefined) return "-";
  var s = Math.max(0, Math.round(now - t));
  var text = s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min"
    : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " d";
  return text + " ago (" + new Date(t * 1000).toLocaleString() + ")";
}
function facts(parent, pairs) {
  var box = el("div", null, "facts");
  pairs.forEach(function (p) {
    var span = el("span", p[0] + " ");
    span.appendChild(el("b", p[1]));
    box.appendChild(span);
  });
  parent.appendChild(box);
}
function graph(points) {
  var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + (HISTORY - 1) + " 100");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  var top = 1;
  points.forEach(function (p) { top = Math.max(top, p[0], p[1]); });
  [[0, "g-in"], [1, "g-out"]].forEach(function (d) {
    var line = document.createElementNS(ns, "polyline"), at = HISTORY - points.length;
    line.setAttribute("points", points.map(function (p, i) {
      return (at + i) + "," + (98 - 96 * p[d[0]] / top).toFixed(1);
    }).join(" "));
    line.setAttribute("class", d[1]);
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
  });
  svg.appendChild(document.createElementNS(ns, "title")).textContent =
    "peak " + bytes(top) + "/s over the last " + (2 * HISTORY) + " s";
  return svg;
}
function rates(s, when) {
  var key = s.port + " " + s.name + " " + s.since, h = history[key];
  if (!h) h = history[key] = {last: null, points: []};
  if (h.last) {
    var dt = Math.max(0.001, when - h.last.when);
    h.points.push([Math.max(0, s.bytes_in - h.last.bytes_in) / dt,
                   Math.max(0, s.bytes_out - h.last.bytes_out) / dt]);
    if (h.points.length > HISTORY) h.points.shift();
  }
  h.last = {when: when, bytes_in: s.bytes_in, bytes_out: s.bytes_out};
  h.seen = when;
  return h.points;
}
function serviceCard(s, now, when) {
  var card = el("div", null, "card"), points = rates(s, when);
  card.appendChild(el("h3", s.name || "(no name)"));
  card.appendChild(el("div", s.public_address || ("port " + s.port), "addr"));
  var dl = el("dl"), last = points.length ? points[points.length - 1] : [0, 0];
  [["port", s.port], ["since", ago(s.since, now)], ["from", s.remote_address],
   ["clients", s.clients + " now, " + s.clients_served + " in all"],
   ["traffic", bytes(s.bytes_in) + " in, " + bytes(s.bytes_out) + " out"],
   ["now", bytes(last[0]) + "/s in, " + bytes(last[1]) + "/s out"],
   ["heartbeat", s.heartbeat ? "heard " + s.heartbeat.silent_for.toFixed(1) + " s ago (limit "
     + s.heartbeat.timeout + " s)" : "not asked"],
   ["lease", s.lease ? "yes" : "no"]].forEach(function (r) {
    dl.appendChild(el("dt", r[0]));
    dl.appendChild(el("dd", r[1]));
  });
  card.appendChild(dl);
  card.appendChild(graph(points));
  var legend = el("div", null, "legend");
  legend.appendChild(el("span", "\u2014 in ", "in"));
  legend.appendChild(el("span", "\u2014 out", "out"));
  card.appendChild(legend);
  return card;
}
function table(rows, heads) {
  var wrap = el("div", null, "wrap"), t = el("table"), tr = el("tr");
  heads.forEach(function (h) { tr.appendChild(el("th", h)); });
  t.appendChild(tr);
  rows.forEach(function (r) {
    var row = el("tr");
    r.forEach(function (c) { row.appendChild(el("td", c)); });
    t.appendChild(row);
  });
  wrap.appendChild(t);
  return wrap;
}
function render(st) {
  var r = st.relay, p = r.pool, root = el("div"), now = r.time;  // the relay's clock
  var head = el("header");
  head.appendChild(el("h1", "tcprelay " + r.version + " on " + r.service_address));
  facts(head, [["up", ago(r.started, now).split(" (")[0].replace(" ago", "")],
               ["services", st.services.length], ["waiting", st.waiting.length],
               ["ports", p.ports], ["free", p.free + " of " + p.size],
               ["clients", r.clients], ["in", bytes(r.bytes_in)], ["out", bytes(r.bytes_out)],
               ["threads", st.process.threads]]);
  root.appendChild(head);
  if (r.draining) root.appendChild(el("div", "draining: no new services or clients", "banner"));
  root.appendChild(el("h2", "Services (" + st.services.length + ")"));
  if (!st.services.length) root.appendChild(el("p", "No service holds a port.", "empty"));
  var grid = el("div", null, "grid");
  st.services.forEach(function (s) { grid.appendChild(serviceCard(s, now, now)); });
  root.appendChild(grid);
  root.appendChild(el("h2", "Waiting for a port (" + st.waiting.length + ")"));
  if (st.waiting.length) {
    root.appendChild(table(st.waiting.map(function (w) {
      return [w.position, w.name || "(no name)", w.requested_port || "any",
              ago(w.since, now), w.remote_address];
    }), ["#", "service", "port asked", "since", "from"]));
  } else root.appendChild(el("p", "Nobody is waiting.", "empty"));
  root.appendChild(el("h2", "Recent refusals"));
  if (st.recent_refusals.length) {
    root.appendChild(table(st.recent_refusals.map(function (f) {
      return [ago(f.time, now), f.kind + (f.reason ? " (" + f.reason + ")" : ""), f.host,
              f.detail];
    }), ["when", "what", "from", "why"]));
  } else root.appendChild(el("p", "None since the relay started.", "empty"));
  var counts = [];
  Object.keys(st.counters).forEach(function (name) {
    Object.keys(st.counters[name]).forEach(function (label) {
      counts.push([name + (label ? " " + label : ""), st.counters[name][label]]);
    });
  });
  root.appendChild(el("h2", "Counts"));
  root.appendChild(table(counts, ["what", "count"]));
  for (var key in history) if (history[key].seen !== now) delete history[key];
  document.body.replaceChildren ? document.body.replaceChildren(root)
    : (document.body.innerHTML = "", document.body.appendChild(root));
}
function problem(text, askToken) {
  var root = el("div");
  root.appendChild(el("div", text, "banner"));
  if (askToken) {
    var form = el("form"), input = el("input");
    input.type = "password"; input.placeholder = "status token"; input.autocomplete = "off";
    form.appendChild(input);
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      sessionStorage.setItem("tcprelay-token", input.value.trim());
      refresh();
    });
    root.appendChild(form);
    if (timer) { clearInterval(timer); timer = null; }
  }
  document.body.replaceChildren ? document.body.replaceChildren(root)
    : (document.body.innerHTML = "", document.body.appendChild(root));
}
function refresh() {
  var token = sessionStorage.getItem("tcprelay-token"), headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  fetch("status.json", {headers: headers, cache: "no-store"}).then(function (res) {
    if (res.status === 401) { problem("This status endpoint needs its token.", true); return; }
    if (!res.ok) throw new Error("HTTP " + res.status);
    return res.json().then(function (st) {
      render(st);
      if (!timer) timer = setInterval(refresh, 2000);
    });
  }).catch(function (err) {
    problem("Cannot reach the relay's status endpoint (" + err.message + "); retrying.", false);
  });
}
refresh();
timer = setInterval(refresh, 2000);
"""

_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")

PAGE = ("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>tcprelay status</title>
<style>%s</style></head>
<body><p class="empty">Loading&hellip;</p>
<script>%s</script>
</body></html>
""" % (_STYLE, _SCRIPT)).encode("utf-8")

HEADERS = [
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'sha256-%s'; style-src 'unsafe-inline'; "
     "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'" % _HASH),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]
