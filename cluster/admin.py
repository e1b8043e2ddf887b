"""The admin pages under ``--admin-prefix`` (default ``/_cluster``).

- ``/_cluster/`` the live dashboard: one HTML page with its script and style inline (no
  external assets), refreshing itself from the JSON twin every 1.5 s;
- ``/_cluster/status`` this instance's view as JSON (its table, health, traffic);
- ``/_cluster/metrics`` Prometheus text (summed over the workers when several);
- ``POST /_cluster/drain`` drain this instance (``cluster drain --url``): what SIGUSR2
  does, for operators who reach it over HTTP.

Who may read them (:meth:`Admin.allowed`): addresses in ``--trusted-proxies`` (exact
addresses or networks such as ``10.0.0.0/8``), or anyone presenting ``--admin-token``
as ``?token=`` or ``Authorization: Bearer``, compared in constant time. Without a token
setting, a request from elsewhere is an ordinary request for the app. A request that a
trusted proxy forwarded (X-Forwarded-For, Forwarded, X-Real-IP) is judged by the
addresses it was forwarded for too: a proxy on the loopback in front of the instance
would otherwise open the pages to everyone behind it.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence
from urllib.parse import parse_qs

from cluster.config import Settings
from cluster.metrics import MetricsObserver
from cluster.node import Cluster
from cluster.observe import NULL_OBSERVER, Observer, find
from cluster.trust import peer_address, trusted_peers

JSON = "application/json"
HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


class Response(NamedTuple):
    status: int
    content_type: str
    body: bytes
    #: further header fields (Allow for a 405, WWW-Authenticate for a 401)
    headers: tuple[tuple[str, str], ...] = ()


_READ_METHODS = ("GET", "HEAD")
_READ_ONLY = Response(405, TEXT, b"the admin pages answer GET and HEAD\n",
                      (("Allow", "GET, HEAD"),))
_TOKEN_REQUIRED = Response(401, TEXT,
                           b"admin token required (?token= or Authorization: Bearer)\n",
                           (("WWW-Authenticate", 'Bearer realm="cluster admin"'),))


class Admin:
    """Answers the admin paths of one instance (one process)."""

    def __init__(self, node: Cluster, settings: Settings,
                 observer: Observer = NULL_OBSERVER) -> None:
        self.node = node
        self.settings = settings
        self.prefix = settings.admin_prefix
        self.metrics = find(observer, MetricsObserver)
        self._trusted = trusted_peers(settings.trusted_proxies)
        self._token = settings.admin_token.encode() if settings.admin_token else None
        #: starts this instance's drain (True: it starts now, False: it had started);
        #: None where the way of running has no drain (library mode, gunicorn)
        self.drain: Callable[[], bool] | None = None
        #: whether this instance drains, and when it started (time.time())
        self.draining_since: float | None = None

    def __repr__(self) -> str:
        return f"<Admin {self.prefix} {'token' if self._token else 'trusted only'}>"

    # --- access ---------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        """Is ``path`` one of the admin paths (the prefix itself or under it)?"""
        return path == self.prefix or path.startswith(self.prefix + "/")

    def trusted(self, remote: str, forwarded_for: Sequence[str] = ()) -> bool:
        """A trusted peer, and every address it forwarded the request for trusted too."""
        trusted = self._trusted
        return peer_address(remote) in trusted and all(a in trusted for a in forwarded_for)

    def allowed(self, remote: str, query: str, authorization: str = "",
                forwarded_for: Sequence[str] = ()) -> bool:
        """May this request read the admin pages? Trusted addresses, or the token."""
        if self.trusted(remote, forwarded_for):
            return True
        if self._token is None:
            return False
        given = ""
        if authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        elif query:
            given = parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self._token)

    # --- pages ------------------------------------------------------------------------

    def answer(self, path: str, remote: str, query: str, authorization: str = "",
               method: str = "GET", forwarded_for: Sequence[str] = (),
               origin: str = "") -> Response | None:
        """For an admin path (:meth:`handles`): the page if the client may read it, 401
        if a token would open it, None when it is an ordinary request for the app."""
        if self.allowed(remote, query, authorization, forwarded_for):
            return self.respond(path, query, method, origin)
        if self._token is not None:
            return _TOKEN_REQUIRED
        return None

    def respond(self, path: str, query: str, method: str = "GET",
                origin: str = "") -> Response:
        """The answer for an admin path, once :meth:`allowed`."""
        if not self.handles(path):
            return Response(404, TEXT, f"no admin page {path} (try {self.prefix}/)\n".encode())
        sub = path[len(self.prefix):]
        if sub in ("/drain", "/drain/"):
            return self.start_drain(method, origin)
        if sub not in ("", "/", "/status", "/status/", "/metrics"):
            return Response(404, TEXT, f"no admin page {path} (try {self.prefix}/)\n".encode())
        if method not in _READ_METHODS:
            return _READ_ONLY
        if sub in ("", "/"):
            return Response(200, HTML, dashboard_html(self.prefix, self.status()))
        if sub in ("/status", "/status/"):
            return Response(200, JSON, json.dumps(self.status()).encode())
        if self.metrics is None:
            return Response(404, TEXT, b"metrics are off in this process\n")
        content_type, body = self.metrics.exposition()
        return Response(200, content_type, body)

    def start_drain(self, method: str, origin: str = "") -> Response:
        """``POST /drain``: start draining (202), or say it had started (200).

        Refused (403) with an ``Origin`` field, which browsers send with every POST:
        a page from anywhere, open in a browser on a trusted host, could otherwise
        drain the instance (the CLI and curl send none)."""
        if method != "POST":
            return Response(405, TEXT, b"POST to drain this instance\n", (("Allow", "POST"),))
        if origin:
            return Response(403, TEXT, b"a drain is not taken from a browser page "
                            b"(the request has an Origin field)\n")
        if self.drain is None:
            return Response(501, TEXT,
                            b"this instance cannot drain (only `cluster serve` can)\n")
        started = self.drain()
        body = {"draining": True, "started": started, "drain_seconds":
                self.settings.drain_seconds, "endpoint": self.node.self_url}
        return Response(202 if started else 200, JSON, json.dumps(body).encode())

    def status(self) -> dict[str, Any]:
        """This instance's view: identity, table, health, and its own traffic."""
        node = self.node
        table = node.table
        registrar = node.registrar
        watcher = node.watcher
        ejected = node.ejected()
        metrics = self.metrics
        traffic = metrics.traffic() if metrics is not None else {}
        reasons = metrics.ejection_reasons if metrics is not None else {}
        local = traffic.pop("local", None)
        endpoints = []
        for e in table.endpoints:
            is_self = e.hash == node.self_hash
            seen = local if is_self else traffic.pop(e.url, None)
            row: dict[str, Any] = {
                "service": e.service, "endpoint": e.url, "hash": e.hash,
                "balancer": e.balancer, "age": round(e.age(table.now), 3),
                "pingInterval": e.ping_interval, "self": is_self,
                "draining": e.draining, "version": e.version,
                "ejected": e.hash in ejected,
                "ejected_reason": reasons.get(e.url, ("", 0.0))[0] if e.hash in ejected else "",
                "traffic": seen or _idle(),
                # as published in its record (cluster.load); None: unknown
                "load": e.load.to_doc() if e.load is not None else None,
            }
            endpoints.append(row)
        if local is not None and not any(r["self"] for r in endpoints):
            traffic["local"] = local  # served here, but this instance is not in the table
        return {
            "service": node.settings.service,
            "endpoint": node.self_url,
            "hash": node.self_hash,
            "version": node.settings.own_app_version,
            "draining": self.draining_since is not None,
            "draining_for": round(time.time() - self.draining_since, 3)
            if self.draining_since is not None else None,
            "pid": os.getpid(),
            # several processes answer this address (--workers-count, gunicorn -w):
            # the counts below are this one's; /metrics sums them all
            "multiprocess": metrics is not None and metrics.multiprocess,
            "registered": registrar is not None and not registrar.outage.failing,
            "store": node.store.description,
            "store_failing": watcher.outage.failing,
            "discovery": {
                "refreshed_age": round(time.time() - watcher.refreshed_at, 3)
                if watcher.refreshed_at else None,
                "read_errors": watcher.outage.errors,
                "heartbeat_errors": registrar.outage.errors if registrar is not None else 0,
            },
            "now": table.now.isoformat(),
            "endpoints": endpoints,
            "services": list(table.services()),
            "balancers": list(table.balancers),
            "ejected": sorted(ejected),
            "connections": metrics.open_connections if metrics is not None else None,
            "websockets": sum(int(t["websockets"]) for t in _all_traffic(endpoints, traffic)),
            "served": local or _idle(),
            "other_traffic": traffic,
            # this instance's own load now (its record has it as of the last material move)
            "load": registrar.load().to_doc() if registrar is not None and registrar.load
            else None,
            "placement": self.settings.placement,
        }


