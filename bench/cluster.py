#!/usr/bin/env python
"""
A cluster of hubs on one Redis (docs/CLUSTER.md), measured against itself in the same run.

Processes, all real: a throw-away ``redis-server`` (sesame.testing.redis, AOF in a temp
dir); hubs ``python -m sesame hub --store redis://... --listen tcp:0:interface=127.0.0.1
--data-dir D_i`` (the cluster CA in the store: one ca.pem for all); remotes ``python -m
sesame remote``; the targets of ``bench/netconn.py --serve targets`` (sink, source, echo);
this process: the client (the ``sesame:`` endpoint on its reactor, or plain TCP to a port
map) and the measurements of bench/netconn.py.

1. **relay** -- hubs A and B, remote ``edge-1`` on B.  Bulk upload/download (MiB/s,
   sha256-checked) and 64-byte RTT p50/p99 straight to the target (``direct``), through
   B (``same_hub``: client -> B -> remote) and through A (``cross_hub``: client -> A
   -Peer/Stream-> B -> remote).  Paths interleaved within each round; medians of
   ``--repeat`` rounds.  Goal: cross_hub bulk >= 0.8x same_hub.
2. **workers** -- ``sesame hub --workers 1`` vs ``--workers 2`` (one port, SO_REUSEPORT),
   each with a ``tcp`` port map to the echo target and the remote homed on every worker
   (``--hub`` per worker's own port: each worker serves its connections locally);
   ``--batches`` rounds of ``--conns`` concurrent connections each echoing 1 MiB
   (sha256-checked): aggregate MiB/s (both directions).  Goal: 2 workers >= 1.6x 1 worker (this box has 2 cores, shared
   with the remote, the targets and this client: see the CPU split).
3. **registration** -- ``--remotes`` RemoteSessions (each its own TLS connection) from
   ``--procs`` children of bench/fleet.py, spread evenly over 3 hubs: seconds until all
   are registered, and until hub A's ``Admin/ListSessions`` (the whole cluster) counts
   them all.

Prints one JSON object; exit status 1 on any failed check.

    PYTHONPATH=. python bench/cluster.py [--seconds 3] [--mib 256] [--rtt-calls 2000]
        [--repeat 3] [--conns 16] [--batches 16] [--remotes 10000] [--procs 3]
        [--skip relay,workers,registration]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


nc = _load("bench_netconn", "netconn.py")
e2e = _load("bench_e2e", "e2e.py")
MIB = nc.MIB


class Cluster:
    """Redis, hubs and remotes as child processes in one temp dir."""

    def __init__(self, keep: bool = False) -> None:
        from sesame.testing.redis import RedisServer

        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="sesame-cluster-bench-"))
        self.redis = RedisServer(self.dir / "redis")
        self.base_url = self.redis.url
        self.url = self.base_url
        (self.dir / "namer").mkdir()
        (self.dir / "namer" / "sitecustomize.py").write_text(e2e.THREAD_NAMER)
        self.env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONPATH": os.pathsep.join(
            [str(self.dir / "namer"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.procs: dict[str, subprocess.Popen] = {}
        self.store = None
        self.cluster("relay")

    def cluster(self, name: str) -> None:
        """From here on, hubs join cluster ``name`` (its own key prefix in the one Redis):
        every hub of a cluster serves every front-door route, so sections stay apart."""
        from sesame.hub import open_store_url

        if self.store is not None:
            self.store.close()
        self.url = f"{self.base_url}?prefix={name}:"
        self.store = open_store_url(self.url)
        self.client_token = self.store.create_token("client", pattern="*")[1]

    def log(self, name: str) -> str:
        try:
            return (self.dir / f"{name}.log").read_text()
        except OSError:
            return ""

    def spawn(self, name: str, *argv: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "sesame", *argv], env=self.env,
                             stdin=subprocess.DEVNULL, stdout=open(self.dir / f"{name}.out", "w"),
                             stderr=open(self.dir / f"{name}.log", "w"))
        self.procs[name] = p
        return p

    def wait_log(self, name: str, pattern: str, timeout: float = 60) -> re.Match:
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log(name))
            if m:
                return m
            p = self.procs[name]
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{name}: no {pattern!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.05)

    def hub(self, name: str, *extra: str) -> int:
        port_file = self.dir / f"{name}.port"
        self.spawn(name, "hub", "--store", self.url, "--listen", "tcp:0:interface=127.0.0.1",
                   "--data-dir", str(self.dir / name), "--port-file", str(port_file), *extra)
        self.wait_log(name, r"joined the cluster")
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            time.sleep(0.05)
        return int(port_file.read_text())

    def ca(self, hub: str) -> Path:
        return self.dir / hub / "ca.pem"

    def remote(self, name: str, remote: str, hubs: list[int], ca: Path) -> None:
        token_file = self.dir / f"{name}.token"
        token_file.write_text(self.store.create_token("remote", remote=remote)[1] + "\n")
        argv = ["remote", "--name", remote, "--token-file", str(token_file), "--ca", str(ca),
                "--allow", "127.0.0.1:*"]
        for port in hubs:
            argv += ["--hub", f"127.0.0.1:{port}"]
        self.spawn(name, *argv)
        for port in hubs:
            self.wait_log(name, rf"registered \S+ with the hub at 127\.0\.0\.1:{port}")

    def endpoint(self, hub_port: int, ca: Path, remote: str, target: int) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

        return (f"sesame:remote={remote}:host=127.0.0.1:port={target}:hub=127.0.0.1\\:{hub_port}"
                f":ca={esc(str(ca))}:token={esc(self.client_token)}")

    def stop(self, name: str) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        return p.returncode

    def close(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)
        self.store.close()
        self.redis.stop()
        if self.keep:
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rtt-calls", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--batches", type=int, default=16,
                   help="workers: rounds of --conns concurrent 1 MiB echoes")
    p.add_argument("--remotes", type=int, default=10000)
    p.add_argument("--procs", type=int, default=3)
    p.add_argument("--write-size", type=int, default=64 * 1024,
                   help="bytes per transport.write when uploading")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--skip", default="", help="comma-separated: relay, workers, registration")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    report: dict = {"args": vars(args), "load_before": e2e._load()}
    failures: list[str] = []
    cl = Cluster(args.keep)
    tchild, targets = nc._spawn([sys.executable, str(HERE / "netconn.py"), "--serve", "targets"])
    bench = nc.Bench(reactor, args)
    cpu = e2e.ProcCPU()

    async def relay() -> dict:
        a, b = cl.hub("hub-a"), cl.hub("hub-b")
        cl.remote("remote-1", "edge-1", [b], cl.ca("hub-b"))
        for name in ("hub-a", "hub-b", "remote-1"):
            cpu.add(name, cl.procs[name].pid)
        paths = {
            "direct": {k: bench.direct(targets[k]) for k in ("sink", "source", "echo")},
            "same_hub": {k: clientFromString(reactor, cl.endpoint(b, cl.ca("hub-b"), "edge-1",
                                                                  targets[k])).connect
                         for k in ("sink", "source", "echo")},
            "cross_hub": {k: clientFromString(reactor, cl.endpoint(a, cl.ca("hub-a"), "edge-1",
                                                                   targets[k])).connect
                          for k in ("sink", "source", "echo")},
        }
        steps = {
            "upload": lambda label, c: bench.upload(label, c["sink"], args.seconds, args.mib),
            "download": lambda label, c: bench.download(label, c["source"], args.seconds, args.mib),
            "rtt_64B": lambda label, c: bench.rtt(label, c["echo"], args.rtt_calls),
        }
        for path in ("same_hub", "cross_hub"):  # channels and TLS up before the figures
            await bench.bounded(f"{path} warm-up", bench.rtt("warm-up", paths[path]["echo"], 20), 60)
        runs: dict = {pth: {s: [] for s in steps} for pth in paths}
        for rnd in range(args.repeat):
            for step, fn in steps.items():
                for path, conn in paths.items():
                    label = f"{path} (round {rnd + 1})"
                    before = cpu.snapshot()
                    r = await bench.bounded(f"{label}: {step}", fn(label, conn), 3 * args.seconds + 60)
                    r["cpu_s"] = cpu.delta(before, cpu.snapshot())
                    runs[path][step].append(r)
                    print(f"  {label} {step}: {json.dumps({k: v for k, v in r.items() if k != 'cpu_s'})}",
                          file=sys.stderr, flush=True)
        res = {pth: {s: nc._median_run(rs) for s, rs in per.items()} for pth, per in runs.items()}

        def fig(path, step, key):
            r = res[path][step]
            return r.get(key) if r.get("ok", True) else None

        res["ratios"] = {
            "cross_vs_same_upload": _ratio(fig("cross_hub", "upload", "MiBps"),
                                           fig("same_hub", "upload", "MiBps")),
            "cross_vs_same_download": _ratio(fig("cross_hub", "download", "MiBps"),
                                             fig("same_hub", "download", "MiBps")),
            "cross_minus_same_rtt_p50_us": (fig("cross_hub", "rtt_64B", "p50_us") or 0)
            - (fig("same_hub", "rtt_64B", "p50_us") or 0),
            "same_vs_direct_download": _ratio(fig("same_hub", "download", "MiBps"),
                                              fig("direct", "download", "MiBps")),
        }
        for path, per in res.items():
            if path != "ratios" and not all(r.get("ok", True) for r in per.values()):
                failures.append(f"relay: a {path} figure failed")
        for name in ("remote-1", "hub-a", "hub-b"):
            cl.stop(name)
        return res

    async def workers() -> dict:
        out: dict = {}
        stacks = {}
        for n in (1, 2):
            name = f"workers-{n}"
            cl.cluster(name)
            if n == 1:  # a lone hub process (what --workers 1 runs)
                hubs = [cl.hub(name)]
                pids = [cl.procs[name].pid]
            else:
                cl.spawn(name, "hub", "--workers", str(n), "--store", cl.url, "--listen",
                         "tcp:0:interface=127.0.0.1", "--data-dir", str(cl.dir / name))
                m = cl.wait_log(name, rf"{n} workers listening on 127\.0\.0\.1:(\d+) "
                                      r"\(pids ([\d, ]+)\)")
                pids = [int(x) for x in m.group(2).split(", ")]
                hubs = [int(x) for x in re.findall(r"peers reach it at 127\.0\.0\.1:(\d+)",
                                                   cl.log(name))]
            remote = f"wedge-{n}"
            cl.remote(f"remote-w{n}", remote, hubs, cl.ca(name))
            door = nc._free_port()
            cl.store.create_route("tcp", str(door), f"127.0.0.1:{targets['echo']}@{remote}")
            nc._wait_port(door, 30)
            stacks[n] = (door, pids)
            for i, pid in enumerate(pids):
                cpu.add(f"{name} worker {i}", pid)
            cpu.add(f"remote-w{n}", cl.procs[f"remote-w{n}"].pid)
        runs: dict = {1: [], 2: []}
        for rnd in range(args.repeat):
            for n, (door, _) in stacks.items():
                label = f"{n} worker(s) (round {rnd + 1})"
                before = cpu.snapshot()
                t0 = time.perf_counter()
                ok = True
                for b in range(args.batches):  # each connection echoes 1 MiB (sha256-checked)
                    r = await bench.bounded(f"{label} batch {b + 1}", bench.concurrent(
                        label, bench.direct(door), args.conns, MIB), 300)
                    ok = ok and r.get("ok", True)
                secs = time.perf_counter() - t0
                r = {"connections": args.conns, "batches": args.batches, "seconds": round(secs, 3),
                     "MiBps": round(2 * args.conns * args.batches / secs, 1), "ok": ok,
                     "cpu_s": cpu.delta(before, cpu.snapshot())}
                runs[n].append(r)
                print(f"  {label}: {json.dumps({k: v for k, v in r.items() if k != 'cpu_s'})}",
                      file=sys.stderr, flush=True)
        for n in (1, 2):
            out[f"workers_{n}"] = nc._median_run(runs[n])
            if not all(r.get("ok", True) for r in runs[n]):
                failures.append(f"workers: a {n}-worker run failed")
        out["two_vs_one"] = _ratio(out["workers_2"].get("MiBps"), out["workers_1"].get("MiBps"))
        for n in (1, 2):
            cl.stop(f"remote-w{n}")
            cl.stop(f"workers-{n}")
        return out

    def registration() -> dict:
        import grpc

        from sesame.admin.v1alpha1 import admin_pb2, admin_pb2_grpc

        cl.cluster("registration")
        ports = [cl.hub(f"reg-{i}") for i in range(3)]
        n, k = args.remotes, args.procs
        t = time.monotonic()
        tokens = [cl.store.create_token("remote", remote=f"fleet-{i:05d}")[1] for i in range(n)]
        out: dict = {"remotes": n, "hubs": 3, "tokens_s": round(time.monotonic() - t, 2)}
        children, counts = [], [0] * k
        seen_errors: dict[str, int] = {}  # the children's unregistered sessions' last errors
        cond = threading.Condition()
        reg_cpu = e2e.ProcCPU()
        for i in range(3):
            reg_cpu.add(f"hub reg-{i}", cl.procs[f"reg-{i}"].pid)
        reg_cpu.add("redis-server", cl.redis.pid, main="process")
        before = reg_cpu.snapshot()
        t0 = time.monotonic()
        for c in range(k):
            idx = range(c * n // k, (c + 1) * n // k)
            spec = {"target": f"127.0.0.1:{ports[c % 3]}", "ca": str(cl.ca("reg-0")),
                    "allow": "127.0.0.1:9", "keepalive": None,
                    "remotes": [[f"fleet-{i:05d}", tokens[i]] for i in idx]}
            path = cl.dir / f"fleet.{c}.json"
            path.write_text(json.dumps(spec))
            ch = subprocess.Popen([sys.executable, str(HERE / "fleet.py"), "--child", str(path)],
                                  env=cl.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(cl.dir / f"fleet.{c}.log", "w"), text=True, bufsize=1)
            children.append(ch)
            reg_cpu.add(f"fleet child {c}", ch.pid, main="process")

            def read(c=c, ch=ch) -> None:
                for line in ch.stdout:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "registered" in msg:
                        with cond:
                            counts[c] = msg["registered"]
                            for why, k in (msg.get("errors") or {}).items():
                                seen_errors[why] = max(seen_errors.get(why, 0), k)
                            cond.notify_all()

            threading.Thread(target=read, daemon=True).start()
        if os.environ.get("SESAME_BENCH_PROFILE"):  # py-spy on hub reg-0 while they register
            subprocess.Popen(["py-spy", "record", "-p", str(cl.procs["reg-0"].pid), "-d", "25",
                              "-r", "50", "--format", "raw", "-o",
                              os.environ["SESAME_BENCH_PROFILE"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with cond:
            ok = cond.wait_for(lambda: sum(counts) >= n, timeout=600)
        out["all_registered_s"] = round(time.monotonic() - t0, 2)
        out["cpu_s"] = reg_cpu.delta(before, reg_cpu.snapshot())
        out["child_errors_seen"] = dict(sorted(seen_errors.items(), key=lambda kv: -kv[1])[:5])
        if not ok:
            failures.append(f"registration: {sum(counts)} of {n} registered")
        # the cluster-wide listing on hub A
        admin = cl.store.create_token("admin")[1]
        creds = grpc.ssl_channel_credentials(cl.ca("reg-0").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{ports[0]}", creds) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            md = (("authorization", f"Bearer {admin}"),)
            deadline = time.monotonic() + 60
            while True:
                total, token, pages = 0, "", 0
                t1 = time.monotonic()
                while True:
                    resp = stub.ListSessions(admin_pb2.ListSessionsRequest(
                        parent="namespaces/-/remotes/-", page_size=1000, page_token=token),
                        metadata=md, timeout=60)
                    total += len(resp.sessions)
                    pages += 1
                    token = resp.next_page_token
                    if not token:
                        break
                if total >= n or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        out["cluster_listing"] = {"sessions": total, "pages": pages,
                                  "seconds": round(time.monotonic() - t1, 3),
                                  "all_visible_on_hub_a_s": round(time.monotonic() - t0, 2)}
        if total < n:
            failures.append(f"registration: hub A lists {total} of {n} sessions")
        for ch in children:
            ch.stdin.close()
        for ch in children:
            ch.wait(60)
        for i in range(3):
            cl.stop(f"reg-{i}")
        return out

    async def run() -> None:
        try:
            if "relay" not in skip:
                report["relay"] = await relay()
            if "workers" not in skip:
                report["workers"] = await workers()
            if "registration" not in skip:
                from twisted.internet import threads

                report["registration"] = await threads.deferToThread(registration)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            if reactor.running:
                reactor.stop()

    from twisted.internet import defer

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    try:
        reactor.run()
    finally:
        tchild.stdin.close()
        cl.close()
    report["load_after"] = e2e._load()
    report["failures"] = failures
    print(json.dumps(report, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
