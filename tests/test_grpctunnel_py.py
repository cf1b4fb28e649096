"""
Interoperation with the independent PyPI package grpctunnel-py over the
grpctunnel.v1 dialect, in both directions and both tunnel orientations.

grpctunnel-py runs in a subprocess (tests/peers/grpctunnel_peer.py): its
protobuf symbols clash with ours in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sesame.testing import interop_pb2, interop_pb2_grpc
from sesame.tunnel import ReverseTunnelServer, ServiceRegistry, TunnelHost, open_tunnel

PEER = Path(__file__).parent / "peers" / "grpctunnel_peer.py"
BIG = bytes(range(256)) * 1171 + b"tail"
BIG_SHA = hashlib.sha256(BIG).hexdigest()


class Peer:
    """A running grpctunnel-py peer: JSON lines from stdout, with timeouts."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put({"event": "eof"})

    def expect(self, event: str, timeout: float = 20) -> dict:
        while True:
            try:
                msg = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"peer sent no {event!r} within {timeout}s; stderr:\n"
                    + b"".join(self.stderr).decode(errors="replace")[-3000:]) from None
            if msg["event"] in (event, "fatal", "eof"):
                assert msg["event"] == event, (msg, b"".join(self.stderr)[-3000:])
                return msg
            self.seen.append(msg)

    seen: list[dict]

    def collect(self, event: str, until: str, timeout: float = 30) -> list[dict]:
        self.seen = []
        out = []
        while True:
            msg = self.expect_any(timeout)
            if msg["event"] == until:
                return out
            if msg["event"] == event:
                out.append(msg)
            assert msg["event"] not in ("fatal", "eof"), (msg, b"".join(self.stderr)[-3000:])

    def expect_any(self, timeout: float) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("peer went quiet; stderr:\n"
                                 + b"".join(self.stderr).decode(errors="replace")[-3000:]) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class RecordingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.metadata: list[tuple] = []

    def Check(self, request, context):
        self.metadata.append(tuple(context.invocation_metadata()))
        if request.service in ("", "grpc.health.v1.Health"):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")


STREAM_SIZES = [1, 31_415, 9, 65_536, 200_000]


class Echo(interop_pb2_grpc.TestServiceServicer):
    def UnaryCall(self, request, context):
        return interop_pb2.SimpleResponse(payload=request.payload)

    def StreamingOutputCall(self, request, context):
        for p in request.response_parameters:
            yield interop_pb2.StreamingOutputCallResponse(
                payload=interop_pb2.Payload(body=BIG[:p.size]))

    def FullDuplexCall(self, request_iterator, context):
        for req in request_iterator:
            for p in req.response_parameters:
                yield interop_pb2.StreamingOutputCallResponse(
                    payload=interop_pb2.Payload(body=BIG[:p.size]))


def registry() -> tuple[ServiceRegistry, RecordingHealth]:
    reg = ServiceRegistry()
    health = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, reg)
    interop_pb2_grpc.add_TestServiceServicer_to_server(Echo(), reg)
    return reg, health


def check_probe(results: list[dict]) -> None:
    by = {(r["method"], r.get("service")): r for r in results}
    assert by[("Check", "grpc.health.v1.Health")]["code"] == "OK"
    assert by[("Check", "grpc.health.v1.Health")]["status"] == "SERVING"
    assert by[("Check", "missing")]["code"] == "NOT_FOUND"
    assert by[("Check", "missing")]["details"] == "unknown service"
    big = by[("UnaryCall", None)]
    assert big["code"] == "OK" and big["size"] == len(BIG) and big["sha256"] == BIG_SHA
    out = by[("StreamingOutputCall", None)]
    assert out["code"] == "OK" and out["sizes"] == STREAM_SIZES, out
    duplex = by[("FullDuplexCall", None)]
    assert duplex["code"] == "OK" and duplex["sizes"] == STREAM_SIZES and duplex["clean_end"], duplex


def our_probe(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    md = (("x-probe", "1"), ("x-probe-bin", b"\x00\x01\xfe\xff"))
    r = health.Check(health_pb2.HealthCheckRequest(service="grpc.health.v1.Health"),
                     metadata=md, timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="missing"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "unknown service"
    tests = interop_pb2_grpc.TestServiceStub(channel)
    r = tests.UnaryCall(interop_pb2.SimpleRequest(payload=interop_pb2.Payload(body=BIG)), timeout=20)
    assert hashlib.sha256(r.payload.body).hexdigest() == BIG_SHA
    params = [interop_pb2.ResponseParameters(size=n) for n in STREAM_SIZES]
    got = [m.payload.body for m in tests.StreamingOutputCall(
        interop_pb2.StreamingOutputCallRequest(response_parameters=params), timeout=20)]
    assert got == [BIG[:n] for n in STREAM_SIZES]
    # full duplex in lock step: each request is answered before the next is sent
    q: queue.Queue = queue.Queue()
    turns = iter(STREAM_SIZES)

    def requests():
        for n in turns:
            yield interop_pb2.StreamingOutputCallRequest(
                response_parameters=[interop_pb2.ResponseParameters(size=n)])
            q.get(timeout=20)

    sizes = []
    for m in tests.FullDuplexCall(requests(), timeout=20):
        sizes.append(len(m.payload.body))
        q.put(None)
    assert sizes == STREAM_SIZES


def served_metadata(peer: Peer) -> dict:
    msg = peer.expect("served")
    while msg.get("method") != "Check":
        msg = peer.expect("served")
    return msg["metadata"]


def test_their_forward_client_our_host():
    reg, health = registry()
    host = TunnelHost(reg, dialects=("grpctunnel",))
    port = host.start()
    peer = Peer("forward", f"127.0.0.1:{port}")
    try:
        check_probe(peer.collect("forward_result", until="forward_result_done"))
        md = dict(health.metadata[0])
        assert md["x-probe"] == "1"
        assert md["x-probe-bin"] == b"\x00\x01\xfe\xff"
    finally:
        peer.close()
        host.stop(0)


def test_their_reverse_server_our_host():
    host = TunnelHost(ServiceRegistry(), dialects=("grpctunnel",))
    port = host.start()
    peer = Peer("reverse", f"127.0.0.1:{port}")
    try:
        assert host.wait_for_reverse(20), "grpctunnel-py never opened its reverse tunnel"
        our_probe(host.reverse_channel())
        md = served_metadata(peer)
        assert md["x-probe"] == ["1"]
        assert md["x-probe-bin"] == ["0001feff"]
    finally:
        peer.close()
        host.stop(0)


def test_our_forward_client_their_host():
    peer = Peer("serve", "0")
    try:
        port = peer.expect("listening")["port"]
        ch = open_tunnel(f"127.0.0.1:{port}", dialect="grpctunnel")
        try:
            our_probe(ch)
        finally:
            ch.close()
        md = served_metadata(peer)
        assert md["x-probe-bin"] == ["0001feff"]
    finally:
        peer.close()


def test_our_reverse_server_their_host():
    reg, health = registry()
    peer = Peer("serve", "0")
    try:
        port = peer.expect("listening")["port"]
        rs = ReverseTunnelServer(f"127.0.0.1:{port}", reg, dialect="grpctunnel").start()
        try:
            check_probe(peer.collect("reverse_result", until="reverse_result_done"))
            assert dict(health.metadata[0])["x-probe-bin"] == b"\x00\x01\xfe\xff"
        finally:
            rs.stop(0)
    finally:
        peer.close()