def _idle() -> dict[str, float]:
    return {"requests": 0, "errors": 0, "websockets": 0, "rate": 0.0, "error_rate": 0.0}


def _all_traffic(endpoints: list[dict[str, Any]],
                 others: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    return [r["traffic"] for r in endpoints] + list(others.values())


def dashboard_html(prefix: str, initial: dict[str, Any]) -> bytes:
    """The dashboard page with the first status inlined (it renders before any fetch)."""
    page = _PAGE.replace("__PREFIX__", _script_json(prefix))
    return page.replace("__INITIAL__", _script_json(initial)).encode()


def _script_json(value: Any) -> str:
    """JSON that stays inside its ``<script>``: ``<`` escaped, not only ``</`` (a
    record's ``<!--<script>`` would put the HTML parser in a state where the page's
    own ``</script>`` no longer ends it, and the dashboard would stay blank)."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cluster dashboard</title>
<style>
:root { --fg:#1d2330; --dim:#6b7385; --bg:#f6f7f9; --card:#fff; --ok:#1a7f37;
        --bad:#c62828; --warn:#b26a00; --line:#e3e6ec; --accent:#2f5fd0; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:14px 22px; background:#1d2330; color:#fff; display:flex;
         align-items:baseline; gap:18px; flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; }
header .dim { color:#aab3c5; }
main { padding:18px 22px; }
.cards { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px;
        padding:10px 12px; min-width:96px; }
.card .v { font-size:22px; font-weight:600; }
.card .k { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
table { border-collapse:collapse; width:100%; background:var(--card);
        border:1px solid var(--line); border-radius:8px; overflow:hidden; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line);
         white-space:nowrap; }
td.health { white-space:normal; }
th { font-size:12px; color:var(--dim); text-transform:uppercase; letter-spacing:.04em;
     background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.ok { color:var(--ok); font-weight:600; } .bad { color:var(--bad); font-weight:600; }
.warn { color:var(--warn); font-weight:600; }
.self { font-size:11px; background:var(--accent); color:#fff; border-radius:4px;
        padding:1px 5px; margin-left:6px; }
.bar { display:inline-block; height:8px; background:var(--accent); border-radius:4px;
       vertical-align:middle; margin-left:6px; }
h2 { font-size:15px; margin:22px 0 8px; }
footer { color:var(--dim); font-size:12px; padding:0 22px 18px; }
code { font-size:12px; }
</style></head>
<body>
<header><h1>cluster</h1><span id="who"></span><span class="dim" id="store"></span>
<span class="dim" id="updated" data-fetches="0"></span></header>
<main>
<div class="cards" id="cards"></div>
<h2>Endpoints</h2>
<table id="endpoints"><thead><tr><th>service</th><th>endpoint</th><th>version</th>
<th>balancer</th><th class="num">heartbeat</th><th>health</th><th class="num">requests</th>
<th class="num">req/s</th><th class="num">errors</th><th class="num">websockets</th>
<th class="num">load</th></tr></thead><tbody></tbody></table>
<h2>Services</h2>
<table id="services"><thead><tr><th>service</th><th class="num">live endpoints</th>
<th>balancers</th><th class="num">req/s from here</th></tr></thead><tbody></tbody></table>
</main>
<footer id="note"></footer>
<script>
"use strict";
const PREFIX = __PREFIX__;
const INITIAL = __INITIAL__;
let fetches = 0;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const kid of kids) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}
function age(s) {
  return s == null ? "-" : (s < 120 ? s.toFixed(1) + "s" : Math.round(s / 60) + "m");
}
function loadText(l) {
  return l == null ? "-" : l.sockets + " ws, " + l.inflight + " req, " +
    l.serviceMs.toFixed(1) + " ms";
}
function pct(x) { return (100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 1) + "%"; }
function card(k, v, cls) {
  return el("div", {"class": "card"}, el("div", {"class": "v " + (cls || "")}, v),
            el("div", {"class": "k"}, k));
}
function render(d) {
  document.getElementById("who").textContent =
    (d.service || "balancer only") + " @ " + d.endpoint +
    (d.version ? " version " + d.version : "") + " (pid " + d.pid + ")" +
    (d.draining ? " draining" : "");
  document.getElementById("store").textContent = "discovery: " + d.store;
  const cards = document.getElementById("cards");
  const rate = d.endpoints.reduce((a, r) => a + r.traffic.rate, 0) +
    Object.values(d.other_traffic).reduce((a, t) => a + t.rate, 0);
  const refreshed = d.discovery.refreshed_age;
  cards.replaceChildren(
    card("services", d.services.length), card("endpoints", d.endpoints.length),
    card("balancers", d.balancers.length),
    card("connections", d.connections == null ? "-" : d.connections),
    card("websockets", d.websockets), card("req/s (this process)", rate.toFixed(1)),
    card("store", d.store_failing ? "failing" : "ok", d.store_failing ? "bad" : "ok"),
    card("last refresh", age(refreshed), refreshed != null && refreshed > 10 ? "warn" : ""),
    card("ejected", d.ejected.length, d.ejected.length ? "bad" : ""));
  const top = Math.max(1, ...d.endpoints.map(r => r.traffic.rate));
  const body = document.querySelector("#endpoints tbody");
  body.replaceChildren(...d.endpoints.map(r => {
    const t = r.traffic;
    const name = el("td", {}, r.endpoint);
    if (r.self) name.append(el("span", {"class": "self"}, "this instance"));
    const health = r.ejected
      ? el("td", {"class": "health bad"},
           "ejected" + (r.ejected_reason ? ": " + r.ejected_reason : ""))
      : r.draining ? el("td", {"class": "health warn"}, "draining")
      : el("td", {"class": "health ok"}, "live");
    const width = Math.round(40 * t.rate / top);
    const bar = el("span", {"class": "bar", "style": "width:" + width + "px"});
    const rateCell = el("td", {"class": "num rate"}, t.rate.toFixed(1));
    rateCell.append(bar);
    return el("tr", {"data-endpoint": r.endpoint, "data-requests": t.requests},
      el("td", {}, r.service), name, el("td", {"class": "version"}, r.version || "-"),
      el("td", {}, r.balancer || "-"),
      el("td", {"class": "num"}, age(r.age)), health,
      el("td", {"class": "num requests"}, t.requests), rateCell,
      el("td", {"class": "num"}, pct(t.error_rate)),
      el("td", {"class": "num"}, t.websockets),
      el("td", {"class": "num load"}, loadText(r.load)));
  }));
  const services = document.querySelector("#services tbody");
  services.replaceChildren(...d.services.map(s => {
    const rows = d.endpoints.filter(r => r.service === s);
    const balancers = [...new Set(rows.map(r => r.balancer).filter(b => b))];
    const sRate = rows.reduce((a, r) => a + r.traffic.rate, 0);
    return el("tr", {"data-service": s}, el("td", {}, s),
      el("td", {"class": "num"}, rows.length), el("td", {}, balancers.join(", ") || "-"),
      el("td", {"class": "num"}, sRate.toFixed(1)));
  }));
  document.getElementById("note").textContent =
    "Requests, rates and connections are counted by this process (pid " + d.pid + ")" +
    (d.multiprocess ? "; several worker processes answer this address, each shows its own " +
     "(reload to see another); " + PREFIX + "/metrics sums them all." : ".") +
    " Rates are over the last 5 seconds. Refreshes every 1.5 s.";
  const updated = document.getElementById("updated");
  updated.textContent = "updated " + new Date().toLocaleTimeString();
  updated.setAttribute("data-fetches", String(fetches));
}
async function refresh() {
  try {
    const r = await fetch(PREFIX + "/status" + location.search, {cache: "no-store"});
    if (r.ok) { fetches += 1; render(await r.json()); }
    else document.getElementById("updated").textContent = "status: HTTP " + r.status;
  } catch (e) {
    document.getElementById("updated").textContent = "instance unreachable";
  }
}
render(INITIAL);
setInterval(refresh, 1500);
</script>
</body></html>
"""
