"""
The reactor side of a NetConn client connection: :class:`NetConnTransport`,
what the protocol sees as its ``transport``.

Everything here runs on the reactor.  The transport talks to its loop side
(the bridge-loop half that drives the gRPC call, :mod:`._client`) through
:class:`~sesame.bridge.Hop` hand-offs, and the loop side calls back the
``_``-methods under "from the loop".  The one exception is the count of bytes
written but not yet framed: the loop side takes them off under the
transport's lock (:meth:`NetConnTransport._framed`, on the loop) and hops
back only when that crosses a water mark, so plain bulk writes cost one
hand-off each instead of two.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error, interfaces
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.log import callWithLogger
from zope.interface import implementer

from sesame.bridge import Hop
from sesame.core import CANCELLED, OK, Status
from sesame.netconn._address import NetConnAddress, _status_error
from sesame.netconn._wire import HIGH_WATER, LOW_WATER

CLOSE_GRACE = 10.0  # bounded wait for the remote to finish after loseConnection

log = Logger()


class _LoopSide(TypingProtocol):
    """What the transport hands work to (on the bridge loop, through the hop)."""

    def send(self, data: bytes) -> None: ...

    def half_close(self) -> None: ...

    def abort(self) -> None: ...

    def hold_reading(self, hold: bool) -> None: ...


@implementer(
    interfaces.ITCPTransport, interfaces.IConsumer, interfaces.IPushProducer,
    interfaces.IHalfCloseableDescriptor,
)
class NetConnTransport:
    """
    The reactor-side transport of a NetConn connection: an ``ITCPTransport``
    whose far end is a TCP connection the remote made (see :mod:`sesame.netconn`).

    :func:`connectNetConn` builds it; the protocol gets it in ``makeConnection``
    once the remote has connected.  It is also an ``IConsumer`` (a producer
    writing into it is paused past the high-water mark and resumed below the
    low-water mark) and an ``IPushProducer`` (a consumer that pauses it stops
    ``dataReceived``; past the high-water mark the gRPC call stops reading too).

    :param hop: the hand-off between the bridge loop and the reactor; its
        ``reactor`` runs the transport's timers (``callLater``).
    :param via: the path the connection takes, as :class:`NetConnAddress` reports it.
    """

    disconnecting = False

    def __init__(self, hop: Hop, via: str) -> None:
        self.hop = hop
        self.reactor = hop.reactor
        self.via = via
        self.protocol: Protocol | None = None
        self._host: NetConnAddress | None = None
        self._peer: NetConnAddress | None = None
        self.loop_side: _LoopSide | None = None
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
        # written, not yet framed by the loop side; these three change under _lock only
        # (the loop side takes bytes off in _framed, on the loop)
        self._lock = threading.Lock()
        self._handed = 0
        self._handoff_full = False
        self._pull_waiting = False  # a pull producer is registered: tell it when _handed is 0
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
        """
        Send ``data`` to the target; never blocks.

        The bytes go to the loop side, which coalesces what was written in one
        batch into messages of up to :data:`MAX_MESSAGE` bytes.  When the bytes
        not yet framed there, or the call's send buffer, pass the high-water mark
        (1 MiB) a registered streaming producer is paused, and resumed below the
        low-water mark (256 KiB); a pull producer is asked for more once what it
        wrote has moved on.

        :param data: the bytes.  Empty data is ignored, and so is data written after
            :meth:`loseWriteConnection`, :meth:`abortConnection` or the end of the
            connection, as on a TCP transport.
        """
        if not data or self._write_closed or self._lost or self.loop_side is None:
            return
        data = bytes(data)
        # Bytes handed to the bridge loop but not yet framed there: when the
        # loop is starved the producer must stop here, not fill its queue.
        pull = self._producer is not None and not self._streaming
        with self._lock:
            self._handed += len(data)
            full = self._handed > HIGH_WATER and not self._handoff_full
            if full:
                self._handoff_full = True
        self.hop.to_loop(self.loop_side.send, data)
        if full:
            self._update_producer()
        if pull:
            self._ask_pull_producer()

    def spliceable(self) -> bool:
        """Whether :func:`~sesame.netconn.splice` may take this connection over: connected,
        nothing queued for the protocol, no producer, not paused and nothing closed."""
        return bool(self.connected and self.loop_side is not None and not (
            self._lost or self._aborting or self._write_closed or self._read_closed
            or self.disconnecting or self._paused or self._inq or self._producer is not None))

    def _framed(self, n: int) -> None:
        """The loop side framed ``n`` more bytes (runs *on the loop*): hop to the reactor
        only when that lets a held producer go or a pull producer wait for it."""
        with self._lock:
            self._handed -= n
            tell = (self._handoff_full and self._handed <= LOW_WATER) or (
                self._pull_waiting and self._handed == 0)
        if tell:
            self.hop.to_reactor(self._flushed)

    def _flushed(self) -> None:
        """What :meth:`_framed` found worth telling the reactor, checked again here."""
        with self._lock:
            resume = self._handoff_full and self._handed <= LOW_WATER
            if resume:
                self._handoff_full = False
            drained = self._handed == 0
        if resume:
            self._update_producer()
        elif drained and self._producer is not None and not self._streaming:
            # everything written has moved on: like a TCP transport whose buffer drained,
            # ask a pull producer for more (it may have written before it was registered)
            self._ask_pull_producer()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        """
        Write the concatenation of ``data``, as one :meth:`write`.

        :param data: a sequence of bytes; nothing is written if they are all empty.
        """
        joined = b"".join(data)
        if joined:
            self.write(joined)

    def loseConnection(self) -> None:
        """
        Close the connection once everything written has been sent.

        With a producer registered this waits for ``unregisterProducer`` first, as
        a TCP transport does.  Then the write side closes (the call is half-closed
        after the buffered bytes) and the remote, having shut down the write side
        of its target socket, ends the call when the target closes: the protocol
        gets ``connectionLost`` with ``ConnectionDone``, or ``ConnectionLost``
        naming the status if the remote ended with an error.  A remote that has
        not finished within 10 s is aborted (``ConnectionAborted``).  Calling it
        again, or after :meth:`abortConnection`, does nothing.
        """
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
        """
        Close the connection at once, discarding what is not yet sent or delivered.

        The call is cancelled (the remote aborts its target socket) and the
        protocol gets ``connectionLost`` with ``ConnectionAborted`` exactly once,
        on the next reactor turn: never re-entrantly from inside the protocol
        method that aborted.  Calling it again, or after the connection ended,
        does nothing.
        """
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
        """
        Half-close: write nothing more, keep reading.

        After the bytes already written, the call is half-closed and the remote
        shuts down the write side of its target socket; the target's answer still
        arrives.  A protocol providing ``IHalfCloseableProtocol`` gets
        ``writeConnectionLost()`` before this returns.  Does nothing once the write
        side is closed or the connection has ended.
        """
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
        """
        ``IHalfCloseableDescriptor``: the read side is done, as when the target
        half-closes: a half-closeable protocol gets ``readConnectionLost()`` (after
        any bytes still queued for it), any other protocol loses the connection.

        :param reason: not used.
        """
        self._read_eof()

    def writeConnectionLost(self, reason: Failure) -> None:
        """
        ``IHalfCloseableDescriptor``: the write side is done; the same as
        :meth:`loseWriteConnection`.

        :param reason: not used.
        """
        self.loseWriteConnection()

    def logPrefix(self) -> str:
        """
        ``ILoggingContext``: ``"<protocol's prefix>,netconn"`` once connected, so log
        events from the protocol's callbacks carry its prefix.
        """
        return self._logstr

    def getPeer(self) -> NetConnAddress:
        """
        The far end: the target's address as the remote connected to it.

        :returns: a :class:`NetConnAddress` (the ``remote`` of the remote's ``conn`` reply).
        :raises AssertionError: before the connection is made.
        """
        assert self._peer is not None
        return self._peer

    def getHost(self) -> NetConnAddress:
        """
        This end: the remote's local address of its connection to the target.

        :returns: a :class:`NetConnAddress` (the ``local`` of the remote's ``conn`` reply).
        :raises AssertionError: before the connection is made.
        """
        assert self._host is not None
        return self._host

    # ITCPTransport odds and ends: the far socket is the remote's business
    def getTcpNoDelay(self) -> bool:
        """
        The recorded ``TCP_NODELAY`` setting (True at first).  Socket options of the
        target connection are the remote's business: this only reports back what
        :meth:`setTcpNoDelay` recorded.
        """
        return self._nodelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Record ``enabled`` for :meth:`getTcpNoDelay`; it does not reach the remote's socket."""
        self._nodelay = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        """
        The recorded ``SO_KEEPALIVE`` setting (False at first); only reports back
        what :meth:`setTcpKeepAlive` recorded.
        """
        return self._keepalive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Record ``enabled`` for :meth:`getTcpKeepAlive`; it does not reach the remote's socket."""
        self._keepalive = bool(enabled)

    # --- IConsumer (producers writing into us) -------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        ``IConsumer``: let ``producer`` write into this transport.

        A streaming producer is paused once when writes pass the high-water mark
        and resumed once below the low-water mark (at once, if the transport is
        already holding writers back).  A pull producer gets ``resumeProducing()``
        now and again each time what it wrote has moved on.  When the connection
        ends, the producer gets ``stopProducing()``.

        :param producer: an ``IPushProducer`` (streaming) or ``IPullProducer``.
        :param streaming: True for a push producer.
        :raises RuntimeError: a producer is already registered.
        """
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        self._streaming = bool(streaming)
        with self._lock:
            self._pull_waiting = not streaming
        if not streaming:
            producer.resumeProducing()
            with self._lock:
                drained = self._handed == 0
            if drained and self._producer is producer:
                # what it wrote before registering may be framed already (that told no
                # one): ask again, as a TCP transport does once its buffer has drained
                self._ask_pull_producer()
        elif self._writers_paused or self._handoff_full:
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        """
        ``IConsumer``: forget the registered producer.  A :meth:`loseConnection`
        that was waiting for it goes ahead now.
        """
        self._producer = None
        with self._lock:
            self._pull_waiting = False
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
        """
        ``IPushProducer``: stop calling ``dataReceived``.  Bytes that arrive are
        queued; past the high-water mark the call stops reading, so the remote
        stops reading from the target.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        ``IPushProducer``: deliver what was queued while paused (in order, then an
        end of stream or connection end that waited behind it) and go on
        delivering.  The call reads again once the queue is below the low-water mark.
        """
        self._paused = False
        self._drain_inq()

    def stopProducing(self) -> None:
        """``IPushProducer``: the consumer gives up; the same as :meth:`abortConnection`."""
        self.abortConnection()

    # --- from the loop --------------------------------------------------------------

    def _connected(self, loop_side: _LoopSide, host: NetConnAddress,
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

