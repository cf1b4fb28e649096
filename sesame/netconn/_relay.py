"""
The remote's relay for one NetConn call being served: bytes between the
gRPC call (on the bridge loop) and the TCP connection to the target, both
directions, with backpressure and half-close.

:class:`_ServerRelay` is the loop side.  The target connection is one of two
kinds, each behind the same five operations (write, pause, resume,
half-close, abort):

* :class:`_LoopTarget`, the default when the reactor runs on a thread of its
  own: the reactor dials (allowlist, resolution, timeouts and their errors stay
  Twisted's), then hands the connected socket to the bridge loop
  (:class:`_Handover`), where an asyncio protocol feeds the relay with plain
  calls.  No byte of the call crosses a thread after that.
* :class:`_ReactorTarget`, the Twisted transport the dial made, driven through
  the hand-off (:class:`_TargetProtocol`, :class:`_UpProducer` its reactor
  side); used when the bridge loop *is* the reactor's loop (nothing to save)
  or when ``SESAME_LOOP_TARGETS=0``.

The servicer (:mod:`._servicer`) dials the target and runs the two pumps.

A pump that fails ends the call: a request that does not parse ends it with
INVALID_ARGUMENT naming it, anything else with INTERNAL (:attr:`_ServerRelay.unexpected`
holds it for the log); the servicer then aborts the target connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from twisted.internet import error, interfaces
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.bridge import Hop, write_now
from sesame.core import INTERNAL, INVALID_ARGUMENT, OK, UNAVAILABLE, Status
from sesame.netconn._splice import (
    loop_connections,
    read_whole_messages,
    reset,
    reset_on_close,
    take_socket,
)
from sesame.netconn._wire import HIGH_WATER, decode_bytes, encode_joined
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
        #: the target connection (:class:`_LoopTarget` or :class:`_ReactorTarget`), once dialled
        self.target: _LoopTarget | _ReactorTarget | None = None
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
        if self._down_bytes > HIGH_WATER and not self._target_paused and self.target:
            self._target_paused = True
            self.target.pause()
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
        # a tunnelled call's write returns once queued: wait for the tunnel's writer
        # (a grpc.aio call's write returns once written)
        flushed = getattr(self.context, "flushed", None)
        while True:
            if self._down:
                parts, n = self._down, self._down_bytes
                self._down = []
                self._down_bytes = 0
                if self._target_paused and self.target is not None:
                    self._target_paused = False
                    self.target.resume()
                for msg in encode_joined(parts, n):
                    await self.context.write(msg)
                if flushed is not None:
                    # what the target sends while the tunnel writes joins the next message
                    await flushed()
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
            # a target on the loop writes a view of the message (the socket copies what
            # it cannot send at once); Twisted's transports take bytes only
            data = decode_bytes(msg, rc_pb.NetConnRequest,
                                view=isinstance(self.target, _LoopTarget))
            if data is None:
                break
            if data and self._target_gone is None and self.target is not None:
                self.target.write(data)
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
            if self.target is not None:
                self.target.half_close()


def drop_handover(value: Any) -> None:
    """Close the socket of a :class:`_Handover` nobody will adopt (its call ended during
    the hand-over), with a reset as an aborted dial would."""
    sock = value.sock if isinstance(value, _Handover) else None
    if sock is not None:
        reset_on_close(sock)
        sock.close()


def _half_close(transport: Any) -> None:
    # Nothing more will be written, so the _UpProducer goes.  It must: Twisted's doWrite
    # resumes a paused producer *instead of* finishing a pending half-close when the buffer
    # drains, so with a producer paused at that moment the FIN would never be sent.
    transport.unregisterProducer()
    if interfaces.IHalfCloseableDescriptor.providedBy(transport):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


class _ReactorTarget:
    """The target connection as the Twisted transport the dial made (reactor side:
    :class:`_TargetProtocol`, :class:`_UpProducer`); every operation is a hand-off."""

    def __init__(self, hop: Hop, transport: Any) -> None:
        self.hop = hop
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.hop.to_reactor(write_now, self.transport, data)

    def pause(self) -> None:
        self.hop.to_reactor(self.transport.pauseProducing)

    def resume(self) -> None:
        self.hop.to_reactor(self.transport.resumeProducing)

    def half_close(self) -> None:
        self.hop.to_reactor(_half_close, self.transport)

    def abort(self) -> None:
        self.hop.to_reactor(self.transport.abortConnection)


def loop_targets_enabled() -> bool:
    """Whether NetConn targets move to the bridge loop (``SESAME_LOOP_TARGETS=0`` keeps
    them on the reactor, for comparison)."""
    return os.environ.get("SESAME_LOOP_TARGETS", "1") != "0"


class _Handover(Protocol):
    """(reactor) The dial's protocol when the target moves to the bridge loop: on
    connect it keeps the addresses and a duplicate of the socket, and lets Twisted close
    its own descriptor without shutting the connection down (no ``shutdown``, no RST;
    the duplicate keeps the connection open).  Nothing is read here: reading stops
    before the reactor could."""

    sock: socket.socket | None = None
    host: Any = None
    peer: Any = None
    #: why the socket could not be taken (no file descriptor to spare): the call ends
    #: UNAVAILABLE with it and the connection is aborted
    error: str | None = None

    def connectionMade(self) -> None:
        t = self.transport
        self.host, self.peer = t.getHost(), t.getPeer()
        try:
            self.sock = take_socket(t)
        except OSError as exc:
            self.error = f"cannot take over the target connection: {exc.strerror or exc}"
            t.abortConnection()


class _LoopTarget(asyncio.Protocol):
    """The target connection as an asyncio transport on the bridge loop: events reach
    the relay as calls, operations are calls on the transport."""

    def __init__(self, relay: _ServerRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self._read_closed = False
        self._write_closed = False
        self._aborted = False
        self._dropped = False

    @classmethod
    async def attach(cls, relay: _ServerRelay, sock: socket.socket) -> _LoopTarget:
        """Adopt ``sock`` (connected, from :class:`_Handover`) on the running loop."""
        _, target = await relay.loop.connect_accepted_socket(lambda: cls(relay), sock)
        return target

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        read_whole_messages(transport)
        loop_connections.add(self.relay.hop, self)

    def data_received(self, data: bytes) -> None:
        self.relay.down_data(data)

    def eof_received(self) -> bool:
        self._read_closed = True
        self.relay.down_eof()
        if self._write_closed and self.transport is not None:
            self.transport.close()
        return True  # keep the write half open: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        loop_connections.discard(self.relay.hop, self)
        if self._dropped:
            why = "the remote's reactor is shutting down"
        elif self._aborted:
            why = "aborted"
        elif exc is None:
            why = "Connection was closed cleanly."
        else:
            why = str(exc) or type(exc).__name__
        self.relay.target_lost(exc is None and not (self._aborted or self._dropped), why)

    def pause_writing(self) -> None:
        self.relay.set_up_paused(True)

    def resume_writing(self) -> None:
        self.relay.set_up_paused(False)

    # the relay's operations
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def half_close(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self._write_closed = True
        if self._read_closed:
            t.close()  # flushes what is buffered, then closes
            return
        try:
            t.write_eof()  # after what is buffered
        except OSError:
            # the target reset while we were not reading: asyncio has not noticed; the
            # reset reports it (connection_lost: "target connection lost")
            reset(t)

    def drop(self) -> None:
        """The reactor that dialled shuts down: close at once, as it closes its own."""
        if self.transport is not None and not self.transport.is_closing():
            self._dropped = True
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection with a reset (:func:`~sesame.netconn._splice.reset`)."""
        t = self.transport
        if t is None or self._aborted:
            return
        self._aborted = True
        reset(t)
