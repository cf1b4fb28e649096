"""
The hub: remotes dial in and register; clients dial in and are routed to
them.  Everything here runs on the bridge loop.

Remote side (``sesame.v1alpha1.TunnelService``, PROTOCOL.md §5):

* ``Tunnel`` — the control stream.  ``connect{remote}`` registers a session
  offering the endpoints named in the ``sesame-endpoints`` metadata; the hub
  asks for a new ``Stream`` with ``TunnelResponse{id, stream{endpoint}}``
  whenever a client connection needs one.
* ``Stream`` — one per client connection, tagged with ``sesame-stream-id``.
  After the connect/dial handshake it carries a ``sesame.type`` tunnel in
  which the hub is the tunnel client.

Client side: ``RemoteControl/NetConn`` with ``sesame-remote`` (and
optionally ``sesame-endpoint``) metadata; the hub opens the same call inside
a fresh ``Stream`` tunnel of the remote and relays the messages verbatim.

Authentication: ``authorization: Bearer <token>`` on every call, checked
against the store on every call (so revocation is immediate).  A remote
token registers exactly its remote; a client token reaches the remotes its
pattern allows.  A newer session offering an endpoint takes it over from an
older one; other endpoints stay where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sesame import _names as N
from sesame.bridge import (
    HIGH_WATER,
    Bridge,
    StreamOuter,
    TunnelConnection,
    TunnelLoopCall,
    drain_requests,
    get_bridge,
    grpc_code,
    unwrap_tunnel,
    wrap_tunnel,
)
from sesame.core import CANCELLED, OK, UNAVAILABLE, Role, SesameCodec, Status
from sesame.hub._auth import Need, Refused, VerifiedTokens, authorize, context_token
from sesame.hub.metrics import HubMetrics, payload_len
from sesame.hub.store import AlreadyExists, Store, StoreUnavailable, parse_token
from sesame.netconn import METHOD as NETCONN_METHOD
from sesame.tunnel import PeerExt, ext_apply, ext_metadata, ext_parse
from sesame.v1alpha1 import tunnel_pb2

log = logging.getLogger("sesame.hub")

STREAM_REQUEST_TIMEOUT = 15.0
#: A NetConn call must send its dial within this many seconds (DEADLINE_EXCEEDED).
DIAL_TIMEOUT = 10.0
#: NetConn calls accepted but not yet dialled: at most this many per client connection
#: (grpc peer) and in all (RESOURCE_EXHAUSTED beyond).
MAX_PENDING_DIALS_PER_PEER = 256
MAX_PENDING_DIALS = 4096
#: A refused call may still be sending its first message: wait this long for it before
#: the status, or a client write racing an early status surfaces as INTERNAL.
REFUSAL_DRAIN = 1.0
#: How often the hub asks the store which tokens were revoked (their sessions and
#: connections end at once).
REVOCATION_POLL = 0.25


# --- sessions ------------------------------------------------------------------------


#: the hub server's largest incoming message: sesame.hub.proxy.MAX_MESSAGE and the
#: ProxyRequest around it
PROXY_MAX_RECEIVE = 4 * 1024 * 1024 + 64 * 1024


@dataclass
class _PendingStream:
    endpoint: str
    future: asyncio.Future
    #: whoever reads the stream's frames reads batches (sesame.tunnel.PeerExt.batch)
    batch: bool = True


@dataclass(eq=False)  # identity: sessions go in sets (the token holders)
class Session:
    """One live control stream of a remote."""

    id: int
    namespace: str
    remote: str
    endpoints: set[str]
    peer: str
    context: Any
    since: float = field(default_factory=time.time)
    stream_buffer: int = 16
    pending: dict[int, _PendingStream] = field(default_factory=dict)
    slots: asyncio.Semaphore | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connections: int = 0
    closed: bool = False
    token: str = field(default="", repr=False)  # re-checked before every stream request
    instance: str = ""  # sesame-instance: the remote process (sesame.hub.cluster)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def revoke(self) -> None:
        """Its token was revoked: the control stream ends with UNAUTHENTICATED (said once,
        naming the remote, whichever path found the revocation first)."""
        if not self.ended.is_set():
            log.warning("token of remote %s/%s was revoked; ending its session",
                        self.namespace, self.remote)
        self.ended.set()

    async def send(self, msg: tunnel_pb2.TunnelResponse) -> None:
        """Write ``msg`` on this session's control stream (one writer at a time)."""
        async with self.write_lock:
            await self.context.write(msg.SerializeToString())


