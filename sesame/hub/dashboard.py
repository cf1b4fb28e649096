"""
The hub's operator view, as twisted.web resources for the ``--http`` listener.

* ``/dashboard`` — one self-contained HTML page (inline CSS and JS, nothing
  fetched from elsewhere).  It asks for an admin token once, keeps it in
  ``sessionStorage``, polls ``/dashboard/state`` every second and
  ``/dashboard/history`` every five, and draws the charts itself (inline SVG).
* ``/dashboard/state`` — JSON: fleet totals (remotes, sessions, open
  connections, bytes and bytes/s in and out), one page of the connected remotes
  (name, namespace, peer address, connected since, endpoints, open connections,
  bytes and bytes/s in and out, last tunnel RTT), the first front-door routes,
  recent errors.  Query: ``filter`` (a part of the remote id, any case),
  ``page`` (from 1; past the last page means the last) and ``page_size``
  (1-:data:`MAX_PAGE_SIZE`, default :data:`DEFAULT_PAGE_SIZE`).
* ``/dashboard/history`` — JSON: the hub's last 15 minutes
  (:class:`sesame.hub.metrics.History`: throughput in and out, open
  connections, remotes, sessions; a point every few seconds) and, with
  ``remote=NAMESPACE/NAME``, that remote's (which the hub then watches, so its
  history is kept whatever its rank).
* ``/metrics`` — Prometheus text (:mod:`sesame.hub.metrics`), fleet-level series;
  ``?remotes=N`` adds per-remote series for the N busiest remotes, ``?remotes=all``
  for every one.  Admin token required unless the hub runs with ``--metrics-public``.

Everything but the page needs ``Authorization: Bearer <admin token>``; a bad
query parameter is 400 with a Google JSON error naming it (as the REST API).
Each poll costs a page, not the fleet: the remotes come from the fleet index
(:class:`sesame.hub.metrics.FleetIndex`), so a poll at 10,000 remotes is a few KiB.

``mount(root, hub, store, auth)`` puts them under a :class:`twisted.web.resource.Resource`
and starts the hub's history sampling on the reactor.

Threads: the hub changes state on the gRPC loop; these only read, from copies
(``list(dict.values())`` is atomic under the GIL) and under the metrics' lock, so a
poll never blocks or races the hub.  ``/dashboard/state`` and ``/metrics`` are computed
in the reactor's thread pool (a fleet index update or ``?remotes=all`` at 50,000
remotes takes a while), the history in the reactor thread itself (a few hundred points).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from twisted.logger import Logger
from twisted.web import resource, server

from sesame import _names as N
from sesame.hub._auth import ADMIN, Refused, authorize, bearer_token
from sesame.hub._rest import error_json
from sesame.hub.mgmt import ApiError, name_filter, peer_address

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "DashboardPage", "HistoryResource",
           "MetricsResource", "StateResource", "admin_auth", "history", "mount", "state"]

Auth = Callable[[Any], bool]
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
log = Logger()

#: Remotes per dashboard page, by default and at most.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
#: Front-door routes in a poll (the total is given too), endpoints and peers per row.
ROUTES_SHOWN = 50
HUBS_SHOWN = 50  # hubs of a cluster listed on the page (the count says how many in all)
ENDPOINTS_SHOWN = 16
PEERS_SHOWN = 4


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


# --- query parameters -------------------------------------------------------------------------


def _query(request: Any, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters (the last of each); ApiError for an unknown one."""
    raw = parse_qs(urlsplit(request.uri).query.decode("utf-8", "replace"), keep_blank_values=True)
    out = {}
    for key, values in sorted(raw.items()):
        if key not in allowed:
            raise ApiError(_INVALID, f"{key}: unknown query parameter (known: {', '.join(allowed)})",
                           violations=[(key, "unknown query parameter")])
        out[key] = values[-1]
    return out


def _whole(field: str, text: str, low: int, high: int, default: int) -> int:
    if text == "":
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or not low <= int(text) <= high:
        raise ApiError(_INVALID, f"{field}: a whole number from {low} to {high}",
                       violations=[(field, f"a whole number from {low} to {high}")])
    return int(text)


def _remote_key(field: str, text: str) -> tuple[str, str] | None:
    if text == "":
        return None
    ns, sep, name = text.partition("/")
    if not sep or not N.valid_name(ns) or not N.valid_name(name):
        raise ApiError(_INVALID, f"{field}: expected NAMESPACE/NAME (default/edge-1)",
                       violations=[(field, "expected NAMESPACE/NAME")])
    return (ns, name)


