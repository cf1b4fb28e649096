"""The NetConn implementation; :mod:`sesame.netconn` is its public face."""


from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from twisted.internet import defer, error, interfaces
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.log import callWithLogger
from zope.interface import implementer

from sesame._wire import only_field, wrap_field
from sesame.bridge import AioLoopCall, Bridge, Hop, LoopCall, TunnelLoopCall, get_bridge
from sesame.core import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    OK,
    PERMISSION_DENIED,
    UNAVAILABLE,
    Status,
)
from sesame.netconn._allowlist import (
    AddressError,
    Allowlist,
    ip_literal,
    parse_port,
    split_host_port,
)
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb

METHOD = "/sesame.v1alpha1.RemoteControl/NetConn"
# Coalescing cap for one bytes message (receivers take any size). Kept a little
# under 256 KiB so that, framed, one message fits one 256 KiB tunnel frame of the
# window extension instead of spilling a few bytes into a second frame.
MAX_MESSAGE = 256 * 1024 - 64
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
DEFAULT_DIAL_TIMEOUT = 30.0
HALF_CLOSE_SETTLE = 0.02  # how long a client EOF waits for a cancellation to show up
CLOSE_GRACE = 10.0  # bounded wait for the remote to finish after loseConnection
_EOF_MARKER = b""  # an empty NetConnResponse / NetConnRequest: end of that direction

log = Logger()


# --- wire helpers -----------------------------------------------------------------


def encode_bytes(data: bytes) -> bytes:
    """A ``bytes`` message (field 2 in both NetConnRequest and NetConnResponse)."""
    return wrap_field(0x12, data)


def decode_bytes(msg: bytes, cls: type) -> bytes | None:
    """The chunk of a ``bytes`` message, or None for any other message (EOF)."""
    data = only_field(msg, 0x12)
    if data is not None:
        return data
    pb = cls.FromString(msg)
    if pb.WhichOneof("data") == "bytes":
        return pb.bytes
    return None


def _netaddr(addr: Any) -> netaddr_pb2.NetAddr:
    if isinstance(addr, (interfaces.IAddress,)) or hasattr(addr, "host"):
        host, port = addr.host, addr.port
        if ":" in host:
            return netaddr_pb2.NetAddr(network="tcp", address=f"[{host}]:{port}")
        return netaddr_pb2.NetAddr(network="tcp", address=f"{host}:{port}")
    return netaddr_pb2.NetAddr(network="tcp", address=str(addr))


# --- addresses and errors -----------------------------------------------------------


@implementer(interfaces.IAddress)
@dataclass(frozen=True)
class NetConnAddress:
    """
    One end of a NetConn connection: ``via`` names the path (the gRPC target
    or remote), ``network``/``host``/``port`` the TCP address at the far end.
    """

    via: str
    network: str
    host: str
    port: int

    @classmethod
    def parse(cls, via: str, netaddr: netaddr_pb2.NetAddr) -> NetConnAddress:
        try:
            host, port = split_host_port(netaddr.address)
            return cls(via, netaddr.network or "tcp", host, int(port))
        except (AddressError, ValueError):
            return cls(via, netaddr.network or "tcp", netaddr.address, 0)


