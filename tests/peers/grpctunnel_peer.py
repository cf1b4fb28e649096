"""
A grpctunnel-py (PyPI) peer for interop tests, run as a subprocess.

grpctunnel-py registers the ``grpctunnel.v1`` protobuf symbols that our own
codec registers too, so the two cannot share a process.  This script speaks
through JSON lines on stdout; it never imports ``sesame`` beyond the test
service protos (which clash with nothing).

  serve PORT         host grpctunnel.v1.TunnelService; serve Health + TestService
                     on forward tunnels; probe every reverse tunnel that opens
  forward ADDR       open one forward tunnel to ADDR and run the probe calls
  reverse ADDR       serve Health + TestService over a reverse tunnel to ADDR

The probe: Health/Check (known and unknown service, with metadata incl. a
-bin key), TestService/UnaryCall echoing a 300,000-byte payload (bigger
than every flow-control window, so window updates must work both ways),
StreamingOutputCall and a FullDuplexCall ping-pong with messages from 1 B
to 200 KB.
Each result is one JSON line.  serve/reverse exit on stdin EOF.
"""

import argparse
import asyncio
import hashlib
import inspect
import json
import os
import sys
import threading

import grpc
import grpctunnel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpctunnel.proto.v1 import TunnelServiceStub, add_TunnelServiceServicer_to_server

from sesame.testing import interop_pb2, interop_pb2_grpc

BIG = bytes(range(256)) * 1171 + b"tail"  # 299,780 bytes, not a multiple of any chunk


def emit(**kw):
    sys.stdout.write(json.dumps(kw, sort_keys=True) + "\n")
    sys.stdout.flush()


def md_json(md):
    out = {}
    for k, v in md or ():
        out.setdefault(k, []).append(v.hex() if isinstance(v, bytes) else v)
    return out


class Health(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        emit(event="served", method="Check", service=request.service,
             metadata=md_json(context.invocation_metadata()))
        if request.service in ("", "grpc.health.v1.Health"):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), details="unknown service")


class Tests(interop_pb2_grpc.TestServiceServicer):
    async def UnaryCall(self, request, context):
        body = request.payload.body
        emit(event="served", method="UnaryCall", size=len(body),
             sha256=hashlib.sha256(body).hexdigest())
        return interop_pb2.SimpleResponse(payload=interop_pb2.Payload(body=body))

    # grpctunnel-py's own handler shapes for streaming methods: (request, stream, context)
    # for server streaming, (stream, context) for bidi; messages go through the stream.
    async def StreamingOutputCall(self, request, stream, context):
        if isinstance(request, bytes):  # this shape gets the request undecoded
            request = interop_pb2.StreamingOutputCallRequest.FromString(request)
        for p in request.response_parameters:
            await stream.send_message(interop_pb2.StreamingOutputCallResponse(
                payload=interop_pb2.Payload(body=BIG[:p.size])))

    async def FullDuplexCall(self, stream, context):
        while True:
            try:
                req = await stream.recv_message()
            except StopAsyncIteration:
                return
            if isinstance(req, bytes):
                req = interop_pb2.StreamingOutputCallRequest.FromString(req)
            for p in req.response_parameters:
                await stream.send_message(interop_pb2.StreamingOutputCallResponse(
                    payload=interop_pb2.Payload(body=BIG[:p.size])))


STREAM_SIZES = (1, 31_415, 9, 65_536, 200_000)  # bigger than a window, and tiny


async def _called(call):
    # grpctunnel-py's streaming stubs are coroutines that return the call object
    return await call if inspect.isawaitable(call) else call


