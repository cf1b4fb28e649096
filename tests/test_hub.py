"""
The hub, the remote agent and the ``sesame:`` endpoints in one process:
real grpcio, real TLS, real sockets on 127.0.0.1.  Built on the public
:mod:`sesame.testing.hub` helpers (which these tests exercise too).

Nothing sleeps: every wait is on a Deferred or a hub-state predicate, with a
timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, interfaces, protocol, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin, getPlugins
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from zope.interface.verify import verifyObject

from sesame.hub.tls import ensure_hub_tls
from sesame.netconn import NetConnError
from sesame.remote import FixedTargetServicer, agent_offers, netconn_registry
from sesame.testing import hub as testing_hub
from sesame.testing.hub import HubFixture, RemoteRefused, escape

sesame_hub = testing_hub.sesame_hub  # the public pytest fixture (users import it in conftest.py)

ROOT = Path(__file__).resolve().parent.parent
T = 10.0  # upper bound for anything that should happen promptly


# --- helpers --------------------------------------------------------------------------


def within(d: defer.Deferred, timeout: float = T) -> defer.Deferred:
    return d.addTimeout(timeout, reactor)


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.lost = defer.Deferred()
        self.factory.conns.append(self)

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


class EchoFactory(protocol.Factory):
    protocol = Echo

    def __init__(self):
        self.conns: list[Echo] = []


class Conn(protocol.Protocol):
    """Collects what arrives; ``until(n)`` fires once ``n`` bytes are in; ``lost`` at the end."""

    def __init__(self):
        self.buf = bytearray()
        self.lost = defer.Deferred()
        self._want: tuple[int, defer.Deferred] | None = None

    def dataReceived(self, data):
        self.buf += data
        self._check()

    def _check(self):
        if self._want and len(self.buf) >= self._want[0]:
            _, d = self._want
            self._want = None
            d.callback(bytes(self.buf))

    def until(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        self._want = (n, d)
        self._check()
        return within(d)

    def connectionLost(self, reason):
        if self._want:
            _, d = self._want
            self._want = None
            d.errback(reason)
        self.lost.callback(reason.value)  # the exception, as a result (not a failure)


async def roundtrip(conn: Conn, payload: bytes = b"ping") -> None:
    """Write ``payload`` on a live echo connection and check it comes back."""
    start = len(conn.buf)
    conn.transport.write(payload)
    got = await conn.until(start + len(payload))
    assert got[start:] == payload


def client_ep(hub: HubFixture, token: str, remote: str = "edge-1", **kw: object):
    keys = ":".join(f"{k}={escape(str(v))}" for k, v in kw.items())
    return endpoints.clientFromString(
        reactor, f"sesame:remote={remote}:{keys}:{hub.endpoint_kwargs(token)}")


async def connect(hub: HubFixture, token: str, remote: str = "edge-1", **kw: object) -> Conn:
    return await within(client_ep(hub, token, remote, **kw).connect(
        protocol.Factory.forProtocol(Conn)))


async def refused(hub: HubFixture, token: str, remote: str = "edge-1", **kw: object) -> NetConnError:
    with pytest.raises(NetConnError) as info:
        await connect(hub, token, remote, **kw)
    return info.value


class Page(resource.Resource):
    isLeaf = True

    def __init__(self, text: bytes):
        super().__init__()
        self.text = text

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return self.text


class _EndpointFactory:
    def __init__(self, ep):
        self.ep = ep

    def endpointForURI(self, uri):
        return self.ep


async def fetch(hub: HubFixture, token: str, remote: str = "edge-1", endpoint: str = "web",
                path: bytes = b"/") -> tuple[int, bytes]:
    """GET over HTTP/1.1 with twisted.web's Agent, connecting through the hub."""
    agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(
        client_ep(hub, token, remote, endpoint=endpoint)))
    response = await within(agent.request(b"GET", b"http://" + remote.encode() + path))
    body = await within(readBody(response))
    return response.code, body


@pytest.fixture
def echo_factory():
    return EchoFactory()


@pytest.fixture
def echo_port(echo_factory):
    port = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    listening = pytest_twisted.blockon(port.listen(echo_factory))
    yield listening.getHost().port
    pytest_twisted.blockon(listening.stopListening())


def serve_web(hub: HubFixture, token: str, text: bytes, remote: str = "edge-1",
              endpoint: str = "web") -> defer.Deferred:
    ep = endpoints.serverFromString(
        reactor, f"sesame:remote={remote}:endpoint={endpoint}:{hub.endpoint_kwargs(token)}")
    return within(ep.listen(server.Site(Page(text))))


