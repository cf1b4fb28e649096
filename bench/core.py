#!/usr/bin/env python
"""
The sans-IO tunnel core on its own: two :class:`TunnelCore`\\ s wired back to
back, no codec, no gRPC, no I/O, so the numbers are the state machine's cost.

Runs each case on the core of the working tree and on a baseline core taken
from git (``sesame/core/_machine.py`` at ``--baseline``, HEAD by default),
alternating the two so that noise hits both alike, and reports the best of
``--repeat`` runs (garbage collection off while timing, as ``timeit`` does).  The baseline module is imported from a temporary copy and
uses the working tree's ``sesame.core._frames`` (the frames did not change).

Cases, for both dialects (``sesame.type``, ``grpctunnel.v1``):

* ``bulk``: one stream, the client sends N messages of one size, the server
  consumes each as it arrives (window updates flow back);
* ``streams``: N calls, each opened, one small request, half-close, one small
  response, close;
* ``interleaved``: 64 streams at once, each sending 4 KiB messages round-robin.

Prints one JSON document; ``ratio`` is new time / baseline time (below 1 is
faster).

    python bench/core.py [--repeat 9] [--baseline HEAD] [--scale 1.0] [--only streams]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from sesame.core import _machine as current  # noqa: E402
from sesame.core._frames import Status  # noqa: E402


def load_baseline(rev: str) -> ModuleType:
    """Import ``sesame/core/_machine.py`` as of ``rev`` under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:sesame/core/_machine.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="sesame-bench-")) / "baseline_machine.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_machine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def pair(m: ModuleType, dialect: str) -> tuple:
    policy, strict = (
        (m.SESAME_FLOW, False) if dialect == "sesame" else (m.GRPCTUNNEL_FLOW, True)
    )
    client = m.TunnelCore(m.Role.CLIENT, policy, strict_ids=strict)
    server = m.TunnelCore(m.Role.SERVER, policy, strict_ids=strict)
    return client, server


def pump(m: ModuleType, client, server, on_server, on_client) -> None:
    """Move frames both ways until both cores are quiet; hand events on."""
    while True:
        moved = False
        out = client.data_to_send()
        if out:
            moved = True
            for ev in server.receive_frames(out):
                on_server(ev)
        for ev in server.take_events():
            on_server(ev)
        out = server.data_to_send()
        if out:
            moved = True
            for ev in client.receive_frames(out):
                on_client(ev)
        for ev in client.take_events():
            on_client(ev)
        if not moved:
            return


def bulk(m: ModuleType, dialect: str, size: int, count: int) -> None:
    client, server = pair(m, dialect)
    got = 0
    MessageReceived = m.MessageReceived

    def on_server(ev) -> None:
        nonlocal got
        if type(ev) is MessageReceived:
            got += 1
            server.consumed(ev.stream_id, ev.cost)

    sid = client.open_stream("/bench.Svc/Bulk")
    payload = b"b" * size
    for _ in range(count):
        client.send_message(sid, payload)
        pump(m, client, server, on_server, lambda ev: None)
    assert got == count, (got, count)


def streams(m: ModuleType, dialect: str, count: int) -> None:
    client, server = pair(m, dialect)
    MessageReceived, StreamEnded = m.MessageReceived, m.StreamEnded
    RequestsEnded = m.RequestsEnded
    ended = 0

    def on_server(ev) -> None:
        t = type(ev)
        if t is MessageReceived:
            server.consumed(ev.stream_id, ev.cost)
        elif t is RequestsEnded:
            server.send_message(ev.stream_id, b"response")
            server.close_stream(ev.stream_id, Status())

    def on_client(ev) -> None:
        nonlocal ended
        t = type(ev)
        if t is MessageReceived:
            client.consumed(ev.stream_id, ev.cost)
        elif t is StreamEnded:
            ended += 1

    for _ in range(count):
        sid = client.open_stream("/bench.Svc/Unary")
        client.send_message(sid, b"request")
        client.half_close(sid)
        pump(m, client, server, on_server, on_client)
    assert ended == count and not client.stream_ids() and not server.stream_ids()


def interleaved(m: ModuleType, dialect: str, nstreams: int, rounds: int) -> None:
    client, server = pair(m, dialect)
    MessageReceived = m.MessageReceived
    got = 0

    def on_server(ev) -> None:
        nonlocal got
        if type(ev) is MessageReceived:
            got += 1
            server.consumed(ev.stream_id, ev.cost)

    sids = [client.open_stream("/bench.Svc/Stream") for _ in range(nstreams)]
    payload = b"i" * 4096
    for _ in range(rounds):
        for sid in sids:
            client.send_message(sid, payload)
        pump(m, client, server, on_server, lambda ev: None)
    assert got == nstreams * rounds


def cases(scale: float) -> list[tuple[str, object]]:
    def n(x: int) -> int:
        return max(1, int(x * scale))

    out: list[tuple[str, object]] = []
    for dialect in ("sesame", "grpctunnel"):
        for size, count in ((64, 20000), (4096, 10000), (65536, 1000), (1 << 20, 64)):
            out.append((
                f"{dialect}/bulk {size} B x {n(count)}",
                lambda m, d=dialect, s=size, c=n(count): bulk(m, d, s, c),
            ))
        out.append((
            f"{dialect}/streams x {n(5000)} (open, 1 req, half-close, 1 resp, close)",
            lambda m, d=dialect, c=n(5000): streams(m, d, c),
        ))
        out.append((
            f"{dialect}/interleaved 64 streams x {n(100)} rounds of 4 KiB",
            lambda m, d=dialect, r=n(100): interleaved(m, d, 64, r),
        ))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--baseline", default="HEAD", help="git revision of the baseline core")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every count")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline)
    results = []
    for name, run in cases(args.scale):
        if args.only not in name:
            continue
        best = {"baseline": float("inf"), "current": float("inf")}
        for _ in range(args.repeat):
            for label, m in (("baseline", baseline), ("current", current)):
                gc.collect()
                gc.disable()  # as timeit does: a collection lands on whichever run is unlucky
                try:
                    t0 = time.perf_counter()
                    run(m)  # type: ignore[operator]
                    best[label] = min(best[label], time.perf_counter() - t0)
                finally:
                    gc.enable()
        results.append({
            "case": name,
            "baseline_s": round(best["baseline"], 4),
            "current_s": round(best["current"], 4),
            "ratio": round(best["current"] / best["baseline"], 3),
        })
    print(json.dumps({
        "baseline": args.baseline,
        "repeat": args.repeat,
        "python": sys.version.split()[0],
        "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
