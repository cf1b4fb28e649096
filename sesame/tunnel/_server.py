"""
Serving gRPC services over tunnels: a registrar that generated
``add_FooServicer_to_server(servicer, registry)`` functions accept, and the
per-stream machinery that runs servicer methods.

Synchronous servicer methods run in the bridge's bounded handler pool, one
worker per running call (as ``grpc.server`` does); nothing else takes a
thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import grpc

from sesame.bridge import TunnelConnection
from sesame.core import (
    CANCELLED,
    OK,
    UNIMPLEMENTED,
    UNKNOWN,
    Status,
    StreamRequested,
    TunnelError,
    parse_timeout,
)
from sesame.tunnel._aserver import AsyncServedStream, is_async_handler
from sesame.tunnel._channel import SEND_LIMIT
from sesame.tunnel._served import Abort, ServedCall, ServedContext

log = logging.getLogger("sesame.server")



class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple


class ServiceRegistry:
    """
    Holds the services a tunnel serves.  Pass it where generated code wants a
    server: ``foo_pb2_grpc.add_FooServicer_to_server(FooServicer(), registry)``.
    """

    def __init__(self) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._services: set[str] = set()

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Add handlers asked for every method not registered by name (``grpc.Server``'s
        method of the same name; generated code and grpc's health/reflection use it)."""
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Register ``method_handlers`` (method name → handler) of ``service_name``; what
        the generated ``add_FooServicer_to_server`` calls.

        :raises ValueError: when a method path is registered already.
        """
        self._services.add(service_name)
        for name, handler in method_handlers.items():
            path = f"/{service_name}/{name}"
            if path in self._methods:
                raise ValueError(f"method {path} registered twice")
            self._methods[path] = handler

    def lookup(self, method: str, metadata: tuple = ()) -> grpc.RpcMethodHandler | None:
        """The handler of the full method path ``method`` (``/pkg.Service/Method``): a
        registered one first, then the generic handlers in order; None when nobody serves it."""
        handler = self._methods.get(method)
        if handler is not None:
            return handler
        details = _CallDetails(method, metadata)
        for g in self._generic:
            handler = g.service(details)
            if handler is not None:
                return handler
        return None

    def add_reflection(self) -> bool:
        """Serve gRPC server reflection (``grpc.reflection.v1alpha``) for the services
        registered so far, from the default descriptor pool (where generated ``_pb2``
        modules put their types): how a hub learns a remote API's types (``Sesame/Proxy``,
        ``sesame call``).  False, and nothing changes, when reflection is served already
        or nothing is registered."""
        from grpc_reflection.v1alpha import reflection

        if self.lookup(f"/{reflection.SERVICE_NAME}/ServerReflectionInfo") is not None:
            return False
        names = self.service_names()
        if not names:
            return False
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self)
        return True

    @property
    def empty(self) -> bool:
        return not self._methods and not self._generic

    def service_names(self) -> list[str]:
        """Every service name registered (sorted), including generic handlers that name
        theirs: what reflection and ``sesame remotes`` show."""
        names = set(self._services)
        for g in self._generic:
            name = getattr(g, "service_name", None)
            if callable(name):
                names.add(name())
        return sorted(names)


class TunnelServicerContext(ServedContext, grpc.ServicerContext):
    """The ``context`` a servicer method receives for a tunnelled call."""

    _s: _ServedStream

    # RpcContext
    def is_active(self) -> bool:
        return not self._s.ended

    def cancel(self) -> None:
        self._s.cancel_from_handler()

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        return self._s.add_callback(callback)

    # ServicerContext
    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._s.send_headers(tuple(initial_metadata))

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._abort(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self._trailers = (*self._trailers, *(status.trailing_metadata or ()))
        self.abort(status.code, status.details)


class _ServedStream(ServedCall):
    """One served call: loop-side events in, handler thread out."""

    def __init__(
        self, conn: TunnelConnection, ev: StreamRequested, handler: grpc.RpcMethodHandler
    ) -> None:
        super().__init__(conn, ev, handler)
        self.bridge = conn.bridge
        self.cond = threading.Condition()
        self.callbacks: list[Callable[[], Any]] = []
        self.paused = False
        self.unsent = 0
        self._begin()

    # --- loop side ------------------------------------------------------------

    def _queue(self, data: bytes, cost: int) -> None:
        with self.cond:
            self.requests.append((data, cost))
            self.cond.notify_all()

    def _requests_ended(self) -> None:
        with self.cond:
            self.requests_done = True
            self.cond.notify_all()

    def on_writable(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def on_end(self, status: Status, trailers: tuple, local: bool) -> None:
        self._stop_timer()
        with self.cond:
            self.ended = True
            self.end_status = status
            self.cond.notify_all()
            callbacks, self.callbacks = self.callbacks, []
        if callbacks:
            pool = self.bridge.handler_pool()
            for cb in callbacks:
                pool.submit(_quietly, cb)

    def _start(self) -> None:
        self.started = True
        try:
            self.bridge.handler_pool().submit(self._run)
        except RuntimeError:  # pool shut down
            self.conn.cancel(self.sid, Status(CANCELLED, "server shutting down"))

    def _send_now(self, data: bytes) -> bool:
        """Queue ``data`` on the stream while it lives; False when the core refused it
        (the stream is cancelled with the reason)."""
        conn = self.conn
        if conn.core.is_live(self.sid):
            try:
                conn.send_message(self.sid, data)
            except TunnelError as exc:
                conn.cancel(self.sid, Status(exc.code, str(exc)))
                return False
        return True

    def _loop_send(self, data: bytes) -> None:
        conn = self.conn
        self._send_now(data)
        with self.cond:
            self.unsent -= len(data)
            if conn.core.queued_bytes(self.sid) > conn.core.send_low_water:
                self.paused = True
            self.cond.notify_all()

    def _loop_headers(self, headers: tuple) -> None:
        if not self._send_headers_now(headers):
            log.warning("initial metadata sent twice on %s", self.method)

    def _loop_finish(self, status: Status, trailers: tuple) -> None:
        self.conn.close_stream(self.sid, status, trailers)

    def _loop_reply(self, data: bytes, status: Status, trailers: tuple) -> None:
        """A unary method's one response and its status, together."""
        if self._send_now(data):
            self._loop_finish(status, trailers)

    # --- handler thread side ----------------------------------------------------

    def add_callback(self, cb: Callable[[], Any]) -> bool:
        with self.cond:
            if self.ended:
                return False
            self.callbacks.append(cb)
            return True

    def cancel_from_handler(self) -> None:
        self.bridge.post(self.conn.cancel, self.sid, Status(CANCELLED, "cancelled by server"))

    def send_headers(self, headers: tuple) -> None:
        self.bridge.post(self._loop_headers, headers)

    def send(self, data: bytes) -> bool:
        with self.cond:
            while not self.ended and (self.paused or self.unsent > SEND_LIMIT):
                self.cond.wait()
            if self.ended:
                return False
            self.unsent += len(data)
        self.bridge.post(self._loop_send, data)
        return True

    def request_iterator(self) -> Iterator[Any]:
        while True:
            with self.cond:
                while not self.requests and not self.requests_done and not self.ended:
                    self.cond.wait()
                if self.requests:
                    data, cost = self.requests.popleft()
                elif self.ended and self.end_status is not None and self.end_status.code != OK:
                    return
                else:
                    return
            # once per message, even at cost 0: the core counts unread messages
            self.bridge.post(self.conn.consumed, self.sid, cost)
            yield self._deserialize(data)

    def _run(self) -> None:
        ctx = TunnelServicerContext(self)
        h = self.handler
        # a single response leaves with the status in one hand-off to the loop, so that
        # header, message and close_stream go out together (one outer message, batched)
        reply: bytes | None = None
        try:
            if self.ended:
                return
            arg = self._argument()
            if h.unary_unary is not None:
                resp = h.unary_unary(arg, ctx)
                if ctx.code() is None or ctx.code() == grpc.StatusCode.OK:
                    reply = self._serialize(resp)
            elif h.stream_unary is not None:
                resp = h.stream_unary(arg, ctx)
                if ctx.code() is None or ctx.code() == grpc.StatusCode.OK:
                    reply = self._serialize(resp)
            else:
                fn = h.unary_stream if h.unary_stream is not None else h.stream_stream
                for resp in fn(arg, ctx):
                    if not self.send(self._serialize(resp)):
                        break
            status, trailers = ctx.final_status()
        except Abort:
            status, trailers = ctx.final_status()
        except Exception as exc:
            if self.ended:
                return
            log.debug("servicer %s raised", self.method, exc_info=True)
            # As grpc.server: a code the handler set before raising wins (the
            # generated base class sets UNIMPLEMENTED, then raises).
            code = ctx.code()
            status, trailers = ctx.final_status()
            if code is None or code == grpc.StatusCode.OK:
                status = Status(UNKNOWN, f"Exception calling application: {exc}")
            elif ctx.details() is None:
                status = Status(status.code, f"Exception calling application: {exc}",
                                status.details)
            reply = None
        if reply is not None:
            self.bridge.post(self._loop_reply, reply, status, trailers)
        else:
            self.bridge.post(self._loop_finish, status, trailers)


def _quietly(cb: Callable[[], Any]) -> None:
    try:
        cb()
    except Exception:
        log.exception("callback failed")


def stream_factory(
    registry: ServiceRegistry,
) -> Callable[[TunnelConnection, StreamRequested], _ServedStream | None]:
    """The ``on_stream`` hook of a serving :class:`TunnelConnection`."""

    def on_stream(conn: TunnelConnection, ev: StreamRequested) -> _ServedStream | None:
        handler = registry.lookup(ev.method, ev.headers)
        if handler is None:
            conn.core.refuse_stream(
                ev.stream_id, Status(UNIMPLEMENTED, f"{ev.method} not implemented")
            )
            return None
        if is_async_handler(handler):
            return AsyncServedStream(conn, ev, handler)  # type: ignore[return-value]
        return _ServedStream(conn, ev, handler)

    return on_stream


__all__ = ["ServiceRegistry", "TunnelServicerContext", "parse_timeout"]
