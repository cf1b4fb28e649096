"""
End to end, with real processes: ``sesame hub`` / ``sesame remote`` / ``sesame forward`` /
``sesame stdio`` / ``twistd -n web --listen sesame:...`` / OpenSSH, real sockets on 127.0.0.1
(ephemeral ports), real TLS (the hub's generated CA).

Nothing waits on a fixed sleep: readiness is a port file, a log line (``registered ...``,
``forwarding HOST:PORT``, sshd's ``Server listening``) or a condition polled with a deadline.
Every test reaps the processes it started (:func:`procs`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sesame.hub.tls import ensure_hub_tls
from tests.e2e_support import (
    PY,
    REGISTERED,
    REPO,
    SESAME,
    WAIT,
    EchoConn,
    Procs,
    TargetServer,
    child_env,
    connect,
    download_source,
    echo_once,
    fails_promptly,
    pattern_sha256,
    sesame,
    sshd_binary,
    start_forward,
    start_hub,
    start_remote,
    start_sshd,
    twistd,
    upload_sink,
    wait_until,
)

pytestmark = pytest.mark.slow

BULK = 64 << 20


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --- 1. bulk both ways -------------------------------------------------------------------


def test_forward_moves_64_mib_each_way(procs: Procs, target: TargetServer, tmp_path: Path) -> None:
    hub = start_hub(procs, tmp_path / "data")
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    _, port = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                            hub.client_env(hub.token("--client")))

    sent, received = upload_sink(port, BULK, seed=1)
    assert received == sent, "the sink received other bytes than we sent"

    got, n = download_source(port, BULK, seed=2)
    assert n == BULK
    assert got == pattern_sha256(BULK, seed=2), "other bytes came back than the source sent"


def test_forward_ends_every_connection_after_its_last_byte(procs: Procs, target: TargetServer,
                                                           tmp_path: Path) -> None:
    """The client half-closes first; the target sends, then closes: the client gets all the
    bytes and then EOF, every time.  (The forward must not lose the close when it comes while
    the client's side is still flushing: test 1 sees that now and then, this one in most runs.)"""
    hub = start_hub(procs, tmp_path / "data")
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    _, port = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                            hub.client_env(hub.token("--client")))
    n = 8 << 20
    for attempt in range(40):
        with connect(port) as s:
            s.sendall(f"source {n} {attempt}\n".encode())
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            total = 0
            try:
                while data := s.recv(1 << 20):
                    total += len(data)
            except TimeoutError:
                raise AssertionError(f"attempt {attempt}: {total} of {n} bytes and no EOF in 5s "
                                     "(the forward never closed the connection)") from None
            assert total == n, (attempt, total)


# --- 2. twistd web listening through the hub ---------------------------------------------


def _fetch(url: str, timeout: float = WAIT) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def test_twistd_web_listening_on_a_sesame_endpoint(procs: Procs, target: TargetServer,
                                                   tmp_path: Path) -> None:
    exe = twistd()
    if exe is None:
        pytest.skip("no twistd next to this Python or on PATH")
    hub = start_hub(procs, tmp_path / "data")
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    site = tmp_path / "site"
    site.mkdir()
    body = os.urandom(1 << 20)
    (site / "blob.bin").write_bytes(body)
    # the agent and twistd web serve edge-1 together: netconn from one, "web" from the other
    start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    hub_esc = hub.address.replace(":", "\\:")
    listen = f"sesame:remote=edge-1:endpoint=web:hub={hub_esc}:ca={hub.ca}:tokenFile={tok}"
    run = tmp_path / "twistd"
    run.mkdir()
    web = procs.start("twistd-web", [exe, "-n", "web", "--listen", listen, "--path", str(site)],
                      cwd=run, env=child_env())
    env = hub.client_env(hub.token("--client"))
    _, port = start_forward(procs, "sesame:remote=edge-1:endpoint=web", env, name="fwd-web")
    url = f"http://127.0.0.1:{port}/blob.bin"

    def served() -> bytes | None:
        assert web.alive(), f"twistd web exited\n{web.describe()}"
        try:
            return _fetch(url, timeout=5)
        except (urllib.error.URLError, ConnectionError, OSError):
            return None  # not registered yet: the hub refuses, the forward closes

    got = wait_until(served, what="the page through the hub")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()
    assert _fetch(url) == body  # and again, on a fresh connection
    # the agent's netconn on the same remote name is untouched
    _, nport = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                             env, name="fwd-netconn")
    echo_once(nport)


