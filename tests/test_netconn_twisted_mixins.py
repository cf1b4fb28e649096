"""
Twisted's own reusable connection tests, run against the NetConn transport.

The mixins of ``twisted.internet.test.connectionmixins`` (``ConnectionTestsMixin``,
``StreamClientTestsMixin``) and ``twisted.internet.test.test_tcp`` (``AbortConnectionMixin``,
``WriteSequenceTestsMixin``, ``TCPClientTestsBase.test_buildProtocolReturnsNone``) are mixed
into :class:`~twisted.internet.test.reactormixins.ReactorBuilder` test cases whose endpoint
creator's ``server()`` is a real TCP listener on 127.0.0.1 (the *target*) and whose
``client()`` is a :class:`~sesame.netconn.NetConnClientEndpoint` to a real grpcio NetConn
server (``direct``: a ``grpc.aio`` server; ``tunnel``: a NetConnServicer served through a
reverse tunnel).  So the "client" protocol of every mixin test runs on a NetConnTransport, the
"server" protocol on the target's TCP transport, and the bytes cross the gRPC stream.

ReactorBuilder builds a fresh reactor per test (and points ``twisted.internet.reactor`` at it
while the test runs); that works with the bridge because every NetConn object of a test is
given that reactor explicitly: the endpoint's ``reactor`` and the servicer's ``reactor=`` (one
grpc server per carrier serves whichever servicer the current test installed).  The tests are
trial ``SynchronousTestCase`` s and pass under pytest and under ``trial
tests.test_netconn_twisted_mixins``.

Mixin tests that cannot mean anything for a tunnelled transport are skipped with the reason
next to them (``_excluded``).  A few test_tcp tests are hard-wired to ``TCPCreator`` or to
file-descriptor internals (a writable ``bufferSize``, ``stopConsuming``); their *shape* is
ported in :class:`NetConnPortedTests`, in both orientations where the side matters.
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import threading
import time
import unittest
import weakref
from typing import Any

import grpc
import pytest
from twisted.internet import interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTCP
from twisted.internet.test.connectionmixins import (
    ConnectableProtocol,
    ConnectionTestsMixin,
    EndpointCreator,
    StreamClientTestsMixin,
    findFreePort,
    runProtocolsWithReactor,
)
from twisted.internet.test.reactormixins import ReactorBuilder
from twisted.internet.test.test_tcp import (
    AbortConnectionMixin,
    TCPClientTestsBase,
    WriteSequenceTestsMixin,
)
from twisted.test.test_tcp import MyClientFactory, MyServerFactory
from zope.interface import implementer

from sesame.bridge._loop import get_bridge
from sesame.netconn import (
    HIGH_WATER,
    NetConnAddress,
    NetConnClientEndpoint,
    NetConnServicer,
    NetConnTransport,
    aio_call_factory,
    tunnel_call_factory,
)
from sesame.tunnel._server import ServiceRegistry
from sesame.tunnel._service import ReverseTunnelServer, TunnelHost

WAIT = 10.0
CARRIERS = ("direct", "tunnel")


# --- carriers: one grpc server per kind for the whole module, the servicer per test ----------


class _CurrentServicer(grpc.GenericRpcHandler):
    """Serves NetConn with whichever servicer the running test installed (its own reactor)."""

    def __init__(self) -> None:
        self.servicer: NetConnServicer | None = None

    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        s = self.servicer
        return s.handler().service(details) if s is not None else None


class _Carrier:
    def __init__(self, name: str) -> None:
        self.name = name
        self.current = _CurrentServicer()
        self.closers: list[Any] = []
        bridge = get_bridge()
        if name == "direct":
            async def start() -> tuple[grpc.aio.Server, int]:
                s = grpc.aio.server()
                s.add_generic_rpc_handlers((self.current,))
                p = s.add_insecure_port("127.0.0.1:0")
                await s.start()
                return s, p

            server, port = bridge.run(start())
            self.calls: Any = aio_call_factory(f"127.0.0.1:{port}")
            self.closers.append(lambda: bridge.run(server.stop(None), WAIT))
        else:
            host = TunnelHost()
            hp = host.start("127.0.0.1:0")
            reg = ServiceRegistry()
            reg.add_generic_rpc_handlers((self.current,))
            rts = ReverseTunnelServer(f"127.0.0.1:{hp}", reg).start()
            assert host.wait_for_reverse(WAIT), "reverse tunnel never came up"
            self.calls = tunnel_call_factory(host.reverse_channel())
            self.closers += [lambda: host.stop(0.5), lambda: rts.stop(0.5)]

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:  # noqa: BLE001 - teardown
                pass
        self.closers.clear()


_carriers: dict[str, _Carrier] = {}
_carriers_lock = threading.Lock()


def _carrier(name: str) -> _Carrier:
    with _carriers_lock:
        c = _carriers.get(name)
        if c is None:
            c = _carriers[name] = _Carrier(name)
        return c


def _close_carriers() -> None:
    with _carriers_lock:
        for c in _carriers.values():
            c.close()
        _carriers.clear()


atexit.register(_close_carriers)  # under trial; pytest closes them at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _carriers_closed_after_module():
    yield
    _close_carriers()


def _wait_until(pred: Any, timeout: float = WAIT) -> bool:
    """Poll ``pred`` (the test reactor is stopped by now; the bridge loop is not)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# --- the endpoint creator and the builder ------------------------------------------------------


