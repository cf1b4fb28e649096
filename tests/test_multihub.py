"""
Remotes and clients with several hubs (issue 11, item 5), without a cluster: two
independent in-process hubs sharing one data directory (so one CA and one token store).

* a ``sesame:`` server endpoint with ``hub=A,B`` registers on both, ``stopListening`` ends
  both; a remote homed on a DNS name with two addresses keeps a session to each;
* a client endpoint with ``hub=DEAD,LIVE`` connects through the live one (sha256-checked
  echo) and starts there next time; a hub's own answer (PERMISSION_DENIED, remote not
  connected, the remote refusing the dial) is final: the next hub sees no call;
* ``sesame remote --hub A --hub B`` as a process registers on both, names the hub in its
  log lines, stays on B when A stops (clients through B keep working) and leaves both
  when stopped;
* ``--homes N`` / ``homes=N``: a remote homed on N of its hubs -- the first N, moving to
  the next hub not in use when one is lost (in-process hubs stopped, and a ``sesame hub``
  process killed with SIGKILL under ``sesame remote --homes 1``), back within a bound;
  a hub refusing it passes it on, every hub refusing it is fatal;
* bad ``--hub`` / ``hub=`` / ``SESAME_HUB`` / ``--homes`` / ``homes=`` values are usage
  errors naming the bad part.

Real grpc and sockets on 127.0.0.1 (and ::1); every wait is on a Deferred, a hub-state
predicate or a log line, with a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, threads

from sesame import endpoints as sesame_endpoints
from sesame.bridge import get_bridge, to_deferred
from sesame.endpoints import HubConfig, RemoteSessions, hub_config, hub_targets, resolve_hubs
from sesame.hub.store import SQLiteStore
from sesame.hub.tls import ensure_hub_tls
from sesame.netconn import NetConnError
from sesame.remote import agent_offers
from sesame.tap import RemoteOptions
from sesame.testing.hub import HubFixture, escape
from tests import test_hub
from tests.e2e_support import SESAME, Procs, child_env, free_port, sesame, start_hub, wait_until

Conn, EchoFactory, within = test_hub.Conn, test_hub.EchoFactory, test_hub.within
T = 10.0
REGISTERED = r"registered (\S+) with the hub at (\S+)"


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def hubs(tmp_path: Path):
    """Two started hubs, A and B, on 127.0.0.1 sharing ``tmp_path/data`` (CA, tokens)."""
    data = tmp_path / "data"
    a, b = HubFixture(data), HubFixture(data)
    try:
        pytest_twisted.blockon(a.start())
        pytest_twisted.blockon(b.start())
        yield a, b
    finally:
        pytest_twisted.blockon(defer.DeferredList([a.stop(), b.stop()]))


@pytest.fixture
def echo():
    """An echo server on 127.0.0.1 (a Twisted listening port)."""
    factory = EchoFactory()
    port = pytest_twisted.blockon(
        endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
    yield port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def dead_hub() -> str:
    """A 127.0.0.1 address where nothing listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def hub_keys(targets: list[str], ca: Path, token: str) -> str:
    """``hub=A,B:ca=...:token=...`` for a ``sesame:`` string (colons escaped, commas not)."""
    return f"hub={escape(','.join(targets))}:ca={escape(str(ca))}:token={escape(token)}"


async def sha256_echo(ep, size: int = 1 << 20) -> None:
    """Connect with ``ep`` to an echo server, send ``size`` random bytes, check their sha256."""
    conn = await within(ep.connect(protocol.Factory.forProtocol(Conn)))
    try:
        payload = os.urandom(size)
        conn.transport.write(payload)
        got = await conn.until(size)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        conn.transport.loseConnection()
        await within(conn.lost)


def client(targets: list[str], ca: Path, token: str, port: int):
    return endpoints.clientFromString(
        reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={port}:"
        + hub_keys(targets, ca, token))


