"""Shared fixtures: real grpcio servers and channels on 127.0.0.1, direct or through tunnels.

Every interop variant serves the same two services:

* ``sesame.testing.TestService`` (:class:`ObservedInteropServicer`, the interop servicer plus
  a record of what the server side saw), and
* ``sesame.test.Extra`` (:class:`ExtraServicer`), raw-bytes methods for the bulk, blocking,
  flow-control and rich-status tests.

Variants (``Env.name``): ``direct`` (plain ``grpc.server`` + ``grpc.insecure_channel``: the
baseline that keeps the expectations honest), and ``{forward,reverse}-{sesame,grpctunnel}``.
Forward: the client opens a tunnel to a :class:`TunnelHost` serving the services.  Reverse: a
:class:`ReverseTunnelServer` serves them and the client is ``host.reverse_channel()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from sesame.bridge._connection import TunnelConnection
from sesame.testing import interop_pb2_grpc
from sesame.testing.interop import InteropServicer
from sesame.tunnel._server import ServiceRegistry
from sesame.tunnel._service import ReverseTunnelServer, TunnelHost, open_tunnel

TUNNEL_VARIANTS = ("forward-sesame", "forward-grpctunnel", "reverse-sesame", "reverse-grpctunnel")
ALL_VARIANTS = ("direct", *TUNNEL_VARIANTS)

EXTRA_SERVICE = "sesame.test.Extra"
TEST_ID_KEY = "x-test-id"
WAIT = 10.0  # generous upper bound for anything that should happen "promptly"


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, interval: float = 0.002) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tagged_id(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == TEST_ID_KEY:
            return value
    return None


@dataclass
class Observation:
    """What the server side saw of one call (looked up by the ``x-test-id`` header)."""

    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    time_remaining: float | None = None
    active_after: bool | None = None
    produced: int = 0  # Firehose: messages the handler has yielded so far
    finished_producing: bool = False


class Observations:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Observation] = {}

    def get(self, tid: str) -> Observation:
        with self._lock:
            return self._by_id.setdefault(tid, Observation())

    def watch(self, context: grpc.ServicerContext) -> Observation | None:
        """Start observing the current call if it carries a test id."""
        tid = tagged_id(context)
        if tid is None:
            return None
        obs = self.get(tid)
        obs.time_remaining = context.time_remaining()
        if not context.add_callback(obs.ended.set):
            obs.ended.set()
        obs.started.set()
        return obs


class ObservedInteropServicer(InteropServicer):
    """The interop servicer, recording deadlines and call ends of calls with a test id."""

    def __init__(self) -> None:
        self.observations = Observations()

    def UnaryCall(self, request: Any, context: grpc.ServicerContext) -> Any:
        obs = self.observations.watch(context)
        try:
            return super().UnaryCall(request, context)
        finally:
            if obs is not None:
                obs.active_after = context.is_active()


def rich_status() -> status_pb2.Status:
    """ALREADY_EXISTS with two ``Any`` details, as grpchantesting's failure cases use."""
    lv = struct_pb2.ListValue()
    lv.extend([123, "foo"])
    st = struct_pb2.Struct()
    st.update({"FOO": 456, "BAR": "bar"})
    details = []
    for msg in (lv, st):
        a = any_pb2.Any()
        a.Pack(msg)
        details.append(a)
    return status_pb2.Status(code=grpc.StatusCode.ALREADY_EXISTS.value[0], message="error",
                             details=details)


