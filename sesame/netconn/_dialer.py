"""
The remote's dialler: whether a ``dial`` request may be served (network,
address syntax, the :class:`~sesame.netconn._allowlist.Allowlist`), name
resolution for names only address rules could allow, the TCP connect with
Twisted endpoints, and the gRPC status a failed dial answers with.

Reactor side only, no gRPC: :mod:`._servicer` calls it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from sesame.core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    UNAVAILABLE,
    Status,
)
from sesame.netconn._allowlist import (
    AddressError,
    Allowlist,
    host_name,
    ip_literal,
    parse_port,
    shown,
    split_host_port,
)

DEFAULT_DIAL_TIMEOUT = 30.0


def _check_dial(allow: Allowlist, dial: Any) -> tuple[Status | None, str, int]:
    """
    Whether the ``dial`` request may be served.

    :returns: ``(None, host, port)`` to go ahead, or ``(status, "", 0)`` to refuse
        with: ``INVALID_ARGUMENT`` for an unsupported network, a bad address (a port
        that is not ASCII digits 1-65535, a host name IDNA cannot encode) or an IP
        literal of the wrong family, ``PERMISSION_DENIED`` for what ``allow`` does not
        permit.  A name only address rules could allow passes here; :func:`_dial`
        resolves it and dials only the allowed addresses.  A host name comes back in
        its ASCII (IDNA) form, the form it was checked and is dialled in.
    """
    network = dial.address.network or "tcp"
    if network not in ("tcp", "tcp4", "tcp6"):
        return Status(INVALID_ARGUMENT,
                      f"network {shown(network)} is not supported (tcp, tcp4, tcp6)"), "", 0
    try:
        host, port_text = split_host_port(dial.address.address)
        port = parse_port(port_text, f"address {shown(dial.address.address)}")
        ip = ip_literal(host)
        if ip is None:
            host = host_name(host)
            # "１２７.０.０.１" is no IP literal, but its IDNA form is: check it (and let
            # _dial dial it) as the address it is, never as a name
            ip = ip_literal(host)
    except AddressError as exc:
        return Status(INVALID_ARGUMENT, str(exc)), "", 0
    if ip is not None:
        if (network == "tcp4" and ip.version != 4) or (network == "tcp6" and ip.version != 6):
            return Status(INVALID_ARGUMENT, f"{shown(host)} is not a {network} address"), "", 0
        if not allow.allows_ip(ip, port):
            return Status(PERMISSION_DENIED, f"{_where(host, port)} is not allowed"), "", 0
    elif not allow.allows_name(host, port) and not _may_resolve_to_allowed(allow, port):
        return Status(PERMISSION_DENIED, f"{_where(host, port)} is not allowed"), "", 0
    return None, host, port


def _where(host: str, port: int) -> str:
    """``host:port`` for messages and logs, the host cut short (an IPv6 scope id may be
    any length)."""
    if len(host) > 100:
        host = host[:100] + "..."
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _may_resolve_to_allowed(allow: Allowlist, port: int) -> bool:
    return any(r.network is not None or r.any_host for r in allow.rules if r.port_ok(port))


def _dial(reactor: Any, allow: Allowlist, network: str, host: str, port: int, timeout: float,
          build: Callable[[], Protocol]) -> defer.Deferred:
    """(reactor) Connect to what :func:`_check_dial` let through (``host`` an IP literal or
    an ASCII host name); a Deferred of the connected protocol."""
    factory = Factory.forProtocol(build)  # type: ignore[arg-type]
    factory.noisy = False  # one per relayed connection: no start/stop log lines
    factory.protocol = lambda: build()  # type: ignore[assignment]
    ip = ip_literal(host)
    if ip is not None:
        ep = (TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint)(
            reactor, host, port, timeout=timeout)
        return ep.connect(factory)
    if allow.allows_name(host, port):
        return HostnameEndpoint(reactor, host.encode("ascii"), port, timeout=timeout).connect(factory)

    # Only address rules could allow it: resolve, keep allowed addresses, dial those.
    family = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}.get(network, socket.AF_UNSPEC)
    d = _resolve(reactor, host, port, family)

    def pick(addresses: list[str]) -> defer.Deferred:
        ok = allow.filter_ips(addresses, port)
        if not ok:
            return defer.fail(_Denied(f"{host}:{port} is not allowed"))
        return _first_connect(reactor, ok, port, timeout, factory)

    return d.addCallback(pick)


class _Denied(Exception):
    pass


def _resolve(reactor: Any, host: str, port: int, family: int) -> defer.Deferred:
    from twisted.internet.threads import deferToThreadPool

    def lookup() -> list[str]:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        seen: list[str] = []
        for *_, sockaddr in infos:
            if sockaddr[0] not in seen:
                seen.append(sockaddr[0])
        return seen

    return deferToThreadPool(reactor, reactor.getThreadPool(), lookup)


def _first_connect(reactor: Any, ips: list[str], port: int, timeout: float,
                   factory: Factory) -> defer.Deferred:
    async def go() -> Any:
        last: Failure | None = None
        for ip in ips:
            ep = (TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint)(
                reactor, ip, port, timeout=timeout)
            try:
                return await ep.connect(factory)
            except Exception:  # noqa: BLE001
                last = Failure()
        assert last is not None
        last.raiseException()

    return defer.ensureDeferred(go())


def _dial_status(f: Failure, where: str, timeout: float) -> Status:
    """The status a failed dial ends its call with: INTERNAL for what no dial should fail
    with (a bug: the caller logs it), UNAVAILABLE for connection errors not named here."""
    if f.check(_Denied):
        return Status(PERMISSION_DENIED, f.getErrorMessage())
    if f.check(error.ConnectionRefusedError):
        return Status(UNAVAILABLE, f"{where}: connection refused")
    if f.check(error.TimeoutError, defer.TimeoutError):
        return Status(DEADLINE_EXCEEDED, f"{where}: no connection within {timeout:g}s")
    if f.check(error.DNSLookupError, socket.gaierror):
        return Status(UNAVAILABLE, f"{where}: cannot resolve host")
    if f.check(error.NoRouteError):
        return Status(UNAVAILABLE, f"{where}: no route to host")
    if f.check(defer.CancelledError, error.ConnectingCancelledError):
        return Status(CANCELLED, f"{where}: dial cancelled")
    if f.check(error.ConnectError, OSError):
        return Status(UNAVAILABLE, f"{where}: {f.getErrorMessage()}")
    return Status(INTERNAL, f"{where}: dial failed unexpectedly: {_describe(f)}")


def _describe(f: Failure) -> str:
    name = getattr(f.type, "__name__", str(f.type))
    return f"{name}: {f.getErrorMessage()}"


def _unexpected(f: Failure) -> bool:
    """Whether a dial failure is a bug rather than the network's answer."""
    return _dial_status(f, "", 0.0).code == INTERNAL