class NetConnCreator(EndpointCreator):
    """``server()``: a TCP target on 127.0.0.1; ``client()``: NetConn to it through the carrier."""

    interface = "127.0.0.1"

    def __init__(self, builder: NetConnBuilder) -> None:
        self.builder = builder

    def server(self, reactor: Any) -> TCP4ServerEndpoint:
        return TCP4ServerEndpoint(reactor, 0, interface=self.interface)

    def client(self, reactor: Any, serverAddress: Any) -> NetConnClientEndpoint:
        target = self.builder.netconn_target(reactor)
        return NetConnClientEndpoint(reactor, target, f"{self.interface}:{serverAddress.port}",
                                     timeout=WAIT)


class NetConnBuilder(ReactorBuilder):
    """ReactorBuilder whose connections are NetConn client → NetConn server → TCP target."""

    _reactors = ["twisted.internet.epollreactor.EPollReactor"]
    timeout = 20  # runReactor's bound (trial's default is 120 s)
    requiredInterfaces = (IReactorTCP,)
    carrier = "direct"
    interface = "127.0.0.1"
    family = socket.AF_INET
    _port = None
    _servicer: NetConnServicer | None = None

    @property
    def endpoints(self) -> NetConnCreator:  # type: ignore[override]
        return NetConnCreator(self)

    def netconn_target(self, reactor: Any) -> Any:
        """
        Install this test's servicer (it dials with the test's reactor) and return the
        carrier's call factory, wrapped to keep the test's calls: the cleanup checks that
        every one of them has ended (no call outlives its connection) before the reactor is
        torn down (a call ending later would post to a reactor that no longer exists).
        """
        c = _carrier(self.carrier)
        if self._servicer is None:
            svc = self._servicer = NetConnServicer(["127.0.0.1:*"], reactor=reactor)
            c.current.servicer = svc
            self._calls: list[Any] = []
            self.addCleanup(self._netconn_idle, svc, self._calls)

        def make(method: str, metadata: Any) -> Any:
            call = c.calls(method, metadata)
            self._calls.append(weakref.ref(call))  # weakly: test_protocolGarbage... checks refs
            return call

        make.target = c.calls.target  # type: ignore[attr-defined]
        return make

    def _netconn_idle(self, svc: NetConnServicer, calls: list[Any]) -> None:
        def done(ref: Any) -> bool:
            call = ref()
            return call is None or call.done  # a collected call posts nothing any more

        ok = _wait_until(lambda: svc.active == 0 and all(done(r) for r in calls))
        get_bridge().run(asyncio.sleep(0), WAIT)  # the calls' on_end callbacks have returned
        _carrier(self.carrier).current.servicer = None
        self.assertTrue(ok, f"after the test: {svc.active} relays active, "
                            f"{sum(not done(r) for r in calls)} of {len(calls)} calls open")

    # StreamClientTestsMixin's two hooks: listen on a TCP target, connect to it over NetConn
    def listen(self, reactor: Any, factory: Any) -> Any:
        self._port = reactor.listenTCP(0, factory, interface=self.interface)
        return self._port

    def connect(self, reactor: Any, factory: Any) -> Deferred:
        """NetConn's connect is the endpoint; a failed dial goes to ``clientConnectionFailed``
        as IReactorTCP.connectTCP would report it."""
        port = self._port.getHost().port if self._port is not None else findFreePort()[1]
        ep = self.endpoints.client(reactor, IPv4Address("TCP", self.interface, port))
        d = ep.connect(factory)
        d.addErrback(lambda f: factory.clientConnectionFailed(None, f))
        return d


