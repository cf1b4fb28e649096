"""
Unit tests of the NetConn client transport, without sockets, threads or a running reactor.

The seams: a :data:`~sesame.netconn._client.CallFactory` returning :class:`FakeCall` (a
:class:`~sesame.bridge.LoopCall` whose remote end the test plays), and :class:`SyncHop` in
place of :class:`~sesame.bridge.Hop`: it queues what the transport and its loop side hand
each other and runs it when the test says so (``run_loop``, ``run_reactor``, ``flush``), so
the order of events can be asserted.  Timers run on a :class:`~twisted.internet.task.Clock`.
The transport's side is checked the way Twisted checks ``StringTransport``: what reached the
protocol, the producer and the call, and in what order.  ``tests/test_netconn.py`` runs the
same behaviour end to end over real sockets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sesame.bridge import LoopCall
from sesame.core import CANCELLED, INVALID_ARGUMENT, OK, PERMISSION_DENIED, UNAVAILABLE, Status
from sesame.netconn import (
    HIGH_WATER,
    MAX_MESSAGE,
    METHOD,
    NetConnAddress,
    NetConnError,
    NetConnTransport,
)
from sesame.netconn._client import _connect
from sesame.netconn._transport import CLOSE_GRACE
from sesame.netconn._wire import decode_bytes, encode_bytes
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb

KiB = 1024
VIA = "fake-remote:7444"
ADDRESS = "10.0.0.9:80"


# --- the seams ------------------------------------------------------------------------------


class SyncHop:
    """
    A :class:`~sesame.bridge.Hop` that runs nothing by itself.

    ``to_loop`` posts to a model of the bridge loop: an inbox drained as one ready callback
    (as :class:`sesame.bridge.Inbox` does), and ``call_soon`` callbacks queued behind it.
    ``to_reactor`` posts to a reactor inbox.  :meth:`run_loop` / :meth:`run_reactor` run one
    side until it is idle; :meth:`flush` alternates until both are.  ``trace`` lists what
    ran, in order.
    """

    def __init__(self) -> None:
        self.reactor = Clock()
        self.bridge = None
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._inbox_pending = False
        self._to_reactor: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.trace: list[str] = []

    def to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        self._inbox.append((fn, args))
        if not self._inbox_pending:
            self._inbox_pending = True
            self._ready.append((self._drain_inbox, ()))

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """The bridge loop's ``call_soon``: runs after the ready callbacks before it."""
        self._ready.append((fn, args))

    def to_reactor(self, fn: Callable[..., Any], *args: Any) -> None:
        self._to_reactor.append((fn, args))

    def _drain_inbox(self) -> None:
        self._inbox_pending = False
        items, self._inbox = self._inbox, deque()
        for fn, args in items:
            self._run("loop", fn, args)

    def _run(self, side: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if fn is not self._drain_inbox:
            name = getattr(fn, "__name__", repr(fn))
            if name == "callWithLogger":  # the hop posts callWithLogger(transport, method, ...)
                name = args[1].__name__
            self.trace.append(f"{side}:{name}")
        fn(*args)

    def run_loop(self) -> int:
        ran = 0
        while self._ready:
            fn, args = self._ready.popleft()
            self._run("loop", fn, args)
            ran += 1
        return ran

    def run_reactor(self) -> int:
        ran = 0
        while self._to_reactor:
            fn, args = self._to_reactor.popleft()
            self._run("reactor", fn, args)
            ran += 1
        return ran

    def flush(self) -> None:
        while self.run_loop() + self.run_reactor():
            pass

    @property
    def idle(self) -> bool:
        return not (self._ready or self._inbox or self._to_reactor)


class FakeCall(LoopCall):
    """
    A loop call whose far end is the test: it records what the client sends and lets the
    test answer as a NetConn server would (:meth:`answer_conn`, :meth:`answer_bytes`,
    :meth:`answer_eof`, :meth:`end`).
    """

    def __init__(self, method: str, metadata: tuple) -> None:
        super().__init__()
        self.method = method
        self.metadata = metadata
        self.events: list[tuple[Any, ...]] = []  # ("message", raw) / ("half_close",) / ("cancel", status)
        self.reading: list[str] = []  # "pause" / "resume", as asked
        self.backlog = 0  # what buffered() reports
        self.busy = False  # the call's writer is writing (after_write holds callbacks)
        self.after: list[Callable[[], None]] = []

    # LoopCall
    def send(self, data: bytes) -> None:
        if self.status is None:
            self.events.append(("message", data))

    def buffered(self) -> int:
        return self.backlog

    def after_write(self, cb: Callable[[], None]) -> bool:
        if not self.busy:
            return False
        self.after.append(cb)
        return True

    def written(self) -> None:
        """The writer is done: idle, and whoever waited is called."""
        self.busy = False
        cbs, self.after = self.after, []
        for cb in cbs:
            cb()

    def half_close(self) -> None:
        self.events.append(("half_close",))

    def cancel(self, status: Status | None = None) -> None:
        if self.status is None:
            status = status or Status(CANCELLED, "cancelled")
            self.events.append(("cancel", status))
            self._finish(status)

    def pause_reading(self) -> None:
        super().pause_reading()
        self.reading.append("pause")

    def resume_reading(self) -> None:
        super().resume_reading()
        self.reading.append("resume")

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    # the server's side
    def answer_conn(self, local: str = "10.0.0.2:40000", remote: str = ADDRESS) -> None:
        self.on_message(rc_pb.NetConnResponse(conn=rc_pb.NetConnResponse.Conn(
            local=netaddr_pb2.NetAddr(network="tcp", address=local),
            remote=netaddr_pb2.NetAddr(network="tcp", address=remote),
        )).SerializeToString())

    def answer_bytes(self, data: bytes) -> None:
        self.on_message(encode_bytes(data))

    def answer_eof(self) -> None:
        self.on_message(rc_pb.NetConnResponse().SerializeToString())

    def end(self, status: Status = Status(OK)) -> None:
        self._finish(status)

    # what was sent
    @property
    def dial(self) -> rc_pb.NetConnRequest.Dial:
        kind, raw = self.events[0]
        assert kind == "message"
        req = rc_pb.NetConnRequest.FromString(raw)
        assert req.WhichOneof("data") == "dial"
        return req.dial

    def chunks(self) -> list[bytes]:
        """The ``bytes`` messages after the dial."""
        return [decode_bytes(e[1], rc_pb.NetConnRequest) for e in self.events[1:] if e[0] == "message"]

    def payload(self) -> bytes:
        return b"".join(self.chunks())

    def kinds(self) -> list[str]:
        """The events after the dial, by kind."""
        return [e[0] for e in self.events[1:]]


class Recorder(Protocol):
    """Records what the transport did to it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connectionMade(self) -> None:
        self.events.append(("made",))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.append(("lost", reason))

    def received(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    def losses(self) -> list[Failure]:
        return [e[1] for e in self.events if e[0] == "lost"]

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


@implementer(interfaces.IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append(("readConnectionLost",))

    def writeConnectionLost(self) -> None:
        self.events.append(("writeConnectionLost",))


@implementer(interfaces.IPushProducer)
class PushProducer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@implementer(interfaces.IPullProducer)
class PullProducer:
    """Writes one chunk per resumeProducing; unregisters when it has no more."""

    def __init__(self, transport: NetConnTransport, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = deque(chunks)
        self.resumed = 0
        self.stopped = 0

    def resumeProducing(self) -> None:
        self.resumed += 1
        if self.chunks:
            self.transport.write(self.chunks.popleft())
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.stopped += 1


# --- the harness -------------------------------------------------------------------------


class NetConnUnitCase(SynchronousTestCase):
    """A client connection over a :class:`FakeCall`, with a :class:`SyncHop`."""

    protocol_class: type[Recorder] = Recorder

    def setUp(self) -> None:
        self.hop = SyncHop()
        self.clock = self.hop.reactor
        self.calls: list[FakeCall] = []

    def tearDown(self) -> None:
        # like trial's dirty-reactor check: nothing left queued or scheduled
        self.hop.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.hop.idle)

    def make_call(self, method: str, metadata: tuple) -> FakeCall:
        call = FakeCall(method, metadata)
        self.calls.append(call)
        return call

    def dial(self, *, timeout: float | None = None, metadata: tuple = (),
             factory: Factory | None = None):
        factory = factory or Factory.forProtocol(self.protocol_class)
        return _connect(self.hop, self.make_call, VIA, ADDRESS, factory, "tcp", timeout,
                        metadata, call_soon=self.hop.call_soon)

    def connect(self, **kw: Any) -> tuple[Recorder, NetConnTransport, FakeCall]:
        d = self.dial(**kw)
        self.hop.flush()
        (call,) = self.calls
        call.answer_conn()
        self.hop.flush()
        protocol = self.successResultOf(d)
        return protocol, protocol.transport, call

    def settle(self) -> None:
        """Run the hop and every timer due now until nothing is left to run."""
        while True:
            self.hop.flush()
            now = self.clock.seconds()
            if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)

    def end(self, call: FakeCall, status: Status = Status(OK)) -> None:
        call.end(status)
        self.settle()

    def assertLostOnce(self, protocol: Recorder, kind: type[Exception]) -> None:
        losses = protocol.losses()
        self.assertEqual(len(losses), 1, protocol.events)
        losses[0].trap(kind)


# --- connecting -------------------------------------------------------------------------------


class ConnectTests(NetConnUnitCase):
    def test_dial_is_the_first_message(self) -> None:
        d = self.dial(timeout=2.5, metadata=(("x-k", "v"),))
        self.assertEqual(self.calls, [])  # the call starts on the loop
        self.hop.flush()
        (call,) = self.calls
        self.assertEqual((call.method, call.metadata), (METHOD, (("x-k", "v"),)))
        self.assertEqual((call.dial.address.network, call.dial.address.address), ("tcp", ADDRESS))
        self.assertEqual((call.dial.timeout.seconds, call.dial.timeout.nanos), (2, 500_000_000))
        self.assertNoResult(d)
        call.answer_conn()
        self.hop.flush()
        protocol = self.successResultOf(d)
        self.assertEqual(protocol.kinds(), ["made"])
        self.assertIsInstance(protocol.transport, NetConnTransport)
        self.assertTrue(protocol.transport.connected)
        self.end(call)

    def test_transport_provides_its_interfaces(self) -> None:
        _, transport, call = self.connect()
        for iface in (interfaces.ITCPTransport, interfaces.IConsumer, interfaces.IPushProducer,
                      interfaces.IHalfCloseableDescriptor):
            self.assertTrue(verifyObject(iface, transport))
        self.end(call)

    def test_getHost_and_getPeer(self) -> None:
        d = self.dial()
        self.hop.flush()
        (call,) = self.calls
        call.answer_conn(local="192.0.2.1:5555", remote="[2001:db8::7]:8080")
        self.hop.flush()
        transport = self.successResultOf(d).transport
        self.assertEqual(transport.getHost(), NetConnAddress(VIA, "tcp", "192.0.2.1", 5555))
        self.assertEqual(transport.getPeer(), NetConnAddress(VIA, "tcp", "2001:db8::7", 8080))
        self.assertTrue(verifyObject(interfaces.IAddress, transport.getPeer()))
        self.end(call)

    def test_dial_refused(self) -> None:
        d = self.dial()
        self.hop.flush()
        self.calls[0].end(Status(PERMISSION_DENIED, f"{ADDRESS} is not allowed"))
        self.hop.flush()
        err = self.failureResultOf(d, NetConnError).value
        self.assertEqual(err.code.name, "PERMISSION_DENIED")
        self.assertEqual(err.details, f"{ADDRESS} is not allowed")

    def test_cancel_abandons_the_dial(self) -> None:
        d = self.dial()
        self.hop.flush()
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.hop.flush()
        (call,) = self.calls
        self.assertEqual(call.kinds(), ["cancel"])

    def test_logPrefix_and_tcp_options(self) -> None:
        _, transport, call = self.connect()
        self.assertEqual(transport.logPrefix(), "Recorder,netconn")
        self.assertTrue(transport.getTcpNoDelay())
        transport.setTcpNoDelay(False)
        self.assertFalse(transport.getTcpNoDelay())
        self.assertFalse(transport.getTcpKeepAlive())
        transport.setTcpKeepAlive(True)
        self.assertTrue(transport.getTcpKeepAlive())
        self.end(call)


class StartFailureTests(NetConnUnitCase):
    """Whatever goes wrong while starting the call (on the loop, through the hand-off), the
    connect Deferred fails with a status instead of never firing."""

    def test_call_factory_raising_fails_the_dial(self) -> None:
        def boom(method: str, metadata: tuple) -> FakeCall:
            raise RuntimeError("injected call factory failure")

        d = _connect(self.hop, boom, VIA, ADDRESS, Factory.forProtocol(Recorder), "tcp", None,
                     (), call_soon=self.hop.call_soon)
        self.hop.flush()
        err = self.failureResultOf(d, NetConnError).value
        self.assertEqual(err.code.name, "INTERNAL")
        self.assertIn("injected call factory failure", err.details)

    def test_unrepresentable_timeouts_fail_the_dial(self) -> None:
        for timeout in (float("nan"), float("inf"), -1.0, 1e300):
            d = self.dial(timeout=timeout)
            self.hop.flush()
            err = self.failureResultOf(d, NetConnError).value
            self.assertEqual(err.code.name, "INVALID_ARGUMENT", timeout)
            self.assertIn("timeout", err.details)
        self.assertEqual(self.calls, [])  # no call was started


class GarbageFromTheServerTests(NetConnUnitCase):
    """A response that does not parse ends the call (INVALID_ARGUMENT, naming it) instead of
    raising out of the call's message callback."""

    def test_unparsable_first_response_fails_the_dial(self) -> None:
        d = self.dial()
        self.hop.flush()
        (call,) = self.calls
        call.on_message(b"\xff\xff")
        self.hop.flush()
        err = self.failureResultOf(d, NetConnError).value
        self.assertEqual(err.code.name, "INVALID_ARGUMENT")
        self.assertIn("NetConnResponse", err.details)
        self.assertEqual(call.kinds(), ["cancel"])

    def test_unparsable_response_after_conn_ends_the_connection(self) -> None:
        protocol, _, call = self.connect()
        call.answer_bytes(b"fine")
        call.on_message(b"\xff\xff")
        call.answer_bytes(b"never delivered")
        self.settle()
        self.assertEqual(protocol.received(), b"fine")
        self.assertLostOnce(protocol, ConnectionLost)
        (status,) = [e[1] for e in call.events if e[0] == "cancel"]
        self.assertEqual(status.code, INVALID_ARGUMENT)
        self.assertIn("NetConnResponse", status.message)


# --- writing ----------------------------------------------------------------------------------


class WriteTests(NetConnUnitCase):
    def test_writes_of_one_batch_make_one_message(self) -> None:
        _, transport, call = self.connect()
        transport.write(b"hello, ")
        transport.write(b"")
        transport.write(b"world")
        self.assertEqual(call.kinds(), [])  # nothing moves before the hop runs
        self.settle()
        self.assertEqual(call.chunks(), [b"hello, world"])
        self.end(call)

    def test_messages_are_cut_at_MAX_MESSAGE(self) -> None:
        _, transport, call = self.connect()
        data = bytes(range(256)) * ((MAX_MESSAGE + 1000) // 256)
        transport.write(data)
        self.settle()
        self.assertEqual([len(c) for c in call.chunks()], [MAX_MESSAGE, len(data) - MAX_MESSAGE])
        self.assertEqual(call.payload(), data)
        self.end(call)

    def test_writes_while_the_call_is_busy_make_one_message_after_it(self) -> None:
        _, transport, call = self.connect()
        call.busy = True
        transport.write(b"one ")
        self.settle()
        transport.write(b"two ")
        self.settle()
        transport.write(b"three")
        self.settle()
        self.assertEqual(call.chunks(), [])  # all waiting for the writer
        call.written()
        self.assertEqual(call.chunks(), [b"one two three"])
        transport.write(b"idle")  # an idle writer: at once
        self.settle()
        self.assertEqual(call.chunks(), [b"one two three", b"idle"])
        self.end(call)

    def test_half_close_while_busy_sends_the_waiting_bytes_first(self) -> None:
        _, transport, call = self.connect()
        call.busy = True
        transport.write(b"request")
        self.settle()
        transport.loseWriteConnection()
        self.settle()
        self.assertEqual(call.kinds(), ["message", "half_close"])
        self.assertEqual(call.payload(), b"request")
        call.written()  # nothing left for the callback
        self.assertEqual(call.kinds(), ["message", "half_close"])
        self.end(call)

    def test_writeSequence(self) -> None:
        _, transport, call = self.connect()
        transport.writeSequence([b"a", b"bc", b"", b"d"])
        transport.writeSequence([])
        transport.writeSequence([b""])
        self.settle()
        self.assertEqual(call.chunks(), [b"abcd"])
        transport.writeSequence(iter([b"e", b"f"]))
        self.settle()
        self.assertEqual(call.payload(), b"abcdef")
        self.end(call)


# --- producers writing into the transport -------------------------------------------------------


class ProducerTests(NetConnUnitCase):
    def test_handoff_high_water_pauses_once_low_water_resumes_once(self) -> None:
        """Bytes written but not yet framed on the loop (a starved loop) hold the producer;
        framing them is the acknowledgement, and it hops back only to resume."""
        _, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        a, b = b"a" * (700 * KiB), b"b" * (700 * KiB)
        transport.write(a)
        self.hop.run_loop()  # a is framed: nothing handed any more, no hop back
        self.assertEqual(producer.events, [])
        self.assertNotIn("reactor:_flushed", self.hop.trace)
        transport.write(a)
        transport.write(b)  # 1400 KiB handed, none framed yet: over HIGH_WATER
        self.assertEqual(producer.events, ["pause"])
        transport.write(b"c")
        self.assertEqual(producer.events, ["pause"])
        self.hop.run_reactor()  # nothing framed yet: still held
        self.assertEqual(producer.events, ["pause"])
        self.hop.run_loop()  # all framed (below LOW_WATER): one hop back to resume
        self.assertEqual(producer.events, ["pause"])
        self.hop.run_reactor()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.settle()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(call.payload(), a + a + b + b"c")
        transport.unregisterProducer()
        self.end(call)

    def test_producer_registered_while_handoff_over_high_water_is_paused(self) -> None:
        _, transport, call = self.connect()
        transport.write(b"h" * (HIGH_WATER + 1))  # not framed yet
        producer = PushProducer()
        transport.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])
        self.settle()  # framed: the hold goes (one resume, after the one pause)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(call.payload(), b"h" * (HIGH_WATER + 1))
        transport.unregisterProducer()
        self.end(call)

    def test_call_buffer_high_water_pauses_once_writable_resumes_once(self) -> None:
        """The call's own send buffer (gRPC / tunnel flow control) holds the producer."""
        _, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        call.backlog = HIGH_WATER + 1
        transport.write(b"x")
        self.settle()
        self.assertEqual(producer.events, ["pause"])
        transport.write(b"y")  # still accepted: write never drops
        self.settle()
        self.assertEqual(producer.events, ["pause"])
        call.backlog = 0
        call.on_writable()
        self.settle()
        self.assertEqual(producer.events, ["pause", "resume"])
        call.on_writable()  # not held: nothing to resume
        self.settle()
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(call.payload(), b"xy")
        transport.unregisterProducer()
        self.end(call)

    def test_both_holds_make_one_pause_and_one_resume(self) -> None:
        _, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        call.backlog = 2 * HIGH_WATER
        transport.write(b"z" * (HIGH_WATER + 1))  # hand-off over the mark
        self.assertEqual(producer.events, ["pause"])
        self.settle()  # the call's buffer over the mark, then the hand-off drains
        self.assertEqual(producer.events, ["pause"])
        self.assertEqual(self.hop.trace[-2:], ["reactor:_pause_writers", "reactor:_flushed"])
        call.backlog = 0
        call.on_writable()
        self.settle()
        self.assertEqual(producer.events, ["pause", "resume"])
        transport.unregisterProducer()
        self.end(call)

    def test_producer_registered_while_held_is_paused_at_once(self) -> None:
        _, transport, call = self.connect()
        call.backlog = HIGH_WATER + 1
        transport.write(b"x")
        self.settle()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])
        call.backlog = 0
        call.on_writable()
        self.settle()
        self.assertEqual(producer.events, ["pause", "resume"])
        transport.unregisterProducer()
        self.end(call)

    def test_pull_producer_gets_resumeProducing(self) -> None:
        _, transport, call = self.connect()
        producer = PullProducer(transport, [b"one,", b"two,", b"three"])
        transport.registerProducer(producer, False)
        self.assertEqual(producer.resumed, 1)  # at once, as on a TCP transport
        self.settle()  # asked again each time what it wrote has moved on
        self.assertEqual(call.payload(), b"one,two,three")
        self.assertEqual(producer.resumed, 4)  # the 4th found nothing and unregistered
        self.assertIsNone(transport._producer)
        self.end(call)

    def test_pull_producer_is_not_asked_while_held(self) -> None:
        _, transport, call = self.connect()
        call.backlog = HIGH_WATER + 1
        producer = PullProducer(transport, [b"a", b"b"])
        transport.registerProducer(producer, False)
        self.settle()
        self.assertEqual((producer.resumed, call.payload()), (1, b"a"))
        call.backlog = 0
        call.on_writable()
        self.settle()
        self.assertEqual(call.payload(), b"ab")
        self.assertEqual(producer.resumed, 3)
        self.end(call)

    def test_second_producer_raises(self) -> None:
        _, transport, call = self.connect()
        first, second = PushProducer(), PushProducer()
        transport.registerProducer(first, True)
        self.assertRaises(RuntimeError, transport.registerProducer, second, True)
        self.assertRaises(RuntimeError, transport.registerProducer, second, False)
        self.assertIs(transport._producer, first)
        transport.unregisterProducer()
        transport.registerProducer(second, True)  # fine once the first is gone
        self.assertIs(transport._producer, second)
        transport.unregisterProducer()
        self.end(call)
        self.assertEqual((first.events, second.events), ([], []))

    def test_unregistered_producer_is_left_alone(self) -> None:
        _, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        transport.unregisterProducer()
        transport.unregisterProducer()  # a second time: nothing to do
        transport.write(b"x" * (HIGH_WATER + 1))
        self.settle()
        self.end(call)
        self.assertEqual(producer.events, [])

    def test_connectionLost_stops_the_producer(self) -> None:
        protocol, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        self.end(call)
        self.assertEqual(producer.events, ["stop"])
        self.assertLostOnce(protocol, ConnectionDone)
        self.assertIsNone(transport.protocol)