def _bad_request(request: Any, exc: ApiError) -> bytes:
    http, body = error_json(exc.status())
    request.setResponseCode(http)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body


# --- state ----------------------------------------------------------------------------------


def state(hub: Any, store: Any, *, needle: str = "", page: int = 1,
          page_size: int = DEFAULT_PAGE_SIZE) -> dict:
    """What ``/dashboard/state`` returns (see the module docstring): one page of the
    connected remotes whose id contains ``needle`` (lowercase)."""
    m = hub.metrics
    view = m.fleet.view()
    routes = dict(hub.routes)
    matching = view.matching(needle)
    pages = max(1, -(-len(matching) // page_size))
    page = min(page, pages)
    chunk = matching[(page - 1) * page_size:page * page_size]
    numbers = m.remote_numbers(chunk)
    out = []
    for key in chunk:
        sessions = [s for s in view.sessions.get(key, ()) if not s.closed]
        peers = sorted({peer_address(s.peer) for s in sessions})
        endpoints = sorted({ep for s in sessions for ep in s.endpoints
                            if routes.get((*key, ep)) is s})
        n = numbers[key]
        rtt = n["rtt"]
        out.append({
            "id": f"{key[0]}/{key[1]}", "name": key[1], "namespace": key[0],
            "connected_since": min((s.since for s in sessions), default=None),
            "sessions": len(sessions), "peers": peers[:PEERS_SHOWN],
            "peer": peers[0] if peers else "", "endpoints": endpoints[:ENDPOINTS_SHOWN],
            "endpoints_total": len(endpoints), "connections": n["connections"],
            "bytes_in": n["bytes_in"], "bytes_out": n["bytes_out"],
            "rate_in": None if n["rate_in"] is None else round(n["rate_in"], 1),
            "rate_out": None if n["rate_out"] is None else round(n["rate_out"], 1),
            "rtt_ms": None if rtt is None else round(rtt * 1000, 3)})
    totals = m.totals()
    samples = m.history.samples
    last = samples[-1].hub if samples else None
    route_rows = []
    routes_total = 0
    list_routes = getattr(store, "list_routes", None)
    if list_routes is not None:
        try:
            records = list_routes()
            routes_total = len(records)
            for r in records[:ROUTES_SHOWN]:
                route_rows.append({"id": r.id, "kind": r.kind, "match": r.match, "target": r.target})
        except Exception as exc:  # noqa: BLE001 - the page should still show the remotes
            route_rows.append({"id": "", "kind": "error", "match": "", "target": str(exc)[:200]})
    return {
        "time": time.time(),
        "totals": {"remotes": len(view.keys), "sessions": len(view.flat),
                   "connections": totals["connections"],
                   "connections_total": totals["connections_total"],
                   "bytes_in": totals["bytes_in"], "bytes_out": totals["bytes_out"],
                   "rate_in": None if last is None else round(last[0], 1),
                   "rate_out": None if last is None else round(last[1], 1)},
        "filter": needle, "matching": len(matching), "page": page, "pages": pages,
        "page_size": page_size,
        "remotes": out,
        "routes": route_rows, "routes_total": routes_total,
        "recent_errors": list(reversed(list(m.recent_errors))),
        "cluster": cluster_state(hub),
        "dial_errors": m.dial_errors(),
        "auth_failures": m.auth_failures(),
    }


def cluster_state(hub: Any) -> dict | None:
    """The hubs of this hub's cluster and the sessions each holds (None: not in one)."""
    cluster = getattr(hub, "cluster", None)
    if cluster is None:
        return None
    hubs = [{"id": cluster.id, "advertise": cluster.advertise, "sessions": len(cluster.local),
             "self": True}]
    hubs += [{"id": p.id, "advertise": p.advertise, "sessions": len(p.sessions), "self": False}
             for p in sorted(cluster.peers.values(), key=lambda p: p.id)]
    return {"hub": cluster.id, "up": cluster.up, "hubs": hubs[:HUBS_SHOWN],
            "hubs_total": len(hubs), "relayed": cluster.relayed}


def history(hub: Any, remote: tuple[str, str] | None = None) -> dict:
    """What ``/dashboard/history`` returns: the hub's series and ``remote``'s (watched
    from now on), as columns (see :meth:`sesame.hub.metrics.History.series`)."""
    h = hub.metrics.history
    now = time.time()
    out: dict[str, Any] = {"now": now, "interval": h.interval, "span": h.span,
                           "hub": h.series(), "remote": None}
    if remote is not None:
        h.watch(remote, now)
        out["remote"] = {"id": f"{remote[0]}/{remote[1]}", **h.series(remote)}
    return out


# --- resources ------------------------------------------------------------------------------


def _off_reactor(request: Any, work: Callable[[], Any], answer: Callable[[Any], bytes]) -> Any:
    """Run ``work()`` in the reactor's thread pool (it reads the fleet: the reactor keeps
    serving meanwhile), then finish ``request`` with ``answer(result)`` (an ApiError from
    either is a 400).  Returns NOT_DONE_YET."""
    from twisted.internet import reactor, threads

    gone = [False]
    request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))

    def done(result: Any) -> None:
        if gone[0]:
            return
        try:
            body = answer(result)
        except ApiError as exc:
            body = _bad_request(request, exc)
        request.write(body)
        request.finish()

    def failed(f: Any) -> None:
        if gone[0]:
            return
        if f.check(ApiError):
            request.write(_bad_request(request, f.value))
        else:
            log.failure("dashboard request failed", f)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"internal error\n")
        request.finish()

    d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), work)
    d.addCallbacks(done, failed)
    return server.NOT_DONE_YET


