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

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.netconn import connectNetConn

log = Logger()


@implementer(interfaces.IHalfCloseableProtocol)
class _Side(Protocol):
    """One end of the relay; ``peer`` is the other end's protocol."""

    peer: _Side | None = None
    read_closed = False
    write_closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        p = self.peer
        if p is not None and p.transport is not None:
            if interfaces.IHalfCloseableDescriptor.providedBy(p.transport):
                p.transport.loseWriteConnection()
            else:
                p.transport.loseConnection()
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        p, self.peer = self.peer, None
        if p is not None and p.transport is not None:
            p.peer = None
            p.transport.loseConnection()


class _Client(_Side):
    """The NetConn side."""


class _Accepted(_Side):
    """The accepted socket: paused until the NetConn side is connected."""

    factory: NetConnForwardFactory

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        f = self.factory
        self._dial = connectNetConn(
            f.target, f.address, Factory.forProtocol(_Client), timeout=f.timeout,
            metadata=f.metadata, reactor=f.reactor,
        )
        self._dial.addCallbacks(self._connected, self._failed)

    def _connected(self, client: _Client) -> None:
        self._dial = None
        if self.transport is None or not getattr(self.transport, "connected", True):
            client.transport.abortConnection()
            return
        self.peer, client.peer = client, self
        # each side's reads pause when the other side cannot keep up
        client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(client.transport, True)
        self.transport.resumeProducing()
        self.factory.connected += 1

    def _failed(self, failure: Failure) -> None:
        self._dial = None
        self.factory.failures += 1
        log.warn("forward to {address} failed: {why}", address=self.factory.address,
                 why=failure.getErrorMessage())
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        d = getattr(self, "_dial", None)
        if d is not None:
            self._dial = None
            d.cancel()
        super().connectionLost(reason)


class NetConnForwardFactory(Factory):
    """
    A server factory forwarding each connection to ``address`` via the NetConn
    server at ``target`` (``host:port`` gRPC target, a tunnel channel, or a
    call factory; see :func:`sesame.netconn.connectNetConn`).
    """

    protocol = _Accepted

    def __init__(self, target: Any, address: str, *, timeout: float | None = None,
                 metadata: Any = (), reactor: Any = None) -> None:
        self.target = target
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.reactor = reactor
        self.connected = 0
        self.failures = 0


__all__ = ["NetConnForwardFactory"]
