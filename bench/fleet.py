#!/usr/bin/env python
"""
A fleet against one hub: N real ``RemoteSession``s, each on its own TLS
connection, spread over K child processes, against one real
``python -m sesame hub`` (or, with ``--server bare``, a bare grpc.aio server that
only answers the registration, for grpc's share of the cost).

Processes, all real:

* ``python -m sesame hub --listen tcp:0:interface=127.0.0.1 --port-file F
  --data-dir D`` (TLS generated on first start: D/ca.pem); tokens made with the
  store (``SQLiteStore(D/hub.db).create_token``, what ``sesame token create`` does):
  one remote token per remote, one client token, one admin token;
* K children (``bench/fleet.py --child SPEC``), each raising RLIMIT_NOFILE and
  running its N/K ``sesame.remote.RemoteSession``s on its one bridge loop, each
  session with its own channel and ``("grpc.use_local_subchannel_pool", 1)`` so
  every session is its own TCP+TLS connection (grpc would otherwise share one
  connection per target), offering ``netconn`` behind ``--allow 127.0.0.1:ECHO``;
* this process: an echo server and the client of the dials, on its Twisted reactor
  (``clientFromString(reactor, "sesame:remote=fleet-00042:host=127.0.0.1:port=E:hub=...")``).

Measured (one JSON object on stdout): hub RSS (VmRSS) before and after
registration and per remote, its smaps split by allocator (heuristic, see
``smaps_split``), hub threads at idle and the most seen while registering
(sampled every 100 ms), hub open fds, the time until all N are registered,
hub (and children) CPU % of a core over an idle window (per thread by name; the
window starts one keepalive interval after the last registration, so every remote
pings in it), ``sesame remotes --json`` (admin token) time and output size, and
random dials through the hub (p50/p99 ms).  ``--restart``: kill -9 the hub, start
it again on the same port and data dir, and time until all N are registered
again.  Exit status 1 on any failed check.  Figures and findings:
docs/PERFORMANCE.md, "Fleet".

    PYTHONPATH=. python bench/fleet.py [--remotes 2000] [--procs 4] [--restart]
                                       [--dials 20] [--keepalive S]

Experiments (not the product): ``--server bare``, ``--no-tls``, ``--server-opt
KEY=INT`` (patched into grpc.aio.server in the server process),
``--malloc-arena-max N``; the server also runs malloc_trim(0) on SIGUSR1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402  (bench/e2e.py: the thread namer, shared)

TICK = os.sysconf("SC_CLK_TCK")

# Python 3.11 does not name its OS threads; as sitecustomize of the server, this names
# each threading.Thread's OS thread after it (the bridge loop: "sesame-grpc-loop"), so the
# per-thread CPU tells the loop from grpc core's threads (which name themselves).
THREAD_NAMER = e2e.THREAD_NAMER + r'''
import ctypes

# SIGUSR1: glibc malloc_trim(0), so the bench can tell memory grpc and Python still use
# from memory freed but kept by malloc (the server's "rss after malloc_trim")
import signal as _signal
def _trim(*_):
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:
        pass
try:
    _signal.signal(_signal.SIGUSR1, _trim)
except Exception:
    pass

# --server-opt (an experiment, not the product): extra grpc server options, as if
# sesame.hub.Hub.start passed them
import json as _json, os as _os
_extra = _json.loads(_os.environ.get("SESAME_FLEET_SERVER_OPTS") or "[]")
if _extra:
    import grpc.aio as _aio
    _server = _aio.server
    def server(*a, options=None, _server=_server, **kw):
        return _server(*a, options=[*(options or ()), *map(tuple, _extra)], **kw)
    _aio.server = server
'''
NAME = "fleet-{:05d}"

# the server options of sesame.hub.Hub.start (the bare server copies them)
HUB_SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
)


# --- /proc ---------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads from /proc/PID/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def proc_threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def proc_cpu(pid: int) -> float | None:
    """utime + stime of the process (all threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat, all but idle+iowait)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:9]]
    return (sum(cpu) - cpu[3] - cpu[4]) / TICK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (comm, utime + stime seconds) for every thread of the process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def thread_cpu_delta(a: dict, b: dict, span: float) -> dict[str, float]:
    """CPU % of a core per thread name between two :func:`thread_cpu` snapshots."""
    out: Counter = Counter()
    for tid, (comm, t) in b.items():
        out[comm] += t - a.get(tid, (comm, 0.0))[1]
    return {k: round(100 * v / span, 2) for k, v in out.most_common() if v > 0}


