"""
A live tunnel: a :class:`~sesame.core._machine.TunnelCore` driven by one outer
``grpc.aio`` bidi call, on the bridge loop.

:class:`TunnelConnection` reads outer messages, feeds the core, dispatches
its events to per-stream objects (client calls or served handlers) and writes
what the core wants sent.  All of its methods run on the bridge loop; other
threads reach it through ``bridge.post``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from sesame import core as _core
from sesame._wire import only_field, varint, wrap_field
from sesame.bridge._loop import Bridge
from sesame.core import (
    BATCH_BYTES,
    BATCH_FRAME_MAX,
    CANCELLED,
    UNAVAILABLE,
    Codec,
    Frame,
    Role,
    Settings,
    Status,
    TunnelCore,
    encode_batch,
)

log = logging.getLogger("sesame.tunnel")


class OuterStream(Protocol):
    """What a tunnel needs from the outer gRPC call, whichever side holds it."""

    async def read(self) -> bytes | None:
        """The next tunnel frame's bytes; None at the end of the stream."""
        ...

    async def write(self, data: bytes) -> None:
        """Send one encoded tunnel frame (waits while grpc's flow control says so)."""
        ...

    async def done_writing(self) -> None:
        """Half-close: no more frames from this side."""
        ...

    def cancel(self) -> None:
        """Cancel the outer call (both directions end at once)."""
        ...

    def peer(self) -> str:
        """The far end of the outer call, as grpc names it (``ipv4:127.0.0.1:5000``)."""
        ...

    def metadata(self) -> tuple[tuple[str, Any], ...]:
        """The far end's metadata of the outer call (its headers), once known."""
        ...


