"""
The JSON faces of ``Sesame/Proxy`` on the hub's ``--http`` listener (PROTOCOL.md §1.6,
docs/MANAGEMENT.md): ``POST /v1alpha1/proxy`` (a body of newline-delimited JSON
``ProxyRequest`` objects, an answer of ``{"result": ...}`` / ``{"error": ...}`` lines
written as they happen) and a WebSocket on the same path (one JSON object per text
message both ways).  Both run :class:`sesame.hub.proxy.ProxyService` through
:class:`JsonContext`, a stand-in for a grpc.aio servicer context, so the three faces
refuse alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import status_pb2
from twisted.internet.protocol import Protocol

from sesame.hub.mgmt import ApiError
from sesame.hub.proxy import ProxyService, Schema, bad_field, parse_json_stream, status_code
from sesame.v1alpha1 import sesame_pb2


class _Aborted(Exception):
    """The proxy ended the exchange (its ``context.abort``); the error line is out."""


def _json_any(a: any_pb2.Any, pool: Any) -> dict[str, Any]:
    """An ``Any`` as proto3 JSON, its type from ``pool`` or the hub's own types; the raw
    value (base64) when neither knows it."""
    for p in (pool, None):
        try:
            return json_format.MessageToDict(a, descriptor_pool=p)
        except (TypeError, KeyError, json_format.Error):
            continue
    return {"@type": a.type_url, "value": base64.b64encode(a.value).decode("ascii")}


def status_json(st: status_pb2.Status, pool: Any = None) -> dict[str, Any]:
    """A ``google.rpc.Status`` as JSON (details the hub or the device can name decoded)."""
    out: dict[str, Any] = {"code": st.code, "message": st.message}
    out["details"] = [_json_any(d, pool) for d in st.details]
    return out


def response_json(resp: sesame_pb2.ProxyResponse, pool: Any) -> dict[str, Any]:
    if resp.WhichOneof("data") == "error":
        return {"error": status_json(resp.error, pool)}
    if resp.WhichOneof("data") == "content":
        return {"content": _json_any(resp.content, pool)}
    return json_format.MessageToDict(resp)


class JsonContext:
    """What :meth:`ProxyService.handle` sees of a JSON exchange, in place of a grpc.aio
    context: requests come from the parsed body (each converted once the dial's method is
    known, its ``Any`` types from the device's schema), responses leave through ``emit``
    as ``{"result": ProxyResponse}`` / ``{"error": Status}`` objects, one per line."""

    def __init__(self, objects: Sequence[Any], token: str | None,
                 emit: Callable[[dict[str, Any]], None], *, more: bool = False) -> None:
        self._objects = deque(objects)
        self._token = token
        self._emit = emit
        self._n = 0
        # more: objects keep coming (feed) until feed_end -- the WebSocket face
        self._more = more
        self._arrived: asyncio.Event | None = None
        self.schema: Schema | None = None
        self._cancelled = False
        self._done = False
        self._callbacks: list[Callable[[Any], None]] = []

    # what the proxy calls
    def invocation_metadata(self) -> tuple:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def peer(self) -> str:
        return "http"

    def time_remaining(self) -> float | None:
        return None

    def on_method(self, schema: Schema, _method: MethodDescriptor) -> None:
        self.schema = schema

    def feed(self, obj: Any) -> None:
        """(loop) One more request object (the WebSocket face)."""
        self._objects.append(obj)
        if self._arrived is not None:
            self._arrived.set()

    def feed_end(self) -> None:
        """(loop) No more request objects: the inner call's half-close."""
        self._more = False
        if self._arrived is not None:
            self._arrived.set()

    async def read(self) -> Any:
        while self._more and not self._objects and not self._cancelled:
            self._arrived = self._arrived or asyncio.Event()
            self._arrived.clear()
            await self._arrived.wait()
        if not self._objects or self._cancelled:
            return grpc.aio.EOF
        obj = self._objects.popleft()
        self._n += 1
        msg = sesame_pb2.ProxyRequest()
        try:
            if not isinstance(obj, dict):
                raise json_format.ParseError("not a JSON object")
            json_format.ParseDict(obj, msg, descriptor_pool=self.schema.pool if self.schema
                                  else None)
        except (json_format.ParseError, TypeError, KeyError, ValueError) as exc:
            raise bad_field(f"request {self._n}", f"not a ProxyRequest: {exc}") from None
        return msg.SerializeToString()

    async def write(self, data: bytes) -> None:
        resp = sesame_pb2.ProxyResponse.FromString(data)
        self._emit({"result": response_json(resp, self.schema.pool if self.schema else None)})

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, Any]] = ()) -> None:
        st = status_pb2.Status(code=code.value[0], message=details or "")
        for k, v in trailing_metadata or ():
            if k == "grpc-status-details-bin":
                st = status_pb2.Status.FromString(v)
        self._emit({"error": status_json(st, self.schema.pool if self.schema else None)})
        raise _Aborted(details)

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, cb: Callable[[Any], None]) -> None:
        self._callbacks.append(cb)

    # what the HTTP side calls
    def end(self, cancelled: bool) -> None:
        if self._done:
            return
        self._done = True
        self._cancelled = cancelled
        if self._arrived is not None:
            self._arrived.set()
        for cb in self._callbacks:
            cb(self)
        self._callbacks.clear()


