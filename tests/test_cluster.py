"""
A cluster of hubs in one process on a real Redis (sesame.hub.cluster): presence,
the bus, the hub-to-hub relay, newest-session-wins by epoch, leases.

Every hub here is a real grpc.aio server on 127.0.0.1 with TLS from one CA;
remotes are real RemoteSessions; clients connect with the ``sesame:``
endpoint; payloads are checked by sha256.  The process-level scenarios
(kill -9 of a hub or of Redis, ``sesame hub --store``) are in
tests/test_cluster_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor

from sesame.bridge import get_bridge, to_deferred
from sesame.hub import Hub
from sesame.hub.cluster import Cluster
from sesame.hub.store import SQLiteStore
from sesame.hub.tls import ensure_hub_tls
from sesame.remote import RemoteSession, agent_offers
from sesame.testing.hub import escape, wait_registered
from sesame.testing.redis import RedisServer
from tests import test_hub
from tests.test_hub import Conn, within

T = 10.0


@pytest.fixture
def redis(redis_server):
    """The module's throw-away Redis (tests/conftest.py); each World uses its own prefix."""
    return redis_server


echo_factory = test_hub.echo_factory
echo_port = test_hub.echo_port


def on_loop(coro) -> defer.Deferred:
    return to_deferred(get_bridge().submit(coro))


class Member:
    """One hub of the in-process cluster."""

    def __init__(self, world: World, hub: Hub, port: int) -> None:
        self.world, self.hub, self.port = world, hub, port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cluster(self) -> Cluster:
        return self.hub.cluster

    def endpoint(self, token: str, remote: str, **kw: object) -> object:
        keys = "".join(f":{k}={escape(str(v))}" for k, v in kw.items())
        return endpoints.clientFromString(
            reactor, f"sesame:remote={remote}{keys}:hub={escape(self.target)}"
            f":ca={escape(str(self.world.tls.ca_path))}:token={escape(token)}")

    async def connect(self, token: str, remote: str, **kw: object) -> Conn:
        return await within(self.endpoint(token, remote, **kw).connect(
            protocol.Factory.forProtocol(Conn)))


class World:
    """N hubs sharing one data directory (CA, SQLite tokens) and one Redis."""

    def __init__(self, data_dir: Path, redis: RedisServer, *, lease: float = 15.0,
                 renew: float = 5.0) -> None:
        self.data_dir = data_dir
        self.redis = redis
        self.prefix = f"t{secrets.token_hex(4)}:"
        self.tls = ensure_hub_tls(data_dir, ["127.0.0.1"])
        self.store = SQLiteStore(data_dir / "hub.db")
        self.members: list[Member] = []
        self.remotes: list[RemoteSession] = []
        self.secret = secrets.token_bytes(32)
        self.lease, self.renew = lease, renew
        self.client = self.store.create_token("client", pattern="*")[1]

    async def add_hub(self) -> Member:
        async def go() -> tuple[Hub, int]:
            hub = Hub(SQLiteStore(self.data_dir / "hub.db"))
            port = await hub.start("127.0.0.1", 0, self.tls.server_credentials())
            cluster = Cluster(hub, self.redis.url, prefix=self.prefix,
                              advertise=f"127.0.0.1:{port}", peer_secret=self.secret,
                              channel_credentials=grpc.ssl_channel_credentials(self.tls.ca_pem),
                              lease=self.lease, renew=self.renew)
            hub.cluster = cluster
            cluster.on_store_change = hub.store_changed
            await cluster.start()
            return hub, port

        hub, port = await on_loop(go())
        m = Member(self, hub, port)
        self.members.append(m)
        return m

    async def add_remote(self, member: Member, name: str, allow: list[str], *,
                         instance: str | None = None) -> RemoteSession:
        token = self.store.create_token("remote", remote=name)[1]
        offers = agent_offers(allow, reactor=reactor, bridge=get_bridge())
        session = RemoteSession(member.target, name, token, offers,
                                credentials=grpc.ssl_channel_credentials(self.tls.ca_pem),
                                instance=instance)
        self.remotes.append(session)

        async def go() -> None:
            await session.astart()
            await wait_registered(session, T)

        await on_loop(go())
        return session

    async def settle(self, predicate, timeout: float = T) -> None:
        """Wait (on events: the bus is processed on the loop) until ``predicate()``."""
        async def go() -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not predicate():
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"not settled within {timeout:g}s")
                await asyncio.sleep(0.02)

        await on_loop(go())

    def sees(self, member: Member, remote: str, endpoint: str = "netconn") -> bool:
        return bool(member.cluster.candidates("default", remote, endpoint))

    async def stop(self) -> None:
        for r in self.remotes:
            await on_loop(r.astop())
        for m in self.members:
            if m.hub is not None:
                await on_loop(m.hub.stop(0))
        self.store.close()


