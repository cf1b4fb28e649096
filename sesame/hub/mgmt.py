"""
The management API: ``sesame.v1alpha1.Sesame`` (remotes and endpoints,
PROTOCOL.md §1.6 and §5.3) and sesame's own ``sesame.admin.v1alpha1.Admin``
(namespaces, tokens, front-door routes over the hub's store; the live sessions
of connected remotes from the hub's memory).

One implementation, :class:`Management`, serves both faces: gRPC on the hub's
port (:meth:`Management.grpc_handlers`, installed by the hub's handler) and
JSON REST on the ``--http`` listener (:mod:`sesame.hub._rest`, which calls
:meth:`Management.call`).  Everything runs on the bridge loop.

Semantics follow the Google API design guide (AIPs 122, 131-135, 158, 193):

* Resource names ``namespaces/{ns}``, ``namespaces/{ns}/remotes/{r}``,
  ``namespaces/{ns}/remotes/{r}/endpoints/{e}``,
  ``namespaces/{ns}/remotes/{r}/sessions/{id}``, ``tokens/{id}``,
  ``routes/{id}``.  ``namespaces/-`` as a ListRemotes parent (or no parent,
  which ``sesame remotes`` sends) lists every namespace; ``-`` for either id of
  a ListSessions parent means any.
* Connected state is a list of its own (``Admin/ListSessions``, paged in
  name order from the hub's fleet index, :class:`sesame.hub.metrics.FleetIndex`),
  never a header: a page costs the page, not the fleet.  ``filter`` is a part
  of the remote id (any case; at most 63 name characters, INVALID_ARGUMENT
  naming ``filter`` otherwise); a call looks at no more than :data:`SCAN_LIMIT`
  sessions and may return a short page with a token to go on.
* Create takes ``parent`` and an optional ``resource_id`` (generated when
  empty); ``ALREADY_EXISTS`` on conflict.  Output-only ``create_time`` in a
  request is ignored; a ``name`` that disagrees with the request is refused.
* Update applies ``update_mask`` (``*`` = every updatable field; no mask =
  the fields set in the body); unknown paths are ``INVALID_ARGUMENT`` naming
  ``update_mask``; output-only paths are ignored.
* List pages with ``page_size`` (0: :data:`DEFAULT_PAGE_SIZE`, capped at
  :data:`MAX_PAGE_SIZE`) and an opaque ``page_token`` bound to the other
  request fields; a token that is not ours, or reused with different fields,
  is ``INVALID_ARGUMENT`` naming ``page_token``.
* Errors are ``google.rpc.Status`` with details: ``BadRequest`` field
  violations for ``INVALID_ARGUMENT`` (and the conflicting field for
  ``ALREADY_EXISTS``), ``ResourceInfo`` for ``NOT_FOUND`` / ``ALREADY_EXISTS``,
  ``PreconditionFailure`` for ``FAILED_PRECONDITION``.

Authorization (``authorization: Bearer <token>``, checked against the store
on every call): no valid token is ``UNAUTHENTICATED``; reads of remotes and
endpoints need a token that may list that remote (a client token sees the
remotes its pattern matches, an admin token all); every write, and tokens and
routes, need an admin token (``PERMISSION_DENIED`` otherwise); a client token
may read its own namespace.  Token secrets appear only in the
``CreateToken`` response, never in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import functools
import hashlib
import inspect
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sesame import _names as N
from sesame.admin.v1alpha1 import admin_pb2
from sesame.bridge import drain_requests
from sesame.hub._auth import Refused, authorize, context_token
from sesame.hub.metrics import FleetView
from sesame.hub.store import (
    DEFAULT_NAMESPACE,
    AlreadyExists,
    EndpointRecord,
    InvalidArgument,
    NamespaceRecord,
    NotFound,
    RemoteRecord,
    RouteRecord,
    Store,
    StoreError,
    StoreUnavailable,
    TokenInfo,
)
from sesame.v1alpha1 import sesame_pb2

__all__ = [
    "ADMIN",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "SERVICES",
    "SESAME",
    "ApiError",
    "Management",
    "for_hub",
    "name_filter",
    "peer_address",
    "session_pb",
]

log = logging.getLogger("sesame.mgmt")

SESAME: ServiceDescriptor = sesame_pb2.DESCRIPTOR.services_by_name["Sesame"]
ADMIN: ServiceDescriptor = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
#: The services :class:`Management` implements (and the REST gateway exposes).
SERVICES: tuple[ServiceDescriptor, ...] = (SESAME, ADMIN)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: A ListRemotes listing's later pages come from the records its first page read, for this
#: many seconds (a consistent listing, and one read of the store's table, not one a page);
#: at most SNAPSHOTS listings are kept.
SNAPSHOT_TTL = 60.0
SNAPSHOTS = 4
#: ListSessions looks at no more than this many sessions per call (a filter or a client
#: token's pattern may skip most of them): a short page and a token to go on then.
SCAN_LIMIT = 20_000

_ID_RE = re.compile(r"[0-9a-f]{12}\Z")
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def method_path(method: MethodDescriptor) -> str:
    """``/package.Service/Method``."""
    return f"/{method.containing_service.full_name}/{method.name}"


# --- errors --------------------------------------------------------------------------


class ApiError(Exception):
    """A failed management call: a gRPC code, a message and ``google.rpc`` details."""

    def __init__(self, code: grpc.StatusCode, message: str, *,
                 violations: Sequence[tuple[str, str]] = (),
                 resource: tuple[str, str] | None = None,
                 precondition: tuple[str, str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)  # (field, description)
        self.resource = resource  # (resource_type, resource_name)
        self.precondition = precondition  # (type, subject, description)

    def status(self) -> status_pb2.Status:
        st = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            br = error_details_pb2.BadRequest()
            for field, description in self.violations:
                br.field_violations.add(field=field, description=description)
            st.details.add().Pack(br)
        if self.resource:
            rtype, rname = self.resource
            info = error_details_pb2.ResourceInfo(resource_type=rtype, resource_name=rname)
            st.details.add().Pack(info)
        if self.precondition:
            kind, subject, description = self.precondition
            pf = error_details_pb2.PreconditionFailure()
            pf.violations.add(type=kind, subject=subject, description=description)
            st.details.add().Pack(pf)
        return st

    def __repr__(self) -> str:
        return f"ApiError({self.code.name}, {self.message!r})"


def _invalid(field: str, description: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}",
                    violations=[(field, description)])


def _parse_request(cls: type[Message], data: bytes) -> Message:
    """``cls`` parsed from a request's bytes; :class:`ApiError` INVALID_ARGUMENT naming the
    message type when they do not parse."""
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"the request does not parse as {cls.DESCRIPTOR.full_name}: {exc}") from None


def _denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, message)


_RESOURCE_TYPES = {
    "namespace": "sesame.v1alpha1.Namespace",
    "remote": "sesame.v1alpha1.Remote",
    "endpoint": "sesame.v1alpha1.Endpoint",
    "token": "sesame.admin.v1alpha1.Token",
    "route": "sesame.admin.v1alpha1.Route",
}


def _from_store(exc: StoreError, fields: dict[str, str], names: dict[str, str]) -> ApiError:
    """Map a store error to an :class:`ApiError`.

    ``fields`` maps the store's argument names to request field paths;
    ``names`` maps resource kinds (namespace, remote, ...) to the resource
    names the request referred to.
    """
    if isinstance(exc, InvalidArgument):
        return _invalid(fields.get(exc.field, exc.field), exc.reason)
    if isinstance(exc, NotFound):
        name = names.get(exc.field, str(exc.value))
        return ApiError(grpc.StatusCode.NOT_FOUND, f"{name} not found",
                        resource=(_RESOURCE_TYPES.get(exc.field, exc.field), name))
    if isinstance(exc, AlreadyExists):
        name = names.get(exc.field, str(exc.value))
        field = fields.get(exc.field, exc.field)
        return ApiError(grpc.StatusCode.ALREADY_EXISTS, f"{name} already exists",
                        violations=[(field, f"{name} already exists")],
                        resource=(_RESOURCE_TYPES.get(exc.field, exc.field), name))
    return ApiError(grpc.StatusCode.INTERNAL, "store error")


# --- names and pages ------------------------------------------------------------------


def _ids(field: str, value: str, *collections: str) -> list[str]:
    """``namespaces/a/remotes/b`` with collections (namespaces, remotes) → [a, b]."""
    parts = value.split("/")
    shape = "/".join(f"{c}/{{{c[:-1]}}}" for c in collections)
    if not value:
        raise _invalid(field, f"required: {shape}")
    if len(parts) != 2 * len(collections) or parts[0::2] != list(collections):
        raise _invalid(field, f"expected {shape}")
    ids = parts[1::2]
    for c, i in zip(collections, ids, strict=True):
        if not N.valid_name(i):
            raise _invalid(field, f"bad {c[:-1]} id in {shape}: 1-63 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit")
    return ids


def _resource_id(field: str, value: str, prefix: str) -> str:
    if not value:
        return f"{prefix}-{secrets.token_hex(4)}"
    if not N.valid_name(value):
        raise _invalid(field, "must be 1-63 letters, digits, '.', '_' or '-', starting with a "
                       "letter or digit")
    return value


def _fingerprint(request: Message) -> str:
    """What a page token is bound to: the request minus its paging fields."""
    rest = type(request)()
    rest.CopyFrom(request)
    rest.ClearField("page_size")
    rest.ClearField("page_token")
    return hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()[:16]


def _page_size(request: Message) -> int:
    """The request's ``page_size``: 0 is :data:`DEFAULT_PAGE_SIZE`, more than
    :data:`MAX_PAGE_SIZE` is that; negative is ``INVALID_ARGUMENT``."""
    size = request.page_size
    if size < 0:
        raise _invalid("page_size", "must not be negative")
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_after(request: Message, check: Callable[[Any], Any]) -> Any:
    """Where the request's ``page_token`` says the previous page ended (``check``
    validates and converts the decoded JSON value; it raises ValueError or TypeError),
    or None on the first page.  INVALID_ARGUMENT naming ``page_token`` for a token that
    is not ours or was made for other request fields."""
    if not request.page_token:
        return None
    try:
        pad = "=" * (-len(request.page_token) % 4)
        got_fp, after = json.loads(base64.urlsafe_b64decode(request.page_token + pad))
        if got_fp != _fingerprint(request):
            raise ValueError
        return check(after)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise _invalid("page_token", "not a page token of this list (or the other request "
                       "fields changed)") from None


def _page_token(request: Message, after: Any) -> str:
    """The opaque token of the page after ``after`` (bound to the other request fields)."""
    raw = json.dumps([_fingerprint(request), after]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _str_after(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _page(request: Message, items: Iterable[Any], key: Callable[[Any], str]) -> tuple[list, str]:
    """One page of ``items`` (sorted here by ``key``) and the next page's token."""
    size = _page_size(request)
    after = _page_after(request, _str_after)
    ordered = sorted(items, key=key)
    rest = [i for i in ordered if after is None or key(i) > after]
    page = rest[:size]
    token = _page_token(request, key(page[-1])) if len(rest) > size else ""
    return page, token