# --- closing ----------------------------------------------------------------------------------


class HalfCloseTests(NetConnUnitCase):
    protocol_class = HalfRecorder

    def test_loseWriteConnection_then_peer_eof(self) -> None:
        protocol, transport, call = self.connect()
        transport.write(b"request")
        transport.loseWriteConnection()
        self.assertEqual(protocol.kinds(), ["made", "writeConnectionLost"])  # before it returns
        transport.write(b"too late")
        transport.loseWriteConnection()  # a second time: nothing
        self.settle()
        self.assertEqual(call.kinds(), ["message", "half_close"])
        self.assertEqual(call.payload(), b"request")
        call.answer_bytes(b"answer")
        call.answer_eof()
        self.settle()
        self.assertEqual(protocol.kinds(), ["made", "writeConnectionLost", "data", "readConnectionLost"])
        self.assertEqual(protocol.received(), b"answer")
        self.assertEqual(protocol.losses(), [])
        self.assertTrue(transport.connected)
        self.end(call)
        self.assertLostOnce(protocol, ConnectionDone)
        self.assertEqual(protocol.kinds()[-1], "lost")

    def test_peer_eof_then_loseWriteConnection(self) -> None:
        protocol, transport, call = self.connect()
        call.answer_bytes(b"banner")
        call.answer_eof()
        self.settle()
        self.assertEqual(protocol.kinds(), ["made", "data", "readConnectionLost"])
        self.assertEqual(call.kinds(), [])  # the write side stays open
        transport.write(b"still talking")
        self.settle()
        self.assertEqual(call.payload(), b"still talking")
        transport.write(b", done")
        transport.loseWriteConnection()
        self.settle()
        self.assertEqual(protocol.kinds()[-1], "writeConnectionLost")
        self.assertEqual(call.kinds(), ["message", "message", "half_close"])
        self.assertEqual(call.payload(), b"still talking, done")
        self.assertEqual(protocol.losses(), [])
        self.end(call)
        self.assertLostOnce(protocol, ConnectionDone)

    def test_peer_eof_waits_behind_queued_bytes(self) -> None:
        protocol, transport, call = self.connect()
        transport.pauseProducing()
        call.answer_bytes(b"last words")
        call.answer_eof()
        self.settle()
        self.assertEqual(protocol.kinds(), ["made"])
        transport.resumeProducing()
        self.assertEqual(protocol.kinds(), ["made", "data", "readConnectionLost"])
        self.end(call)

    def test_descriptor_notifications(self) -> None:
        """The IHalfCloseableDescriptor side: the same as peer EOF / loseWriteConnection."""
        protocol, transport, call = self.connect()
        transport.readConnectionLost(Failure(ConnectionDone()))
        transport.writeConnectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.kinds(), ["made", "readConnectionLost", "writeConnectionLost"])
        self.settle()
        self.assertEqual(call.kinds(), ["half_close"])
        self.end(call)
        self.assertLostOnce(protocol, ConnectionDone)


