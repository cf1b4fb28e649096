"""
``sesame hub --workers N``: N hub processes on one port (SO_REUSEPORT, front doors too),
members of the cluster on a real Redis, each with a peer port of its own; a worker that
dies is restarted; SIGTERM stops them all.  Real processes, real sockets, sha256.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.e2e_support import SESAME, Procs, sesame, wait_until  # procs: conftest.py

ECHO_BYTES = 256 * 1024


@pytest.fixture
def echo():
    """A threaded echo server on 127.0.0.1; its port."""
    import socketserver
    import threading

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def echo_through(port: int, size: int = ECHO_BYTES) -> None:
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := c.recv(65536):
            got += chunk
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def start_workers(procs: Procs, tmp: Path, url: str, n: int = 2, *extra: str):
    port_file = tmp / "hub.port"
    proc = procs.start("hub", [*SESAME, "hub", "--workers", str(n), "--store", url,
                               "--listen", "tcp:0:interface=127.0.0.1",
                               "--data-dir", str(tmp / "data"), "--port-file", str(port_file),
                               *extra], cwd=tmp)
    m = proc.wait_line(rf"sesame hub: {n} workers listening on 127\.0\.0\.1:(\d+) \(pids ([\d, ]+)\)")
    pids = [int(p) for p in m.group(2).split(", ")]
    assert port_file.read_text().strip() == m.group(1)
    peers, start = set(), 0
    for _ in range(n):
        i, _t, jm = proc.wait_line_at(r"joined the cluster .*peers reach it at 127\.0\.0\.1:(\d+)",
                                      start=start)
        start = i + 1
        peers.add(int(jm.group(1)))
    return proc, int(m.group(1)), pids, sorted(peers)


def test_workers_share_a_port_and_front_doors_and_restart(procs, tmp_path, redis_server, echo):
    url = f"{redis_server.url}?prefix=w{os.getpid()}:"
    proc, port, pids, peers = start_workers(procs, tmp_path, url, 2)
    assert len(set(pids)) == 2 and len(peers) == 2 and port not in peers
    ca = tmp_path / "data" / "ca.pem"
    env = {"SESAME_STORE": url}
    tok = tmp_path / "edge.token"
    tok.write_text(sesame("token", "create", "--remote", "edge-1", env={**os.environ, **env}
                          ).stdout.strip() + "\n")
    client = sesame("token", "create", "--client", env={**os.environ, **env}).stdout.strip()
    # a tcp front door (port map), served by both workers on one port
    door = _free_port()
    r = sesame("route", "add", "tcp", str(door), f"127.0.0.1:{echo}@edge-1",
               env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    remote = procs.start("remote", [*SESAME, "remote", "--hub", f"127.0.0.1:{port}", "--name",
                                    "edge-1", "--token-file", str(tok), "--ca", str(ca),
                                    "--allow", f"127.0.0.1:{echo}"])
    remote.wait_line(r"registered \S+ with the hub")
    # through the shared port and through each worker's own port (so both are exercised
    # whichever worker the kernel gave the remote's session)
    for hub_port in (port, *peers):
        fwd = procs.start(f"fwd-{hub_port}", [*SESAME, "forward", "tcp:0:interface=127.0.0.1",
                                              f"sesame:remote=edge-1:host=127.0.0.1:port={echo}"],
                          env={**os.environ, "SESAME_HUB": f"127.0.0.1:{hub_port}",
                               "SESAME_CA": str(ca), "SESAME_TOKEN": client})
        m = fwd.wait_line(r"^forwarding 127\.0\.0\.1:(\d+) -> ")
        echo_through(int(m.group(1)))
        fwd.stop()
    wait_until(lambda: _connects(door), what="the tcp front door")
    for _ in range(8):  # connections spread over the workers by the kernel
        echo_through(door, 64 * 1024)
    # a worker killed with -9 is restarted and rejoins the cluster
    mark = proc.mark()
    os.kill(pids[0], signal.SIGKILL)
    proc.wait_line(rf"worker \d \(pid {pids[0]}\) exited \(-9\); restarting", start=mark)
    proc.wait_line(r"joined the cluster", start=mark, timeout=30)
    for _ in range(4):
        echo_through(door, 16 * 1024)
    # SIGTERM to the supervisor stops every worker
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait_exit(30) == 0
    for pid in pids[1:]:
        wait_until(lambda pid=pid: not _alive(pid), what=f"worker {pid} to exit")


def test_workers_need_a_redis_store(tmp_path):
    r = sesame("hub", "--workers", "2", "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0
    assert "--workers" in r.stderr and "Redis" in r.stderr
    r = sesame("hub", "--workers", "zero", "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "whole number" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