class _JSONResource(resource.Resource):
    isLeaf = True
    params: tuple[str, ...] = ()
    threaded = False  # compute the body in the reactor's thread pool

    def __init__(self, hub: Any, store: Any, auth: Auth) -> None:
        super().__init__()
        self.hub, self.store, self.auth = hub, store, auth

    def render_GET(self, request: Any) -> Any:
        if not self.auth(request):
            return _unauthorized(request, as_json=True)
        try:
            query = _query(request, self.params)
            if not self.threaded:
                return self._json(request, self.body(query))
        except ApiError as exc:
            return _bad_request(request, exc)
        return _off_reactor(request, lambda: self.body(query),
                            lambda body: self._json(request, body))

    @staticmethod
    def _json(request: Any, body: dict) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    def body(self, query: dict[str, str]) -> dict:
        raise NotImplementedError


class StateResource(_JSONResource):
    """``/dashboard/state?filter=&page=&page_size=``."""

    params = ("filter", "page", "page_size")
    threaded = True

    def body(self, query: dict[str, str]) -> dict:
        return state(self.hub, self.store,
                     needle=name_filter("filter", query.get("filter", "")),
                     page=_whole("page", query.get("page", ""), 1, 10**6, 1),
                     page_size=_whole("page_size", query.get("page_size", ""), 1,
                                      MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE))


class HistoryResource(_JSONResource):
    """``/dashboard/history?remote=NAMESPACE/NAME``."""

    params = ("remote",)

    def body(self, query: dict[str, str]) -> dict:
        return history(self.hub, _remote_key("remote", query.get("remote", "")))


class MetricsResource(resource.Resource):
    """``/metrics[?remotes=N|all]``: Prometheus text."""

    isLeaf = True

    def __init__(self, hub: Any, auth: Auth | None) -> None:
        super().__init__()
        self.hub, self.auth = hub, auth

    def render_GET(self, request: Any) -> bytes:
        if self.auth is not None and not self.auth(request):
            return _unauthorized(request, as_json=False)
        try:
            q = _query(request, ("remotes",))
            want = q.get("remotes", "")
            per_remote = None if want == "all" else _whole("remotes", want, 0, 10**6, 0)
        except ApiError as exc:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            text = exc.message if exc.violations[0][0] != "remotes" else \
                "remotes: 'all' or how many of the busiest remotes get series of their own"
            return text.encode() + b"\n"
        def answer(rendered: tuple[bytes, str]) -> bytes:
            body, content_type = rendered
            request.setHeader(b"content-type", content_type.encode())
            request.setHeader(b"cache-control", b"no-store")
            return body

        return _off_reactor(request, lambda: self.hub.metrics.render(per_remote), answer)