class RestProxy:
    """``POST /v1alpha1/proxy``: the body is the stream of JSON ``ProxyRequest`` objects
    (the request body arrives whole: twisted.web buffers it, up to the site's limit), the
    response a stream of ``{"result": ProxyResponse}`` / ``{"error": Status}`` objects,
    one per line (``application/x-ndjson``), each written as it happens.  An error before
    anything was written sets the HTTP status too (400, 401, 403, 404, 503...).  A client
    that goes away cancels the inner call."""

    def __init__(self, hub: Any, token_of: Callable[[Any], str | None]) -> None:
        self.service = ProxyService(hub)
        self.hub = hub
        self.token_of = token_of
        self._running: set[asyncio.Task] = set()

    def render(self, request: Any) -> Any:
        from twisted.web import server

        from sesame.bridge import Hop
        from sesame.hub._rest import HTTP_STATUS

        hop = Hop.get(bridge=self.hub.bridge)
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            return self._websocket(request, hop)
        state = {"started": False, "finished": False}

        def out(obj: dict[str, Any]) -> None:  # reactor
            if state["finished"]:
                return
            if not state["started"]:
                state["started"] = True
                err = obj.get("error")
                http = 200 if err is None else HTTP_STATUS.get(status_code(err["code"]), 500)
                request.setResponseCode(http)
                request.setHeader(b"content-type", b"application/x-ndjson")
                request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        def finish() -> None:  # reactor
            if not state["finished"]:
                state["finished"] = True
                request.finish()

        raw = b""
        if request.content is not None:
            request.content.seek(0)
            raw = request.content.read()
        try:
            objects = parse_json_stream(raw)
        except ApiError as exc:
            out({"error": status_json(exc.status())})
            finish()
            return server.NOT_DONE_YET
        ctx = JsonContext(objects, self.token_of(request),
                          lambda obj: hop.to_reactor(out, obj))

        def gone(_: Any) -> None:
            state["finished"] = True
            hop.to_loop(ctx.end, True)

        request.notifyFinish().addErrback(gone)

        def run() -> Any:
            return self._serve(ctx, lambda: hop.to_reactor(finish),
                               lambda obj: hop.to_reactor(out, obj))

        hop.bridge.post(self._start, run)
        return server.NOT_DONE_YET

    def _start(self, run: Callable[[], Any]) -> None:
        """(bridge loop) Run ``run()``, held until done: the loop keeps only weak refs."""
        task = self.hub.bridge.loop.create_task(run())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _serve(self, ctx: JsonContext, done: Callable[[], None],
                     failed: Callable[[dict[str, Any]], None]) -> None:
        """(bridge loop) One exchange of the JSON faces; ``done`` (reactor side, through the
        hop) when it is over, ``failed`` for an error the proxy did not report itself."""
        try:
            await self.service.handle(iter(()), ctx)
        except (_Aborted, grpc.aio.AbortError):
            pass
        except ApiError as exc:  # a request object that is not a ProxyRequest
            failed({"error": status_json(exc.status())})
        finally:
            ctx.end(False)
            done()

    def _websocket(self, request: Any, hop: Any) -> Any:
        """The same exchange over a WebSocket on the same path: each text message one JSON
        ProxyRequest, each response one text message; an empty text message (or ``EOF``)
        ends the requests (the inner half-close), the server closes (1000) when the call
        is over.  The token comes in the ``Authorization`` header of the upgrade."""
        from twisted.protocols.policies import ProtocolWrapper
        from twisted.web import server

        ws = _WebSocket(self, hop, self.token_of(request))
        # take the connection over from twisted.web and let wsproto see the request again
        request.channel.setTimeout(None)  # the channel's idle timer must not close it
        transport, request.channel.transport = request.channel.transport, None
        if isinstance(transport, ProtocolWrapper):  # TLS wraps the channel
            transport.wrappedProtocol = ws
        else:
            transport.protocol = ws
        ws.makeConnection(transport)
        head = [request.method + b" " + request.uri + b" HTTP/1.1"]
        for name, values in request.requestHeaders.getAllRawHeaders():
            head.extend(name + b": " + v for v in values)
        ws.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        return server.NOT_DONE_YET


