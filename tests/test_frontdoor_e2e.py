"""
Front doors with real processes: ``sesame hub --vhost ...``, a
``twistd web --listen sesame:...`` remote and a ``sesame remote`` agent;
routes added and removed with ``sesame route`` while the hub runs take
effect without a restart.  HTTP/1.1 keep-alive is checked with the
standard library's client on one connection.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from pathlib import Path

import pytest

from tests.e2e_support import (
    SESAME,
    Procs,
    child_env,
    connect,
    free_port,
    recv_exactly,
    sesame,
    start_remote,
    twistd,
    wait_until,
)

pytestmark = pytest.mark.slow


def _hub(procs: Procs, data: Path, vhost_port: int):
    from tests.e2e_support import Hub

    port_file = data.parent / "hub.port"
    proc = procs.start("hub", [*SESAME, "hub", "--listen", "tcp:0:interface=127.0.0.1",
                               "--data-dir", str(data), "--port-file", str(port_file),
                               "--vhost", f"tcp:{vhost_port}:interface=127.0.0.1"],
                       cwd=data.parent)
    port = wait_until(lambda: port_file.exists() and port_file.read_text().endswith("\n")
                      and int(port_file.read_text()), what="hub port file")
    proc.wait_line(r"front door http listening")
    return Hub(proc, port, data, port_file)


def _get(conn: http.client.HTTPConnection, path: str, host: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": host})
    r = conn.getresponse()
    return r.status, r.read()


def test_routes_added_with_the_cli_work_without_a_restart(procs, target, tmp_path):
    exe = twistd()
    if exe is None:
        pytest.skip("no twistd next to this Python or on PATH")
    vhost = free_port()
    hub = _hub(procs, tmp_path / "data", vhost)
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    site = tmp_path / "site"
    site.mkdir()
    body = os.urandom(256 << 10)
    (site / "blob.bin").write_bytes(body)
    hub_esc = hub.address.replace(":", "\\:")
    listen = f"sesame:remote=edge-1:endpoint=web:hub={hub_esc}:ca={hub.ca}:tokenFile={tok}"
    run = tmp_path / "twistd"
    run.mkdir()
    procs.start("twistd-web", [exe, "-n", "web", "--listen", listen, "--path", str(site)],
                cwd=run, env=child_env())

    data = str(hub.data_dir)
    r = sesame("route", "add", "http", "web.edge-1.example", "web@edge-1", "--data-dir", data)
    assert r.returncode == 0, r.stderr
    route_id = r.stdout.strip()
    assert route_id.startswith("rt_")

    def page() -> bytes | None:
        conn = http.client.HTTPConnection("127.0.0.1", vhost, timeout=5)
        try:
            status, got = _get(conn, "/blob.bin", "web.edge-1.example")
            return got if status == 200 else None
        except OSError:
            return None
        finally:
            conn.close()

    got = wait_until(page, what="the vhost route (hub watches the store)")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", vhost, timeout=10)
    first = _get(conn, "/blob.bin", "web.edge-1.example")
    sock = conn.sock
    second = _get(conn, "/blob.bin", "WEB.edge-1.example:80")
    assert first == second == (200, body)
    assert conn.sock is sock  # one connection: keep-alive held end to end
    assert _get(conn, "/nope", "web.edge-1.example")[0] == 404  # the remote's own 404
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", vhost, timeout=10)
    status, text = _get(conn, "/", "unknown.example")
    assert status == 404 and b"edge-1" not in text
    conn.close()

    # a tcp port map to the agent's allowlisted target, added and removed at runtime
    tport = free_port()
    r = sesame("route", "add", "tcp", str(tport), f"127.0.0.1:{target.port}@edge-1",
               "--data-dir", data)
    assert r.returncode == 0, r.stderr
    tcp_id = r.stdout.strip()
    ls = sesame("route", "ls", "--json", "--data-dir", data)
    assert {x["id"] for x in __import__("json").loads(ls.stdout)} == {route_id, tcp_id}

    def echo() -> bool:
        try:
            s = connect(tport, timeout=5)
        except OSError:
            return False
        with s:
            s.sendall(b"echo\n")
            sent, back = hashlib.sha256(), hashlib.sha256()
            for _ in range(16):  # 1 MiB in lock step, so neither side's buffers can wedge
                chunk = os.urandom(64 << 10)
                sent.update(chunk)
                s.sendall(chunk)
                back.update(recv_exactly(s, len(chunk)))
            return sent.digest() == back.digest()

    assert wait_until(echo, what="the tcp route")
    r = sesame("route", "rm", tcp_id, "--data-dir", data)
    assert r.returncode == 0, r.stderr

    def closed() -> bool:
        try:
            connect(tport, timeout=2).close()
            return False
        except OSError:
            return True

    assert wait_until(closed, what="the tcp route's listener to close")
    bad = sesame("route", "add", "tcp", "9", "no-at-sign", "--data-dir", data)
    assert bad.returncode != 0 and "ENDPOINT@REMOTE" in bad.stderr and bad.stderr.count("\n") == 1