def _excluded(reason: str) -> Any:
    """Exclude an inherited mixin test (listed with its reason in the test report)."""

    def test(self: Any) -> None:
        raise AssertionError("excluded test ran")  # pragma: no cover

    return unittest.skip(f"excluded for NetConn: {reason}")(test)


# --- the mixins as they are -------------------------------------------------------------------


class NetConnConnectionTestsBuilder(NetConnBuilder, ConnectionTestsMixin, StreamClientTestsMixin):
    """connectionmixins.ConnectionTestsMixin + StreamClientTestsMixin over NetConn."""

    test_interface = _excluded(
        "IConnector is the reactor.connectTCP API; NetConn connects through an endpoint only")


class NetConnAbortConnectionTestsBuilder(NetConnBuilder, AbortConnectionMixin):
    """test_tcp.AbortConnectionMixin over NetConn: abortConnection on the NetConn side
    (and on the target side, seen through NetConn)."""


class NetConnClientTestsBuilder(NetConnBuilder):
    """The endpoint-based test of test_tcp.TCPClientTestsBase."""

    test_buildProtocolReturnsNone = TCPClientTestsBase.test_buildProtocolReturnsNone


class NetConnWriteSequenceTestsBuilder(NetConnBuilder, WriteSequenceTestsMixin):
    """test_tcp.WriteSequenceTestsMixin; ``client`` is the NetConn side, ``server`` the target."""

    test_streamingProducer = _excluded(
        "sets the fd transport's writable bufferSize to 500; NetConn's water marks are fixed "
        "(1 MiB / 256 KiB): ported as NetConnPortedTests.test_writeSequencePausesStreamingProducer")
    test_nonStreamingProducer = _excluded(
        "ends with FileDescriptor.stopConsuming (not ITransport/IConsumer) and a 500-byte "
        "bufferSize: ported as NetConnPortedTests.test_writeSequenceNonStreamingProducer")

    def getConnectedClientAndServer(self, reactor: Any, interface: str, addressFamily: int) -> Deferred:
        """(NetConn client protocol, target protocol, listening port), both AccumulatingProtocols."""
        server = MyServerFactory()
        server.protocolConnectionMade = Deferred()
        server.protocolConnectionLost = Deferred()
        client = MyClientFactory()
        client.protocolConnectionMade = Deferred()
        client.protocolConnectionLost = Deferred()
        port = reactor.listenTCP(0, server, interface=interface)
        lost = gatherResults([client.protocolConnectionLost, server.protocolConnectionLost])

        def stop(result: Any) -> Any:
            reactor.stop()
            return result

        lost.addBoth(stop)
        started = gatherResults([client.protocolConnectionMade, server.protocolConnectionMade])
        d: Deferred = Deferred()

        def start(protocols: list) -> None:
            c, s = protocols
            assert isinstance(c.transport, NetConnTransport), c.transport
            d.callback((c, s, port))

        started.addCallback(start)
        self.endpoints.client(reactor, port.getHost()).connect(client).addErrback(d.errback)
        return d


