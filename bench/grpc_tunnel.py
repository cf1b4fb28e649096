#!/usr/bin/env python
"""
gRPC through our tunnels vs direct grpcio, measured in the same run.

The serving side always runs in a second process (so client and server do
not share a GIL), exposing the same two raw-bytes methods three ways:

* direct:  a plain ``grpc.server`` (thread pool) on 127.0.0.1;
* forward: a :class:`sesame.tunnel.TunnelHost` serving them on forward tunnels;
* reverse: a :class:`sesame.tunnel.ReverseTunnelServer` that dials *our*
  host and serves them back through the reverse tunnel.

Figures: unary round trip p50/p99 (µs, 64-byte messages, sequential),
calls/s with 32 calls in flight, and MiB/s moving 1 MiB request messages.
Prints one JSON document.

    python bench/grpc_tunnel.py [--dialect sesame|grpctunnel] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sesame._grpcio import choose_grpc_io

GRPC_IO = choose_grpc_io()  # the engine the sesame command runs on (SESAME_GRPC_IO)

import grpc  # noqa: E402

from sesame.tunnel import ReverseTunnelServer, ServiceRegistry, TunnelHost, open_tunnel  # noqa: E402

ECHO = "/bench.Bench/Echo"  # returns the request
SINK = "/bench.Bench/Sink"  # returns 8 bytes whatever the request
MIB = 1024 * 1024


async def _aecho(req: bytes, ctx: object) -> bytes:
    return req


async def _asink(req: bytes, ctx: object) -> bytes:
    return b"received"


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, use_async: bool = False) -> None:
        if use_async:  # run on the bridge loop: no hop to a handler thread
            self._h = {
                ECHO: grpc.unary_unary_rpc_method_handler(_aecho),
                SINK: grpc.unary_unary_rpc_method_handler(_asink),
            }
            return
        self._h = {
            ECHO: grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
            SINK: grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"received"),
        }

    def service(self, details):
        return self._h.get(details.method)


def serve(args: argparse.Namespace) -> None:
    """Child process: print the ports, then serve until stdin closes."""
    opts = [("grpc.max_receive_message_length", 8 * MIB),
            ("grpc.max_send_message_length", 8 * MIB)]
    direct = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=opts)
    direct.add_generic_rpc_handlers((_Handlers(),))
    dport = direct.add_insecure_port("127.0.0.1:0")
    direct.start()
    reg = ServiceRegistry()
    reg.add_generic_rpc_handlers((_Handlers(args.async_handlers),))
    host = TunnelHost(reg)
    tport = host.start(options=opts)
    rev = None
    if args.reverse_target:
        rev = ReverseTunnelServer(args.reverse_target, reg, dialect=args.dialect, options=opts)
        rev.start()
    print(json.dumps({"direct": dport, "tunnel": tport}), flush=True)
    sys.stdin.read()
    if rev:
        rev.stop(0)
    host.stop(0)
    direct.stop(0)


def latency(call, n: int) -> dict:
    payload = b"x" * 64
    for _ in range(min(200, n)):
        call(payload)
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call(payload)
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    return {"p50_us": round(statistics.median(samples)), "p99_us": round(samples[int(len(samples) * 0.99)])}


def throughput(callable_, seconds: float, inflight: int = 32) -> float:
    """calls/s with ``inflight`` futures outstanding at all times."""
    payload = b"y" * 64
    done = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    sem = threading.Semaphore(inflight)
    finished = threading.Event()
    outstanding = [0]

    def on_done(f) -> None:
        nonlocal done
        f.result()
        with lock:
            done += 1
            outstanding[0] -= 1
            if outstanding[0] == 0 and time.perf_counter() >= stop:
                finished.set()
        sem.release()

    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        sem.acquire()
        with lock:
            outstanding[0] += 1
        callable_.future(payload).add_done_callback(on_done)
    with lock:
        if outstanding[0] == 0:
            finished.set()
    finished.wait(30)
    return round(done / (time.perf_counter() - t0))


def bulk(call, seconds: float) -> float:
    payload = os.urandom(MIB)
    call(payload)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call(payload)
        n += 1
    return round(n / (time.perf_counter() - t0), 1)


def measure(channel: grpc.Channel, args: argparse.Namespace) -> dict:
    echo = channel.unary_unary(ECHO)
    sink = channel.unary_unary(SINK)
    out = latency(lambda p: echo(p, timeout=30), args.latency_calls)
    out["calls_per_s_32"] = throughput(echo, args.seconds)
    out["bulk_1mib_MiBps"] = bulk(lambda p: sink(p, timeout=30), args.seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dialect", default="sesame", choices=["sesame", "grpctunnel"])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--latency-calls", type=int, default=2000)
    p.add_argument("--async-handlers", action="store_true",
                   help="serve the tunnelled methods with async handlers (no handler thread)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reverse-target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return

    opts = [("grpc.max_receive_message_length", 8 * MIB), ("grpc.max_send_message_length", 8 * MIB)]
    host = TunnelHost(ServiceRegistry())
    hport = host.start(options=opts)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--dialect", args.dialect,
         *(["--async-handlers"] if args.async_handlers else []),
         "--reverse-target", f"127.0.0.1:{hport}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        ports = json.loads(child.stdout.readline())
        if not host.wait_for_reverse(20):
            raise SystemExit("reverse tunnel never came up")
        results = {}
        direct = grpc.insecure_channel(f"127.0.0.1:{ports['direct']}", options=opts)
        grpc.channel_ready_future(direct).result(10)
        results["direct"] = measure(direct, args)
        direct.close()
        fwd = open_tunnel(f"127.0.0.1:{ports['tunnel']}", dialect=args.dialect, options=opts)
        results["forward_tunnel"] = measure(fwd, args)
        fwd.close()
        results["reverse_tunnel"] = measure(host.reverse_channel(), args)
        d = results["direct"]
        for k in ("forward_tunnel", "reverse_tunnel"):
            r = results[k]
            r["p50_vs_direct"] = round(r["p50_us"] / d["p50_us"], 2)
            r["calls_vs_direct"] = round(r["calls_per_s_32"] / d["calls_per_s_32"], 2)
            r["bulk_vs_direct"] = round(r["bulk_1mib_MiBps"] / d["bulk_1mib_MiBps"], 2)
        print(json.dumps({
            "bench": "grpc_tunnel", "grpc_io": GRPC_IO, "dialect": args.dialect, "seconds": args.seconds,
            "tunnel_handlers": "async" if args.async_handlers else "sync",
            "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "grpcio": grpc.__version__, "results": results,
        }, indent=2))
    finally:
        child.stdin.close()
        child.wait(20)
        host.stop(0)


if __name__ == "__main__":
    main()
