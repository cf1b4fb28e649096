"""
Port forwarding through NetConn: listen on any Twisted server endpoint and
connect every accepted connection to ``address`` as dialled by a remote.

    from twisted.internet import endpoints, reactor
    from sesame.forward import NetConnForwardFactory
    endpoints.serverFromString(reactor, "tcp:2222:interface=127.0.0.1").listen(
        NetConnForwardFactory("127.0.0.1:7444", "127.0.0.1:22"))

Like ``twisted.protocols.portforward``: the accepted socket is paused until
the far side is connected, then each transport is the other's streaming
producer (a slow reader on either end pauses the writer on the other), and
half-closes travel in both directions.
"""

from __future__ import annotations

from typing import Any

from sesame.netconn import NetConnClientEndpoint
from sesame.relay import RelayFactory


class NetConnForwardFactory(RelayFactory):
    """
    A server factory forwarding each connection to ``address`` via the NetConn
    server at ``target`` (``host:port`` gRPC target, a tunnel channel, or a
    call factory; see :func:`sesame.netconn.connectNetConn`).
    """

    def __init__(self, target: Any, address: str, *, timeout: float | None = None,
                 metadata: Any = (), reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        super().__init__(NetConnClientEndpoint(reactor, target, address, timeout=timeout,
                                               metadata=metadata))
        self.target = target
        self.address = address


__all__ = ["NetConnForwardFactory"]