# --- 3. OpenSSH through ProxyCommand sesame stdio ----------------------------------------


def test_ssh_through_proxycommand_sesame_stdio(procs: Procs, tmp_path: Path) -> None:
    missing = [n for n, p in (("sshd", sshd_binary()), ("ssh", shutil.which("ssh")),
                              ("ssh-keygen", shutil.which("ssh-keygen"))) if p is None]
    if missing:
        pytest.skip(f"OpenSSH is not installed (missing {', '.join(missing)}); "
                    "apt-get install openssh-server openssh-client (.ci/run does)")
    sshd = start_sshd(procs, tmp_path / "sshd")
    hub = start_hub(procs, tmp_path / "data")
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{sshd.port}"])
    proxy = (f"{shlex.quote(PY)} -m sesame stdio "
             f"sesame:remote=%h:host=127.0.0.1:port={sshd.port}")
    argv = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-i", str(sshd.client_key), "-p", "22", f"{sshd.user}@edge-1",
            "echo hello-from-edge"]
    r = subprocess.run(argv, env=hub.client_env(hub.token("--client")), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 0, f"ssh failed ({r.returncode}): {r.stderr}\n{procs.describe()}"
    assert r.stdout.strip() == "hello-from-edge"


# --- 4. the hub dies and comes back --------------------------------------------------------


def test_hub_sigkill_and_restart(procs: Procs, target: TargetServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    hub = start_hub(procs, data)
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    remote = start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    _, port = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                            hub.client_env(hub.token("--client")))
    live = EchoConn(port)
    live.roundtrip()

    mark = remote.mark()
    hub.proc.kill9()
    t0 = time.monotonic()
    how = fails_promptly(live.sock, timeout=10)
    ended = time.monotonic() - t0
    live.close()
    assert ended < 5, f"the connection open at the kill took {ended:.1f}s to end ({how})"

    hub2 = start_hub(procs, data, port=hub.port, name="hub-restarted")
    up = time.monotonic()
    remote.wait_line(REGISTERED, timeout=5.0, start=mark)
    took = time.monotonic() - up
    assert took <= 5.0, took
    # a new connection through the same forward process works at once
    echo_once(port)
    assert hub2.proc.alive()


def test_remote_backoff_starts_over_after_each_registration(procs: Procs, target: TargetServer,
                                                            tmp_path: Path) -> None:
    """A long outage grows the remote's retry delay; once it has registered again, the next
    outage starts over from the shortest delay (1 s +-20 %), not from where the last one
    stopped (4 s, 8 s, ...)."""
    data = tmp_path / "data"
    hub = start_hub(procs, data)
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    remote = start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    lost = r"hub link (lost|failed)"

    # a first outage with one failed retry (the delay grows, as it should)
    mark = remote.mark()
    hub.proc.kill9()
    i, _, _ = remote.wait_line_at(lost, start=mark)
    remote.wait_line(lost, start=i + 1)
    hub = start_hub(procs, data, port=hub.port, name="hub-2")
    remote.wait_line(REGISTERED, timeout=10, start=mark)

    # registered again; the next outage: how long until the first retry (which fails)?
    mark = remote.mark()
    hub.proc.kill9()
    i, t_lost, _ = remote.wait_line_at(lost, start=mark)
    _, t_retry, _ = remote.wait_line_at(lost, start=i + 1)
    assert t_retry - t_lost < 2.0, (f"first retry {t_retry - t_lost:.1f}s after a fresh "
                                    f"outage\n{remote.describe()}")
    start_hub(procs, data, port=hub.port, name="hub-3")
    remote.wait_line(REGISTERED, timeout=5.0, start=mark)


# --- 5. refusals ----------------------------------------------------------------------------


def test_refusals_are_precise_and_harm_nobody(procs: Procs, target: TargetServer,
                                              tmp_path: Path) -> None:
    hub = start_hub(procs, tmp_path / "data")
    tok = hub.token_file(tmp_path / "edge-1.token", "--remote", "edge-1")
    good_remote = start_remote(procs, hub, "edge-1", tok, [f"127.0.0.1:{target.port}"])
    client_token = hub.token("--client")
    env = hub.client_env(client_token)
    _, port = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}", env)
    live = EchoConn(port)
    live.roundtrip()

    # tokens for the attempts
    bad = tmp_path / "bad.token"
    bad.write_text("ses_notatoken_" + "x" * 40 + "\n")
    revoked_remote = hub.token_file(tmp_path / "revoked.token", "--remote", "edge-1")
    revoked_client = hub.token("--client")
    for t in (revoked_remote.read_text().strip(), revoked_client):
        r = sesame("token", "revoke", "--data-dir", str(hub.data_dir), t)
        assert r.returncode == 0, r.stderr
    edge2 = hub.token_file(tmp_path / "edge-2.token", "--remote", "edge-2")
    only_edge2 = hub.token("--client", "--remotes", "edge-2")
    other_ca = ensure_hub_tls(tmp_path / "other-ca", ["127.0.0.1"]).ca_path
    denied_port = target.port + 1 if target.port < 65535 else target.port - 1

    # all at once: none of them may disturb the others or the live connection
    wrong = start_remote(procs, hub, "edge-1", bad, [], proc_name="remote-wrong-token",
                         wait=False)
    revoked = start_remote(procs, hub, "edge-1", revoked_remote, [],
                           proc_name="remote-revoked", wait=False)
    hijack = start_remote(procs, hub, "edge-1", edge2, ["127.0.0.1:*"],
                          proc_name="remote-hijack", wait=False)
    wrong_ca_env = dict(env, SESAME_CA=str(other_ca))
    fwd_ca, wrong_ca_port = start_forward(
        procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}", wrong_ca_env,
        name="forward-wrong-ca")
    netconn = f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}"
    s_revoked = procs.start("stdio-revoked", [*SESAME, "stdio", netconn],
                            env=dict(env, SESAME_TOKEN=revoked_client))
    s_other = procs.start("stdio-other-remote", [*SESAME, "stdio", netconn],
                          env=dict(env, SESAME_TOKEN=only_edge2))
    s_denied = procs.start("stdio-denied", [
        *SESAME, "stdio", f"sesame:remote=edge-1:host=127.0.0.1:port={denied_port}"], env=env)

    # the remote agents: refused before they ever registered, each exits 2 with one line
    # naming the code and the reason (after the log line saying the same)
    expect = {
        wrong: r"UNAUTHENTICATED: missing, invalid or revoked token$",
        revoked: r"UNAUTHENTICATED: missing, invalid or revoked token$",
        hijack: r"PERMISSION_DENIED: this token may not register remote \S*edge-1$",
    }
    for proc, why in expect.items():
        assert proc.wait_exit() == 2, proc.describe()
        last = _last_line(proc.err.text())
        assert re.match(rf"sesame remote: hub {re.escape(hub.address)} refused remote edge-1: "
                        rf"{why}", last), proc.describe()

    # wrong CA: the connection is closed at once, and the forward says why in one line
    with socket.create_connection(("127.0.0.1", wrong_ca_port), timeout=WAIT) as s:
        s.sendall(b"echo\n")
        assert fails_promptly(s, timeout=WAIT) in ("eof", "reset")
    line = fwd_ca.wait_line(r"relay connection failed: (.*)$").group(0)
    assert "CERTIFICATE_VERIFY_FAILED" in line, line

    # clients: sesame stdio exits non-zero with one line naming the code and the reason
    for p, why in ((s_revoked, r"UNAUTHENTICATED: missing, invalid or revoked token"),
                   (s_other, r"PERMISSION_DENIED: this token may not reach remote \S*edge-1\b"),
                   (s_denied, rf"PERMISSION_DENIED: 127\.0\.0\.1:{denied_port} is not allowed")):
        rc = p.wait_exit()
        lines = [x for x in p.err.lines if x.strip()]
        assert rc != 0 and len(lines) == 1, p.describe()
        assert lines[0].startswith("sesame stdio: ") and re.search(why, lines[0]), p.describe()

    # nobody else noticed: the live connection, a new one, the good remote's session
    live.roundtrip()
    echo_once(port)
    live.roundtrip()
    live.close()
    assert good_remote.alive()
    assert len(re.findall(REGISTERED, good_remote.err.text())) == 1, good_remote.describe()
    assert not re.search("refused|link lost", good_remote.err.text()), good_remote.describe()
    # and the hub registered nobody else as edge-1
    assert len(re.findall(r"remote default/edge-1 connected", hub.proc.err.text())) == 1, (
        hub.proc.describe())


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    r = sesame("forward", "tcp:0", "sesame:remote=edge-1:port=22", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r"\bhost\b", r.stderr), r.stderr

    r = sesame("hub", "--no-tls", "--listen", "tcp:7443:interface=0.0.0.0", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--no-tls" in r.stderr, r.stderr
    assert not (tmp_path / ".sesame").exists(), "a refused hub must not create its data dir"


# --- 6. make run, followed literally ---------------------------------------------------------


def _make_run_hub_args() -> list[str]:
    """The arguments ``make run`` gives ``sesame hub`` (read from the Makefile)."""
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^run:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, "no run target in the Makefile"
    recipe = m.group(1).strip().splitlines()[-1].strip()
    words = shlex.split(recipe)
    assert words[0].endswith("/sesame") and words[1] == "hub", recipe
    return words[2:]


def test_make_run_output_followed_literally(procs: Procs, target: TargetServer,
                                            tmp_path: Path) -> None:
    here = tmp_path / "checkout"
    here.mkdir()
    args = _make_run_hub_args()
    hub = procs.start("make-run-hub", [*SESAME, "hub", *args, "--listen",
                                       "tcp:0:interface=127.0.0.1", "--port-file", "hub.port"],
                      cwd=here)
    wait_until(lambda: (here / "hub.port").exists() and
               (here / "hub.port").read_text().endswith("\n"), what="the hub's port file")
    # the banner: wait for its last command, then take the indented command lines
    hub.wait_line(r"^  \.venv/bin/sesame forward ", stream="out")
    commands = [line[2:] for line in hub.out.lines if line.startswith("  ")]
    assert len(commands) == 4, hub.out.text()
    sesame_cmd = " ".join(shlex.quote(w) for w in SESAME)

    def literal(cmd: str) -> str:
        assert ".venv/bin/sesame " in cmd, cmd
        cmd = cmd.replace(".venv/bin/sesame", sesame_cmd)
        # the only edits: the target port (22 → ours) and the local port (2222 → ephemeral)
        cmd = cmd.replace("--allow 127.0.0.1:22", f"--allow 127.0.0.1:{target.port}")
        cmd = cmd.replace("port=22'", f"port={target.port}'")
        return cmd.replace("tcp:2222:", "tcp:0:")

    token_cmd, remote_cmd, export_cmd, forward_cmd = (literal(c) for c in commands)
    assert token_cmd.endswith("> edge-1.token"), token_cmd
    r = subprocess.run(["bash", "-c", token_cmd], cwd=here, env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    remote = procs.start("make-run-remote", ["bash", "-c", f"exec {remote_cmd}"], cwd=here)
    remote.wait_line(REGISTERED)
    fwd = procs.start("make-run-forward", ["bash", "-c", f"{export_cmd}\nexec {forward_cmd}"],
                      cwd=here)
    m = fwd.wait_line(r"^forwarding 127\.0\.0\.1:(\d+) -> ")
    echo_once(int(m.group(1)))