class _WebSocket(Protocol):
    """The WebSocket face of one proxied call (reactor side; wsproto does the framing)."""

    def __init__(self, rest: RestProxy, hop: Any, token: str | None) -> None:
        from wsproto import ConnectionType, WSConnection

        self.rest = rest
        self.hop = hop
        self.conn = WSConnection(ConnectionType.SERVER)
        self.ctx = JsonContext((), token, lambda obj: hop.to_reactor(self.send, obj), more=True)
        self.text: list[str] = []
        self.open = False
        self.ended = False

    def _out(self, event: Any) -> None:
        if self.transport is not None and not self.ended:
            self.transport.write(self.conn.send(event))

    def send(self, obj: dict[str, Any]) -> None:
        from wsproto.events import TextMessage

        if self.open:
            self._out(TextMessage(data=json.dumps(obj, separators=(",", ":"))))

    def finish(self, code: int = 1000, reason: str = "") -> None:
        from wsproto.events import CloseConnection

        if self.open and not self.ended:
            self._out(CloseConnection(code=code, reason=reason))
            self.ended = True
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Ping,
            RejectConnection,
            Request,
            TextMessage,
        )
        from wsproto.utilities import RemoteProtocolError

        try:
            self.conn.receive_data(data)
            events = list(self.conn.events())
        except RemoteProtocolError as exc:
            if self.open:
                self.finish(1002, str(exc)[:100])
            else:
                self.transport.write(self.conn.send(RejectConnection(status_code=400)))
                self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, Request):
                self._out(AcceptConnection())
                self.open = True
                self.hop.bridge.post(self.rest._start, lambda: self.rest._serve(
                    self.ctx, lambda: self.hop.to_reactor(self.finish),
                    lambda obj: self.hop.to_reactor(self.send, obj)))
            elif isinstance(event, TextMessage):
                self.text.append(event.data)
                if event.message_finished:
                    self._message("".join(self.text))
                    self.text = []
            elif isinstance(event, BytesMessage):
                self.finish(1003, "send JSON ProxyRequest objects as text messages")
            elif isinstance(event, Ping):
                self._out(event.response())
            elif isinstance(event, CloseConnection):
                if not self.ended:
                    self._out(event.response())
                    self.ended = True
                    self.transport.loseConnection()

    def _message(self, text: str) -> None:
        if not text.strip() or text.strip() == "EOF":
            self.hop.to_loop(self.ctx.feed_end)
            return
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self.send({"error": status_json(bad_field("message", f"not JSON: {exc}").status())})
            self.finish(1007, "a message is not JSON")
            return
        self.hop.to_loop(self.ctx.feed, obj)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.ended:
            self.ended = True
        self.hop.to_loop(self.ctx.end, True)  # an exchange still running is cancelled


__all__ = ["JsonContext", "RestProxy", "response_json", "status_json"]