# --- the shapes of test_tcp tests hard-wired to TCPCreator / fd internals -----------------------


class NetConnPortedTests(NetConnBuilder):
    """
    test_tcp tests that cannot be reused by reference (they name ``TCPCreator()`` or poke
    FileDescriptor internals), ported with the NetConn endpoint creator.  ``_swapped`` runs
    a test with the roles of NetConn side and target side exchanged.
    """

    def _pair(self, server: ConnectableProtocol, client: ConnectableProtocol) -> Any:
        # writeToPeerAfterAbort (a macOS RST work-around: write b"GOODBYE" to the survivor)
        # would turn the clean closes these tests check into resets
        return runProtocolsWithReactor(self, server, client, self.endpoints,
                                       writeToPeerAfterAbort=False)

    # TCPConnectionTestsBuilder.test_connectionLostAfterPausedTransport, both ways round
    def _pausedTransport(self, netconn_pauses: bool) -> None:
        class Pauser(ConnectableProtocol):
            def __init__(self) -> None:
                self.events: list[str] = []

            def dataReceived(self, data: bytes) -> None:
                self.events.append("paused")
                self.transport.pauseProducing()
                self.reactor.callLater(0, self.resume)

            def resume(self) -> None:
                self.events.append("resumed")
                self.transport.resumeProducing()

            def connectionLost(self, reason: Any) -> None:
                self.events.append("lost")
                ConnectableProtocol.connectionLost(self, reason)

        class Writer(ConnectableProtocol):
            def connectionMade(self) -> None:
                self.transport.write(b"some bytes for you")
                self.transport.loseConnection()

        pauser = Pauser()
        if netconn_pauses:
            self._pair(Writer(), pauser)
            self.assertIsInstance(pauser.transport, NetConnTransport)
        else:
            self._pair(pauser, Writer())
        self.assertEqual(pauser.events, ["paused", "resumed", "lost"])

    def test_connectionLostAfterPausedTransport(self) -> None:
        """The target writes and closes; the NetConn side pauses in dataReceived, resumes on the
        next tick, and only then sees connectionLost."""
        self._pausedTransport(netconn_pauses=True)

    def test_connectionLostAfterPausedTransport_swapped(self) -> None:
        """The NetConn side writes and closes; the paused target still sees it all, then lost."""
        self._pausedTransport(netconn_pauses=False)

    # TCPConnectionTestsBuilder.test_doubleHalfClose, both ways round
    def _doubleHalfClose(self, netconn_listens: bool) -> None:
        @implementer(IHalfCloseableProtocol)
        class Listener(ConnectableProtocol):
            events: list[str]

            def connectionMade(self) -> None:
                self.events = []

            def readConnectionLost(self) -> None:
                self.events.append("readConnectionLost")
                self.transport.loseWriteConnection()

            def writeConnectionLost(self) -> None:
                self.events.append("writeConnectionLost")
                self.transport.loseConnection()

        class Closer(ConnectableProtocol):
            def connectionMade(self) -> None:
                self.transport.loseConnection()

        listener = Listener()
        if netconn_listens:
            self._pair(Closer(), listener)
        else:
            self._pair(listener, Closer())
        self.assertEqual(listener.events, ["readConnectionLost", "writeConnectionLost"])
        self.assertIsInstance(listener.disconnectReason.value, ConnectionDone)

    def test_doubleHalfClose(self) -> None:
        """The target closes; the half-closeable NetConn protocol gets readConnectionLost, answers
        with loseWriteConnection, gets writeConnectionLost, and loseConnection ends it cleanly."""
        self._doubleHalfClose(netconn_listens=True)

    def test_doubleHalfClose_swapped(self) -> None:
        """The NetConn side closes; the half-closeable target does the same dance."""
        self._doubleHalfClose(netconn_listens=False)

    # WriteSequenceTestsMixin.test_streamingProducer with NetConn's own high-water mark
    def test_writeSequencePausesStreamingProducer(self) -> None:
        """writeSequence of more than the high-water mark pauses a streaming producer at once;
        once the bytes have moved on it is resumed; the target gets every byte."""
        test = self

        @implementer(IPushProducer)
        class SaveActionProducer:
            def __init__(self) -> None:
                self.actions: list[str] = []

            def pauseProducing(self) -> None:
                self.actions.append("pause")

            def resumeProducing(self) -> None:
                self.actions.append("resume")
                client.transport.unregisterProducer()
                client.transport.loseConnection()

            def stopProducing(self) -> None:
                self.actions.append("stop")

        producer = SaveActionProducer()
        total = HIGH_WATER + 64 * 1024
        received = bytearray()

        @implementer(IHalfCloseableProtocol)
        class Sink(ConnectableProtocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

            def readConnectionLost(self) -> None:
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

        class Client(ConnectableProtocol):
            def connectionMade(self) -> None:
                self.transport.registerProducer(producer, True)
                test.assertEqual(producer.actions, [])
                self.transport.writeSequence([b"x" * 1024] * (total // 1024))
                test.assertEqual(producer.actions, ["pause"])

        client = Client()
        self._pair(Sink(), client)
        self.assertEqual(producer.actions, ["pause", "resume"])
        self.assertEqual(len(received), total)
        self.assertEqual(bytes(received), b"x" * total)
        self.assertIsInstance(client.disconnectReason.value, ConnectionDone)

    # WriteSequenceTestsMixin.test_nonStreamingProducer without stopConsuming
    def test_writeSequenceNonStreamingProducer(self) -> None:
        """A pull producer is resumed at registration, and again once what it wrote has been
        taken; it is never paused.  (stopConsuming = unregisterProducer + loseConnection.)"""
        test = self

        class SaveActionProducer:
            def __init__(self) -> None:
                self.actions: list[str] = []

            def resumeProducing(self) -> None:
                self.actions.append("resume")
                if self.actions.count("resume") == 2:
                    client.transport.unregisterProducer()
                    client.transport.loseConnection()
                else:
                    client.transport.writeSequence([b"x" * 50] * 20)

            def pauseProducing(self) -> None:  # pragma: no cover - must not be called
                self.actions.append("pause")

            def stopProducing(self) -> None:
                self.actions.append("stop")

        producer = SaveActionProducer()
        received = bytearray()

        class Sink(ConnectableProtocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

        class Client(ConnectableProtocol):
            def connectionMade(self) -> None:
                self.transport.registerProducer(producer, False)
                test.assertEqual(producer.actions, ["resume"])

        client = Client()
        self._pair(Sink(), client)
        self.assertEqual(producer.actions, ["resume", "resume"])
        self.assertEqual(bytes(received), b"x" * 1000)

    # TCPClientTestsBase.test_addresses, for NetConnAddress
    def test_addresses(self) -> None:
        """getHost/getPeer (read in makeConnection, as test_addresses does) are NetConnAddresses:
        getPeer the target's listening address, getHost the remote's end of the target
        connection, which is exactly what the target sees as its peer."""
        seen: dict[str, Any] = {}

        class CheckAddress(ConnectableProtocol):
            def makeConnection(self, transport: Any) -> None:
                seen["host"], seen["peer"] = transport.getHost(), transport.getPeer()
                ConnectableProtocol.makeConnection(self, transport)
                transport.loseConnection()

        class Target(ConnectableProtocol):
            def connectionMade(self) -> None:
                seen["target_host"] = self.transport.getHost()
                seen["target_peer"] = self.transport.getPeer()

        self._pair(Target(), CheckAddress())
        host, peer = seen["host"], seen["peer"]
        self.assertIsInstance(host, NetConnAddress)
        self.assertIsInstance(peer, NetConnAddress)
        self.assertTrue(interfaces.IAddress.providedBy(peer))
        th, tp = seen["target_host"], seen["target_peer"]
        self.assertEqual((peer.network, peer.host, peer.port), ("tcp", th.host, th.port))
        self.assertEqual((host.network, host.host, host.port), ("tcp", tp.host, tp.port))
        self.assertEqual(host.via, peer.via)

    # connectionmixins: write after loseConnection on the NetConn side still arrives before EOF
    def test_writeThenLoseConnectionOrdering(self) -> None:
        """connectionMade → data → (target) readConnectionLost → connectionLost: everything
        written before loseConnection arrives, in order, before the target sees the EOF; the
        NetConn side sees connectionMade before any data and ConnectionDone last."""
        events: list[Any] = []

        @implementer(IHalfCloseableProtocol)
        class Target(ConnectableProtocol):
            def connectionMade(self) -> None:
                events.append("target made")
                self.buf = b""

            def dataReceived(self, data: bytes) -> None:
                self.buf += data

            def readConnectionLost(self) -> None:
                events.append(("target eof", self.buf))
                self.transport.write(b"bye")
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:  # pragma: no cover
                events.append("target writeConnectionLost")

        class Client(ConnectableProtocol):
            def connectionMade(self) -> None:
                events.append("client made")
                self.transport.write(b"one ")
                self.transport.writeSequence([b"two ", b"three"])
                self.transport.loseConnection()
                self.transport.write(b" never")  # after loseConnection: dropped

            def dataReceived(self, data: bytes) -> None:
                events.append(("client data", data))

            def connectionLost(self, reason: Any) -> None:
                events.append(("client lost", reason.type))
                ConnectableProtocol.connectionLost(self, reason)

        self._pair(Target(), Client())
        self.assertIn(("target eof", b"one two three"), events)
        self.assertLess(events.index("client made"), events.index(("client data", b"bye")))
        self.assertEqual(events[-1], ("client lost", ConnectionDone))

    def test_abortWithPendingData(self) -> None:
        """abortConnection with 64 MiB queued: the NetConn side sees ConnectionAborted on the next
        turn (not re-entrantly, not after the queue drained), the target sees the connection
        lost, and fewer than the queued bytes ever reach it."""
        total = 64 * HIGH_WATER
        got = [0]

        class Target(ConnectableProtocol):
            def dataReceived(self, data: bytes) -> None:
                got[0] += len(data)

        class Client(ConnectableProtocol):
            def connectionMade(self) -> None:
                self.transport.write(b"z" * total)
                self.transport.abortConnection()
                self.lost_reentrantly = self.disconnectReason is not None
                self.reactor.callLater(0, self.next_turn)

            def next_turn(self) -> None:
                self.lost_next_turn = self.disconnectReason is not None

        client, target = Client(), Target()
        self._pair(target, client)
        self.assertFalse(client.lost_reentrantly)
        self.assertTrue(client.lost_next_turn)
        self.assertIsInstance(client.disconnectReason.value, ConnectionAborted)
        self.assertIsInstance(target.disconnectReason.value, (ConnectionLost, ConnectionDone))
        self.assertLess(got[0], total)


# --- both carriers ------------------------------------------------------------------------------

_BUILDERS = (NetConnConnectionTestsBuilder, NetConnAbortConnectionTestsBuilder,
             NetConnClientTestsBuilder, NetConnWriteSequenceTestsBuilder, NetConnPortedTests)

for _builder in _BUILDERS:
    for _name in CARRIERS:
        _cls = type(f"{_builder.__name__}_{_name}", (_builder,), {"carrier": _name})
        for _tc_name, _tc in _cls.makeTestCaseClasses().items():
            globals()[_tc_name] = _tc
del _builder, _name, _cls, _tc_name, _tc
