#!/usr/bin/env python
"""
A userspace TCP proxy that adds latency without limiting throughput.

Every chunk read from one side is scheduled for delivery to the other side
at ``arrival + delay`` (one-way), in order.  Reading never waits for the
delay: the proxy keeps reading while earlier chunks are still in flight, so
the path behaves like a long fat pipe, not like a small window.  The only
backpressure is a generous per-direction buffer (``--buffer-mib``, 64 MiB by
default): past it the proxy stops reading that side until the buffer drains.

With ``--delay-ms 10`` a round trip through the proxy gains 20 ms.

    python bench/delayproxy.py --delay-ms 10 --forward 127.0.0.1:8000 [--forward ...]

Prints one JSON line, ``{"ports": [...]}`` (one listening port per
``--forward``, in order, on 127.0.0.1), then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections import deque

READ_SIZE = 256 * 1024
SOCK_BUF = 4 * 1024 * 1024


class _Direction:
    """One direction of one proxied connection: read, timestamp, deliver late."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, limit: int) -> None:
        self.loop = loop
        self.delay = delay
        self.limit = limit
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.space = asyncio.Event()
        self.space.set()
        self.ready = asyncio.Event()
        self.eof = False

    async def read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                if self.queued >= self.limit:
                    self.space.clear()
                    await self.space.wait()
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                self.queue.append((self.loop.time() + self.delay, data))
                self.queued += len(data)
                self.ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.ready.set()

    async def write(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                due, data = self.queue[0]
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                writer.write(data)
                self.queued -= len(data)
                if self.queued < self.limit:
                    self.space.set()
                # drain() waits only past the transport's (large) high-water mark
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.space.set()


def _tune(writer: asyncio.StreamWriter, limit: int) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.transport.set_write_buffer_limits(high=limit, low=limit // 2)


async def _pipe(delay: float, limit: int, target: tuple[str, int],
                c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    try:
        u_reader, u_writer = await asyncio.open_connection(*target, limit=READ_SIZE)
    except OSError:
        c_writer.close()
        return
    _tune(c_writer, limit)
    _tune(u_writer, limit)
    up = _Direction(loop, delay, limit)
    down = _Direction(loop, delay, limit)
    tasks = [
        loop.create_task(up.read(c_reader)), loop.create_task(up.write(u_writer)),
        loop.create_task(down.read(u_reader)), loop.create_task(down.write(c_writer)),
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for w in (c_writer, u_writer):
            w.close()


async def serve(delay: float, limit: int, targets: list[tuple[str, int]]) -> None:
    servers = []
    for target in targets:
        def handler(r, w, target=target):
            return _pipe(delay, limit, target, r, w)
        srv = await asyncio.start_server(handler, "127.0.0.1", 0, limit=READ_SIZE, backlog=1024)
        servers.append(srv)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"ports": ports}), flush=True)
    loop = asyncio.get_running_loop()
    # serve until stdin closes (the parent went away or is done with us)
    await loop.run_in_executor(None, sys.stdin.read)
    # Done: leave without cancelling the pipes one by one (nothing to flush).
    sys.stdout.flush()
    os._exit(0)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay per chunk")
    p.add_argument("--buffer-mib", type=int, default=64, help="per-direction buffer before reads stop")
    p.add_argument("--forward", action="append", required=True, metavar="HOST:PORT")
    args = p.parse_args()
    asyncio.run(serve(args.delay_ms / 1000.0, args.buffer_mib * 1024 * 1024,
                      [_hostport(t) for t in args.forward]))


if __name__ == "__main__":
    main()
