"""
Helpers for ``tests/test_e2e.py``: real ``sesame`` / ``twistd`` / ``sshd`` processes, real
sockets on 127.0.0.1 (ephemeral ports), real TLS, and waits that end on a line, a file or a
condition (with a deadline), never on a fixed sleep.

* :class:`Procs` starts processes and collects their stdout/stderr line by line (reader
  threads); :meth:`Proc.wait_line` waits for a regex; teardown terminates (then kills) and
  reaps every process a test started.
* :func:`start_hub`, :func:`start_remote`, :func:`start_forward`: the three ``sesame``
  commands of the quick start, each waited for until it is ready (port file, ``registered``
  log line, ``forwarding HOST:PORT`` line).
* :class:`TargetServer`: a threaded TCP server in the test process, the thing behind the
  remote.  The first line a client sends picks the mode: ``sink`` (read to EOF, answer the
  sha256 hex of what arrived), ``source N SEED`` (send N deterministic bytes, then EOF),
  ``echo`` (echo until EOF).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SESAME = [PY, "-m", "sesame"]
WAIT = 20.0  # upper bound for anything that should happen "promptly"
CHUNK = 1 << 20


def wait_until(pred: Callable[[], Any], timeout: float = WAIT, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: this checkout importable, no inherited SESAME_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESAME_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["GRPC_VERBOSITY"] = "ERROR"
    env.update(extra)
    return env


def twistd() -> str | None:
    """The ``twistd`` next to this interpreter (the venv's), else one on PATH."""
    here = Path(PY).parent / "twistd"
    return str(here) if here.exists() else shutil.which("twistd")


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot report their own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -------------------------------------------------------------------------


class Output:
    """The lines of one pipe, collected by a reader thread."""

    def __init__(self, pipe: Any, label: str) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line arrived
        self.closed = False
        self.label = label
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True,
                                        name=f"e2e-{label}")
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._cond:
                    self.lines.append(line)
                    self.times.append(time.monotonic())
                    self._cond.notify_all()
        finally:
            pipe.close()
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def find(self, pattern: str, start: int = 0) -> tuple[int, re.Match[str]] | None:
        rx = re.compile(pattern)
        with self._cond:
            for i in range(start, len(self.lines)):
                m = rx.search(self.lines[i])
                if m:
                    return i, m
        return None

    def wait(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match[str]] | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return None
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class Proc:
    """One child process with its output collected."""

    def __init__(self, name: str, argv: Sequence[str], *, cwd: Path | str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv, cwd=cwd, env=env if env is not None else child_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = Output(self.popen.stdout, f"{name}.out")
        self.err = Output(self.popen.stderr, f"{name}.err")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_line(self, pattern: str, timeout: float = WAIT, *, stream: str = "err",
                  start: int = 0) -> re.Match[str]:
        """The first line (at index ``start`` or later) matching ``pattern``; AssertionError
        with the process's output if none comes before the deadline or the stream ends."""
        out = self.err if stream == "err" else self.out
        got = out.wait(pattern, timeout, start)
        if got is None:
            raise AssertionError(f"{self.name}: no line matching {pattern!r} on std{stream} "
                                 f"within {timeout:g}s (exit {self.popen.poll()})\n"
                                 f"{self.describe()}")
        return got[1]

    def wait_line_at(self, pattern: str, timeout: float = WAIT, *, start: int = 0
                     ) -> tuple[int, float, re.Match[str]]:
        """Like :meth:`wait_line` (stderr): (line index, arrival time, match)."""
        m = self.wait_line(pattern, timeout, start=start)
        i, _ = self.err.find(pattern, start)  # type: ignore[misc]
        return i, self.err.times[i], m

    def mark(self, stream: str = "err") -> int:
        """The index of the next line of ``stream`` (for :meth:`wait_line`'s ``start``)."""
        out = self.err if stream == "err" else self.out
        with out._cond:
            return len(out.lines)

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g}s\n"
                                 f"{self.describe()}") from None
        self.out.join(5)
        self.err.join(5)
        return rc

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(WAIT)

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(WAIT)
        self.out.join(5)
        self.err.join(5)

    def describe(self, tail: int = 40) -> str:
        def last(o: Output) -> str:
            return "\n".join(f"    {line}" for line in o.lines[-tail:])

        return (f"--- {self.name} (pid {self.pid}, exit {self.popen.poll()}): "
                f"{' '.join(self.argv)}\n  stdout:\n{last(self.out)}\n  stderr:\n{last(self.err)}")