def smaps_split(pid: int) -> dict[str, int]:
    """RSS (KiB) of the process by what most likely allocated it, from /proc/PID/smaps.

    A heuristic, by the shape of each mapping:

    * ``python_arenas``: anonymous rw mappings of exactly 1 MiB (CPython 3.11's
      obmalloc arenas, which hold every Python object of 512 bytes or less);
    * ``malloc_thread_arenas``: anonymous rw mappings followed by a ---p reservation
      that together make 64 MiB (glibc's per-thread malloc heaps; grpc core's
      allocations, OpenSSL's, and Python's larger objects land here or in [heap]);
    * ``malloc_main_heap``: ``[heap]`` (glibc's main arena, brk);
    * ``thread_stacks``: anonymous rw mappings right after a 4 KiB ---p guard page;
    * ``other_anon``: other anonymous memory (large mallocs of 128 KiB or more, ...);
    * ``files``: file-backed (code, data of libraries, the SQLite file).
    """
    maps: list[dict] = []
    try:
        with open(f"/proc/{pid}/smaps") as f:
            cur: dict | None = None
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = {"size": (hi - lo) // 1024, "perms": head[1],
                           "path": head[5].strip() if len(head) > 5 else "", "rss": 0}
                    maps.append(cur)
                elif head[0] == "Rss:" and cur is not None:
                    cur["rss"] = int(head[1])
    except OSError:
        return {}
    out = Counter()
    for i, m in enumerate(maps):
        if not m["rss"]:
            continue
        path = m["path"]
        nxt = maps[i + 1] if i + 1 < len(maps) else None
        prev = maps[i - 1] if i else None
        if path == "[heap]":
            kind = "malloc_main_heap"
        elif path.startswith("["):
            kind = "other_anon" if path != "[stack]" else "thread_stacks"
        elif path:
            kind = "files"
        elif m["size"] == 1024 and m["perms"].startswith("rw"):
            kind = "python_arenas"
        elif (nxt is not None and not nxt["path"] and nxt["perms"].startswith("---")
              and m["size"] + nxt["size"] == 65536) or m["size"] == 65536:
            kind = "malloc_thread_arenas"
        elif prev is not None and not prev["path"] and prev["perms"].startswith("---") \
                and prev["size"] == 4:
            kind = "thread_stacks"
        else:
            kind = "other_anon"
        out[kind] += m["rss"]
    return dict(sorted(out.items()))


def snapshot(pid: int, smaps: bool = True) -> dict:
    st = proc_status(pid)
    names = Counter(comm for comm, _ in thread_cpu(pid).values())
    out = {"rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM"),
           "threads": proc_threads(pid), "threads_by_name": dict(sorted(names.items())),
           "fds": proc_fds(pid)}
    if smaps:
        out["smaps_kib"] = smaps_split(pid)
    return out


def pct(sorted_vals: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    return sorted_vals[max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)]


class Sampler(threading.Thread):
    """Every ``every`` s: the server's thread count and RSS, kept with a timestamp."""

    def __init__(self, pid_of, every: float = 0.1) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid_of = pid_of
        self.every = every
        self.samples: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            pid = self.pid_of()
            if pid is None:
                continue
            n = proc_threads(pid)
            rss = proc_status(pid).get("VmRSS")
            if n is not None and rss is not None:
                self.samples.append((time.monotonic(), n, rss))

    def window(self, t0: float, t1: float | None = None) -> dict:
        s = [x for x in self.samples if x[0] >= t0 and (t1 is None or x[0] <= t1)]
        if not s:
            return {}
        return {"samples": len(s), "threads_max": max(x[1] for x in s),
                "threads_min": min(x[1] for x in s), "rss_max_kib": max(x[2] for x in s)}


# --- the children ----------------------------------------------------------------------------


