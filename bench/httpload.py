#!/usr/bin/env python
"""
HTTP/1.1 keep-alive load for the front-door figures of ``bench/e2e.py``.

    python bench/httpload.py --serve                       # a Twisted web server; prints {"web": PORT}
    python bench/httpload.py --port P --host web.bench --conns 32 --seconds 3

The load side keeps ``--conns`` connections open, each sending one GET after
another (``Host: --host``) and reading each Content-Length-framed response
whole, for ``--seconds``; it prints one JSON line: requests, requests/s,
latency p50/p99 µs, errors, and how many connections were reopened (a
keep-alive that broke counts there).  It checks every body against the size
the server announced.  The server answers ``/`` with a fixed 1 KiB body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

BODY = b"x" * 1024


def serve() -> None:
    import threading

    from twisted.internet import reactor
    from twisted.web import resource, server

    class Page(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return BODY

    site = server.Site(Page())
    site.log = lambda request: None  # no access log on the hot path
    port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")
    print(json.dumps({"web": port.getHost().port}), flush=True)

    def wait() -> None:
        sys.stdin.read()
        reactor.callFromThread(reactor.stop)

    threading.Thread(target=wait, daemon=True).start()
    reactor.run()


async def _one(port: int, host: str, end: float, lat: list[float], stats: dict) -> None:
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    reader = writer = None
    while time.perf_counter() < end:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            stats["opened"] += 1
        t0 = time.perf_counter()
        try:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":", 1)[1])
            body = await reader.readexactly(n)
            if status != 200 or len(body) != len(BODY):
                stats["errors"] += 1
            lat.append(time.perf_counter() - t0)
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats["errors"] += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def load(port: int, host: str, conns: int, seconds: float) -> dict:
    lat: list[float] = []
    stats = {"errors": 0, "opened": 0}
    t0 = time.perf_counter()
    end = t0 + seconds
    await asyncio.gather(*(_one(port, host, end, lat, stats) for _ in range(conns)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [0] * 99
    return {"requests": len(lat), "rps": round(len(lat) / wall), "p50_us": round(q[49] * 1e6),
            "p99_us": round(q[98] * 1e6), "errors": stats["errors"],
            "reconnects": stats["opened"] - conns, "conns": conns, "seconds": round(wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--host", default="web.bench")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    if a.serve:
        serve()
        return
    print(json.dumps(asyncio.run(load(a.port, a.host, a.conns, a.seconds))), flush=True)


if __name__ == "__main__":
    main()
