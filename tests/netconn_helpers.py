"""Helpers for tests/test_netconn.py: carriers, target servers, recording protocols, sources.

Everything is real: grpcio on the bridge loop, Twisted TCP listeners on 127.0.0.1 / ::1,
NetConn connections made with :func:`sesame.netconn.connectNetConn`.  Nothing here sleeps:
waits are Deferreds with timeouts, or :func:`eventually` (polls a predicate on reactor ticks
with a deadline).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from twisted.internet import defer, interfaces, reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame.bridge._loop import get_bridge
from sesame.netconn import NetConnServicer, aio_call_factory, connectNetConn
from sesame.tunnel._server import ServiceRegistry
from sesame.tunnel._service import ReverseTunnelServer, TunnelHost

WAIT = 10.0  # generous bound for anything that should happen "promptly"
KiB = 1024
MiB = 1024 * KiB


# --- waiting ----------------------------------------------------------------------------


def within(d: defer.Deferred, timeout: float = WAIT) -> defer.Deferred:
    """``d`` with a deadline (fails with ``defer.TimeoutError``)."""
    return d.addTimeout(timeout, reactor)


async def eventually(pred: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Wait (reactor keeps running) until ``pred()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await deferLater(reactor, 0.002, lambda: None)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- the server side ----------------------------------------------------------------------


class ObservedServicer(NetConnServicer):
    """NetConnServicer that records how each call's handler ended (on the reactor thread)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.started = 0  # touched on the loop thread only; read for diagnostics
        self.outcomes: list[str] = []  # appended on the reactor thread

    async def NetConn(self, request_iterator: Any, context: Any) -> None:
        self.started += 1
        outcome = "ok"
        try:
            await super().NetConn(request_iterator, context)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BaseException as exc:  # abort() raises
            outcome = type(exc).__name__
            code = getattr(context, "code", None)
            if callable(code):  # which status, for a failing assertion to show
                outcome += f" {code()} {context.details()!r}"
            raise
        finally:
            reactor.callFromThread(self.outcomes.append, outcome)