def child_main(spec_path: str) -> None:
    """N/K RemoteSessions on this process's bridge loop; status lines (JSON) on stdout
    whenever the counts change; ``mark`` on stdin remembers each session's registration
    count (re-registrations are counted from it); EOF on stdin ends the process."""
    from sesame import _limits

    limits = _limits.raise_open_file_limit()
    spec = json.loads(Path(spec_path).read_text())
    import grpc
    from twisted.internet import reactor

    from sesame.bridge import get_bridge
    from sesame.remote import RemoteSession, agent_offers

    bridge = get_bridge()
    creds = (grpc.ssl_channel_credentials(root_certificates=Path(spec["ca"]).read_bytes())
             if spec["ca"] else None)
    offers = agent_offers([spec["allow"]], reactor=reactor, bridge=bridge)
    kw = {}
    if spec.get("keepalive"):
        kw["keepalive_time"] = spec["keepalive"]
    sessions = [RemoteSession(spec["target"], name, token, offers, credentials=creds,
                              options=[("grpc.use_local_subchannel_pool", 1)], bridge=bridge, **kw)
                for name, token in spec["remotes"]]
    base = [0] * len(sessions)

    def emit(**kv) -> None:
        sys.stdout.write(json.dumps({"t": time.time(), **kv}) + "\n")
        sys.stdout.flush()

    def counts() -> dict:
        reg = rereg = fatal = 0
        errors: Counter = Counter()
        for i, s in enumerate(sessions):
            if s.registered.is_set():
                reg += 1
                if s.registrations > base[i]:
                    rereg += 1
            else:
                if s.fatal:
                    fatal += 1
                if s.last_error:
                    errors[s.last_error[:120]] += 1
        return {"registered": reg, "reregistered": rereg, "fatal": fatal,
                "errors": dict(errors.most_common(3))}

    async def run() -> None:
        for s in sessions:
            await s.astart()
        emit(started=len(sessions), nofile=list(limits))
        last = None
        while True:
            now = counts()
            state = (now["registered"], now["reregistered"], now["fatal"])
            if state != last:
                last = state
                emit(**now)
            await asyncio.sleep(0.1)

    def mark() -> None:
        for i, s in enumerate(sessions):
            base[i] = s.registrations
        emit(marked=True, **counts())  # reregistered is 0 from here

    def stdin_reader() -> None:
        for line in sys.stdin:
            if line.strip() == "mark":
                bridge.post(mark)
        os._exit(0)  # the parent is done (or gone): no goodbyes for thousands of sessions

    threading.Thread(target=stdin_reader, name="stdin", daemon=True).start()
    bridge.submit(run())
    reactor.run()


# --- the bare server (--server bare) ----------------------------------------------------------


def bare_main(data_dir: str, port_file: str, port: int, tls: bool = True) -> None:
    """A grpc.aio server on the bridge loop with the hub's TLS and server options that only
    answers a remote's registration (``connect``) and then holds the control stream: what
    grpc (and one asyncio handler per call) costs, without the hub's own objects."""
    from sesame import _limits

    _limits.raise_open_file_limit()
    import grpc

    from sesame import _names as N
    from sesame.bridge import get_bridge
    from sesame.hub.tls import ensure_hub_tls
    from sesame.v1alpha1 import tunnel_pb2

    creds = ensure_hub_tls(Path(data_dir), ["127.0.0.1"]).server_credentials() if tls else None

    async def tunnel(request_iterator, context) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        req = tunnel_pb2.TunnelRequest.FromString(first)
        await context.write(tunnel_pb2.TunnelResponse(id=req.id, connect={}).SerializeToString())
        while await context.read() is not grpc.aio.EOF:
            pass

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method == N.TUNNEL_METHOD:
                return grpc.stream_stream_rpc_method_handler(tunnel)
            return None

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server(options=list(HUB_SERVER_OPTIONS))
        server.add_generic_rpc_handlers((Handler(),))
        bound = (server.add_secure_port(f"127.0.0.1:{port}", creds) if creds
                 else server.add_insecure_port(f"127.0.0.1:{port}"))
        await server.start()
        Path(port_file).write_text(f"{bound}\n")
        return server

    bridge = get_bridge()
    server = bridge.run(start())  # keep the reference: a collected grpc.aio.Server stops
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while server is not None:
        time.sleep(3600)


