"""
A synchronous ``grpc.Channel`` whose calls travel over tunnels.

Generated stubs take it unchanged: ``FooStub(channel).Bar(request,
timeout=..., metadata=...)``, ``.with_call``, ``.future``, streaming in both
directions.  The calling thread blocks on a condition variable; the work is
done on the bridge loop.  Request iterators that are real iterators are
pulled by one short-lived thread per call while they run (as grpcio does);
lists and tuples are sent from the calling thread with no extra thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from sesame.bridge import Bridge, TunnelConnection, grpc_code
from sesame.core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    OK,
    UNAVAILABLE,
    Status,
    TunnelError,
    status_to_proto,
)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
SEND_LIMIT = 256 * 1024  # bytes handed to the loop but not yet queued in the core
_call_ids = itertools.count(1)


def encode_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value: at most 8 digits and a unit."""
    us = max(int(seconds * 1_000_000), 0)
    for unit, scale in (("u", 1), ("m", 1000), ("S", 1_000_000), ("M", 60_000_000)):
        v = -(-us // scale)  # round up so the server never sees a longer deadline
        if v < 100_000_000:
            return f"{v}{unit}"
    return f"{-(-us // 3_600_000_000)}H"


class _ClientCall(grpc.RpcError, grpc.Call, grpc.Future):
    """
    One tunnelled call as grpcio presents it: a ``Call``, a ``Future``, the
    ``RpcError`` raised on failure and, for streaming responses, an iterator.
    """

    def __init__(
        self,
        bridge: Bridge,
        conn: TunnelConnection,
        method: str,
        deserializer: Callable[[bytes], Any] | None,
        response_streaming: bool,
        timeout: float | None,
    ) -> None:
        super().__init__()
        self._bridge = bridge
        self._conn = conn
        self._method = method
        self._deserialize = deserializer
        self._response_streaming = response_streaming
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._cond = threading.Condition()
        self._headers: tuple | None = None
        self._messages: deque[tuple[bytes, int]] = deque()
        self._received = 0
        self._status: Status | None = None
        self._trailers: tuple = ()
        self._done_callbacks: list[Callable[[Any], Any]] = []
        self._rpc_callbacks: list[Callable[[], Any]] = []
        self._sid: int | None = None
        self._timer: Any = None
        self._unsent = 0
        self._paused = False
        self._result: Any = None
        self._result_ready = False
        self._cancelled = False  # by cancel(): only then is it a cancelled Future
        self._on_finish: Callable[[_ClientCall], Any] | None = None

    # --- loop side (StreamHandler) ----------------------------------------------

    def _loop_start(self, headers: tuple, requests: Sequence[bytes] | None, close: bool) -> None:
        conn = self._conn
        try:
            self._sid = conn.open_stream(self._method, headers, self)
        except TunnelError as exc:
            self.on_end(Status(UNAVAILABLE, str(exc)), (), True)
            return
        if self._timeout is not None:
            self._timer = conn.loop.call_later(max(self._timeout, 0), self._expire)
        if requests is not None:
            for data in requests:
                self._loop_send(data, False)
            if close:
                conn.half_close(self._sid)

    def _expire(self) -> None:
        self._timer = None
        if self._sid is not None:
            self._conn.cancel(self._sid, Status(DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _loop_send(self, data: bytes, accounted: bool = True) -> None:
        sid = self._sid
        conn = self._conn
        if sid is not None and conn.core.is_live(sid):
            try:
                conn.send_message(sid, data)
            except TunnelError as exc:
                conn.cancel(sid, Status(exc.code, str(exc)))
        if accounted:
            with self._cond:
                self._unsent -= len(data)
                if sid is not None and conn.core.queued_bytes(sid) > conn.core.send_low_water:
                    self._paused = True
                self._cond.notify_all()

    def _loop_half_close(self) -> None:
        if self._sid is not None:
            self._conn.half_close(self._sid)

    def _loop_cancel(self, status: Status) -> None:
        if self._sid is not None:
            self._conn.cancel(self._sid, status)
        elif self._status is None:
            self.on_end(status, (), True)

    def on_headers(self, headers: tuple) -> None:
        with self._cond:
            self._headers = headers
            self._cond.notify_all()

    def on_message(self, data: bytes, cost: int) -> None:
        if not self._response_streaming and self._received >= 1:
            self._conn.cancel(
                self._sid,
                Status(INTERNAL, f"Server sent multiple responses for non-server-stream "
                                 f"method {self._method}"),
            )
            return
        self._received += 1
        with self._cond:
            self._messages.append((data, cost))
            self._cond.notify_all()

    def on_requests_ended(self) -> None:  # pragma: no cover - server-side event
        pass

    def on_writable(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def on_end(self, status: Status, trailers: tuple, local: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if status.details:
            pb = status_to_proto(status)
            trailers = (*trailers, (STATUS_DETAILS_KEY, pb.SerializeToString()))
        with self._cond:
            if self._status is not None:
                return
            if self._headers is None:
                self._headers = ()
            self._status = status
            self._trailers = tuple(trailers)
            self._cond.notify_all()
            callbacks = self._rpc_callbacks + self._done_callbacks
            self._rpc_callbacks = []
            self._done_callbacks = []
        if self._on_finish is not None:
            self._on_finish(self)
        if callbacks:
            pool = self._bridge.handler_pool()
            for cb in callbacks:
                pool.submit(_call_quietly, cb, self)

    # --- caller side ------------------------------------------------------------

    def _send_request(self, data: bytes) -> bool:
        with self._cond:
            while self._status is None and (self._paused or self._unsent > SEND_LIMIT):
                self._cond.wait()
            if self._status is not None:
                return False
            self._unsent += len(data)
        self._bridge.post(self._loop_send, data)
        return True

    def _consume_requests(self, iterator: Iterator[Any], serializer: Callable | None) -> None:
        try:
            for req in iterator:
                data = serializer(req) if serializer else req
                if not self._send_request(data):
                    return
        except Exception as exc:  # noqa: BLE001
            self._bridge.post(
                self._loop_cancel, Status(2, f"Exception iterating requests: {exc!r}")
            )
            return
        self._bridge.post(self._loop_half_close)

    def _wait(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not pred():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _take(self, data: bytes, cost: int) -> Any:
        if self._sid is not None:
            # once per message, even at cost 0: the core counts unread messages
            self._bridge.post(self._conn.consumed, self._sid, cost)
        return self._deserialize(data) if self._deserialize else data

    def _unary_outcome(self) -> Any:
        """After the call ended: the single response, or raise self."""
        st = self._status
        assert st is not None
        if st.code != OK:
            raise self
        if not self._result_ready:
            if len(self._messages) != 1:
                self._status = Status(
                    INTERNAL,
                    "no response message" if not self._messages else "too many responses",
                )
                raise self
            data, cost = self._messages.popleft()
            self._result = self._take(data, cost)
            self._result_ready = True
        return self._result

    # grpc.RpcContext / grpc.Call
    def is_active(self) -> bool:
        return self._status is None

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def cancel(self) -> bool:
        with self._cond:
            if self._status is not None:
                return False
            self._cancelled = True
        self._bridge.post(self._loop_cancel, Status(CANCELLED, "Locally cancelled by application!"))
        self._wait(lambda: self._status is not None, 5)
        return True

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        with self._cond:
            if self._status is None:
                self._rpc_callbacks.append(lambda _call: callback())
                return True
        return False

    def initial_metadata(self) -> tuple:
        self._wait(lambda: self._headers is not None)
        return self._headers or ()

    def trailing_metadata(self) -> tuple:
        self._wait(lambda: self._status is not None)
        return self._trailers

    def code(self) -> grpc.StatusCode:
        self._wait(lambda: self._status is not None)
        assert self._status is not None
        return grpc_code(self._status.code)

    def details(self) -> str:
        self._wait(lambda: self._status is not None)
        assert self._status is not None
        return self._status.message

    def debug_error_string(self) -> str:
        return f"tunnel call {self._method}: {self.details()}"

    # grpc.Future
    def cancelled(self) -> bool:
        # As grpcio: a call the server or a closing channel ended with CANCELLED
        # raises its RpcError from result(); only cancel() makes it "cancelled".
        return self._cancelled and self._status is not None and self._status.code == CANCELLED

    def running(self) -> bool:
        return self._status is None

    def done(self) -> bool:
        return self._status is not None

    def result(self, timeout: float | None = None) -> Any:
        if not self._wait(lambda: self._status is not None, timeout):
            raise grpc.FutureTimeoutError()
        if self.cancelled():
            raise grpc.FutureCancelledError()
        if self._response_streaming:
            if self._status.code != OK:
                raise self
            return None
        return self._unary_outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._wait(lambda: self._status is not None, timeout):
            raise grpc.FutureTimeoutError()
        if self.cancelled():
            raise grpc.FutureCancelledError()
        try:
            self.result()
        except grpc.RpcError as exc:
            return exc
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        exc = self.exception(timeout)
        return None if exc is None else exc.__traceback__

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        with self._cond:
            if self._status is None:
                self._done_callbacks.append(fn)
                return
        fn(self)

    # iterator (streaming responses)
    def __iter__(self) -> _ClientCall:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while not self._messages and self._status is None:
                self._cond.wait()
            if self._messages:
                data, cost = self._messages.popleft()
            else:
                st = self._status
                assert st is not None
                if st.code == OK:
                    raise StopIteration
                raise self
        return self._take(data, cost)

    next = __next__

    def __str__(self) -> str:
        st = self._status
        if st is None:
            return f"<tunnel call {self._method} active>"
        return (
            f"<_TunnelRpcError of RPC that terminated with:\n"
            f"\tstatus = {grpc_code(st.code)}\n\tdetails = \"{st.message}\"\n>"
        )

    __repr__ = __str__


def _call_quietly(cb: Callable[[Any], Any], arg: Any) -> None:
    try:
        cb(arg)
    except Exception:
        import logging

        logging.getLogger("sesame.channel").exception("call callback failed")


class _MultiCallable:
    def __init__(
        self,
        channel: TunnelChannel,
        method: str,
        serializer: Callable | None,
        deserializer: Callable | None,
        request_streaming: bool,
        response_streaming: bool,
    ) -> None:
        self._channel = channel
        self._method = method
        self._serialize = serializer
        self._deserialize = deserializer
        self._req_stream = request_streaming
        self._resp_stream = response_streaming

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> _ClientCall:
        ch = self._channel
        if ch._closed:
            raise ValueError("Cannot invoke RPC on closed channel!")  # as grpcio
        conn = ch.pick_connection()
        headers = tuple(metadata or ())
        if timeout is not None:
            headers = (*headers, ("grpc-timeout", encode_timeout(timeout)))
        call = _ClientCall(ch._bridge, conn, self._method, self._deserialize,
                           self._resp_stream, timeout)
        if conn is None:
            call.on_end(Status(UNAVAILABLE, "no channels ready"), (), True)
            return call
        if not ch._track(call):
            call.on_end(Status(CANCELLED, "Channel closed!"), (), True)
            return call
        ser = self._serialize
        if not self._req_stream:
            data = ser(request) if ser else request
            ch._bridge.post(call._loop_start, headers, (data,), True)
        elif isinstance(request, (list, tuple)):
            datas = [ser(r) if ser else r for r in request]
            ch._bridge.post(call._loop_start, headers, datas, True)
        else:
            ch._bridge.post(call._loop_start, headers, None, False)
            threading.Thread(
                target=call._consume_requests,
                args=(iter(request), ser),
                name=f"sesame-requests-{next(_call_ids)}",
                daemon=True,
            ).start()
        return call

    # unary response
    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None,
                 credentials: Any = None, wait_for_ready: bool | None = None,
                 compression: Any = None) -> Any:
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._resp_stream:
            return call
        call._wait(lambda: call._status is not None)
        return call._unary_outcome()

    def with_call(self, request: Any, timeout: float | None = None, metadata: Any = None,
                  credentials: Any = None, wait_for_ready: bool | None = None,
                  compression: Any = None) -> tuple[Any, grpc.Call]:
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        call._wait(lambda: call._status is not None)
        return call._unary_outcome(), call

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None,
               credentials: Any = None, wait_for_ready: bool | None = None,
               compression: Any = None) -> grpc.Future:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class TunnelChannel(grpc.Channel):
    """
    A ``grpc.Channel`` over one tunnel, or over whichever of a set of tunnels
    ``pick`` returns per call (reverse tunnels, round-robin).
    """

    def __init__(
        self,
        bridge: Bridge,
        pick: Callable[[], TunnelConnection | None],
        on_close: Callable[[], Any] | None = None,
    ) -> None:
        self._bridge = bridge
        self._pick_fn = pick
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._calls: set[_ClientCall] = set()

    def _track(self, call: _ClientCall) -> bool:
        """Remember a live call so close() can cancel it; False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._calls.add(call)
        call._on_finish = self._forget
        return True

    def _forget(self, call: _ClientCall) -> None:
        with self._lock:
            self._calls.discard(call)

    def pick_connection(self) -> TunnelConnection | None:
        """The open tunnel the next call goes on (the channel's pick function), or None
        when the channel is closed or no tunnel is open."""
        if self._closed:
            return None
        conn = self._pick_fn()
        if conn is None or conn.is_closed:
            return None
        return conn

    def _callable(self, method: str, ser: Any, de: Any, rs: bool, ps: bool) -> _MultiCallable:
        return _MultiCallable(self, method, ser, de, rs, ps)

    def unary_unary(self, method: str, request_serializer: Any = None,
                    response_deserializer: Any = None, _registered_method: bool = False,
                    **_: Any) -> Any:
        return self._callable(method, request_serializer, response_deserializer, False, False)

    def unary_stream(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, _registered_method: bool = False,
                     **_: Any) -> Any:
        return self._callable(method, request_serializer, response_deserializer, False, True)

    def stream_unary(self, method: str, request_serializer: Any = None,
                     response_deserializer: Any = None, _registered_method: bool = False,
                     **_: Any) -> Any:
        return self._callable(method, request_serializer, response_deserializer, True, False)

    def stream_stream(self, method: str, request_serializer: Any = None,
                      response_deserializer: Any = None, _registered_method: bool = False,
                      **_: Any) -> Any:
        return self._callable(method, request_serializer, response_deserializer, True, True)

    def subscribe(self, callback: Callable, try_to_connect: bool = False) -> None:
        state = grpc.ChannelConnectivity.READY if self.pick_connection() else (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        callback(state)

    def unsubscribe(self, callback: Callable) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self.pick_connection() is not None

    def close(self) -> None:
        """Cancel every call and close the tunnel(s) this channel owns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls, self._calls = list(self._calls), set()
        for call in calls:
            self._bridge.post(call._loop_cancel, Status(CANCELLED, "Channel closed!"))
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> TunnelChannel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["TunnelChannel", "encode_timeout"]