@pytest.fixture
def world(tmp_path, redis):
    w = World(tmp_path, redis)
    yield w
    pytest_twisted.blockon(defer.ensureDeferred(w.stop()))


async def sha_roundtrip(member: Member, token: str, remote: str, port: int,
                        size: int = 256 * 1024) -> None:
    conn = await member.connect(token, remote, host="127.0.0.1", port=port)
    data = os.urandom(size)
    conn.transport.write(data)
    got = await conn.until(size)
    assert hashlib.sha256(got[:size]).hexdigest() == hashlib.sha256(data).hexdigest()
    conn.transport.loseConnection()
    await within(conn.lost)


@pytest_twisted.ensureDeferred
async def test_every_client_reaches_every_remote_through_every_hub(world, echo_port):
    hubs = [await world.add_hub() for _ in range(3)]
    allow = [f"127.0.0.1:{echo_port}"]
    for i, h in enumerate(hubs):
        await world.add_remote(h, f"edge-{i}", allow)
    await world.settle(lambda: all(world.sees(h, f"edge-{i}") for h in hubs for i in range(3)))
    for h in hubs:
        for i in range(3):
            await sha_roundtrip(h, world.client, f"edge-{i}", echo_port)
    relayed = sum(h.cluster.relayed for h in hubs)
    served = sum(h.cluster.served_for_peers for h in hubs)
    assert relayed == served == 6, (relayed, served)


@pytest_twisted.ensureDeferred
async def test_relay_keeps_the_remotes_refusal(world, echo_port):
    from sesame.netconn import NetConnError

    a, b = await world.add_hub(), await world.add_hub()
    await world.add_remote(b, "edge-1", [f"127.0.0.1:{echo_port}"])
    await world.settle(lambda: world.sees(a, "edge-1"))
    with pytest.raises(NetConnError) as info:
        await a.connect(world.client, "edge-1", host="127.0.0.1", port=echo_port + 1)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED, info.value
    # the relay is still fine afterwards
    await sha_roundtrip(a, world.client, "edge-1", echo_port, 4096)


@pytest_twisted.ensureDeferred
async def test_newest_instance_wins_cluster_wide(world, echo_port):
    a, b, c = [await world.add_hub() for _ in range(3)]
    allow = [f"127.0.0.1:{echo_port}"]
    await asyncio_gather(world.add_remote(a, "edge-1", allow, instance="one"),
                         world.add_remote(b, "edge-1", allow, instance="two"))

    def agreed() -> bool:
        firsts = [m.cluster.candidates("default", "edge-1", "netconn") for m in (a, b, c)]
        return all(len(f) == 1 for f in firsts) and len({f[0].epoch for f in firsts}) == 1

    await world.settle(agreed)
    winner = a.cluster.candidates("default", "edge-1", "netconn")[0]
    assert winner.instance in ("one", "two")
    assert winner.epoch == max(p.epoch for p in a.cluster.index[("default", "edge-1")].values())
    for m in (a, b, c):
        await sha_roundtrip(m, world.client, "edge-1", echo_port, 4096)


@pytest_twisted.ensureDeferred
async def test_one_instance_on_two_hubs_prefers_the_local_session(world, echo_port):
    a, b, c = [await world.add_hub() for _ in range(3)]
    allow = [f"127.0.0.1:{echo_port}"]
    await world.add_remote(a, "edge-1", allow, instance="same")
    await world.add_remote(b, "edge-1", allow, instance="same")
    await world.settle(lambda: len(c.cluster.candidates("default", "edge-1", "netconn")) == 2)
    for m in (a, b):
        best = m.cluster.candidates("default", "edge-1", "netconn")[0]
        assert best.hub == m.cluster.id
    before = (a.cluster.relayed, b.cluster.relayed)
    await sha_roundtrip(a, world.client, "edge-1", echo_port, 4096)
    await sha_roundtrip(b, world.client, "edge-1", echo_port, 4096)
    assert (a.cluster.relayed, b.cluster.relayed) == before  # both served locally
    await sha_roundtrip(c, world.client, "edge-1", echo_port, 4096)
    assert c.cluster.relayed == 1