class ExtraServicer:
    """Raw-bytes methods of ``sesame.test.Extra`` (identity serializers)."""

    def __init__(self, name: str = "extra") -> None:
        self.name = name
        self.observations = Observations()

    def Echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def EchoStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def Grow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The response is ``int(request)`` bytes."""
        return b"\x5a" * int(request)

    def WhoAmI(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self.name.encode()

    def RichError(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(rpc_status.to_status(rich_status()))
        raise AssertionError("abort returned")  # pragma: no cover

    def Block(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Wait until the call ends (cancel, deadline, tunnel loss); never answers by itself."""
        obs = self.observations.watch(context)
        assert obs is not None, "Block needs a test id"
        obs.ended.wait(60)
        obs.active_after = context.is_active()
        return b""

    def Firehose(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``count,size``: yield ``count`` messages of ``size`` bytes, counting as it goes."""
        obs = self.observations.watch(context)
        assert obs is not None, "Firehose needs a test id"
        count, size = (int(x) for x in request.split(b","))
        for i in range(count):
            obs.produced += 1
            yield i.to_bytes(4, "big") * (size // 4)
        obs.finished_producing = True

    def handler(self) -> grpc.GenericRpcHandler:
        uu, ss, us = (grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler,
                      grpc.unary_stream_rpc_method_handler)
        return grpc.method_handlers_generic_handler(EXTRA_SERVICE, {
            "Echo": uu(self.Echo),
            "EchoStream": ss(self.EchoStream),
            "Grow": uu(self.Grow),
            "WhoAmI": uu(self.WhoAmI),
            "RichError": uu(self.RichError),
            "Block": uu(self.Block),
            "Firehose": us(self.Firehose),
        })


def extra(channel: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    """A raw-bytes multi-callable for ``sesame.test.Extra/<method>``."""
    return getattr(channel, kind)(f"/{EXTRA_SERVICE}/{method}")


def serve_all(server: Any, interop: InteropServicer, extra_servicer: ExtraServicer) -> None:
    interop_pb2_grpc.add_TestServiceServicer_to_server(interop, server)
    server.add_generic_rpc_handlers((extra_servicer.handler(),))


@dataclass
class Env:
    """One variant, up and running: call through ``channel``/``stub``."""

    name: str
    channel: grpc.Channel
    interop: ObservedInteropServicer
    extra: ExtraServicer
    host: TunnelHost | None = None
    reverse: ReverseTunnelServer | None = None
    server: grpc.Server | None = None
    port: int = 0  # the network server's port (the host's, or the direct server's)
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def stub(self) -> interop_pb2_grpc.TestServiceStub:
        return interop_pb2_grpc.TestServiceStub(self.channel)

    @property
    def direction(self) -> str:
        return self.name.split("-")[0]

    def serving_connections(self) -> list[TunnelConnection]:
        """The tunnel connections on the side that runs the handlers."""
        if self.name.startswith("forward"):
            assert self.host is not None
            return list(self.host._conns)
        if self.name.startswith("reverse"):
            assert self.reverse is not None and self.reverse.connection is not None
            return [self.reverse.connection]
        return []

    def calling_connections(self) -> list[TunnelConnection]:
        """The tunnel connections on the side that makes the calls."""
        if self.name.startswith("forward"):
            return [self.channel.connection]  # type: ignore[attr-defined]
        if self.name.startswith("reverse"):
            assert self.host is not None
            return list(self.host._conns)
        return []

    def kill_peer(self) -> None:
        """The far end of the client's calls goes away abruptly (no drain, no goodbye)."""
        if self.name == "direct":
            assert self.server is not None
            self.server.stop(None)
        elif self.name.startswith("forward"):
            assert self.host is not None and self.host._server is not None
            self.host.bridge.run(self.host._server.stop(None), WAIT)
        else:
            rts = self.reverse
            assert rts is not None and rts._outer is not None
            rts.bridge.run(rts._outer.close(), WAIT)

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:  # noqa: BLE001 - teardown of an env a test already broke
                pass
        self.closers.clear()


def make_env(name: str) -> Env:
    interop = ObservedInteropServicer()
    extra_servicer = ExtraServicer(name)
    if name == "direct":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        serve_all(server, interop, extra_servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        env = Env(name, channel, interop, extra_servicer, server=server, port=port)
        env.closers += [lambda: server.stop(None).wait(WAIT), channel.close]
        return env
    direction, dialect = name.split("-")
    registry = ServiceRegistry()
    serve_all(registry, interop, extra_servicer)
    if direction == "forward":
        host = TunnelHost(registry)
        port = host.start("127.0.0.1:0")
        env = Env(name, None, interop, extra_servicer, host=host, port=port)  # type: ignore[arg-type]
        env.closers.append(lambda: host.stop(0.5))
        env.channel = open_tunnel(f"127.0.0.1:{port}", dialect=dialect)
        env.closers.append(env.channel.close)
        # a first call makes sure the host side of the tunnel is up too
        assert extra(env.channel, "Echo")(b"up", timeout=WAIT) == b"up"
        assert host.connections == 1
        return env
    host = TunnelHost(ServiceRegistry())
    port = host.start("127.0.0.1:0")
    env = Env(name, host.reverse_channel(), interop, extra_servicer, host=host, port=port)
    env.closers.append(lambda: host.stop(0.5))
    rts = ReverseTunnelServer(f"127.0.0.1:{port}", registry, dialect=dialect).start()
    env.reverse = rts
    env.closers.append(lambda: rts.stop(0.5))
    assert host.wait_for_reverse(WAIT), "reverse tunnel never came up"
    return env


@pytest.fixture(scope="module", params=ALL_VARIANTS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Every variant, shared by the tests of a module (tests must leave it usable)."""
    e = make_env(request.param)
    yield e
    e.close()


@pytest.fixture(scope="module", params=TUNNEL_VARIANTS)
def tunnel_env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """The tunnel variants only (for tests that look inside the tunnel core)."""
    e = make_env(request.param)
    yield e
    e.close()


@pytest.fixture(params=ALL_VARIANTS)
def fresh_env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """A variant of the test's own, for tests that break it."""
    e = make_env(request.param)
    yield e
    e.close()


@pytest.fixture
def stub(env: Env) -> interop_pb2_grpc.TestServiceStub:
    return env.stub


def _thread_kinds() -> dict[str, int]:
    """Live threads by name with the counter taken out ("Thread-12 (_run)" -> "Thread (_run)"),
    so that a failure says which kind stayed behind, not the first few names."""
    import collections
    import re

    return dict(collections.Counter(re.sub(r"[-_]?\d+", "", t.name) for t in threading.enumerate()))


@pytest.fixture(scope="module", autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """After a module, no request-pump threads are left and the thread count is bounded."""
    before = threading.active_count()
    yield
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("sesame-requests-")],
        WAIT,
    ), [t.name for t in threading.enumerate()]
    # The bridge loop, the bounded handler pool (16) and grpcio's own few threads may have
    # started during the module; nothing else may stay behind.
    assert wait_until(lambda: threading.active_count() <= before + 16 + 1 + 8, WAIT), (
        before, threading.active_count(), _thread_kinds())


# --- real processes (the end-to-end tests) ----------------------------------------------------


@pytest.fixture
def procs():
    """Child processes (tests.e2e_support.Procs), all stopped at the end of the test."""
    from tests.e2e_support import Procs

    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture
def target():
    """The sink/source/echo TCP server of tests.e2e_support, on 127.0.0.1."""
    from tests.e2e_support import TargetServer

    t = TargetServer()
    yield t
    t.close()


# --- Redis (the Redis store and the cluster) --------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A throw-away redis-server (sesame.testing.redis.RedisServer) for the module, on a
    free 127.0.0.1 port with its AOF in a temporary directory; stopped by PID at the end.
    Skips only when redis-server is not installed."""
    from sesame.testing.redis import RedisServer, redis_server_path

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