class Procs:
    """The processes of one test; :meth:`stop_all` (the fixture's teardown) reaps them all."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> Proc:
        p = Proc(name, argv, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - keep reaping the others
                p.popen.kill()

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)


def sesame(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short ``sesame`` command to completion."""
    return subprocess.run([*SESAME, *args], cwd=cwd, env=env if env is not None else child_env(),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# --- hub, remote, forward ----------------------------------------------------------------


@dataclass
class Hub:
    proc: Proc
    port: int
    data_dir: Path
    port_file: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data_dir / "ca.pem"

    def token(self, *args: str) -> str:
        """``sesame token create --data-dir D ARGS`` → the token (the only stdout line)."""
        r = sesame("token", "create", "--data-dir", str(self.data_dir), *args)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 1 and lines[0].strip(), r.stdout
        return lines[0].strip()

    def token_file(self, path: Path, *args: str) -> Path:
        path.write_text(self.token(*args) + "\n")
        return path

    def client_env(self, token: str, **extra: str) -> dict[str, str]:
        return child_env(SESAME_HUB=self.address, SESAME_CA=str(self.ca), SESAME_TOKEN=token,
                         **extra)


def start_hub(procs: Procs, data_dir: Path, *, port: int = 0, name: str = "hub",
              cwd: Path | None = None) -> Hub:
    """``sesame hub`` on 127.0.0.1 (port 0: ephemeral), ready once its --port-file is written."""
    port_file = data_dir.parent / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = procs.start(name, [*SESAME, "hub", "--listen", f"tcp:{port}:interface=127.0.0.1",
                              "--data-dir", str(data_dir), "--port-file", str(port_file)],
                       cwd=cwd or data_dir.parent)

    def bound() -> int | None:
        if not proc.alive():
            raise AssertionError(f"the hub exited\n{proc.describe()}")
        text = port_file.read_text() if port_file.exists() else ""
        return int(text) if text.endswith("\n") else None

    got = wait_until(bound, what=f"{port_file} (hub)")
    assert port in (0, got), (port, got)
    return Hub(proc, got, data_dir, port_file)


REGISTERED = r"registered (\S+) with the hub"


def start_remote(procs: Procs, hub: Hub, name: str, token_file: Path, allow: Sequence[str], *,
                 ca: Path | None = None, proc_name: str | None = None,
                 wait: bool = True) -> Proc:
    """``sesame remote``; with ``wait``, returns once it logged that it registered."""
    argv = [*SESAME, "remote", "--hub", hub.address, "--name", name,
            "--token-file", str(token_file), "--ca", str(ca or hub.ca)]
    for a in allow:
        argv += ["--allow", a]
    proc = procs.start(proc_name or f"remote-{name}", argv, cwd=token_file.parent)
    if wait:
        proc.wait_line(REGISTERED)
    return proc


FORWARDING = r"^forwarding (?:(?P<hostport>\S+):(?P<port>\d+)|.*port=(?P<rport>\d+)\)) -> "


def start_forward(procs: Procs, connect: str, env: dict[str, str], *,
                  name: str = "forward", cwd: Path | None = None) -> tuple[Proc, int]:
    """``sesame forward tcp:0:interface=127.0.0.1 CONNECT`` → (process, the port it listens on)."""
    proc = procs.start(name, [*SESAME, "forward", "tcp:0:interface=127.0.0.1", connect],
                       env=env, cwd=cwd)
    m = proc.wait_line(FORWARDING)
    return proc, int(m.group("port") or m.group("rport"))


# --- the target behind the remote ------------------------------------------------------------


def pattern_chunks(n: int, seed: int) -> Iterator[bytes]:
    """``n`` deterministic pseudo-random bytes, in chunks (the source's payload)."""
    rng = random.Random(seed)
    while n > 0:
        k = min(n, CHUNK)
        yield rng.randbytes(k)
        n -= k


def pattern_sha256(n: int, seed: int) -> str:
    h = hashlib.sha256()
    for c in pattern_chunks(n, seed):
        h.update(c)
    return h.hexdigest()


class _TargetHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        server: TargetServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.connections += 1
        f = sock.makefile("rb", buffering=0)
        head = b""
        while not head.endswith(b"\n"):
            b = f.read(1)
            if not b:
                return
            head += b
        words = head.decode().split()
        if words[0] == "sink":
            h = hashlib.sha256()
            total = 0
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    break
                h.update(data)
                total += len(data)
            sock.sendall(f"{h.hexdigest()} {total}\n".encode())
        elif words[0] == "source":
            for c in pattern_chunks(int(words[1]), int(words[2])):
                sock.sendall(c)
        elif words[0] == "echo":
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class TargetServer(socketserver.ThreadingTCPServer):
    """See the module docstring; ``port`` is where it listens on 127.0.0.1."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TargetHandler)
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.connections = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="e2e-target")
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(WAIT)


# --- clients ---------------------------------------------------------------------------------


def connect(port: int, timeout: float = WAIT) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return bytes(buf)
        buf += data


class EchoConn:
    """A long-lived ``echo`` connection through a forward."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.sock.sendall(b"echo\n")
        self.n = 0

    def roundtrip(self) -> None:
        self.n += 1
        msg = f"ping {self.n} ".encode() * 10
        self.sock.sendall(msg)
        assert recv_exactly(self.sock, len(msg)) == msg

    def close(self) -> None:
        self.sock.close()


def echo_once(port: int) -> None:
    """A fresh connection through a forward echoes (raises otherwise)."""
    c = EchoConn(port)
    try:
        c.roundtrip()
        c.sock.shutdown(socket.SHUT_WR)
        assert recv_all(c.sock) == b""
    finally:
        c.close()


def upload_sink(port: int, nbytes: int, seed: int, timeout: float = 120) -> tuple[str, str]:
    """Send ``nbytes`` to the sink → (sha256 we sent, sha256 the target received)."""
    sent = hashlib.sha256()
    with connect(port, timeout) as s:
        s.sendall(b"sink\n")
        for c in pattern_chunks(nbytes, seed):
            sent.update(c)
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s).decode()
    digest, _, total = reply.strip().partition(" ")
    assert total == str(nbytes), f"target received {total!r} bytes of {nbytes}: {reply!r}"
    return sent.hexdigest(), digest


