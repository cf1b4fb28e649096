"""
Hub observability: the metrics counters move as traffic flows through a real hub, ``/metrics``
and ``/dashboard/state`` need an admin token, and the dashboard page works in a real headless
Chromium (Debian ``chromium`` + ``chromium-driver``; ``.ci/run`` installs them).

The resources are served by their own twisted.web Site on 127.0.0.1 (``sesame.hub.dashboard.mount``
on a bare root), the hub is the in-process fixture, clients and remotes are real.  Selenium
blocks, so every browser step runs in a thread while the reactor serves the page.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from sesame.hub import dashboard
from sesame.netconn import NetConnError
from sesame.testing.hub import HubFixture, sesame_hub  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
T = 10.0
KEY = ("default", "edge-1")

# Agent/readBody: Twisted's own response transport proxy has no abortConnection.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using readBody with a transport:DeprecationWarning")


def within(d: defer.Deferred, timeout: float = T) -> defer.Deferred:
    return d.addTimeout(timeout, reactor)


# --- helpers ----------------------------------------------------------------------------


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Conn(protocol.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.lost = defer.Deferred()
        self._want = None

    def dataReceived(self, data):
        self.buf += data
        if self._want and len(self.buf) >= self._want[0]:
            d, self._want = self._want[1], None
            d.callback(bytes(self.buf))

    def until(self, n):
        d = defer.Deferred()
        self._want = (n, d)
        self.dataReceived(b"")
        return within(d)

    def connectionLost(self, reason):
        if self._want:
            d, self._want = self._want[1], None
            d.errback(reason)
        self.lost.callback(None)


class Web:
    """The dashboard resources on their own Site, and an HTTP client for them."""

    def __init__(self, fx: HubFixture, *, metrics_public: bool = False):
        self.fx = fx
        assert fx.store is not None
        self.admin = fx.store.create_token("admin")[1]
        self.root = resource.Resource()
        dashboard.mount(self.root, fx.hub, fx.store, metrics_public=metrics_public)
        self.port = None

    @classmethod
    def client(cls, port, admin: str) -> Web:
        """Just the HTTP client half, for a listener someone else started."""
        w = cls.__new__(cls)
        w.port, w.admin = port, admin
        return w

    async def start(self) -> Web:
        ep = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await within(ep.listen(server.Site(self.root)))
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def get(self, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
        h = Headers()
        if token is not None:
            h.addRawHeader(b"authorization", f"Bearer {token}".encode())
        resp = await within(Agent(reactor).request(b"GET", (self.base + path).encode(), h))
        body = await within(readBody(resp))
        heads = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, heads, body

    async def samples(self, query: str = "") -> dict[tuple[str, tuple], float]:
        code, heads, body = await self.get("/metrics" + query, self.admin)
        assert code == 200, body
        assert heads["content-type"].startswith("text/plain")
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def stop(self):
        if self.port is not None:
            await self.port.stopListening()


@pytest.fixture
def web(sesame_hub):  # noqa: F811
    w = pytest_twisted.blockon(defer.ensureDeferred(Web(sesame_hub).start()))
    yield w
    pytest_twisted.blockon(defer.ensureDeferred(w.stop()))


@pytest.fixture
def echo_port():
    f = protocol.Factory.forProtocol(Echo)
    port = pytest_twisted.blockon(
        endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f))
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


def client_ep(fx: HubFixture, token: str, port: int, remote: str = "edge-1"):
    return endpoints.clientFromString(
        reactor, f"sesame:remote={remote}:host=127.0.0.1:port={port}:{fx.endpoint_kwargs(token)}")


async def connect(fx: HubFixture, token: str, port: int) -> Conn:
    return await within(client_ep(fx, token, port).connect(protocol.Factory.forProtocol(Conn)))


def labels(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


# --- metrics ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_per_remote_equal_the_bytes_moved(sesame_hub, web, echo_port):  # noqa: F811
    fx, m = sesame_hub, sesame_hub.hub.metrics
    await fx.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    tok = fx.client_token()
    sizes = (1, 1000, 300_000)  # one chunk, one small message, several 256 KiB messages
    total = 0
    for n in sizes:
        conn = await connect(fx, tok, echo_port)
        data = os.urandom(n)
        conn.transport.write(data)
        assert await conn.until(n) == data
        total += n
        # counted while the connection is still open, not only when it ends
        await fx.wait_for(lambda t=total: m.bytes_by_remote().get(KEY) == (t, t),
                          what=f"{total} bytes each way counted live")
        s = await web.samples()
        assert s[("sesame_hub_connections_open", ())] == 1  # fleet-level by default
        s = await web.samples("?remotes=all")
        assert s[("sesame_hub_remote_connections_open",
                  labels(namespace="default", remote="edge-1", route=""))] == 1
        conn.transport.loseConnection()
        await within(conn.lost)
    await fx.wait_for(lambda: not m.open_connections(), what="connections closed")
    assert m.bytes_by_remote()[KEY] == (total, total)
    # the fleet-level series (the default): no label names a remote
    s = await web.samples()
    assert not [k for k in s if any(name in ("remote", "namespace", "route")
                                    for name, _ in k[1])], s.keys()
    for direction in ("in", "out"):
        assert s[("sesame_hub_bytes_total", labels(direction=direction))] == total
    assert s[("sesame_hub_connections_total", ())] == len(sizes)
    assert s[("sesame_hub_connections_open", ())] == 0
    assert s[("sesame_hub_remotes_connected", ())] == 1
    assert s[("sesame_hub_sessions", ())] == 1
    assert s[("sesame_hub_streams_open", ())] == 0
    # one RTT sample (Stream dial -> ack) per routed connection, each a positive duration
    assert s[("sesame_hub_tunnel_rtt_seconds_count", ())] == len(sizes)
    assert 0 < s[("sesame_hub_tunnel_rtt_seconds_sum", ())] < 3 * T
    assert m.last_rtt(*KEY) > 0
    # per-remote series on request: the same numbers by namespace, remote (and route)
    for query in ("?remotes=all", "?remotes=1"):
        s = await web.samples(query)
        one = labels(namespace="default", remote="edge-1")
        for direction in ("in", "out"):
            assert s[("sesame_hub_remote_bytes_total", labels(
                namespace="default", remote="edge-1", route="", direction=direction))] == total
        assert s[("sesame_hub_remote_connections_total",
                  labels(namespace="default", remote="edge-1", route=""))] == len(sizes)
        assert s[("sesame_hub_remote_sessions", one)] == 1
        assert s[("sesame_hub_remote_streams_open", one)] == 0
        assert s[("sesame_hub_remote_tunnel_rtt_seconds_count", one)] == len(sizes)
        assert 0 < s[("sesame_hub_remote_tunnel_rtt_seconds_sum", one)] < 3 * T
    s = await web.samples("?remotes=0")
    assert ("sesame_hub_remote_sessions", one) not in s
    for bad in ("?remotes=-1", "?remotes=x", "?remotes=%C2%B2", "?remote=all", "?remotes=1e3"):
        code, _, body = await web.get("/metrics" + bad, web.admin)
        assert code == 400 and (b"remotes" in body or b"remote:" in body), (bad, body)


@pytest_twisted.ensureDeferred
async def test_wrong_tokens_count_as_auth_failures(sesame_hub, web, echo_port):  # noqa: F811
    fx, m = sesame_hub, sesame_hub.hub.metrics
    await fx.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    assert m.auth_failures() == {}
    bogus = "ses_0123456789ab_" + "x" * 43
    with pytest.raises(NetConnError) as info:
        await connect(fx, bogus, echo_port)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert m.auth_failures() == {"client": 1}
    # a client token limited to other remotes: permission denied counts too
    with pytest.raises(NetConnError) as info:
        await connect(fx, fx.client_token("other-*"), echo_port)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert m.auth_failures() == {"client": 2}
    from sesame.testing.hub import RemoteRefused

    with pytest.raises(RemoteRefused):
        await fx.start_remote("edge-2", token=bogus)
    await fx.stop_remote(fx.remotes[-1])  # before its backoff retries
    refused = m.auth_failures()["remote"]
    assert refused >= 1
    # a wrong admin token on the HTTP side
    code, heads, _ = await web.get("/metrics", fx.client_token())
    assert code == 401 and heads["www-authenticate"].startswith("Bearer")
    s = await web.samples()
    assert s[("sesame_hub_auth_failures_total", labels(kind="client"))] == 2
    assert s[("sesame_hub_auth_failures_total", labels(kind="remote"))] == refused
    assert s[("sesame_hub_auth_failures_total", labels(kind="admin"))] == 1
    # and the secret never reaches the dashboard's error list
    code, _, body = await web.get("/dashboard/state", web.admin)
    assert code == 200
    assert bogus.encode() not in body and b"auth:client" in body


@pytest_twisted.ensureDeferred
async def test_denied_address_counts_a_dial_error(sesame_hub, web, echo_port):  # noqa: F811
    fx, m = sesame_hub, sesame_hub.hub.metrics
    await fx.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    other = 1 if echo_port != 1 else 2
    with pytest.raises(NetConnError) as info:
        await connect(fx, fx.client_token(), other)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    await fx.wait_for(lambda: m.dial_errors() == {"PERMISSION_DENIED": 1}, what="dial error")
    with pytest.raises(NetConnError) as info:
        await within(client_ep(fx, fx.client_token(), echo_port, remote="edge-9").connect(
            protocol.Factory.forProtocol(Conn)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert m.dial_errors() == {"PERMISSION_DENIED": 1, "UNAVAILABLE": 1}
    s = await web.samples()
    assert s[("sesame_hub_dial_errors_total", labels(code="PERMISSION_DENIED"))] == 1
    assert s[("sesame_hub_dial_errors_total", labels(code="UNAVAILABLE"))] == 1
    code, _, body = await web.get("/dashboard/state", web.admin)
    errors = json.loads(body)["recent_errors"]
    assert [e["code"] for e in errors] == ["UNAVAILABLE", "PERMISSION_DENIED"]  # newest first
    assert errors[1]["remote"] == "edge-1"
    assert f"127.0.0.1:{other} is not allowed" in errors[1]["message"]
    assert errors[0] == {**errors[0], "remote": "edge-9", "message": "remote edge-9 is not connected"}


@pytest_twisted.ensureDeferred
async def test_metrics_and_state_need_an_admin_token(sesame_hub, web):  # noqa: F811
    fx = sesame_hub
    for path in ("/metrics", "/dashboard/state", "/dashboard/history"):
        for token in (None, "nonsense", fx.client_token(), fx.remote_token("edge-1")):
            code, heads, body = await web.get(path, token)
            assert code == 401, (path, token, body)
            assert heads["www-authenticate"] == 'Bearer realm="sesame hub"'
            assert b"sesame_hub" not in body
        code, _, body = await web.get(path, web.admin)
        assert code == 200
    # the page itself holds no data and loads without a token
    code, heads, body = await web.get("/dashboard")
    assert code == 200 and heads["content-type"].startswith("text/html")
    assert b"<script" in body and b"src=" not in body  # self-contained
    assert "script-src 'sha256-" in heads["content-security-policy"]
    # a revoked admin token stops working at once
    fx.revoke(web.admin)
    assert (await web.get("/metrics", web.admin))[0] == 401


@pytest_twisted.ensureDeferred
async def test_metrics_public_serves_metrics_without_a_token(sesame_hub):  # noqa: F811
    w = await Web(sesame_hub, metrics_public=True).start()
    try:
        code, _, body = await w.get("/metrics")
        assert code == 200 and b"sesame_hub_remotes_connected 0.0" in body
        assert (await w.get("/dashboard/state"))[0] == 401  # the dashboard still needs it
    finally:
        await w.stop()


def test_two_hubs_in_one_process_keep_separate_counters(tmp_path):
    from sesame.hub import Hub
    from sesame.hub.store import SQLiteStore

    a, b = (Hub(SQLiteStore(tmp_path / f"{n}.db")) for n in "ab")
    a.metrics.add_bytes("default", "edge-1", "r1", "in", 5)
    a.metrics.auth_failure("admin")
    assert b"sesame_hub_auth_failures_total{kind=\"admin\"} 1.0" in a.metrics.render()[0]
    assert b"auth_failures_total{" not in b.metrics.render()[0]
    assert b"route=\"r1\"" not in a.metrics.render()[0]  # per-remote series: opt-in
    assert b"route=\"r1\"" in a.metrics.render(per_remote=None)[0]
    assert b"route=\"r1\"" not in b.metrics.render(per_remote=None)[0]
    with pytest.raises(ValueError):
        a.metrics.add_bytes("default", "edge-1", "", "sideways", 1)


def test_history_rates_come_from_the_samples(tmp_path):
    from sesame.hub import Hub
    from sesame.hub.store import SQLiteStore

    m = Hub(SQLiteStore(tmp_path / "h.db")).metrics
    m._created = 100.0
    assert m.history.series() == {"t": [], "in": [], "out": [], "conns": [], "remotes": [],
                                  "sessions": []}
    m.add_bytes("default", "edge-1", "", "in", 1000)
    st = m.open_connection("default", "edge-1")
    st.bytes_out += 500  # live bytes count before the connection closes
    m.sample(now=101.0)  # 1 s since the metrics were made
    assert m.history.latest(KEY) == (1000.0, 500.0)
    st.bytes_out += 500
    st.close()
    st.close()  # idempotent
    assert m.bytes_by_remote()[KEY] == (1000, 1000)
    m.sample(now=103.0)
    assert m.history.latest(KEY) == (0.0, 250.0)  # 500 bytes over 2 s
    m.sample(now=105.0)
    assert m.history.latest(KEY) == (0.0, 0.0)  # idle: every active remote is in the sample
    hub = m.history.series()
    assert hub["t"] == [101.0, 103.0, 105.0]
    assert hub["in"] == [1000.0, 0.0, 0.0] and hub["out"] == [500.0, 250.0, 0.0]
    assert hub["conns"] == [1, 0, 0]
    assert m.history.series(KEY) == {"t": [101.0, 103.0, 105.0], "in": [1000.0, 0.0, 0.0],
                                     "out": [500.0, 250.0, 0.0], "conns": [1, 0, 0]}
    assert m.totals() == {"connections_total": 1, "connections": 0, "bytes_in": 1000,
                          "bytes_out": 1000}


def test_history_is_a_ring_that_keeps_the_busiest_and_the_watched():
    from sesame.hub.metrics import WATCH_MAX, History

    h = History(interval=5.0, span=60.0, per_sample=3)
    assert h.samples.maxlen == 12
    busy = {("default", f"r{i}"): (float(i), 0.0, 0) for i in range(10)}
    h.watch(("default", "r0"), now=0.0)  # the idlest, but watched
    for n in range(20):
        h.add(float(n), (0.0, 0.0, 0, 10, 10), busy, h.watched(float(n)))
    assert len(h.samples) == 12  # a ring: the oldest went
    s = h.samples[-1]
    assert not s.complete and set(s.keys) == {("default", k) for k in ("r0", "r9", "r8", "r7")}
    assert h.latest(("default", "r9")) == (9.0, 0.0)
    assert h.latest(("default", "r0")) == (0.0, 0.0)  # watched: known
    assert h.latest(("default", "r5")) is None  # not kept in an incomplete sample: unknown
    assert h.series(("default", "r5"))["in"] == [None] * 12
    for i in range(WATCH_MAX + 5):
        h.watch(("default", f"w{i}"), now=100.0)
    assert len(h.watched(100.0)) == WATCH_MAX
    assert h.watched(100.0 + h.span + 1) == set()  # watches expire
    with pytest.raises(ValueError):
        History(interval=0)


def test_sampling_runs_on_the_clock_and_stops(tmp_path):
    from twisted.internet.task import Clock

    from sesame.hub import Hub
    from sesame.hub.store import SQLiteStore

    m = Hub(SQLiteStore(tmp_path / "h.db")).metrics
    clock = Clock()
    m.start_sampling(clock)
    m.start_sampling(clock)  # idempotent
    clock.pump([m.history.interval] * 3)
    assert [s.time for s in m.history.samples] == [5.0, 10.0, 15.0]
    m.stop_sampling()
    clock.pump([m.history.interval] * 3)
    assert len(m.history.samples) == 3 and not clock.getDelayedCalls()


def test_counters_of_remotes_long_gone_are_dropped(tmp_path):
    import time as _time

    from sesame.hub import Hub
    from sesame.hub.store import SQLiteStore

    m = Hub(SQLiteStore(tmp_path / "h.db")).metrics
    for i in range(100):
        st = m.open_connection("default", f"gone-{i}")
        st.bytes_in += 10
        st.close()
        m.rtt("default", f"gone-{i}", 0.001)
    assert len(m.bytes_by_remote()) == 100
    with m._lock:  # as if their last traffic was longer ago than the history's span
        for k in m._last_active:
            m._last_active[k] = _time.monotonic() - m.history.span - 1
    for n in range(12):
        m.sample(now=1000.0 + n)
    assert m.bytes_by_remote() == {} and m.last_rtt("default", "gone-1") is None
    assert m.totals()["bytes_in"] == 1000  # the fleet totals keep their bytes
    assert m.totals()["connections_total"] == 100


# --- the page in a real browser -----------------------------------------------------------


def _browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs Debian chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "apt-get install -y chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    profile = Path(ARTIFACTS / "chromium-profile")
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts), profile


@pytest_twisted.ensureDeferred
async def test_dashboard_in_headless_chromium(sesame_hub, web, echo_port):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    fx = sesame_hub
    driver, profile = await threads.deferToThread(_browser)
    row = (By.CSS_SELECTOR, 'tr[data-id="default/edge-1"]')

    def wait(cond, what):
        return WebDriverWait(driver, T).until(cond, message=what)

    def login(token):
        wait(EC.visibility_of_element_located((By.ID, "token")), "token field")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "login-button").click()

    def wrong_token_then_admin():
        driver.get(web.base + "/dashboard")
        login("ses_0123456789ab_" + "y" * 43)
        wait(EC.text_to_be_present_in_element((By.ID, "login-error"), "refused"), "refusal shown")
        assert driver.execute_script("return sessionStorage.getItem('sesame-admin-token')") is None
        login(web.admin)
        wait(EC.visibility_of_element_located((By.ID, "board")), "the board")
        wait(EC.text_to_be_present_in_element((By.ID, "remotes"), "no remotes connected"),
             "an empty remote list")

    def cells():
        return [td.text for td in driver.find_element(*row).find_elements(By.TAG_NAME, "td")]

    try:
        await threads.deferToThread(wrong_token_then_admin)
        assert fx.hub.metrics.auth_failures() == {"admin": 1}
        session = await fx.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
        await threads.deferToThread(wait, EC.presence_of_element_located(row), "edge-1 appears")
        got = await threads.deferToThread(cells)
        assert got[:2] == ["edge-1", "default"]
        assert got[2].startswith("127.0.0.1:")  # the remote's address as the hub sees it
        assert got[4] == "netconn"
        # a live connection shows in the row, and reloading keeps the token (sessionStorage)
        conn = await connect(fx, fx.client_token(), echo_port)
        conn.transport.write(b"x" * 100_000)
        await conn.until(100_000)

        def reload_and_see_connection():
            driver.refresh()
            wait(lambda d: d.find_elements(*row) and cells()[5] == "1", "1 open connection")
            assert driver.find_element(By.ID, "login").is_displayed() is False
            ARTIFACTS.mkdir(exist_ok=True)
            assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        await threads.deferToThread(reload_and_see_connection)
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 1000
        conn.transport.loseConnection()
        await within(conn.lost)
        await fx.stop_remote(session)
        await threads.deferToThread(
            wait, lambda d: not d.find_elements(*row), "edge-1 disappears")
        assert "no remotes connected" in await threads.deferToThread(
            lambda: driver.find_element(By.ID, "remotes").text)
    finally:
        await threads.deferToThread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)



@pytest.mark.parametrize("public", [False, True])
@pytest_twisted.ensureDeferred
async def test_hub_http_listener_serves_dashboard_and_metrics(tmp_path: Path, public: bool):
    """``sesame hub --http ... [--metrics-public]``: the operator site mounts these pages."""
    from sesame import tap

    args = ["--no-tls", "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", str(tmp_path),
            "--http", "tcp:0:interface=127.0.0.1"]
    opts = tap.HubOptions()
    opts.parseOptions(args + (["--metrics-public"] if public else []))
    svc = tap.HubService(opts)
    svc.startService()
    try:
        await within(svc.ready)
        port = await within(svc.http_ready)
        w = Web.client(port, svc.hub.store.create_token("admin")[1])  # the hub's own listener
        code, _, body = await w.get("/metrics")
        assert code == (200 if public else 401)
        assert (b"sesame_hub_remotes_connected 0.0" in body) is public
        assert (await w.get("/dashboard/state"))[0] == 401
        code, _, body = await w.get("/dashboard/state", w.admin)
        assert code == 200 and json.loads(body)["remotes"] == []
        code, heads, _ = await w.get("/dashboard")
        assert code == 200 and heads["content-type"].startswith("text/html")
        assert (await w.samples())[("sesame_hub_remotes_connected", ())] == 0
    finally:
        await svc.stopService()