class DashboardPage(resource.Resource):
    """``/dashboard`` (the page) with ``state`` and ``history`` below it."""

    def __init__(self, hub: Any, store: Any, auth: Auth) -> None:
        super().__init__()
        self.putChild(b"state", StateResource(hub, store, auth))
        self.putChild(b"history", HistoryResource(hub, store, auth))

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
          metrics_public: bool = False, clock: Any = None) -> resource.Resource:
    """Add ``dashboard`` (with ``dashboard/state`` and ``dashboard/history``) and
    ``metrics`` under ``root``, and start sampling the hub's history on ``clock``
    (the reactor by default; :meth:`sesame.hub.metrics.HubMetrics.start_sampling`).

    ``auth(request) -> bool`` says whether a request carries an admin token; the
    default checks ``Authorization: Bearer`` against ``store`` (counting wrong
    tokens in ``hub.metrics``).  ``metrics_public`` serves ``/metrics`` without it
    (``--metrics-public``, for a scraper on loopback).  Returns ``root``.
    """
    if auth is None:
        auth = admin_auth(store, hub.metrics)
    root.putChild(b"dashboard", DashboardPage(hub, store, auth))
    root.putChild(b"metrics", MetricsResource(hub, None if metrics_public else auth))
    if clock is None:
        from twisted.internet import reactor as clock
    hub.metrics.start_sampling(clock)
    return root


# --- the page -------------------------------------------------------------------------------