def _accept_queue(port: int) -> int:
    """How many connections wait in the accept queue of the 127.0.0.1 listener on ``port``
    (/proc/net/tcp: a LISTEN socket's rx_queue is its accept queue)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    return 0


@dataclass
class Carrier:
    """One way of reaching a NetConnServicer: ``target`` is what connectNetConn takes."""

    name: str
    target: Any
    servicer: ObservedServicer
    raw_channel: grpc.Channel  # a sync channel for hand-built calls
    via: str
    open_streams: Callable[[], int] = lambda: 0
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass


def make_carrier(name: str) -> Carrier:
    svc = ObservedServicer(["127.0.0.1:*"])
    bridge = get_bridge()
    if name == "direct":
        async def start() -> tuple[grpc.aio.Server, int]:
            s = grpc.aio.server()
            svc.add_to(s)
            p = s.add_insecure_port("127.0.0.1:0")
            await s.start()
            return s, p

        server, port = bridge.run(start())
        addr = f"127.0.0.1:{port}"
        raw = grpc.insecure_channel(addr)
        c = Carrier(name, aio_call_factory(addr), svc, raw, via=addr)
        c.closers += [lambda: bridge.run(server.stop(None), WAIT), raw.close]
        return c
    host = TunnelHost()
    hp = host.start("127.0.0.1:0")
    reg = ServiceRegistry()
    svc.add_to(reg)
    rts = ReverseTunnelServer(f"127.0.0.1:{hp}", reg).start()
    assert host.wait_for_reverse(WAIT), "reverse tunnel never came up"
    ch = host.reverse_channel()

    def streams() -> int:
        conns = [*list(host._conns), rts.connection]
        return sum(c.core.open_streams for c in conns if c is not None)

    c = Carrier(name, ch, svc, ch, via="tunnel", open_streams=streams)
    c.closers += [lambda: host.stop(0.5), lambda: rts.stop(0.5)]
    return c


# --- protocols ------------------------------------------------------------------------------


class Recorder(Protocol):
    """
    Records what arrives (sha256 + count, optionally the bytes) and the order of events.
    ``echo``: write back everything; ``on_data`` / ``on_eof`` / ``on_made``: hooks.
    """

    keep = False
    echo = False

    def __init__(self) -> None:
        self.made: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.read_eof: defer.Deferred = defer.Deferred()
        self.events: list[Any] = []
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.buf = bytearray()
        self.reason: Failure | None = None
        self._byte_waiters: list[tuple[int, defer.Deferred]] = []
        self.on_data: Callable[[Recorder, bytes], None] | None = None
        self.on_eof: Callable[[Recorder], None] | None = None
        self.on_made: Callable[[Recorder], None] | None = None

    def connectionMade(self) -> None:
        self.events.append("made")
        if self.echo:
            self.transport.registerProducer(self.transport, True)
        if self.on_made is not None:
            self.on_made(self)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.sha.update(data)
        self.nbytes += len(data)
        if self.keep:
            self.buf += data
        if self.echo:
            self.transport.write(data)
        if self.on_data is not None:
            self.on_data(self, data)
        if self._byte_waiters:
            ready = [w for w in self._byte_waiters if w[0] <= self.nbytes]
            self._byte_waiters = [w for w in self._byte_waiters if w[0] > self.nbytes]
            for _, d in ready:
                d.callback(self.nbytes)

    def wait_bytes(self, n: int, timeout: float = WAIT) -> defer.Deferred:
        if self.nbytes >= n:
            return defer.succeed(self.nbytes)
        d: defer.Deferred = defer.Deferred()
        self._byte_waiters.append((n, d))
        return within(d, timeout)

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")
        if self.echo:
            self.transport.unregisterProducer()
        if not self.read_eof.called:
            self.read_eof.callback(None)
        if self.on_eof is not None:
            self.on_eof(self)

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.events.append(("lost", reason.type))
        self.reason = reason
        waiters, self._byte_waiters = self._byte_waiters, []
        for n, d in waiters:
            d.errback(AssertionError(f"connection lost after {self.nbytes} of {n} bytes: "
                                     f"{reason.getErrorMessage()}"))
        if not self.read_eof.called:
            self.read_eof.callback(None)
        self.lost.callback(None)  # (a Failure would make the Deferred fail)

    async def wait_lost(self, timeout: float = WAIT) -> Failure:
        """Wait for connectionLost; returns its reason."""
        await within(self.lost, timeout)
        assert self.reason is not None
        return self.reason

    @property
    def digest(self) -> bytes:
        return self.sha.digest()


@implementer(interfaces.IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    """A Recorder that takes half-closes (readConnectionLost / writeConnectionLost)."""


class EchoTarget(HalfRecorder):
    """Echoes (pausing its reads while its write buffer is full); closes on the client's EOF."""

    echo = True

    def __init__(self) -> None:
        super().__init__()
        self.on_eof = lambda p: p.transport.loseConnection()


def factory_of(make: Callable[[], Protocol]) -> Factory:
    f = Factory()
    f.protocol = make  # type: ignore[assignment]
    return f


# --- a deterministic bulk source --------------------------------------------------------------

_BASE = os.urandom(2 * MiB)