_FILTER_RE = re.compile(r"[A-Za-z0-9._-]{0,63}\Z")


def name_filter(field: str, value: str) -> str:
    """A remote-name substring filter, lowercased; INVALID_ARGUMENT naming ``field`` unless
    it is at most 63 of the characters names are made of (nothing else could match)."""
    if not isinstance(value, str) or not _FILTER_RE.match(value):
        raise _invalid(field, "a part of a remote id: at most 63 letters, digits, '.', '_' "
                       "or '-'")
    return value.lower()


def peer_address(peer: str) -> str:
    """A grpc peer string (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``) as HOST:PORT."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            peer = peer[len(prefix):]
    return peer.replace("%5B", "[").replace("%5D", "]")


def _mask(request: Message, body: Message, body_field: str, updatable: Sequence[str],
          output_only: Sequence[str] = ("name", "create_time")) -> list[str]:
    """The updatable fields an Update request changes."""
    if request.HasField("update_mask") and request.update_mask.paths:
        paths: list[str] = []
        for p in request.update_mask.paths:
            if p == "*":
                paths.extend(updatable)
            elif p in updatable:
                paths.append(p)
            elif p in output_only:
                continue
            else:
                raise _invalid("update_mask", f"unknown or immutable field {p!r} of {body_field} "
                               f"(updatable: {', '.join(updatable)})")
        return list(dict.fromkeys(paths))
    return [f.name for f, _ in body.ListFields() if f.name in updatable]


def _ts(msg: Any, seconds: float) -> None:
    msg.FromNanoseconds(int(seconds * 1e9))


# --- resources as messages ------------------------------------------------------------


def remote_pb(r: RemoteRecord) -> sesame_pb2.Remote:
    pb = sesame_pb2.Remote(name=r.resource_name, display_name=r.display_name,
                           description=r.description)
    _ts(pb.create_time, r.create_time)
    return pb


def endpoint_pb(e: EndpointRecord) -> sesame_pb2.Endpoint:
    pb = sesame_pb2.Endpoint(name=e.resource_name, display_name=e.display_name,
                             description=e.description)
    _ts(pb.create_time, e.create_time)
    pb.spec.tunnel.SetInParent()  # the only kind of endpoint there is
    return pb


def session_pb(s: Any, routes: dict) -> admin_pb2.Session:
    """A hub session (:class:`sesame.hub.Session`) as an ``admin.v1alpha1.Session``;
    ``routes`` is the hub's (namespace, remote, endpoint) -> session map."""
    pb = admin_pb2.Session(
        name=f"{N.resource_name(s.namespace, s.remote)}/sessions/{s.id}",
        peer=peer_address(s.peer), offered_endpoints=sorted(s.endpoints),
        endpoints=sorted(ep for ep in s.endpoints
                         if routes.get((s.namespace, s.remote, ep)) is s),
        connections=s.connections, stream_requests_pending=len(s.pending))
    _ts(pb.connect_time, s.since)
    return pb