_STYLE = """
:root { --fg:#1d2430; --muted:#687385; --line:#e3e7ee; --bg:#f7f8fa; --ok:#1a7f37; --bad:#b42318;
        --in:#1f6feb; --out:#bf3989; --conn:#9a6700; }
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
.totals { display:grid; grid-template-columns:repeat(auto-fit,minmax(9em,1fr)); gap:.6em;
          background:none; border:0; padding:0; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:.5em .8em; }
.card .label { font-size:12px; color:var(--muted); }
.card .value { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .sub { font-size:12px; color:var(--muted); font-variant-numeric:tabular-nums; }
.charts { display:grid; grid-template-columns:repeat(auto-fit,minmax(22em,1fr)); gap:1em; }
.chart h3 { font-size:13px; margin:.1em 0 .3em; font-weight:600; }
.chart svg { width:100%; height:170px; display:block; }
.legend { font-size:12px; color:var(--muted); display:flex; gap:1em; flex-wrap:wrap; }
.legend span::before { content:""; display:inline-block; width:1.2em; height:0; margin-right:.3em;
                       vertical-align:middle; border-top:2px solid currentColor; }
.legend .sel::before { border-top-style:dashed; }
.k-in { color:var(--in); } .k-out { color:var(--out); } .k-conns { color:var(--conn); }
svg .line { fill:none; stroke-width:1.6; stroke-linejoin:round; }
svg .in { stroke:var(--in); } svg .out { stroke:var(--out); } svg .conns { stroke:var(--conn); }
svg .sel { stroke-dasharray:5 3; stroke-width:2; }
svg .grid { stroke:var(--line); stroke-width:1; }
svg .axis { font-size:10px; fill:var(--muted); }
.toolbar { display:flex; align-items:center; gap:.6em; flex-wrap:wrap; margin:.2em 0 .6em; }
.toolbar input { padding:.3em .5em; font:inherit; min-width:16em; }
.toolbar .pager { margin-left:auto; display:flex; align-items:center; gap:.4em; }
.toolbar .info { color:var(--muted); font-size:12px; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:.3em .5em; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
#remotes tr { cursor:pointer; }
#remotes tr:hover { background:#f3f6fb; }
#remotes tr.selected { background:#e8f0fe; }
.empty { color:var(--muted); font-style:italic; }
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
  var base = location.pathname.replace(/\/+$/, "");
  var SVGNS = "http://www.w3.org/2000/svg";
  var timers = [];
  var view = { filter: "", page: 1, pageSize: 50, selected: null, busy: false, hbusy: false,
               history: false };
  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function bytes(n) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + u[i];
  }
  function rate(n) { return n === null || n === undefined ? "-" : bytes(n) + "/s"; }
  function count(n) { return Number(n).toLocaleString("en-US"); }
  function ago(t) {
    var s = Math.max(0, Math.round(Date.now() / 1000 - t));
    if (s < 60) { return s + "s"; }
    if (s < 3600) { return Math.floor(s / 60) + "m " + (s % 60) + "s"; }
    if (s < 86400) { return Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m"; }
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }
  function when(t) { return new Date(t * 1000).toLocaleString(); }
  function fill(tbody, rows, cols, empty) {
    tbody.textContent = "";
    if (!rows.length) {
      var tr = el("tr"), td = el("td", empty, "empty");
      td.colSpan = cols; tr.appendChild(td); tbody.appendChild(tr); return;
    }
    rows.forEach(function (r) {
      var tr = el("tr");
      if (r.id !== undefined) { tr.setAttribute("data-id", r.id); }
      if (r.cls) { tr.className = r.cls; }
      r.cells.forEach(function (c) {
        var td = el("td", c.text, c.cls);
        if (c.title) { td.title = c.title; }
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
  }
  function setValue(id, text, value) {
    var e = $(id);
    e.textContent = text;
    e.setAttribute("data-value", String(value === null || value === undefined ? "" : value));
  }

  // --- the table, totals, routes, errors
  function render(s) {
    var t = s.totals;
    setValue("total-remotes", count(t.remotes), t.remotes);
    setValue("total-sessions", count(t.sessions) + " sessions", t.sessions);
    setValue("total-connections", count(t.connections), t.connections);
    setValue("total-connections-sub", count(t.connections_total) + " since start",
             t.connections_total);
    setValue("total-bytes-in", bytes(t.bytes_in), t.bytes_in);
    setValue("total-rate-in", rate(t.rate_in), t.rate_in);
    setValue("total-bytes-out", bytes(t.bytes_out), t.bytes_out);
    setValue("total-rate-out", rate(t.rate_out), t.rate_out);
    view.page = s.page;
    $("remote-count").textContent = "(" + count(s.matching) +
      (s.filter ? " of " + count(t.remotes) + " match" : "") + ")";
    $("page-info").textContent = "page " + s.page + " of " + s.pages;
    $("page-info").setAttribute("data-page", String(s.page));
    $("page-info").setAttribute("data-pages", String(s.pages));
    $("prev").disabled = s.page <= 1;
    $("next").disabled = s.page >= s.pages;
    fill($("remotes"), s.remotes.map(function (r) {
      var eps = r.endpoints.join(", ") +
        (r.endpoints_total > r.endpoints.length ? " +" + (r.endpoints_total - r.endpoints.length) : "");
      return { id: r.id, cls: r.id === view.selected ? "selected" : "", cells: [
        { text: r.name, cls: "name" }, { text: r.namespace },
        { text: r.peers.join(", ") + (r.sessions > r.peers.length ? " …" : ""),
          title: r.sessions + " session(s)" },
        { text: r.connected_since === null ? "-" : ago(r.connected_since),
          title: r.connected_since === null ? "" : when(r.connected_since) },
        { text: eps },
        { text: r.connections, cls: "num" },
        { text: rate(r.rate_in), cls: "num", title: bytes(r.bytes_in) + " in total" },
        { text: rate(r.rate_out), cls: "num", title: bytes(r.bytes_out) + " in total" },
        { text: r.rtt_ms === null ? "-" : r.rtt_ms.toFixed(2) + " ms", cls: "num" }] };
    }), 9, s.filter ? "no connected remote matches" : "no remotes connected");
    $("cluster").hidden = !s.cluster;
    if (s.cluster) {
      $("hub-count").textContent = "(" + count(s.cluster.hubs_total) +
        (s.cluster.up ? "" : "; store unavailable") + ")";
      fill($("hubs"), s.cluster.hubs.map(function (h) {
        return { id: h.id, cls: h.self ? "selected" : "", cells: [
          { text: h.id + (h.self ? " (this hub)" : ""), cls: "name" }, { text: h.advertise },
          { text: count(h.sessions), cls: "num" }] };
      }), 3, "no hubs");
    }
    $("route-count").textContent = "(" + count(s.routes_total) +
      (s.routes_total > s.routes.length ? ", first " + s.routes.length + " shown" : "") + ")";
    fill($("routes"), s.routes.map(function (r) {
      return { id: r.id, cells: [{ text: r.kind }, { text: r.match }, { text: r.target },
                                 { text: r.id }] };
    }), 4, "no routes");
    $("error-count").textContent = "(" + s.recent_errors.length + ")";
    fill($("errors"), s.recent_errors.map(function (e) {
      return { cells: [{ text: when(e.time) }, { text: e.remote || "-" },
                       { text: e.code, cls: "err" }, { text: e.message }] };
    }), 4, "none");
  }

  // --- the charts: inline SVG from /dashboard/history
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function niceMax(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log(v) / Math.LN10));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= v) { return steps[i] * p; } }
    return 10 * p;
  }
  function draw(box, h, lines, fmt, least) {
    var W = 600, H = 170, L = 64, R = 10, T = 8, B = 20;
    box.textContent = "";
    box.setAttribute("viewBox", "0 0 " + W + " " + H);
    box.setAttribute("preserveAspectRatio", "none");
    var t1 = h.now, t0 = t1 - h.span, max = 0, points = 0;
    lines.forEach(function (l) {
      l.values.forEach(function (v) { if (v !== null && v > max) { max = v; } });
    });
    max = niceMax(Math.max(max, least));
    function x(t) { return L + (t - t0) / (t1 - t0) * (W - L - R); }
    function y(v) { return T + (1 - v / max) * (H - T - B); }
    [0, 0.5, 1].forEach(function (f) {
      var yy = y(max * f);
      box.appendChild(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, "class": "grid" }));
      box.appendChild(svg("text", { x: L - 6, y: yy + 3, "text-anchor": "end", "class": "axis" },
                          fmt(max * f)));
    });
    [15, 10, 5, 0].forEach(function (m) {
      box.appendChild(svg("text", { x: x(t1 - m * 60), y: H - 4, "class": "axis",
                                    "text-anchor": m === 15 ? "start" : m === 0 ? "end" : "middle" },
                          m ? "-" + m + " min" : "now"));
    });
    lines.forEach(function (l) {
      var pts = [];
      function flush() {
        if (pts.length) {
          box.appendChild(svg("polyline", { points: pts.join(" "), "class": "line " + l.cls,
                                            "data-series": l.name }));
          points += pts.length;
        }
        pts = [];
      }
      for (var i = 0; i < h.t.length; i++) {
        var v = l.values[i];
        if (v === null || v === undefined || h.t[i] < t0) { flush(); continue; }
        pts.push(x(h.t[i]).toFixed(1) + "," + y(v).toFixed(1));
      }
      flush();
    });
    box.setAttribute("data-points", String(points));
  }
  function charts(h) {
    var r = h.remote, tp = [
      { name: "hub-in", cls: "in", values: h.hub["in"] },
      { name: "hub-out", cls: "out", values: h.hub.out }];
    var cn = [{ name: "hub-conns", cls: "conns", values: h.hub.conns }];
    if (r) {
      tp.push({ name: "remote-in", cls: "in sel", values: r["in"] });
      tp.push({ name: "remote-out", cls: "out sel", values: r.out });
      cn.push({ name: "remote-conns", cls: "conns sel", values: r.conns });
    }
    var hr = { now: h.now, span: h.span, t: h.hub.t };
    draw($("chart-throughput"), hr, tp, function (v) { return rate(v); }, 1024);
    draw($("chart-connections"), hr, cn, function (v) {
      return v === Math.round(v) ? count(v) : v.toFixed(1);
    }, 4);
    $("chart-remote").textContent = r ? r.id : "none (click a remote)";
    document.querySelectorAll(".legend .sel").forEach(function (e) { e.hidden = !r; });
    $("clear-selection").hidden = !r;
  }

  // --- polling
  function api(path) {
    var token = sessionStorage.getItem(KEY);
    if (!token) { show(false); return Promise.resolve(null); }
    return fetch(base + path, { headers: { "Authorization": "Bearer " + token },
                                cache: "no-store" })
      .then(function (resp) {
        if (resp.status === 401) {
          sessionStorage.removeItem(KEY);
          stop();
          show(false, "The hub refused that token (an admin token is needed).");
          return null;
        }
        if (!resp.ok) {
          return resp.json().then(function (b) {
            var e = new Error((b.error && b.error.message) || ("HTTP " + resp.status));
            e.answered = true;
            throw e;
          }, function () { throw new Error("HTTP " + resp.status); });
        }
        return resp.json();
      });
  }
  function failed(err) {
    $("status").textContent = (err.answered ? "the hub said: " : "hub unreachable: ") +
      err.message;
    $("status").className = "status err";
  }
  function poll() {
    if (view.busy) { return; }
    view.busy = true;
    var q = "/state?page=" + view.page + "&page_size=" + view.pageSize +
      (view.filter ? "&filter=" + encodeURIComponent(view.filter) : "");
    api(q).then(function (s) {
      view.busy = false;
      if (!s) { return; }
      show(true);
      render(s);
      if (!view.history) {  // the token works: the charts may poll too
        view.history = true;
        pollHistory();
        timers.push(setInterval(pollHistory, 5000));
      }
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      $("status").className = "status";
    }).catch(function (err) { view.busy = false; failed(err); });
  }
  function pollHistory() {
    if (view.hbusy) { return; }
    view.hbusy = true;
    api("/history" + (view.selected ? "?remote=" + encodeURIComponent(view.selected) : ""))
      .then(function (h) { view.hbusy = false; if (h) { charts(h); } })
      .catch(function (err) { view.hbusy = false; failed(err); });
  }
  function start() { stop(); poll(); timers = [setInterval(poll, 1000)]; }
  function stop() { timers.forEach(clearInterval); timers = []; view.history = false; }
  function show(loggedIn, msg) {
    $("login").hidden = loggedIn;
    $("board").hidden = !loggedIn;
    $("logout").hidden = !loggedIn;
    $("login-error").textContent = msg || "";
  }

  // --- controls
  var typing = null;
  $("filter").addEventListener("input", function () {
    if (typing !== null) { clearTimeout(typing); }
    typing = setTimeout(function () {
      typing = null;
      view.filter = $("filter").value.trim();
      view.page = 1;
      poll();
    }, 200);
  });
  $("prev").addEventListener("click", function () {
    if (view.page > 1) { view.page -= 1; poll(); }
  });
  $("next").addEventListener("click", function () { view.page += 1; poll(); });
  $("remotes").addEventListener("click", function (ev) {
    var tr = ev.target.closest("tr[data-id]");
    if (!tr) { return; }
    view.selected = tr.getAttribute("data-id");
    document.querySelectorAll("#remotes tr.selected").forEach(function (e) { e.className = ""; });
    tr.className = "selected";
    pollHistory();
  });
  $("clear-selection").addEventListener("click", function () {
    view.selected = null;
    document.querySelectorAll("#remotes tr.selected").forEach(function (e) { e.className = ""; });
    pollHistory();
  });
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
<section class="totals">
<div class="card"><div class="label">Remotes connected</div><div id="total-remotes" class="value">-</div>
<div id="total-sessions" class="sub"></div></div>
<div class="card"><div class="label">Open connections</div><div id="total-connections" class="value">-</div>
<div id="total-connections-sub" class="sub"></div></div>
<div class="card"><div class="label">Bytes in (to remotes)</div><div id="total-bytes-in" class="value">-</div>
<div id="total-rate-in" class="sub"></div></div>
<div class="card"><div class="label">Bytes out (from remotes)</div><div id="total-bytes-out" class="value">-</div>
<div id="total-rate-out" class="sub"></div></div>
</section>
<section><h2>Last 15 minutes <span class="count">hub total and selected remote:
<span id="chart-remote">none</span></span>
<button id="clear-selection" type="button" hidden>clear</button></h2>
<div class="charts">
<div class="chart"><h3>Throughput</h3><svg id="chart-throughput" role="img"
aria-label="throughput over the last 15 minutes"></svg>
<div class="legend"><span class="k-in">hub in</span><span class="k-out">hub out</span>
<span class="k-in sel" hidden>remote in</span><span class="k-out sel" hidden>remote out</span></div></div>
<div class="chart"><h3>Open connections</h3><svg id="chart-connections" role="img"
aria-label="open connections over the last 15 minutes"></svg>
<div class="legend"><span class="k-conns">hub</span><span class="k-conns sel" hidden>remote</span></div></div>
</div></section>
<section><h2>Remotes <span id="remote-count" class="count"></span></h2>
<div class="toolbar"><input id="filter" type="search" placeholder="filter by name"
maxlength="63" autocomplete="off" spellcheck="false" aria-label="filter remotes by name">
<div class="pager"><button id="prev" type="button">&lsaquo; prev</button>
<span id="page-info" class="info"></span><button id="next" type="button">next &rsaquo;</button></div></div>
<table><thead><tr><th>Name</th><th>Namespace</th><th>Address</th><th>Connected</th>
<th>Endpoints</th><th class="num">Conns</th><th class="num">In</th><th class="num">Out</th>
<th class="num">RTT</th></tr></thead><tbody id="remotes"></tbody></table></section>
<section id="cluster" hidden><h2>Hubs <span id="hub-count" class="count"></span></h2>
<table><thead><tr><th>Hub</th><th>Peer address</th><th class="num">Remote sessions</th></tr></thead>
<tbody id="hubs"></tbody></table></section>
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
