"""
Addresses and errors of NetConn connections: :class:`NetConnAddress` (both
directions between it and the wire's ``NetAddr``) and :class:`NetConnError`
(from a gRPC :class:`~sesame.core.Status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from twisted.internet import error, interfaces
from zope.interface import implementer

from sesame import _names as N
from sesame.bridge import grpc_code
from sesame.core import Status
from sesame.netconn._allowlist import AddressError, split_host_port
from sesame.type import netaddr_pb2


def _netaddr(addr: Any) -> netaddr_pb2.NetAddr:
    if isinstance(addr, (interfaces.IAddress,)) or hasattr(addr, "host"):
        host, port = addr.host, addr.port
        if ":" in host:
            return netaddr_pb2.NetAddr(network="tcp", address=f"[{host}]:{port}")
        return netaddr_pb2.NetAddr(network="tcp", address=f"{host}:{port}")
    return netaddr_pb2.NetAddr(network="tcp", address=str(addr))


@implementer(interfaces.IAddress)
@dataclass(frozen=True)
class NetConnAddress:
    """
    One end of a NetConn connection: ``via`` names the path (the gRPC target
    or remote), ``network``/``host``/``port`` the TCP address at the far end.

    :param via: the gRPC ``host:port`` target, ``"tunnel"``, or what the call
        factory calls itself (its ``target`` attribute).
    :param network: ``"tcp"``, ``"tcp4"`` or ``"tcp6"``.
    :param host: an IP address or a host name, without brackets.
    :param port: the TCP port; 0 when the remote reported none.
    """

    via: str
    network: str
    host: str
    port: int

    @classmethod
    def parse(cls, via: str, netaddr: netaddr_pb2.NetAddr) -> NetConnAddress:
        """
        The address a remote reported in its ``conn`` reply.

        :param via: the path the connection took (see the class).
        :param netaddr: a ``sesame.type.NetAddr``; its ``address`` is
            ``host:port`` or ``[v6]:port``, its empty ``network`` means ``tcp``.
        :returns: the address; one that does not parse as ``host:port`` is kept
            whole as ``host`` with port 0 (never an error).
        """
        try:
            host, port = split_host_port(netaddr.address)
            return cls(via, netaddr.network or "tcp", host, N.parse_port(port, "port", low=0))
        except (AddressError, ValueError):
            return cls(via, netaddr.network or "tcp", netaddr.address, 0)


class NetConnError(error.ConnectError):
    """
    A NetConn dial failed: ``code`` is the gRPC status the remote gave.

    :param code: the call's status code: ``PERMISSION_DENIED`` (allowlist),
        ``INVALID_ARGUMENT`` (bad address or network), ``UNAVAILABLE`` (refused,
        unresolvable, unreachable, no tunnel), ``DEADLINE_EXCEEDED`` (dial
        timeout), ``CANCELLED``...
    :param details: the status message, as the remote wrote it.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(string=f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


def _status_error(status: Status) -> NetConnError:
    return NetConnError(grpc_code(status.code), status.message)
