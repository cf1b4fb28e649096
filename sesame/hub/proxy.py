"""
``Sesame/Proxy``: one gRPC call to an API on a remote, made by the hub for a
client that speaks only the management API (gRPC here, JSON over ``--http``
in :mod:`sesame.hub._rest`, and ``sesame call`` on top of either).

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
import base64
import json
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from twisted.internet.protocol import Protocol

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
            raise _bad("header", f"metadata key {k!r} may not be set (lower-case letters, "
                                 "digits, '-', '_', '.'; not grpc-*, :*, or transport headers)")
        if not k.endswith("-bin") and not (isinstance(v, str) and v.isascii()
                                           and v.isprintable()):
            raise _bad("header", f"metadata {k!r}: a text value must be printable ASCII "
                                 "(binary values go in keys ending -bin)")
    return md


def status_pb(status: Status) -> status_pb2.Status:
    pb = status_pb2.Status(code=status.code, message=status.message or "")
    for d in status.details or ():
        pb.details.add().CopyFrom(d)
    return pb


def _bad(field: str, description: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}",
                    violations=[(field, description)])


def _code(code: int) -> grpc.StatusCode:
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
            raise ApiError(_code(status.code), status.message or f"reflection on {where} failed")
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
            raise _bad("dial.method", str(exc)) from None
        schema = await self.get(ns, remote, endpoint, service)
        md = schema.method(service, name)
        if md is None:
            raise _bad("dial.method", f"service {service} on {endpoint_name(ns, remote, endpoint)}"
                                      f" has no method {name}")
        return schema, md


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
            raise _bad("dial.conn_mask", f"paths {list(mask.paths)} are not fields of "
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
                raise _bad("dial", "the requests ended before a dial")
            try:
                req = sesame_pb2.ProxyRequest.FromString(first)
            except DecodeError as exc:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "request 1 does not parse as "
                               f"sesame.v1alpha1.ProxyRequest: {exc}") from None
            if req.WhichOneof("data") != "dial":
                raise _bad("dial", f"the first request must be dial, not "
                                   f"{req.WhichOneof('data') or 'empty'}")
            try:
                ns, remote, endpoint = parse_endpoint(req.dial.endpoint)
            except ValueError as exc:
                raise _bad("dial.endpoint", str(exc)) from None
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
        self.requests = 1  # the dial

    def _put(self, msg: sesame_pb2.ProxyResponse) -> None:
        data = msg.SerializeToString()
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > HIGH_WATER and self.inner is not None:
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
            raise _bad(kind or "data", f"request {self.requests}: after the dial come at most one "
                                       "header, then content messages")
        if type_of(req.content.type_url) != self.in_type:
            raise _bad("content.type_url", f"request {self.requests} holds "
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
        bad: ApiError | None = None
        try:
            while True:
                if self.queue:
                    data = self.queue.popleft()
                    self.queued -= len(data)
                    if self.queued <= HIGH_WATER // 4:
                        inner.resume_reading()
                    await context.write(data)
                    continue
                if self.end is not None:
                    break
                if up.done() and up.exception() is not None:
                    break
                self.wake.clear()
                waiter = asyncio.ensure_future(self.wake.wait())
                await asyncio.wait((waiter, up), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
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
        shown = tuple((k, v) for k, v in trailers
                      if k != "grpc-status-details-bin" and not k.startswith("grpc-"))
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


# --- the JSON face (POST /v1alpha1/proxy on --http) ------------------------------------


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
            raise _bad(f"request {self._n}", f"not a ProxyRequest: {exc}") from None
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


def parse_json_stream(body: bytes) -> list[Any]:
    """The JSON values in ``body``: newline-delimited, or simply one after another; a JSON
    array is taken as its elements.  ApiError INVALID_ARGUMENT when it does not parse."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("body", "the request body is not UTF-8") from None
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
            raise _bad("body", f"JSON value {len(out) + 1} does not parse: {exc}") from None
        out.append(value)
    if len(out) == 1 and isinstance(out[0], list):
        out = out[0]
    return out


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
                http = 200 if err is None else HTTP_STATUS.get(_code(err["code"]), 500)
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
            self.send({"error": status_json(_bad("message", f"not JSON: {exc}").status())})
            self.finish(1007, "a message is not JSON")
            return
        self.hop.to_loop(self.ctx.feed, obj)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.ended:
            self.ended = True
        self.hop.to_loop(self.ctx.end, True)  # an exchange still running is cancelled


def proxy_handler(hub: Any) -> grpc.RpcMethodHandler:
    """The gRPC method handler of ``Sesame/Proxy`` for ``hub`` (raw bytes both ways)."""
    return grpc.stream_stream_rpc_method_handler(ProxyService(hub).handle)


__all__ = ["MAX_MESSAGE", "PROXY_METHOD", "JsonContext", "ProxyService", "RestProxy",
           "parse_json_stream", "response_json", "status_json", "Schema", "Schemas", "endpoint_name",
           "fail_call", "parse_endpoint", "parse_method", "proxy_handler", "run_call",
           "type_url"]