# --- data path ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_forward_16mib_echo_sha256(sesame_hub, echo_port):
    await sesame_hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    conn = await connect(sesame_hub, sesame_hub.client_token(), host="127.0.0.1", port=echo_port)
    data = os.urandom(16 * 1024 * 1024)
    conn.transport.write(data)
    got = await within(conn.until(len(data)), 30)
    assert len(got) == len(data)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    conn.transport.loseConnection()
    await within(conn.lost)


# Agent/readBody: Twisted's own response transport proxy has no abortConnection.
@pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_server_endpoint_serves_twisted_web_and_stop_unregisters(sesame_hub):
    hub = sesame_hub
    await hub.start_remote("edge-1")  # the agent: keeps edge-1 connected, offers netconn
    rtok, ctok = hub.remote_token("edge-1"), hub.client_token()
    port = await serve_web(hub, rtok, b"hello through sesame")
    assert verifyObject(interfaces.IListeningPort, port)
    host = port.getHost()
    assert (host.hub, host.remote, host.endpoint) == (
        hub.target, "namespaces/default/remotes/edge-1", "web")
    assert hub.routed("edge-1", "web")

    code, body = await fetch(hub, ctok)
    assert (code, body) == (200, b"hello through sesame")
    code, body = await fetch(hub, ctok, path=b"/again")  # a second connection
    assert (code, body) == (200, b"hello through sesame")

    await within(port.stopListening())
    assert not hub.routed("edge-1", "web"), "stopListening fires once the hub has unregistered"
    assert hub.routed("edge-1", "netconn"), "the agent's session must be untouched"
    err = await refused(hub, ctok, endpoint="web")
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "does not offer endpoint 'web'" in err.details


@pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_sessions_share_a_remote_and_a_new_session_takes_over_an_endpoint(
        sesame_hub, echo_port):
    hub = sesame_hub
    ctok = hub.client_token()
    # "Process" 1: the agent offering netconn and, like an old web server, "web".
    old_web = await within(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
                           .listen(server.Site(Page(b"old"))))
    try:
        offers = {
            **agent_offers([f"127.0.0.1:{echo_port}"], reactor=reactor),  # "netconn"
            "web": netconn_registry(FixedTargetServicer(f"127.0.0.1:{old_web.getHost().port}",
                                                        reactor=reactor)),
        }
        old = await hub.start_remote("edge-1", offers=offers)
        assert await fetch(hub, ctok) == (200, b"old")
        live = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
        await roundtrip(live)
        old_http = await connect(hub, ctok, endpoint="web")  # an HTTP/1.1 keep-alive connection

        # "Process" 2: a server endpoint offering "web" with edge-1's (own) token.
        new_port = await serve_web(hub, hub.remote_token("edge-1"), b"new")
        sessions = [s for s in hub.hub.connected() if s.remote == "edge-1"]
        assert len(sessions) == 2
        assert hub.hub.routes[("default", "edge-1", "web")] is not hub.hub.routes[
            ("default", "edge-1", "netconn")]
        for _ in range(3):
            assert await fetch(hub, ctok) == (200, b"new")
        # the old session keeps its other endpoint and its live connection
        assert old.registered.is_set() and old.registrations == 1
        await roundtrip(live, b"still here")
        old_http.transport.write(b"GET / HTTP/1.1\r\nHost: edge-1\r\n\r\n")
        reply = await old_http.until(1)
        while b"\r\n\r\nold" not in reply:
            reply = await old_http.until(len(reply) + 1)
        assert reply.startswith(b"HTTP/1.1 200"), reply  # served by the old session, unharmed
        old_http.transport.loseConnection()
        await within(old_http.lost)
        again = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
        await roundtrip(again)
        again.transport.loseConnection()

        # the taker-over leaving does not hand "web" back (the old session yielded it)
        await within(new_port.stopListening())
        assert not hub.routed("edge-1", "web")
        await roundtrip(live, b"and still")
        live.transport.loseConnection()
        await within(live.lost)
    finally:
        await old_web.stopListening()


# --- refusals -------------------------------------------------------------------------


