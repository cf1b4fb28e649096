"""
Calls into a remote's endpoint opened from *inside* the hub process.

The hub's own front doors (TCP port maps, HTTP virtual hosts, TLS SNI and
gRPC passthrough) reach remotes exactly as a ``sesame:`` client does, minus
the client → hub gRPC leg: a :class:`HubLoopCall` asks the remote's control
session for a fresh ``Stream``, runs the tunnel over it and opens the call
inside, all on the bridge loop.  Until the stream is there, sends and a
half-close are queued (counted by :meth:`HubLoopCall.buffered`, so the
producer still pauses) and a cancel is remembered.

:class:`HubEndpoint` wraps it as an ``IStreamClientEndpoint`` for any
Twisted code in the hub process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet import defer, interfaces
from zope.interface import implementer

from sesame.bridge import LoopCall, TunnelConnection, TunnelLoopCall
from sesame.core import CANCELLED, UNAVAILABLE, Status
from sesame.hub._target import Target, parse_target

_closing: set[asyncio.Task] = set()


class HubLoopCall(LoopCall):
    """A call inside a fresh ``Stream`` tunnel of ``target``'s remote (bridge loop only)."""

    def __init__(self, hub: Any, target: Target, method: str,
                 metadata: tuple = ()) -> None:
        super().__init__()
        self.hub = hub
        self.target = target
        self.inner: TunnelLoopCall | None = None
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._half_closed = False
        self._conn: TunnelConnection | None = None
        self._done: asyncio.Future | None = None
        self._session: Any = None
        self._task = asyncio.get_running_loop().create_task(self._open(method, metadata))

    async def _open(self, method: str, metadata: tuple) -> None:
        t = self.target
        try:
            outer, done, peer_ext, session = await self.hub.open_stream(
                t.namespace, t.remote, t.endpoint)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - _HubError and friends become the call's status
            self._finish(Status(getattr(exc, "code", UNAVAILABLE), str(exc)))
            return
        self._done, self._session = done, session
        try:
            conn = self.hub.stream_tunnel(outer, peer_ext)
        except Exception as exc:  # noqa: BLE001 - the stream is unusable: end it, say why
            if not done.done():
                done.set_result(None)
            self._finish(Status(UNAVAILABLE, f"tunnel to {t.remote} failed: {exc}"))
            return
        self._conn = conn
        if session is not None:
            session.connections += 1
        if self.status is not None:  # cancelled while the stream was being opened
            self._cleanup()
            return
        inner = self.inner = TunnelLoopCall(conn, method, metadata)
        inner.on_headers = self._on_headers
        inner.on_message = lambda m: self.on_message(m)
        inner.on_writable = lambda: self.on_writable()
        inner.on_end = self._on_end
        if inner.status is not None:
            self._on_end(inner.status, inner.trailers)
            return
        if self._reading_paused:
            inner.pause_reading()
        queued, self._queued, self._queued_bytes = self._queued, [], 0
        for data in queued:
            inner.send(data)
        if self._half_closed:
            inner.half_close()

    def _on_headers(self, headers: tuple) -> None:
        self.headers = headers
        self.on_headers(headers)

    def _on_end(self, status: Status, trailers: tuple) -> None:
        self._finish(status, trailers)
        self._cleanup()

    def _cleanup(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._session is not None:
            self._session.connections -= 1
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        task = asyncio.get_running_loop().create_task(conn.aclose(grace=0))
        _closing.add(task)  # the loop holds tasks weakly: keep it until it is done
        task.add_done_callback(_closing.discard)

    # --- LoopCall ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.status is not None:
            return
        if self.inner is not None:
            self.inner.send(data)
        else:
            self._queued.append(data)
            self._queued_bytes += len(data)

    def buffered(self) -> int:
        return self.inner.buffered() if self.inner is not None else self._queued_bytes

    def half_close(self) -> None:
        if self.inner is not None:
            self.inner.half_close()
        else:
            self._half_closed = True

    def cancel(self, status: Status | None = None) -> None:
        if self.status is not None:
            return
        status = status or Status(CANCELLED, "cancelled")
        if self.inner is not None:
            self.inner.cancel(status)
            return
        # Not cancelling _open: a stream the remote is already opening must still be taken
        # and closed (it sees status set and cleans up), or the remote's side would leak.
        self._queued.clear()
        self._queued_bytes = 0
        self._finish(status)
        self._cleanup()

    def pause_reading(self) -> None:
        super().pause_reading()
        if self.inner is not None:
            self.inner.pause_reading()

    def resume_reading(self) -> None:
        super().resume_reading()
        if self.inner is not None:
            self.inner.resume_reading()


@implementer(interfaces.IStreamClientEndpoint)
class HubEndpoint:
    """Connect, from inside the hub, to what a :class:`Target` names (over NetConn)."""

    def __init__(self, hub: Any, target: Target, *, reactor: Any = None,
                 timeout: float | None = None) -> None:
        self.hub = hub
        self.target = target
        self.reactor = reactor
        self.timeout = timeout

    def call_factory(self) -> Any:
        hub, target = self.hub, self.target

        def make(method: str, metadata: Any) -> LoopCall:
            return HubLoopCall(hub, target, method, tuple(metadata))

        make.target = f"sesame:{target.remote}"  # type: ignore[attr-defined]
        return make

    def connect(self, protocolFactory: Any) -> defer.Deferred:
        from sesame.netconn import connectNetConn

        try:
            return connectNetConn(self.call_factory(), self.target.address or self.target.endpoint,
                                  protocolFactory, timeout=self.timeout, reactor=self.reactor,
                                  bridge=self.hub.bridge)
        except Exception:  # noqa: BLE001
            return defer.fail()


__all__ = ["HubEndpoint", "HubLoopCall", "Target", "parse_target"]
