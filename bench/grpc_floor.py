#!/usr/bin/env python
"""
The floor under every gRPC leg: a bare ``grpc.aio`` bidi echo (no sesame, no TLS), one
stream, 64-byte ping-pongs, server in a child process.  Prints JSON: RTT p50/p99 and the
server's CPU per round trip by thread (from /proc), next to a direct TCP echo measured in
the same run.

    PYTHONPATH=. python bench/grpc_floor.py [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

METHOD = "/floor.Echo/Echo"


def _ident(b: bytes) -> bytes:
    return b


async def _serve(port: int) -> None:
    import grpc

    async def echo(_it, ctx) -> None:
        while True:
            m = await ctx.read()
            if m is grpc.aio.EOF:
                return
            await ctx.write(m)

    h = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo, _ident, _ident)})
    s = grpc.aio.server()
    s.add_generic_rpc_handlers((h,))
    s.add_insecure_port(f"127.0.0.1:{port}")
    await s.start()
    print("ready", flush=True)
    await s.wait_for_termination()


def _threads(pid: int) -> dict[str, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = "loop" if comm == "python" else comm
        out[role] = out.get(role, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


async def _grpc_rtt(port: int, n: int) -> list[float]:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(METHOD, _ident, _ident)()
        msg = b"x" * 64
        for _ in range(200):
            await call.write(msg)
            await call.read()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            await call.write(msg)
            await call.read()
            lat.append((time.perf_counter() - t) * 1e6)
        await call.done_writing()
        return lat


def _tcp_rtt(n: int) -> list[float]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1',{port}))\n"
        "s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        "while True:\n"
        "    d=s.recv(65536)\n"
        "    if not d: break\n"
        "    s.sendall(d)\n")])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    for i in range(n + 200):
        t = time.perf_counter()
        conn.sendall(b"x" * 64)
        got = 0
        while got < 64:
            got += len(conn.recv(64))
        if i >= 200:
            lat.append((time.perf_counter() - t) * 1e6)
    conn.close()
    child.wait(10)
    srv.close()
    return lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        tcp = _tcp_rtt(args.n)
        before = _threads(child.pid)
        lat = asyncio.run(_grpc_rtt(port, args.n))
        after = _threads(child.pid)
    finally:
        child.terminate()
        child.wait(10)
    per = {k: round((after.get(k, 0) - before.get(k, 0)) / (args.n + 200) * 1e6, 1)
           for k in after if after.get(k, 0) - before.get(k, 0) > 0}
    lat.sort()
    tcp.sort()
    print(json.dumps({
        "bench": "grpc_floor", "round_trips": args.n,
        "direct_tcp": {"p50_us": round(statistics.median(tcp)),
                       "p99_us": round(tcp[int(len(tcp) * 0.99)])},
        "grpc_aio_bidi": {"p50_us": round(statistics.median(lat)),
                          "p99_us": round(lat[int(len(lat) * 0.99)]),
                          "server_cpu_us_per_round_trip": per,
                          "server_cpu_us_total": round(sum(per.values()), 1)},
    }, indent=2))


if __name__ == "__main__":
    main()