# --- the parent --------------------------------------------------------------------------------


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="sesame-fleet-bench-"))
        self.data = self.dir / "data"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("GRPC_VERBOSITY", "ERROR")
        (self.dir / "namer").mkdir()
        (self.dir / "namer" / "sitecustomize.py").write_text(THREAD_NAMER)
        self.server_env = dict(self.env)
        self.server_env["PYTHONPATH"] = os.pathsep.join([str(self.dir / "namer"), self.env["PYTHONPATH"]])
        if args.server_opt:
            self.server_env["SESAME_FLEET_SERVER_OPTS"] = json.dumps(args.server_opt)
        if args.malloc_arena_max:
            self.server_env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
        self.server: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.children: list[subprocess.Popen] = []
        self.status: list[dict] = []
        self.events: list[list[dict]] = []
        self.changed = threading.Condition()
        self.client_token = ""
        self.admin_token_file = self.dir / "admin.token"
        self.failures: list[str] = []

    # the server
    def start_server(self) -> float:
        """Start the hub (or bare server) on ``self.port`` (0: any); seconds until it listens."""
        self.starts += 1
        port_file = self.dir / f"port.{self.starts}"
        out = open(self.dir / f"server.{self.starts}.log", "w")
        if self.args.server == "hub":
            argv = [sys.executable, "-m", "sesame", "hub", "--listen",
                    f"tcp:{self.port}:interface=127.0.0.1", "--port-file", str(port_file),
                    "--data-dir", str(self.data), *(["--no-tls"] if self.args.no_tls else [])]
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(self.data),
                    "--port-file", str(port_file), "--port", str(self.port),
                    *(["--no-tls"] if self.args.no_tls else [])]
        t0 = time.monotonic()
        self.server = subprocess.Popen(argv, env=self.server_env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT)
        end = t0 + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.server.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server did not start: {self.log(self.starts)[-2000:]}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return time.monotonic() - t0

    def log(self, n: int) -> str:
        try:
            return (self.dir / f"server.{n}.log").read_text()
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None and self.server.poll() is None else None

    def make_tokens(self) -> list[str]:
        n = self.args.remotes
        if self.args.server != "hub":
            return ["-"] * n
        from sesame.hub.store import SQLiteStore

        store = SQLiteStore(self.data / "hub.db")
        tokens = [store.create_token("remote", remote=NAME.format(i))[1] for i in range(n)]
        self.client_token = store.create_token("client", pattern="fleet-*")[1]
        self.admin_token_file.write_text(store.create_token("admin")[1] + "\n")
        return tokens

    # the children
    def spawn_children(self, tokens: list[str], echo_port: int) -> None:
        n, k = self.args.remotes, self.args.procs
        for c in range(k):
            idx = range(c * n // k, (c + 1) * n // k)
            spec = {"target": f"127.0.0.1:{self.port}",
                    "ca": "" if self.args.no_tls else str(self.data / "ca.pem"),
                    "allow": f"127.0.0.1:{echo_port}", "keepalive": self.args.keepalive,
                    "remotes": [[NAME.format(i), tokens[i]] for i in idx]}
            path = self.dir / f"child.{c}.json"
            path.write_text(json.dumps(spec))
            self.status.append({"n": len(idx), "registered": 0, "reregistered": 0, "fatal": 0})
            self.events.append([])
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                                 env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(self.dir / f"child.{c}.log", "w"), text=True, bufsize=1)
            self.children.append(p)
            threading.Thread(target=self._read_child, args=(c, p), daemon=True).start()

    def _read_child(self, c: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            msg["mono"] = time.monotonic()
            with self.changed:
                self.status[c].update({k: v for k, v in msg.items() if k != "t"})
                self.events[c].append(msg)
                self.changed.notify_all()
        with self.changed:
            self.status[c]["exited"] = True
            self.changed.notify_all()

    def total(self, key: str) -> int:
        return sum(s.get(key, 0) for s in self.status)

    def wait_all(self, key: str, timeout: float) -> float | None:
        """Wait until every remote counts as ``key``; monotonic time it happened, or None."""
        end = time.monotonic() + timeout
        with self.changed:
            while self.total(key) < self.args.remotes:
                if any(s.get("exited") for s in self.status):
                    return None
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 1.0))
            return max(ev["mono"] for evs in self.events for ev in evs if key in ev)

    def first(self, key: str, after: float) -> float | None:
        ts = [ev["mono"] for evs in self.events for ev in evs
              if ev.get(key, 0) > 0 and ev["mono"] >= after]
        return min(ts) if ts else None

    def errors(self) -> dict:
        out: Counter = Counter()
        for s in self.status:
            for k, v in (s.get("errors") or {}).items():
                out[k] += v
        return dict(out.most_common(5))

    def send(self, line: str) -> None:
        for p in self.children:
            try:
                p.stdin.write(line + "\n")
                p.stdin.flush()
            except OSError:
                pass

    def children_cpu(self) -> float:
        return sum(proc_cpu(p.pid) or 0.0 for p in self.children)

    def stop(self) -> dict:
        out = {}
        for p in self.children:
            try:
                p.stdin.close()
            except OSError:
                pass
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
                out["server_killed"] = True
            out["server_exit"] = self.server.returncode
        for p in self.children:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        notable = [ln for ln in self.log(self.starts).splitlines()
                   if any(w in ln for w in ("#error", "#critical", "Traceback"))]
        if notable:
            out["server_log_errors"] = notable[:10]
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            out["dir"] = str(self.dir)
        return out

    def endpoint_string(self, remote: str, port: int) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

        return (f"sesame:remote={remote}:host=127.0.0.1:port={port}:hub=127.0.0.1\\:{self.port}"
                + (":tls=no" if self.args.no_tls else f":ca={esc(str(self.data / 'ca.pem'))}")
                + f":token={esc(self.client_token)}")