class World:
    """One hub with edge-1's agent and an echo connection that every refusal must spare."""

    hub: HubFixture
    echo_port: int
    live: Conn
    agent: object
    ctok: str


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World()
    w.hub = HubFixture(tmp_path_factory.mktemp("world"))
    pytest_twisted.blockon(w.hub.start())
    echo = pytest_twisted.blockon(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
                                  .listen(EchoFactory()))
    w.echo_port = echo.getHost().port
    w.agent = pytest_twisted.blockon(
        w.hub.start_remote("edge-1", allow=[f"127.0.0.1:{w.echo_port}"]))
    w.ctok = w.hub.client_token()
    w.live = pytest_twisted.blockon(defer.ensureDeferred(
        connect(w.hub, w.ctok, host="127.0.0.1", port=w.echo_port)))
    try:
        yield w
        # everything refused along the way left the live connection alone
        pytest_twisted.blockon(defer.ensureDeferred(roundtrip(w.live, b"the end")))
    finally:
        w.live.transport.loseConnection()
        pytest_twisted.blockon(within(w.live.lost))
        pytest_twisted.blockon(w.hub.stop())
        pytest_twisted.blockon(echo.stopListening())


async def still_fine(w: World) -> None:
    await roundtrip(w.live, os.urandom(1000))
    assert w.hub.routed("edge-1") and w.agent.registrations == 1
    fresh = await connect(w.hub, w.ctok, host="127.0.0.1", port=w.echo_port)
    await roundtrip(fresh)
    fresh.transport.loseConnection()
    await within(fresh.lost)


