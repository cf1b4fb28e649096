"""
The client side of NetConn: :func:`connectNetConn` and
:class:`NetConnClientEndpoint`, the call factories that say what carries the
call (:func:`aio_call_factory`, :func:`tunnel_call_factory`), and the loop
half of a client connection, which drives the gRPC call on the bridge loop
for its :class:`~sesame.netconn._transport.NetConnTransport` on the reactor.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from twisted.internet import defer, error, interfaces
from twisted.internet.protocol import Factory
from twisted.python.log import callWithLogger
from zope.interface import implementer

from sesame.bridge import AioLoopCall, Bridge, Hop, LoopCall, TunnelLoopCall, get_bridge
from sesame.core import CANCELLED, INTERNAL, INVALID_ARGUMENT, OK, UNAVAILABLE, Status
from sesame.netconn._address import NetConnAddress, _status_error
from sesame.netconn._splice import SplicedSocket
from sesame.netconn._transport import NetConnTransport
from sesame.netconn._wire import (
    HIGH_WATER,
    LOW_WATER,
    METHOD,
    Coalescer,
    decode_bytes,
)
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb

CallFactory = Callable[[str, Sequence[tuple[str, Any]]], LoopCall]
"""Runs on the bridge loop: (method, metadata) -> a started :class:`LoopCall`."""


def aio_call_factory(
    target: str, credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (), bridge: Bridge | None = None,
) -> CallFactory:
    """
    NetConn calls straight to the gRPC server at ``target``, over one
    ``grpc.aio`` channel made by the first call and reused by every later one.

    :param target: the server's gRPC target (``host:port``).
    :param credentials: credentials for a secure channel; None for plaintext.
    :param options: gRPC channel options.
    :param bridge: the bridge whose loop runs the calls; the process-wide one
        by default (started if need be).
    :returns: a :data:`CallFactory` to pass as ``target`` to :func:`connectNetConn`
        or :class:`NetConnClientEndpoint`; its ``target`` attribute becomes
        :attr:`NetConnAddress.via`.  A server that cannot be reached shows up as
        a dial failing with :class:`NetConnError` ``UNAVAILABLE``.
    """
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
    """
    NetConn calls as streams inside a tunnel.

    :param channel: a :class:`~sesame.tunnel.TunnelChannel` (anything whose
        ``pick_connection()`` returns a tunnel connection, or None).
    :returns: a :data:`CallFactory` (``target`` ``"tunnel"``).  While no tunnel
        is connected its calls end at once with ``UNAVAILABLE`` ("no tunnel
        available"), so dials fail with :class:`NetConnError`.
    """

    def make(method: str, metadata: Sequence[tuple[str, Any]]) -> LoopCall:
        conn = channel.pick_connection()
        if conn is None:
            call = LoopCall()
            call.status = Status(UNAVAILABLE, "no tunnel available")
            return call
        return TunnelLoopCall(conn, method, metadata)

    make.target = "tunnel"  # type: ignore[attr-defined]
    return make


class _ClientLoopSide:
    """The loop half of a client connection; every method runs on the loop."""

    def __init__(self, hop: Hop, transport: NetConnTransport, factory: Factory,
                 d: defer.Deferred, via: str,
                 call_soon: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.hop = hop
        # how send() runs _flush_up after the current batch; None: the running loop's
        # call_soon (tests hand in a synchronous stand-in)
        self._call_soon = call_soon
        self.transport = transport
        self.factory = factory
        self.d = d
        self.via = via
        self.call: LoopCall | None = None
        #: what goes up the call: coalesced while the call is busy writing
        self.up: Coalescer | None = None
        self.connected = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._down: list[bytes] = []
        self._down_scheduled = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._held_in_flight = False
        self._held_by_transport = False
        self._writers_paused = False
        self._half_close_pending = False
        self.finished = False
        # splicing (sesame.netconn.splice): events held while the socket is on its way,
        # then the asyncio protocol that relays the socket on this loop
        self._held: list[tuple[str, bytes]] | None = None
        self._spliced: Any = None
        self._held_by_splice = False
        self._held_in_transit = False
        self._adopting: asyncio.Task[None] | None = None

    def start(self, make_call: CallFactory, address: str, network: str, timeout: float | None,
              metadata: Sequence[tuple[str, Any]]) -> None:
        # Runs as a hand-off to the loop: an exception escaping from here would only be
        # logged, and the connect Deferred would never fire.
        try:
            self._start(make_call, address, network, timeout, metadata)
        except Exception as exc:  # noqa: BLE001 - the dial must end, with a status
            if self.call is not None:
                self.call.cancel(Status(CANCELLED, "dial failed"))
            self._fail(Status(INTERNAL, f"NetConn dial failed: {type(exc).__name__}: {exc}"))

    def _start(self, make_call: CallFactory, address: str, network: str, timeout: float | None,
               metadata: Sequence[tuple[str, Any]]) -> None:
        if timeout is not None and not 0 <= timeout < 1e12:  # NaN too
            self._fail(Status(INVALID_ARGUMENT,
                              f"timeout {timeout!r} is not a number of seconds from 0 to 1e12"))
            return
        call = self.call = make_call(METHOD, metadata)
        if call.status is not None:
            self._fail(call.status)
            return
        call.on_message = self._on_message
        call.on_end = self._on_end
        call.on_writable = self._on_writable
        self.up = Coalescer(call.send, call.after_write)
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
        try:
            self._take(msg)
        except DecodeError as exc:
            # a hostile or broken server: end the call rather than let the exception escape
            # into the call's read loop (which would stop reading and never cancel the call)
            if self.call is not None:
                self.call.cancel(Status(INVALID_ARGUMENT, f"a response does not parse as a "
                                                          f"NetConnResponse: {exc}"))

    def _take(self, msg: bytes) -> None:
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
        # spliced: the socket takes a view of the message (no copy); the reactor, bytes
        data = decode_bytes(msg, rc_pb.NetConnResponse, view=self._spliced is not None)
        if self._spliced is not None or self._held is not None:
            self._splice_event("eof" if data is None else "data", data or b"")
            return
        if data is None:
            self._flush_down()
            self.hop.to_reactor(callWithLogger, self.transport, self.transport._read_eof)
            return
        if not data:
            return
        self._down.append(data)
        if not self._down_scheduled:
            self._down_scheduled = True
            # on the loop already: the rest of this batch of reads joins the delivery
            (self._call_soon or asyncio.get_running_loop().call_soon)(self._flush_down)

    def _flush_down(self) -> None:
        self._down_scheduled = False
        if self._down:
            chunks, self._down = self._down, []
            n = sum(len(c) for c in chunks)
            # Bytes handed to the reactor but not yet taken by it: a busy
            # reactor must slow the gRPC reads down, not grow this queue.
            # (_in_flight and _held_in_flight change under _lock: the reactor takes bytes
            # off in _deliver and hops back only when the hold can go)
            with self._lock:
                self._in_flight += n
                hold = self._in_flight > HIGH_WATER and not self._held_in_flight
                if hold:
                    self._held_in_flight = True
            if hold:
                self._apply_hold()
            self.hop.to_reactor(self._deliver, chunks, n)

    def _deliver(self, chunks: list[bytes], n: int) -> None:  # reactor thread
        try:
            callWithLogger(self.transport, self.transport._data, chunks)
        finally:
            with self._lock:
                self._in_flight -= n
                release = self._held_in_flight and self._in_flight <= LOW_WATER
            if release:
                self.hop.to_loop(self._delivered)

    def _delivered(self) -> None:
        with self._lock:
            release = self._held_in_flight and self._in_flight <= LOW_WATER
            if release:
                self._held_in_flight = False
        if release:
            self._apply_hold()

    def _apply_hold(self) -> None:
        if self.call is None:
            return
        if (self._held_by_transport or self._held_in_flight or self._held_by_splice
                or self._held_in_transit):
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
        if self._spliced is not None or self._held is not None:
            self._splice_event("end", b"")
            return
        self._flush_down()
        self.hop.to_reactor(callWithLogger, self.transport, self.transport._ended, status)

    def _on_writable(self) -> None:
        if self._spliced is not None:
            self._spliced.call_writable()
            return
        if self._writers_paused:
            self._writers_paused = False
            self.hop.to_reactor(self.transport._resume_writers)

    # splicing (sesame.netconn._splice): the socket moves here, the transport is let go
    def splice_begin(self, release: Callable[[], None]) -> None:
        """What was read so far goes to the reactor the usual way; what comes from now on
        is held until the socket arrives; ``release`` runs on the reactor behind it all."""
        if self._down:
            self._flush_down()
        self._held = []
        self._held_in_transit = True  # what is held here is not read on (window-bounded)
        self._apply_hold()
        self.hop.to_reactor(release)

    def splice_ready(self, sock: Any, late: list[tuple[str, bytes]], hooks: Any) -> None:
        """The socket, and what the reactor received before it let the transport go."""
        self._adopting = asyncio.get_running_loop().create_task(self._adopt(sock, late, hooks))

    async def _adopt(self, sock: Any, late: list[tuple[str, bytes]], hooks: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.connect_accepted_socket(lambda: SplicedSocket(self, hooks), sock)
        except OSError:  # the socket died on its way: the call goes too
            sock.close()
            self._held = None
            self.abort()
            self.hop.to_reactor(hooks.done)
            return
        events = late + (self._held or [])
        self._held = None
        self._spliced = conn
        for kind, data in events:  # in order, before anything the call delivers next
            conn.call_event(kind, data)
        # the reactor's holds went with its transport; the socket's buffer holds from now
        self._held_by_transport = self._held_in_flight = self._held_in_transit = False
        self._apply_hold()

    def _splice_event(self, kind: str, data: bytes) -> None:
        if self._spliced is not None:
            self._spliced.call_event(kind, data)
        else:
            assert self._held is not None
            self._held.append((kind, data))

    def splice_hold(self, hold: bool) -> None:
        """The spliced socket's write buffer passed its high (True) or low (False) mark."""
        self._held_by_splice = hold
        self._apply_hold()

    # from the reactor
    def send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # let every write already posted in this batch join the message
            (self._call_soon or asyncio.get_running_loop().call_soon)(self._flush_up)

    def _flush_up(self) -> None:
        self._flush_scheduled = False
        call = self.call
        n = self._out_bytes
        data = b"".join(self._out) if len(self._out) > 1 else (self._out[0] if self._out else b"")
        self._out.clear()
        self._out_bytes = 0
        if call is not None and call.status is None:
            up = self.up
            assert up is not None
            up.push(data)
            if self._half_close_pending:
                self._half_close_pending = False
                up.flush()
                call.half_close()
            if call.buffered() > HIGH_WATER and not self._writers_paused:
                self._writers_paused = True
                self.hop.to_reactor(self.transport._pause_writers)
        if n:
            # after _pause_writers: a producer held by the hand-off is not resumed in between
            self.transport._framed(n)

    def half_close(self) -> None:
        if self._flush_scheduled:
            self._half_close_pending = True
        elif self.call is not None:
            if self.up is not None:
                self.up.flush()
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
    Connect ``protocolFactory`` to ``address`` as dialled by the NetConn
    server at ``target``.

    :param target: the NetConn server: a ``host:port`` gRPC target (one channel
        per target, shared by every connection of the process), a
        :class:`~sesame.tunnel.TunnelChannel` (anything with
        ``pick_connection``), or a :data:`CallFactory`.
    :param address: the ``host:port`` the remote connects to (``[v6]:port``
        for an IPv6 literal).
    :param protocolFactory: builds the protocol (``buildProtocol(peer)``) once
        the remote has connected; the protocol's transport is a
        :class:`NetConnTransport`.
    :param network: ``"tcp"``, ``"tcp4"`` or ``"tcp6"``.
    :param timeout: the remote's dial timeout in seconds; None leaves it to
        the remote (30 s by default).
    :param metadata: gRPC metadata sent with the call.
    :param reactor: the reactor the protocol runs on; the global one by default.
    :param bridge: the bridge whose loop runs the call; the process-wide one
        by default.
    :returns: a Deferred firing with the connected protocol, or failing with
        :class:`NetConnError` (``.code``: ``PERMISSION_DENIED``,
        ``INVALID_ARGUMENT``, ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``...), or with
        ``NoProtocol`` if the factory builds None.  Cancelling it abandons the
        dial and fails it with ``ConnectingCancelledError``.
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
    return _connect(hop, make, via, address, protocolFactory, network, timeout, metadata)


def _connect(hop: Hop, make: CallFactory, via: str, address: str, protocolFactory: Factory,
             network: str, timeout: float | None, metadata: Sequence[tuple[str, Any]],
             call_soon: Callable[[Callable[[], Any]], Any] | None = None) -> defer.Deferred:
    """:func:`connectNetConn` once the hop and the call factory are chosen."""
    transport = NetConnTransport(hop, via)

    def cancel(d: defer.Deferred) -> None:
        hop.to_loop(side.cancel_dial)
        d.errback(error.ConnectingCancelledError(NetConnAddress(via, network, address, 0)))

    d: defer.Deferred = defer.Deferred(canceller=cancel)
    side = _ClientLoopSide(hop, transport, protocolFactory, d, via, call_soon)
    hop.to_loop(side.start, make, address, network, timeout, tuple(metadata))
    return d


@implementer(interfaces.IStreamClientEndpoint)
class NetConnClientEndpoint:
    """
    An ``IStreamClientEndpoint`` for ``address`` as dialled by a NetConn
    server.  The ``sesame:`` endpoint strings sit on this.

    :param reactor: the reactor the protocols run on.
    :param target: the NetConn server: a gRPC ``host:port``, a tunnel channel,
        or a call factory (as for :func:`connectNetConn`).
    :param address: the ``host:port`` the remote connects to.
    :param timeout: the remote's dial timeout in seconds; None for its default.
    :param metadata: gRPC metadata sent with each call.
    :param bridge: the bridge whose loop runs the calls; the process-wide one
        by default.
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
        """
        Connect a protocol from ``protocolFactory`` through the remote; one
        NetConn call per connection (see :func:`connectNetConn`).

        :param protocolFactory: builds the protocol once the remote has connected.
        :returns: a Deferred firing with the connected protocol, or failing with
            :class:`NetConnError`; never raises (an error while starting fails the
            Deferred).  Cancelling it abandons the dial (``ConnectingCancelledError``).
        """
        try:
            return connectNetConn(self.target, self.address, protocolFactory,
                                  timeout=self.timeout, metadata=self.metadata,
                                  reactor=self.reactor, bridge=self.bridge)
        except Exception:  # noqa: BLE001
            return defer.fail()