class NetConnError(error.ConnectError):
    """A NetConn dial failed: ``code`` is the gRPC status the remote gave."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(string=f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _status_error(status: Status) -> NetConnError:
    return NetConnError(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message)


# --- client ------------------------------------------------------------------------


CallFactory = Callable[[str, Sequence[tuple[str, Any]]], LoopCall]
"""Runs on the bridge loop: (method, metadata) -> a started :class:`LoopCall`."""


def aio_call_factory(
    target: str, credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (), bridge: Bridge | None = None,
) -> CallFactory:
    """NetConn calls straight to a gRPC server at ``target`` (one channel, reused)."""
    bridge = bridge or get_bridge()
    holder: dict[str, grpc.aio.Channel] = {}

    def make(method: str, metadata: Sequence[tuple[str, Any]]) -> LoopCall:
        ch = holder.get("ch")
        if ch is None:
            ch = holder["ch"] = (
                grpc.aio.secure_channel(target, credentials, options=list(options))
                if credentials else grpc.aio.insecure_channel(target, options=list(options))
            )
        return AioLoopCall(ch, method, metadata)

    make.target = target  # type: ignore[attr-defined]
    return make


# one channel per plain target, shared by every connection to it (HTTP/2
# multiplexes; a channel per connection would cost a TCP handshake each)
_shared_factories: dict[str, CallFactory] = {}


def tunnel_call_factory(channel: Any) -> CallFactory:
    """NetConn calls inside a tunnel (a :class:`~sesame.tunnel.TunnelChannel`)."""

    def make(method: str, metadata: Sequence[tuple[str, Any]]) -> LoopCall:
        conn = channel.pick_connection()
        if conn is None:
            call = LoopCall()
            call.status = Status(UNAVAILABLE, "no tunnel available")
            return call
        return TunnelLoopCall(conn, method, metadata)

    make.target = "tunnel"  # type: ignore[attr-defined]
    return make


@implementer(
    interfaces.ITCPTransport, interfaces.IConsumer, interfaces.IPushProducer,
    interfaces.IHalfCloseableDescriptor,
)
class NetConnTransport:
    """The reactor-side transport of a NetConn connection (see the module doc)."""

    disconnecting = False

    def __init__(self, hop: Hop, via: str) -> None:
        self.hop = hop
        self.reactor = hop.reactor
        self.via = via
        self.protocol: Protocol | None = None
        self._host: NetConnAddress | None = None
        self._peer: NetConnAddress | None = None
        self.loop_side: _ClientLoopSide | None = None
        self.connected = False
        self._write_closed = False
        self._read_closed = False
        self._lost = False
        self._aborting = False  # abortConnection was called; connectionLost comes next turn
        self._logstr = "NetConnTransport"
        self._producer: Any = None
        self._streaming = False
        self._producer_paused = False
        self._writers_paused = False  # the loop side asked us to hold writers back
        self._handed = 0  # written, not yet framed by the loop side
        self._handoff_full = False
        self._paused = False  # our consumer paused us (IPushProducer)
        self._inq: deque[bytes] = deque()
        self._inq_bytes = 0
        self._reading_held = False
        self._pending_end: Status | None = None
        self._pending_read_eof = False
        self._nodelay = True
        self._keepalive = False
        self._close_timer: Any = None
        self._pull_scheduled = False

    # --- ITransport ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data or self._write_closed or self._lost or self.loop_side is None:
            return
        self.hop.to_loop(self.loop_side.send, bytes(data))
        # Bytes handed to the bridge loop but not yet framed there: when the
        # loop is starved the producer must stop here, not fill its queue.
        self._handed += len(data)
        if self._handed > HIGH_WATER and not self._handoff_full:
            self._handoff_full = True
            self._update_producer()
        if self._producer is not None and not self._streaming:
            self._ask_pull_producer()

    def _flushed(self, n: int) -> None:
        """The loop framed ``n`` more bytes (called via the hop)."""
        self._handed -= n
        if self._handoff_full and self._handed <= LOW_WATER:
            self._handoff_full = False
            self._update_producer()
        elif self._handed == 0 and self._producer is not None and not self._streaming:
            # everything written has moved on: like a TCP transport whose buffer drained,
            # ask a pull producer for more (it may have written before it was registered)
            self._ask_pull_producer()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        joined = b"".join(data)
        if joined:
            self.write(joined)

    def loseConnection(self) -> None:
        if self.disconnecting or self._lost or self._aborting:
            return
        self.disconnecting = True
        if self._producer is None:
            self._finish_lose()
        # else: like a TCP transport, wait for the producer (unregisterProducer closes)

    def _finish_lose(self) -> None:
        if self._lost or self._close_timer is not None:
            return
        self._close_write()
        self._close_timer = self.reactor.callLater(CLOSE_GRACE, self.abortConnection)

    def abortConnection(self) -> None:
        if self._lost or self._aborting:
            return
        self._aborting = True
        self._write_closed = True
        self._inq.clear()
        self._inq_bytes = 0
        if self.loop_side is not None:
            self.hop.to_loop(self.loop_side.abort)
        # As TCP does: connectionLost on the next turn, never re-entrantly from inside the
        # protocol method (dataReceived, resumeProducing...) that aborted.
        self.reactor.callLater(0, callWithLogger, self, self._connection_lost,
                               Status(CANCELLED, "aborted"), True)

    def loseWriteConnection(self) -> None:
        if self._write_closed or self._lost:
            return
        self._close_write()
        p = self.protocol
        if p is not None and interfaces.IHalfCloseableProtocol.providedBy(p):
            p.writeConnectionLost()

    def _close_write(self) -> None:
        if self._write_closed:
            return
        self._write_closed = True
        if self.loop_side is not None:
            self.hop.to_loop(self.loop_side.half_close)

    # IHalfCloseableDescriptor (the reactor-facing half-close notifications)
    def readConnectionLost(self, reason: Failure) -> None:
        self._read_eof()

    def writeConnectionLost(self, reason: Failure) -> None:
        self.loseWriteConnection()

    def logPrefix(self) -> str:
        """ILoggingContext: log events from the protocol's callbacks carry its prefix."""
        return self._logstr

    def getPeer(self) -> NetConnAddress:
        assert self._peer is not None
        return self._peer

    def getHost(self) -> NetConnAddress:
        assert self._host is not None
        return self._host

    # ITCPTransport odds and ends: the far socket is the remote's business
    def getTcpNoDelay(self) -> bool:
        return self._nodelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._nodelay = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self._keepalive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self._keepalive = bool(enabled)

    # --- IConsumer (producers writing into us) -------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        self._streaming = bool(streaming)
        if not streaming:
            producer.resumeProducing()
        elif self._writers_paused:
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        if self.disconnecting:
            self._finish_lose()

    def _ask_pull_producer(self) -> None:
        # A non-streaming producer writes once per resumeProducing and must be asked again
        # (a TCP transport does so whenever its buffer drains): ask on the next turn unless
        # the loop side reported its high-water mark (_resume_writers asks then).
        if not self._pull_scheduled:
            self._pull_scheduled = True
            self.reactor.callLater(0, self._pull_more)

    def _pull_more(self) -> None:
        self._pull_scheduled = False
        p = self._producer
        if (p is not None and not self._streaming and not self._writers_paused
                and not self._handoff_full and not self._lost and not self._aborting):
            p.resumeProducing()

    def _pause_writers(self) -> None:
        self._writers_paused = True
        self._update_producer()

    def _resume_writers(self) -> None:
        self._writers_paused = False
        self._update_producer()

    def _update_producer(self) -> None:
        hold = self._writers_paused or self._handoff_full
        if self._producer is None:
            return
        if self._streaming:
            if hold and not self._producer_paused:
                self._producer_paused = True
                self._producer.pauseProducing()
            elif not hold and self._producer_paused:
                self._producer_paused = False
                self._producer.resumeProducing()
        elif not hold:
            self._ask_pull_producer()

    # --- IPushProducer (our consumer controls our reads) -----------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain_inq()

    def stopProducing(self) -> None:
        self.abortConnection()

    # --- from the loop --------------------------------------------------------------

    def _connected(self, loop_side: _ClientLoopSide, host: NetConnAddress,
                   peer: NetConnAddress, protocol: Protocol) -> None:
        self.loop_side = loop_side
        self._host = host
        self._peer = peer
        self.connected = True
        self.protocol = protocol
        prefix = (protocol.logPrefix() if interfaces.ILoggingContext.providedBy(protocol)
                  else protocol.__class__.__name__)
        self._logstr = f"{prefix},netconn"
        protocol.makeConnection(self)

    def _data(self, chunks: list[bytes]) -> None:
        if self._lost or self._aborting:
            return
        if self._paused or self._inq:
            for c in chunks:
                self._inq.append(c)
                self._inq_bytes += len(c)
            if self._inq_bytes > HIGH_WATER and not self._reading_held and self.loop_side:
                self._reading_held = True
                self.hop.to_loop(self.loop_side.hold_reading, True)
            return
        p = self.protocol
        if p is not None:
            p.dataReceived(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    def _drain_inq(self) -> None:
        while self._inq and not self._paused and not self._lost and not self._aborting:
            data = self._inq.popleft()
            self._inq_bytes -= len(data)
            if self.protocol is not None:
                self.protocol.dataReceived(data)
        if self._reading_held and self._inq_bytes <= LOW_WATER and self.loop_side:
            self._reading_held = False
            self.hop.to_loop(self.loop_side.hold_reading, False)
        if not self._inq and self._pending_read_eof and not self._paused:
            self._pending_read_eof = False
            self._read_eof()
        if not self._inq and self._pending_end is not None and not self._paused:
            end, self._pending_end = self._pending_end, None
            self._ended(end)

    def _read_eof(self) -> None:
        """The target half-closed: no more bytes will come."""
        if self._read_closed or self._lost or self._aborting:
            return
        if self._inq:
            self._pending_read_eof = True  # after the queued bytes (_drain_inq)
            return
        self._read_closed = True
        p = self.protocol
        if p is not None and interfaces.IHalfCloseableProtocol.providedBy(p):
            p.readConnectionLost()
        else:
            self.loseConnection()

    def _ended(self, status: Status) -> None:
        if self._inq:
            self._pending_end = status
            return
        self._connection_lost(status)

    def _connection_lost(self, status: Status, aborted: bool = False) -> None:
        if self._lost:
            return
        aborted = aborted or self._aborting
        self._lost = True
        self.connected = False
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self._inq.clear()
        if aborted:
            reason = Failure(error.ConnectionAborted())
        elif status.code == OK:
            reason = Failure(error.ConnectionDone())
        else:
            reason = Failure(error.ConnectionLost(f"{_status_error(status)}"))
        producer, self._producer = self._producer, None
        if producer is not None:  # streaming or not, as FileDescriptor.connectionLost does
            try:
                producer.stopProducing()
            except Exception:  # noqa: BLE001
                log.failure("stopProducing failed")
        # as TCP does, the transport lets go of the protocol (the loop side may hold the
        # transport a little longer than the connection lasts)
        p, self.protocol = self.protocol, None
        if p is not None:
            p.connectionLost(reason)


class _ClientLoopSide:
    """The loop half of a client connection; every method runs on the loop."""

    def __init__(self, hop: Hop, transport: NetConnTransport, factory: Factory,
                 d: defer.Deferred, via: str) -> None:
        self.hop = hop
        self.transport = transport
        self.factory = factory
        self.d = d
        self.via = via
        self.call: LoopCall | None = None
        self.connected = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._down: list[bytes] = []
        self._down_scheduled = False
        self._in_flight = 0
        self._held_in_flight = False
        self._held_by_transport = False
        self._writers_paused = False
        self._half_close_pending = False
        self.finished = False

    def start(self, make_call: CallFactory, address: str, network: str, timeout: float | None,
              metadata: Sequence[tuple[str, Any]]) -> None:
        call = self.call = make_call(METHOD, metadata)
        if call.status is not None:
            self._fail(call.status)
            return
        call.on_message = self._on_message
        call.on_end = self._on_end
        call.on_writable = self._on_writable
        dial = rc_pb.NetConnRequest.Dial(address=netaddr_pb2.NetAddr(network=network, address=address))
        if timeout:
            dial.timeout.CopyFrom(duration_pb2.Duration(
                seconds=int(timeout), nanos=int((timeout - int(timeout)) * 1e9)))
        call.send(rc_pb.NetConnRequest(dial=dial).SerializeToString())

    def cancel_dial(self) -> None:
        if self.call is not None and not self.connected:
            self.call.cancel(Status(CANCELLED, "dial cancelled"))

    def _fail(self, status: Status) -> None:
        if not self.d.called:
            err = _status_error(status)
            self.hop.to_reactor(lambda: self.d.called or self.d.errback(err))

    def _on_message(self, msg: bytes) -> None:
        if not self.connected:
            pb = rc_pb.NetConnResponse.FromString(msg)
            if pb.WhichOneof("data") != "conn":
                self.call.cancel(Status(INVALID_ARGUMENT, "unexpected first response"))
                return
            self.connected = True
            host = NetConnAddress.parse(self.via, pb.conn.local)
            peer = NetConnAddress.parse(self.via, pb.conn.remote)
            self.hop.to_reactor(self._connect_reactor, host, peer)
            return
        data = decode_bytes(msg, rc_pb.NetConnResponse)
        if data is None:
            self._flush_down()
            self.hop.to_reactor(callWithLogger, self.transport, self.transport._read_eof)
            return
        if not data:
            return
        self._down.append(data)
        if not self._down_scheduled:
            self._down_scheduled = True
            self.hop.to_loop(self._flush_down)

    def _flush_down(self) -> None:
        self._down_scheduled = False
        if self._down:
            chunks, self._down = self._down, []
            n = sum(len(c) for c in chunks)
            # Bytes handed to the reactor but not yet taken by it: a busy
            # reactor must slow the gRPC reads down, not grow this queue.
            self._in_flight += n
            if self._in_flight > HIGH_WATER and not self._held_in_flight:
                self._held_in_flight = True
                self._apply_hold()
            self.hop.to_reactor(self._deliver, chunks, n)

    def _deliver(self, chunks: list[bytes], n: int) -> None:  # reactor thread
        try:
            callWithLogger(self.transport, self.transport._data, chunks)
        finally:
            self.hop.to_loop(self._delivered, n)

    def _delivered(self, n: int) -> None:
        self._in_flight -= n
        if self._held_in_flight and self._in_flight <= LOW_WATER:
            self._held_in_flight = False
            self._apply_hold()

    def _apply_hold(self) -> None:
        if self.call is None:
            return
        if self._held_by_transport or self._held_in_flight:
            self.call.pause_reading()
        else:
            self.call.resume_reading()

    def _connect_reactor(self, host: NetConnAddress, peer: NetConnAddress) -> None:
        if self.d.called:  # cancelled meanwhile
            self.hop.to_loop(self.abort)
            return
        protocol = self.factory.buildProtocol(peer)
        if protocol is None:
            self.hop.to_loop(self.abort)
            self.d.errback(error.NoProtocol())  # as Twisted's TCP endpoints report it
            return
        self.transport._connected(self, host, peer, protocol)
        self.d.callback(protocol)

    def _on_end(self, status: Status, trailers: tuple) -> None:
        self.finished = True
        if not self.connected:
            self._fail(status if status.code != OK else Status(UNAVAILABLE, "no conn response"))
            return
        self._flush_down()
        self.hop.to_reactor(callWithLogger, self.transport, self.transport._ended, status)

    def _on_writable(self) -> None:
        if self._writers_paused:
            self._writers_paused = False
            self.hop.to_reactor(self.transport._resume_writers)

    # from the reactor
    def send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # let every write already posted in this batch join the message
            asyncio.get_running_loop().call_soon(self._flush_up)

    def _flush_up(self) -> None:
        self._flush_scheduled = False
        call = self.call
        n = self._out_bytes
        data = b"".join(self._out) if len(self._out) > 1 else (self._out[0] if self._out else b"")
        self._out.clear()
        self._out_bytes = 0
        if call is not None and call.status is None:
            view = memoryview(data)
            for i in range(0, len(data), MAX_MESSAGE):
                call.send(encode_bytes(bytes(view[i:i + MAX_MESSAGE])))
            if self._half_close_pending:
                self._half_close_pending = False
                call.half_close()
            if call.buffered() > HIGH_WATER and not self._writers_paused:
                self._writers_paused = True
                self.hop.to_reactor(self.transport._pause_writers)
        if n:
            # after _pause_writers: a producer held by the hand-off is not resumed in between
            self.hop.to_reactor(self.transport._flushed, n)

    def half_close(self) -> None:
        if self._flush_scheduled:
            self._half_close_pending = True
        elif self.call is not None:
            self.call.half_close()

    def abort(self) -> None:
        if self.call is not None:
            self.call.cancel(Status(CANCELLED, "connection aborted"))

    def hold_reading(self, hold: bool) -> None:
        self._held_by_transport = hold
        self._apply_hold()


def connectNetConn(
    target: str | CallFactory | Any,
    address: str,
    protocolFactory: Factory,
    *,
    network: str = "tcp",
    timeout: float | None = None,
    metadata: Sequence[tuple[str, Any]] = (),
    reactor: Any = None,
    bridge: Bridge | None = None,
) -> defer.Deferred:
    """
    Connect ``protocolFactory`` to ``address`` (``host:port``) as dialled by
    the NetConn server at ``target`` — a ``host:port`` gRPC target, a
    :class:`~sesame.tunnel.TunnelChannel`, or a :data:`CallFactory`.

    Returns a Deferred firing with the connected protocol, or failing with
    :class:`NetConnError` (``.code`` tells PERMISSION_DENIED, UNAVAILABLE,
    DEADLINE_EXCEEDED, INVALID_ARGUMENT...).  Cancelling it abandons the dial.
    """
    hop = Hop.get(reactor, bridge)
    if isinstance(target, str):
        make = _shared_factories.get(target)
        if make is None:
            make = _shared_factories[target] = aio_call_factory(target, bridge=hop.bridge)
    elif callable(target) and not hasattr(target, "pick_connection"):
        make = target
    else:
        make = tunnel_call_factory(target)
    via = getattr(make, "target", str(target))
    transport = NetConnTransport(hop, via)

    def cancel(d: defer.Deferred) -> None:
        hop.to_loop(side.cancel_dial)
        d.errback(error.ConnectingCancelledError(NetConnAddress(via, network, address, 0)))

    d: defer.Deferred = defer.Deferred(canceller=cancel)
    side = _ClientLoopSide(hop, transport, protocolFactory, d, via)
    hop.to_loop(side.start, make, address, network, timeout, tuple(metadata))
    return d


@implementer(interfaces.IStreamClientEndpoint)
class NetConnClientEndpoint:
    """
    An ``IStreamClientEndpoint`` for ``address`` as dialled by a NetConn
    server (``target``: gRPC ``host:port``, a tunnel channel, or a call
    factory).  The ``sesame:`` endpoint strings sit on this.
    """

    def __init__(self, reactor: Any, target: Any, address: str, *, timeout: float | None = None,
                 metadata: Sequence[tuple[str, Any]] = (), bridge: Bridge | None = None) -> None:
        self.reactor = reactor
        self.target = target
        self.address = address
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.bridge = bridge

    def connect(self, protocolFactory: Factory) -> defer.Deferred:
        try:
            return connectNetConn(self.target, self.address, protocolFactory,
                                  timeout=self.timeout, metadata=self.metadata,
                                  reactor=self.reactor, bridge=self.bridge)
        except Exception:  # noqa: BLE001
            return defer.fail()


# --- server ------------------------------------------------------------------------


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
        """client → target until the client half-closes (then TCP half-close)."""
        while True:
            if self._up_paused and self._target_gone is None:
                self._up_wake = self.loop.create_future()
                await self._up_wake
                self._up_wake = None
                continue
            msg = await self.context.read()
            if msg is grpc.aio.EOF:
                break
            data = decode_bytes(msg, rc_pb.NetConnRequest)
            if data is None:
                break
            if data and self._target_gone is None:
                self.hop.to_reactor(self.transport.write, data)
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


class NetConnServicer:
    """
    Serves ``RemoteControl.NetConn``: dial behind ``allow``, relay bytes.

    Register it with :meth:`add_to` on a ``grpc.aio`` server running on the
    bridge loop, or on a :class:`~sesame.tunnel.ServiceRegistry` to serve it
    over tunnels.
    """

    def __init__(self, allow: Allowlist | Sequence[str] = (), *, reactor: Any = None,
                 bridge: Bridge | None = None, default_timeout: float = DEFAULT_DIAL_TIMEOUT) -> None:
        self.allow = allow if isinstance(allow, Allowlist) else Allowlist(allow)
        self._reactor = reactor
        self._bridge = bridge
        self.default_timeout = default_timeout
        self.active = 0

    @property
    def hop(self) -> Hop:
        return Hop.get(self._reactor, self._bridge)

    def handler(self) -> grpc.GenericRpcHandler:
        return _NetConnHandler(self)

    def add_to(self, server: Any) -> None:
        server.add_generic_rpc_handlers((self.handler(),))

    async def NetConn(self, request_iterator: Any, context: Any) -> None:
        hop = self.hop
        first = await context.read()
        if first is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no dial request before end of stream")
        req = rc_pb.NetConnRequest.FromString(first)
        if req.WhichOneof("data") != "dial":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first NetConn request must be a dial")
        status, host, port = self._check(req.dial)
        if status is not None:
            await context.abort(_CODES[status.code], status.message)
        timeout = self.default_timeout
        if req.dial.HasField("timeout"):
            t = req.dial.timeout.seconds + req.dial.timeout.nanos / 1e9
            if t > 0:
                timeout = t
        relay = _ServerRelay(hop, context)
        fut: asyncio.Future[Any] = relay.loop.create_future()

        def dial_in_reactor() -> None:
            d = _dial(hop.reactor, self.allow, req.dial.address.network or "tcp", host, port,
                      timeout, lambda: _TargetProtocol(relay))
            d.addCallbacks(lambda proto: (hop.to_loop(_settle, fut, proto, None), proto)[1],
                           lambda f: hop.to_loop(_settle, fut, None, f))
            relay.dial_deferred = d

        hop.to_reactor(dial_in_reactor)
        try:
            proto = await fut
        except asyncio.CancelledError:
            # posted after dial_in_reactor, so it runs after it: cancels the dial, or closes
            # a connection that was made while the cancellation was on its way
            hop.to_reactor(_abandon_dial, relay)
            raise
        if isinstance(proto, Failure):
            st = _dial_status(proto, f"{host}:{port}", timeout)
            await context.abort(_CODES[st.code], st.message)
        transport = proto.transport
        relay.transport = transport
        hop.to_reactor(transport.registerProducer, _UpProducer(relay), True)
        self.active += 1
        up: asyncio.Task[None] | None = None
        try:  # from here on, however the handler ends, the target connection goes with it
            await context.write(rc_pb.NetConnResponse(conn=rc_pb.NetConnResponse.Conn(
                local=_netaddr(transport.getHost()), remote=_netaddr(transport.getPeer()),
            )).SerializeToString())
            up = relay.loop.create_task(relay.pump_up())
            status = await relay.pump_down()
        finally:
            self.active -= 1
            if up is not None:
                up.cancel()
            if relay._target_gone is None:
                hop.to_reactor(transport.abortConnection)
        if status.code != OK:
            await context.abort(_CODES[status.code], status.message)

    def _check(self, dial: Any) -> tuple[Status | None, str, int]:
        network = dial.address.network or "tcp"
        if network not in ("tcp", "tcp4", "tcp6"):
            return Status(INVALID_ARGUMENT, f"network {network!r} is not supported (tcp, tcp4, tcp6)"), "", 0
        try:
            host, port_text = split_host_port(dial.address.address)
            port = parse_port(port_text, f"address {dial.address.address!r}")
        except AddressError as exc:
            return Status(INVALID_ARGUMENT, str(exc)), "", 0
        ip = ip_literal(host)
        if ip is not None:
            if (network == "tcp4" and ip.version != 4) or (network == "tcp6" and ip.version != 6):
                return Status(INVALID_ARGUMENT, f"{host} is not a {network} address"), "", 0
            if not self.allow.allows_ip(ip, port):
                return Status(PERMISSION_DENIED, f"{dial.address.address} is not allowed"), "", 0
        elif not self.allow.allows_name(host, port) and not _may_resolve_to_allowed(self.allow, port):
            return Status(PERMISSION_DENIED, f"{dial.address.address} is not allowed"), "", 0
        return None, host, port


def _may_resolve_to_allowed(allow: Allowlist, port: int) -> bool:
    return any(r.network is not None or r.any_host for r in allow.rules if r.port_ok(port))


def _abandon_dial(relay: _ServerRelay) -> None:
    """Reactor: the call ended during the dial; cancel it or drop what it connected."""
    d = getattr(relay, "dial_deferred", None)
    if d is None:
        return
    d.cancel()
    d.addCallback(lambda proto: proto.transport.abortConnection() if proto is not None else None)
    d.addErrback(lambda f: None)


def _settle(fut: asyncio.Future, value: Any, failure: Failure | None) -> None:
    if not fut.done():
        fut.set_result(failure if failure is not None else value)


def _dial(reactor: Any, allow: Allowlist, network: str, host: str, port: int, timeout: float,
          build: Callable[[], Protocol]) -> defer.Deferred:
    factory = Factory.forProtocol(build)  # type: ignore[arg-type]
    factory.noisy = False  # one per relayed connection: no start/stop log lines
    factory.protocol = lambda: build()  # type: ignore[assignment]
    ip = ip_literal(host)
    if ip is not None:
        ep = (TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint)(
            reactor, host, port, timeout=timeout)
        return ep.connect(factory)
    if allow.allows_name(host, port):
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout).connect(factory)

    # Only address rules could allow it: resolve, keep allowed addresses, dial those.
    family = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}.get(network, socket.AF_UNSPEC)
    d = _resolve(reactor, host, port, family)

    def pick(addresses: list[str]) -> defer.Deferred:
        ok = allow.filter_ips(addresses, port)
        if not ok:
            return defer.fail(_Denied(f"{host}:{port} is not allowed"))
        return _first_connect(reactor, ok, port, timeout, factory)

    return d.addCallback(pick)