@pytest_twisted.ensureDeferred
async def test_wrong_token_unauthenticated(world):
    bogus = "ses_0123456789ab_" + "x" * 43
    for token in (bogus, "not-a-token"):
        err = await refused(world.hub, token, host="127.0.0.1", port=world.echo_port)
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.details == "missing, invalid or revoked token"
    with pytest.raises(RemoteRefused, match="UNAUTHENTICATED: missing, invalid or revoked token"):
        await world.hub.start_remote("edge-1", allow=["*:*"], token=bogus)
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_revoked_token_refused_at_the_next_call(world):
    tok = world.hub.client_token()
    ok = await connect(world.hub, tok, host="127.0.0.1", port=world.echo_port)
    await roundtrip(ok)
    assert world.hub.revoke(tok)
    err = await refused(world.hub, tok, host="127.0.0.1", port=world.echo_port)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.details
    ok.transport.loseConnection()
    await within(ok.lost)
    # a revoked remote token cannot register either
    rtok = world.hub.remote_token("edge-1")
    world.hub.revoke(rtok)
    with pytest.raises(RemoteRefused, match="UNAUTHENTICATED"):
        await world.hub.start_remote("edge-1", token=rtok)
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_a_live_token_is_verified_once_then_served_from_the_cache(world):
    """A client's second connection costs no KDF: the hub verified its token once.  Any
    change to the store empties the cache (the next call verifies again)."""
    store = world.hub.store
    calls: list[str] = []
    real = store.verify

    def counting(token):
        calls.append(token)
        return real(token)

    store.verify = counting
    try:
        tok = world.hub.client_token()  # a store change: the cache starts empty
        for _ in range(3):
            c = await connect(world.hub, tok, host="127.0.0.1", port=world.echo_port)
            await roundtrip(c)
            c.transport.loseConnection()
            await within(c.lost)
        assert calls.count(tok) == 1
        world.hub.client_token()  # another change: verified again at the next call
        c = await connect(world.hub, tok, host="127.0.0.1", port=world.echo_port)
        await roundtrip(c)
        c.transport.loseConnection()
        await within(c.lost)
        assert calls.count(tok) == 2
    finally:
        del store.verify
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_revoking_a_live_remotes_token_ends_its_session(world):
    rtok = world.hub.remote_token("edge-9")
    session = await world.hub.start_remote("edge-9", allow=[f"127.0.0.1:{world.echo_port}"],
                                           token=rtok)
    ok = await connect(world.hub, world.ctok, remote="edge-9", host="127.0.0.1",
                       port=world.echo_port)
    await roundtrip(ok)
    ok.transport.loseConnection()
    await within(ok.lost)
    assert world.hub.revoke(rtok)
    # the hub ends the session by itself (it watches the store), no call needed
    await world.hub.wait_for(lambda: not world.hub.routed("edge-9"), timeout=2)
    err = await refused(world.hub, world.ctok, remote="edge-9", host="127.0.0.1",
                        port=world.echo_port)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.details == "remote edge-9 is not connected"
    await world.hub.wait_for(lambda: "revoked" in (session.last_error or ""),
                             what="edge-9 to hear why")
    await world.hub.stop_remote(session)
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_wrong_ca_fails_tls(world, tmp_path):
    other = ensure_hub_tls(tmp_path / "other", ["127.0.0.1"])
    ep = endpoints.clientFromString(
        reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={world.echo_port}:"
        f"hub={escape(world.hub.target)}:ca={escape(str(other.ca_path))}:token={world.ctok}")
    with pytest.raises(NetConnError) as info:
        await within(ep.connect(protocol.Factory.forProtocol(Conn)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_name_hijack_permission_denied(world):
    edge2 = world.hub.remote_token("edge-2")
    with pytest.raises(RemoteRefused) as info:
        await world.hub.start_remote("edge-1", allow=["*:*"], token=edge2)
    assert ("PERMISSION_DENIED: this token may not register remote "
            "namespaces/default/remotes/edge-1") in str(info.value)
    # nor through a server endpoint string
    with pytest.raises(ConnectionRefusedError, match="PERMISSION_DENIED"):
        await serve_web(world.hub, edge2, b"hijacked")
    assert not world.hub.routed("edge-1", "web")
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_client_token_for_another_remote_permission_denied(world):
    tok = world.hub.client_token(pattern="edge-2*")
    err = await refused(world.hub, tok, host="127.0.0.1", port=world.echo_port)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.details == "this token may not reach remote namespaces/default/remotes/edge-1"
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_denied_address_permission_denied(world):
    other = 1 if world.echo_port != 1 else 2
    err = await refused(world.hub, world.ctok, host="127.0.0.1", port=other)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"127.0.0.1:{other} is not allowed" in err.details
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_remote_not_connected_unavailable(world):
    err = await refused(world.hub, world.ctok, remote="edge-9", host="127.0.0.1", port=22)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.details == "remote edge-9 is not connected"
    await still_fine(world)


@pytest_twisted.ensureDeferred
async def test_unknown_endpoint_unavailable(world):
    err = await refused(world.hub, world.ctok, endpoint="nope")
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.details == "remote edge-1 does not offer endpoint 'nope'"
    await still_fine(world)


# --- hub restart ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hub_restart_remote_reregisters_and_open_connection_fails_cleanly(
        sesame_hub, echo_port, echo_factory):
    hub = sesame_hub
    agent = await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    ctok = hub.client_token()
    across = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
    await roundtrip(across)
    port = hub.port

    # abrupt stop (every call ends at once), then a new Hub on the same port, store and TLS
    await hub.restart_hub(grace=None)
    restarted = time.monotonic()
    assert hub.port == port
    reason = await within(across.lost)  # the connection open across it ends, no hang
    assert isinstance(reason, ConnectionLost) and "UNAVAILABLE" in str(reason), reason
    [target_side] = echo_factory.conns
    await within(target_side.lost)  # and the remote closed its end at the target
    await hub.wait_for(lambda: agent.registrations >= 2 and agent.registered.is_set()
                       and hub.routed("edge-1"), timeout=5.0, what="re-registration")
    assert time.monotonic() - restarted < 5.0
    fresh = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
    await roundtrip(fresh, b"after the restart")
    fresh.transport.loseConnection()
    await within(fresh.lost)


# --- endpoint strings -----------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    for k in ("SESAME_HUB", "SESAME_CA", "SESAME_TOKEN", "SESAME_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)


HUB = "hub=127.0.0.1\\:7443:token=ses_0123456789ab_secret"


@pytest.mark.parametrize(("kind", "text", "key"), [
    ("client", f"sesame:remote=edge-1:host=h:port=22:color=red:{HUB}", "color"),
    ("client", f"sesame:host=127.0.0.1:port=22:{HUB}", "remote"),
    ("client", f"sesame:remote=edge-1:host=127.0.0.1:port=99999:{HUB}", "port"),
    ("client", f"sesame:remote=edge-1:host=127.0.0.1:port=ssh:{HUB}", "port"),
    ("client", f"sesame:remote=edge-1:host=127.0.0.1:{HUB}", "port"),
    ("client", "sesame:remote=edge-1:host=h:port=22:hub=127.0.0.1\\:7443"
               ":tokenFile=/nonexistent/token", "tokenFile"),
    ("client", "sesame:remote=edge-1:host=h:port=22:hub=hub.example\\:7443:tls=no"
               ":token=ses_0123456789ab_secret", "tls"),
    ("client", "sesame:remote=edge-1:host=h:port=22:token=t", "hub"),
    ("client", f"sesame:remote=edge-1:host=h:port=22:timeout=soon:{HUB}", "timeout"),
    ("client", f"sesame:remote=bad/name:host=h:port=22:{HUB}", "remote"),
    ("server", f"sesame:remote=edge-1:endpoint=web:host=h:{HUB}", "host"),
    ("server", f"sesame:endpoint=web:{HUB}", "remote"),
    ("server", f"sesame:remote=edge-1:{HUB}", "endpoint"),
    ("server", "sesame:remote=edge-1:endpoint=web:hub=127.0.0.1\\:7443"
               ":tokenFile=/nonexistent/token", "tokenFile"),
    ("server", "sesame:remote=edge-1:endpoint=web:hub=10.1.2.3\\:7443:tls=no"
               ":token=ses_0123456789ab_secret", "tls"),
])
def test_endpoint_string_errors_name_the_key(no_env, kind, text, key):
    parse = endpoints.clientFromString if kind == "client" else endpoints.serverFromString
    with pytest.raises(ValueError) as info:
        parse(reactor, text)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_token_file_that_is_a_directory_says_why(no_env, tmp_path):
    with pytest.raises(ValueError, match=r"^tokenFile: cannot read token file .*directory"):
        endpoints.serverFromString(
            reactor, f"sesame:remote=edge-1:endpoint=web:hub=127.0.0.1\\:1:tokenFile={tmp_path}")


def test_unreadable_token_file_says_why(no_env, tmp_path):
    f = tmp_path / "token"
    f.write_text("ses_0123456789ab_secret\n")
    f.chmod(0)
    if os.access(f, os.R_OK):  # root reads anything
        pytest.skip("running as root")
    with pytest.raises(ValueError, match=r"^tokenFile: cannot read token file .*Permission denied"):
        endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=h:port=22:hub=127.0.0.1\\:1:tokenFile={f}")


def test_endpoint_strings_from_environment(monkeypatch, tmp_path):
    f = tmp_path / "token"
    f.write_text("ses_0123456789ab_secret\n")
    monkeypatch.setenv("SESAME_HUB", "127.0.0.1:7443")
    monkeypatch.setenv("SESAME_TOKEN_FILE", str(f))
    monkeypatch.delenv("SESAME_TOKEN", raising=False)
    monkeypatch.delenv("SESAME_CA", raising=False)
    ep = endpoints.clientFromString(reactor, "sesame:remote=edge-1:host=\\:\\:1:port=22")
    assert (ep.hub.target, ep.hub.token, ep.address) == (
        "127.0.0.1:7443", "ses_0123456789ab_secret", "[::1]:22")
    sep = endpoints.serverFromString(reactor, "sesame:remote=edge-1:endpoint=web")
    assert sep.remote == "namespaces/default/remotes/edge-1" and sep.endpoint == "web"


def test_plugins_discovered_and_verified(no_env):
    clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
               if p.prefix == "sesame"]
    servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "sesame"]
    assert len(clients) == 1 and len(servers) == 1
    assert verifyObject(IPlugin, clients[0])
    assert verifyObject(IStreamClientEndpointStringParserWithReactor, clients[0])
    assert verifyObject(IPlugin, servers[0])
    assert verifyObject(IStreamServerEndpointStringParser, servers[0])
    c = endpoints.clientFromString(reactor, f"sesame:remote=edge-1:endpoint=web:{HUB}")
    s = endpoints.serverFromString(reactor, f"sesame:remote=edge-1:endpoint=web:{HUB}")
    assert verifyObject(interfaces.IStreamClientEndpoint, c)
    assert verifyObject(interfaces.IStreamServerEndpoint, s)


# --- the helpers under trial ----------------------------------------------------------


def test_trial_mixin_example_passes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-m", "twisted.trial",
                          "--temp-directory", str(tmp_path / "_trial_temp"),
                          "tests.trial_hub_example"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "PASSED (successes=" in text, text


def test_docs_pytest_example_passes(tmp_path):
    """docs/TESTING.md's conftest.py + test_app.py, as written, pass under pytest."""
    text = (ROOT / "docs" / "TESTING.md").read_text()
    blocks = {m.group(2): m.group(1) for m in re.finditer(
        r"```python\n(# (conftest\.py|test_app\.py)\n.*?)```", text, re.S)}
    assert set(blocks) == {"conftest.py", "test_app.py"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout, out.stdout
