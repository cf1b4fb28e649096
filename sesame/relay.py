"""
Relaying between two Twisted connections, for ``sesame forward`` and
``sesame stdio``: each accepted connection (or stdin/stdout) is connected to
a client endpoint — any endpoint, ``sesame:`` included.

Like ``twisted.protocols.portforward``: the accepted side is paused until
the far side connects, then each transport is the other's streaming
producer (a slow reader on either end pauses the writer on the other) and
half-closes travel in both directions.  A plain TCP connection whose far
side is a NetConn connection is spliced instead (:func:`sesame.netconn.splice`:
the same guarantees, relayed on the bridge loop without thread hand-offs).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.bridge import write_now
from sesame.netconn import can_splice, splice

log = Logger()


def half_close(transport: Any) -> None:
    """Half-close ``transport`` (``loseWriteConnection``: the peer reads EOF, reading
    goes on) where it can; a transport that cannot half-close is closed outright."""
    if interfaces.IHalfCloseableDescriptor.providedBy(transport) or hasattr(
            transport, "loseWriteConnection"):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


@implementer(interfaces.IHalfCloseableProtocol)
class Side(Protocol):
    """One end of a relay; ``peer`` is the other end's protocol."""

    peer: Side | None = None
    read_closed = False
    write_closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            write_now(self.peer.transport, data)

    def readConnectionLost(self) -> None:
        self.read_closed = True
        p = self.peer
        if p is not None and p.transport is not None:
            # we produce nothing more: a paused producer would keep the peer's transport
            # from ever sending its half-close (Twisted resumes it instead)
            p.transport.unregisterProducer()
            half_close(p.transport)
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
            p.transport.unregisterProducer()  # see readConnectionLost
            p.transport.loseConnection()


def pair(a: Side, b: Side) -> None:
    """Join two connected sides: data, backpressure and half-closes flow both ways."""
    a.peer, b.peer = b, a
    b.transport.registerProducer(a.transport, True)
    a.transport.registerProducer(b.transport, True)


class Accepted(Side):
    """The accepted side: paused until the outgoing side is connected."""

    factory: RelayFactory
    _dial: defer.Deferred | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self._dial = self.factory.endpoint.connect(Factory.forProtocol(Side))
        self._dial.addCallbacks(self._connected, self._failed)

    def _connected(self, out: Side) -> None:
        self._dial = None
        if self.transport is None or not getattr(self.transport, "connected", True):
            out.transport.abortConnection()
            return
        self.factory.connected += 1
        if can_splice(self.transport, out.transport) and splice(self.transport, out.transport):
            return  # relayed on the bridge loop from now on
        pair(self, out)
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._dial = None
        self.factory.failures += 1
        log.warn("relay connection failed: {why}", why=failure.getErrorMessage())
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        d, self._dial = self._dial, None
        if d is not None:
            d.cancel()
        super().connectionLost(reason)


class RelayFactory(Factory):
    """A server factory connecting each accepted connection to ``endpoint``."""

    protocol = Accepted

    def __init__(self, endpoint: interfaces.IStreamClientEndpoint) -> None:
        self.endpoint = endpoint
        self.connected = 0
        self.failures = 0


class StdioRelay(Side):
    """stdin/stdout ↔ an endpoint; ``done`` fires when both are finished."""

    def __init__(self, endpoint: interfaces.IStreamClientEndpoint) -> None:
        self.endpoint = endpoint
        self.done: defer.Deferred = defer.Deferred()
        self._pending: list[bytes] = []
        self._stdin_eof = False

    def connectionMade(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Side))
        d.addCallbacks(self._connected, self._failed)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self._pending.append(data)
        else:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.peer is None:
            self._stdin_eof = True
            return
        super().readConnectionLost()

    def _connected(self, out: Side) -> None:
        out.peer, self.peer = self, out
        for chunk in self._pending:
            out.transport.write(chunk)
        self._pending.clear()
        if self._stdin_eof:
            half_close(out.transport)

    def _failed(self, failure: Failure) -> None:
        import sys

        print(f"sesame stdio: {failure.getErrorMessage()}", file=sys.stderr)
        self.transport.loseConnection()
        if not self.done.called:
            self.done.errback(SystemExit(1))

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.done.called:
            self.done.callback(None)


__all__ = ["Accepted", "RelayFactory", "Side", "StdioRelay", "half_close", "pair"]
