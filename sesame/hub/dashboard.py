"""
The hub's operator view, as twisted.web resources for the ``--http`` listener.

* ``/dashboard`` — one self-contained HTML page (inline CSS and JS, nothing
  fetched from elsewhere).  It asks for an admin token once, keeps it in
  ``sessionStorage`` and polls ``/dashboard/state`` every second.
* ``/dashboard/state`` — JSON: connected remotes (name, namespace, peer
  address, connected since, endpoints, open connections, bytes and bytes/s in
  and out, last tunnel RTT), front-door routes from the store, recent errors.
  Requires ``Authorization: Bearer <admin token>``.
* ``/metrics`` — Prometheus text (:mod:`sesame.hub.metrics`); admin token
  required unless the hub runs with ``--metrics-public``.

``mount(root, hub, store, auth)`` puts them under a :class:`twisted.web.resource.Resource`.

Threads: these render in the reactor thread while the hub changes state on
the gRPC loop; they only read, from copies (``list(dict.values())`` is atomic
under the GIL), so a poll never blocks or races the hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.web import resource

from sesame.hub._auth import ADMIN, Refused, authorize, bearer_token

__all__ = ["DashboardPage", "MetricsResource", "StateResource", "admin_auth", "mount", "state"]

Auth = Callable[[Any], bool]


def admin_auth(store: Any, metrics: Any = None) -> Auth:
    """``auth(request)``: does the request carry a live admin token (``Authorization:
    Bearer``)?  A token that is present but wrong counts as an ``admin`` auth failure."""

    def check(request: Any) -> bool:
        token = bearer_token(request)
        if token is None:
            return False
        try:
            authorize(store, token, ADMIN)
        except Refused:
            if metrics is not None:
                metrics.auth_failure("admin", message=f"{request.path.decode('latin-1', 'replace')}: "
                                     "invalid or non-admin token")
            return False
        return True

    return check


def _unauthorized(request: Any, as_json: bool) -> bytes:
    request.setResponseCode(401)
    request.setHeader(b"www-authenticate", b'Bearer realm="sesame hub"')
    request.setHeader(b"cache-control", b"no-store")
    if as_json:
        request.setHeader(b"content-type", b"application/json")
        return b'{"error": "an admin token is required (Authorization: Bearer ...)"}\n'
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"an admin token is required (Authorization: Bearer ...)\n"


# --- state ----------------------------------------------------------------------------------


def _peer(p: str) -> str:
    for prefix in ("ipv4:", "ipv6:"):
        if p.startswith(prefix):
            p = p[len(prefix):]
    return p.replace("%5B", "[").replace("%5D", "]")


def state(hub: Any, store: Any) -> dict:
    """What ``/dashboard/state`` returns (see the module docstring)."""
    m = hub.metrics
    sessions = [s for s in list(hub.sessions.values()) if not s.closed]
    routes = dict(hub.routes)
    totals = m.bytes_by_remote()
    rates = m.throughput()
    open_by_remote: dict[tuple[str, str], int] = {}
    for (ns, name, _), n in m.open_connections().items():
        open_by_remote[(ns, name)] = open_by_remote.get((ns, name), 0) + n
    remotes: dict[tuple[str, str], dict] = {}
    for s in sessions:
        key = (s.namespace, s.remote)
        e = remotes.setdefault(key, {
            "name": s.remote, "namespace": s.namespace, "connected_since": s.since,
            "peers": set(), "endpoints": set(), "sessions": 0})
        e["connected_since"] = min(e["connected_since"], s.since)
        e["peers"].add(_peer(s.peer))
        e["sessions"] += 1
        e["endpoints"].update(ep for ep in s.endpoints if routes.get((*key, ep)) is s)
    out = []
    for key in sorted(remotes):
        e = remotes[key]
        b_in, b_out = totals.get(key, (0, 0))
        r_in, r_out = rates.get(key, (0.0, 0.0))
        rtt = m.last_rtt(*key)
        e.update(peers=sorted(e["peers"]), endpoints=sorted(e["endpoints"]),
                 connections=open_by_remote.get(key, 0), bytes_in=b_in, bytes_out=b_out,
                 rate_in=round(r_in, 1), rate_out=round(r_out, 1),
                 rtt_ms=None if rtt is None else round(rtt * 1000, 3))
        e["peer"] = e["peers"][0] if e["peers"] else ""
        out.append(e)
    route_rows = []
    list_routes = getattr(store, "list_routes", None)
    if list_routes is not None:
        try:
            for r in list_routes():
                route_rows.append({"id": r.id, "kind": r.kind, "match": r.match, "target": r.target})
        except Exception as exc:  # noqa: BLE001 - the page should still show the remotes
            route_rows.append({"id": "", "kind": "error", "match": "", "target": str(exc)})
    return {
        "time": time.time(),
        "remotes": out,
        "routes": route_rows,
        "recent_errors": list(reversed(list(m.recent_errors))),
        "dial_errors": m.dial_errors(),
        "auth_failures": m.auth_failures(),
    }


# --- resources ------------------------------------------------------------------------------


class StateResource(resource.Resource):
    isLeaf = True

    def __init__(self, hub: Any, store: Any, auth: Auth) -> None:
        super().__init__()
        self.hub, self.store, self.auth = hub, store, auth

    def render_GET(self, request: Any) -> bytes:
        if not self.auth(request):
            return _unauthorized(request, as_json=True)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(state(self.hub, self.store)).encode() + b"\n"


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, hub: Any, auth: Auth | None) -> None:
        super().__init__()
        self.hub, self.auth = hub, auth

    def render_GET(self, request: Any) -> bytes:
        if self.auth is not None and not self.auth(request):
            return _unauthorized(request, as_json=False)
        body, content_type = self.hub.metrics.render()
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body


class DashboardPage(resource.Resource):
    """``/dashboard`` (the page) with ``state`` below it."""

    def __init__(self, hub: Any, store: Any, auth: Auth) -> None:
        super().__init__()
        self.putChild(b"state", StateResource(hub, store, auth))

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", _CSP.encode())
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return _PAGE


def mount(root: resource.Resource, hub: Any, store: Any, auth: Auth | None = None, *,
          metrics_public: bool = False) -> resource.Resource:
    """Add ``dashboard`` (with ``dashboard/state``) and ``metrics`` under ``root``.

    ``auth(request) -> bool`` says whether a request carries an admin token; the
    default checks ``Authorization: Bearer`` against ``store`` (counting wrong
    tokens in ``hub.metrics``).  ``metrics_public`` serves ``/metrics`` without it
    (``--metrics-public``, for a scraper on loopback).  Returns ``root``.
    """
    if auth is None:
        auth = admin_auth(store, hub.metrics)
    root.putChild(b"dashboard", DashboardPage(hub, store, auth))
    root.putChild(b"metrics", MetricsResource(hub, None if metrics_public else auth))
    return root


# --- the page -------------------------------------------------------------------------------

_STYLE = """
:root { --fg:#1d2430; --muted:#687385; --line:#e3e7ee; --bg:#f7f8fa; --ok:#1a7f37; --bad:#b42318; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif; color:var(--fg);
       background:var(--bg); }