def calls_seen(hub: HubFixture) -> dict:
    """What the hub's metrics saw of clients: auth failures, dial errors, connections."""
    m = hub.hub.metrics
    return {"auth": m.auth_failures(), "dial": m.dial_errors(),
            "connections": m.totals()["connections_total"]}


NOTHING = {"auth": {}, "dial": {}, "connections": 0}


# --- the server endpoint and RemoteSessions ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_endpoint_registers_on_every_hub_and_stops_on_all(hubs) -> None:
    a, b = hubs
    token = a.remote_token("edge-1")
    ep = endpoints.serverFromString(
        reactor, "sesame:remote=edge-1:endpoint=web:" + hub_keys([a.target, b.target],
                                                                 a.ca_path, token))
    port = await within(ep.listen(EchoFactory()))
    try:
        await a.wait_for(lambda: a.routed("edge-1", "web") and b.routed("edge-1", "web"),
                         what="web registered on both hubs")
        host = port.getHost()
        assert host.hubs == (a.target, b.target)
        assert host.hub == f"{a.target},{b.target}"
        assert (host.remote, host.endpoint) == ("namespaces/default/remotes/edge-1", "web")
        ct = a.client_token()
        for hub in (a, b):  # reached through either hub
            await sha256_echo(endpoints.clientFromString(
                reactor, "sesame:remote=edge-1:endpoint=web:" + hub.endpoint_kwargs(ct)), 65536)
    finally:
        await within(port.stopListening())
    await a.wait_for(lambda: not a.routed("edge-1", "web") and not b.routed("edge-1", "web"),
                     what="web unregistered on both hubs")


