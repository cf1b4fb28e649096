"""The gRPC interop cases, and bulk/flow-control/failure cases, over real grpcio on 127.0.0.1.

Each case runs on every variant of ``conftest.ALL_VARIANTS``: ``direct`` is plain grpcio and
pins down what a tunnel must reproduce; the four tunnel variants (forward/reverse x
sesame/grpctunnel) must behave the same.  Waits are on events with timeouts, never sleeps.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, struct_pb2
from grpc_status import rpc_status

from sesame.testing import interop_pb2 as pb
from sesame.testing import interop_pb2_grpc as pbg
from sesame.tunnel._channel import SEND_LIMIT
from sesame.tunnel._server import ServiceRegistry
from sesame.tunnel._service import ReverseTunnelServer, TunnelHost, open_tunnel
from tests.conftest import (
    TEST_ID_KEY,
    WAIT,
    Env,
    ExtraServicer,
    extra,
    make_env,
    rich_status,
    wait_until,
)

MiB = 1024 * 1024
MAX_MESSAGE = 4 * MiB  # grpcio's default max receive size and the tunnel core's


class RequestQueue:
    """A blocking request iterator: the test pushes requests, ``close()`` ends the stream."""

    _END = object()

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self._q.put(item)

    def close(self) -> None:
        self._q.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            yield item


def new_id() -> str:
    return uuid.uuid4().hex


def payload(n: int) -> pb.Payload:
    return pb.Payload(body=b"\0" * n)


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------
# The gRPC interop test cases
# --------------------------------------------------------------------------------------------


def test_empty_unary(stub: pbg.TestServiceStub) -> None:
    assert stub.EmptyCall(empty_pb2.Empty(), timeout=WAIT) == empty_pb2.Empty()


def test_large_unary(stub: pbg.TestServiceStub) -> None:
    resp = stub.UnaryCall(pb.SimpleRequest(response_size=314159, payload=payload(271828)),
                          timeout=WAIT)
    assert resp.payload.body == b"\0" * 314159


def test_client_streaming(stub: pbg.TestServiceStub) -> None:
    sizes = (27182, 8, 1828, 45904)
    requests = iter([pb.StreamingInputCallRequest(payload=payload(n)) for n in sizes])
    resp = stub.StreamingInputCall(requests, timeout=WAIT)
    assert resp.aggregated_payload_size == 74922


def test_server_streaming(stub: pbg.TestServiceStub) -> None:
    sizes = (31415, 9, 2653, 58979)
    req = pb.StreamingOutputCallRequest(
        response_parameters=[pb.ResponseParameters(size=n) for n in sizes])
    got = [len(r.payload.body) for r in stub.StreamingOutputCall(req, timeout=WAIT)]
    assert got == list(sizes)


def test_ping_pong(stub: pbg.TestServiceStub) -> None:
    requests = RequestQueue()
    call = stub.FullDuplexCall(iter(requests), timeout=WAIT)
    try:
        for req_size, resp_size in zip((27182, 8, 1828, 45904), (31415, 9, 2653, 58979), strict=True):
            requests.put(pb.StreamingOutputCallRequest(
                response_parameters=[pb.ResponseParameters(size=resp_size)],
                payload=payload(req_size)))
            assert len(next(call).payload.body) == resp_size
    finally:
        requests.close()
    with pytest.raises(StopIteration):
        next(call)
    assert call.code() == grpc.StatusCode.OK


def test_empty_stream(stub: pbg.TestServiceStub) -> None:
    call = stub.FullDuplexCall(iter([]), timeout=WAIT)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_cancel_after_begin(stub: pbg.TestServiceStub) -> None:
    requests = RequestQueue()
    fut = stub.StreamingInputCall.future(iter(requests), timeout=WAIT)
    try:
        assert fut.cancel()
        assert fut.cancelled()
        with pytest.raises(grpc.FutureCancelledError):
            fut.result(timeout=WAIT)
        assert fut.code() == grpc.StatusCode.CANCELLED
    finally:
        requests.close()  # releases the thread pumping the request iterator


def test_cancel_after_first_response(stub: pbg.TestServiceStub) -> None:
    requests = RequestQueue()
    call = stub.FullDuplexCall(iter(requests), timeout=WAIT)
    try:
        requests.put(pb.StreamingOutputCallRequest(
            response_parameters=[pb.ResponseParameters(size=31415)], payload=payload(27182)))
        assert len(next(call).payload.body) == 31415
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert call.code() == grpc.StatusCode.CANCELLED
    finally:
        requests.close()


def test_timeout_on_sleeping_server(env: Env) -> None:
    tid = new_id()
    err = rpc_error(env.stub.UnaryCall, pb.SimpleRequest(sleep_ms=20_000), timeout=0.2,
                    metadata=((TEST_ID_KEY, tid),))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    obs = env.interop.observations.get(tid)
    # the server saw the deadline (propagated as grpc-timeout) and the call ending with it
    assert obs.started.wait(WAIT)
    assert obs.time_remaining is not None and 0 < obs.time_remaining <= 0.25
    assert obs.ended.wait(WAIT), "the handler's call never ended on the server"
    assert wait_until(lambda: obs.active_after is False)


def test_timeout_on_sleeping_server_streaming(stub: pbg.TestServiceStub) -> None:
    requests = RequestQueue()
    call = stub.FullDuplexCall(iter(requests), timeout=0.2)
    try:
        requests.put(pb.StreamingOutputCallRequest(payload=payload(27182)))
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        requests.close()


ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")


def test_custom_metadata_unary(stub: pbg.TestServiceStub) -> None:
    resp, call = stub.UnaryCall.with_call(
        pb.SimpleRequest(response_size=314159, payload=payload(271828)),
        metadata=(ECHO_INITIAL, ECHO_TRAILING), timeout=WAIT)
    assert len(resp.payload.body) == 314159
    assert ECHO_INITIAL in tuple(call.initial_metadata())
    assert ECHO_TRAILING in tuple(call.trailing_metadata())


def test_custom_metadata_full_duplex(stub: pbg.TestServiceStub) -> None:
    req = pb.StreamingOutputCallRequest(
        response_parameters=[pb.ResponseParameters(size=314159)], payload=payload(271828))
    call = stub.FullDuplexCall(iter([req]), metadata=(ECHO_INITIAL, ECHO_TRAILING), timeout=WAIT)
    assert ECHO_INITIAL in tuple(call.initial_metadata())
    assert [len(r.payload.body) for r in call] == [314159]
    assert ECHO_TRAILING in tuple(call.trailing_metadata())


def test_custom_metadata_on_failure(stub: pbg.TestServiceStub) -> None:
    err = rpc_error(stub.UnaryCall, pb.SimpleRequest(response_status=pb.EchoStatus(code=5)),
                    metadata=(ECHO_INITIAL, ECHO_TRAILING), timeout=WAIT)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert ECHO_TRAILING in tuple(err.trailing_metadata())


def test_server_streaming_then_failure(stub: pbg.TestServiceStub) -> None:
    req = pb.StreamingOutputCallRequest(
        response_parameters=[pb.ResponseParameters(size=n) for n in (3, 4)],
        response_status=pb.EchoStatus(code=9, message="after two"))
    call = stub.StreamingOutputCall(req, timeout=WAIT)
    assert [len(next(call).payload.body) for _ in range(2)] == [3, 4]
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION, "after two")


def test_request_iterator_raises(stub: pbg.TestServiceStub) -> None:
    def requests() -> Iterator[pb.StreamingInputCallRequest]:
        yield pb.StreamingInputCallRequest(payload=payload(8))
        raise ValueError("boom")

    err = rpc_error(stub.StreamingInputCall, requests(), timeout=WAIT)
    assert err.code() == grpc.StatusCode.UNKNOWN


def test_call_properties(stub: pbg.TestServiceStub) -> None:
    requests = RequestQueue()
    call = stub.FullDuplexCall(iter(requests), timeout=WAIT)
    try:
        assert call.is_active()
        remaining = call.time_remaining()
        assert remaining is not None and 0 < remaining <= WAIT
        ended = threading.Event()
        assert call.add_callback(ended.set)
        requests.put(pb.StreamingOutputCallRequest(
            response_parameters=[pb.ResponseParameters(size=1)]))
        assert len(next(call).payload.body) == 1
    finally:
        requests.close()
    assert list(call) == []
    assert ended.wait(WAIT)
    assert not call.is_active()
    assert call.code() == grpc.StatusCode.OK and call.details() in ("", None)


def test_status_code_and_message(stub: pbg.TestServiceStub) -> None:
    status = pb.EchoStatus(code=2, message="test status message")
    err = rpc_error(stub.UnaryCall, pb.SimpleRequest(response_status=status), timeout=WAIT)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNKNOWN, "test status message")
    call = stub.FullDuplexCall(iter([pb.StreamingOutputCallRequest(response_status=status)]),
                               timeout=WAIT)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.UNKNOWN, "test status message")


def test_special_status_message(stub: pbg.TestServiceStub) -> None:
    message = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    err = rpc_error(stub.UnaryCall,
                    pb.SimpleRequest(response_status=pb.EchoStatus(code=2, message=message)),
                    timeout=WAIT)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNKNOWN, message)


def test_unimplemented_method(stub: pbg.TestServiceStub) -> None:
    err = rpc_error(stub.UnimplementedCall, empty_pb2.Empty(), timeout=WAIT)
    # the generated base class sets UNIMPLEMENTED, then raises NotImplementedError
    assert (err.code(), err.details()) == (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


def test_unimplemented_service(env: Env) -> None:
    err = rpc_error(pbg.UnimplementedServiceStub(env.channel).UnimplementedCall,
                    empty_pb2.Empty(), timeout=WAIT)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------------------------
# Call APIs and rich status
# --------------------------------------------------------------------------------------------


def test_with_call_and_future(stub: pbg.TestServiceStub) -> None:
    resp, call = stub.UnaryCall.with_call(pb.SimpleRequest(response_size=7), timeout=WAIT)
    assert len(resp.payload.body) == 7
    assert call.code() == grpc.StatusCode.OK
    fut = stub.UnaryCall.future(pb.SimpleRequest(response_size=11), timeout=WAIT)
    done = threading.Event()
    fut.add_done_callback(lambda _f: done.set())
    assert len(fut.result(timeout=WAIT).payload.body) == 11
    assert done.wait(WAIT)
    assert fut.done() and not fut.running() and fut.exception() is None
    bad = stub.UnaryCall.future(pb.SimpleRequest(response_status=pb.EchoStatus(code=9)),
                                timeout=WAIT)
    exc = bad.exception(timeout=WAIT)
    assert isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError):
        bad.result()


def test_rich_status_details(env: Env) -> None:
    err = rpc_error(extra(env.channel, "RichError"), b"", timeout=WAIT)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.details() == "error"
    status = rpc_status.from_call(err)
    assert status is not None
    assert status == rich_status()
    lv, st = struct_pb2.ListValue(), struct_pb2.Struct()
    assert status.details[0].Unpack(lv) and list(lv) == [123, "foo"]
    assert status.details[1].Unpack(st) and dict(st) == {"FOO": 456, "BAR": "bar"}


# --------------------------------------------------------------------------------------------
# Big messages, many streams
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MAX_MESSAGE - 1, MAX_MESSAGE])
def test_max_size_message_both_ways(env: Env, size: int) -> None:
    data = os.urandom(size)
    assert extra(env.channel, "Echo")(data, timeout=WAIT) == data


def test_request_over_max_size(env: Env) -> None:
    err = rpc_error(extra(env.channel, "Echo"), b"\1" * (MAX_MESSAGE + 1), timeout=WAIT)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert extra(env.channel, "Echo")(b"still fine", timeout=WAIT) == b"still fine"


def test_response_over_max_size(env: Env) -> None:
    grow = extra(env.channel, "Grow")
    assert len(grow(str(MAX_MESSAGE).encode(), timeout=WAIT)) == MAX_MESSAGE
    err = rpc_error(grow, str(MAX_MESSAGE + 1).encode(), timeout=WAIT)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert extra(env.channel, "Echo")(b"still fine", timeout=WAIT) == b"still fine"


def test_100_concurrent_streams_of_1mib(env: Env) -> None:
    streams, chunk, chunks = 100, 64 * 1024, 16
    echo = extra(env.channel, "EchoStream", "stream_stream")

    def one(i: int) -> tuple[str, str]:
        seed = hashlib.sha256(i.to_bytes(4, "big")).digest()
        blocks = [(seed * (chunk // len(seed)))[:-1] + bytes([j]) for j in range(chunks)]
        sent = hashlib.sha256(b"".join(blocks)).hexdigest()
        got = hashlib.sha256()
        for msg in echo(iter(blocks), timeout=30):
            got.update(msg)
        return sent, got.hexdigest()

    with futures.ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(one, range(streams), timeout=60))
    assert len(results) == streams
    mismatched = [i for i, (a, b) in enumerate(results) if a != b]
    assert mismatched == []


def test_100_concurrent_unary_futures_of_1mib(env: Env) -> None:
    echo = extra(env.channel, "Echo")
    datas = [hashlib.sha256(bytes([i])).digest() * (MiB // 32) for i in range(100)]
    futs = [echo.future(d, timeout=60) for d in datas]
    got = [hashlib.sha256(f.result(timeout=60)).digest() for f in futs]
    assert got == [hashlib.sha256(d).digest() for d in datas]


# --------------------------------------------------------------------------------------------
# Flow control: a slow consumer holds the producer back
# --------------------------------------------------------------------------------------------


def _served_stream(env: Env, method: str) -> Any:
    for conn in env.serving_connections():
        for h in list(conn.streams.values()):
            if getattr(h, "method", "").endswith(method):
                return conn, h
    return None


@pytest.fixture(params=["64k", "tail"])
def firehose(tunnel_env: Env, request: pytest.FixtureRequest) -> Any:
    """
    A server-streaming call offering several windows' worth, read slowly; returns what it saw.

    ``64k``: 64 KiB messages.  ``tail``: messages one chunk plus 8 bytes long, so each ends in
    a tiny frame (a receiver that credits a message's other frames on arrival would let the
    sender run thousands of messages ahead).
    """
    (sender,) = tunnel_env.serving_connections()
    (receiver,) = tunnel_env.calling_connections()
    size = 64 * 1024 if request.param == "64k" else sender.core.policy.max_chunk + 8
    offered = 3 * (receiver.core.policy.recv_window + SEND_LIMIT + 4 * size)
    return lambda: _slow_read(tunnel_env, max(offered // size, 50), size)


def _slow_read(env: Env, count: int, size: int) -> dict[str, int]:
    tid = new_id()
    call = extra(env.channel, "Firehose", "unary_stream")(
        f"{count},{size}".encode(), timeout=60, metadata=((TEST_ID_KEY, tid),))
    obs = env.extra.observations.get(tid)
    assert obs.started.wait(WAIT)
    found = _served_stream(env, "/Firehose")
    assert found is not None
    conn, served = found

    async def sample() -> tuple[int, int]:
        return conn.core.queued_bytes(served.sid), obs.produced

    def blocked() -> bool:
        with served.cond:
            return served.ended or obs.finished_producing or served.paused or (
                served.unsent > SEND_LIMIT)

    consumed = max_queued = max_ahead = 0
    for msg in call:
        if consumed == 0:
            # give the producer every chance to race ahead: it must end up blocked instead
            assert wait_until(blocked), "the handler never paused for a reader that stopped"
            assert not obs.finished_producing
        consumed += 1
        assert msg == (consumed - 1).to_bytes(4, "big") * (size // 4)
        queued, produced = conn.bridge.run(sample(), WAIT)
        max_queued = max(max_queued, queued)
        max_ahead = max(max_ahead, produced - consumed)
        wait_until(blocked, 1.0)  # let it run until it blocks again before the next read
    (receiver,) = env.calling_connections()
    return {"consumed": consumed, "count": count, "size": size, "max_queued": max_queued,
            "max_ahead": max_ahead, "low_water": conn.core.send_low_water,
            "window": receiver.core.policy.recv_window}


def test_slow_consumer_bounds_sender_queue(firehose: Any) -> None:
    r = firehose()
    assert r["consumed"] == r["count"]
    # What the sending core holds stays within its low-water mark, plus what the handler may
    # hand over before the loop pauses it, plus a message or two in transit.
    assert r["max_queued"] <= r["low_water"] + SEND_LIMIT + 2 * r["size"], r


def test_slow_consumer_pauses_producer(firehose: Any) -> None:
    r = firehose()
    assert r["consumed"] == r["count"]
    # produced - consumed = sender queue + outer stream + receiver buffer: the receive window
    # and a few messages at most, well short of what was offered.
    bound = (r["low_water"] + SEND_LIMIT + 2 * r["size"] + r["window"]) // r["size"] + 4
    assert bound < r["count"]
    assert r["max_ahead"] <= bound, r


# --------------------------------------------------------------------------------------------
# Tunnel loss, many tunnels, threads
# --------------------------------------------------------------------------------------------


def test_tunnel_lost_mid_call_fails_open_calls_unavailable(fresh_env: Env) -> None:
    env = fresh_env
    block = extra(env.channel, "Block")
    tids = [new_id() for _ in range(5)]
    futs = [block.future(b"", timeout=30, metadata=((TEST_ID_KEY, t),)) for t in tids]
    observations = [env.extra.observations.get(t) for t in tids]
    for obs in observations:
        assert obs.started.wait(WAIT)
    env.kill_peer()
    codes = []
    for fut in futs:
        exc = fut.exception(timeout=WAIT)
        assert isinstance(exc, grpc.RpcError)
        codes.append(exc.code())
    assert codes == [grpc.StatusCode.UNAVAILABLE] * len(futs)
    # and the handlers on the far side were told their calls are over
    for obs in observations:
        assert obs.ended.wait(WAIT)
    # the dead tunnel is forgotten; new calls fail at once instead of hanging
    if env.host is not None:
        host = env.host
        assert wait_until(lambda: host.connections == 0 and host.reverse_count() == 0)
    err = rpc_error(block, b"", timeout=WAIT, metadata=((TEST_ID_KEY, new_id()),))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_channel_close_cancels_open_calls(fresh_env: Env) -> None:
    env = fresh_env
    block = extra(env.channel, "Block")
    tids = [new_id() for _ in range(3)]
    futs = [block.future(b"", timeout=30, metadata=((TEST_ID_KEY, t),)) for t in tids]
    observations = [env.extra.observations.get(t) for t in tids]
    for obs in observations:
        assert obs.started.wait(WAIT)
    env.channel.close()
    codes = []
    for fut in futs:
        exc = fut.exception(timeout=WAIT)  # an RpcError: the future itself was not cancelled
        assert isinstance(exc, grpc.RpcError) and not fut.cancelled()
        codes.append(exc.code())
    assert codes == [grpc.StatusCode.CANCELLED] * len(futs)
    with pytest.raises(ValueError):
        block(b"", timeout=WAIT)
    for obs in observations:
        assert obs.ended.wait(WAIT)


def test_many_reverse_tunnels_to_one_host() -> None:
    host = TunnelHost(ServiceRegistry())
    port = host.start("127.0.0.1:0")
    servers: list[ReverseTunnelServer] = []
    try:
        for i in range(20):
            reg = ServiceRegistry()
            reg.add_generic_rpc_handlers((ExtraServicer(f"r{i}").handler(),))
            dialect = "sesame" if i % 2 else "grpctunnel"
            servers.append(ReverseTunnelServer(f"127.0.0.1:{port}", reg, dialect=dialect).start())
        assert host.wait_for_reverse(WAIT, count=20)
        who = extra(host.reverse_channel(), "WhoAmI")
        names = [who(b"", timeout=WAIT).decode() for _ in range(60)]
        assert set(names) == {f"r{i}" for i in range(20)}
        assert all(names.count(f"r{i}") == 3 for i in range(20))  # round-robin
    finally:
        for s in servers:
            s.stop(0.5)
        host.stop(0.5)


def test_many_forward_tunnels_to_one_host() -> None:
    reg = ServiceRegistry()
    reg.add_generic_rpc_handlers((ExtraServicer("host").handler(),))
    host = TunnelHost(reg)
    port = host.start("127.0.0.1:0")
    channels = []
    try:
        for i in range(20):
            channels.append(open_tunnel(f"127.0.0.1:{port}",
                                        dialect="sesame" if i % 2 else "grpctunnel"))
        assert wait_until(lambda: host.connections == 20)
        for i, ch in enumerate(channels):
            assert extra(ch, "Echo")(b"hi %d" % i, timeout=WAIT) == b"hi %d" % i
    finally:
        for ch in channels:
            ch.close()
        host.stop(0.5)


def test_threads_do_not_grow_with_tunnels() -> None:
    env = make_env("forward-sesame")
    host = env.host
    assert host is not None and host._server is not None
    target = f"127.0.0.1:{env.port}"
    try:
        # warm up everything that starts lazily (bridge, handler pool, grpcio threads)
        for _ in range(20):
            assert extra(env.channel, "Echo")(b"w", timeout=WAIT) == b"w"
        baseline = threading.active_count()
        channels = [open_tunnel(target) for _ in range(50)]
        try:
            for ch in channels:
                assert extra(ch, "Echo")(b"x", timeout=WAIT) == b"x"
            during = threading.active_count()
        finally:
            for ch in channels:
                ch.close()
        assert during <= baseline + 4, (baseline, during)
        assert wait_until(lambda: threading.active_count() <= baseline + 4)
    finally:
        env.close()
