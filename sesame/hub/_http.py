"""
The hub's ``--http`` listener: one twisted.web site for operators.

:func:`admin_root` builds its root resource; today it has

* ``/v1alpha1/...`` — the management API as JSON REST (:mod:`sesame.hub._rest`
  over :class:`sesame.hub.mgmt.Management`; docs/MANAGEMENT.md),
* ``/dashboard``, ``/dashboard/state``, ``/metrics`` — :mod:`sesame.hub.dashboard`
  (admin token; ``/metrics`` without it under ``--metrics-public``),

and other pages mount themselves on the same root with ``root.putChild(...)``.
:func:`bearer_token` and :func:`authenticate` are the shared auth helpers: ``Authorization: Bearer
<token>`` checked against the store on every request.

The listener carries admin tokens, so :func:`check_http_endpoint` refuses a
plain-TCP endpoint on anything but a loopback interface (``ssl:``/``tls:``
endpoints and UNIX sockets are fine).

:func:`admin_site` is the :class:`twisted.web.server.Site` for that root: request
bodies are capped at :data:`MAX_BODY` (413, without buffering the rest), and the
access log shows token-shaped strings as ``ses_<id>_***``.
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Any

from twisted.web import http, resource, server

from sesame import _names as N
from sesame.hub._auth import ADMIN, Refused, authorize, bearer_token

__all__ = ["MAX_BODY", "admin_root", "admin_site", "authenticate", "bearer_token",
           "check_http_endpoint", "listen_http"]

#: The largest request body the ``--http`` site accepts (management requests are a few KiB).
MAX_BODY = 1 << 20
#: Past this much discarded chunked body the connection is closed instead of answered.
_DISCARD_LIMIT = 4 * MAX_BODY
_TOKEN_IN_TEXT = re.compile(r"(ses_[0-9a-f]{12}_)[A-Za-z0-9_-]+")

_TLS_TYPES = ("ssl", "tls")
_LOCAL_TYPES = ("unix",)


def authenticate(request: Any, store: Any, *, admin: bool = False) -> Any:
    """The live :class:`~sesame.hub.store.TokenInfo` of the request's bearer token
    (:func:`sesame.hub._auth.authorize`).

    Raises :class:`sesame.hub.mgmt.ApiError` (UNAUTHENTICATED without a valid
    token; PERMISSION_DENIED when ``admin`` and the token is not an admin's).
    Write it out with :func:`sesame.hub._rest.error_json` of ``exc.status()``.
    """
    import grpc

    from sesame.hub.mgmt import ApiError

    try:
        return authorize(store, bearer_token(request), ADMIN if admin else None)
    except Refused as exc:
        raise ApiError(grpc.StatusCode[exc.code], exc.message) from None


def admin_root(hub: Any, store: Any = None, *, bridge: Any = None,
               metrics_public: bool = False) -> resource.Resource:
    """The ``--http`` site's root: ``/v1alpha1/`` is the REST gateway of the
    management API of ``hub`` (over ``store``, the hub's own by default), plus
    ``/dashboard`` and ``/metrics`` (:func:`sesame.hub.dashboard.mount`; ``/metrics``
    without the admin token when ``metrics_public``)."""
    from sesame.hub import dashboard, mgmt
    from sesame.hub._rest import RestGateway

    if store is None or store is getattr(hub, "store", None):
        impl = mgmt.for_hub(hub)
    else:
        impl = mgmt.Management(hub, store)
    root = resource.Resource()
    streams = {}
    if hasattr(hub, "routes"):  # a real hub: it can proxy calls to its remotes
        from sesame.hub._proxyweb import RestProxy

        streams["sesame.v1alpha1.Sesame.Proxy"] = RestProxy(hub, bearer_token).render
    root.putChild(b"v1alpha1", RestGateway(mgmt.SERVICES, impl.call, bearer_token,
                                           bridge=bridge or getattr(hub, "bridge", None),
                                           streams=streams))
    dashboard.mount(root, hub, store if store is not None else hub.store,
                    metrics_public=metrics_public)
    return root


def check_http_endpoint(description: str) -> None:
    """ValueError unless ``description`` is a server endpoint fit for admin tokens:
    TLS (``ssl:``/``tls:``), a UNIX socket, or plain TCP on a loopback interface."""
    from twisted.internet import endpoints

    try:
        args, kwargs = N.split_endpoint_description(description)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{description!r} is not a Twisted server endpoint: {exc}") from None
    kind = args[0] if args else ""
    if kind in _TLS_TYPES or kind in _LOCAL_TYPES:
        return
    if kind not in ("tcp", "tcp6"):
        raise ValueError(
            f"{description!r}: use tcp:PORT:interface=127.0.0.1 (loopback), ssl:... (TLS) or "
            "unix:PATH for the admin HTTP listener")
    try:
        endpoints.serverFromString(None, description)  # builds the object, never listens
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{description!r} is not a Twisted server endpoint: {exc}") from None
    # Where the interface sits positionally: tcp:PORT:INTERFACE:BACKLOG, tcp6:PORT:BACKLOG:INTERFACE.
    at = 2 if kind == "tcp" else 3
    interface = kwargs.get("interface", args[at] if len(args) > at else "")
    if not N.is_loopback(interface):
        shown = interface or ("::" if kind == "tcp6" else "0.0.0.0")
        raise ValueError(
            f"refusing to serve the management API (it carries admin tokens) without TLS on "
            f"{shown}, which is not a loopback address; use an ssl: endpoint or "
            "interface=127.0.0.1")


def _too_large_body(limit: int) -> bytes:
    return json.dumps({"error": {
        "code": 413, "status": "RESOURCE_EXHAUSTED", "details": [],
        "message": f"the request body is larger than {limit} bytes"}}, indent=2).encode() + b"\n"


class _AdminRequest(server.Request):
    """A request whose body may not exceed ``max_body`` bytes.

    A declared ``Content-Length`` over the limit is answered 413 at once and the
    connection closed, before any of the body is read.  A chunked body is counted
    as it arrives and discarded past the limit, then answered 413 when it ends (or
    the connection closed once the discarded part passes ``_DISCARD_LIMIT``).
    """

    max_body = MAX_BODY
    _received = 0
    _too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._too_large = True
            self.content = BytesIO()
            # no "100 Continue" for a body we refuse (allHeadersReceived sends it next)
            self.requestHeaders.removeHeader(b"expect")
            body = _too_large_body(self.max_body)
            self.channel.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\n"
                b"Content-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            self.channel.loseConnection()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            if not self._too_large:
                self._too_large = True
                self.content.close()
                self.content = BytesIO()
            if self._received > _DISCARD_LIMIT:
                self.channel.loseConnection()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._too_large:
            return super().process()
        if self.channel is None or self.channel.transport is None or \
                getattr(self.channel.transport, "disconnecting", False):
            return None  # answered (or dropped) already
        self.channel.persistent = False  # close after the answer: the body was discarded
        self.setResponseCode(413)
        self.setHeader(b"content-type", b"application/json; charset=utf-8")
        self.setHeader(b"connection", b"close")
        body = _too_large_body(self.max_body)
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return None


def _access_log_line(timestamp: str, request: Any) -> str:
    """The combined log line, with token secrets (a token pasted into a path) masked."""
    return _TOKEN_IN_TEXT.sub(r"\1***", http.combinedLogFormatter(timestamp, request))


def admin_site(root: resource.Resource) -> server.Site:
    """The ``--http`` :class:`~twisted.web.server.Site` for ``root`` (see the module docstring)."""
    # No form parsing: every body here is JSON (sesame.hub._rest reads the query string only).
    site = server.Site(root, _AdminRequest, parsePOSTFormSubmission=False,
                       logFormatter=_access_log_line)
    site.displayTracebacks = False
    return site


def listen_http(reactor: Any, description: str, hub: Any, store: Any = None, *,
                root: resource.Resource | None = None, metrics_public: bool = False) -> Any:
    """Listen on ``description`` with :func:`admin_site` of ``root`` (by default a new
    :func:`admin_root`); a Deferred of the listening port."""
    from twisted.internet import endpoints

    site = admin_site(root if root is not None
                      else admin_root(hub, store, metrics_public=metrics_public))
    return endpoints.serverFromString(reactor, description).listen(site)
