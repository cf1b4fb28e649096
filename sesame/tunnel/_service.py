"""
Both ends of the outer call: :class:`TunnelHost` (the network server, hosted
on a ``grpc.aio`` server on the bridge loop) and the network-client openers
:func:`open_tunnel` (forward) and :class:`ReverseTunnelServer` (reverse).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import grpc

from sesame import _names as N
from sesame.bridge import (
    Bridge,
    ClientOuter,
    ServerOuter,
    TunnelConnection,
    get_bridge,
    grpc_code,
)
from sesame.core import (
    CANCELLED,
    CODECS,
    GRPCTUNNEL_REV0,
    NEGOTIATE_KEY,
    OK,
    Codec,
    GrpcTunnelCodec,
    Role,
    SesameCodec,
    Status,
)
from sesame.tunnel._channel import TunnelChannel
from sesame.tunnel._server import ServiceRegistry, stream_factory

log = logging.getLogger("sesame.service")

DIALECTS: dict[str, type[Codec]] = {"sesame": SesameCodec, "grpctunnel": GrpcTunnelCodec}


def _codec_for(dialect: str) -> type[Codec]:
    try:
        return CODECS[dialect]
    except KeyError:
        raise ValueError(f"unknown tunnel dialect {dialect!r}; use 'sesame' or 'grpctunnel'") from None


def _paths(codec: type[Codec]) -> tuple[str, str]:
    svc = codec.service  # type: ignore[attr-defined]
    return f"/{svc}/OpenTunnel", f"/{svc}/OpenReverseTunnel"


def _negotiated(md: Sequence[tuple[str, Any]]) -> bool:
    return any(k == NEGOTIATE_KEY and v == "on" for k, v in md or ())


async def _accept(context: grpc.aio.ServicerContext, codec: type[Codec]) -> tuple[tuple, bool]:
    """Answer the headers of a tunnel call this host takes (either direction):
    ``NEGOTIATE_KEY: on`` to a grpctunnel peer that asked for flow-control negotiation,
    else our window/chunk extensions.  Returns the call's metadata and whether it
    negotiated."""
    md = tuple(context.invocation_metadata() or ())
    negotiated = codec is GrpcTunnelCodec and _negotiated(md)
    await context.send_initial_metadata(
        ((NEGOTIATE_KEY, "on"),) if negotiated else ext_metadata(codec))
    return md, negotiated


# A sesame-Python extension to sesame.type, carried in outer-call metadata
# (request headers one way, response headers the other): "I grant each stream
# this receive window and accept data frames this large".  Peers that do not
# send it (Go sesame) get the protocol's fixed 65,535 / 16,256 for our sends;
# what we grant them is ours to choose and always safe.  Fixed small windows
# cap a stream at window/RTT; frames of 16 KiB make grpcio's per-message cost
# dominate bulk transfers (DESIGN.md).
EXT_WINDOW_KEY = "sesame-tunnel-window"
EXT_CHUNK_KEY = "sesame-tunnel-chunk"
# "I read outer messages that carry several frames" (SesameCodec.encode_batch): a unary
# call is then one outer message each way, not three.
EXT_BATCH_KEY = "sesame-tunnel-batch"
# 16 MiB: a stream needs about twice its bandwidth-delay product in credit (data one way,
# window updates the other) plus one update batch; 4 MiB held a 20 ms link at ~100 MiB/s
# (docs/PERFORMANCE.md).  It is also what a slow reader may leave buffered per stream.
EXT_WINDOW = 16 * 1024 * 1024
EXT_CHUNK = 1024 * 1024  # one NetConn message of MAX_MESSAGE per frame


class PeerExt(NamedTuple):
    """What a sesame peer's outer-call metadata grants: the window and largest frame it
    takes, and whether it reads batched outer messages."""

    window: int
    chunk: int
    batch: bool = False


def ext_metadata(codec: type[Codec], *, batch: bool = True) -> tuple[tuple[str, str], ...]:
    """What this side grants its peer (``batch``: it reads batched outer messages; off
    when another process reads the frames, e.g. a peer hub relaying them, that did not say
    so itself)."""
    if codec is not SesameCodec:
        return ()
    md = ((EXT_WINDOW_KEY, str(EXT_WINDOW)), (EXT_CHUNK_KEY, str(EXT_CHUNK)))
    return (*md, (EXT_BATCH_KEY, "1")) if batch else md


def ext_parse(md: Sequence[tuple[str, Any]]) -> PeerExt | None:
    """The peer's :class:`PeerExt` from its outer-call metadata, or None (the fixed
    sizes, one frame per message) unless the window and chunk keys are there as ASCII
    digits in range: ``int`` alone would read ``٦٥٥٣٥``, ``+65535`` or ``65_535``."""
    d = {k: v for k, v in md or () if k in (EXT_WINDOW_KEY, EXT_CHUNK_KEY, EXT_BATCH_KEY)}
    window_text, chunk_text = d.get(EXT_WINDOW_KEY), d.get(EXT_CHUNK_KEY)
    if not all(isinstance(t, str) and len(t) <= 10 and N.ascii_digits(t)
               for t in (window_text, chunk_text)):
        return None
    window, chunk = int(window_text), int(chunk_text)
    if not (65535 <= window <= 2**31 - 1 and 1024 <= chunk <= 4 * 1024 * 1024):
        return None
    return PeerExt(window, chunk, d.get(EXT_BATCH_KEY) == "1")


def ext_forward(peer: PeerExt | None) -> tuple[tuple[str, str], ...]:
    """``peer``'s extension as metadata again, for a relay that passes a peer's frames on
    verbatim (the cluster's hub-to-hub relay): the far end sees what the peer granted."""
    if peer is None:
        return ()
    md = ((EXT_WINDOW_KEY, str(peer.window)), (EXT_CHUNK_KEY, str(peer.chunk)))
    return (*md, (EXT_BATCH_KEY, "1")) if peer.batch else md


def ext_apply(conn: TunnelConnection, peer: PeerExt | None, own: bool) -> None:
    if not isinstance(conn.codec, SesameCodec):
        return
    pol = conn.core.policy
    if own:
        pol = replace(pol, recv_window=EXT_WINDOW, update_threshold=EXT_WINDOW // 8)
    if peer is not None:
        pol = replace(pol, send_window=peer.window, max_chunk=min(EXT_CHUNK, peer.chunk))
        conn.batch = peer.batch
    conn.core.policy = pol


def _apply_settings(conn: TunnelConnection) -> None:
    """grpctunnel.v1 tunnel client: adopt the revision/window the server offered."""
    st = conn.core.peer_settings
    if st is None:
        return
    if 1 in st.revisions:
        conn.core.policy = replace(conn.core.policy, send_window=st.initial_window or 65536)
    else:
        conn.core.policy = GRPCTUNNEL_REV0


class TunnelHost:
    """
    The network-server end of tunnels.

    Forward tunnels (``OpenTunnel``) get the services in ``services``; reverse
    tunnels (``OpenReverseTunnel``) become channels this side can call
    through: :meth:`reverse_channel` round-robins over the live ones.  Serves
    both dialects on their own method paths.
    """

    def __init__(
        self,
        services: ServiceRegistry | None = None,
        *,
        allow_reverse: bool = True,
        dialects: Sequence[str] = ("sesame", "grpctunnel"),
        on_reverse_open: Callable[[TunnelChannel, Sequence[tuple[str, Any]]], Any] | None = None,
        on_reverse_close: Callable[[TunnelChannel], Any] | None = None,
        key: Callable[[Sequence[tuple[str, Any]], str], Any] | None = None,
        bridge: Bridge | None = None,
    ) -> None:
        self.services = services if services is not None else ServiceRegistry()
        self.allow_reverse = allow_reverse
        self.bridge = bridge or get_bridge()
        self._dialects = [_codec_for(d) for d in dialects]
        self._on_open = on_reverse_open
        self._on_close = on_reverse_close
        self._key = key
        self._reverse: dict[Any, list[TunnelConnection]] = {}
        self._rr = itertools.count()
        self._cond = threading.Condition()
        self._conns: set[TunnelConnection] = set()
        self._server: grpc.aio.Server | None = None
        self._draining = False

    # --- grpc plumbing ----------------------------------------------------------

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """A ``grpc.GenericRpcHandler`` answering the forward and reverse tunnel methods of
        every dialect this host speaks, to add to a ``grpc.aio`` server of your own
        (:meth:`start` makes a server with it)."""
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for codec in self._dialects:
            fwd, rev = _paths(codec)
            handlers[fwd] = grpc.stream_stream_rpc_method_handler(self._forward_handler(codec))
            handlers[rev] = grpc.stream_stream_rpc_method_handler(self._reverse_handler(codec))
        return _PathHandler(handlers)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register on a ``grpc.aio`` server that runs on the bridge loop."""
        server.add_generic_rpc_handlers((self.generic_handler(),))

    def _forward_handler(self, codec: type[Codec]) -> Callable:
        async def handler(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            if self.services.empty:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "forward tunnels not supported")
            md, negotiated = await _accept(context, codec)
            conn = TunnelConnection(
                self.bridge, codec(Role.SERVER), ServerOuter(context), Role.SERVER,
                on_stream=stream_factory(self.services), send_settings=negotiated,
            )
            ext_apply(conn, ext_parse(md), own=True)
            if self._draining:
                conn.core.start_drain()
            await self._run(conn, context)

        return handler

    def _reverse_handler(self, codec: type[Codec]) -> Callable:
        async def handler(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            if not self.allow_reverse:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "reverse tunnels not supported")
            md, negotiated = await _accept(context, codec)
            conn = TunnelConnection(
                self.bridge, codec(Role.CLIENT), ServerOuter(context), Role.CLIENT,
                expect_settings=negotiated,
            )
            ext_apply(conn, ext_parse(md), own=True)
            conn.start()
            if negotiated:
                try:
                    await asyncio.wait_for(asyncio.shield(conn.settings_ready), 10)
                except Exception:  # noqa: BLE001
                    conn.terminate(Status(14, "no settings frame from reverse tunnel server"))
                    await self._run(conn, context)
                    return
                _apply_settings(conn)
            key = self._key(md, context.peer()) if self._key else None
            channel = TunnelChannel(self.bridge, lambda: conn)
            with self._cond:
                self._reverse.setdefault(key, []).append(conn)
                self._cond.notify_all()
            if self._on_open:
                _safe(self._on_open, channel, md)
            try:
                await self._run(conn, context)
            finally:
                with self._cond:
                    lst = self._reverse.get(key, [])
                    if conn in lst:
                        lst.remove(conn)
                    if not lst:
                        self._reverse.pop(key, None)
                if self._on_close:
                    _safe(self._on_close, channel)

        return handler

    async def _run(self, conn: TunnelConnection, context: grpc.aio.ServicerContext) -> None:
        self._conns.add(conn)
        try:
            status = await conn.run()
        finally:
            self._conns.discard(conn)
        if not context.cancelled():
            # the client may still be writing: take what it sends (briefly) first, or its
            # writes racing the end of the call turn our status into INTERNAL
            await conn.drain()
        if conn.eof or status.code in (OK, CANCELLED):
            return
        context.set_code(grpc_code(status.code))
        context.set_details(status.message)

    # --- reverse channels ---------------------------------------------------------

    def _pick(self, key: Any) -> TunnelConnection | None:
        with self._cond:
            conns = [c for c in self._reverse.get(key, ()) if not c.is_closed]
            if not conns:
                return None
            return conns[next(self._rr) % len(conns)]

    def reverse_channel(self, key: Any = None) -> TunnelChannel:
        """A channel over the live reverse tunnels with ``key`` (round-robin per call)."""
        return TunnelChannel(self.bridge, lambda: self._pick(key))

    def wait_for_reverse(self, timeout: float | None = None, key: Any = None, count: int = 1) -> bool:
        """Block (never on the loop) until ``count`` reverse tunnels with ``key`` are up."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._reverse.get(key, ())) >= count, timeout)

    def reverse_count(self, key: Any = None) -> int:
        """How many reverse tunnels are open under ``key`` (the default key: peers that
        sent none)."""
        with self._cond:
            return len(self._reverse.get(key, ()))

    @property
    def connections(self) -> int:
        """How many tunnels (forward and reverse) are open on this host."""
        return len(self._conns)

    # --- a server of our own ------------------------------------------------------

    def start(
        self,
        address: str = "127.0.0.1:0",
        credentials: grpc.ServerCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> int:
        """Start a ``grpc.aio`` server for this host on the bridge loop; returns the port."""

        async def go() -> int:
            server = grpc.aio.server(options=list(options))
            self.add_to_server(server)
            port = (server.add_secure_port(address, credentials) if credentials
                    else server.add_insecure_port(address))
            await server.start()
            self._server = server
            return port

        return self.bridge.run(go())

    def stop(self, grace: float | None = 1.0) -> None:
        """Drain every tunnel (new tunnelled calls refused), then stop the server.

        Blocks until done: call it from a thread, never from the reactor or the bridge
        loop (there, use :meth:`astop`).
        """
        self.bridge.run(self.astop(grace))

    async def astop(self, grace: float | None = 1.0, *, close_tunnels: bool = True) -> None:
        """On the bridge loop: refuse new tunnelled calls, close every tunnel (unless
        ``close_tunnels`` is false: the server's stop then cancels them after
        ``grace`` seconds) and stop the server."""
        self._draining = True
        if close_tunnels:
            conns = list(self._conns)
            await asyncio.gather(*(c.aclose(grace) for c in conns), return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)


class _PathHandler(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("tunnel callback failed")


# --- network-client side --------------------------------------------------------


class _OuterChannel:
    """A grpc.aio channel on the bridge loop, made from a target or given."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, Any]]) -> None:
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        else:
            self.channel = grpc.aio.insecure_channel(target, options=list(options))
        self.target = target

    async def close(self) -> None:
        await self.channel.close()


async def _connect(
    bridge: Bridge, target: str, credentials: Any, options: Sequence, metadata: Sequence,
    dialect: str, reverse: bool, services: ServiceRegistry | None,
) -> tuple[TunnelConnection, _OuterChannel]:
    codec = _codec_for(dialect)
    outer_ch = _OuterChannel(target, credentials, options)
    fwd, rev = _paths(codec)
    md = (*tuple(metadata), *ext_metadata(codec))
    if codec is GrpcTunnelCodec:
        md = (*md, (NEGOTIATE_KEY, "on"))
    call = outer_ch.channel.stream_stream(rev if reverse else fwd)(metadata=md)
    negotiated = False
    if codec is GrpcTunnelCodec:
        # grpctunnel servers answer with headers at once; they decide whether
        # settings frames are exchanged.
        headers = await call.initial_metadata()
        negotiated = _negotiated(tuple(headers or ()))
    role = Role.SERVER if reverse else Role.CLIENT
    conn = TunnelConnection(
        bridge, codec(role), ClientOuter(call, target), role,
        on_stream=stream_factory(services) if services is not None else None,
        send_settings=negotiated and reverse,
        expect_settings=negotiated and not reverse,
    )
    ext_apply(conn, None, own=True)
    conn.start()
    if negotiated and not reverse:
        await asyncio.wait_for(asyncio.shield(conn.settings_ready), 10)
        _apply_settings(conn)
    if codec is SesameCodec:
        # A Go server sends no headers until its first frame: never block on
        # them, upgrade our send side whenever they come.
        async def upgrade() -> None:
            try:
                headers = await call.initial_metadata()
            except Exception:  # noqa: BLE001
                return
            ext_apply(conn, ext_parse(tuple(headers or ())), own=False)

        conn.spawn(upgrade())
    return conn, outer_ch


def open_tunnel(
    target: str,
    *,
    dialect: str = "sesame",
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Sequence[tuple[str, Any]] = (),
    options: Sequence[tuple[str, Any]] = (),
    timeout: float | None = 10.0,
    bridge: Bridge | None = None,
) -> TunnelChannel:
    """
    Open a forward tunnel to ``target`` and return a ``grpc.Channel`` whose
    calls run on the services the far end registered.  ``close()`` ends it.
    """
    bridge = bridge or get_bridge()
    conn, outer_ch = bridge.run(
        _connect(bridge, target, credentials, options, metadata, dialect, False, None), timeout
    )

    def close() -> None:
        async def go() -> None:
            await conn.aclose(grace=0)
            await outer_ch.close()

        bridge.run(go(), 10)

    ch = TunnelChannel(bridge, lambda: conn, on_close=close)
    ch.connection = conn  # type: ignore[attr-defined]
    return ch


class ReverseTunnelServer:
    """
    Serve ``services`` to the far end over a reverse tunnel (this process dials
    out; the peer calls in).  ``start()`` opens it, ``wait_closed()`` waits for
    its end, ``stop()`` drains and closes.
    """

    def __init__(
        self,
        target: str,
        services: ServiceRegistry,
        *,
        dialect: str = "sesame",
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, Any]] = (),
        options: Sequence[tuple[str, Any]] = (),
        bridge: Bridge | None = None,
    ) -> None:
        self.target = target
        self.services = services
        self.dialect = dialect
        self.bridge = bridge or get_bridge()
        self._args = (credentials, options, metadata)
        self.connection: TunnelConnection | None = None
        self._outer: _OuterChannel | None = None

    def start(self, timeout: float | None = 10.0) -> ReverseTunnelServer:
        """Dial :attr:`target` and open the reverse tunnel; blocks until the tunnel is
        open (at most ``timeout`` seconds) and returns ``self``.  Not on the reactor
        thread or the bridge loop.

        :raises grpc.RpcError: when the host refuses or cannot be reached.
        :raises TimeoutError: when ``timeout`` passes first.
        """
        credentials, options, metadata = self._args
        self.connection, self._outer = self.bridge.run(
            _connect(self.bridge, self.target, credentials, options, metadata, self.dialect,
                     True, self.services),
            timeout,
        )
        return self

    def wait_closed(self, timeout: float | None = None) -> Status:
        """Block until the tunnel ends and return its final status (OK for a clean end).

        :raises TimeoutError: when ``timeout`` passes first.
        """
        assert self.connection is not None, "start() first"
        conn = self.connection

        async def go() -> Status:
            return await asyncio.shield(conn.closed)

        return self.bridge.run(go(), timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain the tunnel (calls in flight get ``grace`` seconds to finish), then close
        it and the outer channel; blocks until done.  Safe to call before :meth:`start`."""
        conn, outer = self.connection, self._outer
        if conn is None:
            return

        async def go() -> None:
            await conn.aclose(grace)
            if outer is not None:
                await outer.close()

        self.bridge.run(go(), (grace or 0) + 10)


__all__ = ["DIALECTS", "ReverseTunnelServer", "TunnelHost", "open_tunnel"]