async def stream_probe(tests, where):
    """Server streaming, then a full-duplex ping-pong (one response per request, in turn)."""
    try:
        it = await _called(tests.StreamingOutputCall(
            interop_pb2.StreamingOutputCallRequest(response_parameters=[
                interop_pb2.ResponseParameters(size=n) for n in STREAM_SIZES]), timeout=20))
        sizes = [len(m.payload.body) async for m in it]
        emit(event=where, method="StreamingOutputCall", code="OK", sizes=sizes)
    except grpc.RpcError as e:
        emit(event=where, method="StreamingOutputCall", code=e.code().name, details=e.details())
    try:
        call = await _called(tests.FullDuplexCall(timeout=20))
        got = []
        for n in STREAM_SIZES:
            await call.write(interop_pb2.StreamingOutputCallRequest(
                response_parameters=[interop_pb2.ResponseParameters(size=n)]))
            got.append(len((await call.read()).payload.body))
        await call.done_writing()
        try:
            end = await call.read()
        except StopAsyncIteration:
            end = None
        emit(event=where, method="FullDuplexCall", code="OK", sizes=got,
             clean_end=end is None or end is grpc.aio.EOF)
    except grpc.RpcError as e:
        emit(event=where, method="FullDuplexCall", code=e.code().name, details=e.details())


async def probe(channel, where):
    health = health_pb2_grpc.HealthStub(channel)
    md = (("x-probe", "1"), ("x-probe-bin", b"\x00\x01\xfe\xff"))
    for svc in ("grpc.health.v1.Health", "missing"):
        try:
            r = await asyncio.wait_for(
                health.Check(health_pb2.HealthCheckRequest(service=svc), metadata=md), 10)
            emit(event=where, method="Check", service=svc, code="OK",
                 status=health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
        except TimeoutError:
            emit(event=where, method="Check", service=svc, code="TIMEOUT")
        except grpc.RpcError as e:
            emit(event=where, method="Check", service=svc, code=e.code().name, details=e.details())
    tests = interop_pb2_grpc.TestServiceStub(channel)
    try:
        r = await asyncio.wait_for(tests.UnaryCall(interop_pb2.SimpleRequest(
            payload=interop_pb2.Payload(body=BIG), response_size=len(BIG))), 20)
        body = r.payload.body
        emit(event=where, method="UnaryCall", code="OK", size=len(body),
             sha256=hashlib.sha256(body).hexdigest())
    except TimeoutError:
        emit(event=where, method="UnaryCall", code="TIMEOUT")
    except grpc.RpcError as e:
        emit(event=where, method="UnaryCall", code=e.code().name, details=e.details())
    await stream_probe(tests, where)
    emit(event=where + "_done")


def services():
    return [Health(), Tests()]


async def wait_for_stdin_eof():
    loop = asyncio.get_running_loop()
    ev = asyncio.Event()

    def read():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:  # noqa: BLE001
            pass
        loop.call_soon_threadsafe(ev.set)

    threading.Thread(target=read, daemon=True).start()
    await ev.wait()


async def serve(args):
    opts = grpctunnel.TunnelServiceHandlerOptions()
    opts.on_reverse_tunnel_open = lambda ch: asyncio.get_running_loop().create_task(
        probe(ch, "reverse_result"))
    handler = grpctunnel.TunnelServiceHandler(opts)
    for s in services():
        handler.register_service(s)
    server = grpc.aio.server()
    add_TunnelServiceServicer_to_server(handler.service(), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.target}")
    await server.start()
    emit(event="listening", port=port)
    await wait_for_stdin_eof()
    await server.stop(0.5)


async def forward(args):
    async with grpc.aio.insecure_channel(args.target) as ch:
        tunnel = await asyncio.wait_for(
            grpctunnel.PendingChannel(TunnelServiceStub(ch), grpctunnel.TunnelOptions()).start(), 10)
        await asyncio.wait_for(tunnel.channel_ready(), 10)
        await probe(tunnel, "forward_result")
        await tunnel.close_async()


async def reverse(args):
    async with grpc.aio.insecure_channel(args.target) as ch:
        rs = grpctunnel.ReverseTunnelServer(TunnelServiceStub(ch), grpctunnel.TunnelOptions())
        for s in services():
            rs.register_service(s)
        task = asyncio.ensure_future(rs.serve())
        stop = asyncio.ensure_future(wait_for_stdin_eof())
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await rs.stop()
        stop.cancel()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["serve", "forward", "reverse"])
    p.add_argument("target")
    args = p.parse_args()
    rc = 0
    try:
        asyncio.run({"serve": serve, "forward": forward, "reverse": reverse}[args.mode](args))
    except Exception as e:  # noqa: BLE001
        emit(event="fatal", error=repr(e))
        rc = 1
    sys.stdout.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