def _echo_and_dial(reactor):
    """The echo server and a dial through the hub, both on ``reactor`` (call from its thread)."""
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import clientFromString

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Ping(protocol.Protocol):
        def __init__(self, done: defer.Deferred, t0: float, times: dict) -> None:
            self.done, self.t0, self.times, self.got = done, t0, times, b""

        def connectionMade(self) -> None:
            self.times["connect_ms"] = (time.perf_counter() - self.t0) * 1000
            self.transport.write(b"x" * 64)

        def dataReceived(self, data: bytes) -> None:
            self.got += data
            if len(self.got) >= 64 and not self.done.called:
                self.times["echo_ms"] = (time.perf_counter() - self.t0) * 1000
                self.transport.loseConnection()
                self.done.callback(self.times)

        def connectionLost(self, reason) -> None:
            if not self.done.called:
                self.done.errback(reason)

    def listen() -> int:
        f = protocol.Factory.forProtocol(Echo)
        return reactor.listenTCP(0, f, interface="127.0.0.1").getHost().port

    def dial(endpoint: str, timeout: float) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        t0 = time.perf_counter()
        times: dict = {}

        class F(protocol.Factory):
            def buildProtocol(self, addr):
                return Ping(done, t0, times)

        d = clientFromString(reactor, endpoint).connect(F())
        d.addErrback(lambda f: done.called or done.errback(f))
        done.addTimeout(timeout, reactor)
        return done

    return listen, dial


