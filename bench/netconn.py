#!/usr/bin/env python
"""
TCP through NetConn (client → NetConn server → target) vs direct TCP,
measured in the same run.

Processes: this one is the client (Twisted, gRPC client on sesame's bridge
loop); ``--serve netconn`` runs the NetConn server (grpc.aio on the bridge
loop + Twisted reactor, allowing 127.0.0.1:*); ``--serve targets`` runs the
targets with Twisted: a sink (reads to EOF, answers ``<count> <sha256>``,
closes), a source (sends the requested number of deterministic
pseudo-random bytes, stops early at a block boundary if the client
half-closes) and an echo.  ``bench/delayproxy.py`` adds latency for the
20 ms RTT runs.  Every bulk run is checked with sha256; a mismatch is
reported in ``failures`` and makes the exit status 1.

Figures: bulk upload/download MiB/s, 64-byte ping-pong RTT p50/p99 µs,
N concurrent connections each echoing 1 MiB (total seconds), and bulk
MiB/s at 20 ms RTT (proxy on the gRPC link vs direct TCP through the same
proxy).  ``--ssh`` adds ``ssh -R`` forwarding through a throw-away sshd.
Prints one JSON document.

    python bench/netconn.py [--seconds 4] [--mib 512] [--rtt-calls 5000] [--conns 200] [--ssh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no GOAWAY chatter at shutdown

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MIB = 1024 * 1024
BLOCK = MIB  # unit of the deterministic stream; the source stops early only on a block boundary


def _install_reactor(kind: str) -> None:
    if kind == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install()


# --- deterministic data -------------------------------------------------------------

_BASE = random.Random(0x5E5A3E).randbytes(BLOCK)
_TAIL = _BASE[8:]


def block_prefix(i: int) -> bytes:
    """Block ``i`` of the stream is ``prefix(i) + _TAIL``: distinct, cheap to make."""
    return struct.pack(">Q", i)


def block(i: int) -> bytes:
    return block_prefix(i) + _TAIL


_expected: dict[int, str] = {}


def expected_sha(n: int) -> str:
    """sha256 of the first ``n`` bytes of the stream."""
    if n not in _expected:
        h = hashlib.sha256()
        full, rest = divmod(n, BLOCK)
        for i in range(full):
            h.update(block_prefix(i))
            h.update(_TAIL)
        if rest:
            h.update(block(full)[:rest])
        _expected[n] = h.hexdigest()
    return _expected[n]


# --- serving processes ------------------------------------------------------------


def _stop_on_stdin_eof(reactor) -> None:
    def wait() -> None:
        sys.stdin.read()
        reactor.callFromThread(reactor.stop)

    threading.Thread(target=wait, daemon=True).start()


def serve_targets(args: argparse.Namespace) -> None:
    _install_reactor(args.reactor)
    from twisted.internet import interfaces, protocol, reactor
    from zope.interface import implementer

    @implementer(interfaces.IHalfCloseableProtocol)
    class Sink(protocol.Protocol):
        def connectionMade(self) -> None:
            self.h = hashlib.sha256()
            self.n = 0

        def dataReceived(self, data: bytes) -> None:
            self.h.update(data)
            self.n += len(data)

        def readConnectionLost(self) -> None:
            self.transport.write(f"{self.n} {self.h.hexdigest()}\n".encode())
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass

    @implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
    class Source(protocol.Protocol):
        """8-byte big-endian length in; that many stream bytes out (or fewer, see above)."""

        def connectionMade(self) -> None:
            self.hdr = b""
            self.want = None
            self.sent = 0
            self.i = 0
            self.paused = False
            self.stop = False
            self.finished = False

        def dataReceived(self, data: bytes) -> None:
            if self.want is None:
                self.hdr += data
                if len(self.hdr) >= 8:
                    (self.want,) = struct.unpack(">Q", self.hdr[:8])
                    self.transport.registerProducer(self, True)
                    self.produce()

        def produce(self) -> None:
            while not self.paused and not self.finished:
                if self.sent >= self.want or self.stop:
                    self.finished = True
                    self.transport.unregisterProducer()
                    self.transport.loseConnection()
                    return
                chunk = block(self.i)
                self.i += 1
                if self.sent + len(chunk) > self.want:
                    chunk = chunk[: self.want - self.sent]
                self.sent += len(chunk)
                self.transport.write(chunk)

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            self.produce()

        def stopProducing(self) -> None:
            self.finished = True

        def readConnectionLost(self) -> None:
            self.stop = True  # the client has seen enough: finish this block and close
            if self.want is None:
                self.transport.loseConnection()
            elif not self.paused:
                self.produce()

        def writeConnectionLost(self) -> None:
            pass

    @implementer(interfaces.IHalfCloseableProtocol)
    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

        def readConnectionLost(self) -> None:
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass

    ports = {}
    for name, cls in (("sink", Sink), ("source", Source), ("echo", Echo)):
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(cls), backlog=4096, interface="127.0.0.1")
        ports[name] = port.getHost().port
    print(json.dumps(ports), flush=True)
    _stop_on_stdin_eof(reactor)
    reactor.run()


def _grpc_options(args: argparse.Namespace) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = []
    for kv in args.grpc_opt or ():
        k, _, v = kv.partition("=")
        opts.append((k, int(v) if v.lstrip("-").isdigit() else v))
    return opts


def serve_netconn(args: argparse.Namespace) -> None:
    _install_reactor(args.reactor)
    import grpc
    from twisted.internet import reactor

    from sesame.bridge._loop import get_bridge
    from sesame.netconn import NetConnServicer

    bridge = get_bridge()
    svc = NetConnServicer(["127.0.0.1:*"], reactor=reactor, bridge=bridge)
    holder = {}

    async def start() -> int:
        server = grpc.aio.server(options=_grpc_options(args))
        svc.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        return port

    async def stop() -> None:
        await holder["server"].stop(0)

    if bridge.owns_thread:
        port = bridge.run(start(), 30)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: bridge.run(stop(), 10))
        print(json.dumps({"port": port, "bridge_tid": bridge._thread.native_id}), flush=True)
    else:  # asyncio reactor: the bridge loop is the reactor's loop
        from twisted.internet import defer

        def go() -> None:
            import asyncio

            d = defer.Deferred.fromFuture(asyncio.ensure_future(start()))
            d.addCallback(lambda port: print(json.dumps({"port": port, "bridge_tid": None}), flush=True))

        reactor.callWhenRunning(go)
    _stop_on_stdin_eof(reactor)
    reactor.run()


# --- client side --------------------------------------------------------------------


class Bench:
    """Client-side measurements; every method returns a Deferred (run in the reactor)."""

    def __init__(self, reactor, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.failures: list[str] = []

    # connectors: (kind, port) -> connect(factory) -> Deferred[protocol]
    def direct(self, port: int):
        from twisted.internet.endpoints import TCP4ClientEndpoint

        def connect(factory):
            return TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=30).connect(factory)

        return connect

    def netconn(self, make, port: int):
        from sesame.netconn import connectNetConn

        def connect(factory):
            return connectNetConn(make, f"127.0.0.1:{port}", factory, reactor=self.reactor)

        return connect

    def _fail(self, what: str) -> None:
        print(f"FAILURE: {what}", file=sys.stderr, flush=True)
        self.failures.append(what)

    async def bounded(self, what: str, coro, timeout: float) -> dict:
        """Await ``coro``; past ``timeout`` report a failure instead of hanging the run."""
        from twisted.internet import defer

        d = defer.ensureDeferred(coro)
        try:
            return await d.addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            self._fail(f"{what}: no result after {timeout:g}s (stuck)")
            return {"ok": False, "stuck_after_s": timeout}

    async def upload(self, label: str, connect, seconds: float, mib: int) -> dict:
        from twisted.internet import defer, interfaces, protocol
        from zope.interface import implementer

        reactor = self.reactor
        write_size = self.args.write_size
        limit = mib * MIB
        done: defer.Deferred = defer.Deferred()

        @implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
        class Up(protocol.Protocol):
            def connectionMade(self) -> None:
                self.sent = 0
                self.i = 0
                self.paused = False
                self.finished = False
                self.reply = b""
                self.t0 = time.perf_counter()
                self.deadline = self.t0 + seconds
                self.t_sent = None
                self.transport.registerProducer(self, True)
                self.produce()

            def produce(self) -> None:
                # NetConn pauses us asynchronously (after a hop), so write a
                # bounded amount per reactor turn and come back.
                budget = 4 * MIB
                while not self.paused and not self.finished and budget > 0:
                    if self.sent >= limit or (self.sent % BLOCK == 0 and self.sent and
                                              time.perf_counter() >= self.deadline):
                        self.finished = True
                        self.t_sent = time.perf_counter()
                        self.transport.unregisterProducer()
                        self.transport.loseWriteConnection()
                        return
                    blk = block(self.i)
                    self.i += 1
                    for off in range(0, BLOCK, write_size):
                        self.transport.write(blk[off:off + write_size])
                    self.sent += BLOCK
                    budget -= BLOCK
                if not self.paused and not self.finished:
                    reactor.callLater(0, self.produce)

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                if self.paused:
                    self.paused = False
                    self.produce()

            def stopProducing(self) -> None:
                self.finished = True

            def dataReceived(self, data: bytes) -> None:
                self.reply += data

            def readConnectionLost(self) -> None:
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason) -> None:
                t1 = time.perf_counter()
                if not done.called:
                    done.callback((self, t1, reason))

        p = await connect(protocol.Factory.forProtocol(Up))
        proto, t1, reason = await done
        elapsed = t1 - proto.t0
        out = {"MiB": round(proto.sent / MIB), "seconds": round(elapsed, 3),
               "MiBps": round(proto.sent / MIB / elapsed, 1)}
        try:
            count_s, sha = proto.reply.decode().split()
            count = int(count_s)
        except ValueError:
            self._fail(f"{label}: upload: bad sink reply {proto.reply[:80]!r} ({reason.getErrorMessage()})")
            out["ok"] = False
            return out
        ok = count == proto.sent and sha == expected_sha(proto.sent)
        if not ok:
            self._fail(f"{label}: upload: sent {proto.sent} bytes, sink got {count} sha {sha}"
                       f" (expected {expected_sha(proto.sent)})")
        out["ok"] = ok
        del p
        return out

    async def download(self, label: str, connect, seconds: float, mib: int) -> dict:
        from twisted.internet import defer, interfaces, protocol
        from zope.interface import implementer

        reactor = self.reactor
        want = mib * MIB
        done: defer.Deferred = defer.Deferred()

        @implementer(interfaces.IHalfCloseableProtocol)
        class Down(protocol.Protocol):
            def connectionMade(self) -> None:
                self.h = hashlib.sha256()
                self.n = 0
                self.stopped = False
                self.t0 = time.perf_counter()
                self.t1 = None
                self.transport.write(struct.pack(">Q", want))
                self.timer = reactor.callLater(seconds, self.enough)

            def enough(self) -> None:
                self.stopped = True
                self.transport.loseWriteConnection()

            def dataReceived(self, data: bytes) -> None:
                self.h.update(data)
                self.n += len(data)

            def readConnectionLost(self) -> None:
                self.t1 = time.perf_counter()
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason) -> None:
                if self.t1 is None:
                    self.t1 = time.perf_counter()
                if self.timer.active():
                    self.timer.cancel()
                if not done.called:
                    done.callback((self, reason))

        await connect(protocol.Factory.forProtocol(Down))
        proto, reason = await done
        elapsed = proto.t1 - proto.t0
        out = {"MiB": round(proto.n / MIB), "seconds": round(elapsed, 3),
               "MiBps": round(proto.n / MIB / elapsed, 1)}
        sha = proto.h.hexdigest()
        short_ok = proto.n == want or (proto.stopped and proto.n % BLOCK == 0 and proto.n > 0)
        ok = short_ok and sha == expected_sha(proto.n)
        if not ok:
            self._fail(f"{label}: download: got {proto.n} bytes (asked {want}, stopped early: "
                       f"{proto.stopped}), sha ok: {sha == expected_sha(proto.n)}, "
                       f"end: {reason.getErrorMessage()}")
        out["ok"] = ok
        return out

    async def rtt(self, label: str, connect, n: int) -> dict:
        from twisted.internet import defer, protocol

        warm = min(200, n)
        payload = b"p" * 64
        done: defer.Deferred = defer.Deferred()
        samples: list[float] = []

        class PingPong(protocol.Protocol):
            def connectionMade(self) -> None:
                self.left = n + warm
                self.buf = 0
                self.send()

            def send(self) -> None:
                self.t = time.perf_counter_ns()
                self.transport.write(payload)

            def dataReceived(self, data: bytes) -> None:
                self.buf += len(data)
                if self.buf < 64:
                    return
                t = time.perf_counter_ns()
                self.buf -= 64
                self.left -= 1
                if self.left < n:
                    samples.append((t - self.t) / 1000)
                if self.left > 0:
                    self.send()
                else:
                    self.transport.loseConnection()

            def connectionLost(self, reason) -> None:
                if not done.called:
                    done.callback(reason.getErrorMessage())

        await connect(protocol.Factory.forProtocol(PingPong))
        await done
        if len(samples) != n:
            self._fail(f"{label}: rtt: {len(samples)} of {n} round trips")
            return {"ok": False}
        samples.sort()
        return {"p50_us": round(statistics.median(samples)),
                "p99_us": round(samples[int(len(samples) * 0.99)]), "round_trips": n}

    async def connect_echo(self, label: str, connect, n: int) -> dict:
        """New-connection latency: ``n`` connections one after another, each timed from
        ``connect()`` to its first 64-byte echo, then closed.  p50/p99 µs."""
        from twisted.internet import defer, protocol

        payload = b"c" * 64
        samples: list[float] = []

        class Once(protocol.Protocol):
            def connectionMade(self) -> None:
                self.buf = 0
                self.transport.write(payload)

            def dataReceived(self, data: bytes) -> None:
                self.buf += len(data)
                if self.buf >= 64 and not self.factory.echoed.called:
                    self.factory.echoed.callback(time.perf_counter_ns())
                    self.transport.loseConnection()

            def connectionLost(self, reason) -> None:
                if not self.factory.echoed.called:
                    self.factory.echoed.errback(reason)

        for i in range(n + 5):  # 5 warm-up connections
            f = protocol.Factory.forProtocol(Once)
            f.echoed = defer.Deferred()
            t0 = time.perf_counter_ns()
            try:
                await connect(f)
                t1 = await f.echoed
            except Exception as exc:  # noqa: BLE001 - reported as a failed figure
                self._fail(f"{label}: connect_echo: connection {i}: {exc}")
                return {"ok": False}
            if i >= 5:
                samples.append((t1 - t0) / 1000)
        samples.sort()
        return {"p50_us": round(statistics.median(samples)),
                "p99_us": round(samples[int(len(samples) * 0.99)]), "connections": n}

    async def concurrent(self, label: str, connect, conns: int, each: int) -> dict:
        from twisted.internet import defer, protocol

        tail = _BASE[8:each]
        results: list[tuple[int, bool]] = []
        finished: defer.Deferred = defer.Deferred()
        state = {"left": conns}

        class EchoCheck(protocol.Protocol):
            def __init__(self, i: int) -> None:
                self.i = i

            def connectionMade(self) -> None:
                self.h = hashlib.sha256()
                self.n = 0
                self.transport.write(block_prefix(self.i))
                self.transport.write(tail)

            def dataReceived(self, data: bytes) -> None:
                self.h.update(data)
                self.n += len(data)
                if self.n >= each:
                    self.transport.loseConnection()

            def connectionLost(self, reason) -> None:
                exp = hashlib.sha256(block_prefix(self.i) + tail).hexdigest()
                results.append((self.n, self.n == each and self.h.hexdigest() == exp))
                state["left"] -= 1
                if state["left"] == 0 and not finished.called:
                    finished.callback(None)

        class F(protocol.Factory):
            def __init__(self, i: int) -> None:
                self.i = i

            def buildProtocol(self, addr):
                return EchoCheck(self.i)

        t0 = time.perf_counter()
        ds = [defer.ensureDeferred(_as_coro(connect(F(i)))) for i in range(conns)]
        conn_results = await defer.DeferredList(ds, consumeErrors=True)
        t_conn = time.perf_counter() - t0
        failed = [r for ok, r in conn_results if not ok]
        state["left"] -= len(failed)
        if state["left"] == 0 and not finished.called:
            finished.callback(None)
        await finished
        elapsed = time.perf_counter() - t0
        bad = sum(1 for _, ok in results if not ok) + len(failed)
        if bad:
            why = failed[0].getErrorMessage() if failed else "short or corrupt echo"
            self._fail(f"{label}: concurrent: {bad} of {conns} connections failed ({why})")
        return {"connections": conns, "MiB_each": each / MIB, "seconds": round(elapsed, 3),
                "all_connected_s": round(t_conn, 3), "ok": not bad}


async def _as_coro(d):
    return await d


def _spawn(argv: list[str]) -> tuple[subprocess.Popen, dict]:
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if not line:
        raise SystemExit(f"child {argv[2:]} died before reporting its ports")
    return child, json.loads(line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHD:
    """A throw-away sshd on 127.0.0.1 with temp keys, and ssh -R forwards through it."""

    def __init__(self, cipher: str | None = None) -> None:
        """``cipher``: the ssh client's ``-c`` (e.g. ``aes128-gcm@openssh.com``); None: its
        default."""
        self.dir = Path(tempfile.mkdtemp(prefix="nc-bench-ssh-"))
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self._cipher = cipher

    @staticmethod
    def available() -> str | None:
        for tool in ("ssh", "ssh-keygen"):
            if not shutil.which(tool):
                return f"{tool} not found"
        if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
            return "sshd not found (apt-get install -y openssh-server)"
        return None

    def start(self) -> None:
        d = self.dir
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "client.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        os.chmod(d, 0o700)
        Path("/run/sshd").mkdir(exist_ok=True)
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            f"StrictModes no\nAllowTcpForwarding yes\nGatewayPorts no\nPidFile {d / 'sshd.pid'}\n")
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.procs.append(subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(self.port, 10)

    def forward(self, flag: str, target_ports: list[int], via_port: int | None = None) -> list[int]:
        """One ``ssh`` with ``-R``/``-L`` listen_port:127.0.0.1:target_port each; the listen ports.
        ``via_port``: ssh dials sshd there (a delay proxy in front of it) instead."""
        lports = [_free_port() for _ in target_ports]
        user = os.environ.get("USER") or __import__("getpass").getuser()
        fwd = []
        for lport, tport in zip(lports, target_ports, strict=False):
            fwd += [flag, f"127.0.0.1:{lport}:127.0.0.1:{tport}"]
        proc = subprocess.Popen(
            ["ssh", "-N", "-p", str(via_port or self.port), "-i", str(self.dir / "client"),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
             *(["-c", self._cipher] if self._cipher else []), *fwd, f"{user}@127.0.0.1"],
            stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        _wait_port(lports[-1], 10)
        return lports

    def cipher(self) -> str:
        if self._cipher:
            return self._cipher
        out = subprocess.run(["ssh", "-G", "-p", str(self.port), "127.0.0.1"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("ciphers "):
                return line.split()[1].split(",")[0]
        return "?"

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median figure, plus every run's figure (``runs``)."""
    key = next((k for k in ("MiBps", "p50_us", "seconds") if k in runs[0]), None)
    if key is None or len(runs) == 1 or any(key not in r for r in runs):
        return runs[0] if len(runs) == 1 else {**runs[0], "runs": runs}
    ordered = sorted(runs, key=lambda r: r[key])
    med = dict(ordered[(len(ordered) - 1) // 2] if key != "MiBps" else ordered[len(ordered) // 2])
    med["runs"] = [r[key] for r in runs]
    med["ok"] = all(r.get("ok", True) for r in runs)
    return med


class CPU:
    """CPU seconds per process (and per thread role) from /proc, between two snapshots."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[int, dict[int, str]]] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self.trees: set[str] = set()

    def add(self, name: str, pid: int, roles: dict[int, str] | None = None, tree: bool = False,
            main: str = "main thread (reactor)") -> None:
        """``tree``: count every descendant process too, as one (sshd forks per connection)."""
        self.procs[name] = (pid, {pid: main, **(roles or {})})
        if tree:
            self.trees.add(name)

    def _stat(self, path: str) -> list[str]:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()

    def _descendants(self, root: int) -> list[int]:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(self._stat(f"/proc/{d}/stat")[1])
                except (OSError, IndexError):
                    pass
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += [c for c, pp in parent.items() if pp == p]
        return out

    def snapshot(self) -> dict[str, dict[int, float]]:
        snap = {}
        for name, (pid, _) in self.procs.items():
            per: dict[int, float] = {}
            pids = self._descendants(pid) if name in self.trees else [pid]
            for p in pids:
                try:
                    tids = os.listdir(f"/proc/{p}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        fields = self._stat(f"/proc/{p}/task/{tid}/stat")
                    except OSError:
                        continue
                    key = pid if name in self.trees else int(tid)  # a tree counts as one
                    per[key] = per.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / self.tick
            snap[name] = per
        return snap

    def delta(self, a: dict, b: dict) -> dict:
        out = {}
        for name, (_pid, roles) in self.procs.items():
            per: dict[str, float] = {}
            for tid, t in b.get(name, {}).items():
                role = roles.get(tid, "other threads (grpc core)")
                per[role] = per.get(role, 0.0) + t - a.get(name, {}).get(tid, 0.0)
            total = sum(per.values())
            if total >= 0.01:
                out[name] = {"total": round(total, 2),
                             **{k: round(v, 2) for k, v in sorted(per.items()) if v >= 0.01}}
        return out


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def client_main(args: argparse.Namespace) -> None:
    _install_reactor(args.reactor)
    import grpc
    from twisted.internet import defer, reactor

    from sesame.bridge._loop import get_bridge
    from sesame.netconn import aio_call_factory

    me = [sys.executable, __file__, "--reactor", args.reactor]
    gopts = []
    for kv in args.grpc_opt or ():
        gopts += ["--grpc-opt", kv]
    children: list[subprocess.Popen] = []
    sshd: SSHD | None = None
    report: dict = {}

    spawned: list[tuple[str, subprocess.Popen, dict]] = []

    def spawn(name, argv):
        child, info = _spawn(argv)
        children.append(child)
        spawned.append((name, child, info))
        return info

    try:
        targets = spawn("targets", me + ["--serve", "targets"])
        server = spawn("netconn_server", me + ["--serve", "netconn"] + gopts)
        gport = server["port"]
        proxy = None
        if args.delay_ms > 0:
            proxy = spawn("delay_proxy", [sys.executable, str(HERE / "delayproxy.py"), "--delay-ms", str(args.delay_ms),
                           "--forward", f"127.0.0.1:{gport}",
                           "--forward", f"127.0.0.1:{targets['sink']}",
                           "--forward", f"127.0.0.1:{targets['source']}",
                           "--forward", f"127.0.0.1:{targets['echo']}"])
        ssh_ports = None
        ssh_note = None
        if args.ssh:
            ssh_note = SSHD.available()
            if ssh_note is None:
                try:
                    sshd = SSHD()
                    sshd.start()
                    names = ("sink", "source", "echo")
                    ssh_ports = dict(zip(names, sshd.forward("-R", [targets[k] for k in names]), strict=False))
                except Exception as exc:  # noqa: BLE001 - optional peer figure
                    ssh_note = f"ssh setup failed: {exc}"
                    ssh_ports = None
                    if sshd:
                        sshd.stop()
                        sshd = None
            if ssh_note:
                print(f"ssh: skipped: {ssh_note}", file=sys.stderr, flush=True)
    except BaseException:
        for c in children:
            c.stdin.close()
        raise

    bridge = get_bridge()
    bench = Bench(reactor, args)
    copts = _grpc_options(args)
    cpu = CPU()
    cpu.add("client", os.getpid(), {bridge._thread.native_id: "bridge loop"} if bridge.owns_thread else {})
    for name, child, info in spawned:
        roles = {info["bridge_tid"]: "bridge loop"} if info.get("bridge_tid") else {}
        cpu.add(name, child.pid, roles, main="asyncio loop" if name == "delay_proxy" else "main thread (reactor)")
    if sshd:
        cpu.add("sshd (all processes)", sshd.procs[0].pid, tree=True, main="process")
        cpu.add("ssh -R client", sshd.procs[1].pid, main="process")

    async def measure(label: str, conn_for: dict, bulk_only: bool = False, seconds=None) -> dict:
        secs = seconds or args.seconds
        out = {}
        print(f"… {label}", file=sys.stderr, flush=True)
        steps = [("upload", lambda: bench.upload(label, conn_for["sink"], secs, args.mib)),
                 ("download", lambda: bench.download(label, conn_for["source"], secs, args.mib))]
        if not bulk_only:
            steps += [("rtt_64B", lambda: bench.rtt(label, conn_for["echo"], args.rtt_calls)),
                      ("concurrent_echo", lambda: bench.concurrent(label, conn_for["echo"], args.conns, MIB))]
        for name, step in steps:
            runs = []
            for _ in range(args.repeat):
                before = cpu.snapshot()
                r = await bench.bounded(f"{label}: {name}", step(), 3 * secs + 60)
                r["cpu_s"] = cpu.delta(before, cpu.snapshot())
                runs.append(r)
                print(f"    {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            out[name] = _median_run(runs)
        return out

    async def run() -> None:
        results: dict = {}
        direct = {k: bench.direct(targets[k]) for k in ("sink", "source", "echo")}
        make = aio_call_factory(f"127.0.0.1:{gport}", options=copts, bridge=bridge)
        nc = {k: bench.netconn(make, targets[k]) for k in ("sink", "source", "echo")}
        # one throw-away connection so channel setup is not in the first figure
        await bench.rtt("warm-up", nc["echo"], 10)
        results["direct"] = await measure("direct", direct)
        results["netconn"] = await measure("netconn", nc)
        if ssh_ports:
            results["ssh_R"] = await measure(f"ssh -R ({sshd.cipher()})",
                                             {k: bench.direct(p) for k, p in ssh_ports.items()})
        d, n = results["direct"], results["netconn"]
        report["ratios_netconn_vs_direct"] = {
            "upload": _ratio(n["upload"].get("MiBps"), d["upload"].get("MiBps")),
            "download": _ratio(n["download"].get("MiBps"), d["download"].get("MiBps")),
            "rtt_p50": _ratio(n["rtt_64B"].get("p50_us"), d["rtt_64B"].get("p50_us")),
            "concurrent_seconds": _ratio(n["concurrent_echo"].get("seconds"),
                                         d["concurrent_echo"].get("seconds")),
        }
        if proxy:
            pport, psink, psource, pecho = proxy["ports"]
            rtt = 2 * args.delay_ms
            dl = {"sink": bench.direct(psink), "source": bench.direct(psource), "echo": bench.direct(pecho)}
            pmake = aio_call_factory(f"127.0.0.1:{pport}", options=copts, bridge=bridge)
            ncl = {k: bench.netconn(pmake, targets[k]) for k in ("sink", "source", "echo")}
            await bench.rtt("warm-up (proxied)", ncl["echo"], 5)
            delayed = {"rtt_ms_injected": rtt, "window_cap_64KiB_MiBps": round(64 / 1024 / (rtt / 1000), 2)}
            delayed["direct_via_proxy"] = await measure(f"direct via proxy ({rtt:g} ms)", dl, True,
                                                        args.delay_seconds)
            delayed["direct_via_proxy"]["rtt_64B"] = await bench.rtt("direct via proxy", dl["echo"], 50)
            delayed["netconn_via_proxy"] = await measure(f"netconn via proxy ({rtt:g} ms)", ncl, True,
                                                         args.delay_seconds)
            delayed["netconn_via_proxy"]["rtt_64B"] = await bench.rtt("netconn via proxy", ncl["echo"], 50)
            dd, nn = delayed["direct_via_proxy"], delayed["netconn_via_proxy"]
            cap = delayed["window_cap_64KiB_MiBps"]
            delayed["ratio_netconn_vs_direct_via_proxy"] = {
                k: _ratio(nn[k].get("MiBps"), dd[k].get("MiBps")) for k in ("upload", "download")}
            delayed["ratio_netconn_20ms_vs_netconn_0ms"] = {
                k: _ratio(nn[k].get("MiBps"), n[k].get("MiBps")) for k in ("upload", "download")}
            delayed["netconn_vs_64KiB_window_cap"] = {
                k: _ratio(nn[k].get("MiBps"), cap) for k in ("upload", "download")}
            results["delayed"] = delayed
        if args.ssh and not ssh_ports:
            results["ssh_R"] = {"skipped": ssh_note}
        report["results"] = results

    def main_d():
        d = defer.ensureDeferred(run())
        d.addErrback(lambda f: (report.setdefault("error", f.getTraceback()), f.printTraceback(file=sys.stderr)))
        d.addBoth(lambda _: reactor.stop())

    t0 = time.perf_counter()
    reactor.callWhenRunning(main_d)
    reactor.run()
    wall = time.perf_counter() - t0
    for c in children:
        c.stdin.close()
    for c in children:
        try:
            c.wait(10)
        except subprocess.TimeoutExpired:
            c.kill()
    if sshd:
        sshd.stop()
    doc = {
        "bench": "netconn", "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "grpcio": grpc.__version__, "twisted": __import__("twisted").__version__,
        "reactor": type(reactor).__name__, "bridge_thread": bridge.owns_thread,
        "seconds": args.seconds, "mib": args.mib, "repeat": args.repeat, "write_size": args.write_size,
        "grpc_options": dict(copts), "wall_seconds": round(wall, 1),
        **report, "failures": bench.failures,
    }
    print(json.dumps(doc, indent=2))
    if bench.failures or "error" in report:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="time box per bulk run (stops at a 1 MiB boundary)")
    p.add_argument("--mib", type=int, default=512, help="size cap per bulk run")
    p.add_argument("--rtt-calls", type=int, default=5000, help="64-byte round trips (after 200 warm-up)")
    p.add_argument("--conns", type=int, default=200, help="concurrent connections echoing 1 MiB each")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the median run is reported")
    p.add_argument("--write-size", type=int, default=64 * 1024, help="bytes per transport.write when uploading")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay of the proxy (0: skip)")
    p.add_argument("--delay-seconds", type=float, default=6.0, help="time box per bulk run through the proxy")
    p.add_argument("--grpc-opt", action="append", metavar="KEY=VALUE",
                   help="gRPC channel/server option for both ends (repeatable)")
    p.add_argument("--reactor", choices=["default", "asyncio"], default="default",
                   help="asyncio: Twisted's asyncio reactor, so the bridge needs no thread")
    p.add_argument("--ssh", action="store_true", help="also measure ssh -R through a throw-away sshd")
    p.add_argument("--serve", choices=["targets", "netconn"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve == "targets":
        serve_targets(args)
    elif args.serve == "netconn":
        serve_netconn(args)
    else:
        client_main(args)


if __name__ == "__main__":
    main()