@implementer(interfaces.IPushProducer)
class Source:
    """
    A streaming producer writing ``total`` pseudo-random bytes to ``transport`` in
    ``chunk``-sized writes (at most ``burst`` per reactor turn), hashing them as it goes.
    ``then``: what to do once everything is written (``"close"``, ``"half"`` or None).
    Counts pauses and how long it spent paused.
    """

    def __init__(self, transport: Any, total: int, *, chunk: int = 64 * KiB, burst: int = MiB,
                 then: str | None = "close", seed: int = 0) -> None:
        self.transport = transport
        self.total = total
        self.chunk = chunk
        self.burst = burst
        self.then = then
        self.sha = hashlib.sha256()
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0
        self.paused_time = 0.0
        self._paused_at = 0.0
        self._n = seed
        self._scheduled = False
        self.done: defer.Deferred = defer.Deferred()
        self.on_chunk: Callable[[Source], None] | None = None
        transport.registerProducer(self, True)
        self._schedule()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._paused_at = time.monotonic()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.resumes += 1
            self.paused_time += time.monotonic() - self._paused_at
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if not self.done.called:
            self.done.callback(self)  # check .sent / .stopped: the connection went away

    def _schedule(self) -> None:
        if not self._scheduled and not self.done.called:
            self._scheduled = True
            reactor.callLater(0, self._run)

    def next_chunk(self) -> bytes:
        n = min(self.chunk, self.total - self.sent)
        off = (self._n * 40_961) % (len(_BASE) - n)
        self._n += 1
        return _BASE[off:off + n]

    def _run(self) -> None:
        self._scheduled = False
        budget = self.burst
        while not self.paused and not self.stopped and self.sent < self.total and budget > 0:
            data = self.next_chunk()
            self.sha.update(data)
            self.sent += len(data)
            budget -= len(data)
            self.transport.write(data)
            if self.on_chunk is not None:
                self.on_chunk(self)
        if self.stopped:
            return
        if self.sent >= self.total:
            self.transport.unregisterProducer()
            if self.then == "close":
                self.transport.loseConnection()
            elif self.then == "half":
                self.transport.loseWriteConnection()
            self.done.callback(self)
        elif not self.paused:
            self._schedule()

    @property
    def digest(self) -> bytes:
        return self.sha.digest()

    @property
    def finished(self) -> bool:
        """Everything was written (not cut short by stopProducing)."""
        return self.done.called and self.sent == self.total and not self.stopped


# --- the target side: listeners ----------------------------------------------------------------


class Lab:
    """Target listeners and NetConn connections of one test; ``close()`` tears them down."""

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self.ports: list[Any] = []
        self.protocols: list[Protocol] = []
        self.accepted: dict[int, DeferredQueue] = {}
        self.raw_sockets: list[socket.socket] = []

    def listen(self, make: Callable[[], Protocol] = EchoTarget, interface: str = "127.0.0.1") -> int:
        q: DeferredQueue = DeferredQueue()

        def build() -> Protocol:
            p = make()
            self.protocols.append(p)
            q.put(p)
            return p

        # a deep backlog: 200 simultaneous dials must not overflow the accept queue (an
        # overflow drops the handshake's last ACK and the connection later dies of a reset)
        port = reactor.listenTCP(0, factory_of(build), backlog=1024, interface=interface)
        self.ports.append(port)
        n = port.getHost().port
        self.accepted[n] = q
        return n

    def next_accepted(self, port: int, timeout: float = WAIT) -> defer.Deferred:
        return within(self.accepted[port].get(), timeout)

    def connect(self, address: str | int, make: Callable[[], Protocol] = HalfRecorder,
                **kw: Any) -> defer.Deferred:
        if isinstance(address, int):
            address = f"127.0.0.1:{address}"

        def build() -> Protocol:
            p = make()
            self.protocols.append(p)
            return p

        return within(connectNetConn(self.carrier.target, address, factory_of(build), **kw))

    def refused_port(self) -> int:
        """A port bound but not listening: connects are refused (RST) on loopback."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.raw_sockets.append(s)
        return s.getsockname()[1]

    def blackhole_port(self) -> int:
        """
        A port where connects hang: a listener with backlog 0 that never accepts, its accept
        queue filled by one completed connection.  Linux then drops further SYNs (with
        net.ipv4.tcp_abort_on_overflow = 0, the default) instead of refusing them, so a dial
        sees neither success nor refusal until its own timeout.  Loopback only.
        """
        with open("/proc/sys/net/ipv4/tcp_abort_on_overflow") as f:
            assert f.read().strip() == "0", "tcp_abort_on_overflow must be 0 for the blackhole"
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        port = s.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.raw_sockets += [s, filler]
        # the filler is "connected" once its ACK is sent; until the listener has queued it,
        # a dial's SYN could still take the one place (seen once in a full-suite run)
        deadline = time.monotonic() + WAIT
        while _accept_queue(port) < 1:
            assert time.monotonic() < deadline, "the blackhole's accept queue never filled"
            time.sleep(0.001)
        return port

    async def close(self) -> None:
        for p in self.protocols:
            t = getattr(p, "transport", None)
            if t is not None and getattr(t, "connected", False):
                t.abortConnection()
        for port in self.ports:
            await port.stopListening()
        for s in self.raw_sockets:
            s.close()


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())
