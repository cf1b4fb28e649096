"""
Splicing: a plain TCP connection accepted on the reactor and a NetConn
client connection, relayed from then on by the bridge loop alone.

A relay of two Twisted transports (:mod:`sesame.relay`) costs every chunk two
thread hand-offs each way (socket on the reactor, gRPC on the loop).  When
one side is a NetConn connection and the other a plain TCP socket with
nothing buffered, :func:`splice` moves the socket to the loop: an asyncio
protocol there feeds the gRPC call and is fed by it with plain calls, and the
reactor is out of the data path.  Behaviour stays that of the relay:
backpressure both ways (the socket's write buffer pauses the call's reads,
the call's send buffer pauses the socket's reads), half-closes both ways, a
call that ends closes the socket once what it sent is written, a client that
resets cancels the call.

The hand-over keeps every byte in order.  On the reactor the socket leaves
Twisted (a duplicate of it, Twisted's own descriptor closed without a
shutdown) and the NetConn transport's protocol becomes a :class:`_Collector`.
The loop side then stops handing events to the reactor and posts a marker
behind those already posted; when the marker runs, everything the reactor
still received is in the collector, which goes back to the loop, where it is
replayed ahead of what the loop held meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import interfaces, tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.netconn._transport import CLOSE_GRACE, NetConnTransport
from sesame.netconn._wire import HIGH_WATER, LOW_WATER, MAX_MESSAGE


def _noop(*_: Any) -> None:
    """A hook nobody set: does nothing."""


@dataclass
class SpliceHooks:
    """What a spliced connection reports (``count_in``/``count_out`` on the bridge loop,
    with the bytes read from the socket and written to it; ``done`` on the reactor, once,
    when both the socket and the call are finished)."""

    count_in: Callable[[int], None] = field(default=_noop)
    count_out: Callable[[int], None] = field(default=_noop)
    done: Callable[[], None] = field(default=_noop)


_spliced = 0


class LoopConnections:
    """
    Sockets moved from a reactor to the bridge loop (spliced relays, NetConn targets):
    when that reactor shuts down they are dropped, as the reactor drops its own
    connections, instead of outliving it.  Each member has ``drop()`` (on the loop).
    Reactors are held weakly (tests build and discard many; an ``id`` could be reused).
    """

    def __init__(self) -> None:
        self._live: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
        self._stopped: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, hop: Any, conn: Any) -> None:
        """(loop) Track ``conn``, moved from ``hop.reactor`` (dropped at once if that
        reactor has shut down already)."""
        reactor = hop.reactor
        if reactor in self._stopped:
            conn.drop()
            return
        live = self._live.get(reactor)
        if live is None:
            live = self._live[reactor] = set()
            ref = weakref.ref(reactor)

            def stopping() -> None:  # reactor thread, while it shuts down
                hop.to_loop(self._drop, ref)

            hop.to_reactor(reactor.addSystemEventTrigger, "during", "shutdown", stopping)
        live.add(conn)

    def discard(self, hop: Any, conn: Any) -> None:
        """(loop) ``conn`` is closed."""
        live = self._live.get(hop.reactor)
        if live is not None:
            live.discard(conn)

    def _drop(self, ref: weakref.ref) -> None:
        reactor = ref()
        if reactor is None:
            return
        self._stopped.add(reactor)
        for conn in list(self._live.pop(reactor, ())):
            conn.drop()


#: every socket this process moved to a bridge loop
loop_connections = LoopConnections()


def splice_count() -> int:
    """How many connections :func:`splice` has taken in this process (diagnostics, tests)."""
    return _spliced


def splice_enabled() -> bool:
    """Whether :func:`can_splice` may say yes (``SESAME_SPLICE=0`` keeps every relay on
    the reactor, for comparison)."""
    return os.environ.get("SESAME_SPLICE", "1") != "0"


def can_splice(sock_transport: Any, netconn_transport: Any) -> bool:
    """
    (reactor) Whether :func:`splice` can take these two: a plain TCP transport (no TLS
    layer, nothing buffered, not closing) and a connected NetConn transport that nothing
    has written to, paused or closed, whose loop runs on a thread of its own.
    """
    if not splice_enabled():
        return False
    if not isinstance(sock_transport, tcp.Connection) or not isinstance(
            netconn_transport, NetConnTransport):
        return False
    t, n = sock_transport, netconn_transport
    if (not t.connected or t.disconnecting or t.dataBuffer or t._tempDataLen
            or t.producer is not None):
        return False
    return bool(n.spliceable() and not n.hop.same_loop())


def splice(sock_transport: Any, netconn_transport: NetConnTransport,
           hooks: SpliceHooks | None = None, first: bytes = b"") -> bool:
    """
    (reactor) Relay ``sock_transport`` and ``netconn_transport`` on the bridge loop from
    now on; :func:`can_splice` must have said yes.  Both protocols are let go: neither
    gets another event (``hooks.done`` says when the relay is over).  ``first``: bytes
    the socket sent before (read while the far side was dialled), written ahead.

    :returns: False, with nothing changed, when the socket could not be duplicated (no
        file descriptor left): relay the two on the reactor instead.
    """
    global _spliced
    side = netconn_transport.loop_side
    assert side is not None
    try:
        sock = take_socket(sock_transport)
    except OSError:
        return False
    _spliced += 1
    hooks = hooks or SpliceHooks()
    if first:
        netconn_transport.write(first)
    collector = _Collector(netconn_transport, side, sock, hooks)
    netconn_transport.protocol = collector
    netconn_transport.hop.to_loop(side.splice_begin, collector.release)
    return True


def read_whole_messages(transport: Any) -> None:
    """Let an asyncio socket transport read up to one whole NetConn message per ``recv``
    (asyncio reads 256 KiB): fewer system calls and callbacks per MiB, and messages of
    :data:`MAX_MESSAGE` without waiting for the coalescer.  Transports without the
    attribute (other event loops) keep their own size."""
    if isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = MAX_MESSAGE


def reset_on_close(sock: Any) -> None:
    """Make closing ``sock`` (a socket, or asyncio's wrapper of one) send a reset, as
    Twisted's ``abortConnection`` does (a plain close is a FIN, which a half-closing peer
    takes for an EOF)."""
    if sock is not None and sock.fileno() >= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset(transport: asyncio.Transport) -> None:
    """Close an asyncio socket transport with a reset (:func:`reset_on_close`)."""
    reset_on_close(transport.get_extra_info("socket"))
    transport.abort()


def take_socket(t: Any) -> socket.socket:
    """(reactor) The socket of a connected Twisted TCP transport, ours from now on: a
    duplicate, while Twisted closes its own descriptor without ``shutdown(2)`` (so the
    connection stays open) and with a protocol that no longer listens; nothing more is
    read on the reactor.

    :raises OSError: no file descriptor for the duplicate; nothing was changed.
    """
    sock = t.socket.dup()
    t.stopReading()
    t.protocol = Protocol()
    t._shouldShutdown = False  # tcp.Connection's orderly close without shutdown(2)
    t.loseConnection()
    return sock


@implementer(interfaces.IHalfCloseableProtocol)
class _Collector(Protocol):
    """(reactor) The NetConn transport's protocol during the hand-over: keeps what the
    reactor still receives, in order, for the loop to replay."""

    def __init__(self, transport: NetConnTransport, side: Any, sock: socket.socket,
                 hooks: SpliceHooks) -> None:
        self.netconn = transport
        self.side = side
        self.sock = sock
        self.hooks = hooks
        self.events: list[tuple[str, bytes]] = []

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def readConnectionLost(self) -> None:
        self.events.append(("eof", b""))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.append(("end", b""))

    def release(self) -> None:
        """(reactor, behind everything the loop posted before the hand-over) Send what was
        collected to the loop; the transport is not used again."""
        self.netconn.loop_side = None
        self.side.hop.to_loop(self.side.splice_ready, self.sock, self.events, self.hooks)
        self.events = []


class SplicedSocket(asyncio.Protocol):
    """(loop) The spliced socket: its bytes go into the call, the call's into it."""

    def __init__(self, side: Any, hooks: SpliceHooks) -> None:
        self.side = side
        self.hooks = hooks
        self.transport: asyncio.Transport | None = None
        self._read_closed = False  # the client half-closed
        self._write_closed = False  # we half-closed (the target did)
        self._reading_paused = False
        self._call_over = False
        self._socket_over = False
        self._grace: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        read_whole_messages(transport)
        loop_connections.add(self.side.hop, self)

    def data_received(self, data: bytes) -> None:
        call = self.side.call
        if call is None or call.status is not None:
            return  # the call is over: nothing takes these any more
        self.hooks.count_in(len(data))
        self.side.up.push(data)
        # what the coalescer holds (under 1 MiB) is not counted: only the call's own
        # backlog going back under its low mark resumes us (on_writable)
        if not self._reading_paused and call.buffered() > HIGH_WATER:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._read_closed = True
        self.side.half_close()
        if self._write_closed:
            self.transport.close()  # type: ignore[union-attr]
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._socket_over = True
        loop_connections.discard(self.side.hop, self)
        if not self._call_over:
            if exc is None and self._read_closed and self._write_closed:
                # both halves closed in order: the call ends when the remote's target
                # closes, as a relay's loseConnection waits for it (a bounded wait)
                self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.side.abort)
            else:
                # the client went away (a reset): nobody reads what the target still sends
                self.side.abort()
        self._finish()

    def pause_writing(self) -> None:
        self.side.splice_hold(True)

    def resume_writing(self) -> None:
        self.side.splice_hold(False)

    # from the call (the loop side)
    def call_writable(self) -> None:
        t = self.transport
        if self._reading_paused and t is not None and not t.is_closing():
            self._reading_paused = False
            t.resume_reading()

    def call_event(self, kind: str, data: bytes) -> None:
        """One event of the call, in order: ``data``, ``eof`` (the target half-closed) or
        ``end``.  Never raises: a socket that fails here (a client that reset while we
        were not reading, so asyncio has not noticed) is reset and the call cancelled."""
        try:
            self._call_event(kind, data)
        except Exception:  # noqa: BLE001 - the socket is gone; the relay must end, not raise
            self.side.abort()
            t = self.transport
            if t is not None and not t.is_closing():
                reset(t)
            if kind == "end":
                self._call_over = True
                self._finish()

    def _call_event(self, kind: str, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if kind == "data":
            if not t.is_closing() and not self._write_closed:  # nothing after the EOF
                self.hooks.count_out(len(data))
                t.write(data)
        elif kind == "eof":
            if self._write_closed:
                return
            self._write_closed = True
            if t.is_closing():
                pass
            elif self._read_closed or not t.can_write_eof():
                t.close()
            else:
                t.write_eof()  # after what is buffered (raises if the peer reset meanwhile)
        else:  # the call is over: the socket goes once what it was sent is written
            self._call_over = True
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            if not t.is_closing():
                t.close()
            self._finish()

    def _finish(self) -> None:
        if self._call_over and self._socket_over:
            done, self.hooks.done = self.hooks.done, _noop
            self.side.hop.to_reactor(done)

    def drop(self) -> None:
        """The reactor it came from shuts down: close at once (the call is cancelled)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