class ClientOuter(OuterStream):
    """The network-client end: a ``grpc.aio`` StreamStreamCall."""

    def __init__(self, call: grpc.aio.StreamStreamCall, target: str) -> None:
        self.call = call
        self._target = target
        self._md: tuple[tuple[str, Any], ...] = ()

    async def read(self) -> bytes | None:
        msg = await self.call.read()
        if msg is grpc.aio.EOF:
            return None
        return msg

    async def write(self, data: bytes) -> None:
        await self.call.write(data)

    async def done_writing(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()

    def peer(self) -> str:
        return self._target

    def metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._md


class ServerOuter(OuterStream):
    """The network-server end: a ``grpc.aio`` ServicerContext."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self._cancelled = False

    async def read(self) -> bytes | None:
        msg = await self.context.read()
        if msg is grpc.aio.EOF:
            return None
        return msg

    async def write(self, data: bytes) -> None:
        await self.context.write(data)

    async def done_writing(self) -> None:
        return None  # the handler returning ends the call

    def cancel(self) -> None:
        self._cancelled = True

    def peer(self) -> str:
        return self.context.peer()

    def metadata(self) -> tuple[tuple[str, Any], ...]:
        return tuple(self.context.invocation_metadata() or ())


#: :func:`drain_requests`: at most this many seconds in all, and ...
DRAIN_LIMIT = 1.0
#: ... stop once no message came for this many seconds (the client is not sending).
DRAIN_IDLE = 0.1


async def drain_requests(read: Callable[[], Any], limit: float = DRAIN_LIMIT,
                         idle: float = DRAIN_IDLE) -> int:
    """Read and discard a server call's remaining requests (``read``: ``context.read``)
    until the client half-closes, a read fails, no message comes for ``idle`` seconds or
    ``limit`` seconds pass; how many were discarded.

    Run before a server ends a call the client may still be writing to: grpc-core reports
    a status that races the client's writes as INTERNAL "Internal error from Core" at the
    client instead of the status (a bare grpc.aio server that aborts after one message of
    five loses its status to INTERNAL in most calls; none when it drains first)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    n = 0
    while True:
        left = min(end - loop.time(), idle)
        if left <= 0:
            return n
        try:
            msg = await asyncio.wait_for(read(), left)
        except Exception:  # noqa: BLE001 - quiet (TimeoutError), or the call is over
            return n
        if msg is grpc.aio.EOF or msg is None:  # None: OuterStream.read's end
            return n
        n += 1


# --- wrapping tunnel frames in Stream messages (field 3 in all four types) ------------


def _no_parts(frame: Any) -> None:
    return None


def wrap_tunnel(frame: bytes) -> bytes:
    """``StreamRequest{tunnel}`` / ``StreamResponse{tunnel}`` around encoded frame bytes."""
    return wrap_field(0x1A, frame)


def unwrap_tunnel(msg: bytes, cls: type, *, view: bool = False) -> bytes | memoryview | None:
    """The frame bytes inside a Stream message, or None if it is not a tunnel frame
    (``view``: a memoryview into ``msg`` rather than a copy, for a reader that copies
    what it keeps)."""
    frame = only_field(memoryview(msg) if view else msg, 0x1A)
    if frame is not None:
        return frame
    pb = cls.FromString(msg)
    if pb.WhichOneof("data") == "tunnel":
        return pb.tunnel.SerializeToString()
    return None


class StreamOuter(OuterStream):
    """Outer-stream adapter for a tunnel carried by a ``Stream`` call."""

    def __init__(self, reader: Any, writer: Any, in_cls: type, peer: str,
                 done_writing: Any = None, cancel: Any = None) -> None:
        self._read = reader
        self._write = writer
        self._in_cls = in_cls
        self._peer = peer
        self._done_writing = done_writing
        self._cancel = cancel

    async def read(self) -> bytes | memoryview | None:
        msg = await self._read()
        if msg is grpc.aio.EOF:
            return None
        # a view into the message, not a copy: the codec copies the payload out once
        frame = unwrap_tunnel(msg, self._in_cls, view=True)
        return frame if frame is not None else b""  # b"" decodes as an invalid frame

    async def write(self, data: bytes) -> None:
        await self._write(wrap_tunnel(data))

    async def write_parts(self, head: bytes, data: bytes) -> None:
        """Send the frame ``head + data`` wrapped, with one copy of ``data``."""
        await self._write(b"".join((b"\x1a", varint(len(head) + len(data)), head, data)))

    async def done_writing(self) -> None:
        if self._done_writing is not None:
            await self._done_writing()

    def raw(self) -> tuple[Any, Any]:
        """The underlying call's ``read`` and ``write`` of whole (wrapped) messages, for
        a relay that forwards them verbatim (:mod:`sesame.hub.cluster`)."""
        return self._read, self._write

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()

    def peer(self) -> str:
        return self._peer

    def metadata(self) -> tuple:
        return ()


def call_each(cbs: list[Callable[[], Any]]) -> None:
    """Call every callback in order; one that raises is logged and the rest still run
    (after-write callbacks run inside a writer, which must not die of them)."""
    for cb in cbs:
        try:
            cb()
        except Exception:
            log.exception("after-write callback failed")


def _peer_broke_protocol(events: list[_core.Event], status: Status) -> list[_core.Event]:
    """(tunnel client) The events of a frame that ended the tunnel as a protocol error,
    with the calls' ends turned into UNAVAILABLE: the calls' own side did nothing wrong,
    their tunnel died (docs/TUNNELS.md); the core's status (INVALID_ARGUMENT, UNKNOWN,
    ...) is kept in the message."""
    blamed = Status(UNAVAILABLE, f"the remote end broke the tunnel protocol: {status.message}")
    return [dataclasses.replace(ev, status=blamed)
            if type(ev) is _core.StreamEnded and ev.status is status else ev
            for ev in events]


class StreamHandler(Protocol):
    """Receives the core's per-stream events (client call or served stream)."""

    def on_headers(self, headers: tuple) -> None: ...
    def on_message(self, data: bytes, cost: int) -> None: ...
    def on_requests_ended(self) -> None: ...
    def on_writable(self) -> None: ...
    def on_end(self, status: Status, trailers: tuple, local: bool) -> None: ...


class TunnelConnection:
    """
    One tunnel on the bridge loop.

    :param on_stream: server role only; called with (connection, event) for
        each :class:`~sesame.core._machine.StreamRequested` and must return the
        stream's :class:`StreamHandler` (or refuse the stream itself and
        return ``None``).
    """

    def __init__(
        self,
        bridge: Bridge,
        codec: Codec,
        outer: OuterStream,
        role: Role,
        *,
        on_stream: Callable[[TunnelConnection, _core.StreamRequested], StreamHandler | None]
        | None = None,
        send_settings: bool = False,
        expect_settings: bool = False,
        max_receive_message: int = _core.DEFAULT_MAX_RECEIVE_MESSAGE,
        max_send_message: int = _core.MAX_SEND_MESSAGE,
    ) -> None:
        self.bridge = bridge
        self.loop = bridge.loop
        self.codec = codec
        self.outer = outer
        self.role = role
        self.core = TunnelCore(
            role,
            codec.policy,
            strict_ids=codec.strict_ids,
            first_stream_id=codec.first_stream_id,
            max_receive_message=max_receive_message,
            max_send_message=max_send_message,
            expect_settings=expect_settings,
        )
        self.streams: dict[int, StreamHandler] = {}
        self._on_stream = on_stream
        self._outq: list[Frame] = []
        self._wake: asyncio.Future[None] | None = None
        self._writer_done = False
        self._writing = False  # the writer is awaiting a batch's writes
        #: the peer reads several frames per outer message (sesame.tunnel.ext_apply)
        self.batch = False
        self._after_write: list[Callable[[], Any]] = []
        self.closed: asyncio.Future[Status] = self.loop.create_future()
        self._drained_waiters: list[asyncio.Future[None]] = []
        self._close_callbacks: list[Callable[[Status], Any]] = []
        self.settings_ready: asyncio.Future[None] = self.loop.create_future()
        if not expect_settings:
            self.settings_ready.set_result(None)
        if send_settings:
            self._outq.append(Settings(-1, (0, 1), codec.policy.recv_window))
        self._tasks: list[asyncio.Task[Any]] = []
        self.eof = False  # the peer ended the outer call cleanly
        self._closing = False  # aclose() ends the outer call itself

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._writer_task = self.loop.create_task(self._writer())
        self._reader_task = self.loop.create_task(self._reader())
        self._tasks.append(self._reader_task)
        self._tasks.append(self._writer_task)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this tunnel: cancelled when the tunnel closes."""
        task = self.loop.create_task(coro)
        self._tasks.append(task)
        return task

    async def run(self) -> Status:
        """Start (if needed) and wait until the tunnel is over."""
        if not self._tasks:
            self.start()
        return await asyncio.shield(self.closed)

    def add_close_callback(self, cb: Callable[[Status], Any]) -> None:
        if self.closed.done():
            cb(self.closed.result())
        else:
            self._close_callbacks.append(cb)

    @property
    def is_closed(self) -> bool:
        return self.core.terminated is not None

    def terminate(self, status: Status, *, by_peer: bool = False) -> None:
        """End the tunnel: every open stream ends with ``status``."""
        if self.core.terminated is None:
            self.core.terminate(status, by_peer=by_peer)
            self.pump()

    async def aclose(self, grace: float | None = 5.0) -> None:
        """Close politely: drain, flush what is queued, end the outer call."""
        self._closing = True
        if self.is_closed:
            await self._finish_outer()
            return
        self.core.start_drain()
        self.pump()
        if self.core.open_streams and grace:
            fut = self.loop.create_future()
            self._drained_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, grace)
            except TimeoutError:
                pass
        self.terminate(Status(CANCELLED, "tunnel closed"))
        await self._finish_outer()

    async def _finish_outer(self) -> None:
        # Let the writer flush, then half-close (client end) and give the
        # peer a moment to end the call before cancelling it.
        self._writer_done = True
        self._kick()
        t = getattr(self, "_writer_task", None)
        if t is not None and not t.done():
            try:
                await asyncio.wait_for(asyncio.shield(t), 2)
            except (TimeoutError, Exception):  # noqa: BLE001
                t.cancel()
        try:
            await asyncio.wait_for(self.outer.done_writing(), 2)
        except Exception:  # noqa: BLE001
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 2)
        except TimeoutError:
            self.outer.cancel()
            self._finish(Status(CANCELLED, "tunnel closed"))

    async def drain(self, limit: float = DRAIN_LIMIT, idle: float = DRAIN_IDLE) -> int:
        """Once the tunnel is over: read and discard what the peer still sends on the outer
        call (:func:`drain_requests`), so that a server end's status is not lost to the
        peer's writes racing it.  Nothing when the peer ended its side already or the
        tunnel's reader still reads; how many messages were discarded."""
        reader = getattr(self, "_reader_task", None)
        if self.eof or reader is None or not reader.done():
            return 0
        return await drain_requests(self.outer.read, limit, idle)

    def _finish(self, status: Status) -> None:
        self.terminate(status)
        self._writer_done = True
        self._kick()
        if not self.closed.done():
            self.closed.set_result(status)
            for cb in self._close_callbacks:
                try:
                    cb(status)
                except Exception:
                    log.exception("tunnel close callback failed")
            self._close_callbacks.clear()

    # --- I/O tasks ------------------------------------------------------------

    async def _reader(self) -> None:
        decode = self.codec.decode
        batched = self.codec.decode_batch
        core = self.core
        status = Status(UNAVAILABLE, "tunnel closed by peer")
        try:
            while True:
                data = await self.outer.read()
                if data is None:
                    self.eof = True
                    break
                frames = batched(data)
                if frames is None:
                    events = core.receive_frame(decode(data))
                    if core.terminated is not None and self.role is Role.CLIENT:
                        events = _peer_broke_protocol(events, core.terminated)
                    self.pump(events)
                else:
                    for frame in frames:
                        events = core.receive_frame(frame)
                        if core.terminated is not None and self.role is Role.CLIENT:
                            events = _peer_broke_protocol(events, core.terminated)
                        self.pump(events)
                        if core.terminated is not None:
                            break
                if core.terminated is not None:
                    status = core.terminated
                    break
        except asyncio.CancelledError:
            status = Status(UNAVAILABLE, "tunnel cancelled")
        except grpc.aio.AioRpcError as exc:
            status = Status(UNAVAILABLE, f"tunnel failed: {exc.code().name}: {exc.details()}")
        except grpc.aio.UsageError:
            status = Status(UNAVAILABLE, "tunnel call finished")
        except Exception as exc:
            log.exception("tunnel reader failed")
            status = Status(UNAVAILABLE, f"tunnel failed: {exc}")
        if core.terminated is None:
            self.terminate(status, by_peer=True)
        else:
            status = core.terminated
        # the writer ends once it has flushed the close frames
        self._writer_done = True
        self._kick()
        for t in self._tasks:
            if t is not asyncio.current_task() and not t.done():
                try:
                    await asyncio.wait_for(asyncio.shield(t), 2)
                except Exception:  # noqa: BLE001
                    t.cancel()
        if not self.eof and not self._closing:
            # The tunnel is over but the peer has not ended the outer call: end it here
            # (the close frames are flushed).  A client end of the call would otherwise
            # stay open for ever, unread (grpc cannot even deliver its status behind
            # unread messages); a server end (ServerOuter) ends when its handler returns.
            self.outer.cancel()
        self._finish(status)

    async def _writer(self) -> None:
        encode = self.codec.encode
        write = self.outer.write
        # message frames straight into the outer envelope (one copy of the payload, not two)
        # where both sides can: the sesame codec and the Stream outer call
        parts = getattr(self.codec, "encode_parts", None)
        write_parts = getattr(self.outer, "write_parts", None)
        if parts is None or write_parts is None:
            parts = _no_parts
        try:
            while True:
                if not self._outq:
                    if self._writer_done:
                        return
                    self._wake = self.loop.create_future()
                    await self._wake
                    self._wake = None
                    continue
                batch, self._outq = self._outq, []
                self._writing = True
                if self.batch and len(batch) > 1:
                    await self._write_batched(batch, parts, write_parts)
                else:
                    for frame in batch:
                        two = parts(frame)
                        if two is not None:
                            await write_parts(*two)
                        else:
                            await write(encode(frame))
                self._writing = False
                if self._after_write:
                    self._run_after_write()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not self.is_closed:
                self.terminate(Status(UNAVAILABLE, f"tunnel write failed: {exc}"))
        finally:
            self._writing = False
            self._writer_done = True
            self._run_after_write()  # nobody waits for a writer that is gone

    async def _write_batched(self, batch: list[Frame], parts: Callable, write_parts: Any) -> None:
        """``batch`` as few outer messages as the peer takes: small frames together
        (:func:`sesame.core.encode_batch`), large ones alone as usual."""
        encode = self.codec.encode
        write = self.outer.write

        def message(group: list[bytes]) -> bytes:  # a lone frame needs no container
            return group[0] if len(group) == 1 else encode_batch(group)

        group: list[bytes] = []
        size = 0
        for frame in batch:
            data = getattr(frame, "data", None)
            if data is not None and len(data) >= BATCH_FRAME_MAX:
                if group:
                    await write(message(group))
                    group, size = [], 0
                two = parts(frame)
                await (write_parts(*two) if two is not None else write(encode(frame)))
                continue
            f = encode(frame)
            group.append(f)
            size += len(f)
            if size >= BATCH_BYTES:
                await write(message(group))
                group, size = [], 0
        if group:
            await write(message(group))

    def after_write(self, cb: Callable[[], Any]) -> bool:
        """Call ``cb`` once the writer has written the batch of frames it is writing (or,
        idle with frames queued, the batch it takes next), and return True; or return False
        (and never call it) when there is nothing to write: what is sent now leaves at
        once.  Byte relays use it to coalesce what arrives while the outer call is busy
        into one message (:class:`sesame.netconn._wire.Coalescer`).  The writer ending calls
        every waiting ``cb``."""
        if self._writer_done or not (self._writing or self._outq):
            return False
        self._after_write.append(cb)
        return True

    def _run_after_write(self) -> None:
        cbs, self._after_write = self._after_write, []
        call_each(cbs)

    def _kick(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    # --- core driving (loop only) -----------------------------------------------

    def pump(self, events: list[_core.Event] | None = None) -> None:
        """Dispatch the core's events and queue its frames for writing."""
        core = self.core
        if events is None:
            events = core.take_events()
        while events:
            for ev in events:
                self._dispatch(ev)
            events = core.take_events()
        out = core.data_to_send()
        if out:
            if self._outq:
                self._outq.extend(out)
            else:
                self._outq = out
            self._kick()

    def _dispatch(self, ev: _core.Event) -> None:
        t = type(ev)
        if t is _core.MessageReceived:
            h = self.streams.get(ev.stream_id)
            if h is not None:
                h.on_message(ev.data, ev.cost)
        elif t is _core.StreamWritable:
            h = self.streams.get(ev.stream_id)
            if h is not None:
                h.on_writable()
        elif t is _core.HeadersReceived:
            h = self.streams.get(ev.stream_id)
            if h is not None:
                h.on_headers(ev.headers)
        elif t is _core.RequestsEnded:
            h = self.streams.get(ev.stream_id)
            if h is not None:
                h.on_requests_ended()
        elif t is _core.StreamEnded:
            h = self.streams.pop(ev.stream_id, None)
            if h is not None:
                h.on_end(ev.status, ev.trailers, ev.local)
        elif t is _core.StreamRequested:
            if self._on_stream is None:
                self.core.refuse_stream(
                    ev.stream_id, Status(12, f"{ev.method} not implemented")
                )
                return
            h = self._on_stream(self, ev)
            if h is not None:
                self.streams[ev.stream_id] = h
        elif t is _core.SettingsReceived:
            if not self.settings_ready.done():
                self.settings_ready.set_result(None)
        elif t is _core.Drained:
            for f in self._drained_waiters:
                if not f.done():
                    f.set_result(None)
            self._drained_waiters.clear()
        elif t is _core.TunnelTerminated:
            if not self.settings_ready.done():
                self.settings_ready.set_exception(
                    ConnectionError(f"tunnel closed: {ev.status.message}")
                )
                self.settings_ready.exception()  # mark retrieved

    # --- operations other threads post here -------------------------------------

    def open_stream(self, method: str, headers: tuple, handler: StreamHandler) -> int:
        sid = self.core.open_stream(method, headers)
        self.streams[sid] = handler
        self.pump()
        return sid

    def send_message(self, sid: int, data: bytes) -> None:
        self.core.send_message(sid, data)
        self.pump()

    def half_close(self, sid: int) -> None:
        if self.core.is_live(sid):
            self.core.half_close(sid)
            self.pump()

    def cancel(self, sid: int, status: Status | None = None) -> None:
        self.core.cancel(sid, status)
        self.pump()

    def consumed(self, sid: int, cost: int) -> None:
        self.core.consumed(sid, cost)
        out = self.core.data_to_send()
        if out:
            self._outq.extend(out)
            self._kick()

    def send_headers(self, sid: int, headers: tuple) -> None:
        self.core.send_headers(sid, headers)
        self.pump()

    def close_stream(self, sid: int, status: Status, trailers: tuple = ()) -> None:
        if self.core.is_live(sid):
            self.core.close_stream(sid, status, trailers)
        self.pump()
