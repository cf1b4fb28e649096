"""
The remote's relay for one NetConn call being served: bytes between the
gRPC call (on the bridge loop) and the TCP connection to the target (on the
reactor), both directions, with backpressure and half-close.

:class:`_ServerRelay` is the loop side; :class:`_TargetProtocol` (the
target connection's protocol) and :class:`_UpProducer` (registered on the
target transport) are its reactor side.  The servicer (:mod:`._servicer`)
dials the target and runs the two pumps.

A pump that fails ends the call: a request that does not parse ends it with
INVALID_ARGUMENT naming it, anything else with INTERNAL (:attr:`_ServerRelay.unexpected`
holds it for the log); the servicer then aborts the target connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from twisted.internet import error, interfaces
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.bridge import Hop, write_now
from sesame.core import INTERNAL, INVALID_ARGUMENT, OK, UNAVAILABLE, Status
from sesame.netconn._wire import HIGH_WATER, MAX_MESSAGE, decode_bytes, encode_bytes
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb

HALF_CLOSE_SETTLE = 0.02  # how long a client EOF waits for a cancellation to show up


@implementer(interfaces.IHalfCloseableProtocol)
class _TargetProtocol(Protocol):
    """The remote's connection to the target; reactor side of the relay."""

    def __init__(self, relay: _ServerRelay) -> None:
        self.relay = relay
        self.read_closed = False
        self.write_closed = False

    def dataReceived(self, data: bytes) -> None:
        self.relay.hop.to_loop(self.relay.down_data, data)

    # Twisted does not close a socket whose two halves were shut separately.
    def readConnectionLost(self) -> None:
        self.read_closed = True
        self.relay.hop.to_loop(self.relay.down_eof)
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        reason = reason or Failure(error.ConnectionDone())
        clean = reason.check(error.ConnectionDone) is not None
        self.relay.hop.to_loop(self.relay.target_lost, clean, reason.getErrorMessage())


@implementer(interfaces.IPushProducer)
class _UpProducer:
    """Registered on the target transport: its write buffer pauses our reads."""

    def __init__(self, relay: _ServerRelay) -> None:
        self.relay = relay

    def pauseProducing(self) -> None:
        self.relay.hop.to_loop(self.relay.set_up_paused, True)

    def resumeProducing(self) -> None:
        self.relay.hop.to_loop(self.relay.set_up_paused, False)

    def stopProducing(self) -> None:
        pass


