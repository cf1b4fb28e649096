"""
A throw-away ``redis-server`` for tests: :class:`RedisServer` starts one on a free
127.0.0.1 port with its data (an append-only file, no RDB snapshots) in a directory
of yours, waits until it answers ``PING``, and stops it by its PID.  It can be
killed (``SIGKILL``) and started again on the same port and directory, which is how
a test shows that what was written survives a crash::

    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url)
        token_id, token = store.create_token("client")
        server.kill()      # kill -9
        server.start()     # same port, same AOF
        assert store.verify(token)

pytest::

    @pytest.fixture(scope="module")
    def redis_server(tmp_path_factory):
        if redis_server_path() is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        with RedisServer(tmp_path_factory.mktemp("redis")) as server:
            yield server
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "RedisServerError", "redis_server_path"]

#: Seconds a server has to answer PING after it starts, and to exit after SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class RedisServerError(RuntimeError):
    """The server did not start (or stop) as asked; the message has its log's tail."""


def redis_server_path() -> str | None:
    """The ``redis-server`` executable (``$PATH``, then ``/usr/bin`` and ``/usr/sbin``),
    or None when it is not installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server",
                      "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(*words: str | bytes) -> bytes:
    """One command in RESP (binary-safe, so a password may hold anything)."""
    out = [b"*%d\r\n" % len(words)]
    for w in words:
        raw = w.encode() if isinstance(w, str) else w
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RedisServer:
    """A ``redis-server`` process of this test, on ``127.0.0.1:port`` (:attr:`url`).

    Started by the constructor (``start=False`` to start it later with :meth:`start`)
    with ``--dir directory --appendonly yes --save ''``; a context manager that stops
    it on exit.  Signals go to its PID only.

    :param directory: where the server keeps its AOF and its log (``redis.log``);
        created when missing.
    :param port: the port; default a free one, chosen once and kept across restarts.
    :param password: ``--requirepass``: clients need ``redis://:password@...``.
    :param executable: the ``redis-server`` to run (default :func:`redis_server_path`).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        password: str | None = None,
        executable: str | None = None,
        start: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.executable = executable or redis_server_path()
        if self.executable is None:
            raise RedisServerError("redis-server is not installed (apt-get install redis-server)")
        self._fixed_port = port is not None
        self.port = port if port is not None else _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Is the process alive (it may still be loading its AOF)?"""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def _argv(self) -> list[str]:
        argv = [self.executable or "redis-server", "--port", str(self.port),
                "--bind", self.host, "--protected-mode", "yes",
                "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
                "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> RedisServer:
        """Start the server (again: same port, same directory, so same AOF) and wait until
        it answers PING.  A port some other process took in the meantime makes it pick
        another one, unless the port was given or this is a restart."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port or self._proc is not None) else 5
        for attempt in range(attempts):
            self._proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
            try:
                self._wait_ready()
                return self
            except RedisServerError:
                self._reap()
                if attempt + 1 == attempts or "Address already in use" not in self._log_tail():
                    raise
                self.port = _free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        why = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RedisServerError(f"redis-server exited at start: {self._log_tail()}")
            try:
                if self.ping(timeout=1.0):
                    return
                why = "it answered PING with something else (still loading?)"
            except OSError as exc:
                why = str(exc)
            time.sleep(0.02)
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within "
                               f"{START_TIMEOUT:g} s ({why}): {self._log_tail()}")

    def ping(self, timeout: float = 1.0) -> bool:
        """Does the server answer PING with PONG now?  (OSError when it is not reachable.)"""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            request = _command("PING")
            if self.password:
                request = _command("AUTH", self.password) + request
            s.sendall(request)
            expected = (b"+OK\r\n" if self.password else b"") + b"+PONG\r\n"
            got = b""
            while len(got) < len(expected) and b"-" not in got:
                chunk = s.recv(256)
                if not chunk:
                    break
                got += chunk
            return got.startswith(expected)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (the server flushes its AOF and exits) and wait; SIGKILL after
        ``timeout`` seconds.  Nothing when it is not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (``kill -9``: no chance to flush anything) and wait for the process."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self.port} pid={self.pid}>"