def download_source(port: int, nbytes: int, seed: int, timeout: float = 120) -> tuple[str, int]:
    """Ask the source for ``nbytes`` → (sha256 of what arrived, how many bytes arrived)."""
    got = hashlib.sha256()
    total = 0
    with connect(port, timeout) as s:
        s.sendall(f"source {nbytes} {seed}\n".encode())
        s.shutdown(socket.SHUT_WR)
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            got.update(data)
            total += len(data)
    return got.hexdigest(), total


def fails_promptly(sock: socket.socket, timeout: float) -> str:
    """Wait for the peer to end ``sock``: "eof" or "reset"; AssertionError if it hangs."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        raise AssertionError(f"connection still open {timeout:g}s after its path died") from None


# --- sshd ---------------------------------------------------------------------------------


def sshd_binary() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(p, os.X_OK):
            return p
    return None


@dataclass
class Sshd:
    proc: Proc
    port: int
    client_key: Path
    user: str


def start_sshd(procs: Procs, d: Path) -> Sshd:
    """A throw-away sshd on 127.0.0.1 (generated host and client keys; our user only)."""
    import getpass

    d.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sesame-e2e-{key}",
                        "-f", str(d / key)], check=True, capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
""")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # sshd (as root) insists on its privilege-separation directory, which only the
        # service manager creates; a container that installed the package may lack it
        Path("/run/sshd").mkdir(mode=0o755)
    proc = procs.start("sshd", [sshd_binary() or "sshd", "-D", "-e", "-f", str(config)], cwd=d)
    proc.wait_line(r"Server listening on 127\.0\.0\.1 port")
    return Sshd(proc, port, d / "client_key", getpass.getuser())
