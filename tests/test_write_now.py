"""
sesame.bridge.write_now: a plain TCP transport with nothing queued sends at once (no
writer registered with the reactor); otherwise the bytes queue behind what is there, in
order.  Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os

import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor

from sesame.bridge import write_now


class Sink(protocol.Protocol):
    def connectionMade(self) -> None:
        self.got = bytearray()
        self.factory.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.factory.want and not self.factory.done.called:
            self.factory.done.callback(bytes(self.got))


async def _pair(want: int):
    f = protocol.Factory.forProtocol(Sink)
    f.conns, f.want, f.done = [], want, defer.Deferred()
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f)
    client = await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        protocol.Protocol())
    return port, client, f


@pytest_twisted.ensureDeferred
async def test_sends_at_once_when_nothing_is_queued():
    port, client, f = await _pair(5)
    try:
        t = client.transport
        write_now(t, b"hello")
        # nothing queued, no writer registered: the socket took it already
        assert not t.dataBuffer and not t._tempDataBuffer
        assert t not in reactor.getWriters()
        assert await f.done.addTimeout(10, reactor) == b"hello"
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_queues_behind_what_is_buffered_in_order():
    big = os.urandom(8 * 1024 * 1024)  # more than the socket buffers take at once
    tail = os.urandom(100_000)
    port, client, f = await _pair(len(big) + 3 * len(tail))
    try:
        t = client.transport
        t.write(big)  # Twisted queues it (sent on the reactor's next turns)
        for _ in range(3):
            write_now(t, tail)
        assert t._tempDataBuffer or t.dataBuffer  # went through transport.write
        got = await f.done.addTimeout(30, reactor)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big + tail * 3).digest()
    finally:
        client.transport.loseConnection()
        await port.stopListening()