@pytest_twisted.ensureDeferred
async def test_a_hub_that_stops_is_forgotten_at_once_and_its_remote_is_unavailable(
        world, echo_port):
    from sesame.netconn import NetConnError

    a, b = await world.add_hub(), await world.add_hub()
    r = await world.add_remote(b, "edge-1", [f"127.0.0.1:{echo_port}"])
    await world.settle(lambda: world.sees(a, "edge-1"))
    await on_loop(r.astop())
    await world.settle(lambda: not world.sees(a, "edge-1"))
    with pytest.raises(NetConnError) as info:
        await a.connect(world.client, "edge-1", host="127.0.0.1", port=echo_port)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "not connected" in str(info.value)
    await on_loop(b.hub.stop(0))
    b.hub = None
    await world.settle(lambda: not a.cluster.peers)


@pytest_twisted.ensureDeferred
async def test_a_dead_hubs_lease_runs_out(tmp_path, redis, echo_port):
    w = World(tmp_path, redis, lease=1.5, renew=0.5)
    try:
        a, b = await w.add_hub(), await w.add_hub()
        await w.add_remote(b, "edge-1", [f"127.0.0.1:{echo_port}"])
        await w.settle(lambda: w.sees(a, "edge-1"))

        async def die() -> None:  # no "bye", no cleanup: as kill -9 would leave it
            for t in b.cluster._tasks:
                t.cancel()
            b.cluster._tasks = []
            await b.hub.server.stop(0)

        await on_loop(die())
        await w.settle(lambda: not a.cluster.peers, timeout=1.5 + 2.0)
        assert not w.sees(a, "edge-1")
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_peer_stream_needs_the_peer_secret(world):
    a = await world.add_hub()
    channel = None

    async def call(md):
        rpc = channel.stream_stream("/sesame.cluster.v1.Peer/Stream")(metadata=md)
        await rpc.done_writing()
        return await rpc.code(), await rpc.details()

    async def go():
        nonlocal channel
        channel = grpc.aio.secure_channel(a.target, grpc.ssl_channel_credentials(world.tls.ca_pem))
        try:
            no = await call((("sesame-remote", "edge-1"),))
            bearer = await call((("authorization", f"Bearer {world.client}"),
                                 ("sesame-remote", "edge-1")))
            wrong = await call((("sesame-peer-auth", "00" * 32), ("sesame-remote", "edge-1")))
            good = await call((("sesame-peer-auth", world.secret.hex()), ("sesame-remote", "edge-1")))
            return no, bearer, wrong, good
        finally:
            await channel.close()

    no, bearer, wrong, good = await on_loop(go())
    for code, details in (no, bearer, wrong):
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        assert "peer credential" in details
    assert good[0] == grpc.StatusCode.UNAVAILABLE and "not connected" in good[1]


