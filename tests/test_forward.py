"""Port forwarding through NetConn with real sockets on both ends."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from sesame.bridge._loop import get_bridge
from sesame.forward import NetConnForwardFactory
from sesame.netconn import NetConnServicer


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@implementer(IHalfCloseableProtocol)
class Sink(protocol.Protocol):
    """Reads to EOF, answers with the sha256 of what it read, closes."""

    def connectionMade(self):
        self.h = hashlib.sha256()

    def dataReceived(self, data):
        self.h.update(data)

    def readConnectionLost(self):
        self.transport.write(self.h.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.made = defer.Deferred()
        self.eof = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.buf += data

    # Twisted leaves a socket whose halves were shut separately open
    def readConnectionLost(self):
        self.read_closed = True
        self.eof.callback(None)
        if getattr(self, "write_closed", False):
            self.transport.loseConnection()

    def writeConnectionLost(self):
        self.write_closed = True
        if getattr(self, "read_closed", False):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


def _timeout(d, seconds=30):
    return d.addTimeout(seconds, reactor)


@pytest.fixture
def netconn_target():
    servicer = NetConnServicer(["127.0.0.1:*"])

    async def start():
        server = grpc.aio.server()
        servicer.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    bridge = get_bridge()
    server, port = bridge.run(start())
    yield f"127.0.0.1:{port}"
    bridge.run(server.stop(0))


async def _listen(factory):
    return await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


async def _forwarded(netconn_target, target_factory):
    target = await _listen(target_factory)
    fwd = NetConnForwardFactory(netconn_target, f"127.0.0.1:{target.getHost().port}")
    front = await _listen(fwd)
    return target, front, fwd


@pytest_twisted.ensureDeferred
async def test_forward_echo_8mib(netconn_target):
    target, front, fwd = await _forwarded(netconn_target, protocol.Factory.forProtocol(Echo))
    try:
        c = Client()
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", front.getHost().port).connect(
            protocol.Factory.forProtocol(lambda: c))
        data = os.urandom(8 * 1024 * 1024)
        c.transport.write(data)
        while len(c.buf) < len(data):
            d = defer.Deferred()
            reactor.callLater(0.005, d.callback, None)
            await d
        assert hashlib.sha256(c.buf).digest() == hashlib.sha256(data).digest()
        assert fwd.connected == 1
        c.transport.loseConnection()
        await _timeout(c.lost)
    finally:
        await front.stopListening()
        await target.stopListening()


@pytest_twisted.ensureDeferred
async def test_forward_half_close_reaches_target_and_answer_returns(netconn_target):
    target, front, _ = await _forwarded(netconn_target, protocol.Factory.forProtocol(Sink))
    try:
        c = Client()
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", front.getHost().port).connect(
            protocol.Factory.forProtocol(lambda: c))
        data = os.urandom(3 * 1024 * 1024 + 17)
        c.transport.write(data)
        c.transport.loseWriteConnection()
        await _timeout(c.lost)
        assert bytes(c.buf) == hashlib.sha256(data).hexdigest().encode()
    finally:
        await front.stopListening()
        await target.stopListening()


@pytest_twisted.ensureDeferred
async def test_forward_denied_address_closes_accepted_connection(netconn_target):
    fwd = NetConnForwardFactory(netconn_target, "127.0.0.2:22")
    front = await _listen(fwd)
    try:
        c = Client()
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", front.getHost().port).connect(
            protocol.Factory.forProtocol(lambda: c))
        await _timeout(c.eof)  # the forwarder closed on us
        assert fwd.failures == 1 and fwd.connected == 0
        assert c.buf == b""
    finally:
        await front.stopListening()