class CloseTests(NetConnUnitCase):
    def test_peer_eof_closes_a_plain_protocol(self) -> None:
        protocol, transport, call = self.connect()
        call.answer_eof()
        self.settle()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(call.kinds(), ["half_close"])
        self.end(call)
        self.assertLostOnce(protocol, ConnectionDone)

    def test_loseConnection_sends_buffered_data_first(self) -> None:
        protocol, transport, call = self.connect()
        data = b"q" * (MAX_MESSAGE + 10)
        transport.write(data)
        transport.loseConnection()
        self.assertTrue(transport.disconnecting)
        transport.loseConnection()  # again: nothing more
        transport.write(b"after")  # dropped, as on TCP
        self.settle()
        self.assertEqual(call.kinds(), ["message", "message", "half_close"])
        self.assertEqual(call.payload(), data)
        self.assertEqual(protocol.losses(), [])  # until the remote has finished
        call.answer_bytes(b"bye")
        self.end(call)
        self.assertEqual(protocol.received(), b"bye")
        self.assertLostOnce(protocol, ConnectionDone)

    def test_loseConnection_waits_for_the_producer(self) -> None:
        protocol, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        transport.write(b"part 1, ")
        transport.loseConnection()
        self.settle()
        self.assertEqual(call.kinds(), ["message"])  # no half-close while it produces
        transport.write(b"part 2")
        self.settle()
        transport.unregisterProducer()
        self.settle()
        self.assertEqual(call.kinds(), ["message", "message", "half_close"])
        self.assertEqual(call.payload(), b"part 1, part 2")
        self.end(call)
        self.assertLostOnce(protocol, ConnectionDone)
        self.assertEqual(producer.events, [])

    def test_loseConnection_gives_up_after_the_grace(self) -> None:
        protocol, transport, call = self.connect()
        transport.loseConnection()
        self.settle()
        self.clock.advance(CLOSE_GRACE - 0.5)
        self.settle()
        self.assertEqual((call.kinds(), protocol.losses()), (["half_close"], []))
        self.clock.advance(0.5)
        self.settle()
        self.assertEqual(call.kinds(), ["half_close", "cancel"])
        self.assertLostOnce(protocol, ConnectionAborted)

    def test_remote_error_is_ConnectionLost(self) -> None:
        protocol, _, call = self.connect()
        self.end(call, Status(UNAVAILABLE, "target connection lost: reset"))
        self.assertLostOnce(protocol, ConnectionLost)
        self.assertIn("UNAVAILABLE", protocol.losses()[0].getErrorMessage())


