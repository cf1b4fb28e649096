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
import time
from collections import deque
from typing import Any

import grpc

from sesame.bridge import TunnelConnection
from sesame.core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    OK,
    UNKNOWN,
    Status,
    StreamRequested,
    TunnelError,
    handler_status,
    parse_timeout,
)


def is_async_handler(handler: grpc.RpcMethodHandler) -> bool:
    fn = (handler.unary_unary or handler.unary_stream or handler.stream_unary
          or handler.stream_stream)
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


class _AbortError(Exception):
    pass


class AsyncTunnelContext:
    """The context an async servicer method gets for a tunnelled call."""

    def __init__(self, stream: AsyncServedStream) -> None:
        self._s = stream
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple = ()

    async def read(self) -> Any:
        return await self._s.read()

    async def write(self, message: Any) -> None:
        await self._s.write(message)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._s.send_headers(tuple(initial_metadata))

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailers = tuple(trailing_metadata)
        raise _AbortError(details)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailers = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailers

    def invocation_metadata(self) -> tuple:
        return self._s.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def peer(self) -> str:
        return self._s.conn.outer.peer()

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict:
        return {}

    def time_remaining(self) -> float | None:
        d = self._s.deadline
        return None if d is None else max(d - time.monotonic(), 0.0)

    def done(self) -> bool:
        return self._s.ended

    def cancelled(self) -> bool:
        return self._s.ended and self._s.end_status is not None and self._s.end_status.code != OK

    def add_done_callback(self, cb: Any) -> None:
        self._s.done_callbacks.append(cb)

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def final_status(self) -> tuple[Status, tuple]:
        code = self._code.value[0] if self._code is not None else OK
        return handler_status(code, self._details, self._trailers)


class AsyncServedStream:
    """One tunnelled call handled by an async servicer method (a StreamHandler)."""

    def __init__(self, conn: TunnelConnection, ev: StreamRequested,
                 handler: grpc.RpcMethodHandler) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.sid = ev.stream_id
        self.method = ev.method
        self.handler = handler
        self.deadline: float | None = None
        md = []
        for k, v in ev.headers:
            if k == "grpc-timeout" and isinstance(v, str):
                t = parse_timeout(v)
                if t is not None:
                    self.deadline = time.monotonic() + t
            else:
                md.append((k, v))
        self.metadata = tuple(md)
        self.requests: deque[tuple[bytes, int]] = deque()
        self.requests_done = False
        self.ended = False
        self.end_status: Status | None = None
        self.done_callbacks: list[Any] = []
        self._read_wake: asyncio.Future[None] | None = None
        self._write_wake: asyncio.Future[None] | None = None
        self._got_request = False
        self.task: asyncio.Task[None] | None = None
        self.timer = None
        if self.deadline is not None:
            self.timer = self.loop.call_later(max(self.deadline - time.monotonic(), 0),
                                              self._expire)
        if handler.request_streaming:
            self._start()

    # --- StreamHandler (loop) -------------------------------------------------------

    def _expire(self) -> None:
        self.timer = None
        self.conn.cancel(self.sid, Status(DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def on_headers(self, headers: tuple) -> None:  # pragma: no cover - client-side event
        pass

    def on_message(self, data: bytes, cost: int) -> None:
        if not self.handler.request_streaming:
            if self._got_request:
                self.conn.close_stream(self.sid, Status(
                    INVALID_ARGUMENT,
                    f"Already received request for non-client-stream method {self.method}"))
                return
            self._got_request = True
            self.conn.consumed(self.sid, cost)
            self.requests.append((data, 0))
            return
        self.requests.append((data, cost))
        self._wake_read()

    def on_requests_ended(self) -> None:
        self.requests_done = True
        self._wake_read()
        if not self.handler.request_streaming and self.task is None:
            if not self._got_request:
                self.requests.append((b"", 0))
            self._start()

    def on_writable(self) -> None:
        w = self._write_wake
        if w is not None and not w.done():
            w.set_result(None)

    def on_end(self, status: Status, trailers: tuple, local: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
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
                de = self.handler.request_deserializer
                return de(data) if de else data
            if self.requests_done or self.ended:
                return grpc.aio.EOF
            self._read_wake = self.loop.create_future()
            await self._read_wake
            self._read_wake = None

    async def _request_iter(self) -> Any:
        while True:
            msg = await self.read()
            if msg is grpc.aio.EOF:
                return
            yield msg

    async def write(self, message: Any) -> None:
        if self.ended:
            raise asyncio.CancelledError()
        ser = self.handler.response_serializer
        data = ser(message) if ser else message
        core = self.conn.core
        try:
            self.conn.send_message(self.sid, data)
        except TunnelError as exc:
            raise asyncio.CancelledError() from exc
        while core.queued_bytes(self.sid) > core.send_low_water and not self.ended:
            self._write_wake = self.loop.create_future()
            await self._write_wake
            self._write_wake = None

    def send_headers(self, headers: tuple) -> None:
        if self.conn.core.is_live(self.sid):
            try:
                self.conn.send_headers(self.sid, headers)
            except TunnelError:
                pass

    def _start(self) -> None:
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        ctx = AsyncTunnelContext(self)
        h = self.handler
        try:
            if h.request_streaming:
                arg: Any = self._request_iter()
            else:
                data, _ = self.requests.popleft()
                de = h.request_deserializer
                arg = de(data) if de else data
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
        except _AbortError:
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
