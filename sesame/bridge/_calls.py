"""
Loop-side bidi calls with raw-bytes messages, whatever carries them.

A :class:`LoopCall` lives on the bridge loop and is driven by callbacks, so
byte relays (NetConn, port forwarding) need no thread per call:

* :class:`AioLoopCall` — an ordinary ``grpc.aio`` stream-stream call;
* :class:`TunnelLoopCall` — a stream inside a tunnel (drives the tunnel core
  directly, no extra tasks at all).

Both give the same contract: ``send`` never blocks and reports how much is
buffered (``buffered``) so the producer can pause; ``on_writable`` fires
when the buffer drains below the low-water mark; ``pause_reading`` stops
pulling messages (gRPC / tunnel flow control then holds the sender back).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from sesame.bridge._connection import TunnelConnection, call_each
from sesame.core import CANCELLED, UNAVAILABLE, Status, TunnelError

MessageCallback = Callable[[bytes], None]
EndCallback = Callable[[Status, tuple], None]

HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


def _noop(*_: Any) -> None:
    return None


class LoopCall:
    """Common state and the callback slots; see the module docstring."""

    def __init__(self) -> None:
        self.on_headers: Callable[[tuple], None] = _noop
        self.on_message: MessageCallback = _noop
        self.on_end: EndCallback = _noop
        self.on_writable: Callable[[], None] = _noop
        self.status: Status | None = None
        self.trailers: tuple = ()
        self.headers: tuple | None = None
        self._reading_paused = False

    @property
    def done(self) -> bool:
        return self.status is not None

    def _finish(self, status: Status, trailers: tuple = ()) -> None:
        if self.status is not None:
            return
        self.status = status
        self.trailers = trailers
        self.on_end(status, trailers)

    # subclass API
    def send(self, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def buffered(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def half_close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def cancel(self, status: Status | None = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_write(self, cb: Callable[[], None]) -> bool:
        """Call ``cb`` once what the call is writing now has been written, and return
        True; False (and no call) when nothing is being written: what is sent now leaves
        at once.  A relay coalesces what arrives meanwhile into one message."""
        return False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


class AioLoopCall(LoopCall):
    """A ``grpc.aio`` stream-stream call (raw bytes both ways)."""

    def __init__(
        self, channel: grpc.aio.Channel, method: str, metadata: Sequence[tuple[str, Any]] = (),
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.channel = channel  # the call must not outlive a collected channel
        self.call = channel.stream_stream(method)(metadata=tuple(metadata), timeout=timeout)
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._wake_writer: asyncio.Future[None] | None = None
        self._wake_reader: asyncio.Future[None] | None = None
        self._closing = False
        self._writing = False
        self._after: list[Callable[[], None]] = []
        self._writer = self.loop.create_task(self._write_loop())
        self._reader = self.loop.create_task(self._read_loop())

    def send(self, data: bytes) -> None:
        if self.status is not None or self._closing:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        self._kick_writer()

    def buffered(self) -> int:
        return self._out_bytes

    def half_close(self) -> None:
        self._closing = True
        self._kick_writer()

    def after_write(self, cb: Callable[[], None]) -> bool:
        if self.status is not None or self._writer.done() or not (self._writing or self._out):
            return False
        self._after.append(cb)
        return True

    def _run_after(self) -> None:
        cbs, self._after = self._after, []
        call_each(cbs)

    def cancel(self, status: Status | None = None) -> None:
        if self.status is None:
            self.call.cancel()
            self._finish(status or Status(CANCELLED, "cancelled"))
        self._kick_writer()

    def resume_reading(self) -> None:
        super().resume_reading()
        w = self._wake_reader
        if w is not None and not w.done():
            w.set_result(None)

    def _kick_writer(self) -> None:
        w = self._wake_writer
        if w is not None and not w.done():
            w.set_result(None)

    async def _write_loop(self) -> None:
        try:
            while self.status is None:
                if not self._out:
                    if self._closing:
                        await self.call.done_writing()
                        return
                    self._wake_writer = self.loop.create_future()
                    await self._wake_writer
                    self._wake_writer = None
                    continue
                data = self._out.popleft()
                self._writing = True
                await self.call.write(data)
                self._writing = False
                before = self._out_bytes
                self._out_bytes -= len(data)
                if before > LOW_WATER >= self._out_bytes:
                    self.on_writable()
                if self._after and not self._out:
                    self._run_after()
        except (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            return
        except Exception:  # noqa: BLE001 - the read side reports the call's fate
            return
        finally:
            self._writing = False
            self._run_after()

    async def _read_loop(self) -> None:
        call = self.call
        try:
            headers = await call.initial_metadata()
            self.headers = tuple(headers or ())
            self.on_headers(self.headers)
            while True:
                if self._reading_paused:
                    self._wake_reader = self.loop.create_future()
                    await self._wake_reader
                    self._wake_reader = None
                    continue
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                self.on_message(msg)
            code = await call.code()
            details = await call.details()
            trailers = tuple(await call.trailing_metadata() or ())
            self._finish(Status(code.value[0], details or ""), trailers)
        except grpc.aio.AioRpcError as exc:
            self._finish(Status(exc.code().value[0], exc.details() or ""),
                         tuple(exc.trailing_metadata() or ()))
        except asyncio.CancelledError:
            self._finish(Status(CANCELLED, "cancelled"))
        except Exception as exc:  # noqa: BLE001
            self._finish(Status(UNAVAILABLE, f"call failed: {exc}"))
        finally:
            self._kick_writer()


class TunnelLoopCall(LoopCall):
    """A stream inside a tunnel, as the tunnel *client* (a StreamHandler)."""

    def __init__(
        self, conn: TunnelConnection, method: str, metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__()
        self.conn = conn
        self._held: deque[tuple[bytes, int]] = deque()
        try:
            self.sid: int | None = conn.open_stream(method, tuple(metadata), _TunnelHandler(self))
        except TunnelError as exc:
            self.sid = None
            self._finish(Status(UNAVAILABLE, str(exc)))

    def send(self, data: bytes) -> None:
        if self.status is not None or self.sid is None:
            return
        try:
            self.conn.send_message(self.sid, data)
        except TunnelError as exc:
            self.cancel(Status(exc.code, str(exc)))

    def buffered(self) -> int:
        return self.conn.core.queued_bytes(self.sid) if self.sid is not None else 0

    def after_write(self, cb: Callable[[], None]) -> bool:
        return self.status is None and self.sid is not None and self.conn.after_write(cb)

    def half_close(self) -> None:
        if self.sid is not None and self.status is None:
            self.conn.half_close(self.sid)

    def cancel(self, status: Status | None = None) -> None:
        if self.sid is not None and self.status is None:
            self.conn.cancel(self.sid, status or Status(CANCELLED, "cancelled"))

    def resume_reading(self) -> None:
        super().resume_reading()
        while self._held and not self._reading_paused:
            data, cost = self._held.popleft()
            self._deliver(data, cost)

    def _deliver(self, data: bytes, cost: int) -> None:
        if self.sid is not None:
            self.conn.consumed(self.sid, cost)
        self.on_message(data)

    def on_message_frame(self, data: bytes, cost: int) -> None:
        if self._reading_paused or self._held:
            self._held.append((data, cost))
        else:
            self._deliver(data, cost)

    def on_end_frame(self, status: Status, trailers: tuple, local: bool) -> None:
        # deliver what was held back, then the end
        held, self._held = self._held, deque()
        for data, _cost in held:
            self.on_message(data)
        self._finish(status, trailers)


# TunnelConnection dispatches StreamHandler methods by these names; map them
# onto the call without clobbering its user callback slots.
class _TunnelHandler:
    __slots__ = ("call",)

    def __init__(self, call: TunnelLoopCall) -> None:
        self.call = call

    def on_headers(self, headers: tuple) -> None:
        self.call.headers = headers
        self.call.on_headers(headers)

    def on_message(self, data: bytes, cost: int) -> None:
        self.call.on_message_frame(data, cost)

    def on_requests_ended(self) -> None:
        pass

    def on_writable(self) -> None:
        self.call.on_writable()

    def on_end(self, status: Status, trailers: tuple, local: bool) -> None:
        self.call.on_end_frame(status, trailers, local)


__all__ = ["HIGH_WATER", "LOW_WATER", "AioLoopCall", "LoopCall", "TunnelLoopCall"]