class _Denied(Exception):
    pass


def _resolve(reactor: Any, host: str, port: int, family: int) -> defer.Deferred:
    from twisted.internet.threads import deferToThreadPool

    def lookup() -> list[str]:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        seen: list[str] = []
        for *_, sockaddr in infos:
            if sockaddr[0] not in seen:
                seen.append(sockaddr[0])
        return seen

    return deferToThreadPool(reactor, reactor.getThreadPool(), lookup)


def _first_connect(reactor: Any, ips: list[str], port: int, timeout: float,
                   factory: Factory) -> defer.Deferred:
    async def go() -> Any:
        last: Failure | None = None
        for ip in ips:
            ep = (TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint)(
                reactor, ip, port, timeout=timeout)
            try:
                return await ep.connect(factory)
            except Exception:  # noqa: BLE001
                last = Failure()
        assert last is not None
        last.raiseException()

    return defer.ensureDeferred(go())


def _dial_status(f: Failure, where: str, timeout: float) -> Status:
    if f.check(_Denied):
        return Status(PERMISSION_DENIED, f.getErrorMessage())
    if f.check(error.ConnectionRefusedError):
        return Status(UNAVAILABLE, f"{where}: connection refused")
    if f.check(error.TimeoutError, defer.TimeoutError):
        return Status(DEADLINE_EXCEEDED, f"{where}: no connection within {timeout:g}s")
    if f.check(error.DNSLookupError, socket.gaierror):
        return Status(UNAVAILABLE, f"{where}: cannot resolve host")
    if f.check(error.NoRouteError):
        return Status(UNAVAILABLE, f"{where}: no route to host")
    if f.check(defer.CancelledError, error.ConnectingCancelledError):
        return Status(CANCELLED, f"{where}: dial cancelled")
    return Status(UNAVAILABLE, f"{where}: {f.getErrorMessage()}")


class _NetConnHandler(grpc.GenericRpcHandler):
    def __init__(self, servicer: NetConnServicer) -> None:
        self._h = grpc.stream_stream_rpc_method_handler(servicer.NetConn)

    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        return self._h if details.method == METHOD else None


__all__ = [
    "METHOD",
    "NetConnAddress",
    "NetConnClientEndpoint",
    "NetConnError",
    "NetConnServicer",
    "NetConnTransport",
    "aio_call_factory",
    "connectNetConn",
    "tunnel_call_factory",
]
