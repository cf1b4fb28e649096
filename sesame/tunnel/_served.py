"""
What every served call shares, whichever way its servicer method runs: a thread of the
bridge's handler pool (:mod:`sesame.tunnel._server`) or a task on the bridge loop
(:mod:`sesame.tunnel._aserver`).

* :func:`split_timeout` — the call's deadline (``grpc-timeout``) and its metadata;
* :class:`ServedCall` — the loop-side state and events of one served call: the deadline
  timer, the one request of a non-client-streaming method, the end of the requests, and
  (de)serializing messages;
* :class:`ServedContext` — the part of the servicer context the two contexts have alike:
  the status the method leaves behind (code, details, trailers, :meth:`~ServedContext.final_status`)
  and what it may ask about its call;
* :class:`Abort` — what a context's ``abort`` raises.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NoReturn

import grpc

from sesame.bridge import TunnelConnection
from sesame.core import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    OK,
    Status,
    StreamRequested,
    TunnelError,
    handler_status,
    parse_timeout,
)

__all__ = ["Abort", "ServedCall", "ServedContext", "split_timeout"]


def split_timeout(headers: Iterable[tuple[str, Any]], *,
                  earliest: bool = True) -> tuple[float | None, tuple]:
    """``(deadline, metadata)`` of a served call's headers: the ``time.monotonic()``
    deadline its ``grpc-timeout`` sets (None without a well-formed one) and the other
    entries, which the servicer sees as its invocation metadata.

    ``earliest`` (the rule of synchronous servicers): every ``grpc-timeout`` entry is taken
    out of the metadata, and of several the earliest deadline counts.  ``earliest=False``
    is the rule async servicers have always had: only text entries are taken out (a
    binary one stays in the metadata) and the last well-formed one counts.
    """
    deadline: float | None = None
    md = []
    for k, v in headers:
        if k == "grpc-timeout" and (earliest or isinstance(v, str)):
            t = parse_timeout(v) if isinstance(v, str) else None
            if t is not None:
                d = time.monotonic() + t
                deadline = d if deadline is None or not earliest else min(deadline, d)
        else:
            md.append((k, v))
    return deadline, tuple(md)


class Abort(Exception):
    """Raised by a servicer context's ``abort``: the method ends with the status it set."""


class ServedCall:
    """One served call's state and loop-side events (a ``StreamHandler`` of
    :class:`~sesame.bridge.TunnelConnection`), less how its servicer method runs.

    A subclass sets its own state after ``ServedCall.__init__``, then calls
    :meth:`_begin`; it provides ``_start()`` (run the method), ``request_iterator()``
    (the requests of a client-streaming method), ``_queue(data, cost)`` (take one
    request message in and wake a reader) and ``_requests_ended()`` (mark the requests
    done and wake a reader).
    """

    #: The ``grpc-timeout`` rule (:func:`split_timeout`).
    earliest_timeout = True

    def __init__(self, conn: TunnelConnection, ev: StreamRequested,
                 handler: grpc.RpcMethodHandler) -> None:
        self.conn = conn
        self.sid = ev.stream_id
        self.method = ev.method
        self.handler = handler
        self.deadline, self.metadata = split_timeout(ev.headers, earliest=self.earliest_timeout)
        self.requests: deque[tuple[bytes, int]] = deque()
        self.requests_done = False
        self.ended = False
        self.end_status: Status | None = None
        self.got_request = False
        self.started = False
        self.timer: Any = None

    def _begin(self) -> None:
        """Arm the deadline; a client-streaming method starts at once (the others once
        their one request is in)."""
        if self.deadline is not None:
            self.timer = self.conn.loop.call_later(max(self.deadline - time.monotonic(), 0),
                                                   self._expire)
        if self.handler.request_streaming:
            self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def _queue(self, data: bytes, cost: int) -> None:
        raise NotImplementedError

    def _requests_ended(self) -> None:
        raise NotImplementedError

    def request_iterator(self) -> Any:
        raise NotImplementedError

    # --- loop side --------------------------------------------------------------------

    def _expire(self) -> None:
        self.timer = None
        self.conn.cancel(self.sid, Status(DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _send_headers_now(self, headers: tuple) -> bool:
        """Send the method's initial metadata while the call lives; False when the core
        refused them (sent already)."""
        if self.conn.core.is_live(self.sid):
            try:
                self.conn.send_headers(self.sid, headers)
            except TunnelError:
                return False
        return True

    def on_headers(self, headers: tuple) -> None:  # pragma: no cover - client-side event
        pass

    def on_message(self, data: bytes, cost: int) -> None:
        if self.handler.request_streaming:
            self._queue(data, cost)
            return
        if self.got_request:
            self.conn.close_stream(self.sid, Status(
                INVALID_ARGUMENT,
                f"Already received request for non-client-stream method {self.method}"))
            return
        self.got_request = True
        self.conn.consumed(self.sid, cost)
        self._queue(data, 0)

    def on_requests_ended(self) -> None:
        self._requests_ended()
        if not self.handler.request_streaming and not self.started:
            if not self.got_request:
                # A peer that never sends empty messages (grpctunnel-py) means
                # "the default message" here.
                self.requests.append((b"", 0))
            self._start()

    # --- the servicer method's side ---------------------------------------------------

    def _deserialize(self, data: bytes) -> Any:
        de = self.handler.request_deserializer
        return de(data) if de else data

    def _serialize(self, message: Any) -> Any:
        ser = self.handler.response_serializer
        return ser(message) if ser else message

    def _argument(self) -> Any:
        """What the method is called with: :meth:`request_iterator` for a client-streaming
        one, else its one request."""
        if self.handler.request_streaming:
            return self.request_iterator()
        data, _ = self.requests.popleft()
        return self._deserialize(data)


class ServedContext:
    """What both servicer contexts share: the status a servicer method leaves behind and
    what it may ask about its call."""

    def __init__(self, stream: ServedCall) -> None:
        self._s = stream
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple = ()

    def _abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        self._code = code
        self._details = details
        raise Abort(details)

    def invocation_metadata(self) -> tuple:
        """The call's metadata (without ``grpc-timeout``)."""
        return self._s.metadata

    def peer(self) -> str:
        """The peer of the tunnel the call came through."""
        return self._s.conn.outer.peer()

    def peer_identities(self) -> None:
        """None: tunnelled calls carry no peer identity."""
        return None

    def peer_identity_key(self) -> None:
        """None: tunnelled calls carry no peer identity."""
        return None

    def auth_context(self) -> dict:
        """Empty: tunnelled calls carry no auth context."""
        return {}

    def time_remaining(self) -> float | None:
        """Seconds left until the call's deadline, or None without one."""
        d = self._s.deadline
        return None if d is None else max(d - time.monotonic(), 0.0)

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status code the call ends with."""
        self._code = code

    def set_details(self, details: str) -> None:
        """The status message the call ends with."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The code set so far (None: not set)."""
        return self._code

    def details(self) -> str | None:
        """The details set so far (None: not set)."""
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """The trailers the call ends with."""
        self._trailers = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple:
        """The trailers set so far."""
        return self._trailers

    def set_compression(self, compression: Any) -> None:
        """Ignored: the tunnel does not compress messages."""

    def disable_next_message_compression(self) -> None:
        """Ignored: the tunnel does not compress messages."""

    def final_status(self) -> tuple[Status, tuple]:
        """``(status, trailers)`` for ``close_stream`` from what the method set."""
        code = self._code.value[0] if self._code is not None else OK
        return handler_status(code, self._details, self._trailers)
