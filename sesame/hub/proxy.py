"""
``Sesame/Proxy``: one gRPC call to an API on a remote, made by the hub for a
client that speaks only the management API (gRPC here, JSON over ``--http``
in :mod:`sesame.hub._proxyweb`, and ``sesame call`` on top of the gRPC face).

The exchange (PROTOCOL.md §1.6, §5.3):

* requests: ``dial{endpoint, method, conn_mask}`` first, then at most one
  ``header`` (the inner call's metadata), then ``content`` messages
  (``google.protobuf.Any`` holding the inner request type); the client's
  half-close ends the inner requests;
* responses: ``conn{namespace, remote, endpoint}`` first (filtered by
  ``conn_mask``), then the inner ``header``, ``content`` (``Any`` of the
  inner response type) and ``trailer``; ``error`` (the inner status, with its
  ``google.rpc`` details) is final.  After ``conn`` the outer call ends OK
  whatever the inner call did; before it, the outer call ends with a precise
  status: INVALID_ARGUMENT (a malformed request, method or endpoint name),
  UNAUTHENTICATED / PERMISSION_DENIED (the token; a client token must be
  allowed to reach the remote), NOT_FOUND (no such remote, or the remote does
  not offer the endpoint or the service), UNAVAILABLE (the remote is not
  connected), FAILED_PRECONDITION (the endpoint serves no gRPC reflection).

The JSON faces (``POST /v1alpha1/proxy`` and a WebSocket on the same path) are in
:mod:`sesame.hub._proxyweb`; they run this module's :class:`ProxyService` through a
context stand-in.

Types come from the device itself: the hub asks the endpoint's server
reflection (``grpc.reflection.v1alpha``, which a :class:`sesame.remote.
RemoteSession` serves for its registries by default) for the file that
declares the service, with its dependencies, and keeps the resulting
:class:`Schema` per remote session for :data:`SCHEMA_TTL` seconds.  The gRPC
face needs it for the method's shape and the ``Any`` type URLs; the JSON face
for the conversions.

Messages are never decoded on the gRPC face: an ``Any``'s value goes to the
device as it came, and a response's bytes come back inside an ``Any``.  A
message over :data:`MAX_MESSAGE` is RESOURCE_EXHAUSTED.  The outer call's
deadline goes to the device as the inner call's ``grpc-timeout``, and an outer
call that is cancelled cancels the inner one (the device sees it).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from sesame import _names as N
from sesame.bridge import drain_requests
from sesame.core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    OK,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    SesameCodec,
    Status,
)
from sesame.hub._auth import Need
from sesame.hub._calls import HubLoopCall
from sesame.hub._target import Target, parse_target
from sesame.hub.mgmt import ApiError
from sesame.hub.store import NotFound, StoreUnavailable
from sesame.tunnel import encode_timeout
from sesame.type import grpcmetadata_pb2 as md_pb
from sesame.v1alpha1 import sesame_pb2

PROXY_METHOD = "/sesame.v1alpha1.Sesame/Proxy"
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
DIAL_TIMEOUT = 10.0  # for the dial (the first request)
REFLECT_TIMEOUT = 10.0  # for the device's reflection answer
SCHEMA_TTL = 60.0  # how long a remote session's reflected types are kept
MAX_MESSAGE = 4 * 1024 * 1024  # one inner message, either way (gRPC's default)
HIGH_WATER = 4 * 1024 * 1024  # inner responses queued for the client: stop reading
SETTLE_TURNS = 8  # loop turns an EOF waits to show whether it was a cancellation
TYPE_PREFIX = "type.googleapis.com/"

_SERVICE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_METHOD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- names -------------------------------------------------------------------------------


def parse_method(text: str) -> tuple[str, str]:
    """``(service, method)`` from ``/pkg.Service/Method``, ``pkg.Service/Method`` or
    ``pkg.Service.Method``; ValueError saying which form is expected."""
    t = text.strip() if isinstance(text, str) else ""
    if t.startswith("/"):
        t = t[1:]
    service, sep, method = t.partition("/") if "/" in t else t.rpartition(".")
    if not sep or not _SERVICE_RE.fullmatch(service) or not _METHOD_RE.fullmatch(method):
        raise ValueError(f"{text!r} is not a gRPC method: expected /package.Service/Method "
                         "(or package.Service/Method, package.Service.Method)")
    return service, method


def parse_endpoint(text: str) -> tuple[str, str, str]:
    """``(namespace, remote, endpoint)`` from an endpoint's resource name
    ``namespaces/NS/remotes/R/endpoints/E`` or ``ENDPOINT@REMOTE``; ValueError otherwise
    (an address such as ``127.0.0.1:80@edge-1`` is not an endpoint)."""
    try:
        t = parse_target(text)
    except ValueError:
        t = None
    if t is None or t.address is not None:
        raise ValueError(f"{text!r} is not an endpoint: expected "
                         "namespaces/NS/remotes/REMOTE/endpoints/ENDPOINT or ENDPOINT@REMOTE")
    return t.namespace, t.remote, t.endpoint


def endpoint_name(namespace: str, remote: str, endpoint: str) -> str:
    return f"{N.resource_name(namespace, remote)}/endpoints/{endpoint}"


def type_url(full_name: str) -> str:
    return TYPE_PREFIX + full_name


def type_of(url: str) -> str:
    """The message type an ``Any`` type URL names (what follows its last ``/``)."""
    return url.rpartition("/")[2]


# --- metadata and status -----------------------------------------------------------------

#: keys a client may not set on the inner call (gRPC's own and the transport's)
_RESERVED = re.compile(r"^(grpc-|:)|^(content-type|te|user-agent|host|connection)$")


def metadata_pb(md: Sequence[tuple[str, Any]]) -> md_pb.GrpcMetadata:
    pb = md_pb.GrpcMetadata()
    SesameCodec.md_to_proto(tuple(md), pb)
    return pb


def metadata_of(pb: md_pb.GrpcMetadata) -> tuple[tuple[str, Any], ...]:
    """The inner call's metadata from a ``header``; ApiError INVALID_ARGUMENT for keys a
    client may not set or that gRPC would refuse."""
    md = tuple(SesameCodec.md_from_proto(pb))
    for k, v in md:
        if not k or k != k.lower() or _RESERVED.search(k) or not re.fullmatch(r"[0-9a-z_.-]+", k):
            raise bad_field("header", f"metadata key {k!r} may not be set (lower-case letters, "
                                 "digits, '-', '_', '.'; not grpc-*, :*, or transport headers)")
        if not k.endswith("-bin") and not (isinstance(v, str) and v.isascii()
                                           and v.isprintable()):
            raise bad_field("header", f"metadata {k!r}: a text value must be printable ASCII "
                                 "(binary values go in keys ending -bin)")
    return md


def status_pb(status: Status) -> status_pb2.Status:
    pb = status_pb2.Status(code=status.code, message=status.message or "")
    for d in status.details or ():
        pb.details.add().CopyFrom(d)
    return pb


def bad_field(field: str, description: str) -> ApiError:
    """INVALID_ARGUMENT naming ``field`` (a BadRequest field violation)."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}",
                    violations=[(field, description)])


