#!/usr/bin/env python
"""
TCP end to end through a sesame hub (client → hub → remote → target, TLS on
both hub links) vs direct TCP vs ``ssh -R`` through a throw-away sshd, all
measured in the same run.

Processes, all real:

* ``python -m sesame hub --listen tcp:0:interface=127.0.0.1 --port-file F
  --data-dir D`` (TLS generated on first start: D/ca.pem);
* ``python -m sesame remote --hub 127.0.0.1:H --name edge-1 --token-file T
  --ca D/ca.pem --allow 127.0.0.1:*`` (token from ``sesame token create``);
* the targets of ``bench/netconn.py --serve targets`` (sink, source, echo);
* this process: the client, connecting with
  ``clientFromString(reactor, "sesame:remote=edge-1:host=127.0.0.1:port=P:hub=127.0.0.1\\:H:ca=...:token=...")``
  (path ``hub``: the endpoint's transport in this process);
* ``python -m sesame forward tcp:F:interface=127.0.0.1 'sesame:...'`` per target (path
  ``forward``: client -> the forward's port -> hub -> remote -> target, what ``ssh -o
  ProxyCommand`` or ``psql`` through ``sesame forward`` takes);
* for the peer figure, ``sshd`` on 127.0.0.1 (temp keys, default cipher) and
  ``ssh -N -R`` forwarding to the same targets: client → sshd → ssh → target,
  the same shape as client → hub → remote → target.

* py-frp (PyPI ``py-simple-nat-tunnel``, pure-Python asyncio with TLS) publishing the
  same targets, ``py_frp``: client -> frps port -> frpc -> target (``--no-py-frp`` to
  skip; installed into ``~/.cache/sesame-bench/py-frp`` on first use).

Figures (the measurements of ``bench/netconn.py``, reused from it): bulk
upload/download MiB/s (sha256-verified), 64-byte RTT p50/p99 µs, N
concurrent connections each echoing 1 MiB (total seconds; ``--conns`` 200
and ``--conns-small`` 50, which the hub accepts in one burst).  The paths are
interleaved within each round (direct, hub, ssh; then again) so a change in
machine load hits all three alike; each figure is the median of
``--repeat`` rounds.  CPU seconds are recorded per process and per thread
role from /proc for every run, plus the machine's busy CPU seconds that
were *not* ours (other load sharing the cores).  Prints one JSON document;
exit status 1 on any failed check.

    PYTHONPATH=. python bench/e2e.py [--seconds 3] [--mib 512] [--rtt-calls 3000] [--conns 200] [--repeat 3]

Front doors (on by default; ``--no-front-doors``): the same hub also runs
``--vhost``, with a ``tcp`` route per target (path ``port_map``: client →
hub port → remote → target, no client-side gRPC at all) measured like the
others, and an ``http`` route to a Twisted web server beside the targets:
``bench/httpload.py`` requests/s with ``--http-conns`` keep-alive connections,
straight to the web server vs through the vhost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from sesame._grpcio import choose_grpc_io  # noqa: E402

# hub, remote and `sesame forward` inherit it; SESAME_GRPC_IO=event-engine for an A/B
GRPC_IO = choose_grpc_io()


def _load_netconn_bench():
    spec = importlib.util.spec_from_file_location("bench_netconn", HERE / "netconn.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_netconn"] = mod
    spec.loader.exec_module(mod)
    return mod


nc = _load_netconn_bench()
MIB = nc.MIB
REMOTE = "edge-1"

# --- thread names, so /proc can tell the bridge loop from grpc's threads ------------------
#
# Python 3.11 does not give its threads OS names, so every Python thread's comm is
# "python".  The hub and remote children get this as sitecustomize (via PYTHONPATH): each
# threading.Thread names its OS thread after itself (sesame's loop is "sesame-grpc-loop",
# grpc.aio's poller "Thread-N (_poll_wrapper)").  The command lines stay `python -m sesame ...`.

THREAD_NAMER = r'''
import ctypes, threading
try:
    _prctl = ctypes.CDLL(None).prctl
    _orig = threading.Thread._bootstrap_inner
    def _bootstrap_inner(self, _orig=_orig):
        try:
            _prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except Exception:
            pass
        _orig(self)
    threading.Thread._bootstrap_inner = _bootstrap_inner
except Exception:
    pass
'''


def _name_threads_here() -> None:
    exec(compile(THREAD_NAMER, "<thread-namer>", "exec"), {})


def _role(comm: str) -> str:
    if comm.startswith("sesame-grpc-loo"):
        return "bridge loop"
    if "_poll" in comm:
        return "grpc.aio poller"
    return "other threads (grpc core)"


class ProcCPU(nc.CPU):
    """``nc.CPU`` with thread roles read from comm at each snapshot, and machine load."""

    def snapshot(self) -> dict:
        for name, (pid, roles) in self.procs.items():
            if name in self.trees:
                continue
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    t = int(tid)
                    if t not in roles:
                        with open(f"/proc/{pid}/task/{tid}/comm") as f:
                            roles[t] = _role(f.read().strip())
            except OSError:
                pass
        snap = super().snapshot()
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        idle = cpu[3] + cpu[4]  # idle + iowait
        snap["_machine"] = {"busy": (sum(cpu[:8]) - idle) / self.tick}
        return snap

    def delta(self, a: dict, b: dict) -> dict:
        out = super().delta(a, b)
        busy = b["_machine"]["busy"] - a["_machine"]["busy"]
        ours = sum(v["total"] for v in out.values())
        out["machine_busy"] = round(busy, 2)
        out["not_ours"] = round(max(busy - ours, 0.0), 2)
        return out


def _load() -> dict:
    la = os.getloadavg()
    # top's first iteration reports CPU since boot; the second one covers the last 0.5 s
    text = subprocess.run(["top", "-bn2", "-d0.5"], capture_output=True, text=True).stdout
    top = ("top -" + text.split("\ntop -")[-1]).splitlines()
    procs = []
    for ln in top[7:]:
        f = ln.split()
        if len(f) >= 12:
            try:
                if float(f[8]) >= 5.0:
                    procs.append(f"{f[11]}({f[0]}) {f[8]}%")
            except ValueError:
                pass
    # top's %Cpu line is unreliable in some VMs; measure the machine's busy share directly
    def stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:8]]

    a = stat()
    time.sleep(0.5)
    b = stat()
    d = [y - x for x, y in zip(a, b, strict=True)]
    busy = round(100 * (sum(d) - d[3] - d[4]) / max(sum(d), 1), 1)
    return {"loadavg": [round(x, 2) for x in la], "busy_pct_0.5s": busy, "busy_procs": procs[:8]}


# --- the hub and the remote ----------------------------------------------------------------


class SesameStack:
    """A hub and one remote agent as child processes, in a temp data dir."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.dir = Path(tempfile.mkdtemp(prefix="sesame-e2e-bench-"))
        self.data = self.dir / "data"
        self.hub: subprocess.Popen | None = None
        self.remote: subprocess.Popen | None = None
        self.port: int | None = None
        self.client_token = ""
        self.forwards: dict[str, subprocess.Popen] = {}  # `sesame forward` per target
        (self.dir / "namer").mkdir()
        (self.dir / "namer" / "sitecustomize.py").write_text(THREAD_NAMER)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(self.dir / "namer"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("GRPC_VERBOSITY", "ERROR")

    def _sesame(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([self.python, "-m", "sesame", *argv], env=self.env,
                                stdin=subprocess.DEVNULL, **kw)

    def _token(self, *argv: str) -> str:
        out = subprocess.run([self.python, "-m", "sesame", "token", "create", "--data-dir",
                              str(self.data), *argv], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"sesame token create {' '.join(argv)}: {out.stderr.strip()}")
        return out.stdout.strip()

    def start(self, vhost_port: int | None = None, via: Any = None) -> None:
        """Hub, then the remote; ``via(hub_port)`` gives the port the remote dials instead
        of the hub's own (a delay proxy in front of it: ``--wan-delay-ms``)."""
        port_file = self.dir / "hub.port"
        doors = ["--vhost", f"tcp:{vhost_port}:interface=127.0.0.1"] if vhost_port else []
        self.hub = self._sesame(
            "hub", "--listen", "tcp:0:interface=127.0.0.1", "--port-file", str(port_file),
            "--data-dir", str(self.data), *doors,
            stdout=open(self.dir / "hub.out", "w"), stderr=open(self.dir / "hub.log", "w"))
        end = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.hub.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"hub did not start: {self.log('hub')}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        token_file = self.dir / "edge-1.token"
        token_file.write_text(self._token("--remote", REMOTE) + "\n")
        self.client_token = self._token("--client")
        self.remote = self._sesame(
            "remote", "--hub", f"127.0.0.1:{via(self.port) if via else self.port}", "--name", REMOTE,
            "--token-file", str(token_file), "--ca", str(self.ca), "--allow", "127.0.0.1:*",
            stdout=open(self.dir / "remote.out", "w"), stderr=open(self.dir / "remote.log", "w"))
        end = time.monotonic() + 30
        while "registered" not in self.log("remote"):
            if self.remote.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"remote did not register: {self.log('remote')}")
            time.sleep(0.05)

    def route(self, kind: str, match: str, target: str) -> str:
        """``sesame route add`` on the running hub's store; the hub picks it up by itself."""
        out = subprocess.run([self.python, "-m", "sesame", "route", "add", kind, match, target,
                              "--data-dir", str(self.data)], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sesame route add {kind} {match} {target}: {out.stderr.strip()}")
        return out.stdout.strip()

    @property
    def ca(self) -> Path:
        return self.data / "ca.pem"

    def log(self, which: str) -> str:
        try:
            return (self.dir / f"{which}.log").read_text()
        except OSError:
            return ""

    def endpoint_string(self, port: int) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

        return (f"sesame:remote={REMOTE}:host=127.0.0.1:port={port}"
                f":hub=127.0.0.1\\:{self.port}:ca={esc(str(self.ca))}:token={esc(self.client_token)}")

    def stop(self) -> dict:
        """Stop both (SIGTERM, then SIGKILL after 10 s); exit codes and log warnings."""
        out = {}
        forwards = [(f"forward-{k}", p) for k, p in self.forwards.items()]
        for name, p in (*forwards, ("remote", self.remote), ("hub", self.hub)):
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                out[f"{name}_killed"] = True
            out[f"{name}_exit"] = p.returncode
            notable = [ln for ln in self.log(name).splitlines()
                       if any(w in ln for w in ("#error", "#warn", "Traceback", "Error"))]
            if notable:
                out[f"{name}_log_warnings"] = notable[:20]
        shutil.rmtree(self.dir, ignore_errors=True)
        return out


# --- the run -----------------------------------------------------------------------------


class PyFrp:
    """py-frp (PyPI ``py-simple-nat-tunnel``, pure-Python asyncio, TLS with a pinned
    fingerprint) as a second peer: ``py-frp server`` and ``py-frp client`` publishing the
    same targets, client -> frps port -> frpc -> target, the shape of a hub port map.
    Installed into its own virtualenv (``$SESAME_BENCH_PYFRP_VENV``, default
    ``~/.cache/sesame-bench/py-frp``) on first use; the processes (a supervisor and its
    child each) run in their own sessions and are stopped by process group."""

    def __init__(self) -> None:
        self.venv = Path(os.environ.get("SESAME_BENCH_PYFRP_VENV")
                         or Path.home() / ".cache" / "sesame-bench" / "py-frp")
        self.dir = Path(tempfile.mkdtemp(prefix="sesame-e2e-pyfrp-"))
        self.procs: list[subprocess.Popen] = []
        self.version = ""

    def available(self) -> str | None:
        """None when py-frp can run (installing it if need be), else why not."""
        exe = self.venv / "bin" / "py-frp"
        if not exe.exists():
            try:
                subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True,
                               capture_output=True, timeout=120)
                subprocess.run([str(self.venv / "bin" / "pip"), "install", "-q",
                                "py-simple-nat-tunnel"], check=True, capture_output=True,
                               timeout=600)
            except (subprocess.SubprocessError, OSError) as exc:
                return f"cannot install py-simple-nat-tunnel: {exc}"
        out = subprocess.run([str(self.venv / "bin" / "pip"), "show", "py-simple-nat-tunnel"],
                             capture_output=True, text=True, timeout=60)
        self.version = next((ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines()
                             if ln.startswith("Version:")), "?")
        return None

    def _spawn(self, *argv: str, name: str) -> subprocess.Popen:
        p = subprocess.Popen([str(self.venv / "bin" / "py-frp"), *argv],
                             stdout=open(self.dir / f"{name}.out", "w"),
                             stderr=open(self.dir / f"{name}.err", "w"),
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, target_ports: list[int], via: Any = None) -> list[int]:
        """Publish ``target_ports``; the public ports, once they accept connections.
        ``via(port)``: the port frpc dials instead of frps's (a delay proxy)."""
        control = nc._free_port()
        token = os.urandom(16).hex()
        (self.dir / "frps.toml").write_text(
            f'bindAddr = "127.0.0.1"\nbindPort = {control}\nauth.token = "{token}"\n')
        self._spawn("server", "-c", str(self.dir / "frps.toml"), name="frps")
        end = time.monotonic() + 30
        fp = ""
        while not fp:
            text = (self.dir / "frps.out").read_text()
            fp = next((ln.split()[1] for ln in text.splitlines()
                       if ln.startswith("tls_fingerprint ")), "")
            if not fp:
                if time.monotonic() > end or self.procs[0].poll() is not None:
                    raise RuntimeError(f"py-frp server did not start: "
                                       f"{(self.dir / 'frps.err').read_text()[-500:]}")
                time.sleep(0.05)
        public = [nc._free_port() for _ in target_ports]
        rows = "".join(
            f'\n[[proxies]]\nname = "t{i}"\ntype = "tcp"\nlocalIP = "127.0.0.1"\n'
            f"localPort = {tp}\nremotePort = {pp}\n"
            for i, (tp, pp) in enumerate(zip(target_ports, public, strict=True)))
        (self.dir / "frpc.toml").write_text(
            f'serverAddr = "127.0.0.1"\nserverPort = {via(control) if via else control}\n'
            f'auth.token = "{token}"\nserverFingerprint = "{fp}"\n' + rows)
        self._spawn("client", "-c", str(self.dir / "frpc.toml"), name="frpc")
        for pp in public:
            nc._wait_port(pp, 30)
        return public

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


async def _http_rounds(args: argparse.Namespace, web_port: int, vhost_port: int) -> dict:
    """requests/s with ``--http-conns`` keep-alive connections: straight to the web server,
    then through the hub's vhost front door (hub → remote → web server), alternating."""
    from twisted.internet.threads import deferToThread

    def one(port: int) -> dict:
        out = subprocess.run([sys.executable, str(HERE / "httpload.py"), "--port", str(port),
                              "--host", "web.bench", "--conns", str(args.http_conns),
                              "--seconds", str(args.seconds)], capture_output=True, text=True,
                             timeout=args.seconds + 60)
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}

    runs: dict[str, list] = {"direct": [], "vhost": []}
    for rnd in range(args.repeat):
        for path, port in (("direct", web_port), ("vhost", vhost_port)):
            r = await deferToThread(one, port)
            runs[path].append(r)
            print(f"  {path} (round {rnd + 1}) http: {json.dumps(r)}", file=sys.stderr, flush=True)
    med = {p: nc._median_run(rs) for p, rs in runs.items()}
    return {"median": med, "rounds": runs,
            "vhost_vs_direct_rps": _ratio(med["vhost"].get("rps"), med["direct"].get("rps"))}


