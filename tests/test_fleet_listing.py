"""
A hub holding a fleet: listing (``Sesame/ListRemotes`` + ``Admin/ListSessions`` over gRPC and
REST, ``sesame remotes``), ``/metrics`` and the dashboard stay small and complete when thousands
of remotes are connected (issue 10: the live state of every remote used to ride in one
``sesame-live`` header, which grpc refuses past 8-16 KiB, i.e. past ~50 remotes).

The module's hub holds :data:`N` real :class:`~sesame.remote.RemoteSession`\\ s, each on its own
TLS connection to an in-process hub (about 8 s to register 2,000 on 2 cores), plus remotes of a
second namespace and a remote with two sessions.  The size figures at 10,000 and 50,000 remotes
come from :func:`test_sizes_at_10000_remotes` and :func:`test_listing_50000_remotes`, which put
plain ``Session`` objects into a hub that does not listen (registering that many real remotes
in a test would take minutes and a few GiB).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
import pytest_twisted
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from sesame import _names as N
from sesame.admin.v1alpha1 import admin_pb2, admin_pb2_grpc
from sesame.bridge import to_deferred
from sesame.hub import Hub, Session, dashboard, mgmt
from sesame.hub._http import admin_root, admin_site
from sesame.hub.store import SQLiteStore
from sesame.remote import RemoteSession, agent_offers
from sesame.testing.hub import HubFixture, wait_registered
from sesame.tunnel import ServiceRegistry
from sesame.v1alpha1 import sesame_pb2, sesame_pb2_grpc

#: Real remotes registered with the module's hub (default namespace), and in namespace "lab".
REMOTES = 2000
LAB = 40
T = 30.0
HEADER_LIMIT = 8 * 1024

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using readBody with a transport:DeprecationWarning")


def name(i: int) -> str:
    return f"edge-{i:05d}"


@dataclass
class Fleet:
    fx: HubFixture
    http: int  # the --http site's port
    admin: str
    names: set[str]  # resource names of every registered remote
    sessions: int  # sessions registered

    @property
    def hub(self) -> Hub:
        return self.fx.hub

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.fx.ca_path.read_bytes())
        return grpc.secure_channel(self.fx.target, creds)

    def md(self, token: str | None = None) -> tuple:
        return (("authorization", f"Bearer {token or self.admin}"),)

    async def get(self, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
        h = Headers()
        h.addRawHeader(b"authorization", f"Bearer {token or self.admin}".encode())
        url = f"http://127.0.0.1:{self.http}{path}".encode()
        resp = await Agent(reactor).request(b"GET", url, h).addTimeout(T, reactor)
        body = await readBody(resp).addTimeout(T, reactor)
        heads = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, heads, body


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * (REMOTES + LAB) + 1024  # both ends of every remote's connection, and some
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files (RLIMIT_NOFILE hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fx = HubFixture(tmp_path_factory.mktemp("fleet"))
    pytest_twisted.blockon(fx.start())
    port = None
    try:
        store = fx.store
        offers = agent_offers([], reactor=reactor, bridge=fx.bridge)  # NetConn, dials nothing
        both = {**offers, "web": ServiceRegistry()}
        creds = fx.tls.channel_credentials(fx.tls.ca_pem)
        remotes = []
        for i in range(REMOTES):
            tok = store.create_token("remote", remote=name(i))[1]
            remotes.append(RemoteSession(fx.target, name(i), tok, both if i % 100 == 7 else offers,
                                         credentials=creds, bridge=fx.bridge))
        store.create_namespace("lab")
        for i in range(LAB):
            tok = store.create_token("remote", remote=f"lab-{i:03d}", namespace="lab")[1]
            remotes.append(RemoteSession(fx.target, f"namespaces/lab/remotes/lab-{i:03d}", tok,
                                         offers, credentials=creds, bridge=fx.bridge))
        # a second session of edge-00007: it takes over the endpoints it offers (netconn)
        remotes.append(RemoteSession(fx.target, name(7), remotes[7].token, offers,
                                     credentials=creds, bridge=fx.bridge))
        fx.remotes.extend(remotes)

        async def register() -> None:
            for r in remotes[:-1]:
                await r.astart()
            for r in remotes[:-1]:
                await wait_registered(r, 120)
            await remotes[-1].astart()
            await wait_registered(remotes[-1], 120)

        t0 = time.monotonic()
        pytest_twisted.blockon(to_deferred(fx.bridge.submit(register())))
        took = time.monotonic() - t0
        print(f"\n{len(remotes)} remote sessions registered in {took:.1f}s")
        port = reactor.listenTCP(0, admin_site(admin_root(fx.hub, store)), interface="127.0.0.1")
        names = {N.resource_name("default", name(i)) for i in range(REMOTES)} | {
            N.resource_name("lab", f"lab-{i:03d}") for i in range(LAB)}
        yield Fleet(fx, port.getHost().port, store.create_token("admin")[1], names, len(remotes))
    finally:
        if port is not None:
            pytest_twisted.blockon(port.stopListening())
        pytest_twisted.blockon(fx.stop())


def _metadata_bytes(md) -> int:
    return sum(len(k) + len(v) for k, v in md or ())


def _field(exc: grpc.RpcError) -> str:
    st = rpc_status.from_call(exc)
    assert st is not None, exc
    for d in st.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            return br.field_violations[0].field
    raise AssertionError(f"no BadRequest in {st}")


def _key(session_name: str) -> tuple[str, str, int]:
    parts = session_name.split("/")
    return (parts[1], parts[3], int(parts[5]))


def _list_all(fleet: Fleet, token: str | None = None, *, remotes_page: int = 0,
              **request) -> tuple[list, list, list]:
    """Every remote (ListRemotes, unless ``remotes_page`` is 0) and session (ListSessions)
    page by page: (remotes, sessions, sizes of every response's headers and trailers)."""
    heads: list[int] = []
    remotes: list = []
    sessions: list = []
    with fleet.channel() as ch:
        stub, admin = sesame_pb2_grpc.SesameStub(ch), admin_pb2_grpc.AdminStub(ch)
        req = sesame_pb2.ListRemotesRequest(page_size=remotes_page)
        while remotes_page:
            resp, call = stub.ListRemotes.with_call(req, metadata=fleet.md(token), timeout=T)
            heads += [_metadata_bytes(call.initial_metadata()),
                      _metadata_bytes(call.trailing_metadata())]
            remotes += resp.remotes
            if not resp.next_page_token:
                break
            req.page_token = resp.next_page_token
        sreq = admin_pb2.ListSessionsRequest(**request)
        while True:
            resp, call = admin.ListSessions.with_call(sreq, metadata=fleet.md(token), timeout=T)
            heads += [_metadata_bytes(call.initial_metadata()),
                      _metadata_bytes(call.trailing_metadata())]
            assert len(resp.sessions) <= (sreq.page_size or mgmt.DEFAULT_PAGE_SIZE)
            sessions += resp.sessions
            if not resp.next_page_token:
                break
            sreq.page_token = resp.next_page_token
    return remotes, sessions, heads


# --- listing ------------------------------------------------------------------------------------


def test_grpc_pages_carry_every_remote_and_its_live_state(fleet):
    remotes, sessions, heads = _list_all(fleet, remotes_page=500, page_size=500)
    assert {r.name for r in remotes} >= fleet.names
    assert max(heads) <= HEADER_LIMIT, max(heads)  # no header grows with the fleet
    by_remote: dict[str, list] = {}
    for s in sessions:
        by_remote.setdefault(s.name.rsplit("/sessions/", 1)[0], []).append(s)
    assert set(by_remote) == fleet.names  # every connected remote, across pages
    assert len(sessions) == fleet.sessions
    assert len({s.name for s in sessions}) == len(sessions)  # no session twice
    keys = [_key(s.name) for s in sessions]
    assert keys == sorted(keys)  # name order, page after page
    for rname, group in by_remote.items():
        served = sorted(ep for s in group for ep in s.endpoints)
        i = int(rname.rsplit("-", 1)[1]) if "/remotes/edge-" in rname else -1
        assert served == (["netconn", "web"] if i % 100 == 7 else ["netconn"]), rname
        for s in group:
            assert s.peer.startswith("127.0.0.1:") and s.connect_time.seconds > 0
    # edge-00007 has two sessions: the newer one took netconn over, the older keeps web
    old, new = by_remote[N.resource_name("default", name(7))]
    assert list(old.offered_endpoints) == ["netconn", "web"] and list(old.endpoints) == ["web"]
    assert list(new.offered_endpoints) == ["netconn"] and list(new.endpoints) == ["netconn"]
    # a page of 1000 sessions is a small message, whatever the fleet
    with fleet.channel() as ch:
        page = admin_pb2_grpc.AdminStub(ch).ListSessions(
            admin_pb2.ListSessionsRequest(page_size=1000), metadata=fleet.md(), timeout=T)
    assert len(page.sessions) == 1000 and page.ByteSize() < 200_000
    print(f"\nListSessions page of 1000: {page.ByteSize()} bytes; largest header block "
          f"{max(heads)} bytes")


def test_listing_scope_filter_and_client_tokens(fleet):
    fx = fleet.fx
    needle = "0012"
    want = {n for n in fleet.names if needle in n.rsplit("/", 1)[1]}
    _, sessions, _ = _list_all(fleet, filter=needle.upper(), page_size=3)  # any case
    assert {s.name.rsplit("/sessions/", 1)[0] for s in sessions} == want
    # one namespace, one remote
    _, lab, _ = _list_all(fleet, parent="namespaces/lab/remotes/-", page_size=7)
    assert len(lab) == LAB and all(s.name.startswith("namespaces/lab/") for s in lab)
    _, one, _ = _list_all(fleet, parent=f"namespaces/-/remotes/{name(7)}")
    assert len(one) == 2
    # a client token sees the remotes its pattern matches, in its own namespace only
    tok = fx.client_token("edge-01*")
    remotes, sessions, heads = _list_all(fleet, token=tok, remotes_page=100, page_size=100)
    want = {n for n in fleet.names if n.startswith("namespaces/default/remotes/edge-01")}
    assert {r.name for r in remotes} == want
    assert {s.name.rsplit("/sessions/", 1)[0] for s in sessions} == want
    _, none, _ = _list_all(fleet, token=tok, parent="namespaces/lab/remotes/-")
    assert none == []
    with fleet.channel() as ch, pytest.raises(grpc.RpcError) as e:
        admin_pb2_grpc.AdminStub(ch).ListSessions(
            admin_pb2.ListSessionsRequest(), metadata=fleet.md(fx.remote_token("x")), timeout=T)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bad_pages_and_filters_are_invalid_argument_naming_the_field(fleet):
    with fleet.channel() as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        first = admin.ListSessions(admin_pb2.ListSessionsRequest(page_size=2),
                                   metadata=fleet.md(), timeout=T)
        remotes = sesame_pb2_grpc.SesameStub(ch).ListRemotes(
            sesame_pb2.ListRemotesRequest(page_size=2), metadata=fleet.md(), timeout=T)
        bad = {
            "page_token": [dict(page_token="nope"), dict(page_token="!!!!"),
                           dict(page_token=remotes.next_page_token),  # another list's
                           dict(page_token=first.next_page_token, filter="edge"),  # other fields
                           dict(page_token=first.next_page_token[:-4])],
            "page_size": [dict(page_size=-1)],
            "filter": [dict(filter="a b"), dict(filter="x" * 64), dict(filter="é"),
                       dict(filter="edge*"), dict(filter="٢")],
            "parent": [dict(parent="namespaces/x"), dict(parent="namespaces/-/remotes/a b"),
                       dict(parent="remotes/-"), dict(parent="namespaces/-/remotes/-/sessions")],
        }
        for field, requests in bad.items():
            for kw in requests:
                with pytest.raises(grpc.RpcError) as e:
                    admin.ListSessions(admin_pb2.ListSessionsRequest(**kw), metadata=fleet.md(),
                                       timeout=T)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
                assert _field(e.value) == field, kw
        # the next page of the same request works
        nxt = admin.ListSessions(admin_pb2.ListSessionsRequest(
            page_size=2, page_token=first.next_page_token), metadata=fleet.md(), timeout=T)
        assert _key(nxt.sessions[0].name) > _key(first.sessions[-1].name)


@pytest_twisted.ensureDeferred
async def test_rest_sessions_and_dashboard_reject_bad_input_with_400(fleet):
    base = "/v1alpha1/namespaces/-/remotes/-/sessions"
    for query, field in (("pageSize=-1", "page_size"), ("pageSize=abc", "page_size"),
                         ("pageToken=zzz", "page_token"), ("filter=%20x", "filter"),
                         ("filter=" + "x" * 64, "filter"), ("bogus=1", "bogus")):
        code, _, body = await fleet.get(f"{base}?{query}")
        err = json.loads(body)["error"]
        assert code == 400 and err["status"] == "INVALID_ARGUMENT", (query, body)
        fields = [v["field"] for d in err["details"] for v in d.get("fieldViolations", ())]
        assert fields == [field], (query, err)
    for path, field in (("/dashboard/state?page_size=0", "page_size"),
                        ("/dashboard/state?page_size=101", "page_size"),
                        ("/dashboard/state?page_size=%C2%B2", "page_size"),
                        ("/dashboard/state?page=0", "page"), ("/dashboard/state?page=x", "page"),
                        ("/dashboard/state?filter=a%2Fb", "filter"),
                        ("/dashboard/state?pagesize=5", "pagesize"),
                        ("/dashboard/history?remote=edge-1", "remote"),
                        ("/dashboard/history?remote=default/a%20b", "remote")):
        code, heads, body = await fleet.get(path)
        err = json.loads(body)["error"]
        assert code == 400 and err["status"] == "INVALID_ARGUMENT", (path, body)
        fields = [v["field"] for d in err["details"] for v in d.get("fieldViolations", ())]
        assert fields == [field], (path, err)
        assert err["message"].startswith(field + ":")


@pytest_twisted.ensureDeferred
async def test_rest_pages_the_fleet(fleet):
    seen, sizes, page = [], [], ""
    while True:
        code, _, body = await fleet.get("/v1alpha1/namespaces/-/remotes/-/sessions?pageSize=1000"
                                        + (f"&pageToken={quote(page)}" if page else ""))
        assert code == 200, body
        sizes.append(len(body))
        got = json.loads(body)
        seen += [s["name"] for s in got["sessions"]]
        page = got.get("nextPageToken", "")
        if not page:
            break
    assert len(seen) == fleet.sessions == len(set(seen))
    assert {s.rsplit("/sessions/", 1)[0] for s in seen} == fleet.names
    assert max(sizes) < 400_000
    print(f"\nREST ListSessions pages of 1000: {max(sizes)} bytes at most ({len(sizes)} pages)")


def test_sesame_remotes_lists_the_fleet(fleet):
    env = {**os.environ, **fleet.fx.env(fleet.admin), "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sesame", "remotes", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    connected = {N.resource_name(r["namespace"], r["name"]): r for r in rows if r["connected"]}
    assert set(connected) == fleet.names
    assert connected[N.resource_name("default", name(7))]["endpoints"] == ["netconn", "web"]
    assert connected[N.resource_name("default", name(8))]["endpoints"] == ["netconn"]
    assert all(r["connected_since"] > 0 for r in connected.values())
    table = subprocess.run([sys.executable, "-m", "sesame", "remotes", "--namespace", "lab"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == LAB + 1 and "offline" not in table.stdout
    print(f"\nsesame remotes --json with {len(rows)} remotes: {took:.1f}s")


# --- /metrics and the dashboard -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_stay_small_and_per_remote_series_are_opt_in(fleet):
    code, _, body = await fleet.get("/metrics")
    assert code == 200
    assert len(body) < 16_000  # fleet-level: independent of the number of remotes
    assert b'remote="' not in body and b"sesame_hub_remote_" not in body
    assert f"sesame_hub_remotes_connected {len(fleet.names)}.0".encode() in body
    assert f"sesame_hub_sessions {fleet.sessions}.0".encode() in body
    code, _, top = await fleet.get("/metrics?remotes=10")
    assert code == 200 and top.count(b"sesame_hub_remote_sessions{") == 10
    code, _, every = await fleet.get("/metrics?remotes=all")
    assert code == 200 and every.count(b"sesame_hub_remote_sessions{") == len(fleet.names)
    print(f"\n/metrics with {len(fleet.names)} remotes: {len(body)} bytes "
          f"(?remotes=10: {len(top)}, ?remotes=all: {len(every)})")


@pytest_twisted.ensureDeferred
async def test_dashboard_polls_cost_a_page(fleet):
    total = len(fleet.names)
    code, _, body = await fleet.get("/dashboard/state")
    assert code == 200
    s = json.loads(body)
    assert s["totals"]["remotes"] == total and s["totals"]["sessions"] == fleet.sessions
    assert s["matching"] == total and s["pages"] == math.ceil(total / dashboard.DEFAULT_PAGE_SIZE)
    assert len(s["remotes"]) == dashboard.DEFAULT_PAGE_SIZE
    ids = [r["id"] for r in s["remotes"]]
    assert ids == sorted(ids) and ids[0] == f"default/{name(0)}"
    code, _, big = await fleet.get(f"/dashboard/state?page_size={dashboard.MAX_PAGE_SIZE}&page=2")
    s2 = json.loads(big)
    assert s2["page"] == 2 and s2["remotes"][0]["id"] == f"default/{name(100)}"
    assert len(big) <= 200_000
    code, _, last = await fleet.get("/dashboard/state?page=100000")  # past the end: the last
    assert json.loads(last)["page"] == s["pages"]
    code, _, narrow = await fleet.get("/dashboard/state?filter=EDGE-0012")
    got = json.loads(narrow)
    assert [r["name"] for r in got["remotes"]] == [name(i) for i in range(120, 130)]
    assert got["matching"] == 10 and got["pages"] == 1
    code, _, hist = await fleet.get(f"/dashboard/history?remote=default/{name(3)}")
    h = json.loads(hist)
    assert h["remote"]["id"] == f"default/{name(3)}" and len(hist) <= 200_000
    print(f"\ndashboard poll with {total} remotes: {len(body)} bytes (page of 50), {len(big)} "
          f"(page of 100), history {len(hist)} bytes")


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Sink(protocol.Protocol):
    def __init__(self):
        self.got = 0
        self.done = defer.Deferred()
        self.want = 0

    def dataReceived(self, data):
        self.got += len(data)
        if self.got >= self.want and not self.done.called:
            self.done.callback(self.got)


@pytest_twisted.ensureDeferred
async def test_dashboard_at_fleet_size_in_headless_chromium(fleet):
    """Totals, the filter, paging and the charts, in a real browser, against the fleet."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import ARTIFACTS, _browser

    fx, m = fleet.fx, fleet.hub.metrics
    echo = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(_Echo))
    busy = await fx.start_remote("busy-1", allow=[f"127.0.0.1:{echo.getHost().port}"])
    ep = endpoints.clientFromString(
        reactor, f"sesame:remote=busy-1:host=127.0.0.1:port={echo.getHost().port}:"
                 f"{fx.endpoint_kwargs(fx.client_token())}")
    conn = await ep.connect(protocol.Factory.forProtocol(_Sink)).addTimeout(T, reactor)
    for _ in range(3):  # three history points with traffic through busy-1
        conn.want += 200_000
        conn.transport.write(b"x" * 200_000)
        await conn.done.addTimeout(T, reactor)
        conn.done = defer.Deferred()
        m.sample()
    total = len(fleet.names) + 1
    order = [f"{ns}/{r}" for ns, r in m.fleet.view().keys]  # busy-1 sorts before edge-*
    assert len(order) == total
    size = dashboard.DEFAULT_PAGE_SIZE
    driver, profile = await threads.deferToThread(_browser)

    def wait(cond, what):
        return WebDriverWait(driver, T).until(cond, message=what)

    # read with one script each: the page re-renders every second, so elements go stale
    def value(id_):
        return driver.execute_script(
            "var e = document.getElementById(arguments[0]);"
            "return e ? e.getAttribute('data-value') : null;", id_)

    def rows():
        return driver.execute_script(
            "return Array.prototype.map.call(document.querySelectorAll('#remotes tr[data-id]'),"
            " function (e) { return e.getAttribute('data-id'); });")

    def page_info():
        got = driver.execute_script(
            "var e = document.getElementById('page-info');"
            "return [e.getAttribute('data-page'), e.getAttribute('data-pages')];")
        return int(got[0] or 0), int(got[1] or 0)

    def attr(css, name):
        return driver.execute_script(
            "var e = document.querySelector(arguments[0]);"
            "return e ? e.getAttribute(arguments[1]) : null;", css, name)

    def browse():
        driver.get(f"http://127.0.0.1:{fleet.http}/dashboard")
        wait(EC.visibility_of_element_located((By.ID, "token")), "token field")
        driver.find_element(By.ID, "token").send_keys(fleet.admin)
        driver.find_element(By.ID, "login-button").click()
        # totals
        wait(lambda d: value("total-remotes") == str(total), f"{total} remotes in the totals")
        assert value("total-sessions") == str(fleet.sessions + 1)
        assert value("total-connections") == "1"
        assert int(value("total-bytes-in")) >= 600_000 and int(value("total-bytes-out")) >= 600_000
        # one page of the table, and paging
        wait(lambda d: rows() == order[:size], "the first page")
        first = rows()
        assert page_info() == (1, math.ceil(total / size))
        driver.find_element(By.ID, "next").click()
        wait(lambda d: page_info()[0] == 2 and rows() == order[size:2 * size], "page 2")
        driver.find_element(By.ID, "prev").click()
        wait(lambda d: page_info()[0] == 1 and rows() == first, "back to page 1")
        # the filter narrows the table (and resets paging)
        driver.find_element(By.ID, "next").click()
        wait(lambda d: page_info()[0] == 2, "page 2 again")
        box = driver.find_element(By.ID, "filter")
        box.send_keys("0012")
        wait(lambda d: rows() == [f"default/{name(12)}"] + [f"default/{name(i)}"
                                                           for i in range(120, 130)],
             "the 11 remotes whose name contains 0012")
        assert page_info() == (1, 1)
        assert "11 of" in driver.find_element(By.ID, "remote-count").text
        box.clear()
        box.send_keys("busy")
        wait(lambda d: rows() == ["default/busy-1"], "busy-1 alone")
        # the charts: hub total, and the selected remote
        wait(lambda d: int(attr("#chart-throughput", "data-points") or 0) >= 3,
             "hub throughput points")
        driver.execute_script(
            "document.querySelector('tr[data-id=\"default/busy-1\"]').click();")
        wait(EC.text_to_be_present_in_element((By.ID, "chart-remote"), "default/busy-1"),
             "busy-1 selected")
        remote_in = '#chart-throughput polyline[data-series="remote-in"]'
        wait(lambda d: attr(remote_in, "points"), "busy-1's throughput line")
        points = [tuple(map(float, p.split(","))) for p in attr(remote_in, "points").split()]
        assert len(points) >= 3
        assert min(y for _, y in points) < 150  # above the zero line: bytes moved
        conns = attr('#chart-connections polyline[data-series="remote-conns"]', "points")
        assert len(conns.split()) >= 3
        # what the page fetched: every poll small
        polls = driver.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(function (e) { return e.name.indexOf('/dashboard/') >= 0; })"
            ".map(function (e) { return [e.name, e.encodedBodySize]; });")
        assert polls and max(size for _, size in polls) <= 200_000, polls
        ARTIFACTS.mkdir(exist_ok=True)
        driver.find_element(By.ID, "filter").clear()
        driver.find_element(By.ID, "filter").send_keys("edge-001")
        wait(lambda d: len(rows()) == size, "a page of edge-001*")
        assert driver.save_screenshot(str(ARTIFACTS / "dashboard-fleet.png"))
        return max(size for _, size in polls)

    try:
        biggest = await threads.deferToThread(browse)
        print(f"\nlargest dashboard poll in Chromium with {total} remotes: {biggest} bytes")
    finally:
        await threads.deferToThread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)
        conn.transport.loseConnection()
        await fx.stop_remote(busy)
        await echo.stopListening()


# --- bigger fleets: Session objects in a hub that does not listen --------------------------------


def _fake_fleet(tmp_path: Path, n: int, *, traffic: bool = False) -> Hub:
    """A hub whose ``sessions`` hold ``n`` plain :class:`Session` objects (no gRPC call behind
    them), registered the way :meth:`Hub.tunnel` registers them."""
    hub = Hub(SQLiteStore(tmp_path / "hub.db"))
    for i in range(n):
        s = Session(i + 1, "default", f"edge-{i:05d}", {"netconn"}, f"ipv4:10.{i >> 16}."
                    f"{(i >> 8) & 255}.{i & 255}:40000", None, since=1.8e9 + i)
        hub.sessions[s.id] = s
        hub.routes[("default", s.remote, "netconn")] = s
        if traffic:
            st = hub.metrics.open_connection("default", s.remote)
            st.bytes_in += 1000 + i
            st.bytes_out += 2000 + i
            hub.metrics.rtt("default", s.remote, 0.001)
            if i % 10:
                st.close()  # every tenth stays open
    return hub


def _run(coro):
    """Run a coroutine that never awaits (the management methods here) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine awaited something")


def test_sizes_at_10000_remotes(tmp_path):
    """/metrics ≤ 256 KB and a dashboard poll ≤ 200 KB at 10,000 remotes, every one with
    traffic and an RTT sample (the worst case for per-remote numbers)."""
    n = 10_000
    hub = _fake_fleet(tmp_path, n, traffic=True)
    m = hub.metrics
    for k in range(3):
        m.sample(now=time.time() + k)
    body, _ = m.render()
    assert len(body) <= 256_000
    assert b'remote="' not in body
    assert f"sesame_hub_remotes_connected {n}.0".encode() in body
    assert f"sesame_hub_connections_open {n // 10}.0".encode() in body
    everyone, _ = m.render(per_remote=None)
    assert everyone.count(b"sesame_hub_remote_sessions{") == n
    top, _ = m.render(per_remote=20)
    assert top.count(b"sesame_hub_remote_sessions{") == 20
    assert b'remote="edge-09999"' in top  # the busiest (most bytes) first
    poll = json.dumps(dashboard.state(hub, hub.store, page_size=dashboard.MAX_PAGE_SIZE),
                      separators=(",", ":")).encode()
    assert len(poll) <= 200_000
    small = json.dumps(dashboard.state(hub, hub.store), separators=(",", ":")).encode()
    hist = json.dumps(dashboard.history(hub, ("default", "edge-00042")),
                      separators=(",", ":")).encode()
    assert len(hist) <= 200_000
    state = json.loads(poll)
    assert state["totals"]["remotes"] == n and state["totals"]["connections"] == n // 10
    assert state["totals"]["bytes_in"] == sum(1000 + i for i in range(n))
    assert state["remotes"][0]["bytes_out"] == 2000 and state["remotes"][0]["rtt_ms"] == 1.0
    print(f"\n10,000 remotes: /metrics {len(body)} bytes (?remotes=all {len(everyone)}), "
          f"dashboard poll {len(small)} bytes (page of 50) / {len(poll)} (page of 100), "
          f"history {len(hist)} bytes")


def test_listing_50000_remotes(tmp_path):
    """ListSessions pages 50,000 sessions completely; each page is bounded work."""
    n = 50_000
    hub = _fake_fleet(tmp_path, n)
    api = mgmt.Management(hub, hub.store)
    admin = hub.store.verify(hub.store.create_token("admin")[1])
    client = hub.store.verify(hub.store.create_token("client", pattern="edge-4999*")[1])
    req = admin_pb2.ListSessionsRequest(page_size=1000)
    seen, worst, pages = [], 0.0, 0
    while True:
        t0 = time.perf_counter()
        resp = _run(api.list_sessions(req, admin))
        worst = max(worst, time.perf_counter() - t0)
        pages += 1
        seen += [s.name for s in resp.sessions]
        if not resp.next_page_token:
            break
        req.page_token = resp.next_page_token
    assert len(seen) == n == len(set(seen)) and pages == 50
    # a client token whose pattern matches 10 of them, at the end of the list
    req = admin_pb2.ListSessionsRequest(page_size=5)
    found, calls = [], 0
    while True:
        resp = _run(api.list_sessions(req, client))
        calls += 1
        found += [s.name.split("/")[3] for s in resp.sessions]
        if not resp.next_page_token:
            break
        req.page_token = resp.next_page_token
    assert found == [f"edge-4999{i}" for i in range(10)]
    # the dashboard's filter over 50,000
    t0 = time.perf_counter()
    got = dashboard.state(hub, hub.store, needle="edge-4999")
    took = time.perf_counter() - t0
    assert got["matching"] == 10
    print(f"\n50,000 sessions: 50 ListSessions pages, slowest {worst * 1000:.1f} ms; "
          f"pattern-limited client token {calls} calls; filtered dashboard poll "
          f"{took * 1000:.1f} ms")


def test_list_remotes_reads_the_store_once_per_listing(tmp_path):
    """ListRemotes' later pages come from the records its first page read (the store reads
    its whole table each time: 0.2-0.4 s at 50,000), so a listing costs one read, not one a
    page; a new listing reads again."""
    hub = Hub(SQLiteStore(tmp_path / "hub.db"))
    store = hub.store
    for i in range(2500):
        store.create_remote(f"edge-{i:05d}")
    reads = []
    real = store.list_remotes
    store.list_remotes = lambda ns=None: reads.append(ns) or real(ns)
    api = mgmt.Management(hub, store)
    admin = store.verify(store.create_token("admin")[1])

    def listing() -> list[str]:
        req, names = sesame_pb2.ListRemotesRequest(page_size=1000), []
        while True:
            resp = _run(api.list_remotes(req, admin))
            names += [r.name for r in resp.remotes]
            if not resp.next_page_token:
                return names
            req.page_token = resp.next_page_token

    first = listing()
    assert len(first) == 2500 == len(set(first)) and first == sorted(first)
    assert len(reads) == 1
    store.create_remote("edge-99999")
    assert listing()[-1] == "namespaces/default/remotes/edge-99999" and len(reads) == 2