@pytest_twisted.ensureDeferred
async def test_server_endpoint_listens_while_one_hub_is_down(hubs) -> None:
    a, b = hubs
    dead = dead_hub()
    token = a.remote_token("edge-1")
    ep = endpoints.serverFromString(
        reactor, "sesame:remote=edge-1:endpoint=web:" + hub_keys([dead, b.target],
                                                                 a.ca_path, token))
    port = await within(ep.listen(EchoFactory()))
    try:
        assert b.routed("edge-1", "web")
        assert port.getHost().hubs == (dead, b.target)
    finally:
        await within(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_one_dns_name_with_two_addresses_is_two_hubs(tmp_path: Path) -> None:
    """``localhost:P`` resolving to 127.0.0.1 and ::1 (a stand-in resolver: this machine's
    localhost has one address) gives one session per address, TLS checked against the
    name."""
    data = tmp_path / "data"
    v4 = HubFixture(data)
    await v4.start()
    v6 = HubFixture(data)
    v6.host = "::1"
    v6.tls = ensure_hub_tls(data, ["::1"])
    v6.store = SQLiteStore(data / "hub.db")
    await v6._listen(v4.port)  # the same port on the other address
    sessions = None
    try:
        def getaddrinfo(host, port, type=0):
            assert host == "localhost"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        cfg = hub_config({"hub": f"localhost:{v4.port}", "ca": str(v4.ca_path),
                          "token": v4.remote_token("edge-1")}, env={})
        assert sesame_endpoints.needs_resolving(cfg)
        resolved = await threads.deferToThread(resolve_hubs, cfg, getaddrinfo)
        assert resolved == [(f"127.0.0.1:{v4.port}", "localhost"), (f"[::1]:{v4.port}", "localhost")]
        sessions = RemoteSessions.for_hubs(cfg, "edge-1", agent_offers([], reactor=reactor),
                                           hubs=resolved)
        await to_deferred(sessions.bridge.submit(sessions.astart()))
        await v4.wait_for(lambda: v4.routed("edge-1") and v6.routed("edge-1")
                          and sessions.registrations == 2,
                          what="edge-1 registered on both addresses")
        assert sessions.fatal is None and sessions.targets == tuple(t for t, _ in resolved)
    finally:
        if sessions is not None:
            await to_deferred(sessions.bridge.submit(sessions.astop()))
        await v6.stop()
        await v4.stop()


def test_hub_ip_literals_need_no_resolving() -> None:
    cfg = HubConfig("127.0.0.1:1", "t", targets=("127.0.0.1:1", "[::1]:2"))
    assert not sesame_endpoints.needs_resolving(cfg)
    assert resolve_hubs(cfg, getaddrinfo=None) == [("127.0.0.1:1", None), ("[::1]:2", None)]


# --- clients: the first hub that answers --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_skips_an_unreachable_hub_and_starts_at_the_live_one_next(hubs, echo) -> None:
    a, b = hubs
    await b.start_remote("edge-1", allow=[f"127.0.0.1:{echo.getHost().port}"])
    dead = dead_hub()
    ct = b.client_token()
    ep = client([dead, b.target], b.ca_path, ct, echo.getHost().port)
    await sha256_echo(ep)
    assert sesame_endpoints.hub_order(ep.hub) == (b.target, dead)  # B answered: first next time
    await sha256_echo(ep)
    assert calls_seen(b)["connections"] == 2
    # every hub unreachable: one error naming each
    dead2 = dead_hub()
    with pytest.raises(NetConnError) as info:
        await within(client([dead, dead2], b.ca_path, ct, echo.getHost().port).connect(
            protocol.Factory.forProtocol(Conn)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.details.startswith(f"no hub answered ({dead}: ")
    assert f"; {dead2}: " in info.value.details


@pytest_twisted.ensureDeferred
async def test_an_answer_from_a_hub_is_not_retried_on_the_next(hubs, echo) -> None:
    a, b = hubs
    allowed = echo.getHost().port
    await a.start_remote("edge-1", allow=[f"127.0.0.1:{allowed}"])
    await b.start_remote("edge-2", allow=[f"127.0.0.1:{allowed}"])
    seen_before = calls_seen(a)

    async def refused(targets, token, remote="edge-1", port=allowed) -> NetConnError:
        ep = endpoints.clientFromString(
            reactor, f"sesame:remote={remote}:host=127.0.0.1:port={port}:"
            + hub_keys(targets, a.ca_path, token))
        with pytest.raises(NetConnError) as info:
            await within(ep.connect(protocol.Factory.forProtocol(Conn)))
        return info.value

    # the token may not reach edge-1: A says PERMISSION_DENIED
    err = await refused([a.target, b.target], a.client_token("other-*"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
    assert calls_seen(a)["auth"] != seen_before["auth"]
    # edge-2 lives on B only: A says it is not connected (UNAVAILABLE, but from the hub)
    err = await refused([a.target, b.target], a.client_token(), remote="edge-2")
    assert err.code == grpc.StatusCode.UNAVAILABLE and "not connected" in err.details, err
    # edge-1 refuses to dial a port outside its --allow list
    err = await refused([a.target, b.target], a.client_token(), port=free_port())
    assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
    assert calls_seen(b) == NOTHING


# --- sesame remote --hub A --hub B ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sesame_remote_with_two_hubs(hubs, echo, tmp_path: Path) -> None:
    a, b = hubs
    token_file = tmp_path / "edge-1.token"
    token_file.write_text(a.remote_token("edge-1") + "\n")
    port = echo.getHost().port
    procs = Procs()
    try:
        remote = procs.start("remote", [
            *SESAME, "remote", "--hub", a.target, "--hub", b.target, "--name", "edge-1",
            "--token-file", str(token_file), "--ca", str(a.ca_path),
            "--allow", f"127.0.0.1:{port}"], cwd=tmp_path)
        await a.wait_for(lambda: a.routed("edge-1") and b.routed("edge-1"), timeout=20,
                         what="edge-1 registered on both hubs")

        def registered() -> set[str]:  # the hubs its log lines say it registered with
            return {m.group(2) for line in list(remote.err.lines)
                    if (m := re.search(REGISTERED, line))}

        await threads.deferToThread(wait_until, lambda: registered() == {a.target, b.target},
                                    what="a 'registered' line for each hub")
        sessions = [s for h in (a, b) for s in h.hub.connected()]
        assert len({s.peer for s in sessions}) == 2
        ct = a.client_token()
        await sha256_echo(client([a.target, b.target], a.ca_path, ct, port))

        # A goes away: the remote stays on B, and clients listing A first get through B
        mark = remote.mark()
        await a.stop_hub()
        await threads.deferToThread(  # its log lines say which hub
            remote.wait_line, rf"reconnecting to the hub in \S+ \[hub {re.escape(a.target)}\]",
            20, start=mark)
        assert b.routed("edge-1")
        await sha256_echo(client([a.target, b.target], a.ca_path, ct, port))
        await sha256_echo(client([a.target, b.target], a.ca_path, ct, port))
        assert calls_seen(b)["connections"] >= 2

        # stopping the remote ends its sessions
        await threads.deferToThread(remote.stop)
        await b.wait_for(lambda: not b.routed("edge-1"), what="edge-1 gone from B")
    finally:
        await threads.deferToThread(procs.stop_all)


@pytest_twisted.ensureDeferred
async def test_sesame_hub_env_with_commas_for_a_remote(hubs, echo, tmp_path: Path) -> None:
    """SESAME_HUB=A,B does what --hub A --hub B does (through twistd's options too)."""
    a, b = hubs
    token_file = tmp_path / "edge-1.token"
    token_file.write_text(a.remote_token("edge-1") + "\n")
    procs = Procs()
    try:
        procs.start("remote", [*SESAME, "remote", "--name", "edge-1", "--token-file",
                               str(token_file), "--ca", str(a.ca_path)],
                    env=child_env(SESAME_HUB=f"{a.target},{b.target}"), cwd=tmp_path)
        await a.wait_for(lambda: a.routed("edge-1") and b.routed("edge-1"), timeout=20,
                         what="edge-1 registered on both hubs")
    finally:
        await threads.deferToThread(procs.stop_all)


# --- --homes N: a remote homed on N of its hubs ----------------------------------------------

BOUND = 5.0  # seconds from losing a hub to being registered on the next one


def homed_sessions(hubs: list[HubFixture], token: str, allow: str, homes: int,
                   ca: Path) -> RemoteSessions:
    """``edge-1`` (NetConn behind ``allow``) for ``hubs`` in order, homed on ``homes``."""
    cfg = hub_config({"hub": ",".join(h.target for h in hubs), "ca": str(ca), "token": token},
                     env={})
    return RemoteSessions.for_hubs(cfg, "edge-1", agent_offers([allow], reactor=reactor),
                                   homes=homes)


def logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in list(caplog.records))


async def elapsed_until(hub: HubFixture, predicate, what: str) -> float:
    """Seconds until ``predicate`` holds (checked on the grpc loop; at most ``T``)."""
    t0 = time.monotonic()
    await hub.wait_for(predicate, timeout=T, what=what)
    return time.monotonic() - t0


@pytest_twisted.ensureDeferred
async def test_homes_1_is_on_the_first_hub_and_moves_when_it_is_lost(hubs, echo, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sesame.remote")
    a, b = hubs
    port = echo.getHost().port
    sessions = homed_sessions([a, b], a.remote_token("edge-1"), f"127.0.0.1:{port}", 1,
                              a.ca_path)
    ct = a.client_token()
    try:
        await to_deferred(sessions.bridge.submit(sessions.astart()))
        await a.wait_for(lambda: a.routed("edge-1") and sessions.homed == (a.target,),
                         what="edge-1 homed on A")
        await sha256_echo(client([a.target], a.ca_path, ct, port))
        assert sessions.in_use == (a.target,) and sessions.rotating
        assert b.hub.connected() == [] and calls_seen(b) == NOTHING  # B never saw it
        assert logged(caplog, f"homed on {a.target} (1 of 2 hubs)")

        # A dies: the remote moves to B within a bound, and clients get through B
        await a.stop_hub()
        took = await elapsed_until(b, lambda: b.routed("edge-1") and sessions.homed
                                   == (b.target,), "edge-1 registered on B")
        assert took < BOUND, took
        assert logged(caplog, f"lost hub {a.target}; moving to {b.target}")
        assert sessions.homed == sessions.in_use == (b.target,)
        await sha256_echo(client([a.target, b.target], a.ca_path, ct, port))

        # A comes back: not needed, not used -- until B goes away
        await a.restart_hub()
        await sha256_echo(client([b.target], a.ca_path, ct, port), 4096)
        assert not a.routed("edge-1") and sessions.in_use == (b.target,)
        await b.stop_hub()
        took = await elapsed_until(a, lambda: a.routed("edge-1") and sessions.homed
                                   == (a.target,), "edge-1 back on A")
        assert took < BOUND, took
        assert sessions.homed == (a.target,) and sessions.registrations == 3
        # (this process's shared channel to A may still be backing off from A's death)
        await to_deferred(get_bridge().submit(sesame_endpoints.close_hub_channels(a.target)))
        await sha256_echo(client([a.target], a.ca_path, ct, port), 4096)
    finally:
        await to_deferred(sessions.bridge.submit(sessions.astop()))


@pytest_twisted.ensureDeferred
async def test_server_endpoint_homes_2_of_3_hubs_keeps_exactly_2(hubs, tmp_path: Path) -> None:
    a, b = hubs
    c = HubFixture(tmp_path / "data")
    await c.start()
    try:
        token = a.remote_token("edge-1")
        ep = endpoints.serverFromString(
            reactor, "sesame:remote=edge-1:endpoint=web:homes=2:"
            + hub_keys([a.target, b.target, c.target], a.ca_path, token))
        assert ep.homes == 2
        port = await within(ep.listen(EchoFactory()))
        session = port.session

        def homed() -> tuple[bool, ...]:
            return tuple(h.routed("edge-1", "web") for h in (a, b, c))

        try:
            await a.wait_for(lambda: homed() == (True, True, False)
                             and len(session.homed) == 2, what="web on A and B")
            assert c.hub.connected() == [] and session.homed == (a.target, b.target)
            await a.stop_hub()
            took = await elapsed_until(c, lambda: homed() == (False, True, True)
                                       and len(session.homed) == 2, "web moved from A to C")
            assert took < BOUND, took
            assert session.homed == session.in_use == (b.target, c.target)
            ct = a.client_token()
            for hub in (b, c):
                await sha256_echo(endpoints.clientFromString(
                    reactor, "sesame:remote=edge-1:endpoint=web:" + hub.endpoint_kwargs(ct)),
                    65536)
            assert len(b.hub.connected()) == len(c.hub.connected()) == 1
        finally:
            await within(port.stopListening())
        await b.wait_for(lambda: homed() == (False, False, False), what="web gone everywhere")
    finally:
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_homes_a_refusing_hub_passes_the_remote_on_and_all_refusing_is_fatal(
        hubs, echo, tmp_path: Path) -> None:
    """X shares the CA but not the token store (so it refuses the token, UNAUTHENTICATED):
    ``homes=1`` over X, B registers on B; a token no hub knows is refused by both, and
    ``listen()`` fails with the refusal."""
    a, b = hubs
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(a.data_dir / name, other / name)
    x = HubFixture(other)
    await x.start()
    sessions = None
    try:
        sessions = homed_sessions([x, b], b.remote_token("edge-1"),
                                  f"127.0.0.1:{echo.getHost().port}", 1, a.ca_path)
        await to_deferred(sessions.bridge.submit(sessions.astart()))
        await b.wait_for(lambda: b.routed("edge-1") and sessions.homed == (b.target,),
                         timeout=T, what="edge-1 registered on B")
        assert sessions.homed == (b.target,) and sessions.fatal is None
        assert "UNAUTHENTICATED" in sessions.sessions[0].fatal

        ep = endpoints.serverFromString(
            reactor, "sesame:remote=edge-2:endpoint=web:homes=1:"
            + hub_keys([x.target, b.target], a.ca_path, "not-a-token"))
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError) as info:
            await within(ep.listen(EchoFactory()), T)
        assert time.monotonic() - t0 < BOUND
        assert "UNAUTHENTICATED" in str(info.value)
        assert b.hub.metrics.auth_failures() and x.hub.metrics.auth_failures()
    finally:
        if sessions is not None:
            await to_deferred(sessions.bridge.submit(sessions.astop()))
        await x.stop()


@pytest_twisted.ensureDeferred
async def test_sesame_remote_homes_1_moves_when_its_hub_is_killed(echo, tmp_path: Path) -> None:
    """``sesame remote --homes 1 --hub A --hub B`` with two ``sesame hub`` processes (one
    data directory): on A only; ``kill -9`` A and it registers on B within the bound."""
    data = tmp_path / "data"
    port = echo.getHost().port
    procs = Procs()
    targets: list[str] = []
    try:
        hub_a = await threads.deferToThread(start_hub, procs, data, name="hub-a")
        hub_b = await threads.deferToThread(start_hub, procs, data, name="hub-b")
        targets = [hub_a.address, hub_b.address]
        token_file = await threads.deferToThread(hub_a.token_file, tmp_path / "edge-1.token",
                                                 "--remote", "edge-1")
        ct = await threads.deferToThread(hub_a.token, "--client")
        remote = procs.start("remote", [
            *SESAME, "remote", "--homes", "1", "--hub", hub_a.address, "--hub", hub_b.address,
            "--name", "edge-1", "--token-file", str(token_file), "--ca", str(hub_a.ca),
            "--allow", f"127.0.0.1:{port}"], cwd=tmp_path)
        await threads.deferToThread(
            remote.wait_line, rf"homed on {re.escape(hub_a.address)} \(1 of 2 hubs\)", 20)
        await sha256_echo(client([hub_a.address], hub_a.ca, ct, port))
        with pytest.raises(NetConnError) as info:  # B has no session of edge-1
            await within(client([hub_b.address], hub_a.ca, ct, port).connect(
                protocol.Factory.forProtocol(Conn)))
        assert "not connected" in info.value.details, info.value

        mark = remote.mark()
        killed = time.monotonic()
        await threads.deferToThread(hub_a.proc.kill9)
        await threads.deferToThread(
            remote.wait_line, rf"lost hub {re.escape(hub_a.address)}; moving to "
            rf"{re.escape(hub_b.address)}", 10, start=mark)
        _, at, _ = await threads.deferToThread(
            remote.wait_line_at, rf"registered \S+ with the hub at {re.escape(hub_b.address)}",
            10, start=mark)
        assert at - killed < BOUND, at - killed
        await sha256_echo(client(targets, hub_a.ca, ct, port))
        assert remote.alive()
    finally:
        await threads.deferToThread(procs.stop_all)
        for target in targets:
            await to_deferred(get_bridge().submit(sesame_endpoints.close_hub_channels(target)))


# --- bad input -------------------------------------------------------------------------------


def _remote_options(*args: str, env: dict[str, str] | None = None, tmp_path: Path) -> str:
    token = tmp_path / "t"
    token.write_text("tok\n")
    names = ("SESAME_HUB", "SESAME_HOMES")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    if env:
        os.environ.update(env)
    try:
        o = RemoteOptions()
        o.parseOptions(["--name", "edge-1", "--token-file", str(token), *args])
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)
    return f"ok {','.join(o.hub.targets)} homes={o.homes}"


@pytest.mark.parametrize(("args", "env", "said"), [
    (["--hub", ""], None, "UsageError: --hub: empty hub address"),
    (["--hub", "127.0.0.1:1", "--hub", "nope"], None,
     "UsageError: --hub: 'nope': expected HOST:PORT, [IPV6]:PORT or tcp:HOST:PORT"),
    (["--hub", "127.0.0.1:1,,127.0.0.1:2"], None,
     "UsageError: --hub: empty hub address in '127.0.0.1:1,,127.0.0.1:2' (element 2)"),
    (["--hub", "127.0.0.1:1", "--hub", "tcp:127.0.0.1:1"], None,
     "UsageError: --hub: 127.0.0.1:1 is given twice"),
    ([], {"SESAME_HUB": "127.0.0.1:1,"}, "UsageError: SESAME_HUB: empty hub address in "
     "'127.0.0.1:1,' (element 2)"),
    ([], None, "UsageError: --hub: which hub to dial"),
    (["--hub", "127.0.0.1:1", "--hub", "192.0.2.1:2", "--no-tls"], None,
     "UsageError: --no-tls: refusing plain text (no TLS) for hub '192.0.2.1:2'"),
    (["--hub", "127.0.0.1:1,[::1]:2", "--hub", "tcp:host=localhost:port=3"], None,
     "ok 127.0.0.1:1,[::1]:2,localhost:3"),
    ([], {"SESAME_HUB": "127.0.0.1:1,127.0.0.1:2"}, "ok 127.0.0.1:1,127.0.0.1:2"),
])
def test_remote_hub_options(args, env, said, tmp_path: Path) -> None:
    assert _remote_options(*args, env=env, tmp_path=tmp_path).startswith(said)


@pytest.mark.parametrize(("kw", "env", "said"), [
    ({"hub": "127.0.0.1:1,,127.0.0.1:2"}, {}, "hub: empty hub address in "
     "'127.0.0.1:1,,127.0.0.1:2' (element 2)"),
    ({"hub": "127.0.0.1:1,nope"}, {}, "hub: 'nope': expected HOST:PORT"),
    ({}, {"SESAME_HUB": "127.0.0.1:1,nope:x"}, "SESAME_HUB: 'nope:x'"),
    ({"hub": "127.0.0.1:1,127.0.0.1:1"}, {}, "hub: 127.0.0.1:1 is given twice"),
])
def test_endpoint_hub_keys(kw, env, said) -> None:
    with pytest.raises(ValueError) as info:
        sesame_endpoints.client_from_kwargs(reactor, {"remote": "edge-1", "endpoint": "web",
                                                      "token": "t", **kw}, env)
    assert str(info.value).startswith(said)
    with pytest.raises(ValueError) as info:
        sesame_endpoints.server_from_kwargs(reactor, {"remote": "edge-1", "endpoint": "web",
                                                      "token": "t", **kw}, env)
    assert str(info.value).startswith(said)


def test_endpoint_strings_with_several_hubs() -> None:
    ep = endpoints.clientFromString(
        reactor, r"sesame:remote=edge-1:endpoint=web:token=t:hub=127.0.0.1\:1,[\:\:1]\:2")
    assert ep.hub.targets == ("127.0.0.1:1", "[::1]:2") and ep.hub.target == "127.0.0.1:1"
    ep = sesame_endpoints.server_from_kwargs(
        reactor, {"remote": "edge-1", "endpoint": "web", "token": "t"},
        {"SESAME_HUB": "a.example:7443, b.example:7443"})
    assert ep.hub.targets == ("a.example:7443", "b.example:7443")
    assert hub_targets(["a:1,b:2", "c:3"]) == hub_targets("a:1,b:2,c:3") == ("a:1", "b:2", "c:3")
    assert HubConfig("a:1", "t").targets == ("a:1",)


def test_sesame_remote_bad_hub_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok\n")
    r = sesame("remote", "--hub", "127.0.0.1:1", "--hub", "nope", "--name", "edge-1",
               "--token-file", str(tmp_path / "t"), env=child_env())
    assert r.returncode != 0
    assert "--hub: 'nope': expected HOST:PORT" in r.stderr, r.stderr


@pytest.mark.parametrize(("args", "env", "said"), [
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2"], None,
     "ok 127.0.0.1:1,127.0.0.1:2 homes=None"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "1"], None,
     "ok 127.0.0.1:1,127.0.0.1:2 homes=1"),
    (["--hub", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "--homes", "3"], None, "ok "
     "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3 homes=3"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2"], {"SESAME_HOMES": "1"},
     "ok 127.0.0.1:1,127.0.0.1:2 homes=1"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "2"], {"SESAME_HOMES": "9"},
     "ok 127.0.0.1:1,127.0.0.1:2 homes=2"),  # the flag wins
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "3"], None,
     "UsageError: --homes: 3 is more than the 2 hubs given"),
    (["--hub", "127.0.0.1:1", "--homes", "2"], None,
     "UsageError: --homes: 2 is more than the 1 hub given"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "0"], None,
     "UsageError: --homes: must be at least 1 (got 0)"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "-1"], None,
     "UsageError: --homes: must be at least 1 (got -1)"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "one"], None,
     "UsageError: --homes: 'one' is not a number of hubs"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "1.5"], None,
     "UsageError: --homes: '1.5' is not a number of hubs"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", ""], None,
     "UsageError: --homes: '' is not a number of hubs"),
    (["--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2"], {"SESAME_HOMES": "3"},
     "UsageError: SESAME_HOMES: 3 is more than the 2 hubs given"),
])
def test_remote_homes_option(args, env, said, tmp_path: Path) -> None:
    got = _remote_options(*args, env=env, tmp_path=tmp_path)
    assert got == said if said.startswith("ok") else got.startswith(said), got


