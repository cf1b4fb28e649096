"""
Async servicer methods over tunnels: they run as tasks on the bridge loop,
with a ``grpc.aio``-style context (``await context.read()``,
``await context.write()``, ``await context.abort()``), and take no thread.

This is what keeps a remote serving thousands of NetConn connections at a
fixed thread count.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import grpc

from sesame.bridge import TunnelConnection
from sesame.core import (
    CANCELLED,
    OK,
    UNKNOWN,
    Status,
    StreamRequested,
    TunnelError,
)
from sesame.tunnel._served import Abort, ServedCall, ServedContext


def is_async_handler(handler: grpc.RpcMethodHandler) -> bool:
    fn = (handler.unary_unary or handler.unary_stream or handler.stream_unary
          or handler.stream_stream)
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


class AsyncTunnelContext(ServedContext):
    """The context an async servicer method gets for a tunnelled call."""

    _s: AsyncServedStream

    async def read(self) -> Any:
        return await self._s.read()

    async def write(self, message: Any) -> None:
        await self._s.write(message)

    async def flushed(self) -> None:
        """Return once the tunnel's writer has written the batch it is writing (at once
        when it has nothing to write).  ``write`` returns as soon as a message is queued;
        a byte relay that awaits this after its writes coalesces what arrives meanwhile
        into one message."""
        await self._s.flushed()

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._s.send_headers(tuple(initial_metadata))

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        if trailing_metadata:
            self._trailers = tuple(trailing_metadata)
        self._abort(code, details)

    def done(self) -> bool:
        return self._s.ended

    def cancelled(self) -> bool:
        return self._s.ended and self._s.end_status is not None and self._s.end_status.code != OK

    def add_done_callback(self, cb: Any) -> None:
        self._s.done_callbacks.append(cb)


class AsyncServedStream(ServedCall):
    """One tunnelled call handled by an async servicer method (a StreamHandler)."""

    earliest_timeout = False  # the last grpc-timeout counts (split_timeout)

    def __init__(self, conn: TunnelConnection, ev: StreamRequested,
                 handler: grpc.RpcMethodHandler) -> None:
        super().__init__(conn, ev, handler)
        self.loop = conn.loop
        self.done_callbacks: list[Any] = []
        self._read_wake: asyncio.Future[None] | None = None
        self._write_wake: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._begin()

    # --- StreamHandler (loop) -------------------------------------------------------

    def _queue(self, data: bytes, cost: int) -> None:
        self.requests.append((data, cost))
        self._wake_read()

    def _requests_ended(self) -> None:
        self.requests_done = True
        self._wake_read()

    def on_writable(self) -> None:
        w = self._write_wake
        if w is not None and not w.done():
            w.set_result(None)

    def on_end(self, status: Status, trailers: tuple, local: bool) -> None:
        self._stop_timer()
        self.ended = True
        self.end_status = status
        self._wake_read()
        self.on_writable()
        t = self.task
        if t is not None and not t.done() and status.code != OK:
            t.cancel()
        for cb in self.done_callbacks:
            try:
                cb(self)
            except Exception:  # noqa: BLE001
                pass
        self.done_callbacks.clear()

    def _wake_read(self) -> None:
        w = self._read_wake
        if w is not None and not w.done():
            w.set_result(None)

    # --- the handler's view -----------------------------------------------------------

    async def read(self) -> Any:
        while True:
            if self.requests:
                data, cost = self.requests.popleft()
                if cost:
                    self.conn.consumed(self.sid, cost)
                return self._deserialize(data)
            if self.requests_done or self.ended:
                return grpc.aio.EOF
            self._read_wake = self.loop.create_future()
            await self._read_wake
            self._read_wake = None

    async def request_iterator(self) -> Any:
        while True:
            msg = await self.read()
            if msg is grpc.aio.EOF:
                return
            yield msg

    async def write(self, message: Any) -> None:
        if self.ended:
            raise asyncio.CancelledError()
        data = self._serialize(message)
        core = self.conn.core
        try:
            self.conn.send_message(self.sid, data)
        except TunnelError as exc:
            raise asyncio.CancelledError() from exc
        while core.queued_bytes(self.sid) > core.send_low_water and not self.ended:
            self._write_wake = self.loop.create_future()
            await self._write_wake
            self._write_wake = None

    async def flushed(self) -> None:
        if self.ended:
            return
        fut = self.loop.create_future()

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        if self.conn.after_write(done):
            await fut

    def send_headers(self, headers: tuple) -> None:
        self._send_headers_now(headers)  # sent twice: ignored

    def _start(self) -> None:
        self.started = True
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        ctx = AsyncTunnelContext(self)
        h = self.handler
        try:
            arg = self._argument()
            fn = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
            if inspect.isasyncgenfunction(fn):
                async for resp in fn(arg, ctx):
                    await self.write(resp)
            else:
                resp = await fn(arg, ctx)
                if resp is not None and not h.response_streaming:
                    await self.write(resp)
                elif resp is not None and h.response_streaming:
                    pass  # reader/writer style handlers return None
            status, trailers = ctx.final_status()
        except Abort:
            status, trailers = ctx.final_status()
        except asyncio.CancelledError:
            if self.ended:
                return
            status, trailers = Status(CANCELLED, "handler cancelled"), ()
        except Exception as exc:  # noqa: BLE001
            if self.ended:
                return
            status = Status(UNKNOWN, f"Exception calling application: {exc}")
            trailers = ctx.final_status()[1]
        if not self.ended:
            self.conn.close_stream(self.sid, status, trailers)