def status_code(code: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a number (UNKNOWN for one gRPC does not define)."""
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


# --- types from the device ---------------------------------------------------------------


def _known_file(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    try:
        fd = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    out = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(out)
    return out


class Schema:
    """The types one reflection answer described: a descriptor pool of the files that
    declare a service (and their dependencies), and the message classes over it."""

    def __init__(self, files: Sequence[bytes]) -> None:
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in files]
        self.pool = descriptor_pool.DescriptorPool()
        pending = {p.name: p for p in protos}
        loaded: set[str] = set()
        while pending:
            for p in list(pending.values()):
                for d in p.dependency:
                    if d not in pending and d not in loaded:
                        # not sent (a well-known type, say): the hub's own copy, if any
                        known = _known_file(d)
                        if known is None:
                            raise ValueError(f"reflection answered {p.name}, whose dependency "
                                             f"{d} is missing")
                        pending[d] = known
            ready = [p for p in pending.values() if all(d in loaded for d in p.dependency)]
            if not ready:
                raise ValueError("reflection answered files that depend on each other: "
                                 + ", ".join(sorted(pending)))
            for p in ready:
                self.pool.Add(p)
                loaded.add(p.name)
                del pending[p.name]

    def method(self, service: str, name: str) -> MethodDescriptor | None:
        try:
            svc = self.pool.FindServiceByName(service)
        except KeyError:
            return None
        return svc.methods_by_name.get(name)

    def message_class(self, full_name: str) -> type[Message]:
        """The class of message type ``full_name``; KeyError when this schema has none."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))


async def run_call(hub: Any, target: Target, method: str, requests: Sequence[bytes],
                   metadata: Sequence[tuple[str, Any]] = (),
                   timeout: float = REFLECT_TIMEOUT) -> tuple[Status, list[bytes]]:
    """(bridge loop) One whole call to ``target``: send ``requests``, half-close, collect
    the responses; ``(status, responses)``.  DEADLINE_EXCEEDED after ``timeout``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Status] = loop.create_future()
    out: list[bytes] = []
    call = HubLoopCall(hub, target, method, tuple(metadata))
    call.on_message = out.append
    call.on_end = lambda status, _trailers: done.done() or done.set_result(status)
    if call.status is not None and not done.done():
        done.set_result(call.status)
    for r in requests:
        call.send(r)
    call.half_close()
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout), out
    except TimeoutError:
        call.cancel(Status(DEADLINE_EXCEEDED, f"no answer in {timeout:g}s"))
        return Status(DEADLINE_EXCEEDED, f"{method}: no answer in {timeout:g}s"), out
    except asyncio.CancelledError:
        call.cancel(Status(CANCELLED, "the caller went away"))
        raise


class Schemas:
    """Reflected :class:`Schema` per (remote session, endpoint, service), kept
    :data:`SCHEMA_TTL` seconds (a remote that registers again gets fresh ones)."""

    def __init__(self, hub: Any, ttl: float = SCHEMA_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[tuple, tuple[Schema, float]] = {}

    def _session_key(self, ns: str, remote: str, endpoint: str) -> Any:
        session = self.hub.routes.get((ns, remote, endpoint))
        return session.id if session is not None else None

    async def get(self, ns: str, remote: str, endpoint: str, service: str) -> Schema:
        """The schema declaring ``service`` on that endpoint; ApiError FAILED_PRECONDITION
        when the endpoint serves no reflection, NOT_FOUND when it does not know the
        service, the call's own status (UNAVAILABLE, ...) when the remote cannot be
        reached."""
        key = (ns, remote, endpoint, self._session_key(ns, remote, endpoint), service)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
        status, answers = await run_call(self.hub, Target(ns, remote, endpoint),
                                         REFLECTION_METHOD, [req.SerializeToString()])
        where = endpoint_name(ns, remote, endpoint)
        if status.code == UNIMPLEMENTED:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"endpoint {endpoint!r} of remote {remote} serves no gRPC server reflection "
                "(grpc.reflection.v1alpha.ServerReflection), which the hub needs to learn "
                "its types", precondition=("REFLECTION", where, "serve gRPC server reflection"))
        if status.code != OK:
            raise ApiError(status_code(status.code), status.message or f"reflection on {where} failed")
        try:
            resp = reflection_pb2.ServerReflectionResponse.FromString(answers[0])
        except (IndexError, DecodeError) as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"reflection on {where} answered nothing usable: {exc}") from None
        if resp.HasField("error_response"):
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"endpoint {endpoint!r} of remote {remote} has no service {service}",
                           resource=("grpc.Service", service))
        try:
            schema = Schema(resp.file_descriptor_response.file_descriptor_proto)
        except (TypeError, ValueError) as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"reflection on {where} described unusable types: {exc}") from None
        if len(self._cache) > 1024:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
        self._cache[key] = (schema, now + self.ttl)
        return schema

    async def method(self, ns: str, remote: str, endpoint: str,
                     method: str) -> tuple[Schema, MethodDescriptor]:
        """The schema and descriptor of ``method`` (any form :func:`parse_method` takes);
        ApiError INVALID_ARGUMENT (``dial.method``) for a malformed or unknown method."""
        try:
            service, name = parse_method(method)
        except ValueError as exc:
            raise bad_field("dial.method", str(exc)) from None
        schema = await self.get(ns, remote, endpoint, service)
        md = schema.method(service, name)
        if md is None:
            raise bad_field("dial.method", f"service {service} on {endpoint_name(ns, remote, endpoint)}"
                                      f" has no method {name}")
        return schema, md


def parse_json_stream(body: bytes) -> list[Any]:
    """The JSON values in ``body``: newline-delimited, or simply one after another; a JSON
    array is taken as its elements.  ApiError INVALID_ARGUMENT when it does not parse."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_field("body", "the request body is not UTF-8") from None
    dec = json.JSONDecoder()
    out: list[Any] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        try:
            value, i = dec.raw_decode(text, i)
        except (ValueError, RecursionError) as exc:
            raise bad_field("body", f"JSON value {len(out) + 1} does not parse: {exc}") from None
        out.append(value)
    if len(out) == 1 and isinstance(out[0], list):
        out = out[0]
    return out


# --- the call ------------------------------------------------------------------------------


class ProxyService:
    """``/sesame.v1alpha1.Sesame/Proxy`` on the hub (a ``grpc.aio`` stream-stream handler of
    raw bytes: :meth:`handle`)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.schemas = Schemas(hub)

    async def check_endpoint(self, ns: str, remote: str, endpoint: str) -> None:
        """ApiError NOT_FOUND for a remote the hub has never heard of, or a connected one
        that does not offer ``endpoint``; UNAVAILABLE for a known remote that is not
        connected.  Nothing when a session (here or on a peer hub) serves it."""
        hub = self.hub
        if (ns, remote, endpoint) in hub.routes:
            return
        cluster = getattr(hub, "cluster", None)
        if cluster is not None and cluster.candidates(ns, remote, endpoint):
            return
        live = any(k[0] == ns and k[1] == remote for k in hub.routes) or (
            cluster is not None and cluster.offers(ns, remote))
        if live:
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"remote {remote} does not offer endpoint {endpoint!r}",
                           resource=("sesame.v1alpha1.Endpoint",
                                     endpoint_name(ns, remote, endpoint)))
        try:
            await hub.store_call(hub.store.get_remote, remote, ns)
        except NotFound:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no remote {N.resource_name(ns, remote)}",
                           resource=("sesame.v1alpha1.Remote",
                                     N.resource_name(ns, remote))) from None
        except StoreUnavailable:
            pass
        raise ApiError(grpc.StatusCode.UNAVAILABLE, f"remote {remote} is not connected")

    @staticmethod
    def conn(ns: str, remote: str, endpoint: str,
             mask: Any = None) -> sesame_pb2.ProxyResponse.Conn:
        """``conn`` for the endpoint, filtered by ``mask`` (a FieldMask; empty: all)."""
        full = sesame_pb2.ProxyResponse.Conn(
            namespace=sesame_pb2.Namespace(name=f"namespaces/{ns}"),
            remote=sesame_pb2.Remote(name=N.resource_name(ns, remote)),
            endpoint=sesame_pb2.Endpoint(name=endpoint_name(ns, remote, endpoint)))
        if mask is None or not mask.paths:
            return full
        if not mask.IsValidForDescriptor(sesame_pb2.ProxyResponse.Conn.DESCRIPTOR):
            raise bad_field("dial.conn_mask", f"paths {list(mask.paths)} are not fields of "
                                         "ProxyResponse.Conn (namespace, remote, endpoint)")
        out = sesame_pb2.ProxyResponse.Conn()
        mask.MergeMessage(full, out)
        return out

    async def handle(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        hub = self.hub
        info = await hub._authorize(context, "client", "Proxy")
        try:
            first = await asyncio.wait_for(context.read(), DIAL_TIMEOUT)
        except TimeoutError:
            await fail_call(context, ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               f"no dial within {DIAL_TIMEOUT:g}s"), drain=False)
        try:
            if first is grpc.aio.EOF:
                raise bad_field("dial", "the requests ended before a dial")
            try:
                req = sesame_pb2.ProxyRequest.FromString(first)
            except DecodeError as exc:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "request 1 does not parse as "
                               f"sesame.v1alpha1.ProxyRequest: {exc}") from None
            if req.WhichOneof("data") != "dial":
                raise bad_field("dial", f"the first request must be dial, not "
                                   f"{req.WhichOneof('data') or 'empty'}")
            try:
                ns, remote, endpoint = parse_endpoint(req.dial.endpoint)
            except ValueError as exc:
                raise bad_field("dial.endpoint", str(exc)) from None
            await hub._authorize(context, "client", "Proxy", Need("reach", ns, remote), info,
                                 drain=False)
            conn = self.conn(ns, remote, endpoint,
                             req.dial.conn_mask if req.dial.HasField("conn_mask") else None)
            await self.check_endpoint(ns, remote, endpoint)
            schema, method = await self.schemas.method(ns, remote, endpoint, req.dial.method)
            on_method = getattr(context, "on_method", None)  # the JSON face's converter
            if on_method is not None:
                on_method(schema, method)
        except ApiError as exc:
            await fail_call(context, exc, drain=True)
            return
        await context.write(sesame_pb2.ProxyResponse(conn=conn).SerializeToString())
        relay = _Relay(hub, context, Target(ns, remote, endpoint), method)
        await relay.run()


class _Relay:
    """One proxied call after ``conn``: client requests in, inner responses out."""

    def __init__(self, hub: Any, context: Any, target: Target, method: MethodDescriptor) -> None:
        self.hub = hub
        self.context = context
        self.target = target
        self.method = method
        self.path = f"/{method.containing_service.full_name}/{method.name}"
        self.in_type = method.input_type.full_name
        self.out_url = type_url(method.output_type.full_name)
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.writable = asyncio.Event()
        self.end: tuple[Status, tuple] | None = None
        self.inner: HubLoopCall | None = None
        self.paused = False  # the inner call's reading, held while the client lags
        self.requests = 1  # the dial

    def _put(self, msg: sesame_pb2.ProxyResponse) -> None:
        data = msg.SerializeToString()
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > HIGH_WATER and self.inner is not None and not self.paused:
            self.paused = True
            self.inner.pause_reading()
        self.wake.set()

    def _on_message(self, data: bytes) -> None:
        if len(data) > MAX_MESSAGE and self.inner is not None:
            self.inner.cancel(Status(RESOURCE_EXHAUSTED, f"a response of {len(data)} bytes is "
                                                         f"over the proxy's limit of {MAX_MESSAGE}"))
            return
        self._put(sesame_pb2.ProxyResponse(content=any_pb2.Any(type_url=self.out_url, value=data)))

    def _on_end(self, status: Status, trailers: tuple) -> None:
        if self.end is None:
            self.end = (status, trailers)
            self.wake.set()
            self.writable.set()

    async def _next(self) -> sesame_pb2.ProxyRequest | None:
        raw = await self.context.read()
        if raw is grpc.aio.EOF:
            return None
        self.requests += 1
        try:
            return sesame_pb2.ProxyRequest.FromString(raw)
        except DecodeError as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request {self.requests} does not parse as "
                           f"sesame.v1alpha1.ProxyRequest: {exc}") from None

    def _content(self, req: sesame_pb2.ProxyRequest) -> bytes:
        kind = req.WhichOneof("data")
        if kind != "content":
            raise bad_field(kind or "data", f"request {self.requests}: after the dial come at most one "
                                       "header, then content messages")
        if type_of(req.content.type_url) != self.in_type:
            raise bad_field("content.type_url", f"request {self.requests} holds "
                                           f"{req.content.type_url!r}; {self.path} takes "
                                           f"{type_url(self.in_type)}")
        if len(req.content.value) > MAX_MESSAGE:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request {self.requests}: a message of {len(req.content.value)} "
                           f"bytes is over the proxy's limit of {MAX_MESSAGE}")
        return req.content.value

    async def _up(self, pending: sesame_pb2.ProxyRequest | None) -> None:
        """Client requests into the inner call (after the header, if any)."""
        inner = self.inner
        assert inner is not None
        req = pending
        while req is not None:
            inner.send(self._content(req))
            while inner.buffered() > HIGH_WATER and self.end is None:
                self.writable.clear()
                await self.writable.wait()
            if self.end is not None:
                return
            req = await self._next()
        if await self._cancelled_soon():
            return  # (outer_done cancelled the inner call)
        inner.half_close()

    async def _cancelled_soon(self) -> bool:
        """After EOF from read(): was it the client's half-close, or its cancellation?
        grpc.aio shows both as EOF and marks the call cancelled a moment later, so look
        again after the loop has run what is ready (a few turns, no timer)."""
        for _ in range(SETTLE_TURNS):
            if self.context.cancelled() or self.context.done():
                return True
            await asyncio.sleep(0)
        return self.context.cancelled()

    async def run(self) -> None:
        context = self.context
        try:
            req = await self._next()
            metadata: tuple = ()
            if req is not None and req.WhichOneof("data") == "header":
                metadata = metadata_of(req.header)
                req = await self._next()
        except ApiError as exc:
            await fail_call(context, exc, drain=True)
            return
        remaining = context.time_remaining()
        if remaining is not None:
            metadata = (*metadata, ("grpc-timeout", encode_timeout(max(remaining, 0.0))))
        inner = self.inner = HubLoopCall(self.hub, self.target, self.path, metadata)
        inner.on_headers = lambda h: self._put(sesame_pb2.ProxyResponse(header=metadata_pb(h)))
        inner.on_message = self._on_message
        inner.on_end = self._on_end
        inner.on_writable = self.writable.set
        if inner.status is not None:
            self._on_end(inner.status, inner.trailers)

        def outer_done(_: Any) -> None:
            # grpc.aio shows a client's cancellation to read() as EOF, and need not cancel
            # this handler: the device must hear of it anyway
            if context.cancelled():
                inner.cancel(Status(CANCELLED, "the proxy's caller cancelled"))
                self._on_end(Status(CANCELLED, "the proxy's caller cancelled"), ())

        context.add_done_callback(outer_done)
        up = asyncio.get_running_loop().create_task(self._up(req))
        up.add_done_callback(lambda _: self.wake.set())  # a failed request ends the wait too
        bad: ApiError | None = None
        try:
            while True:
                if self.queue:
                    data = self.queue.popleft()
                    self.queued -= len(data)
                    if self.paused and self.queued <= HIGH_WATER // 4:
                        self.paused = False
                        inner.resume_reading()
                    await context.write(data)
                    continue
                if self.end is not None:
                    break
                if up.done() and up.exception() is not None:
                    break
                self.wake.clear()
                await self.wake.wait()
            if up.done() and not up.cancelled():
                exc = up.exception()
                if isinstance(exc, ApiError):
                    bad = exc
                elif exc is not None:
                    raise exc
        except asyncio.CancelledError:
            inner.cancel(Status(CANCELLED, "the proxy's caller cancelled"))
            raise
        finally:
            if not up.done():
                up.cancel()
                await asyncio.gather(up, return_exceptions=True)
        if bad is not None:  # the client broke the exchange: end the inner call, say why
            inner.cancel(Status(CANCELLED, bad.message))
            await fail_call(context, bad, drain=True)
            return
        status, trailers = self.end or (Status(UNAVAILABLE, "the inner call ended"), ())
        shown = tuple((k, v) for k, v in trailers if not k.startswith("grpc-"))  # (status: error)
        if shown:
            await context.write(sesame_pb2.ProxyResponse(trailer=metadata_pb(shown))
                                .SerializeToString())
        if status.code != OK:
            await context.write(sesame_pb2.ProxyResponse(error=status_pb(status))
                                .SerializeToString())


async def fail_call(context: Any, exc: ApiError, *, drain: bool) -> None:
    """End the outer call with ``exc`` (code, message, ``google.rpc`` details); with
    ``drain``, after taking what the client still sends (bounded), so the status is not
    lost to a write racing it."""
    if drain:
        await drain_requests(context.read)
    st = rpc_status.to_status(exc.status())
    await context.abort(st.code, st.details, trailing_metadata=st.trailing_metadata)


def proxy_handler(hub: Any) -> grpc.RpcMethodHandler:
    """The gRPC method handler of ``Sesame/Proxy`` for ``hub`` (raw bytes both ways)."""
    return grpc.stream_stream_rpc_method_handler(ProxyService(hub).handle)


__all__ = ["MAX_MESSAGE", "PROXY_METHOD", "ProxyService", "bad_field", "parse_json_stream",
           "status_code", "Schema", "Schemas", "endpoint_name",
           "fail_call", "parse_endpoint", "parse_method", "proxy_handler", "run_call",
           "type_url"]