@pytest.mark.parametrize(("kw", "env", "said"), [
    ({"homes": "0"}, {}, "homes: must be at least 1 (got 0)"),
    ({"homes": "3"}, {}, "homes: 3 is more than the 2 hubs given"),
    ({"homes": "x"}, {}, "homes: 'x' is not a number of hubs"),
    ({}, {"SESAME_HOMES": "-2"}, "SESAME_HOMES: must be at least 1 (got -2)"),
])
def test_endpoint_homes_key(kw, env, said) -> None:
    base = {"remote": "edge-1", "endpoint": "web", "token": "t", "hub": "127.0.0.1:1,127.0.0.1:2"}
    with pytest.raises(ValueError) as info:
        sesame_endpoints.server_from_kwargs(reactor, {**base, **kw}, env)
    assert str(info.value) == said


def test_endpoint_homes_is_for_servers_only() -> None:
    base = {"remote": "edge-1", "endpoint": "web", "token": "t", "hub": "127.0.0.1:1,127.0.0.1:2"}
    assert sesame_endpoints.server_from_kwargs(reactor, {**base, "homes": "1"}, {}).homes == 1
    assert sesame_endpoints.server_from_kwargs(reactor, base, {"SESAME_HOMES": "2"}).homes == 2
    assert sesame_endpoints.server_from_kwargs(reactor, base, {}).homes is None
    with pytest.raises(ValueError, match="^homes: unknown key for a sesame client endpoint"):
        sesame_endpoints.client_from_kwargs(reactor, {**base, "homes": "1"}, {})
    with pytest.raises(ValueError, match="homes: 3 is not between 1 and the 2 hubs"):
        RemoteSessions([object(), object()], bridge=get_bridge(), homes=3)


def test_sesame_remote_bad_homes_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok\n")
    r = sesame("remote", "--hub", "127.0.0.1:1", "--hub", "127.0.0.1:2", "--homes", "3",
               "--name", "edge-1", "--token-file", str(tmp_path / "t"), env=child_env())
    assert r.returncode != 0
    assert "--homes: 3 is more than the 2 hubs given" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
