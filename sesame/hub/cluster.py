"""
Many hubs, one system: presence with leases, a message bus and the hub-to-hub
relay, on Redis (docs/CLUSTER.md).

Every hub of a cluster shares one Redis (the store of tokens, namespaces and
routes, :class:`sesame.hub._redisstore.RedisStore`).  On top of the store this
module keeps, per hub:

* **a lease** -- ``{p}hub:<id>`` (the hub's advertised peer address, with a
  TTL) and its score in the ``{p}hubs`` sorted set (lease expiry in Redis
  milliseconds), renewed every :data:`RENEW` seconds with a TTL of
  :data:`LEASE`.  A hub that dies stops renewing; every other hub drops it
  and all its sessions when the lease runs out.
* **presence** -- ``{p}presence:<id>``, a hash of the sessions the hub holds
  (remote, endpoints, epoch, instance, since), expiring with the lease.
* **epochs** -- ``INCR {p}epoch`` for every registration: a cluster-wide
  order no wall clock decides.  For an endpoint, the remote *instance*
  (``sesame-instance`` metadata; one per remote process) of the session with
  the highest epoch owns it; among that instance's sessions (a remote homed
  on several hubs) a local one is preferred.
* **the bus** -- pub/sub channel ``{p}bus``: presence changes from hubs ("up"/"ups",
  "down"/"downs" -- batched while registrations arrive together -- "lease", "bye",
  "resync") and "store" changes from the store (tokens, routes, namespaces) reach
  every hub at once and are applied there.

A hub whose best session for a call is on another hub opens
``/sesame.cluster.v1.Peer/Stream`` on that hub, authenticated by the
cluster's peer secret (``sesame-peer-auth``; a random value in the store, no
client or remote token can stand in for it) over TLS trusting the cluster
CA.  The peer asks *its* session for a Stream and relays the tunnel's frames
verbatim both ways; the tunnel itself runs end to end between the first hub
and the remote, flow control included.  A peer that fails before the stream
is up is skipped for the next candidate, so a dead hub whose lease has not
run out yet costs no connection.

Lease timing: :data:`LEASE` and :data:`RENEW` unless the environment of the hub
process sets ``SESAME_CLUSTER_LEASE`` and/or ``SESAME_CLUSTER_RENEW`` (seconds;
the renewal must be shorter than the lease), read by :func:`join`.  A short lease
(tests, a small lab) makes a killed hub disappear sooner at the cost of more
Redis traffic.

Degraded mode: while Redis is unreachable the hub keeps its sessions, its
view of the others and the routes it holds; registrations and token checks
it cannot make fail with UNAVAILABLE "store unavailable" (see
:mod:`sesame.hub._hub`); it says so once, retries every second and
re-publishes its presence as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from sesame import _names as N
from sesame.hub.store import StoreUnavailable

log = logging.getLogger("sesame.hub.cluster")

#: Seconds between lease renewals; and the lease's time to live.
RENEW = 5.0
LEASE = 15.0
#: Every this many renewals the hub re-reads the whole cluster's presence (a safety net
#: under the bus, which delivers at most once).
RESYNC_EVERY = 12
#: Registrations (and ends of sessions) written to Redis in one go, at most.
UP_BATCH = 500
#: How often the hub drops peers whose lease ran out (seconds).
SWEEP = 1.0
#: The peer relay method (raw tunnel frames both ways).
PEER_METHOD = "/sesame.cluster.v1.Peer/Stream"
MD_PEER_AUTH = "sesame-peer-auth"
#: The presence key of the session a relay asks for (the holding hub prefers it).
MD_PEER_SESSION = "sesame-peer-session"
#: Seconds a peer has to answer a relay with its stream before the next is tried.
PEER_OPEN_TIMEOUT = 5.0


def new_hub_id() -> str:
    """A fresh hub id: host name, pid and a random suffix (unique per process start)."""
    host = socket.gethostname().split(".")[0][:24] or "hub"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(eq=False)
class Presence:
    """One session somewhere in the cluster, as the bus and Redis describe it."""

    hub: str
    key: str
    namespace: str
    remote: str
    endpoints: frozenset[str]
    epoch: int
    instance: str
    since: float
    peer: str = ""
    session: Any = None  # the local Session (this hub's own entries only)

    def to_json(self) -> dict[str, Any]:
        return {"ns": self.namespace, "remote": self.remote, "endpoints": sorted(self.endpoints),
                "epoch": self.epoch, "instance": self.instance, "since": self.since,
                "peer": self.peer}

    @classmethod
    def from_json(cls, hub: str, key: str, d: dict[str, Any]) -> Presence:
        return cls(hub, key, str(d["ns"]), str(d["remote"]), frozenset(map(str, d["endpoints"])),
                   int(d["epoch"]), str(d.get("instance") or ""), float(d.get("since") or 0.0),
                   str(d.get("peer") or ""))


@dataclass
class PeerHub:
    """Another hub of the cluster: where to reach it and until when its lease runs."""

    id: str
    advertise: str
    until: float  # time.monotonic() when its lease runs out
    sessions: dict[str, Presence] = field(default_factory=dict)
    since: float = field(default_factory=time.time)
    #: key -> the view generation of the last bus message about it (see Cluster._resync)
    touched: dict[str, int] = field(default_factory=dict)
    #: A relay to it failed before its stream was up and no lease renewal came since:
    #: its sessions are tried after every other candidate (a dead hub whose lease has
    #: not run out yet costs one failed relay per renewal, not one per connection).
    suspect: bool = False


class Cluster:
    """This hub's membership of a cluster (bridge loop only).

    :param hub: the :class:`~sesame.hub.Hub` (its ``routes``, ``sessions`` and
        ``request_stream`` serve peers' relays).
    :param url: the Redis URL (password allowed; never logged).
    :param prefix: the key prefix shared with the store.
    :param advertise: ``HOST:PORT`` other hubs dial for relays.
    :param peer_secret: the cluster's peer credential (from the store).
    :param channel_credentials: TLS for peer channels (the cluster CA), None for
        plain text (a loopback-only cluster).
    """

    def __init__(self, hub: Any, url: str, *, prefix: str = "sesame:", advertise: str,
                 peer_secret: bytes, channel_credentials: grpc.ChannelCredentials | None = None,
                 hub_id: str | None = None, lease: float = LEASE, renew: float = RENEW,
                 redis_factory: Callable[[str], Any] | None = None) -> None:
        self.hub = hub
        self.url = url
        self.prefix = prefix
        self.id = hub_id or new_hub_id()
        self.advertise = advertise
        self.lease = lease
        self.renew = renew
        self._secret = peer_secret.hex()
        self._creds = channel_credentials
        self._redis_factory = redis_factory
        self.redis: Any = None
        self.peers: dict[str, PeerHub] = {}
        self.local: dict[str, Presence] = {}  # key -> this hub's own sessions
        # (namespace, remote) -> {(hub, key): Presence}, every hub's sessions
        self.index: dict[tuple[str, str], dict[tuple[str, str], Presence]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.up = False  # Redis answers (the bus is subscribed and presence published)
        self._said_down = False
        self.relayed = 0  # connections this hub relayed to a peer (as the first hub)
        self.served_for_peers = 0  # relays this hub served for a peer
        self.bus_lag = 0.0  # seconds, the last bus message's age on arrival
        self.bus_messages = 0
        self.on_store_change: Callable[[dict[str, Any]], None] | None = None
        self._republish = asyncio.Event()
        self._gen = 0  # counts up/down messages applied (a resync keeps what came after)
        self._ups: list[tuple[Any, str, asyncio.Future]] = []  # waiting for _write_ups
        self._downs: list[str] = []  # waiting for _write_downs
        self._up_writer: asyncio.Task[None] | None = None
        self._down_writer: asyncio.Task[None] | None = None
        self._resyncing = False  # a resync started by the bus is running

    # --- keys ----------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Redis, publish this hub's lease and learn the others; start the
        renewal, bus and sweep tasks.  Raises :class:`StoreUnavailable` when Redis does
        not answer at start (a hub does not start blind)."""
        self.redis = self._make_redis()
        try:
            await self._renew_lease()
            await self._resync()
        except Exception as exc:  # noqa: BLE001 - any failure: Redis is not there
            raise StoreUnavailable(f"store unavailable: {_reason(exc)}") from None
        self.up = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._renewer()), loop.create_task(self._listen()),
                       loop.create_task(self._sweeper())]
        log.debug("hub %s joined the cluster (advertising %s; %d other hub(s))", self.id,
                 self.advertise, len(self.peers))

    def _make_redis(self) -> Any:
        if self._redis_factory is not None:
            return self._redis_factory(self.url)
        return async_redis(self.url)

    async def stop(self) -> None:
        """Leave: cancel the tasks, drop this hub's lease and presence (others forget
        it at once through "bye"), close peer channels and the Redis client."""
        # every step bounded: a hub stops even when Redis or a peer does not answer
        tasks = [t for t in (*self._tasks, self._up_writer, self._down_writer) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._tasks = []
        if self.redis is not None:
            with contextlib.suppress(Exception):
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(self._k("hub", self.id), self._k("presence", self.id))
                pipe.zrem(self._k("hubs"), self.id)
                pipe.publish(self._k("bus"), self._msg("bye"))
                await asyncio.wait_for(pipe.execute(), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), 2.0)
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.close(), 2.0)
        self._channels.clear()

    def _msg(self, t: str, **kw: Any) -> str:
        return json.dumps({"t": t, "hub": self.id, "ts": time.time(), **kw})

    # --- lease ---------------------------------------------------------------------------

    _RENEW_LUA = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local had = redis.call('EXISTS', KEYS[2])
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    redis.call('PUBLISH', KEYS[4], ARGV[4])
    return had
    """

    async def _renew_lease(self) -> bool:
        """Renew the lease; whether it was still running (False: it had run out, and the
        presence hash with it -- a hub stalled longer than the lease)."""
        ttl_ms = int(self.lease * 1000)
        info = json.dumps({"advertise": self.advertise, "pid": os.getpid(), "since": time.time()})
        return bool(await self.redis.eval(
            self._RENEW_LUA, 4, self._k("hubs"), self._k("hub", self.id),
            self._k("presence", self.id), self._k("bus"), self.id, ttl_ms, info,
            self._msg("lease", ttl=ttl_ms, advertise=self.advertise)))

    async def _renewer(self) -> None:
        renewals = 0
        while True:
            if self.up:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._republish.wait(), self.renew)
            # else: Redis was away at the last attempt (which waited a second since):
            # try again now, not a whole renewal period later
            try:
                if self._republish.is_set() or not self.up:
                    # after an outage (Redis restarted, maybe empty): everything again
                    self._republish.clear()
                    await self._publish_all()
                    await self._renew_lease()
                    await self._resync()
                elif not await self._renew_lease():
                    # the lease ran out while this hub was stalled: the others forgot
                    # it and its sessions, and its presence expired -- publish it again
                    log.warning("this hub's lease had run out (stalled for over %gs): "
                                "re-publishing its %d session(s)", self.lease, len(self.local))
                    await self._publish_all()
                renewals += 1
                if renewals % RESYNC_EVERY == 0:
                    # anti-entropy: pub/sub delivers at most once; the store is the truth
                    await self._resync()
                self._recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: degraded mode
                self._lost(exc)
                await asyncio.sleep(1.0)

    def _lost(self, exc: BaseException) -> None:
        self.up = False
        if not self._said_down:
            self._said_down = True
            log.warning("store unavailable (%s): serving the sessions and routes this hub "
                        "holds; new registrations wait until it is back", _reason(exc))

    def _recovered(self) -> None:
        if not self.up:
            self.up = True
            log.info("store available again: presence re-published (%d session(s))",
                     len(self.local))
        self._said_down = False

    async def _publish_all(self) -> None:
        """Write every local session into this hub's presence hash (after an outage)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self._k("presence", self.id))
        for p in self.local.values():
            pipe.hset(self._k("presence", self.id), p.key, json.dumps(p.to_json()))
        pipe.pexpire(self._k("presence", self.id), int(self.lease * 1000))
        pipe.publish(self._k("bus"), self._msg("resync"))
        await pipe.execute()

    # --- sessions of this hub ------------------------------------------------------------

    # The presence hash expires with the lease (the hub key's TTL), not a whole lease
    # after the last registration: a killed hub leaves no key behind its lease.
    _UPS_LUA = """
    -- KEYS: presence hash, lease key, bus; ARGV: default TTL, bus message, then
    -- field, value pairs.  The presence hash expires with the lease.
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl <= 0 then ttl = tonumber(ARGV[1]) end
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PUBLISH', KEYS[3], ARGV[2])
    return ttl
    """

    async def session_up(self, session: Any, instance: str) -> int:
        """Publish a new local session; its epoch.  :class:`StoreUnavailable` when Redis
        does not answer (the registration is refused).  Registrations arriving together
        are written together (:data:`UP_BATCH` at a time: one ``INCRBY`` of the epoch,
        one script, one bus message), so a storm costs Redis round trips per batch."""
        if not self.up:
            raise StoreUnavailable("store unavailable (Redis is not answering)")
        fut = asyncio.get_running_loop().create_future()
        self._ups.append((session, instance, fut))
        if self._up_writer is None or self._up_writer.done():
            self._up_writer = asyncio.get_running_loop().create_task(self._write_ups())
        return await fut

    async def _write_ups(self) -> None:
        while self._ups:
            batch, self._ups = self._ups[:UP_BATCH], self._ups[UP_BATCH:]
            try:
                last = int(await self.redis.incrby(self._k("epoch"), len(batch)))
            except Exception as exc:  # noqa: BLE001 - refuse while Redis is away
                self._lost(exc)
                err = StoreUnavailable(f"store unavailable: {_reason(exc)}")
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            items = []
            for i, (session, instance, fut) in enumerate(batch):
                epoch = last - len(batch) + 1 + i
                if not session.closed and not fut.done():  # else it left while waiting
                    key = f"{session.namespace}/{session.remote}#{session.id}"
                    p = Presence(self.id, key, session.namespace, session.remote,
                                 frozenset(session.endpoints), epoch, instance or key,
                                 session.since, session.peer, session)
                    self.local[key] = p
                    self._index_add(p)
                    items.append([key, p.to_json()])
                if not fut.done():
                    fut.set_result(epoch)
            if not items:
                continue
            fields = [x for key, d in items for x in (key, json.dumps(d))]
            try:
                await self.redis.eval(self._UPS_LUA, 3, self._k("presence", self.id),
                                      self._k("hub", self.id), self._k("bus"),
                                      int(self.lease * 1000), self._msg("ups", items=items),
                                      *fields)
            except Exception as exc:  # noqa: BLE001 - published again when Redis is back
                self._lost(exc)
                self._republish.set()

    def session_down(self, session: Any) -> None:
        """Forget a local session here and (in the background, batched) in the cluster."""
        key = f"{session.namespace}/{session.remote}#{session.id}"
        p = self.local.pop(key, None)
        if p is None:
            return
        self._index_remove(p)
        if self.up:
            self._downs.append(key)
            if self._down_writer is None or self._down_writer.done():
                self._down_writer = asyncio.get_running_loop().create_task(self._write_downs())

    async def _write_downs(self) -> None:
        while self._downs:
            keys, self._downs = self._downs[:UP_BATCH], self._downs[UP_BATCH:]
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.hdel(self._k("presence", self.id), *keys)
                pipe.publish(self._k("bus"), self._msg("downs", keys=keys))
                await pipe.execute()
            except Exception as exc:  # noqa: BLE001
                self._lost(exc)
                self._republish.set()

    # --- the view ------------------------------------------------------------------------

    def _index_add(self, p: Presence) -> None:
        self.index.setdefault((p.namespace, p.remote), {})[(p.hub, p.key)] = p

    def _index_remove(self, p: Presence) -> None:
        entries = self.index.get((p.namespace, p.remote))
        if entries is not None:
            entries.pop((p.hub, p.key), None)
            if not entries:
                del self.index[(p.namespace, p.remote)]

    def _drop_peer(self, hub_id: str, why: str) -> None:
        peer = self.peers.pop(hub_id, None)
        if peer is None:
            return
        for p in peer.sessions.values():
            self._index_remove(p)
        ch = self._channels.pop(hub_id, None)
        if ch is not None:
            asyncio.get_running_loop().create_task(ch.close())
        log.info("hub %s left the cluster (%s); %d of its session(s) forgotten", hub_id, why,
                 len(peer.sessions))

    def _peer(self, hub_id: str, advertise: str | None = None,
              ttl: float | None = None) -> PeerHub:
        peer = self.peers.get(hub_id)
        if peer is None:
            peer = self.peers[hub_id] = PeerHub(hub_id, advertise or "",
                                                time.monotonic() + (ttl or self.lease))
            log.info("hub %s joined the cluster at %s", hub_id, advertise or "?")
        if advertise:
            if peer.advertise and peer.advertise != advertise:
                ch = self._channels.pop(hub_id, None)
                if ch is not None:
                    asyncio.get_running_loop().create_task(ch.close())
            peer.advertise = advertise
        if ttl is not None:
            peer.until = time.monotonic() + ttl
        return peer

    async def _resync(self) -> None:
        """Read every live hub's lease and presence from Redis and replace the view."""
        now_s, now_us = await self.redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        live = await self.redis.zrangebyscore(self._k("hubs"), now_ms, "+inf", withscores=True)
        seen = set()
        for raw_id, score in live:
            hub_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if hub_id == self.id:
                continue
            info_raw = await self.redis.get(self._k("hub", hub_id))
            if info_raw is None:
                continue
            try:
                info = json.loads(info_raw)
            except ValueError:
                continue
            seen.add(hub_id)
            peer = self._peer(hub_id, str(info.get("advertise") or ""),
                              max(0.0, (float(score) - now_ms) / 1000.0))
            # Bus messages keep arriving while the read is in flight: what they said about
            # a session (up or down) is newer than the read and stays.
            before = self._gen
            fields = await self.redis.hgetall(self._k("presence", hub_id))
            if self.peers.get(hub_id) is not peer:
                continue  # dropped (bye) meanwhile
            fresh: dict[str, Presence] = {}
            for k, v in fields.items():
                key = k.decode() if isinstance(k, bytes) else str(k)
                try:
                    fresh[key] = Presence.from_json(hub_id, key, json.loads(v))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed presence entry %r of hub %s", key, hub_id)
            for key in [k for k in peer.sessions
                        if k not in fresh and peer.touched.get(k, 0) <= before]:
                self._index_remove(peer.sessions.pop(key))
            for key, p in fresh.items():
                if peer.touched.get(key, 0) > before:
                    continue
                old = peer.sessions.get(key)
                if old is not None:
                    self._index_remove(old)
                peer.sessions[key] = p
                self._index_add(p)
            peer.touched = {k: g for k, g in peer.touched.items() if g > before}
        for hub_id in [h for h in self.peers if h not in seen]:
            self._drop_peer(hub_id, "no lease in the store")

    async def _listen(self) -> None:
        """The bus: apply every message; on a lost connection, resubscribe and resync."""
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._k("bus"))
                # messages published while we were away are lost: read the state instead
                await self._resync()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: degraded mode, retry
                self._lost(exc)
                self._republish.set()
                await asyncio.sleep(1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), 1.0)

    def _apply(self, data: bytes | str) -> None:
        try:
            m = json.loads(data)
            t = m["t"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed bus message (%d bytes)", len(data))
            return
        self.bus_messages += 1
        ts = m.get("ts")
        if isinstance(ts, int | float):
            self.bus_lag = max(0.0, time.time() - ts)
        if t == "store":
            if self.on_store_change is not None:
                try:
                    self.on_store_change(m)
                except Exception:
                    log.exception("applying a store change failed")
            return
        hub_id = m.get("hub")
        if not isinstance(hub_id, str) or hub_id == self.id:
            return
        if t in ("lease", "up", "ups") and hub_id not in self.peers:
            # a hub this view does not hold: new, or dropped (its lease ran out while it
            # or this hub stalled, or a resync found no lease) and alive after all --
            # what it published meanwhile was missed: read it all again (once at a time)
            if not self._resyncing:
                self._resyncing = True
                asyncio.get_running_loop().create_task(self._resync_quietly())
        try:
            if t == "lease":  # a renewal: the hub is alive (again)
                self._peer(hub_id, str(m.get("advertise") or ""),
                           float(m["ttl"]) / 1000.0).suspect = False
            elif t in ("up", "ups"):
                peer = self._peer(hub_id)
                items = [(m["key"], m["p"])] if t == "up" else m["items"]
                for key, d in items:
                    p = Presence.from_json(hub_id, str(key), d)
                    old = peer.sessions.pop(p.key, None)
                    if old is not None:
                        self._index_remove(old)
                    peer.sessions[p.key] = p
                    self._index_add(p)
                    self._gen += 1
                    peer.touched[p.key] = self._gen
            elif t in ("down", "downs"):
                peer = self.peers.get(hub_id)
                for key in [m["key"]] if t == "down" else m["keys"]:
                    key = str(key)
                    p = peer.sessions.pop(key, None) if peer is not None else None
                    if p is not None:
                        self._index_remove(p)
                    if peer is not None:
                        self._gen += 1
                        peer.touched[key] = self._gen
            elif t == "bye":
                self._drop_peer(hub_id, "stopped")
            elif t == "resync":
                asyncio.get_running_loop().create_task(self._resync_quietly())
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed %r bus message from hub %s", t, hub_id)

    async def _resync_quietly(self) -> None:
        try:
            with contextlib.suppress(Exception):
                await self._resync()
        finally:
            self._resyncing = False

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            if not self.up:
                continue  # blind to renewals while Redis is away: keep the view
            now = time.monotonic()
            for hub_id in [h for h, p in self.peers.items() if p.until < now]:
                self._drop_peer(hub_id, "its lease ran out")

    # --- routing -------------------------------------------------------------------------

    def candidates(self, namespace: str, remote: str, endpoint: str) -> list[Presence]:
        """The sessions that may serve ``endpoint`` of ``remote``, best first: those of
        the remote instance whose session has the highest epoch (newest wins), a local
        one first, then the others newest first."""
        entries = [p for p in self.index.get((namespace, remote), {}).values()
                   if endpoint in p.endpoints and (p.session is None or not p.session.closed)]
        if not entries:
            return []
        best = max(entries, key=lambda p: p.epoch)
        mine = [p for p in entries if p.instance == best.instance]
        mine.sort(key=lambda p: (p.hub != self.id, self._suspect(p.hub), -p.epoch))
        return mine

    def _suspect(self, hub_id: str) -> bool:
        peer = self.peers.get(hub_id)
        return peer is not None and peer.suspect

    def offers(self, namespace: str, remote: str) -> bool:
        """Whether any hub holds a session of ``remote``."""
        return bool(self.index.get((namespace, remote)))

    def remote_sessions(self) -> list[Presence]:
        """Every session on the other hubs (for listings)."""
        return [p for peer in self.peers.values() for p in peer.sessions.values()]

    # --- the relay, first hub's side ------------------------------------------------------

    def _channel(self, peer: PeerHub) -> grpc.aio.Channel:
        ch = self._channels.get(peer.id)
        if ch is None:
            opts = [("grpc.keepalive_time_ms", 20000), ("grpc.max_receive_message_length", -1),
                    ("grpc.use_local_subchannel_pool", 1)]
            ch = (grpc.aio.secure_channel(peer.advertise, self._creds, options=opts)
                  if self._creds is not None
                  else grpc.aio.insecure_channel(peer.advertise, options=opts))
            self._channels[peer.id] = ch
        return ch

    async def open_peer_stream(self, p: Presence, endpoint: str) -> tuple[Any, Any, Any]:
        """A Stream of ``p``'s remote through the hub holding it: ``(outer, done,
        peer_ext)`` as :meth:`sesame.hub.Hub.request_stream` returns.  Raises
        ``grpc.aio.AioRpcError`` when the peer cannot give one."""
        from sesame.bridge import StreamOuter
        from sesame.tunnel import EXT_BATCH_KEY, ext_parse
        from sesame.v1alpha1 import tunnel_pb2

        peer = self.peers.get(p.hub)
        if peer is None or not peer.advertise:
            raise _PeerGone(f"hub {p.hub} left the cluster")
        md = ((MD_PEER_AUTH, self._secret),
              (N.MD_REMOTE, N.resource_name(p.namespace, p.remote)), (N.MD_ENDPOINT, endpoint),
              (MD_PEER_SESSION, p.key), (EXT_BATCH_KEY, "1"))  # we read batched frames
        call = self._channel(peer).stream_stream(PEER_METHOD)(metadata=md)
        try:
            try:
                initial = await asyncio.wait_for(call.initial_metadata(), PEER_OPEN_TIMEOUT)
            except TimeoutError:
                call.cancel()
                raise _PeerGone(f"hub {p.hub} did not answer in {PEER_OPEN_TIMEOUT:g}s") from None
            if call.done():  # the peer refused before any stream: its status says why
                code = await call.code()
                raise _PeerGone(f"hub {p.hub}: {code.name}: {await call.details()}")
        except Exception:
            peer.suspect = True  # tried last until its next lease renewal
            raise
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda _f: call.cancel())
        outer = StreamOuter(call.read, call.write, tunnel_pb2.StreamRequest,
                            f"peer:{p.hub}", done_writing=call.done_writing, cancel=call.cancel)
        self.relayed += 1
        return outer, done, ext_parse(tuple(initial or ()))

    # --- the relay, holding hub's side -----------------------------------------------------

    def authentic(self, md: tuple) -> bool:
        """Whether call metadata carries this cluster's peer credential."""
        given = N.md_get(md, MD_PEER_AUTH) or ""
        return hmac.compare_digest(given.encode(), self._secret.encode())

    async def serve_peer_stream(self, request_iterator: Any, context: Any) -> None:
        """``Peer/Stream``: a peer hub asks for a Stream of one of *our* sessions and
        relays its tunnel's frames.  Only local sessions serve it (never a further hop)."""
        from sesame.tunnel import EXT_BATCH_KEY, ext_forward

        md = tuple(context.invocation_metadata() or ())
        if not self.authentic(md):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "Peer/Stream needs this cluster's peer credential")
        try:
            ns, name = N.parse_remote(N.md_get(md, N.MD_REMOTE) or "")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{N.MD_REMOTE}: {exc}")
        endpoint = N.md_get(md, N.MD_ENDPOINT) or N.NETCONN_ENDPOINT
        wanted = N.md_get(md, MD_PEER_SESSION) or ""
        p = self.local.get(wanted)
        session = p.session if p is not None and endpoint in p.endpoints else None
        if session is None or session.closed:
            session = self.hub.routes.get((ns, name, endpoint))
        if session is None or session.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"hub {self.id}: {self.hub.unrouted(ns, name, endpoint)}")
        try:
            # the remote batches frames only if the asking hub reads batches (a hub of an
            # earlier release does not say so)
            outer, done, _ext = await self.hub.request_stream(
                session, endpoint, batch=N.md_get(md, EXT_BATCH_KEY) == "1")
        except Exception as exc:  # noqa: BLE001 - the holding hub's _HubError
            from sesame.bridge import grpc_code

            await context.abort(grpc_code(getattr(exc, "code", 14), grpc.StatusCode.UNAVAILABLE),
                                str(exc))
        await context.send_initial_metadata(ext_forward(_ext))
        self.served_for_peers += 1
        session.connections += 1
        read_raw, write_raw = outer.raw()

        async def down() -> None:  # remote -> first hub
            while True:
                msg = await read_raw()
                if msg is grpc.aio.EOF:
                    return
                await context.write(msg)

        async def up() -> None:  # first hub -> remote
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    await outer.done_writing()
                    return
                await write_raw(msg)

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(down()), loop.create_task(up())]
        try:
            await asyncio.wait([*tasks, done], return_when=asyncio.FIRST_COMPLETED)
            if tasks[1].done() and not tasks[1].cancelled() and tasks[1].exception() is None:
                # the first hub finished writing: wait for the remote's side to end too
                await asyncio.wait([tasks[0], done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            session.connections -= 1
            if not done.done():
                done.set_result(None)


#: Connections of a hub's asyncio Redis client; more concurrent commands wait for one
#: (a registration storm must queue, not fail: redis-py's default pool raises "Too
#: many connections" past 100, which a storm of 10,000 remotes reached).
REDIS_CONNECTIONS = 32


def async_redis(url: str, *, connect_timeout: float = 2.0) -> Any:
    """A ``redis.asyncio.Redis`` for ``url`` whose pool blocks (up to 10 s) for a free
    connection instead of failing when :data:`REDIS_CONNECTIONS` are busy."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_CONNECTIONS, timeout=10,
        socket_connect_timeout=connect_timeout, socket_timeout=max(connect_timeout, 5.0),
        health_check_interval=10)
    return aioredis.Redis.from_pool(pool)  # its aclose() closes the pool too


def advertise_address(host: str, port: int, advertise: str | None = None) -> str:
    """Where peers dial this hub: ``advertise`` when given (checked ``HOST:PORT``), else
    the listen address, with a wildcard host (``0.0.0.0``, ``::``, empty) replaced by
    this machine's name.

    :raises ValueError: ``advertise`` is not ``HOST:PORT``.
    """
    if advertise:
        h, p = N.hub_address(advertise)
        return N.join_host_port(h, p)
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return N.join_host_port(host, port)


def lease_timing(lease: float | None = None, renew: float | None = None,
                 environ: Any = None) -> tuple[float, float]:
    """``(lease, renew)``: the given values, else ``SESAME_CLUSTER_LEASE`` /
    ``SESAME_CLUSTER_RENEW`` from ``environ`` (default ``os.environ``), else
    :data:`LEASE` / :data:`RENEW`.

    :raises ValueError: a value that is not a positive number of seconds, or a renewal
        not shorter than the lease.
    """
    env = os.environ if environ is None else environ

    def pick(given: float | None, name: str, default: float) -> float:
        if given is not None:
            return float(given)
        raw = (env.get(name) or "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
        if not 0 < value < 1e6:
            raise ValueError(f"{name}={raw!r} is not a positive number of seconds")
        return value

    lease_s = pick(lease, "SESAME_CLUSTER_LEASE", LEASE)
    renew_s = pick(renew, "SESAME_CLUSTER_RENEW", min(RENEW, lease_s / 3))
    if not renew_s < lease_s:
        raise ValueError(f"the lease renewal ({renew_s:g}s) must be shorter than the lease "
                         f"({lease_s:g}s)")
    return lease_s, renew_s


async def join(hub: Any, *, advertise: str, channel_credentials: grpc.ChannelCredentials | None,
               hub_id: str | None = None, lease: float | None = None,
               renew: float | None = None) -> Cluster:
    """Make ``hub`` (serving already; its store a networked one with ``prefix`` and
    ``async_client()``, :class:`~sesame.hub._redisstore.RedisStore`) a member of the cluster on that store: the peer secret from the store,
    the lease, the bus.  Returns the started :class:`Cluster` (``hub.cluster``).
    ``lease``/``renew`` default to :func:`lease_timing` (the environment, else
    :data:`LEASE`/:data:`RENEW`).

    :raises StoreUnavailable: Redis does not answer.
    :raises ValueError: bad ``SESAME_CLUSTER_LEASE`` / ``SESAME_CLUSTER_RENEW``.
    """
    lease, renew = lease_timing(lease, renew)
    store = hub.store
    secret = await hub.store_call(store.shared_secret, "cluster-peer-secret",
                                  lambda: secrets.token_bytes(32))
    cluster = Cluster(hub, store.url, prefix=store.prefix, advertise=advertise,
                      peer_secret=secret, channel_credentials=channel_credentials,
                      hub_id=hub_id, lease=lease, renew=renew,
                      redis_factory=lambda _url: store.async_client())
    cluster.on_store_change = hub.store_changed
    await cluster.start()
    hub.cluster = cluster
    for session in hub.connected():  # registered while the hub was joining
        await cluster.session_up(session, session.instance)
    return cluster


class _PeerGone(Exception):
    """A peer could not give a stream (skip it for the next candidate)."""


def _reason(exc: BaseException) -> str:
    """An error's text without anything that could carry a password."""
    text = str(exc) or type(exc).__name__
    if "@" in text:  # a URL slipped into the message
        return type(exc).__name__
    return text.splitlines()[0][:200]


__all__ = ["LEASE", "RENEW", "Cluster", "PeerHub", "Presence", "advertise_address", "join",
           "lease_timing", "new_hub_id"]