def asyncio_gather(*coros) -> defer.Deferred:
    return defer.gatherResults([defer.ensureDeferred(c) for c in coros], consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_list_sessions_on_any_hub_lists_the_whole_cluster_page_by_page(world, echo_port):
    from sesame.admin.v1alpha1 import admin_pb2
    from sesame.hub import dashboard, mgmt

    a, b, c = [await world.add_hub() for _ in range(3)]
    allow = [f"127.0.0.1:{echo_port}"]
    for i, m in enumerate((a, b, c)):
        await world.add_remote(m, f"edge-{i}", allow)
    await world.add_remote(b, "edge-0", allow, instance="second")  # edge-0 on two hubs
    await world.settle(lambda: sum(len(p.sessions) for p in c.cluster.peers.values()) == 3)
    admin = world.store.create_token("admin")[1]
    method = mgmt.ADMIN.methods_by_name["ListSessions"]

    async def listing(member, size):
        names, hubs, token = [], [], ""
        while True:
            req = admin_pb2.ListSessionsRequest(parent="namespaces/-/remotes/-",
                                                page_size=size, page_token=token)
            resp = await mgmt.for_hub(member.hub).call(method, req, admin)
            names += [s.name for s in resp.sessions]
            hubs += [s.hub for s in resp.sessions]
            token = resp.next_page_token
            if not token:
                return names, hubs

    for m in (a, b, c):
        for size in (1, 100):
            names, hubs = await on_loop(listing(m, size))
            assert len(names) == len(set(names)) == 4, names
            assert sorted(n.split("/")[3] for n in names) == ["edge-0", "edge-0", "edge-1",
                                                             "edge-2"]
            assert set(hubs) == {a.cluster.id, b.cluster.id, c.cluster.id}
    state = dashboard.cluster_state(a.hub)
    assert state["hubs_total"] == 3 and state["up"] is True
    assert {h["id"]: h["sessions"] for h in state["hubs"]} == {
        a.cluster.id: 1, b.cluster.id: 2, c.cluster.id: 1}


@pytest_twisted.ensureDeferred
async def test_a_resync_keeps_what_the_bus_said_while_it_read(world, echo_port):
    """A full re-read of a peer's presence that is in flight while the bus announces a
    new session (or the end of one) must not undo the announcement (a registration storm
    lost sessions from other hubs' views this way until the next resync)."""
    import json as _json

    a, b = await world.add_hub(), await world.add_hub()
    allow = [f"127.0.0.1:{echo_port}"]
    await world.add_remote(b, "edge-1", allow)
    await world.settle(lambda: world.sees(a, "edge-1"))
    gone_key = next(iter(b.cluster.local))

    async def go():
        real = a.cluster.redis.hgetall
        reading, release = asyncio.Event(), asyncio.Event()

        async def slow_hgetall(key):
            out = await real(key)  # the snapshot, taken before the bus messages below
            reading.set()
            await release.wait()
            return out

        a.cluster.redis.hgetall = slow_hgetall
        try:
            task = asyncio.ensure_future(a.cluster._resync())
            await reading.wait()
            new = {"ns": "default", "remote": "edge-9", "endpoints": ["netconn"], "epoch": 10**9,
                   "instance": "x", "since": 0.0, "peer": ""}
            a.cluster._apply(_json.dumps({"t": "up", "hub": b.cluster.id, "key": "default/edge-9#99",
                                          "p": new}))
            a.cluster._apply(_json.dumps({"t": "down", "hub": b.cluster.id, "key": gone_key}))
            release.set()
            await task
        finally:
            a.cluster.redis.hgetall = real

    await on_loop(go())
    assert world.sees(a, "edge-9")
    assert not world.sees(a, "edge-1")


@pytest_twisted.ensureDeferred
async def test_a_peer_dropped_from_the_view_comes_back_with_its_sessions(tmp_path, redis,
                                                                          echo_port):
    """However a peer left this hub's view (its lease seemed gone while one of them
    stalled, a resync found no lease), its next renewal brings it back *with* the
    sessions it published meanwhile."""
    w = World(tmp_path, redis, lease=3.0, renew=0.5)
    try:
        a, b = await w.add_hub(), await w.add_hub()
        await w.add_remote(b, "edge-1", [f"127.0.0.1:{echo_port}"])
        await w.settle(lambda: w.sees(a, "edge-1"))

        async def drop() -> None:
            a.cluster._drop_peer(b.cluster.id, "as if its lease had run out")

        await on_loop(drop())
        assert not w.sees(a, "edge-1")
        await w.settle(lambda: w.sees(a, "edge-1"), timeout=5.0)
        await sha_roundtrip(a, w.client, "edge-1", echo_port, 4096)
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_metrics_have_the_cluster_family(world, echo_port):
    a, b = await world.add_hub(), await world.add_hub()
    await world.add_remote(b, "edge-1", [f"127.0.0.1:{echo_port}"])
    await world.settle(lambda: world.sees(a, "edge-1"))
    await sha_roundtrip(a, world.client, "edge-1", echo_port, 4096)  # one relayed connection

    text = a.hub.metrics.render()[0].decode()
    lines = {ln.split(" ")[0]: ln.rsplit(" ", 1)[1] for ln in text.splitlines()
             if ln.startswith("sesame_cluster_")}
    assert float(lines["sesame_cluster_up"]) == 1
    assert float(lines["sesame_cluster_peers"]) == 1
    assert float(lines[f'sesame_cluster_hub_sessions{{hub="{b.cluster.id}"}}']) == 1
    assert float(lines[f'sesame_cluster_hub_sessions{{hub="{a.cluster.id}"}}']) == 0
    assert float(lines["sesame_cluster_relayed_connections_total"]) == 1
    assert float(lines["sesame_cluster_bus_messages_total"]) >= 1
    assert "sesame_cluster_bus_lag_seconds" in lines
