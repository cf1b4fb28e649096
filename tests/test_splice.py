"""
Spliced relays (:func:`sesame.netconn.splice`): a hub port map's connection,
or a ``sesame forward`` one, relayed on the bridge loop alone once the far
side is connected.  Real hub, real remote, real sockets: every byte checked,
half-closes both ways, resets, backpressure from a client that stops
reading, and the hand-over itself (a target that talks and closes at once).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, error, interfaces, protocol, reactor
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from sesame import netconn
from sesame.hub.frontdoor import FrontDoors
from sesame.relay import RelayFactory
from sesame.testing import hub as testing_hub
from tests.netconn_helpers import eventually

sesame_hub = testing_hub.sesame_hub
T = 15.0


async def until(predicate, timeout=T):
    """Wait for a reactor-side condition (the reactor keeps running), with a deadline."""
    await eventually(predicate, timeout)


@implementer(interfaces.IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """Either end: records bytes, EOF and loss; echoes when ``echo``."""

    echo = False

    def connectionMade(self):
        self.data = bytearray()
        self.eof = False
        self.reason = None
        self.lost = defer.Deferred()
        made = getattr(self.factory, "made", None)
        if made is not None:
            made.append(self)

    def dataReceived(self, data):
        self.data += data
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self):
        self.eof = True
        if getattr(self, "write_closed", False):
            self.transport.loseConnection()  # Twisted does not close two shut halves itself

    def writeConnectionLost(self):
        self.write_closed = True
        if self.eof:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.reason = reason
        self.lost.callback(None)


class EchoPeer(Peer):
    echo = True

    def readConnectionLost(self):
        super().readConnectionLost()
        self.transport.loseConnection()


class Banner(Peer):
    """Says a lot the moment it is connected, then closes: all of it reaches the client
    while the connection is being handed to the loop."""

    payload = os.urandom(1 << 20)

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(self.payload)
        self.transport.loseConnection()


class Answer(Peer):
    """Answers the sha256 of what it read once the client half-closes, then closes."""

    def readConnectionLost(self):
        super().readConnectionLost()
        self.transport.write(hashlib.sha256(self.data).hexdigest().encode())
        self.transport.loseConnection()


class Source(Peer):
    """Writes 64 KiB chunks as long as its transport lets it (a push producer)."""

    def connectionMade(self):
        super().connectionMade()
        self.sent = hashlib.sha256()
        self.count = 0
        self.paused_at = None
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True
        if self.paused_at is None:
            self.paused_at = self.count

    def resumeProducing(self):
        self.paused = False
        reactor.callLater(0, self._more)

    def _more(self):
        if self.paused or self.count >= self.total:
            if self.count >= self.total and not self.paused:
                self.transport.unregisterProducer()
                self.transport.loseConnection()
            return
        chunk = os.urandom(65536)
        self.sent.update(chunk)
        self.count += len(chunk)
        self.transport.write(chunk)
        reactor.callLater(0, self._more)

    def stopProducing(self):
        self.paused = True


async def _listen(cls, **attrs):
    f = protocol.Factory.forProtocol(cls)
    f.made = []
    for k, v in attrs.items():
        setattr(cls, k, v)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f)
    return port, f.made


async def _connect(port, cls=Peer):
    f = protocol.Factory.forProtocol(cls)
    return await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(f).addTimeout(
        T, reactor)


@pytest.fixture
def port_map(sesame_hub):
    """``await port_map(TargetProtocol)`` -> (door port, targets accepted, route id): a
    tcp route on an in-process hub to a target behind an in-process remote."""
    made = []

    async def make(target_cls):
        target, accepted = await _listen(target_cls)
        made.append(target)
        tport = target.getHost().port
        await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{tport}"])
        doors = FrontDoors(sesame_hub.hub, sesame_hub.store, reactor, listeners={},
                           watch_interval=0.2)
        await doors.start()
        made.append(doors)
        probe = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Peer))
        port = probe.getHost().port
        await probe.stopListening()
        rec = sesame_hub.store.create_route("tcp", str(port), f"127.0.0.1:{tport}@edge-1")
        doors.changed()
        await until(lambda: doors.tcp.get(rec.id) and doors.tcp[rec.id].listening)
        return port, accepted, rec.id

    yield make
    for m in made:
        pytest_twisted.blockon(defer.maybeDeferred(
            m.stop if isinstance(m, FrontDoors) else m.stopListening))


@pytest_twisted.ensureDeferred
async def test_a_port_map_connection_is_spliced_and_echoes_every_byte(sesame_hub, port_map):
    port, accepted, route = await port_map(EchoPeer)
    before = netconn.splice_count()
    client = await _connect(port)
    payload = os.urandom(8 << 20)
    client.transport.write(payload)
    await until(lambda: len(client.data) >= len(payload))
    assert hashlib.sha256(client.data).digest() == hashlib.sha256(payload).digest()
    assert netconn.splice_count() == before + 1
    key = ("default", "edge-1", route)
    metrics = sesame_hub.hub.metrics  # the counters follow the connection onto the loop
    assert metrics.bytes_by_key()[key] == (len(payload), len(payload))
    assert metrics.open_connections()[key] == 1
    client.transport.loseConnection()
    await client.lost.addTimeout(T, reactor)
    await until(lambda: key not in metrics.open_connections())
    await accepted[0].lost.addTimeout(T, reactor)  # and the target connection went with it


@pytest_twisted.ensureDeferred
async def test_a_target_that_talks_and_closes_at_once_loses_nothing_in_the_hand_over(port_map):
    port, _, _ = await port_map(Banner)
    for _ in range(5):  # the race between the hand-over and the target's bytes, several times
        client = await _connect(port)
        await until(lambda c=client: c.eof)  # the target's close arrives as a FIN, after its bytes
        assert hashlib.sha256(client.data).digest() == hashlib.sha256(Banner.payload).digest()
        client.transport.loseConnection()
        await client.lost.addTimeout(T, reactor)
        assert client.reason.check(error.ConnectionDone), client.reason


@pytest_twisted.ensureDeferred
async def test_client_half_close_reaches_the_target_and_its_answer_comes_back(port_map):
    port, _, _ = await port_map(Answer)
    client = await _connect(port)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    await client.lost.addTimeout(T, reactor)
    assert bytes(client.data) == hashlib.sha256(payload).hexdigest().encode()
    assert client.reason.check(error.ConnectionDone), client.reason


@pytest_twisted.ensureDeferred
async def test_target_half_close_reaches_the_client_which_keeps_writing(port_map):
    port, accepted, _ = await port_map(Peer)
    client = await _connect(port)
    await until(lambda: accepted)
    target = accepted[0]
    target.transport.write(b"answer")
    target.transport.loseWriteConnection()
    await until(lambda: client.eof)
    assert bytes(client.data) == b"answer"
    late = os.urandom(256 * 1024)
    client.transport.write(late)  # the other direction is still open
    await until(lambda: len(target.data) >= len(late))
    assert bytes(target.data) == late
    client.transport.loseWriteConnection()
    await until(lambda: target.eof)
    target.transport.loseConnection()
    await client.lost.addTimeout(T, reactor)
    assert client.reason.check(error.ConnectionDone), client.reason


@pytest_twisted.ensureDeferred
async def test_a_client_reset_drops_the_target_connection(port_map):
    port, accepted, _ = await port_map(Peer)
    client = await _connect(port)
    client.transport.write(b"x")
    await until(lambda: accepted and accepted[0].data)
    client.transport.abortConnection()
    await accepted[0].lost.addTimeout(T, reactor)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_target(port_map):
    """Backpressure across the splice: the target's transport pauses it long before it
    has sent everything, and once the client reads again every byte arrives."""
    Source.total = 256 << 20
    port, accepted, _ = await port_map(Source)
    client = await _connect(port)
    client.transport.pauseProducing()
    await until(lambda: accepted and accepted[0].paused_at is not None)
    src = accepted[0]
    # bounded by socket buffers, the splice's 1 MiB and the tunnel's 16 MiB window
    assert src.paused_at < 48 << 20, src.paused_at
    await until(lambda: src.paused)
    held = src.count
    assert held < 64 << 20, held
    Source.total = held  # finish with what was sent so far
    client.transport.resumeProducing()
    await until(lambda: len(client.data) >= held)
    src.transport.unregisterProducer()
    src.transport.loseConnection()
    await until(lambda: client.eof)
    assert len(client.data) == held
    assert hashlib.sha256(client.data).digest() == src.sent.digest()


@pytest_twisted.ensureDeferred
async def test_sesame_forward_is_spliced_too(sesame_hub):
    target, accepted = await _listen(Answer)
    await sesame_hub.start_remote("edge-2", [f"127.0.0.1:{target.getHost().port}"])
    fwd = RelayFactory(endpoints.clientFromString(
        reactor, f"sesame:remote=edge-2:host=127.0.0.1:port={target.getHost().port}:"
        + sesame_hub.endpoint_kwargs(sesame_hub.client_token())))
    front = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(fwd)
    try:
        before = netconn.splice_count()
        client = await _connect(front.getHost().port)
        payload = os.urandom(2 << 20)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        await client.lost.addTimeout(T, reactor)
        assert bytes(client.data) == hashlib.sha256(payload).hexdigest().encode()
        assert netconn.splice_count() == before + 1
    finally:
        await front.stopListening()
        await target.stopListening()


def test_only_plain_tcp_and_a_fresh_netconn_transport_are_spliced(monkeypatch):
    assert not netconn.can_splice(StringTransport(), object())  # not a TCP socket
    monkeypatch.setenv("SESAME_SPLICE", "0")
    assert not netconn.can_splice(StringTransport(), object())


def test_a_socket_that_reset_unnoticed_ends_the_call_instead_of_raising():
    """The client resets while its reads are paused (asyncio has not seen it), then the
    target half-closes: ``write_eof`` fails on the dead socket.  The relay must cancel
    the call and drop the socket, never raise into the tunnel's reader (which would end
    every stream of that tunnel), and ignore bytes that still come after the EOF."""
    import asyncio
    import socket as s

    from sesame.bridge import Hop
    from sesame.bridge._loop import get_bridge
    from sesame.netconn._splice import SplicedSocket

    class Side:
        call = None
        hop = Hop.get()
        aborted = 0

        def abort(self):
            self.aborted += 1

        def half_close(self):
            pass

        def splice_hold(self, hold):
            pass

    async def scenario():
        server = s.create_server(("127.0.0.1", 0))
        client = s.create_connection(server.getsockname())
        ours, _ = server.accept()
        server.close()
        side = Side()
        _, conn = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: SplicedSocket(side, netconn.SpliceHooks()), ours)
        conn.transport.pause_reading()
        client.setsockopt(s.SOL_SOCKET, s.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # a reset the paused transport does not see
        await asyncio.sleep(0)  # let the RST land (no timing dependence: it is local)
        conn.call_event("eof", b"")  # must not raise
        conn.call_event("data", b"after the EOF")  # dropped, must not raise either
        conn.call_event("end", b"")
        return side.aborted, conn.transport.is_closing()

    aborted, closing = get_bridge().run(scenario(), 10)
    assert aborted >= 1 and closing
