"""
The hub's ``--http`` listener: one twisted.web site for operators.

:func:`admin_root` builds its root resource; today it has

* ``/v1alpha1/...`` — the management API as JSON REST (:mod:`sesame._rest`
  over :class:`sesame.mgmt.Management`; docs/MANAGEMENT.md),
* ``/dashboard``, ``/dashboard/state``, ``/metrics`` — :mod:`sesame.dashboard`
  (admin token; ``/metrics`` without it under ``--metrics-public``),

and other pages mount themselves on the same root with ``root.putChild(...)``.
:func:`bearer_token` and :func:`authenticate` are the shared auth helpers: ``Authorization: Bearer
<token>`` checked against the store on every request.

The listener carries admin tokens, so :func:`check_http_endpoint` refuses a
plain-TCP endpoint on anything but a loopback interface (``ssl:``/``tls:``
endpoints and UNIX sockets are fine).
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

from sesame import _names as N

__all__ = ["admin_root", "authenticate", "bearer_token", "check_http_endpoint", "listen_http"]

_TLS_TYPES = ("ssl", "tls")
_LOCAL_TYPES = ("unix",)


def bearer_token(request: Any) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    raw = request.getHeader(b"authorization")
    if not raw:
        return None
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(request: Any, store: Any, *, admin: bool = False) -> Any:
    """The live :class:`~sesame._store.TokenInfo` of the request's bearer token.

    Raises :class:`sesame.mgmt.ApiError` (UNAUTHENTICATED without a valid
    token; PERMISSION_DENIED when ``admin`` and the token is not an admin's).
    Write it out with :func:`sesame._rest.error_json` of ``exc.status()``.
    """
    import grpc

    from sesame.mgmt import ApiError

    token = bearer_token(request)
    info = store.verify(token) if token else None
    if info is None:
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing, invalid or revoked token")
    if admin and info.kind != "admin":
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "this needs an admin token")
    return info


def admin_root(hub: Any, store: Any = None, *, bridge: Any = None,
               metrics_public: bool = False) -> resource.Resource:
    """The ``--http`` site's root: ``/v1alpha1/`` is the REST gateway of the
    management API of ``hub`` (over ``store``, the hub's own by default), plus
    ``/dashboard`` and ``/metrics`` (:func:`sesame.dashboard.mount`; ``/metrics``
    without the admin token when ``metrics_public``)."""
    from sesame import dashboard, mgmt
    from sesame._rest import RestGateway

    if store is None or store is getattr(hub, "store", None):
        impl = mgmt.for_hub(hub)
    else:
        impl = mgmt.Management(hub, store)
    root = resource.Resource()
    root.putChild(b"v1alpha1", RestGateway(mgmt.SERVICES, impl.call, bearer_token,
                                           bridge=bridge or getattr(hub, "bridge", None)))
    dashboard.mount(root, hub, store if store is not None else hub.store,
                    metrics_public=metrics_public)
    return root


def check_http_endpoint(description: str) -> None:
    """ValueError unless ``description`` is a server endpoint fit for admin tokens:
    TLS (``ssl:``/``tls:``), a UNIX socket, or plain TCP on a loopback interface."""
    from twisted.internet import endpoints

    try:
        args, kwargs = endpoints._parse(description)
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
        ep = endpoints.serverFromString(None, description)  # builds the object, never listens
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{description!r} is not a Twisted server endpoint: {exc}") from None
    interface = getattr(ep, "_interface", "") or ""
    if not N.is_loopback(interface):
        shown = interface or ("::" if kind == "tcp6" else "0.0.0.0")
        raise ValueError(
            f"refusing to serve the management API (it carries admin tokens) without TLS on "
            f"{shown}, which is not a loopback address; use an ssl: endpoint or "
            "interface=127.0.0.1")


def listen_http(reactor: Any, description: str, hub: Any, store: Any = None, *,
                root: resource.Resource | None = None, metrics_public: bool = False) -> Any:
    """Listen on ``description`` with ``root`` (by default a new :func:`admin_root`);
    a Deferred of the listening port."""
    from twisted.internet import endpoints

    site = server.Site(root if root is not None
                       else admin_root(hub, store, metrics_public=metrics_public))
    site.displayTracebacks = False
    return endpoints.serverFromString(reactor, description).listen(site)