class Hub:
    """The hub's services; see the module docstring."""

    def __init__(self, store: Store, *, bridge: Bridge | None = None) -> None:
        self.store = store
        self.bridge = bridge or get_bridge()
        self._ids = itertools.count(1)
        self.sessions: dict[int, Session] = {}
        # Stream request ids are unique hub-wide (two sessions of one remote, e.g. an
        # agent and a twistd server with the same token, each get their own), and the
        # Stream call finds its request in O(1).
        self._stream_ids = itertools.count(1)
        self._pending: dict[int, tuple[Session, _PendingStream]] = {}
        # token id -> what holds it: sessions, Stream calls and client NetConn calls,
        # each with a revoke() that ends it (see _watch_revocations)
        self._holders: dict[str, set[Any]] = {}
        #: live tokens verified lately (dropped on revocation; see :meth:`verify`)
        self.verified = VerifiedTokens()
        self._verified_marker: object = None
        self._pending_dials = 0
        self._pending_dials_by_peer: dict[str, int] = {}
        self._watcher: asyncio.Task[None] | None = None
        # (namespace, remote, endpoint) -> the session serving it
        self.routes: dict[tuple[str, str, str], Session] = {}
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.peer_port: int | None = None  # see start()
        self.metrics = HubMetrics(self)  # /metrics and the dashboard (sesame.hub.metrics)
        #: The cluster this hub is a member of (:mod:`sesame.hub.cluster`), or None.
        self.cluster: Any = None
        self.on_routes_changed: Any = None  # set by whoever serves the front doors
        self._store_changed = asyncio.Event()  # the bus said: tokens changed, look now
        # A store that does network I/O (Redis) is never called on the loop itself.
        self._store_pool: Any = None

    # --- auth ----------------------------------------------------------------------

    async def _authorize(self, context: Any, who: str, what: str, need: Need | None = None,
                         info: Any = None, *, drain: bool = True,
                         degraded: bool = False) -> Any:
        """The call's live token meeting ``need`` (:func:`sesame.hub._auth.authorize`; only
        ``need`` is checked when ``info``, the token, is known already).  A refusal is
        counted as an auth failure of ``who`` (``remote`` or ``client``) in ``what`` (the
        method) and aborts the call with its code and message (:meth:`_refuse`; ``drain``
        false once the call's first message has been read).  With ``degraded``, a store
        that does not answer gives None instead of a refusal (the caller checks the token
        another way)."""
        try:
            if info is None:
                return await self.verify(context_token(context), need)
            return info if need is None else need.check(info)
        except StoreUnavailable as exc:
            if degraded:
                return None
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc), drain=drain)
        except Refused as exc:
            self.metrics.auth_failure(who, exc.remote, f"{what}: {exc.reason}")
            await self._refuse(context, grpc.StatusCode[exc.code], exc.message, drain=drain)

    async def verify(self, token: str | None, need: Need | None = None) -> Any:
        """:func:`sesame.hub._auth.authorize` through the cache of tokens verified lately
        (:class:`~sesame.hub._auth.VerifiedTokens`): a live token seen in the last
        30 s costs a keyed digest, not the KDF and a store call.  Same refusals, as
        promptly: an embedded store's change marker (one ``PRAGMA``) is compared at every
        call and any change empties the cache; a networked store's bus does the same
        (:meth:`store_changed`), and revocations drop their tokens (:meth:`revoked`)."""
        if not getattr(self.store, "networked", False):
            marker = self.store.change_marker()
            if marker != self._verified_marker:
                self.verified.clear()
                self._verified_marker = marker
        info = self.verified.get(token)
        if info is None:
            info = await self.store_call(authorize, self.store, token)
            self.verified.put(token, info)
        return info if need is None else need.check(info)

    async def store_call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` -- a store call -- run where it cannot stall the loop: inline for
        an embedded store (SQLite), in a small thread pool for a networked one (Redis).
        A store that does not answer raises :class:`StoreUnavailable`."""
        if not getattr(self.store, "networked", False):
            return fn(*args)
        if self._store_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._store_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sesame-store")
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    async def _refuse(self, context: Any, code: grpc.StatusCode, message: str, *,
                      drain: bool = True) -> None:
        """Abort with ``code``.  With ``drain`` (a call that may not have sent its first
        message yet) take that message first, waiting at most :data:`REFUSAL_DRAIN`: a
        client write racing an early status can surface as INTERNAL instead of it."""
        first = None
        if drain:
            with contextlib.suppress(Exception):
                first = await asyncio.wait_for(context.read(), REFUSAL_DRAIN)
        if first is not grpc.aio.EOF:
            # whatever else the client is still writing (bounded): see drain_requests
            await drain_requests(context.read)
        await context.abort(code, message)

    async def _decode(self, context: Any, cls: type, data: bytes, what: str) -> Any:
        """``cls`` parsed from ``data``; a message that does not parse ends the call with
        INVALID_ARGUMENT naming ``what`` (not grpc's UNKNOWN from an exception)."""
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                f"{what} does not parse as {cls.__name__}: {exc}", drain=False)

    # --- revocation ----------------------------------------------------------------------

    def _hold(self, token: str | None, holder: Any) -> str | None:
        """Note that ``holder`` (with a ``revoke()``) lives on ``token``; its token id."""
        parsed = parse_token(token or "")
        if parsed is None:
            return None
        self._holders.setdefault(parsed[0], set()).add(holder)
        return parsed[0]

    def _release(self, token_id: str | None, holder: Any) -> None:
        held = self._holders.get(token_id or "")
        if held is not None:
            held.discard(holder)
            if not held:
                del self._holders[token_id]

    def revoked(self, token_ids: Sequence[str]) -> int:
        """End every session, Stream and client connection that lives on one of
        ``token_ids`` (revoked tokens); how many ended."""
        self.verified.drop(token_ids)
        ended = 0
        for token_id in token_ids:
            for holder in list(self._holders.pop(token_id, ())):
                holder.revoke()
                ended += 1
        return ended

    async def _watch_revocations(self) -> None:
        """Twice a second or more: ask the store for tokens revoked since the last look
        (only when it changed) and end what lives on them (:meth:`revoked`)."""
        marker: object = None
        since = time.time()
        while True:
            # the bus (a cluster) wakes us at once; the poll is the fallback
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store_changed.wait(),
                                       REVOCATION_POLL if self.cluster is None else 2.0)
            self._store_changed.clear()
            if not self._holders and not len(self.verified):
                continue
            try:
                now_marker = await self.store_call(self.store.change_marker)
                if now_marker == marker:
                    continue
                marker = now_marker
                now = time.time()
                # a margin for a revoking process whose commit lands a little late
                ids = await self.store_call(self.store.revoked_since, since - 5.0)
                since = now
                if ids and self.revoked(ids):
                    log.info("ended what lived on %d revoked token(s)", len(ids))
            except StoreUnavailable:
                pass  # said once by the cluster / the next call that needs it
            except Exception:
                log.exception("checking the store for revoked tokens failed")

    def store_changed(self, message: dict[str, Any]) -> None:
        """A change in the store (from the cluster's bus): tokens are looked at now,
        front doors reread their routes."""
        kind = message.get("kind")
        if kind == "token":
            self.verified.clear()
            self._store_changed.set()
        elif kind == "route" and self.on_routes_changed is not None:
            self.on_routes_changed()

    # --- registration ------------------------------------------------------------------

    def connected(self) -> list[Session]:
        """The sessions of remotes registered right now."""
        return [s for s in self.sessions.values() if not s.closed]

    def _register(self, session: Session) -> None:
        self.sessions[session.id] = session
        for ep in session.endpoints:
            key = (session.namespace, session.remote, ep)
            old = self.routes.get(key)
            if old is not None and old is not session:
                log.info("endpoint %s of %s/%s moves from session %d to %d", ep,
                         session.namespace, session.remote, old.id, session.id)
            self.routes[key] = session
        if getattr(self.store, "networked", False):
            asyncio.get_running_loop().create_task(self._record_remote(session))
            return
        try:
            self.store.create_remote(session.remote, namespace=session.namespace)
        except AlreadyExists:
            pass
        except Exception:
            log.exception("could not record remote %s", session.remote)

    async def _record_remote(self, session: Session) -> None:
        try:
            await self.store_call(self.store.create_remote, session.remote, session.namespace)
        except AlreadyExists:
            pass
        except Exception as exc:  # noqa: BLE001 - the session works without its record
            log.warning("could not record remote %s: %s", session.remote, exc)

    def _unregister(self, session: Session) -> None:
        if not session.closed and self.cluster is not None:
            self.cluster.session_down(session)
        session.closed = True
        self.sessions.pop(session.id, None)
        for ep in session.endpoints:
            key = (session.namespace, session.remote, ep)
            if self.routes.get(key) is session:
                del self.routes[key]
        for k in session.pending:
            self._pending.pop(k, None)
        for p in session.pending.values():
            if not p.future.done():
                p.future.set_exception(_HubError(UNAVAILABLE, f"remote {session.remote} went away"))
                p.future.exception()
        session.pending.clear()

    async def tunnel(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """``TunnelService/Tunnel``: a remote's control stream.  Checks its token, registers
        it under ``connect.remote`` with the endpoints it offers (newest session wins an
        endpoint) and sends it stream requests until either side ends the call; then
        unregisters it.  Refusals end the call with UNAUTHENTICATED, PERMISSION_DENIED or
        INVALID_ARGUMENT."""
        md = tuple(context.invocation_metadata() or ())
        info = await self._authorize(context, "remote", "Tunnel")
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        req = await self._decode(context, tunnel_pb2.TunnelRequest, first, "Tunnel message 1")
        if req.WhichOneof("data") != "connect":
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                "the first Tunnel message must be connect", drain=False)
        try:
            ns, name = N.parse_remote(req.connect.remote)
        except ValueError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                        f"connect.remote: {exc}", drain=False)
        await self._authorize(context, "remote", "Tunnel", Need("register", ns, name), info,
                              drain=False)
        endpoints = {e.strip() for e in (N.md_get(md, N.MD_ENDPOINTS) or N.NETCONN_ENDPOINT).split(",")
                     if e.strip()}
        bad = [e for e in endpoints if not N.valid_name(e)]
        if bad:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{N.MD_ENDPOINTS}: bad name {bad[0]!r}", drain=False)
        session = Session(next(self._ids), ns, name, endpoints, context.peer(), context,
                          stream_buffer=max(req.connect.stream_buffer, 1),
                          token=N.bearer(md) or "", instance=N.md_get(md, N.MD_INSTANCE) or "")
        self._register(session)
        if self.cluster is not None:
            try:
                await self.cluster.session_up(session, session.instance)
            except StoreUnavailable as exc:
                self._unregister(session)
                await self._refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc), drain=False)
        token_id = self._hold(session.token, session)
        log.info("remote %s/%s connected from %s offering %s", ns, name, session.peer,
                 ",".join(sorted(endpoints)))
        ended = asyncio.ensure_future(session.ended.wait())
        try:
            await session.send(tunnel_pb2.TunnelResponse(id=req.id, connect={}))
            while True:
                reader = asyncio.ensure_future(context.read())
                done, _ = await asyncio.wait({reader, ended}, return_when=asyncio.FIRST_COMPLETED)
                if ended in done:
                    reader.cancel()
                    await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                                        "this remote's token was revoked", drain=False)
                msg = reader.result()
                if msg is grpc.aio.EOF:
                    break
                r = await self._decode(context, tunnel_pb2.TunnelRequest, msg, "a Tunnel message")
                if r.WhichOneof("data") != "stream":
                    continue
                p = session.pending.pop(r.id, None)
                if p is None or p.future.done():
                    continue
                if r.stream.HasField("error"):
                    p.future.set_exception(_HubError(
                        r.stream.error.code or UNAVAILABLE,
                        f"remote {name} could not open a stream: {r.stream.error.message}"))
                    p.future.exception()
        finally:
            ended.cancel()
            self._release(token_id, session)
            self._unregister(session)
            log.info("remote %s/%s disconnected", ns, name)

    def stream_tunnel(self, outer: StreamOuter, peer_ext: PeerExt | None) -> TunnelConnection:
        """The started tunnel over a remote's ``Stream``, the hub as its client."""
        conn = TunnelConnection(self.bridge, SesameCodec(Role.CLIENT), outer, Role.CLIENT)
        ext_apply(conn, peer_ext, own=True)  # large windows and frames between our peers
        conn.start()
        return conn

    def unrouted(self, namespace: str, remote: str, endpoint: str) -> str:
        """Why no live session serves ``endpoint`` of ``remote`` (for an UNAVAILABLE)."""
        if any(k[0] == namespace and k[1] == remote for k in self.routes) or (
                self.cluster is not None and self.cluster.offers(namespace, remote)):
            return f"remote {remote} does not offer endpoint {endpoint!r}"
        return f"remote {remote} is not connected"

    async def open_stream(self, namespace: str, remote: str,
                          endpoint: str) -> tuple[Any, asyncio.Future, Any, Session | None]:
        """A fresh Stream of ``remote`` serving ``endpoint``: ``(outer, done, peer_ext,
        session)``, ``session`` None when it comes through another hub of the cluster.
        Set ``done`` when the connection over it is over.  Raises ``_HubError``
        (UNAVAILABLE when no hub holds a session that serves it)."""
        if self.cluster is None:
            session = self.routes.get((namespace, remote, endpoint))
            if session is None:
                raise _HubError(UNAVAILABLE, self.unrouted(namespace, remote, endpoint))
            return (*await self.request_stream(session, endpoint), session)
        candidates = self.cluster.candidates(namespace, remote, endpoint)
        if not candidates:
            raise _HubError(UNAVAILABLE, self.unrouted(namespace, remote, endpoint))
        why = ""
        for p in candidates:  # a session that cannot give a stream: the next one
            try:
                if p.session is not None:
                    if p.session.closed:
                        continue
                    return (*await self.request_stream(p.session, endpoint), p.session)
                return (*await self.cluster.open_peer_stream(p, endpoint), None)
            except _HubError as exc:
                if exc.code != UNAVAILABLE:
                    raise
                why = exc.message
            except Exception as exc:  # noqa: BLE001 - a peer that failed: the next one
                why = str(getattr(exc, "details", lambda: "")() or exc)
                log.info("relay of %s/%s through hub %s failed: %s", namespace, remote, p.hub, why)
        raise _HubError(UNAVAILABLE, f"no hub could open a stream to remote {remote}: {why}")

    async def request_stream(self, session: Session, endpoint: str, *,
                             batch: bool = True) -> Any:
        """Ask the remote for a new Stream; returns its ``_StreamCall`` once dialled."""
        try:
            await self.verify(session.token, Need("register", session.namespace, session.remote))
        except StoreUnavailable:
            pass  # degraded mode: the session was checked when it registered
        except Refused:
            # The token this session registered with was revoked: end the session.
            log.warning("token of remote %s/%s was revoked; ending its session",
                        session.namespace, session.remote)
            self._unregister(session)
            session.ended.set()
            raise _HubError(UNAVAILABLE, f"remote {session.remote} is no longer authorized "
                            "(its token was revoked)") from None
        # At most stream_buffer requests outstanding (the remote's own limit,
        # PROTOCOL.md 5.1); a burst beyond it waits for a slot instead of failing.
        if session.slots is None:
            session.slots = asyncio.Semaphore(session.stream_buffer)
        try:
            await asyncio.wait_for(session.slots.acquire(), STREAM_REQUEST_TIMEOUT)
        except TimeoutError:
            raise _HubError(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                            f"remote {session.remote} has {len(session.pending)} stream "
                            f"requests outstanding for {STREAM_REQUEST_TIMEOUT:g}s") from None
        try:
            return await self._ask_for_stream(session, endpoint, batch)
        finally:
            session.slots.release()

    async def _ask_for_stream(self, session: Session, endpoint: str, batch: bool) -> Any:
        k = next(self._stream_ids)
        fut = asyncio.get_running_loop().create_future()
        pending = session.pending[k] = _PendingStream(endpoint, fut, batch)
        self._pending[k] = (session, pending)
        try:
            await session.send(tunnel_pb2.TunnelResponse(id=k, stream={"endpoint": endpoint}))
            return await asyncio.wait_for(fut, STREAM_REQUEST_TIMEOUT)
        except TimeoutError:
            raise _HubError(UNAVAILABLE, f"remote {session.remote} did not open a stream in "
                            f"{STREAM_REQUEST_TIMEOUT:g}s") from None
        finally:
            session.pending.pop(k, None)
            self._pending.pop(k, None)

    async def stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """``TunnelService/Stream``: a remote answering one of our stream requests (by
        ``sesame-stream-id``) with the tunnel that carries one connection; it is handed to
        whoever asked (:meth:`request_stream`).  Same refusals as :meth:`tunnel`.  While
        the store does not answer (degraded mode) a call carrying the very token the
        asking session registered with (checked then) is accepted: the sessions a hub
        holds keep serving."""
        md = tuple(context.invocation_metadata() or ())
        info = await self._authorize(context, "remote", "Stream", degraded=True)
        sid = N.md_get(md, N.MD_STREAM_ID)
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        req = await self._decode(context, tunnel_pb2.StreamRequest, first, "Stream message 1")
        if req.WhichOneof("data") != "connect":
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                        "the first Stream message must be connect", drain=False)
        try:
            ns, name = N.parse_remote(req.connect.remote)
        except ValueError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                        f"connect.remote: {exc}", drain=False)
        if info is not None:
            await self._authorize(context, "remote", "Stream", Need("serve", ns, name), info,
                                  drain=False)
        pending = None
        if sid and sid.isascii() and sid.isdigit() and len(sid) <= 20:
            entry = self._pending.get(int(sid))
            # the request of a session of this very remote (another remote's token may
            # not answer it); in degraded mode, only with that session's own token
            if entry is not None and (entry[0].namespace, entry[0].remote) == (ns, name) and (
                    info is not None or (entry[0].token and hmac.compare_digest(
                        (context_token(context) or "").encode(), entry[0].token.encode()))):
                del self._pending[int(sid)]
                pending = entry[0].pending.pop(int(sid))
        if info is None and pending is None:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "store unavailable (the token cannot be checked)", drain=False)
        if pending is None or pending.future.done():
            await self._refuse(context, grpc.StatusCode.NOT_FOUND,
                                f"no outstanding stream request {sid!r} for remote {name}",
                                drain=False)

        def unanswered(why: str) -> None:
            # settle the client's request first: it must not wait out STREAM_REQUEST_TIMEOUT
            if not pending.future.done():
                pending.future.set_exception(_HubError(UNAVAILABLE, f"remote {name} {why}"))
                pending.future.exception()

        try:
            # a peer hub relaying this stream reads its frames: batches only if it said so
            await context.send_initial_metadata(ext_metadata(SesameCodec, batch=pending.batch))
            await context.write(tunnel_pb2.StreamResponse(connect={}).SerializeToString())
            t0 = time.monotonic()  # dial -> ack: the hub's tunnel RTT sample (metrics)
            await context.write(tunnel_pb2.StreamResponse(dial={"endpoint": pending.endpoint})
                                .SerializeToString())
            ack = await context.read()
        except BaseException:  # cancelled: the remote hung up before its answer
            unanswered("hung up before answering the stream's dial")
            raise
        self.metrics.rtt(ns, name, time.monotonic() - t0)
        garbled: DecodeError | None = None
        dialled = False
        if ack is not grpc.aio.EOF:
            try:
                dialled = tunnel_pb2.StreamRequest.FromString(ack).WhichOneof("data") == "dial"
            except DecodeError as exc:
                garbled = exc
        if not dialled:
            unanswered("refused the stream")
            if garbled is not None:
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                                    f"Stream message 2 does not parse as StreamRequest: {garbled}",
                                    drain=False)
            return
        done = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        async def end_call() -> None:  # the hub serves this call: ending it = returning
            finish()

        # Reads go one at a time, so the drain below can follow a tunnel reader that is
        # still waiting for a message instead of racing it.
        one_reader = asyncio.Lock()

        async def read() -> Any:
            async with one_reader:
                return await context.read()

        outer = StreamOuter(read, context.write, tunnel_pb2.StreamRequest, context.peer(),
                            done_writing=end_call, cancel=finish)
        pending.future.set_result((outer, done, ext_parse(md)))
        holder = _Revocable(finish)
        token_id = self._hold(context_token(context), holder)
        try:
            await done  # the connection using this stream is over
        finally:
            self._release(token_id, holder)
        # the remote may still be writing (a tunnel that ended early): take what it sends,
        # briefly, so it sees the call end cleanly rather than INTERNAL
        await drain_requests(read)

    # --- clients -----------------------------------------------------------------------

    async def netconn(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """``RemoteControl/NetConn`` on the hub: a client's connection to a remote (named by
        ``sesame-remote``, endpoint ``sesame-endpoint``, default ``netconn``), relayed
        through a Stream tunnel from that remote.  UNAUTHENTICATED / PERMISSION_DENIED for
        the token, INVALID_ARGUMENT for the metadata, UNAVAILABLE when the remote or its
        endpoint is not connected; a failed dial on the remote keeps the remote's status."""
        md = tuple(context.invocation_metadata() or ())
        # Everything the metadata can settle is settled before reading anything: a call
        # without a live token costs nothing beyond REFUSAL_DRAIN.
        info = await self._authorize(context, "client", "NetConn")
        remote = N.md_get(md, N.MD_REMOTE)
        if not remote:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"name the remote in the {N.MD_REMOTE} metadata")
        try:
            ns, name = N.parse_remote(remote)
        except ValueError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{N.MD_REMOTE}: {exc}")
        await self._authorize(context, "client", "NetConn", Need("reach", ns, name), info)
        endpoint = N.md_get(md, N.MD_ENDPOINT) or N.NETCONN_ENDPOINT
        first = await self._read_dial(context)
        if first is None:
            return
        try:
            outer, done, peer_ext, session = await self.open_stream(ns, name, endpoint)
        except _HubError as exc:
            code = grpc_code(exc.code, grpc.StatusCode.UNAVAILABLE)
            self.metrics.dial_error(code.name, name, exc.message)
            await self._refuse(context, code, exc.message, drain=False)
        if session is not None:
            session.connections += 1
        client = _Revocable()
        token_id = self._hold(context_token(context), client)
        try:
            await self._relay(context, outer, name, first, peer_ext, namespace=ns,
                              revocable=client)
        finally:
            self._release(token_id, client)
            if session is not None:
                session.connections -= 1
            if not done.done():
                done.set_result(None)

    async def _read_dial(self, context: Any) -> bytes | None:
        """The first message of a NetConn call (its dial), within :data:`DIAL_TIMEOUT`;
        None when the client half-closed without one.  Calls waiting here are bounded
        per client connection and in all (RESOURCE_EXHAUSTED beyond)."""
        peer = context.peer()
        waiting = self._pending_dials_by_peer.get(peer, 0)
        if waiting >= MAX_PENDING_DIALS_PER_PEER or self._pending_dials >= MAX_PENDING_DIALS:
            self.metrics.dial_error("RESOURCE_EXHAUSTED", "", "too many calls waiting to dial")
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many NetConn calls waiting for their dial "
                               f"({waiting} on this connection, {self._pending_dials} in all)")
        self._pending_dials += 1
        self._pending_dials_by_peer[peer] = waiting + 1
        try:
            first = await asyncio.wait_for(context.read(), DIAL_TIMEOUT)
        except TimeoutError:
            first = None
            timed_out = True
        else:
            timed_out = False
        finally:
            self._pending_dials -= 1
            left = self._pending_dials_by_peer[peer] - 1
            if left:
                self._pending_dials_by_peer[peer] = left
            else:
                del self._pending_dials_by_peer[peer]
        if timed_out:
            await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no dial within {DIAL_TIMEOUT:g}s of the call's start",
                                drain=False)
        return None if first is grpc.aio.EOF else first

    async def _relay(self, context: Any, outer: StreamOuter, remote: str, first: bytes,
                     peer_ext: PeerExt | None = None, *, namespace: str = N.DEFAULT_NAMESPACE,
                     route: str = "", revocable: _Revocable | None = None) -> None:
        """Carry one client NetConn call through a fresh Stream tunnel."""
        stats = self.metrics.open_connection(namespace, remote, route)
        try:
            await self._relay_counted(context, outer, remote, first, peer_ext, stats,
                                      revocable or _Revocable())
        finally:
            stats.close()

    async def _relay_counted(self, context: Any, outer: StreamOuter, remote: str, first: bytes,
                             peer_ext: PeerExt | None, stats: Any,
                             revocable: _Revocable) -> None:
        conn = self.stream_tunnel(outer, peer_ext)
        call = TunnelLoopCall(conn, NETCONN_METHOD, ())
        loop = asyncio.get_running_loop()
        down: list[bytes] = []
        wake: list[asyncio.Future | None] = [None]
        writable: list[asyncio.Future | None] = [None]
        down_bytes = [0]

        def kick(slot: list) -> None:
            f = slot[0]
            if f is not None and not f.done():
                f.set_result(None)

        def on_message(msg: bytes) -> None:
            down.append(msg)
            stats.bytes_out += payload_len(msg)
            down_bytes[0] += len(msg)
            if down_bytes[0] > HIGH_WATER:
                call.pause_reading()
            kick(wake)

        call.on_message = on_message
        call.on_end = lambda status, trailers: kick(wake)
        call.on_writable = lambda: kick(writable)
        revocable.on_revoke = lambda: kick(wake)

        async def up() -> None:
            call.send(first)  # the dial, read before the checks in netconn()
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    call.half_close()
                    return
                call.send(msg)
                stats.bytes_in += payload_len(msg)
                while call.buffered() > HIGH_WATER and call.status is None:
                    writable[0] = loop.create_future()
                    await writable[0]

        up_task = loop.create_task(up())
        try:
            while True:
                if down:
                    batch = list(down)
                    down.clear()
                    down_bytes[0] = 0
                    call.resume_reading()
                    for msg in batch:
                        await context.write(msg)
                    continue
                if call.status is not None:
                    break
                if revocable.revoked:
                    call.cancel(Status(CANCELLED, "the client's token was revoked"))
                    break
                wake[0] = loop.create_future()
                await wake[0]
        except asyncio.CancelledError:
            call.cancel(Status(CANCELLED, "client went away"))
            raise
        finally:
            up_task.cancel()
            await asyncio.gather(up_task, return_exceptions=True)  # no two reads at once
            await conn.aclose(grace=0)
        if revocable.revoked:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                               "this client's token was revoked", drain=False)
        status = call.status
        if status is not None and status.code != OK:
            code = grpc_code(status.code)
            self.metrics.dial_error(code.name, remote, status.message or "")
            await self._refuse(context, code,
                               status.message or f"connection through {remote} failed",
                               drain=False)
        await drain_requests(context.read)  # returns at once after the client's half-close

    # --- listing ------------------------------------------------------------------------

    async def list_remotes(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``Sesame/ListRemotes``: registered remotes (live state: ``Admin/ListSessions``).

        The management API (:mod:`sesame.hub.mgmt`) serves it; kept for callers of the method."""
        from sesame.hub import mgmt
        from sesame.v1alpha1 import sesame_pb2

        handle = mgmt.for_hub(self)._grpc_unary(mgmt.SESAME.methods_by_name["ListRemotes"])
        resp = await handle(sesame_pb2.ListRemotesRequest.FromString(request), context)
        return resp.SerializeToString()

    # --- serving -------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The hub's methods (TunnelService, NetConn, the management API) as one generic
        handler, for a ``grpc.aio`` server of your own (:meth:`start` makes one)."""
        return _HubHandler(self)

    async def start(self, host: str, port: int, credentials: grpc.ServerCredentials | None,
                    options: Sequence[tuple[str, Any]] = (), *,
                    peer_port: int | None = None) -> int:
        """On the bridge loop: serve the hub on ``host:port`` (TLS with ``credentials``,
        plain text when None; extra grpc server ``options``) with health and reflection;
        the bound port (useful with port 0).  With ``peer_port`` (0: any) it also serves
        on a port of its own, :attr:`peer_port`: how the other hubs of a cluster reach
        this one when several hub processes share ``port`` (``sesame hub --workers``)."""
        opts = [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
            # a 4 MiB message through Sesame/Proxy arrives inside a ProxyRequest
            ("grpc.max_receive_message_length", PROXY_MAX_RECEIVE),
            *options,
        ]
        server = grpc.aio.server(options=opts)
        server.add_generic_rpc_handlers((self.handler(),))
        hs = health.aio.HealthServicer()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        reflection.enable_server_reflection((
            "sesame.v1alpha1.TunnelService", "sesame.v1alpha1.RemoteControl",
            "sesame.v1alpha1.Sesame", "sesame.admin.v1alpha1.Admin",
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME), server)
        address = N.join_host_port(host, port)
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
        if peer_port is not None:
            own = N.join_host_port(host, peer_port)
            self.peer_port = (server.add_secure_port(own, credentials) if credentials
                              else server.add_insecure_port(own))
        await server.start()
        self.server = server
        self.port = bound
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_revocations())
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop the server: calls in flight get ``grace`` seconds, then are cancelled
        (a cluster member leaves the cluster first)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.cluster is not None:
            await self.cluster.stop()
        if self.server is not None:
            await self.server.stop(grace)
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=False)
            self._store_pool = None

    async def peer_stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """``/sesame.cluster.v1.Peer/Stream`` (:mod:`sesame.hub.cluster`): another hub of
        the cluster relays a connection to one of this hub's sessions."""
        if self.cluster is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this hub is not in a cluster")
        await self.cluster.serve_peer_stream(request_iterator, context)


class _Revocable:
    """A Stream or client call living on a token: :meth:`revoke` ends it (it runs
    ``end`` and tells whoever waits through ``on_revoke``)."""

    __slots__ = ("end", "on_revoke", "revoked")

    def __init__(self, end: Any = None) -> None:
        self.end = end
        self.on_revoke: Any = None
        self.revoked = False

    def revoke(self) -> None:
        self.revoked = True
        if self.end is not None:
            self.end()
        if self.on_revoke is not None:
            self.on_revoke()


class _HubError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _HubHandler(grpc.GenericRpcHandler):
    def __init__(self, hub: Hub) -> None:
        from sesame.hub.mgmt import for_hub
        from sesame.hub.proxy import PROXY_METHOD, proxy_handler

        self._h = {
            # the management API: sesame.v1alpha1.Sesame (incl. ListRemotes) and Admin
            **for_hub(hub).grpc_handlers(),
            PROXY_METHOD: proxy_handler(hub),
            N.TUNNEL_METHOD: grpc.stream_stream_rpc_method_handler(hub.tunnel),
            N.STREAM_METHOD: grpc.stream_stream_rpc_method_handler(hub.stream),
            NETCONN_METHOD: grpc.stream_stream_rpc_method_handler(hub.netconn),
            "/sesame.cluster.v1.Peer/Stream": grpc.stream_stream_rpc_method_handler(hub.peer_stream),
        }

    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        return self._h.get(details.method)


__all__ = ["Hub", "Session", "StreamOuter", "unwrap_tunnel", "wrap_tunnel"]
