#!/usr/bin/env python
"""
grpcio's two I/O engines side by side (sesame._grpcio): a bare grpc.aio bidi stream over
TLS between two processes, no sesame code on the path, once on the EventEngine and once
on iomgr, alternating, ``--rounds`` times.  Per engine: 64-byte round trip p50 and the
server's CPU per round trip; 1 MiB messages client -> server and server -> client, with
MiB/s and each side's CPU per MiB.  Prints JSON (each round, then the medians).

    PYTHONPATH=. python bench/grpc_engines.py [--rounds 3] [--mib 1024] [--n 3000]
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENGINES = ("event-engine", "iomgr")


def _ident(b: bytes) -> bytes:
    return b


def _cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _tls(tmp: str):
    from sesame.hub.tls import ensure_hub_tls

    return ensure_hub_tls(Path(tmp), ["127.0.0.1"])


async def _serve(port: int, tmp: str) -> None:
    import grpc

    async def echo(_it, ctx) -> None:
        while (m := await ctx.read()) is not grpc.aio.EOF:
            await ctx.write(m)

    async def sink(_it, ctx) -> None:
        n = 0
        while (m := await ctx.read()) is not grpc.aio.EOF:
            n += len(m)
        await ctx.write(str(n).encode())

    async def source(_it, ctx) -> None:
        size, total = map(int, (await ctx.read()).split())
        blob = os.urandom(size)
        for _ in range(total // size):
            await ctx.write(blob)

    h = grpc.method_handlers_generic_handler("eng.E", {
        name: grpc.stream_stream_rpc_method_handler(fn, _ident, _ident)
        for name, fn in (("Echo", echo), ("Sink", sink), ("Source", source))})
    s = grpc.aio.server()
    s.add_generic_rpc_handlers((h,))
    s.add_secure_port(f"127.0.0.1:{port}", _tls(tmp).server_credentials())
    await s.start()
    print("ready", flush=True)
    await s.wait_for_termination()


async def _measure(port: int, tmp: str, server: int, n: int, mib: int) -> dict:
    import grpc

    tls = _tls(tmp)
    me = os.getpid()
    out: dict = {}
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                       tls.channel_credentials(tls.ca_pem)) as ch:
        call = ch.stream_stream("/eng.E/Echo", _ident, _ident)()
        msg = b"x" * 64
        for _ in range(200):
            await call.write(msg)
            await call.read()
        lat = []
        s0 = _cpu(server)
        for _ in range(n):
            t = time.perf_counter()
            await call.write(msg)
            await call.read()
            lat.append((time.perf_counter() - t) * 1e6)
        out["rtt_p50_us"] = round(statistics.median(lat))
        out["server_cpu_us_per_rtt"] = round((_cpu(server) - s0) / n * 1e6)
        await call.done_writing()
        size, total = 1 << 20, mib << 20
        blob = os.urandom(size)
        for way in ("up", "down"):
            c0, s0, t0 = _cpu(me), _cpu(server), time.perf_counter()
            if way == "up":
                call = ch.stream_stream("/eng.E/Sink", _ident, _ident)()
                for _ in range(mib):
                    await call.write(blob)
                await call.done_writing()
                assert int(await call.read()) == total
            else:
                call = ch.stream_stream("/eng.E/Source", _ident, _ident)()
                await call.write(f"{size} {total}".encode())
                got = 0
                while got < total:
                    got += len(await call.read())
            dt = time.perf_counter() - t0
            client, srv = (_cpu(me) - c0) / mib * 1e3, (_cpu(server) - s0) / mib * 1e3
            send, recv = (client, srv) if way == "up" else (srv, client)
            out[f"bulk_{way}"] = {"MiBps": round(mib / dt), "sender_ms_per_MiB": round(send, 2),
                                  "receiver_ms_per_MiB": round(recv, 2)}
    return out


def _one(engine: str, n: int, mib: int) -> dict:
    """In a child whose grpc has not been imported: choose, serve, measure."""
    from sesame._grpcio import choose_grpc_io

    os.environ["SESAME_GRPC_IO"] = engine
    chosen = choose_grpc_io()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), tmp],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            res = asyncio.run(_measure(port, tmp, child.pid, n, mib))
        finally:
            child.terminate()
            child.wait(10)
    return {"engine": chosen, **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--n", type=int, default=3000, help="64-byte round trips per round")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve(int(args.serve[0]), args.serve[1]))
        return
    if args.one:
        print(json.dumps(_one(args.one, args.n, args.mib)))
        return
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    env.pop("GRPC_EXPERIMENTS", None)
    rounds: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for _ in range(args.rounds):
        for engine in ENGINES:
            r = subprocess.run([sys.executable, __file__, "--one", engine, "--n", str(args.n),
                                "--mib", str(args.mib)], env=env, capture_output=True,
                               text=True, check=True)
            rounds[engine].append(json.loads(r.stdout))

    def med(engine: str, *path: str) -> float:
        vals = []
        for r in rounds[engine]:
            for k in path:
                r = r[k]
            vals.append(r)
        return statistics.median(vals)

    medians = {e: {
        "rtt_p50_us": med(e, "rtt_p50_us"),
        "server_cpu_us_per_rtt": med(e, "server_cpu_us_per_rtt"),
        **{f"bulk_{w}_{k}": med(e, f"bulk_{w}", k) for w in ("up", "down")
           for k in ("MiBps", "sender_ms_per_MiB", "receiver_ms_per_MiB")}}
        for e in ENGINES}
    print(json.dumps({"bench": "grpc_engines", "utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                      time.gmtime()),
                      "rounds": rounds, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