def namespace_pb(n: NamespaceRecord) -> admin_pb2.Namespace:
    pb = admin_pb2.Namespace(name=n.resource_name)
    _ts(pb.create_time, n.create_time)
    return pb


def token_pb(t: TokenInfo) -> admin_pb2.Token:
    pb = admin_pb2.Token(name=f"tokens/{t.id}", kind=t.kind, namespace=t.namespace,
                         remote=t.remote or "", pattern=t.pattern or "")
    _ts(pb.create_time, t.create_time)
    if t.revoke_time is not None:
        _ts(pb.revoke_time, t.revoke_time)
    return pb


def route_pb(r: RouteRecord) -> admin_pb2.Route:
    pb = admin_pb2.Route(name=f"routes/{r.id}", kind=r.kind, match=r.match, target=r.target)
    _ts(pb.create_time, r.created)
    return pb


# --- the implementation ---------------------------------------------------------------


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


class Management:
    """The ``Sesame`` and ``Admin`` services over ``store``, for ``hub``.

    :meth:`call` is the entry point of both faces; the per-method coroutines
    (``create_remote``, ``list_tokens``, ...) take the request message and the
    caller's :class:`TokenInfo` and return the response message or raise
    :class:`ApiError`.
    """

    def __init__(self, hub: Any, store: Store) -> None:
        self.hub = hub
        self.store = store
        # ListRemotes: (request fingerprint, token id) -> (when, (names, records))
        self._snapshots: collections.OrderedDict[tuple[str, str], tuple[float, Any]] = \
            collections.OrderedDict()
        self._snapshots_lock = threading.Lock()
        self._impl: dict[str, Callable[[Message, TokenInfo], Coroutine[Any, Any, Message]]] = {}
        for svc in SERVICES:
            for m in svc.methods:
                fn = getattr(self, _snake(m.name), None)
                if fn is not None and not (m.client_streaming or m.server_streaming):
                    self._impl[m.full_name] = fn

    # --- entry points ---------------------------------------------------------------

    def authenticate(self, token: str | None, what: str = "management API") -> TokenInfo:
        """The live token ``token`` is (:func:`sesame.hub._auth.authorize`); :class:`ApiError`
        UNAUTHENTICATED otherwise, counted as a ``client`` auth failure in ``what``."""
        try:
            return authorize(self.store, token)
        except Refused as exc:
            self._auth_failure("client", f"{what}: {exc.reason}")
            raise ApiError(grpc.StatusCode[exc.code], exc.message) from None

    def _auth_failure(self, kind: str, message: str) -> None:
        metrics = getattr(self.hub, "metrics", None)
        if metrics is not None:
            metrics.auth_failure(kind, message=message)

    async def call(self, method: MethodDescriptor, request: Message, token: str | None) -> Message:
        """(bridge loop) Authenticate ``token`` and run ``method``; raises :class:`ApiError`."""
        info = await self.authorized(token, method.name)
        return await self.dispatch(method, request, info)

    async def dispatch(self, method: MethodDescriptor, request: Message, info: TokenInfo) -> Message:
        fn = self._impl.get(method.full_name)
        if fn is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED,
                           f"{method.full_name} is not implemented by this hub")
        try:
            return await fn(request, info)
        except ApiError as exc:
            if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                self._auth_failure(info.kind, f"{method.name}: {exc.message}")
            raise
        except StoreError as exc:  # one the method did not map itself
            raise _from_store(exc, {}, {}) from None
        except Exception:
            log.exception("%s failed", method.full_name)
            raise ApiError(grpc.StatusCode.INTERNAL, "internal error") from None

    def grpc_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """``{'/sesame.v1alpha1.Sesame/GetRemote': handler, ...}`` for the unary methods.

        Requests arrive as raw bytes and are parsed by the handler once the caller's token
        is checked: UNAUTHENTICATED comes first, then INVALID_ARGUMENT for a request that
        does not parse (grpc's own deserializer would end it UNKNOWN, before any check)."""
        out: dict[str, grpc.RpcMethodHandler] = {}
        for svc in SERVICES:
            for m in svc.methods:
                if m.client_streaming or m.server_streaming:
                    # Proxy (the hub's handler serves it: sesame.hub.proxy).  Without a
                    # hub: our own UNIMPLEMENTED after taking what the client sends
                    # (grpc's, while the client still writes, can turn INTERNAL)
                    out[method_path(m)] = grpc.stream_stream_rpc_method_handler(
                        _not_served(m.full_name))
                    continue
                out_cls = message_factory.GetMessageClass(m.output_type)
                out[method_path(m)] = grpc.unary_unary_rpc_method_handler(
                    self._grpc_unary(m), request_deserializer=None,
                    response_serializer=out_cls.SerializeToString)
        return out

    def _grpc_unary(self, method: MethodDescriptor) -> Callable[..., Any]:
        """The gRPC handler of ``method``: its request as bytes (:meth:`grpc_handlers`) or as
        the message already parsed."""
        in_cls = message_factory.GetMessageClass(method.input_type)

        async def handle(request: bytes | Message, context: grpc.aio.ServicerContext) -> Message:
            try:
                info = await self.authorized(context_token(context), method.name)
                if isinstance(request, bytes):
                    request = _parse_request(in_cls, request)
                return await self.dispatch(method, request, info)
            except ApiError as exc:
                st = rpc_status.to_status(exc.status())
                await context.abort(st.code, st.details, trailing_metadata=st.trailing_metadata)

        return handle

    async def _io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a store call: through the hub's :meth:`store_call` (a
        networked store never runs on the loop), inline without a hub."""
        store_call = getattr(self.hub, "store_call", None)
        if store_call is None:
            return fn(*args, **kwargs)
        return await store_call(functools.partial(fn, *args, **kwargs))

    async def authorized(self, token: str | None, what: str = "management API") -> TokenInfo:
        """:meth:`authenticate` without blocking the loop on a networked store; a store that
        does not answer is UNAVAILABLE."""
        try:
            return await self._io(self.authenticate, token, what)
        except StoreUnavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    async def _off_loop(self, fn: Callable[[], Message]) -> Message:
        """``fn()`` (a whole-table read, a fleet scan) in the bridge's bounded handler pool,
        so the loop keeps serving tunnels meanwhile; inline when not on a running loop."""
        pool = getattr(getattr(self.hub, "bridge", None), "handler_pool", None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if pool is None or loop is None:
            return fn()
        return await loop.run_in_executor(pool(), fn)

    # --- authorization ------------------------------------------------------------------

    @staticmethod
    def _require_admin(info: TokenInfo) -> None:
        if info.kind != "admin":
            raise _denied("this needs an admin token")

    @staticmethod
    def _require_list(info: TokenInfo, ns: str, remote: str) -> None:
        if not info.may_list(remote, ns):
            raise _denied(f"this token may not see {N.resource_name(ns, remote)}")

    async def _routes_changed(self) -> None:
        hook = getattr(self.hub, "on_routes_changed", None)
        if hook is None:
            return
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception:  # the change is stored; the front doors catch up on restart
            log.exception("on_routes_changed failed")

    # --- Sesame: remotes ----------------------------------------------------------------

    @staticmethod
    def _list_namespace(request: Any) -> str | None:
        if request.parent in ("", "namespaces/-"):
            return None
        return _ids("parent", request.parent, "namespaces")[0]

    @staticmethod
    def _remote_names(ns: str, remote: str) -> dict[str, str]:
        return {"namespace": f"namespaces/{ns}", "remote": N.resource_name(ns, remote)}

    async def create_remote(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        (ns,) = _ids("parent", req.parent, "namespaces")
        rid = _resource_id("resource_id", req.resource_id, "remote")
        if req.remote.name and req.remote.name != N.resource_name(ns, rid):
            raise _invalid("remote.name", "output only: name the remote with resource_id")
        try:
            rec = await self._io(self.store.create_remote, rid, namespace=ns,
                                 display_name=req.remote.display_name,
                                 description=req.remote.description)
        except StoreError as exc:
            raise _from_store(exc, {"name": "resource_id", "remote": "resource_id",
                                    "namespace": "parent",
                                    "display_name": "remote.display_name",
                                    "description": "remote.description"},
                              self._remote_names(ns, rid)) from None
        return remote_pb(rec)

    async def get_remote(self, req: Any, info: TokenInfo) -> Message:
        ns, r = _ids("name", req.name, "namespaces", "remotes")
        self._require_list(info, ns, r)
        try:
            return remote_pb(await self._io(self.store.get_remote, r, ns))
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, self._remote_names(ns, r)) from None

    async def list_remotes(self, req: Any, info: TokenInfo) -> Message:
        ns = self._list_namespace(req)

        def one_page() -> Message:
            size = _page_size(req)
            after = _page_after(req, _str_after)
            snap = self._snapshot(req, info) if after is not None else None
            if snap is None:
                try:
                    records = self.store.list_remotes(ns)
                except StoreError as exc:
                    raise _from_store(exc, {"namespace": "parent"},
                                      {"namespace": f"namespaces/{ns}"}) from None
                visible = records if info.kind == "admin" else [
                    r for r in records if info.may_list(r.name, r.namespace)]
                visible.sort(key=lambda r: r.resource_name)
                snap = ([r.resource_name for r in visible], visible)
                if len(visible) > size:
                    self._keep_snapshot(req, info, snap)
            names, ordered = snap
            start = 0 if after is None else bisect.bisect_right(names, after)
            page = ordered[start:start + size]
            token = _page_token(req, names[start + size - 1]) if len(names) > start + size else ""
            return sesame_pb2.ListRemotesResponse(remotes=[remote_pb(r) for r in page],
                                                  next_page_token=token)

        # The store reads the whole table (about 0.2 s at 50,000 remotes): off the loop, so
        # tunnels keep moving meanwhile, and once per listing (the snapshot).
        return await self._off_loop(one_page)

    def _snapshot(self, req: Any, info: TokenInfo) -> tuple[list[str], list] | None:
        """The records a listing's first page read, for its next pages (see ``list_remotes``)."""
        key = (_fingerprint(req), info.id)
        with self._snapshots_lock:
            hit = self._snapshots.get(key)
            if hit is None or time.monotonic() - hit[0] > SNAPSHOT_TTL:
                return None
            self._snapshots.move_to_end(key)
            return hit[1]

    def _keep_snapshot(self, req: Any, info: TokenInfo, snap: tuple[list[str], list]) -> None:
        with self._snapshots_lock:
            self._snapshots[(_fingerprint(req), info.id)] = (time.monotonic(), snap)
            while len(self._snapshots) > SNAPSHOTS:
                self._snapshots.popitem(last=False)

    async def update_remote(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        ns, r = _ids("name", req.name, "namespaces", "remotes")
        if req.remote.name and req.remote.name != req.name:
            raise _invalid("remote.name", "must be empty or equal to name")
        paths = _mask(req, req.remote, "remote", ("display_name", "description"))
        changes = {p: getattr(req.remote, p) for p in paths}
        try:
            return remote_pb(await self._io(self.store.update_remote, r, ns, **changes))
        except StoreError as exc:
            raise _from_store(exc, {"name": "name", "display_name": "remote.display_name",
                                    "description": "remote.description"},
                              self._remote_names(ns, r)) from None

    async def delete_remote(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        ns, r = _ids("name", req.name, "namespaces", "remotes")
        try:
            await self._io(self.store.delete_remote, r, ns)
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, self._remote_names(ns, r)) from None
        return empty_pb2.Empty()

    # --- Sesame: endpoints ----------------------------------------------------------------

    @staticmethod
    def _endpoint_names(ns: str, r: str, e: str = "") -> dict[str, str]:
        names = {"namespace": f"namespaces/{ns}", "remote": N.resource_name(ns, r)}
        if e:
            names["endpoint"] = f"{N.resource_name(ns, r)}/endpoints/{e}"
        return names

    @staticmethod
    def _check_spec(spec: Any, field: str) -> None:
        if spec.WhichOneof("data") not in (None, "tunnel"):
            raise _invalid(field, "only tunnel endpoints exist")

    async def create_endpoint(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        ns, r = _ids("parent", req.parent, "namespaces", "remotes")
        eid = _resource_id("resource_id", req.resource_id, "endpoint")
        if req.endpoint.name and req.endpoint.name != f"{req.parent}/endpoints/{eid}":
            raise _invalid("endpoint.name", "output only: name the endpoint with resource_id")
        self._check_spec(req.endpoint.spec, "endpoint.spec")
        try:
            rec = await self._io(self.store.create_endpoint, r, eid, namespace=ns,
                                             display_name=req.endpoint.display_name,
                                             description=req.endpoint.description)
        except StoreError as exc:
            raise _from_store(exc, {"name": "resource_id", "endpoint": "resource_id",
                                    "namespace": "parent",
                                    "display_name": "endpoint.display_name",
                                    "description": "endpoint.description"},
                              self._endpoint_names(ns, r, eid)) from None
        return endpoint_pb(rec)

    async def get_endpoint(self, req: Any, info: TokenInfo) -> Message:
        ns, r, e = _ids("name", req.name, "namespaces", "remotes", "endpoints")
        self._require_list(info, ns, r)
        try:
            return endpoint_pb(await self._io(self.store.get_endpoint, r, e, ns))
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, self._endpoint_names(ns, r, e)) from None

    async def list_endpoints(self, req: Any, info: TokenInfo) -> Message:
        ns, r = _ids("parent", req.parent, "namespaces", "remotes")
        self._require_list(info, ns, r)
        try:
            records = await self._io(self.store.list_endpoints, r, ns)
        except StoreError as exc:
            raise _from_store(exc, {"name": "parent"}, self._endpoint_names(ns, r)) from None
        page, token = _page(req, records, lambda e: e.resource_name)
        return sesame_pb2.ListEndpointsResponse(endpoints=[endpoint_pb(e) for e in page],
                                                next_page_token=token)

    async def update_endpoint(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        ns, r, e = _ids("name", req.name, "namespaces", "remotes", "endpoints")
        if req.endpoint.name and req.endpoint.name != req.name:
            raise _invalid("endpoint.name", "must be empty or equal to name")
        paths = _mask(req, req.endpoint, "endpoint", ("display_name", "description", "spec"))
        if "spec" in paths:
            self._check_spec(req.endpoint.spec, "endpoint.spec")
        changes = {p: getattr(req.endpoint, p) for p in paths if p != "spec"}
        try:
            return endpoint_pb(await self._io(self.store.update_endpoint, r, e, ns, **changes))
        except StoreError as exc:
            raise _from_store(exc, {"name": "name", "display_name": "endpoint.display_name",
                                    "description": "endpoint.description"},
                              self._endpoint_names(ns, r, e)) from None

    async def delete_endpoint(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        ns, r, e = _ids("name", req.name, "namespaces", "remotes", "endpoints")
        try:
            await self._io(self.store.delete_endpoint, r, e, ns)
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, self._endpoint_names(ns, r, e)) from None
        return empty_pb2.Empty()

    # --- Admin: namespaces ---------------------------------------------------------------

    @staticmethod
    def _may_read_namespace(info: TokenInfo, ns: str) -> bool:
        return info.kind == "admin" or (info.kind == "client" and info.namespace == ns)

    async def create_namespace(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        if not req.resource_id:
            raise _invalid("resource_id", "required: the new namespace's id")
        nid = _resource_id("resource_id", req.resource_id, "namespace")
        if req.namespace.name and req.namespace.name != f"namespaces/{nid}":
            raise _invalid("namespace.name", "output only: name the namespace with resource_id")
        try:
            return namespace_pb(await self._io(self.store.create_namespace, nid))
        except StoreError as exc:
            raise _from_store(exc, {"name": "resource_id", "namespace": "resource_id"},
                              {"namespace": f"namespaces/{nid}"}) from None

    async def get_namespace(self, req: Any, info: TokenInfo) -> Message:
        (ns,) = _ids("name", req.name, "namespaces")
        if not self._may_read_namespace(info, ns):
            raise _denied(f"this token may not see namespaces/{ns}")
        try:
            return namespace_pb(await self._io(self.store.get_namespace, ns))
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, {"namespace": f"namespaces/{ns}"}) from None

    async def list_namespaces(self, req: Any, info: TokenInfo) -> Message:
        if info.kind not in ("admin", "client"):
            raise _denied("this needs an admin or client token")
        visible = [n for n in await self._io(self.store.list_namespaces)
                   if self._may_read_namespace(info, n.name)]
        page, token = _page(req, visible, lambda n: n.name)
        return admin_pb2.ListNamespacesResponse(namespaces=[namespace_pb(n) for n in page],
                                                next_page_token=token)

    async def delete_namespace(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        (ns,) = _ids("name", req.name, "namespaces")
        name = f"namespaces/{ns}"
        if ns == DEFAULT_NAMESPACE:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           "the default namespace cannot be deleted",
                           precondition=("DEFAULT", name, "the default namespace always exists"))
        try:
            await self._io(self.store.get_namespace, ns)
            if await self._io(self.store.list_remotes, ns):
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{name} still has remotes; delete them first",
                               precondition=("NOT_EMPTY", name, "the namespace has remotes"))
            live = await self._io(self.store.list_tokens, include_revoked=False)
            if any(t.namespace == ns for t in live):
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{name} still has live tokens; revoke them first",
                               precondition=("NOT_EMPTY", name, "the namespace has live tokens"))
            await self._io(self.store.delete_namespace, ns)
        except StoreError as exc:
            raise _from_store(exc, {"name": "name"}, {"namespace": name}) from None
        return empty_pb2.Empty()

    # --- Admin: tokens ------------------------------------------------------------------

    @staticmethod
    def _token_id(req: Any) -> str:
        # Never echo the value: a confused caller may have put a whole secret token there.
        parts = req.name.split("/")
        if len(parts) != 2 or parts[0] != "tokens" or not _ID_RE.match(parts[1]):
            raise _invalid("name", "expected tokens/{id} with a 12-hex-digit id")
        return parts[1]

    async def create_token(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        t = req.token
        if not t.kind:
            raise _invalid("token.kind", "required: remote, client or admin")
        ns = t.namespace or DEFAULT_NAMESPACE
        try:
            token_id, secret = await self._io(
                self.store.create_token, t.kind, remote=t.remote or None,
                pattern=t.pattern or None, namespace=ns)
            stored = await self._io(self.store.get_token, token_id)
        except StoreError as exc:
            raise _from_store(exc, {"kind": "token.kind", "remote": "token.remote",
                                    "pattern": "token.pattern", "namespace": "token.namespace"},
                              {"namespace": f"namespaces/{ns}"}) from None
        log.info("token %s (%s) created through the management API", token_id, t.kind)
        return admin_pb2.CreateTokenResponse(token=token_pb(stored), secret=secret)

    async def get_token(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        tid = self._token_id(req)
        try:
            return token_pb(await self._io(self.store.get_token, tid))
        except StoreError as exc:
            raise _from_store(exc, {}, {"token": f"tokens/{tid}"}) from None

    async def list_tokens(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        tokens = await self._io(self.store.list_tokens, include_revoked=req.show_revoked)
        page, token = _page(req, tokens, lambda t: t.id)
        return admin_pb2.ListTokensResponse(tokens=[token_pb(t) for t in page],
                                            next_page_token=token)

    async def delete_token(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        tid = self._token_id(req)
        try:
            await self._io(self.store.get_token, tid)
            if await self._io(self.store.revoke, tid):
                log.info("token %s revoked through the management API", tid)
            return token_pb(await self._io(self.store.get_token, tid))
        except StoreError as exc:
            raise _from_store(exc, {}, {"token": f"tokens/{tid}"}) from None

    # --- Admin: routes --------------------------------------------------------------------

    @staticmethod
    def _route_id(req: Any) -> str:
        (rid,) = _ids("name", req.name, "routes")
        return rid

    async def create_route(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        r = req.route
        for field in ("kind", "match", "target"):
            if not getattr(r, field):
                raise _invalid(f"route.{field}", "required")
        try:
            rec = await self._io(self.store.create_route, r.kind, r.match, r.target)
        except StoreError as exc:
            raise _from_store(exc, {"kind": "route.kind", "match": "route.match",
                                    "target": "route.target"},
                              {"match": f"{r.kind} route for {r.match}"}) from None
        log.info("route %s (%s %s -> %s) created", rec.id, rec.kind, rec.match, rec.target)
        await self._routes_changed()
        return route_pb(rec)

    async def get_route(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        rid = self._route_id(req)
        try:
            return route_pb(await self._io(self.store.get_route, rid))
        except StoreError as exc:
            raise _from_store(exc, {}, {"route": f"routes/{rid}"}) from None

    async def list_routes(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        try:
            routes = await self._io(self.store.list_routes, req.kind or None)
        except StoreError as exc:
            raise _from_store(exc, {"kind": "kind"}, {}) from None
        page, token = _page(req, routes, lambda r: r.id)
        return admin_pb2.ListRoutesResponse(routes=[route_pb(r) for r in page],
                                            next_page_token=token)

    async def delete_route(self, req: Any, info: TokenInfo) -> Message:
        self._require_admin(info)
        rid = self._route_id(req)
        try:
            await self._io(self.store.delete_route, rid)
        except StoreError as exc:
            raise _from_store(exc, {}, {"route": f"routes/{rid}"}) from None
        log.info("route %s deleted", rid)
        await self._routes_changed()
        return empty_pb2.Empty()

    # --- Admin: sessions ------------------------------------------------------------------

    @staticmethod
    def _session_parent(parent: str) -> tuple[str | None, str | None]:
        """``namespaces/{ns}/remotes/{r}`` with ``-`` for any (or empty: every session)."""
        if parent in ("", "namespaces/-/remotes/-"):
            return None, None
        parts = parent.split("/")
        if len(parts) != 4 or parts[0::2] != ["namespaces", "remotes"]:
            raise _invalid("parent", "expected namespaces/{namespace}/remotes/{remote}, '-' "
                           "for any (namespaces/-/remotes/-)")
        ns, remote = parts[1], parts[3]
        for what, value in (("namespace", ns), ("remote", remote)):
            if value != "-" and not N.valid_name(value):
                raise _invalid("parent", f"bad {what} id: '-' or 1-63 letters, digits, '.', "
                               "'_' or '-', starting with a letter or digit")
        return (None if ns == "-" else ns), (None if remote == "-" else remote)

    def _session_after(self, value: Any) -> tuple:
        """A page token's place: (ns, remote, session id) on a single hub, (ns, remote,
        hub id, session id) in a cluster."""
        clustered = getattr(self.hub, "cluster", None) is not None
        if clustered:
            ns, remote, hub, sid = value
            if not isinstance(hub, str):
                raise TypeError
        else:
            ns, remote, sid = value
        if not (isinstance(ns, str) and isinstance(remote, str) and type(sid) is int):
            raise TypeError
        return tuple(value)

    async def list_sessions(self, req: Any, info: TokenInfo) -> Message:
        ns, remote = self._session_parent(req.parent)
        needle = name_filter("filter", req.filter)
        size = _page_size(req)
        after = _page_after(req, self._session_after)
        if info.kind not in ("admin", "client"):
            raise _denied("this needs an admin or client token")
        resp = admin_pb2.ListSessionsResponse()
        if info.kind == "client":
            if ns is not None and ns != info.namespace:
                return resp  # like ListRemotes: nothing of another namespace is visible
            ns = info.namespace
        cluster = getattr(self.hub, "cluster", None)
        rows = None
        if cluster is not None:  # every hub's sessions, snapshotted here on the loop
            rows = [((s.namespace, s.remote, cluster.id, s.id), s) for s in self.hub.connected()]
            rows += [((p.namespace, p.remote, p.hub, _presence_id(p)), p)
                     for p in cluster.remote_sessions()]
        return await self._off_loop(lambda: self._sessions_page(req, info, ns, remote, needle,
                                                                size, after, resp, rows))

    def _sessions_page(self, req: Any, info: TokenInfo, ns: str | None, remote: str | None,
                       needle: str, size: int, after: tuple | None, resp: Any,
                       rows: list | None = None) -> Message:
        if rows is None:
            metrics = getattr(self.hub, "metrics", None)
            view = metrics.fleet.view() if metrics is not None else FleetView.of(
                list(self.hub.sessions.values()))
            flat, sessions = view.flat, view.flat_sessions
        else:
            rows.sort(key=lambda r: r[0])
            flat, sessions = [r[0] for r in rows], [r[1] for r in rows]
        start = 0 if ns is None else bisect.bisect_left(
            flat, (ns,) if remote is None else (ns, remote))
        if after is not None:
            start = max(start, bisect.bisect_right(flat, after))
        routes = self.hub.routes
        visible: dict[tuple[str, str], bool] = {}
        page: list[Any] = []
        # Bounded work per call: past SCAN_LIMIT entries, a short (even empty) page and a
        # token to go on from, so one call never scans the whole fleet.
        stop = min(len(flat), start + SCAN_LIMIT)
        j = start
        while j < stop:
            s_ns, s_remote = flat[j][0], flat[j][1]
            if ns is not None and s_ns != ns:
                break  # past the namespace (or the remote): nothing further matches
            if remote is not None and s_remote != remote:
                if ns is not None:
                    break
                j += 1
                continue
            j += 1
            if needle and needle not in s_remote.lower():
                continue
            ok = visible.get((s_ns, s_remote))
            if ok is None:
                ok = visible[(s_ns, s_remote)] = info.may_list(s_remote, s_ns)
            if not ok or getattr(sessions[j - 1], "closed", False):
                continue
            if len(page) == size:  # one more exists: the next page starts after the last
                resp.next_page_token = _page_token(req, list(flat[page[-1]]))
                break
            page.append(j - 1)
        else:
            if j < len(flat):  # the scan limit, not the end: go on after what was scanned
                resp.next_page_token = _page_token(req, list(flat[j - 1]))
        cluster = getattr(self.hub, "cluster", None)
        for i in page:
            s = sessions[i]
            if rows is None:
                resp.sessions.append(session_pb(s, routes))
            elif flat[i][2] == cluster.id:
                pb = session_pb(s, routes)
                pb.hub = cluster.id
                pb.name = f"{N.resource_name(s.namespace, s.remote)}/sessions/{cluster.id}.{s.id}"
                resp.sessions.append(pb)
            else:
                resp.sessions.append(presence_pb(s, cluster))
        return resp


def _not_served(name: str) -> Callable[..., Any]:
    async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await drain_requests(context.read)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by this hub")

    return handle


def _presence_id(p: Any) -> int:
    """The session id in a peer hub's presence key (``ns/remote#id``)."""
    tail = p.key.rpartition("#")[2]
    return int(tail) if tail.isascii() and tail.isdigit() else 0


def presence_pb(p: Any, cluster: Any) -> admin_pb2.Session:
    """A session on another hub of the cluster (:class:`sesame.hub.cluster.Presence`) as
    an ``admin.v1alpha1.Session``: ``endpoints`` are those this hub would route to it.  In
    a cluster a session's id is ``HUB.ID`` (ids are numbered per hub)."""
    routed = []
    for ep in sorted(p.endpoints):
        try:
            best = cluster.candidates(p.namespace, p.remote, ep)
        except RuntimeError:  # the view changed under us (it lives on the loop)
            best = []
        if best and best[0] is p:
            routed.append(ep)
    pb = admin_pb2.Session(
        name=f"{N.resource_name(p.namespace, p.remote)}/sessions/{p.hub}.{_presence_id(p)}",
        peer=peer_address(p.peer), offered_endpoints=sorted(p.endpoints), endpoints=routed,
        hub=p.hub)
    _ts(pb.connect_time, p.since)
    return pb


def for_hub(hub: Any) -> Management:
    """The hub's :class:`Management` (one per hub, made on first use)."""
    mgmt = getattr(hub, "_mgmt", None)
    if mgmt is None or mgmt.store is not hub.store:
        mgmt = Management(hub, hub.store)
        hub._mgmt = mgmt
    return mgmt