class _ServerRelay:
    """Loop side of one NetConn call being served."""

    def __init__(self, hop: Hop, context: Any) -> None:
        self.hop = hop
        self.loop = asyncio.get_running_loop()
        self.context = context
        self.transport: Any = None
        self._down: list[bytes] = []
        self._down_bytes = 0
        self._down_wake: asyncio.Future[None] | None = None
        self._target_paused = False
        self._down_eof = False
        self._target_gone: tuple[bool, str] | None = None
        self._up_paused = False
        self._up_wake: asyncio.Future[None] | None = None
        self._up_messages = 1  # the dial
        #: why the upload pump ended the call (it cancels the download pump)
        self.failed: Status | None = None
        #: the exception behind an INTERNAL ``failed``, for the log
        self.unexpected: Failure | None = None
        self._down_task: asyncio.Task[Status] | None = None

    # reactor → loop
    def down_data(self, data: bytes) -> None:
        self._down.append(data)
        self._down_bytes += len(data)
        if self._down_bytes > HIGH_WATER and not self._target_paused and self.transport:
            self._target_paused = True
            self.hop.to_reactor(self.transport.pauseProducing)
        self._wake_down()

    def down_eof(self) -> None:
        self._down_eof = True
        self._wake_down()

    def target_lost(self, clean: bool, why: str) -> None:
        self._target_gone = (clean, why)
        self._wake_down()
        self.set_up_paused(False)

    def set_up_paused(self, paused: bool) -> None:
        self._up_paused = paused
        if not paused and self._up_wake is not None and not self._up_wake.done():
            self._up_wake.set_result(None)

    def _wake_down(self) -> None:
        w = self._down_wake
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, status: Status) -> None:
        """End the call with ``status``: the download pump stops (even in a blocked write)."""
        if self.failed is None:
            self.failed = status
            if self._down_task is not None:
                self._down_task.cancel()

    async def run_down(self) -> Status:
        """:meth:`pump_down` until the target is gone or :meth:`fail` is called; the call's
        status either way."""
        task = self._down_task = self.loop.create_task(self.pump_down())
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.failed is None or (me is not None and me.cancelling()):
                task.cancel()
                raise
            return self.failed

    async def pump_down(self) -> Status:
        """target → client until the target is gone; returns the call status."""
        eof_sent = False
        while True:
            if self._down:
                data = b"".join(self._down)
                self._down.clear()
                self._down_bytes = 0
                if self._target_paused and self.transport is not None:
                    self._target_paused = False
                    self.hop.to_reactor(self.transport.resumeProducing)
                if len(data) <= MAX_MESSAGE:  # the usual case: no slice, no copy
                    await self.context.write(encode_bytes(data))
                    continue
                view = memoryview(data)
                for i in range(0, len(data), MAX_MESSAGE):
                    await self.context.write(encode_bytes(bytes(view[i:i + MAX_MESSAGE])))
                continue
            if self._target_gone is not None:
                clean, why = self._target_gone
                if clean:
                    return Status(OK)
                return Status(UNAVAILABLE, f"target connection lost: {why}")
            if self._down_eof and not eof_sent:
                eof_sent = True
                await self.context.write(rc_pb.NetConnResponse().SerializeToString())
                continue
            self._down_wake = self.loop.create_future()
            await self._down_wake
            self._down_wake = None

    async def pump_up(self) -> None:
        """client → target until the client half-closes (then TCP half-close); a failure
        ends the call (:meth:`fail`)."""
        try:
            await self._pump_up()
        except asyncio.CancelledError:
            raise
        except DecodeError as exc:
            self.fail(Status(INVALID_ARGUMENT, f"message {self._up_messages} of the call does "
                                               f"not parse as a NetConnRequest: {exc}"))
        except Exception as exc:  # noqa: BLE001 - the call must end, with a status
            if not self.context.done():
                self.unexpected = Failure()
            self.fail(Status(INTERNAL, f"NetConn relay failed unexpectedly: "
                                       f"{type(exc).__name__}: {exc}"))

    async def _pump_up(self) -> None:
        while True:
            if self._up_paused and self._target_gone is None:
                self._up_wake = self.loop.create_future()
                await self._up_wake
                self._up_wake = None
                continue
            msg = await self.context.read()
            if msg is grpc.aio.EOF:
                break
            self._up_messages += 1
            data = decode_bytes(msg, rc_pb.NetConnRequest)
            if data is None:
                break
            if data and self._target_gone is None:
                self.hop.to_reactor(write_now, self.transport, data)
        if self._target_gone is None:
            # grpc.aio reports a cancelled call to read() as EOF, and may do so a little before
            # it marks the call cancelled: give a cancellation a moment to show before turning
            # the EOF into a FIN (a target that has seen a FIN no longer notices a reset).
            t0 = self.loop.time()
            while True:
                if self.context.cancelled() or self.context.done():
                    return  # not a half-close: the call is over; the handler aborts the target
                if self.loop.time() - t0 >= HALF_CLOSE_SETTLE:
                    break
                await asyncio.sleep(0.001)
            self.hop.to_reactor(_half_close, self.transport)


def _half_close(transport: Any) -> None:
    # Nothing more will be written, so the _UpProducer goes.  It must: Twisted's doWrite
    # resumes a paused producer *instead of* finishing a pending half-close when the buffer
    # drains, so with a producer paused at that moment the FIN would never be sent.
    transport.unregisterProducer()
    if interfaces.IHalfCloseableDescriptor.providedBy(transport):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()