def _profile(stack: SesameStack) -> list[subprocess.Popen]:
    """``SESAME_BENCH_PROFILE=DIR``: ``py-spy record`` the hub and the remote for the whole
    measured part (DIR/hub.txt, DIR/remote.txt, collapsed stacks; extra py-spy arguments in
    ``SESAME_BENCH_PYSPY``, e.g. ``--native``).  ``SESAME_BENCH_PERF=DIR``: ``perf record``
    them instead (DIR/hub.data, DIR/remote.data; extra arguments in ``SESAME_BENCH_PERF_ARGS``,
    e.g. ``--call-graph dwarf``)."""
    perf = os.environ.get("SESAME_BENCH_PERF")
    if perf:  # `perf record` instead: C, kernel and Python (as the interpreter's frames)
        Path(perf).mkdir(parents=True, exist_ok=True)
        return [subprocess.Popen(["perf", "record", "-F", "999", "-p", str(p.pid), "-o",
                                  str(Path(perf) / f"{name}.data"),
                                  *os.environ.get("SESAME_BENCH_PERF_ARGS", "").split()],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name, p in (("hub", stack.hub), ("remote", stack.remote))]
    where = os.environ.get("SESAME_BENCH_PROFILE")
    if not where:
        return []
    Path(where).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [subprocess.Popen([spy, "record", "--pid", str(p.pid), "--format", "raw", "--rate", "250", *os.environ.get("SESAME_BENCH_PYSPY", "").split(),
                              "--threads", "--output", str(Path(where) / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, p in (("hub", stack.hub), ("remote", stack.remote))]


def client_main(args: argparse.Namespace) -> None:
    _name_threads_here()
    import grpc
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import clientFromString

    from sesame.bridge._loop import get_bridge

    load_before = _load()
    print(f"load before: {json.dumps(load_before)}", file=sys.stderr, flush=True)
    children: list[subprocess.Popen] = []
    stack = SesameStack(sys.executable)
    sshd = None
    ssh_note = None
    pyfrp = None
    pyfrp_note = None
    report: dict = {}
    names = ("sink", "source", "echo")
    try:
        tchild, targets = nc._spawn([sys.executable, str(HERE / "netconn.py"), "--serve", "targets"])
        children.append(tchild)
        vhost_port = nc._free_port() if args.front_doors else None
        def delay_to(port: int) -> int:
            """A delay proxy (``--wan-delay-ms`` each way) in front of ``port``; its port."""
            child, info = nc._spawn([sys.executable, str(HERE / "delayproxy.py"), "--delay-ms",
                                     str(args.wan_delay_ms), "--forward", f"127.0.0.1:{port}"])
            children.append(child)
            return info["ports"][0]

        stack.start(vhost_port, via=delay_to if args.wan_delay_ms else None)
        if args.front_doors:
            # front doors on the same hub: a tcp port map per target, and a vhost route to a
            # Twisted web server beside the targets (reached by the remote over NetConn)
            wchild, web = nc._spawn([sys.executable, str(HERE / "httpload.py"), "--serve"])
            children.append(wchild)
            port_map = {k: nc._free_port() for k in names}
            for k in names:
                stack.route("tcp", str(port_map[k]), f"127.0.0.1:{targets[k]}@{REMOTE}")
            stack.route("http", "web.bench", f"127.0.0.1:{web['web']}@{REMOTE}")
            for k in names:
                nc._wait_port(port_map[k], 30)
        forward_ports: dict[str, int] = {}
        if not args.paths or "forward" in args.paths:
            # the `sesame forward` CLI, one process per target: an accepted socket spliced
            # with its NetConn connection through the hub (the path a user's ssh/psql takes)
            for k in names:
                forward_ports[k] = nc._free_port()
                fwd = stack._sesame("forward", f"tcp:{forward_ports[k]}:interface=127.0.0.1",
                                    stack.endpoint_string(targets[k]),
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(stack.dir / f"forward-{k}.log", "w"))
                stack.forwards[k] = fwd  # stopped with the stack
            for k in names:
                nc._wait_port(forward_ports[k], 30)
        if args.ssh and (not args.paths or "ssh_R" in args.paths):
            ssh_note = nc.SSHD.available()
            if ssh_note is None:
                try:
                    sshd = nc.SSHD(cipher=args.ssh_cipher)
                    sshd.start()
                    ssh_ports = dict(zip(names, sshd.forward(
                        "-R", [targets[k] for k in names],
                        via_port=delay_to(sshd.port) if args.wan_delay_ms else None),
                                         strict=True))
                except Exception as exc:  # noqa: BLE001 - optional peer figure
                    ssh_note = f"ssh setup failed: {exc}"
                    if sshd:
                        sshd.stop()
                        sshd = None
            if ssh_note:
                print(f"ssh: skipped: {ssh_note}", file=sys.stderr, flush=True)
        if args.pyfrp and (not args.paths or "py_frp" in args.paths):
            pyfrp = PyFrp()
            pyfrp_note = pyfrp.available()
            if pyfrp_note is None:
                try:
                    pyfrp_ports = dict(zip(names, pyfrp.start(
                        [targets[k] for k in names],
                        via=delay_to if args.wan_delay_ms else None), strict=True))
                except Exception as exc:  # noqa: BLE001 - optional peer figure
                    logs = "; ".join((pyfrp.dir / f).read_text()[-300:].strip()
                                     for f in ("frps.err", "frpc.err")
                                     if (pyfrp.dir / f).exists())
                    pyfrp_note = f"py-frp setup failed: {exc} ({logs})"
            if pyfrp_note:
                print(f"py-frp: skipped: {pyfrp_note}", file=sys.stderr, flush=True)
                pyfrp.stop()
                pyfrp = None
    except BaseException:
        for c in children:
            c.stdin.close()
        report["stack"] = stack.stop()
        if sshd:
            sshd.stop()
        if pyfrp:
            pyfrp.stop()
        raise

    bridge = get_bridge()
    bench = nc.Bench(reactor, args)
    cpu = ProcCPU()
    cpu.add("client (this process)", os.getpid(),
            {bridge._thread.native_id: "bridge loop"} if bridge.owns_thread else {})
    cpu.add("hub", stack.hub.pid)
    cpu.add("remote", stack.remote.pid)
    cpu.add("targets", tchild.pid)
    if sshd:
        cpu.add("sshd (all processes)", sshd.procs[0].pid, tree=True, main="process")
        cpu.add("ssh -R client", sshd.procs[1].pid, main="process")

    paths: dict[str, dict] = {
        "direct": {k: bench.direct(targets[k]) for k in names},
        "hub": {k: clientFromString(reactor, stack.endpoint_string(targets[k])).connect for k in names},
    }
    if args.front_doors:
        paths["port_map"] = {k: bench.direct(port_map[k]) for k in names}
    if forward_ports:
        paths["forward"] = {k: bench.direct(forward_ports[k]) for k in names}
        for k, p in stack.forwards.items():
            cpu.add(f"sesame forward ({k})", p.pid)
    if sshd:
        paths["ssh_R"] = {k: bench.direct(p) for k, p in ssh_ports.items()}
    if pyfrp:
        paths["py_frp"] = {k: bench.direct(p) for k, p in pyfrp_ports.items()}
        cpu.add("py-frp server (all processes)", pyfrp.procs[0].pid, tree=True, main="process")
        cpu.add("py-frp client (all processes)", pyfrp.procs[1].pid, tree=True, main="process")
    warm_hub = paths["hub"]["echo"]
    if args.paths:
        paths = {k: v for k, v in paths.items() if k in args.paths}
    steps = {
        "upload": lambda label, c: bench.upload(label, c["sink"], args.seconds, args.mib),
        "download": lambda label, c: bench.download(label, c["source"], args.seconds, args.mib),
        "rtt_64B": lambda label, c: bench.rtt(label, c["echo"], args.rtt_calls),
        "connect_echo": lambda label, c: bench.connect_echo(label, c["echo"], args.connects),
        "concurrent_echo": lambda label, c: bench.concurrent(label, c["echo"], args.conns, MIB),
    }
    if args.conns_small:
        # the hub refuses a remote's 65th outstanding stream request (RESOURCE_EXHAUSTED), so
        # also time a burst the hub accepts
        steps[f"concurrent_echo_{args.conns_small}"] = (
            lambda label, c: bench.concurrent(label, c["echo"], args.conns_small, MIB))
    if args.steps:
        steps = {k: v for k, v in steps.items() if k in args.steps}
    profilers = _profile(stack)

    async def run() -> None:
        # first connection through the hub sets up the TLS channel; keep it out of the figures
        t0 = time.perf_counter()
        await bench.bounded("hub warm-up", bench.rtt("hub warm-up", warm_hub, 20), 60)
        report["hub_first_connection_s"] = round(time.perf_counter() - t0, 3)
        if "ssh_R" in paths:
            await bench.bounded("ssh warm-up", bench.rtt("ssh warm-up", paths["ssh_R"]["echo"], 20), 60)
        runs: dict[str, dict[str, list]] = {p: {s: [] for s in steps} for p in paths}
        for rnd in range(args.repeat):
            for step, fn in steps.items():
                for path, conn in paths.items():
                    label = f"{path} (round {rnd + 1})"
                    before = cpu.snapshot()
                    # (with --wan-delay-ms every round trip and connection takes 2 x the delay more)
                    slow = 2 * args.wan_delay_ms / 1000 * 1.5 * (
                        args.rtt_calls + 200 + args.connects + args.conns)
                    r = await bench.bounded(f"{label}: {step}", fn(label, conn),
                                            3 * args.seconds + 60 + slow)
                    r["cpu_s"] = cpu.delta(before, cpu.snapshot())
                    runs[path][step].append(r)
                    brief = {k: v for k, v in r.items() if k != "cpu_s"}
                    print(f"  {label} {step}: {json.dumps(brief)}", file=sys.stderr, flush=True)
        results = {p: {s: nc._median_run(rs) for s, rs in per.items()} for p, per in runs.items()}
        report["results"] = results
        if args.front_doors:
            report["http_keepalive"] = await _http_rounds(args, web["web"], vhost_port)

        def fig(path, step, key):
            r = results.get(path, {}).get(step, {})
            return r.get(key) if r.get("ok", True) else None  # no ratio from a failed figure

        def ratios(a: str, b: str, *figures: tuple[str, str, str]) -> dict:
            """{name: path a's figure / path b's} for (name, step, key) figures."""
            return {name: _ratio(fig(a, step, key), fig(b, step, key))
                    for name, step, key in figures}

        BASIC = (("upload", "upload", "MiBps"), ("download", "download", "MiBps"),
                 ("rtt_p50", "rtt_64B", "p50_us"), ("connect_echo_p50", "connect_echo", "p50_us"))

        report["ratios_hub_vs_direct"] = {
            "upload": _ratio(fig("hub", "upload", "MiBps"), fig("direct", "upload", "MiBps")),
            "download": _ratio(fig("hub", "download", "MiBps"), fig("direct", "download", "MiBps")),
            "rtt_p50": _ratio(fig("hub", "rtt_64B", "p50_us"), fig("direct", "rtt_64B", "p50_us")),
            "concurrent_seconds": _ratio(fig("hub", "concurrent_echo", "seconds"),
                                         fig("direct", "concurrent_echo", "seconds")),
        }
        small = f"concurrent_echo_{args.conns_small}"
        if args.conns_small:
            report["ratios_hub_vs_direct"][f"{small}_seconds"] = _ratio(
                fig("hub", small, "seconds"), fig("direct", small, "seconds"))
        if "ssh_R" in results:
            r = {
                "upload": _ratio(fig("hub", "upload", "MiBps"), fig("ssh_R", "upload", "MiBps")),
                "download": _ratio(fig("hub", "download", "MiBps"), fig("ssh_R", "download", "MiBps")),
                "rtt_p50": _ratio(fig("hub", "rtt_64B", "p50_us"), fig("ssh_R", "rtt_64B", "p50_us")),
                "rtt_p99": _ratio(fig("hub", "rtt_64B", "p99_us"), fig("ssh_R", "rtt_64B", "p99_us")),
                "connect_echo_p50": _ratio(fig("hub", "connect_echo", "p50_us"),
                                           fig("ssh_R", "connect_echo", "p50_us")),
                "concurrent_seconds": _ratio(fig("hub", "concurrent_echo", "seconds"),
                                             fig("ssh_R", "concurrent_echo", "seconds")),
            }
            if args.conns_small:
                r[f"{small}_seconds"] = _ratio(fig("hub", small, "seconds"), fig("ssh_R", small, "seconds"))
            report["ratios_hub_vs_ssh_R"] = r
            report["goals"] = {
                "throughput_ge_ssh_R": (None if r["upload"] is None or r["download"] is None
                                        else r["upload"] >= 1 and r["download"] >= 1),
                "rtt_p50_le_3x_ssh_R": None if r["rtt_p50"] is None else r["rtt_p50"] <= 3,
            }
            report["ssh_cipher"] = sshd.cipher()
        elif args.ssh:
            results["ssh_R"] = {"skipped": ssh_note}
        if "py_frp" in results:
            report["py_frp_version"] = pyfrp.version
            report["ratios_port_map_vs_py_frp"] = ratios("port_map", "py_frp", *BASIC)
        elif args.pyfrp and pyfrp_note:
            results["py_frp"] = {"skipped": pyfrp_note}
        if "forward" in results and "ssh_R" in results and "skipped" not in results["ssh_R"]:
            report["ratios_forward_vs_ssh_R"] = ratios("forward", "ssh_R", *BASIC)
        if "port_map" in results and "ssh_R" in results and "skipped" not in results["ssh_R"]:
            report["ratios_port_map_vs_ssh_R"] = ratios(
                "port_map", "ssh_R", *BASIC, ("concurrent_seconds", "concurrent_echo", "seconds"))

    # watchdog: past --max-seconds stop the reactor (partial report); 30 s later, hard exit
    def watchdog() -> None:
        report["error"] = f"watchdog: run exceeded {args.max_seconds:g}s"
        reactor.callFromThread(reactor.stop)

        def hard() -> None:
            print("watchdog: reactor did not stop; killing children", file=sys.stderr, flush=True)
            for p in (stack.remote, stack.hub, *children):
                if p is not None and p.poll() is None:
                    p.kill()
            os._exit(3)

        t = threading.Timer(30, hard)
        t.daemon = True
        t.start()

    dog = threading.Timer(args.max_seconds, watchdog)
    dog.daemon = True
    dog.start()

    def main_d():
        d = defer.ensureDeferred(run())
        d.addErrback(lambda f: (report.setdefault("error", f.getTraceback()), f.printTraceback(file=sys.stderr)))
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    t0 = time.perf_counter()
    reactor.callWhenRunning(main_d)
    reactor.run()
    wall = time.perf_counter() - t0
    dog.cancel()
    for prof in profilers:
        prof.send_signal(signal.SIGINT)
        try:
            prof.wait(60)
        except subprocess.TimeoutExpired:
            prof.kill()
    report["processes"] = stack.stop()
    for c in children:
        c.stdin.close()
    for c in children:
        try:
            c.wait(10)
        except subprocess.TimeoutExpired:
            c.kill()
    if sshd:
        sshd.stop()
    if pyfrp:
        pyfrp.stop()
    load_after = _load()
    print(f"load after: {json.dumps(load_after)}", file=sys.stderr, flush=True)
    doc = {
        "bench": "e2e", "grpc_io": GRPC_IO, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
        "twisted": __import__("twisted").__version__, "reactor": type(reactor).__name__,
        "tls": "generated hub CA (grpc ssl credentials) on client→hub and remote→hub",
        "seconds": args.seconds, "mib": args.mib, "rtt_calls": args.rtt_calls,
        "conns": args.conns, "conns_small": args.conns_small, "repeat": args.repeat, "write_size": args.write_size,
        "wan_delay_ms": args.wan_delay_ms,
        "wall_seconds": round(wall, 1), "load_before": load_before, "load_after": load_after,
        **report, "failures": bench.failures,
    }
    print(json.dumps(doc, indent=2))
    if bench.failures or "error" in report:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="time box per bulk run (stops at a 1 MiB boundary)")
    p.add_argument("--mib", type=int, default=512, help="size cap per bulk run")
    p.add_argument("--rtt-calls", type=int, default=3000, help="64-byte round trips (after 200 warm-up)")
    p.add_argument("--connects", type=int, default=300,
                   help="new connections, one at a time, each timed connect -> first 64-byte echo")
    p.add_argument("--conns", type=int, default=200, help="concurrent connections echoing 1 MiB each")
    p.add_argument("--conns-small", type=int, default=50,
                   help="also time a burst of this many (under the hub's 64 outstanding stream "
                        "requests per remote; 0: skip)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; each figure is the median round")
    p.add_argument("--write-size", type=int, default=64 * 1024, help="bytes per transport.write when uploading")
    p.add_argument("--no-ssh", dest="ssh", action="store_false", help="skip the ssh -R peer")
    p.add_argument("--ssh-cipher", default=None,
                   help="the ssh -R client's cipher (-c), e.g. aes128-gcm@openssh.com; "
                        "default: ssh's own default")
    p.add_argument("--wan-delay-ms", type=float, default=0,
                   help="one-way delay (bench/delayproxy.py) between the hub and the remote, "
                        "and between sshd and ssh -R: a far-away remote (10: 20 ms RTT)")
    p.add_argument("--no-py-frp", dest="pyfrp", action="store_false",
                   help="skip the py-frp peer (installed into its own venv on first use)")
    p.add_argument("--no-front-doors", dest="front_doors", action="store_false",
                   help="skip the hub's front doors (tcp port map path, vhost HTTP requests/s)")
    p.add_argument("--http-conns", type=int, default=32,
                   help="keep-alive connections for the HTTP requests/s figure")
    p.add_argument("--paths", nargs="*", help="only these paths (direct hub forward port_map ssh_R py_frp; "
                   "hub always runs: it warms the channel)")
    p.add_argument("--steps", nargs="*", help="only these steps (upload download rtt_64B "
                   "concurrent_echo concurrent_echo_N)")
    p.add_argument("--max-seconds", type=float, default=600, help="watchdog for the whole run")
    client_main(p.parse_args())


if __name__ == "__main__":
    main()
