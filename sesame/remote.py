"""
The remote side: a session that dials the hub, registers, and opens a
``Stream`` tunnel whenever the hub asks for one.

:class:`RemoteSession` keeps one control stream up, reconnecting with
exponential backoff and jitter (1 s doubling to 30 s, ±20 %) whenever the
hub goes away, and re-registers what it offers.  gRPC keepalive (20 s ping,
5 s timeout by default, so a dead link is noticed within 25 s; ``keepalive_time`` /
``keepalive_timeout``) notices dead links that TCP would not.  Every ping costs the
hub about 0.13 ms of CPU (docs/PERFORMANCE.md, "Fleet"): 20 s rather than 10 s halves
an idle fleet's cost.

What it offers: a map from endpoint name to a :class:`ServiceRegistry` that
serves ``RemoteControl.NetConn`` for it — the agent's allowlisted dialer
under ``netconn``, or a fixed local target for named endpoints (what a
``sesame:`` server endpoint listens on).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from sesame import _names as N
from sesame.bridge import Bridge, StreamOuter, TunnelConnection, get_bridge
from sesame.core import CANCELLED, Role, SesameCodec, Status
from sesame.netconn import NetConnServicer
from sesame.tunnel import ServiceRegistry, ext_apply, ext_metadata, ext_parse, stream_factory
from sesame.v1alpha1 import tunnel_pb2

log = logging.getLogger("sesame.remote")

KEEPALIVE_TIME = 20.0  # seconds between pings (each costs the hub ~0.13 CPU-ms)
KEEPALIVE_TIMEOUT = 5.0  # seconds without a ping ack before the link counts as dead
#: This process's ``sesame-instance`` (sessions with one value are one remote process).
INSTANCE = secrets.token_hex(8)


def keepalive_options(time: float = KEEPALIVE_TIME,
                      timeout: float = KEEPALIVE_TIMEOUT) -> tuple[tuple[str, int], ...]:
    """gRPC channel options: ping every ``time`` s, give up on the link ``timeout`` s
    after an unanswered ping (so a dead link is noticed within about ``time + timeout``)."""
    if time <= 0 or timeout <= 0:
        raise ValueError("keepalive time and timeout must be positive")
    return (
        ("grpc.keepalive_time_ms", int(time * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
        # any ping (keepalive or grpc's own BDP probe) unanswered this long ends the link:
        # the keepalive ping waits behind an outstanding one, whose default timeout is 60 s
        ("grpc.http2.ping_timeout_ms", int(timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )


KEEPALIVE_OPTIONS = keepalive_options()


class FixedTargetServicer(NetConnServicer):
    """NetConn that always connects to one local address, whatever is asked."""

    def __init__(self, address: str, **kw: Any) -> None:
        super().__init__([address], **kw)
        self.address = address

    def _check(self, dial: Any) -> tuple[Status | None, str, int]:
        host, _, port = self.address.rpartition(":")
        return None, host.strip("[]"), int(port)


def netconn_registry(servicer: NetConnServicer) -> ServiceRegistry:
    """A :class:`~sesame.tunnel.ServiceRegistry` serving only ``servicer``: what an agent
    offers the hub as its ``netconn`` endpoint."""
    reg = ServiceRegistry()
    servicer.add_to(reg)
    return reg


class RemoteSession:
    """
    One registration with the hub (see the module docstring).

    :param target: the hub's gRPC address, ``host:port``.
    :param offers: endpoint name → registry serving it.
    :param keepalive_time, keepalive_timeout: see :func:`keepalive_options`.
    :param reflection: serve gRPC server reflection on every endpoint for the services
        its registry holds (:meth:`ServiceRegistry.add_reflection`; the registries are
        changed); without it the hub's ``Sesame/Proxy`` refuses those endpoints
        (FAILED_PRECONDITION).
    :param explain: a blocking callable run (in a thread) when an attempt fails with
        UNAVAILABLE before registering; a string it returns is the real reason (e.g. "the
        hub requires a client certificate") and is reported as fatal.
    """

    def __init__(
        self,
        target: str,
        remote: str,
        token: str,
        offers: Mapping[str, ServiceRegistry],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        bridge: Bridge | None = None,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
        keepalive_time: float = KEEPALIVE_TIME,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        explain: Callable[[], str | None] | None = None,
        instance: str | None = None,
        reflection: bool = True,
    ) -> None:
        self.namespace, self.name = N.parse_remote(remote)
        self.target = target
        self.token = token
        self.offers = dict(offers)
        if reflection:
            # the hub learns the types of what we serve from us (Sesame/Proxy, sesame call)
            for registry in self.offers.values():
                registry.add_reflection()
        self.credentials = credentials
        # grpc's own reconnect backoff (default: 1 s growing to 120 s) would keep a
        # channel down long after the hub is back; make it follow ours.  (Not
        # grpc.min_reconnect_backoff_ms: that is the connect timeout, 20 s, and a short
        # one fails every TLS handshake of a busy hub.)
        backoff = (("grpc.initial_reconnect_backoff_ms", int(min_backoff * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)))
        self.options = [*keepalive_options(keepalive_time, keepalive_timeout), *backoff, *options]
        self.explain = explain
        #: Sent as ``sesame-instance``: sessions with the same value are one remote process
        #: (homed on several hubs of a cluster); a new value is a new process, which takes
        #: the remote's endpoints over cluster-wide (sesame.hub.cluster).
        self.instance = instance or INSTANCE
        self.bridge = bridge or get_bridge()
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.registered = asyncio.Event()  # created lazily on the loop in run()
        self.registrations = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._streams: set[TunnelConnection] = set()
        self._call: Any = None  # the live control call
        self._stopping = False
        self._handed_over = False
        self.fatal: str | None = None
        #: Called (on the bridge loop) each time the hub accepts the registration.
        self.on_registered: Callable[[RemoteSession], None] | None = None
        #: Called (on the bridge loop) when an attempt ended -- the link was lost after
        #: registering (``registered`` True) or the hub did not register it -- with the wait
        #: and backoff delay the session would retry with.  Returning True hands the remote
        #: over to another hub: this session closes its channel and tunnels and stops (a
        #: later :meth:`astart` resumes it).  How :class:`sesame.endpoints.RemoteSessions`
        #: keeps a remote homed on N of its hubs.
        self.handoff: Callable[[RemoteSession, bool, float, float], bool] | None = None

    @property
    def resource(self) -> str:
        """``namespaces/NS/remotes/NAME``, this remote's resource name."""
        return N.resource_name(self.namespace, self.name)

    def _md(self) -> tuple[tuple[str, str], ...]:
        return ((N.MD_AUTH, f"Bearer {self.token}"),)

    # --- lifecycle (any thread) ------------------------------------------------------

    def start(self) -> RemoteSession:
        """Start registering (and re-registering, with backoff, whenever the control
        stream ends) and return at once.  From any thread but the bridge loop's (it
        waits for the loop); there, use :meth:`astart`.  Returns ``self``."""
        async def go() -> None:
            self.registered = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

        self.bridge.run(go())
        return self

    async def astart(self, wait: float = 0.0, delay: float | None = None) -> None:
        """:meth:`start`, on the bridge loop.  ``wait``: seconds before the first attempt;
        ``delay``: the backoff to start from (default ``min_backoff``) -- a session taking
        over from another hub's carries on with its backoff.  A session stopped
        (:meth:`astop`) stays stopped; one that handed over (:attr:`handoff`) resumes."""
        if self._stopping:
            return
        prev = self._task
        if self._handed_over and prev is not None and not prev.done():
            await asyncio.wait([prev])  # still closing its links after the hand-over
            if self._stopping:
                return
        self._handed_over = False
        self.registered = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(wait, delay))

    def wait_registered(self, timeout: float | None = None) -> bool:
        """Block until the hub has accepted the registration; False if ``timeout``
        seconds pass first (see :attr:`last_error` and :attr:`fatal` for why).  Not on
        the reactor thread or the bridge loop."""
        async def go() -> bool:
            try:
                await asyncio.wait_for(self.registered.wait(), timeout)
                return True
            except TimeoutError:
                return False

        return self.bridge.run(go())

    async def astop(self) -> None:
        """On the bridge loop: stop re-registering, say goodbye to the hub (half-close
        the control stream and wait briefly for the hub to unregister us, so nothing is
        routed here any more), then close every tunnel and the channel."""
        self._stopping = True
        call, task = self._call, self._task
        if call is not None and task is not None and not task.done() and self.registered.is_set():
            # Say goodbye: half-close the control stream and wait (briefly) for the hub to
            # end it, which it does after unregistering, so nothing is routed here any more.
            try:
                await asyncio.wait_for(call.done_writing(), 2)
                await asyncio.wait_for(asyncio.shield(task), 2)
            except Exception:  # noqa: BLE001 - fall back to cancelling
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001
                pass
        await self._close_links()

    async def _close_links(self) -> None:
        """Close every tunnel and the channel (a new one is made on the next attempt)."""
        for conn in list(self._streams):
            await conn.aclose(grace=0)
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def stop(self) -> None:
        """:meth:`astop` from another thread, waiting for it (at most 20 s)."""
        self.bridge.run(self.astop(), 20)

    # --- the control loop (bridge loop) ----------------------------------------------

    def _make_channel(self) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.aio.insecure_channel(self.target, options=self.options)

    async def _run(self, wait: float = 0.0, delay: float | None = None) -> None:
        delay = self.min_backoff if delay is None else delay
        if wait > 0:
            await asyncio.sleep(wait)
        while not self._stopping:
            if self._channel is None:
                self._channel = self._make_channel()
            before = self.registrations
            try:
                await self._control()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                why = None
                if (exc.code() == grpc.StatusCode.UNAVAILABLE and self.explain is not None
                        and self.registrations == before and not self._stopping):
                    try:
                        why = await asyncio.to_thread(self.explain)
                    except Exception:  # noqa: BLE001 - no better reason, then
                        why = None
                if why:
                    if why != self.fatal:
                        log.error("cannot register remote %s: %s", self.resource, why)
                    self.last_error = self.fatal = why
                elif exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED,
                                    grpc.StatusCode.INVALID_ARGUMENT):
                    # credentials will not get better by retrying quickly
                    self.fatal = self.last_error
                    log.error("hub refused remote %s: %s", self.resource, self.last_error)
                else:
                    log.warning("hub link lost (%s)", self.last_error)
            except Exception as exc:  # noqa: BLE001
                self.last_error = repr(exc)
                if not self._stopping:
                    log.warning("hub link failed (%r)", exc)
            self.registered.clear()
            if self._stopping:
                return
            registered = self.registrations > before
            if registered:
                # this attempt registered: the link was healthy and the hub went away
                # later (a restart?), so try again at once -- spread over up to a second
                # so a fleet does not come back in one burst -- then back off afresh
                delay = self.min_backoff
                wait = random.uniform(0, min(1.0, self.min_backoff))
            else:
                wait = delay * random.uniform(0.8, 1.2)
            after = delay if registered else min(delay * 2, self.max_backoff)
            if self.handoff is not None and self.handoff(self, registered, wait, after):
                self._handed_over = True
                await self._close_links()  # another hub takes over, with this backoff
                return
            log.info("reconnecting to the hub in %.1fs", wait)
            await asyncio.sleep(wait)
            delay = after

    async def _control(self) -> None:
        assert self._channel is not None
        md = (*self._md(), (N.MD_ENDPOINTS, ",".join(sorted(self.offers))),
              (N.MD_INSTANCE, self.instance))
        call = self._channel.stream_stream(N.TUNNEL_METHOD)(metadata=md)
        self._call = call
        await call.write(tunnel_pb2.TunnelRequest(
            id=0, connect={"remote": self.resource, "stream_buffer": 256}).SerializeToString())
        write_lock = asyncio.Lock()
        try:
            first = await call.read()
            if first is grpc.aio.EOF:
                await call.code()  # raises the hub's refusal
                return
            if tunnel_pb2.TunnelResponse.FromString(first).WhichOneof("data") != "connect":
                raise ConnectionError("hub answered connect with something else")
            self.registrations += 1
            self.fatal = None
            self.registered.set()
            log.info("registered %s with the hub at %s offering %s", self.resource, self.target,
                     ",".join(sorted(self.offers)))
            if self.on_registered is not None:
                self.on_registered(self)
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    code = await call.code()
                    if code != grpc.StatusCode.OK:
                        raise grpc.aio.AioRpcError(code, None, None, await call.details())
                    raise ConnectionError("hub closed the control stream")
                resp = tunnel_pb2.TunnelResponse.FromString(msg)
                if resp.WhichOneof("data") == "stream":
                    asyncio.get_running_loop().create_task(
                        self._open_stream(call, write_lock, resp.id, resp.stream.endpoint))
        finally:
            call.cancel()

    async def _open_stream(self, control: Any, write_lock: asyncio.Lock, k: int,
                           endpoint: str) -> None:
        error: Status | None = None
        registry = self.offers.get(endpoint)
        conn = None
        if registry is None:
            error = Status(5, f"{self.resource} offers no endpoint {endpoint!r}")
        else:
            try:
                conn = await self._stream_call(k, endpoint, registry)
            except Exception as exc:  # noqa: BLE001
                error = Status(14, f"could not open stream: {exc}")
        reply = tunnel_pb2.TunnelRequest(id=k, stream={})
        if error is not None:
            reply.stream.error.code = error.code
            reply.stream.error.message = error.message
        try:
            async with write_lock:
                await control.write(reply.SerializeToString())
        except Exception:  # noqa: BLE001 - the control stream is going away anyway
            pass
        if conn is not None:
            self._streams.add(conn)
            try:
                await conn.run()
            finally:
                self._streams.discard(conn)

    async def _stream_call(self, k: int, endpoint: str, registry: ServiceRegistry) -> TunnelConnection:
        assert self._channel is not None
        md = (*self._md(), (N.MD_STREAM_ID, str(k)), *ext_metadata(SesameCodec))
        call = self._channel.stream_stream(N.STREAM_METHOD)(metadata=md)
        try:
            return await self._handshake(call, endpoint, registry)
        except BaseException:
            call.cancel()  # whatever went wrong, the call ends here (a no-op once it has)
            raise

    async def _handshake(self, call: Any, endpoint: str, registry: ServiceRegistry) -> TunnelConnection:
        """Answer the hub's connect and dial on ``call`` and start the tunnel over it (the
        tunnel cancels the call when it ends, TunnelConnection)."""
        await call.write(tunnel_pb2.StreamRequest(connect={"remote": self.resource}).SerializeToString())
        for expect in ("connect", "dial"):
            msg = await call.read()
            if msg is grpc.aio.EOF:
                await call.code()
                raise ConnectionError("hub ended the stream during the handshake")
            got = tunnel_pb2.StreamResponse.FromString(msg)
            if got.WhichOneof("data") != expect:
                raise ConnectionError(f"expected {expect} from the hub, got {got.WhichOneof('data')}")
        if got.dial.endpoint != endpoint:
            raise ConnectionError(f"hub dialled {got.dial.endpoint!r}, asked for {endpoint!r}")
        await call.write(tunnel_pb2.StreamRequest(dial={}).SerializeToString())
        outer = StreamOuter(call.read, call.write, tunnel_pb2.StreamResponse, self.target,
                            done_writing=call.done_writing, cancel=call.cancel)
        conn = TunnelConnection(self.bridge, SesameCodec(Role.SERVER), outer, Role.SERVER,
                                on_stream=stream_factory(registry))
        # the hub answered the handshake, so its headers (and window grant) are here
        ext_apply(conn, ext_parse(tuple(await call.initial_metadata() or ())), own=True)
        conn.start()
        return conn


def agent_offers(allow: Sequence[str], *, reactor: Any = None,
                 bridge: Bridge | None = None) -> dict[str, ServiceRegistry]:
    """What ``twistd sesame remote`` offers: NetConn behind ``allow``."""
    return {N.NETCONN_ENDPOINT: netconn_registry(NetConnServicer(allow, reactor=reactor,
                                                                 bridge=bridge))}


__all__ = ["FixedTargetServicer", "RemoteSession", "agent_offers", "netconn_registry", "CANCELLED"]