class AbortTests(NetConnUnitCase):
    def test_abort_during_a_pending_write(self) -> None:
        protocol, transport, call = self.connect()
        producer = PushProducer()
        transport.registerProducer(producer, True)
        transport.write(b"doomed")  # handed to the loop, not yet framed
        transport.abortConnection()
        self.assertEqual(protocol.losses(), [])  # never from inside abortConnection
        transport.write(b"more")
        transport.abortConnection()
        transport.loseConnection()
        self.settle()
        self.assertEqual(call.kinds(), ["cancel"])  # the pending write was discarded
        self.assertEqual(call.payload(), b"")
        self.assertLostOnce(protocol, ConnectionAborted)
        self.assertEqual(producer.events, ["stop"])
        self.assertFalse(transport.connected)

    def test_abort_from_dataReceived_is_not_reentrant(self) -> None:
        class AbortOnData(Recorder):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.abortConnection()
                self.events.append(("aborted",))

        protocol, transport, call = self.connect(factory=Factory.forProtocol(AbortOnData))
        transport.pauseProducing()
        call.answer_bytes(b"first")
        self.settle()
        call.answer_bytes(b"second")
        self.settle()
        transport.resumeProducing()  # two queued chunks: the abort stops after the first
        self.assertEqual(protocol.kinds(), ["made", "data", "aborted"])
        self.settle()
        self.assertEqual(protocol.kinds(), ["made", "data", "aborted", "lost"])
        self.assertEqual(protocol.received(), b"first")
        self.assertLostOnce(protocol, ConnectionAborted)

    def test_abort_discards_queued_reads(self) -> None:
        protocol, transport, call = self.connect()
        transport.pauseProducing()
        call.answer_bytes(b"unread")
        self.settle()
        transport.abortConnection()
        transport.resumeProducing()
        self.settle()
        self.assertEqual(protocol.received(), b"")
        self.assertLostOnce(protocol, ConnectionAborted)

    def test_stopProducing_aborts(self) -> None:
        protocol, transport, call = self.connect()
        transport.stopProducing()
        self.settle()
        self.assertEqual(call.kinds(), ["cancel"])
        self.assertLostOnce(protocol, ConnectionAborted)