def orchestrate(fleet: Fleet, report: dict, reactor) -> None:
    from twisted.internet.threads import blockingCallFromThread

    args = fleet.args
    n = args.remotes
    listen, dial = _echo_and_dial(reactor)
    echo_port = blockingCallFromThread(reactor, listen)

    report["server_start_s"] = round(fleet.start_server(), 2)
    sampler = Sampler(lambda: fleet.pid)
    sampler.start()
    t = time.monotonic()
    tokens = fleet.make_tokens()
    report["tokens_s"] = round(time.monotonic() - t, 2)
    time.sleep(1.0)
    before = snapshot(fleet.pid)
    hub: dict = {"before": before}
    report["hub"] = hub
    if args.idle_empty_seconds > 0:
        # the server's own idle cost with no remote: the baseline of the idle figure
        e0, tc0, te0 = proc_cpu(fleet.pid), thread_cpu(fleet.pid), time.monotonic()
        time.sleep(args.idle_empty_seconds)
        span = time.monotonic() - te0
        report["idle_empty"] = {"seconds": round(span, 1),
                                "server_cpu_pct": round(100 * (proc_cpu(fleet.pid) - e0) / span, 2),
                                "server_threads_cpu_pct": thread_cpu_delta(tc0, thread_cpu(fleet.pid), span)}

    # registration storm
    cpu0, tc0, m0 = proc_cpu(fleet.pid), thread_cpu(fleet.pid), machine_busy()
    t0 = time.monotonic()
    fleet.spawn_children(tokens, echo_port)
    print(f"fleet: {n} remotes in {args.procs} processes, registering", file=sys.stderr, flush=True)
    done = fleet.wait_all("registered", args.register_timeout)
    reg: dict = {"timeout_s": args.register_timeout}
    report["registration"] = reg
    started = [ev["mono"] - t0 for evs in fleet.events for ev in evs if "started" in ev]
    reg["children_started_s"] = [round(x, 2) for x in sorted(started)]
    first = fleet.first("registered", t0)
    if done is None:
        reg["registered"] = fleet.total("registered")
        reg["errors"] = fleet.errors()
        fleet.failures.append(f"only {reg['registered']} of {n} remotes registered "
                              f"within {args.register_timeout:g}s")
        return
    reg["all_s"] = round(done - t0, 2)
    reg["from_first_s"] = round(done - first, 2) if first else None
    reg["server_cpu_s"] = round(proc_cpu(fleet.pid) - cpu0, 2)
    reg["server_cpu_ms_per_remote"] = round(1000 * reg["server_cpu_s"] / n, 2)
    span = time.monotonic() - t0
    reg["server_threads_cpu_pct"] = thread_cpu_delta(tc0, thread_cpu(fleet.pid), span)
    reg["children_cpu_s"] = round(fleet.children_cpu(), 2)  # all of it: they started here
    reg["machine_busy_pct"] = round(100 * (machine_busy() - m0) / span, 1)
    storm = sampler.window(t0, time.monotonic())
    hub["threads_max_registration"] = storm.get("threads_max")
    hub["rss_max_registration_kib"] = storm.get("rss_max_kib")
    print(f"fleet: all registered in {reg['all_s']}s", file=sys.stderr, flush=True)

    # settle (until every remote pings), then the idle window
    from sesame.remote import KEEPALIVE_TIME

    keepalive = args.keepalive or KEEPALIVE_TIME
    time.sleep(args.settle)
    hub["after_registration"] = snapshot(fleet.pid)
    i0 = time.monotonic()
    c0, k0, m0, tc0 = proc_cpu(fleet.pid), fleet.children_cpu(), machine_busy(), thread_cpu(fleet.pid)
    time.sleep(args.idle_seconds)
    c1, k1, m1, tc1 = proc_cpu(fleet.pid), fleet.children_cpu(), machine_busy(), thread_cpu(fleet.pid)
    i1 = time.monotonic()
    span = i1 - i0
    idle_win = sampler.window(i0, i1)
    after = snapshot(fleet.pid)
    hub["after"] = after
    # what malloc holds but nobody uses: ask the server to malloc_trim(0) (SIGUSR1, see
    # THREAD_NAMER), then read RSS again
    os.kill(fleet.pid, signal.SIGUSR1)
    time.sleep(1.0)
    trimmed = snapshot(fleet.pid)
    hub["after_malloc_trim"] = trimmed
    hub["rss_per_remote_after_malloc_trim_kib"] = round(
        (trimmed["rss_kib"] - before["rss_kib"]) / n, 1)
    hub["rss_per_remote_kib"] = round((after["rss_kib"] - before["rss_kib"]) / n, 1)
    # file-backed pages grow once (library code first touched by TLS, HTTP/2...), not per remote
    files = after["smaps_kib"].get("files", 0) - before["smaps_kib"].get("files", 0)
    hub["rss_per_remote_kib_excl_files"] = round(
        (after["rss_kib"] - before["rss_kib"] - files) / n, 1)
    hub["threads_idle"] = after["threads"]
    hub["threads_max_idle"] = idle_win.get("threads_max")
    hub["fds_idle"] = after["fds"]
    hub["smaps_delta_per_remote_kib"] = {
        k: round((after["smaps_kib"].get(k, 0) - before["smaps_kib"].get(k, 0)) / n, 1)
        for k in sorted(set(after["smaps_kib"]) | set(before["smaps_kib"]))}
    still = fleet.total("registered")
    report["idle"] = {"seconds": round(span, 1), "server_cpu_pct": round(100 * (c1 - c0) / span, 2),
                      "children_cpu_pct": round(100 * (k1 - k0) / span, 2),
                      # other load on the machine meanwhile (not the server, not the children)
                      "not_ours_cpu_pct": round(100 * max(0.0, (m1 - m0) - (c1 - c0) - (k1 - k0))
                                                / span, 1),
                      "registered_at_end": still,
                      "covers_keepalive": args.settle >= keepalive and span >= keepalive,
                      "server_threads_cpu_pct": thread_cpu_delta(tc0, tc1, span)}
    if still < n:
        fleet.failures.append(f"{n - still} remotes lost their registration while idle")

    # listing
    if args.server == "hub":
        t = time.perf_counter()
        env = dict(fleet.env, SESAME_TLS="no") if args.no_tls else fleet.env
        tls = [] if args.no_tls else ["--ca", str(fleet.data / "ca.pem")]
        out = subprocess.run([sys.executable, "-m", "sesame", "remotes", "--hub",
                              f"127.0.0.1:{fleet.port}", *tls,
                              "--token-file", str(fleet.admin_token_file), "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
        listing = {"seconds": round(time.perf_counter() - t, 2), "bytes": len(out.stdout),
                   "exit": out.returncode}
        report["listing"] = listing
        try:
            rows = json.loads(out.stdout)
            listing["rows"] = len(rows)
            listing["connected"] = sum(1 for r in rows if r.get("connected"))
        except ValueError:
            listing["stderr"] = out.stderr[-500:]
        if out.returncode != 0 or listing.get("connected") != n:
            fleet.failures.append(f"sesame remotes --json: exit {out.returncode}, "
                                  f"{listing.get('connected')} of {n} connected")

        report["dials"] = run_dials(fleet, dial, echo_port, args.dials)

    if args.restart:
        report["restart"] = restart(fleet, sampler, dial, echo_port)
    sampler.stopping.set()


def run_dials(fleet: Fleet, dial, echo_port: int, count: int) -> dict:
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    rng = random.Random(1)
    echo, conn, errors = [], [], []
    for _ in range(count):
        remote = NAME.format(rng.randrange(fleet.args.remotes))
        try:
            r = blockingCallFromThread(reactor, dial, fleet.endpoint_string(remote, echo_port), 30)
            echo.append(r["echo_ms"])
            conn.append(r["connect_ms"])
        except Exception as exc:  # noqa: BLE001 - a failed check, reported
            errors.append(f"{remote}: {exc!r}"[:200])
    if errors:
        fleet.failures.append(f"{len(errors)} of {count} dials failed")
    echo.sort()
    conn.sort()
    r2 = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return {"n": count, "ok": len(echo), "p50_ms": r2(pct(echo, 50)), "p99_ms": r2(pct(echo, 99)),
            "connect_p50_ms": r2(pct(conn, 50)), "errors": errors[:5]}


def restart(fleet: Fleet, sampler: Sampler, dial, echo_port: int) -> dict:
    """kill -9 the server, start it again on the same port and data dir, and time until every
    remote has registered again."""
    n = fleet.args.remotes
    out: dict = {}
    fleet.send("mark")
    with fleet.changed:
        fleet.changed.wait_for(lambda: all(s.get("marked") for s in fleet.status), 10)
    t_kill = time.monotonic()
    fleet.server.kill()
    fleet.server.wait()
    out["server_start_s"] = round(fleet.start_server(), 2)
    t_listen = time.monotonic()
    out["listen_after_kill_s"] = round(t_listen - t_kill, 2)
    cpu0, tc0, k0, m0 = (proc_cpu(fleet.pid), thread_cpu(fleet.pid), fleet.children_cpu(),
                         machine_busy())
    done = fleet.wait_all("reregistered", fleet.args.register_timeout)
    storm = sampler.window(t_kill, time.monotonic())
    out["threads_max"] = storm.get("threads_max")
    out["rss_max_kib"] = storm.get("rss_max_kib")
    if done is None:
        out["reregistered"] = fleet.total("reregistered")
        out["errors"] = fleet.errors()
        fleet.failures.append(f"after the restart only {out['reregistered']} of {n} remotes "
                              f"registered again within {fleet.args.register_timeout:g}s")
        return out
    first = fleet.first("reregistered", t_kill)
    out["all_after_kill_s"] = round(done - t_kill, 2)
    out["all_after_listen_s"] = round(done - t_listen, 2)
    out["first_after_listen_s"] = round(first - t_listen, 2) if first else None
    out["server_cpu_s"] = round(proc_cpu(fleet.pid) - cpu0, 2)
    span = time.monotonic() - t_listen
    out["server_threads_cpu_pct"] = thread_cpu_delta(tc0, thread_cpu(fleet.pid), span)
    out["children_cpu_pct"] = round(100 * (fleet.children_cpu() - k0) / span, 1)
    out["machine_busy_pct"] = round(100 * (machine_busy() - m0) / span, 1)
    # how the re-registrations spread over time after the hub listened (per second)
    curve = []
    for sec in range(1, int(done - t_listen) + 2):
        at = t_listen + sec
        curve.append(sum(([0] + [ev["reregistered"] for ev in evs
                                 if "reregistered" in ev and t_kill <= ev["mono"] <= at])[-1]
                         for evs in fleet.events))
    out["reregistered_by_second"] = curve
    time.sleep(fleet.args.settle)
    snap = snapshot(fleet.pid, smaps=False)
    out["after"] = snap
    if fleet.args.server == "hub":
        out["dials"] = run_dials(fleet, dial, echo_port, 5)
    return out


def parent_main(args: argparse.Namespace) -> None:
    import grpc
    from twisted.internet import reactor

    import sesame.remote as remote_mod

    fleet = Fleet(args)
    report: dict = {}
    t_start = time.monotonic()

    def work() -> None:
        try:
            orchestrate(fleet, report, reactor)
        except Exception as exc:  # noqa: BLE001 - reported
            import traceback

            report["error"] = repr(exc)
            traceback.print_exc()
        finally:
            reactor.callFromThread(reactor.stop)

    def watchdog() -> None:
        report["error"] = f"watchdog: run exceeded {args.max_seconds:g}s"
        print(json.dumps(report, indent=2), flush=True)
        for p in (*fleet.children, fleet.server):
            if p is not None and p.poll() is None:
                p.kill()
        os._exit(3)

    dog = threading.Timer(args.max_seconds, watchdog)
    dog.daemon = True
    dog.start()
    reactor.callWhenRunning(lambda: threading.Thread(target=work, name="orchestrate", daemon=True).start())
    reactor.run()
    dog.cancel()
    processes = fleet.stop()
    n = args.remotes
    hub = report.get("hub", {})
    idle = report.get("idle", {})
    restart_r = report.get("restart", {})
    scale = 10000 / n
    empty = report.get("idle_empty", {}).get("server_cpu_pct", 0.0)
    goals = {
        "rss_per_remote_le_40KiB": (None if "rss_per_remote_kib" not in hub
                                    else hub["rss_per_remote_kib"] <= 40),
        "threads_le_16": (None if hub.get("threads_max_registration") is None else
                          max(hub["threads_max_registration"], hub.get("threads_max_idle") or 0,
                              restart_r.get("threads_max") or 0) <= 16),
        # linear in the number of remotes (keepalive pings): a projection, not a measurement
        # (idle - idle with no remote) scaled to 10,000, plus the no-remote idle
        "idle_cpu_pct_at_10k_projected": (
            None if "server_cpu_pct" not in idle else
            round(empty + max(0.0, idle["server_cpu_pct"] - empty) * scale, 2)),
        "rereg_le_20s_at_this_n": (None if "all_after_kill_s" not in restart_r
                                   else restart_r["all_after_kill_s"] <= 20),
    }
    doc = {
        "bench": "fleet", "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
        "server": args.server, "remotes": n, "procs": args.procs,
        "tls": not args.no_tls, "server_opts": args.server_opt, "malloc_arena_max": args.malloc_arena_max or None,
        "keepalive_s": args.keepalive or remote_mod.KEEPALIVE_TIME,
        "keepalive_timeout_s": remote_mod.KEEPALIVE_TIMEOUT,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - t_start, 1),
        **report, "goals": goals, "processes": processes, "failures": fleet.failures,
    }
    print(json.dumps(doc, indent=2))
    if fleet.failures or "error" in report:
        sys.exit(1)


def _opt(text: str) -> list:
    key, _, val = text.partition("=")
    if not key or not val:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE")
    try:
        return [key, int(val)]
    except ValueError:
        return [key, val]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--remotes", type=int, default=2000, help="N: RemoteSessions in all")
    p.add_argument("--procs", type=int, default=4, help="K: child processes running them")
    p.add_argument("--restart", action="store_true",
                   help="also kill -9 the hub, restart it, and time the re-registrations")
    p.add_argument("--idle-seconds", type=float, default=None,
                   help="idle CPU window (default: 20, at least two keepalive intervals)")
    p.add_argument("--idle-empty-seconds", type=float, default=5.0,
                   help="idle CPU window of the server before any remote (baseline; 0: skip)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds after registration before the figures are taken (default: one "
                        "keepalive interval + 1, so every remote's pings have started)")
    p.add_argument("--dials", type=int, default=20, help="random dials through the hub")
    p.add_argument("--keepalive", type=float, default=None,
                   help="the remotes' keepalive_time in s (default: RemoteSession's)")
    p.add_argument("--server", choices=("hub", "bare"), default="hub",
                   help="bare: a grpc.aio server that only answers the registration "
                        "(grpc's share of the cost; no listing, no dials)")
    p.add_argument("--server-opt", action="append", default=[], type=_opt, metavar="KEY=INT",
                   help="experiment: an extra grpc server option for the hub (or bare server), "
                        "patched into grpc.aio.server; repeatable")
    p.add_argument("--malloc-arena-max", type=int, default=0,
                   help="experiment: MALLOC_ARENA_MAX for the server process")
    p.add_argument("--no-tls", action="store_true",
                   help="experiment: plain HTTP/2 between remotes and server (TLS's share)")
    p.add_argument("--register-timeout", type=float, default=None,
                   help="seconds for all N to register (default 60 + N/50)")
    p.add_argument("--max-seconds", type=float, default=600, help="watchdog for the whole run")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--serve-bare", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child)
    elif args.serve_bare:
        bare_main(args.serve_bare, args.port_file, args.port, tls=not args.no_tls)
    else:
        if args.remotes < 1 or args.procs < 1:
            p.error("--remotes and --procs must be positive")
        from sesame.remote import KEEPALIVE_TIME

        ka = args.keepalive or KEEPALIVE_TIME
        if args.settle is None:
            args.settle = max(3.0, ka + 1)
        if args.idle_seconds is None:
            args.idle_seconds = max(20.0, 2 * ka)
        if args.register_timeout is None:
            args.register_timeout = 60 + args.remotes / 50
        parent_main(args)


if __name__ == "__main__":
    main()