header { display:flex; align-items:center; gap:1em; padding:.7em 1.2em; background:#1d2430;
         color:#fff; }
header h1 { font-size:16px; margin:0; font-weight:600; }
header .status { margin-left:auto; font-size:12px; color:#c9d1dc; }
header button { font-size:12px; }
main { padding:1em 1.2em; max-width:1400px; }
section { background:#fff; border:1px solid var(--line); border-radius:6px; margin:0 0 1em;
          padding:.6em .9em; }
h2 { font-size:14px; margin:.2em 0 .5em; }
h2 .count { color:var(--muted); font-weight:normal; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:.3em .5em; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.empty { color:var(--muted); font-style:italic; }
.dot { display:inline-block; width:.6em; height:.6em; border-radius:50%; background:var(--ok);
       margin-right:.4em; }
.err { color:var(--bad); }
code { font:12px ui-monospace,SFMono-Regular,Menlo,monospace; }
#login { max-width:28em; margin:4em auto; }
#login input { width:100%; padding:.5em; font:inherit; margin:.4em 0; }
#login button { padding:.4em 1.2em; font:inherit; }
[hidden] { display:none !important; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var KEY = "sesame-admin-token";
  var stateUrl = location.pathname.replace(/\/+$/, "") + "/state";
  var timer = null;
  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function bytes(n) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + u[i];
  }
  function rate(n) { return bytes(n) + "/s"; }
  function ago(t) {
    var s = Math.max(0, Math.round(Date.now() / 1000 - t));
    if (s < 60) { return s + "s"; }
    if (s < 3600) { return Math.floor(s / 60) + "m " + (s % 60) + "s"; }
    if (s < 86400) { return Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m"; }
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }
  function when(t) { return new Date(t * 1000).toLocaleString(); }
  function fill(tbody, rows, cols, empty, attr) {
    tbody.textContent = "";
    if (!rows.length) {
      var tr = el("tr"), td = el("td", empty, "empty");
      td.colSpan = cols; tr.appendChild(td); tbody.appendChild(tr); return;
    }
    rows.forEach(function (r) {
      var tr = el("tr");
      if (attr) { tr.setAttribute("data-id", attr(r)); }
      r.cells.forEach(function (c) {
        var td = el("td", c.text, c.cls);
        if (c.title) { td.title = c.title; }
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
  }
  function render(s) {
    $("remote-count").textContent = "(" + s.remotes.length + ")";
    fill($("remotes"), s.remotes.map(function (r) {
      return { id: r.namespace + "/" + r.name, cells: [
        { text: r.name, cls: "name" }, { text: r.namespace },
        { text: r.peers.join(", ") },
        { text: ago(r.connected_since), title: when(r.connected_since) },
        { text: r.endpoints.join(", ") },
        { text: r.connections, cls: "num" },
        { text: rate(r.rate_in), cls: "num", title: bytes(r.bytes_in) + " in total" },
        { text: rate(r.rate_out), cls: "num", title: bytes(r.bytes_out) + " in total" },
        { text: r.rtt_ms === null ? "-" : r.rtt_ms.toFixed(2) + " ms", cls: "num" }] };
    }), 9, "no remotes connected", function (r) { return r.id; });
    $("route-count").textContent = "(" + s.routes.length + ")";
    fill($("routes"), s.routes.map(function (r) {
      return { id: r.id, cells: [{ text: r.kind }, { text: r.match }, { text: r.target },
                                 { text: r.id }] };
    }), 4, "no routes", function (r) { return r.id; });
    $("error-count").textContent = "(" + s.recent_errors.length + ")";
    fill($("errors"), s.recent_errors.map(function (e) {
      return { cells: [{ text: when(e.time) }, { text: e.remote || "-" },
                       { text: e.code, cls: "err" }, { text: e.message }] };
    }), 4, "none");
  }
  function show(loggedIn, msg) {
    $("login").hidden = loggedIn;
    $("board").hidden = !loggedIn;
    $("logout").hidden = !loggedIn;
    $("login-error").textContent = msg || "";
  }
  function poll() {
    var token = sessionStorage.getItem(KEY);
    if (!token) { show(false); return; }
    fetch(stateUrl, { headers: { "Authorization": "Bearer " + token }, cache: "no-store" })
      .then(function (resp) {
        if (resp.status === 401) {
          sessionStorage.removeItem(KEY);
          stop();
          show(false, "The hub refused that token (an admin token is needed).");
          return null;
        }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.json();
      })
      .then(function (s) {
        if (!s) { return; }
        show(true);
        render(s);
        $("status").textContent = "updated " + new Date().toLocaleTimeString();
        $("status").className = "status";
      })
      .catch(function (err) {
        $("status").textContent = "hub unreachable: " + err.message;
        $("status").className = "status err";
      });
  }
  function start() { stop(); poll(); timer = setInterval(poll, 1000); }
  function stop() { if (timer !== null) { clearInterval(timer); timer = null; } }
  $("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = $("token").value.trim();
    if (!t) { return; }
    sessionStorage.setItem(KEY, t);
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", function () {
    sessionStorage.removeItem(KEY); stop(); show(false);
  });
  if (sessionStorage.getItem(KEY)) { start(); } else { show(false); }
})();
"""

_BODY = """<header><h1>sesame hub</h1><span id="status" class="status"></span>
<button id="logout" type="button" hidden>forget token</button></header>
<main>
<section id="login"><h2>Admin token</h2>
<form id="login-form"><label for="token">Paste an admin token
(<code>sesame token create --admin</code>); it is kept in this tab only.</label>
<input id="token" type="password" autocomplete="off" spellcheck="false" autofocus>
<button id="login-button" type="submit">Open dashboard</button>
<div id="login-error" class="err"></div></form></section>
<div id="board" hidden>
<section><h2>Remotes <span id="remote-count" class="count"></span></h2>
<table><thead><tr><th>Name</th><th>Namespace</th><th>Address</th><th>Connected</th>
<th>Endpoints</th><th class="num">Conns</th><th class="num">In</th><th class="num">Out</th>
<th class="num">RTT</th></tr></thead><tbody id="remotes"></tbody></table></section>
<section><h2>Routes <span id="route-count" class="count"></span></h2>
<table><thead><tr><th>Kind</th><th>Match</th><th>Target</th><th>Id</th></tr></thead>
<tbody id="routes"></tbody></table></section>
<section><h2>Recent errors <span id="error-count" class="count"></span></h2>
<table><thead><tr><th>Time</th><th>Remote</th><th>Code</th><th>Message</th></tr></thead>
<tbody id="errors"></tbody></table></section>
</div></main>"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
_PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<title>sesame hub</title><link rel="icon" href="data:,">'
    f"<style>{_STYLE}</style></head><body>{_BODY}<script>{_SCRIPT}</script></body></html>\n"
).encode()