# --- the transport as a producer (reads) --------------------------------------------------------


class ReadTests(NetConnUnitCase):
    def test_pauseProducing_queues_reads(self) -> None:
        protocol, transport, call = self.connect()
        transport.pauseProducing()
        call.answer_bytes(b"a")
        self.settle()
        call.answer_bytes(b"b")
        self.settle()
        self.assertEqual(protocol.kinds(), ["made"])
        transport.resumeProducing()
        self.assertEqual(protocol.events[1:], [("data", b"a"), ("data", b"b")])
        call.answer_bytes(b"c")
        self.settle()
        self.assertEqual(protocol.received(), b"abc")
        self.end(call)

    def test_queued_reads_past_high_water_stop_the_call_reading(self) -> None:
        protocol, transport, call = self.connect()
        transport.pauseProducing()
        call.answer_bytes(b"r" * (HIGH_WATER + 1))
        self.settle()
        self.assertTrue(call.reading_paused)
        transport.resumeProducing()
        self.settle()
        self.assertFalse(call.reading_paused)
        self.assertEqual(len(protocol.received()), HIGH_WATER + 1)
        self.end(call)

    def test_a_busy_reactor_stops_the_call_reading(self) -> None:
        """Bytes handed to the reactor and not yet taken count against the call too."""
        protocol, _, call = self.connect()
        call.answer_bytes(b"s" * (HIGH_WATER + 1))
        self.hop.run_loop()
        self.assertEqual(call.reading, ["pause"])
        self.hop.run_reactor()  # delivered
        self.hop.run_loop()
        self.assertEqual(call.reading, ["pause", "resume"])
        self.assertEqual(len(protocol.received()), HIGH_WATER + 1)
        self.end(call)

    def test_connection_end_waits_behind_queued_reads(self) -> None:
        protocol, transport, call = self.connect()
        transport.pauseProducing()
        call.answer_bytes(b"tail")
        call.end(Status(OK))
        self.settle()
        self.assertEqual(protocol.kinds(), ["made"])
        transport.resumeProducing()
        self.assertEqual(protocol.kinds(), ["made", "data", "lost"])
        self.assertLostOnce(protocol, ConnectionDone)


def test_encode_chunks_splits_at_max_message_and_keeps_every_byte() -> None:
    from sesame.netconn._wire import MAX_MESSAGE, decode_bytes, encode_bytes, encode_chunks
    from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb

    assert list(encode_chunks(b"")) == []
    assert list(encode_chunks(b"abc")) == [encode_bytes(b"abc")]
    for n in (MAX_MESSAGE, MAX_MESSAGE + 1, 3 * MAX_MESSAGE + 17):
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        msgs = list(encode_chunks(data))
        assert len(msgs) == -(-n // MAX_MESSAGE)
        parts = [decode_bytes(m, rc_pb.NetConnRequest) for m in msgs]
        assert all(len(p) <= MAX_MESSAGE for p in parts)
        assert b"".join(parts) == data
