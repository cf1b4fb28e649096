"""
The hub and the remote as users start them: ``twistd -n sesame hub|remote``, the TLS modes of
``sesame hub`` (generated CA, ``--tls-cert/--tls-key/--tls-ca``, ``--no-tls``) with the
commands its banner prints run as printed, ``--client-ca`` (mTLS) for remotes, the README's
quick start, ``sesame:`` client endpoints under ``ClientService`` and cancelled mid-dial, and
the remote's keepalive noticing a hub link that went silent.

Real processes and sockets on 127.0.0.1, real TLS.  Every wait ends on a port file, a log
line, a Deferred or a polled condition with a deadline, never on a fixed sleep.
"""

from __future__ import annotations

import re
import select
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.error import ConnectingCancelledError

from sesame.hub.tls import ensure_hub_tls, issue_client_cert
from sesame.remote import RemoteSession, agent_offers
from sesame.testing import hub as testing_hub
from sesame.testing.hub import HubFixture
from tests.e2e_support import (
    PY,
    REGISTERED,
    REPO,
    WAIT,
    Procs,
    TargetServer,
    child_env,
    echo_once,
    sesame,
    start_forward,
    twistd,
    wait_until,
)

sesame_hub = testing_hub.sesame_hub  # the public pytest fixture

VENV = Path(PY).parent.parent  # the virtualenv running these tests (the README's .venv)


def _read_port(path: Path, proc) -> int:
    def bound() -> int | None:
        assert proc.alive(), f"exited before writing {path}\n{proc.describe()}"
        text = path.read_text() if path.exists() else ""
        return int(text) if text.endswith("\n") else None

    return wait_until(bound, what=str(path))


def _checkout(tmp_path: Path) -> Path:
    """A directory to run printed commands in: ``.venv`` there is this test run's venv."""
    here = tmp_path / "checkout"
    here.mkdir()
    if not (VENV / "bin" / "sesame").exists():
        pytest.skip(f"no sesame script in {VENV}/bin (install the project into the venv)")
    (here / ".venv").symlink_to(VENV)
    return here


# --- 1. twistd -n sesame hub / remote ---------------------------------------------------


def _twistd() -> str:
    exe = twistd()
    if exe is None:
        pytest.skip("no twistd next to this Python or on PATH")
    return exe


def test_twistd_hub_and_remote_carry_a_forward(procs: Procs, target: TargetServer,
                                               tmp_path: Path) -> None:
    exe = _twistd()
    data, port_file = tmp_path / "data", tmp_path / "hub.port"
    hub = procs.start("twistd-hub", [exe, "-n", "--pidfile=", "sesame", "hub",
                                     "--listen", "tcp:0:interface=127.0.0.1",
                                     "--port-file", str(port_file), "--data-dir", str(data)],
                      cwd=tmp_path)
    port = _read_port(port_file, hub)
    hub.wait_line(rf"sesame hub listening on 127\.0\.0\.1:{port} \(TLS; clients and remotes "
                  rf"trust {re.escape(str(data / 'ca.pem'))}", stream="out")
    tok = tmp_path / "edge-1.token"
    r = sesame("token", "create", "--data-dir", str(data), "--remote", "edge-1")
    assert r.returncode == 0, r.stderr
    tok.write_text(r.stdout)
    remote = procs.start("twistd-remote", [
        # --hub in Twisted's client spelling, as --listen takes Twisted's server one
        exe, "-n", "--pidfile=", "sesame", "remote", "--hub", f"tcp:127.0.0.1:{port}",
        "--name", "edge-1", "--token-file", str(tok), "--ca", str(data / "ca.pem"),
        "--allow", f"127.0.0.1:{target.port}"], cwd=tmp_path)
    remote.wait_line(REGISTERED, stream="out")
    client = sesame("token", "create", "--data-dir", str(data), "--client").stdout.strip()
    env = child_env(SESAME_HUB=f"tcp:host=127.0.0.1:port={port}", SESAME_CA=str(data / "ca.pem"),
                    SESAME_TOKEN=client)
    _, fport = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                             env)
    echo_once(fport)
    assert target.connections == 1
    hub.wait_line(r"remote default/edge-1 connected", stream="out")


@pytest.mark.parametrize("how", [["twistd", "-n", "--pidfile="], ["cli"]])
def test_sigterm_twice_shuts_down_without_a_traceback(procs: Procs, tmp_path: Path,
                                                      how: list[str]) -> None:
    """systemd, a shell's kill and a process-group kill can each send SIGTERM; Twisted's
    handler stopped the reactor once per signal and the second stop was a
    ReactorNotRunning traceback.  A registered remote keeps the hub draining (its control
    stream gets the stop's grace period) while the second signal arrives."""
    import signal as _signal

    data, port_file = tmp_path / "data", tmp_path / "hub.port"
    args = ["hub", "--listen", "tcp:0:interface=127.0.0.1", "--port-file", str(port_file),
            "--data-dir", str(data)]
    argv = ([_twistd(), *how[1:], "sesame", *args] if how[0] == "twistd"
            else [PY, "-m", "sesame", *args])
    hub = procs.start("hub", argv, cwd=tmp_path)
    port = _read_port(port_file, hub)
    tok = tmp_path / "edge-1.token"
    tok.write_text(sesame("token", "create", "--data-dir", str(data), "--remote", "edge-1").stdout)
    remote = procs.start("remote", [PY, "-m", "sesame", "remote", "--hub", f"127.0.0.1:{port}",
                                    "--name", "edge-1", "--token-file", str(tok),
                                    "--ca", str(data / "ca.pem")], cwd=tmp_path)
    remote.wait_line(REGISTERED)
    stream = "out" if how[0] == "twistd" else "err"
    mark = hub.mark(stream)
    hub.popen.send_signal(_signal.SIGTERM)
    hub.wait_line(r"Received SIGTERM, shutting down", stream=stream, start=mark)
    hub.popen.send_signal(_signal.SIGTERM)
    hub.wait_line(r"SIGTERM again: already shutting down", stream=stream, start=mark)
    # twistd ends by re-raising the signal that stopped it; `sesame hub` exits 0
    assert hub.wait_exit() in ((-_signal.SIGTERM,) if how[0] == "twistd" else (0,))
    text = hub.out.text() + hub.err.text()
    assert "Traceback" not in text and "ReactorNotRunning" not in text, hub.describe()


def test_twistd_hub_that_cannot_listen_exits_with_one_line(tmp_path: Path) -> None:
    exe = _twistd()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        port_file = tmp_path / "hub.port"
        t0 = time.monotonic()
        r = subprocess.run([exe, "-n", "--pidfile=", "sesame", "hub", "--listen",
                            f"tcp:{port}:interface=127.0.0.1", "--port-file", str(port_file),
                            "--data-dir", str(tmp_path / "data")],
                           cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                           timeout=WAIT, stdin=subprocess.DEVNULL)
        took = time.monotonic() - t0
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert took < 10, took
    errors = [line for line in r.stdout.splitlines() if "#error]" in line]
    assert len(errors) == 1, r.stdout
    assert errors[0].endswith(f"sesame hub could not start: cannot listen on 127.0.0.1:{port}: "
                              "Address already in use"), errors[0]
    assert not port_file.exists()


# --- 2. the banner in each TLS mode, followed literally --------------------------------------


def _banner_commands(hub) -> list[str]:
    hub.wait_line(r"^  \.venv/bin/sesame forward ", stream="out")
    commands = [line[2:] for line in hub.out.lines if line.startswith("  ")]
    assert len(commands) == 4, hub.out.text()
    return commands


def _follow(procs: Procs, here: Path, commands: list[str], target: TargetServer,
            env: dict[str, str] | None = None) -> None:
    """Run the four printed commands as printed, in ``here`` (whose ``.venv`` is ours), with
    two edits: the target port (22 → the test's echo server) and the local port (2222 → 0,
    any free one).  Then a connection through the forward must reach the echo server."""

    def literal(cmd: str) -> str:
        cmd = cmd.replace("--allow 127.0.0.1:22", f"--allow 127.0.0.1:{target.port}")
        cmd = cmd.replace("port=22'", f"port={target.port}'")
        return cmd.replace("tcp:2222:", "tcp:0:")

    token_cmd, remote_cmd, export_cmd, forward_cmd = (literal(c) for c in commands)
    env = env or child_env()
    r = subprocess.run(["bash", "-c", token_cmd], cwd=here, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    remote = procs.start("banner-remote", ["bash", "-c", f"exec {remote_cmd}"], cwd=here, env=env)
    remote.wait_line(REGISTERED)
    fwd = procs.start("banner-forward", ["bash", "-c", f"{export_cmd}\nexec {forward_cmd}"],
                      cwd=here, env=env)
    m = fwd.wait_line(r"^forwarding 127\.0\.0\.1:(\d+) -> ")
    before = target.connections
    echo_once(int(m.group(1)))
    assert target.connections == before + 1


def _start_banner_hub(procs: Procs, here: Path, *args: str):
    hub = procs.start("banner-hub", [".venv/bin/sesame", "hub", "--listen",
                                     "tcp:0:interface=127.0.0.1", "--port-file", "hub.port",
                                     "--data-dir", "data", *args], cwd=here)
    _read_port(here / "hub.port", hub)
    return hub


def test_banner_with_tls_cert_and_tls_ca_followed_literally(procs: Procs, target: TargetServer,
                                                            tmp_path: Path) -> None:
    own = ensure_hub_tls(tmp_path / "own-pki", ["127.0.0.1"])  # "real" certificates
    here = _checkout(tmp_path)
    hub = _start_banner_hub(procs, here, "--tls-cert", str(own.cert_path),
                            "--tls-key", str(own.key_path), "--tls-ca", str(own.ca_path))
    commands = _banner_commands(hub)
    assert not (here / "data" / "ca.pem").exists(), "--tls-cert must not generate a CA"
    assert "ca.pem" not in "".join(commands).replace(str(own.ca_path), ""), commands
    assert f"--ca {own.ca_path}" in commands[1] and f"SESAME_CA={own.ca_path}" in commands[2]
    _follow(procs, here, commands, target)


def test_banner_with_no_tls_followed_literally(procs: Procs, target: TargetServer,
                                               tmp_path: Path) -> None:
    here = _checkout(tmp_path)
    hub = _start_banner_hub(procs, here, "--no-tls")
    commands = _banner_commands(hub)
    assert "SESAME_CA" not in commands[2] and "--ca" not in commands[1], commands
    assert not (here / "data" / "ca.pem").exists()
    _follow(procs, here, commands, target)


def test_banner_with_generated_ca_followed_literally(procs: Procs, target: TargetServer,
                                                     tmp_path: Path) -> None:
    here = _checkout(tmp_path)
    hub = _start_banner_hub(procs, here)
    commands = _banner_commands(hub)
    assert (here / "data" / "ca.pem").is_file()
    assert "--ca data/ca.pem" in commands[1] and "SESAME_CA=data/ca.pem" in commands[2]
    _follow(procs, here, commands, target)


def test_banner_with_tls_cert_alone_names_no_missing_file(procs: Procs, tmp_path: Path) -> None:
    own = ensure_hub_tls(tmp_path / "own-pki", ["127.0.0.1"])
    here = _checkout(tmp_path)
    hub = _start_banner_hub(procs, here, "--tls-cert", str(own.cert_path),
                            "--tls-key", str(own.key_path))
    commands = _banner_commands(hub)
    assert "ca.pem" not in hub.out.text() and "SESAME_CA" not in commands[2], hub.out.text()
    assert "system's trusted roots" in hub.out.text()


def test_hub_tls_option_mistakes_are_one_line(tmp_path: Path) -> None:
    own = ensure_hub_tls(tmp_path / "own", ["127.0.0.1"])
    other = ensure_hub_tls(tmp_path / "other", ["127.0.0.1"])
    cases = [
        (["--tls-cert", str(own.cert_path), "--tls-key", str(own.key_path),
          "--tls-ca", str(other.ca_path)], r"^sesame hub: --tls-ca: the certificate in "
                                           r"--tls-cert \(CN=.*\) is not issued by this CA"),
        (["--tls-ca", str(own.ca_path)], r"^sesame hub: --tls-ca goes with --tls-cert"),
        (["--no-tls", "--tls-cert", str(own.cert_path), "--tls-key", str(own.key_path)],
         r"^sesame hub: --no-tls: cannot be combined"),
    ]
    for args, want in cases:
        r = sesame("hub", "--listen", "tcp:0:interface=127.0.0.1", "--data-dir",
                   str(tmp_path / "data"), *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(want, lines[0]), (args, r.stderr)


def test_plain_text_refused_for_a_hub_that_is_not_loopback(tmp_path: Path) -> None:
    tok = tmp_path / "t"
    tok.write_text("x\n")
    r = sesame("stdio", "sesame:remote=edge-1:host=127.0.0.1:port=22",
               env=child_env(SESAME_HUB="192.0.2.1:7443", SESAME_TLS="no", SESAME_TOKEN="x"))
    assert r.returncode == 2, r.stderr
    assert re.search(r"SESAME_TLS: refusing plain text \(no TLS\) for hub '192\.0\.2\.1:7443'",
                     r.stderr), r.stderr


# --- 3. --client-ca: remotes need a client certificate ------------------------------------


def test_mtls_hub_refuses_a_remote_without_certificate_and_takes_one_with(
        procs: Procs, target: TargetServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    tls = ensure_hub_tls(data, ["127.0.0.1"])
    cert, key = issue_client_cert(data, "edge-1")
    (tmp_path / "edge.pem").write_bytes(cert)
    (tmp_path / "edge-key.pem").write_bytes(key)
    hub = procs.start("mtls-hub", [PY, "-m", "sesame", "hub", "--listen",
                                   "tcp:0:interface=127.0.0.1", "--port-file", "hub.port",
                                   "--data-dir", str(data), "--client-ca", str(tls.ca_path)],
                      cwd=tmp_path)
    port = _read_port(tmp_path / "hub.port", hub)
    r = sesame("token", "create", "--data-dir", str(data), "--remote", "edge-1")
    (tmp_path / "edge-1.token").write_text(r.stdout)
    base = [PY, "-m", "sesame", "remote", "--hub", f"127.0.0.1:{port}", "--name", "edge-1",
            "--token-file", "edge-1.token", "--ca", str(tls.ca_path),
            "--allow", f"127.0.0.1:{target.port}"]

    bare = procs.start("remote-no-cert", base, cwd=tmp_path)
    assert bare.wait_exit() == 2, bare.describe()
    last = [line for line in bare.err.lines if line.strip()][-1]
    assert last == (f"sesame remote: hub 127.0.0.1:{port} refused remote edge-1: the hub at "
                    f"127.0.0.1:{port} requires a client certificate (it was started with "
                    "--client-ca): give --cert and --key (or cert= and key=, SESAME_CERT and "
                    "SESAME_KEY)"), bare.describe()
    assert "remote default/edge-1 connected" not in hub.err.text()

    good = procs.start("remote-cert", [*base, "--cert", "edge.pem", "--key", "edge-key.pem"],
                       cwd=tmp_path)
    good.wait_line(REGISTERED)
    client = sesame("token", "create", "--data-dir", str(data), "--client").stdout.strip()
    # a client without a certificate is told why, not just "Socket closed"
    r = sesame("stdio", f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
               env=child_env(SESAME_HUB=f"127.0.0.1:{port}", SESAME_CA=str(tls.ca_path),
                             SESAME_TOKEN=client))
    assert r.returncode != 0 and "requires a client certificate" in r.stderr, r.stderr
    env = child_env(SESAME_HUB=f"127.0.0.1:{port}", SESAME_CA=str(tls.ca_path),
                    SESAME_TOKEN=client, SESAME_CERT=str(tmp_path / "edge.pem"),
                    SESAME_KEY=str(tmp_path / "edge-key.pem"))
    _, fport = start_forward(procs, f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}",
                             env)
    echo_once(fport)


# --- 4. sesame: client endpoints with ClientService, and cancelled mid-dial ----------------


class _Echoing(protocol.Protocol):
    def connectionMade(self):
        self.buf = bytearray()
        self.waiting: tuple[int, defer.Deferred] | None = None
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.buf += data
        if self.waiting and len(self.buf) >= self.waiting[0]:
            _, d = self.waiting
            self.waiting = None
            d.callback(bytes(self.buf))

    def connectionLost(self, reason):
        self.lost.callback(None)

    def roundtrip(self, payload: bytes) -> defer.Deferred:
        self.buf.clear()
        d = defer.Deferred()
        self.waiting = (len(payload), d)
        self.transport.write(payload)
        return d.addTimeout(WAIT, reactor)


class _EchoServer(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def echo_port():
    listening = pytest_twisted.blockon(endpoints.TCP4ServerEndpoint(
        reactor, 0, interface="127.0.0.1").listen(protocol.Factory.forProtocol(_EchoServer)))
    yield listening.getHost().port
    pytest_twisted.blockon(listening.stopListening())


def _connections(hub: HubFixture) -> int:
    return sum(s.connections for s in hub.hub.sessions.values()) if hub.hub else 0


def _pending(hub: HubFixture) -> int:
    return sum(len(s.pending) for s in hub.hub.sessions.values()) if hub.hub else 0


@pytest_twisted.ensureDeferred
async def test_client_service_reconnects_after_hub_restart_and_remote_return(sesame_hub,
                                                                             echo_port):
    hub = sesame_hub
    remote = await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    ep = endpoints.clientFromString(
        reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={echo_port}:"
                 f"{hub.endpoint_kwargs(hub.client_token())}")
    svc = ClientService(ep, protocol.Factory.forProtocol(_Echoing),
                        retryPolicy=backoffPolicy(initialDelay=0.05, maxDelay=0.5))
    svc.startService()
    try:
        first = await svc.whenConnected(failAfterFailures=1).addTimeout(WAIT, reactor)
        assert await first.roundtrip(b"one") == b"one"

        # the hub dies and comes back: the connection ends, ClientService dials again and
        # gets through once the remote has re-registered with the new hub
        await hub.restart_hub()
        await first.lost.addTimeout(WAIT, reactor)
        second = await _next_connection(svc, first)
        assert await second.roundtrip(b"two") == b"two"

        # the remote goes away and comes back (a new session)
        await hub.stop_remote(remote)
        await second.lost.addTimeout(WAIT, reactor)
        await hub.wait_for(lambda: not hub.routed("edge-1"), what="edge-1 unregistered")
        await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
        third = await _next_connection(svc, second)
        assert await third.roundtrip(b"three") == b"three"
    finally:
        await svc.stopService()


async def _next_connection(svc: ClientService, old, timeout: float = 20.0):
    """The first connection ClientService makes after ``old`` (its attempts in between fail:
    the hub or the remote is not back yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = await svc.whenConnected().addTimeout(deadline - time.monotonic(), reactor)
        if p is not old:
            return p
        await old.lost
        # old.lost fires inside the protocol's connectionLost, before ClientService hears of
        # the loss (its proxy tells it afterwards): without a reactor turn here this loop
        # would ask again at once, get ``old`` again, and spin until the deadline
        await task.deferLater(reactor, 0, lambda: None)
    raise AssertionError("ClientService did not reconnect")


@pytest_twisted.ensureDeferred
async def test_cancelling_a_pending_connect_leaves_nothing_on_the_hub(sesame_hub):
    hub = sesame_hub
    # a target whose accept queue is full: the remote's dial to it hangs (SYNs are dropped)
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    filler = socket.create_connection(stuck.getsockname())
    port = stuck.getsockname()[1]
    try:
        await hub.start_remote("edge-1", allow=[f"127.0.0.1:{port}"])
        ep = endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={port}:timeout=60:"
                     f"{hub.endpoint_kwargs(hub.client_token())}")
        d = ep.connect(protocol.Factory.forProtocol(_Echoing))
        # the hub relays the call and the remote is dialling
        await hub.wait_for(lambda: _connections(hub) == 1, what="the call to reach the remote")
        assert not d.called
        d.cancel()
        with pytest.raises(ConnectingCancelledError):
            await d
        await hub.wait_for(lambda: _connections(hub) == 0 and _pending(hub) == 0,
                           what="the hub to forget the cancelled call")
        assert hub.routed("edge-1")  # the remote's session is unharmed
    finally:
        filler.close()
        stuck.close()


# --- 5. the README's quick start, as written ----------------------------------------------


def _readme_quick_start() -> list[list[str]]:
    """The commands of the three ``sh`` blocks under "Quick start" in README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 3, f"expected three sh blocks in the quick start, got {len(blocks)}"
    return [[line for line in b.strip().splitlines() if line.strip()] for b in blocks]


def _make_run_recipe() -> str:
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^run:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, "no run target in the Makefile"
    return m.group(1).strip().splitlines()[-1].strip().replace("$(BIN)", ".venv/bin")


def test_readme_quick_start_followed_as_written(procs: Procs, target: TargetServer,
                                                tmp_path: Path) -> None:
    """README blocks 1-3, run in a fresh directory whose ``.venv`` is this test run's.

    Substitutions, and why:

    * block 1 is ``make run``; it runs the Makefile's ``run`` recipe (``.venv/bin/sesame
      hub``), which the test runs directly (after checking block 1 is exactly ``make run``),
      adding ``--listen tcp:0:interface=127.0.0.1 --port-file hub.port``: port 7443 may be
      taken on a shared machine, so the hub takes a free port and the test puts it wherever
      the README says ``127.0.0.1:7443``;
    * ``--allow 127.0.0.1:22`` / ``port=22``: port 22 of this machine may serve nothing, so
      the remote may reach, and the forward goes to, the test's TCP echo server instead;
    * ``tcp:2222:``: becomes ``tcp:0:`` (a free port; the forward prints which).

    Everything else (relative paths, ``./.sesame``, default token store, environment
    variables, quoting) is run as printed.
    """
    hub_block, remote_block, forward_block = _readme_quick_start()
    assert hub_block == ["make run"], hub_block
    here = _checkout(tmp_path)
    recipe = shlex.split(_make_run_recipe())
    hub = procs.start("readme-hub", [*recipe, "--listen", "tcp:0:interface=127.0.0.1",
                                     "--port-file", "hub.port"], cwd=here)
    port = _read_port(here / "hub.port", hub)
    assert (here / ".sesame" / "ca.pem").is_file()

    def literal(cmd: str) -> str:
        assert "sesame" in cmd, cmd
        cmd = cmd.replace("127.0.0.1:7443", f"127.0.0.1:{port}")
        cmd = cmd.replace("--allow 127.0.0.1:22", f"--allow 127.0.0.1:{target.port}")
        cmd = cmd.replace("port=22'", f"port={target.port}'")
        return cmd.replace("tcp:2222:", "tcp:0:")

    assert len(remote_block) == 2 and len(forward_block) == 2, (remote_block, forward_block)
    token_cmd, remote_cmd = (literal(c) for c in remote_block)
    r = subprocess.run(["bash", "-c", token_cmd], cwd=here, env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    remote = procs.start("readme-remote", ["bash", "-c", f"exec {remote_cmd}"], cwd=here)
    remote.wait_line(REGISTERED)
    export_cmd, forward_cmd = (literal(c) for c in forward_block)
    fwd = procs.start("readme-forward", ["bash", "-c", f"{export_cmd}\nexec {forward_cmd}"],
                      cwd=here)
    m = fwd.wait_line(r"^forwarding 127\.0\.0\.1:(\d+) -> ")
    echo_once(int(m.group(1)))
    assert target.connections == 1


# --- 6. keepalive: a hub link that goes silent ----------------------------------------------


class BlackholeProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream``.  :meth:`blackhole` makes every connection
    open now go silent in both directions — nothing forwarded, nothing closed, like a NAT
    that forgot the flow — while connections made afterwards are proxied normally."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._conns: list[dict] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="blackhole-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            conn = {"socks": (down, up), "dead": False}
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn: dict) -> None:
        down, up = conn["socks"]
        peer = {down: up, up: down}
        while not self._closed and not conn["dead"]:
            ready, _, _ = select.select([down, up], [], [], 0.05)
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if conn["dead"]:
                    return  # silent: swallow it, and keep both sockets open
                if not data:
                    for x in (down, up):
                        x.close()
                    return
                peer[s].sendall(data)

    def blackhole(self) -> None:
        with self._lock:
            for c in self._conns:
                c["dead"] = True

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            for c in self._conns:
                for s in c["socks"]:
                    s.close()


@pytest_twisted.ensureDeferred
async def test_keepalive_notices_a_silent_hub_link_and_reregisters(sesame_hub, echo_port):
    hub = sesame_hub
    proxy = BlackholeProxy(("127.0.0.1", hub.port))
    ping, grace, backoff = 0.5, 0.5, 0.2
    session = RemoteSession(
        f"127.0.0.1:{proxy.port}", "edge-1", hub.remote_token("edge-1"),
        agent_offers([f"127.0.0.1:{echo_port}"], reactor=reactor, bridge=hub.bridge),
        credentials=hub.tls.channel_credentials(hub.tls.ca_pem), bridge=hub.bridge,
        keepalive_time=ping, keepalive_timeout=grace, min_backoff=backoff, max_backoff=backoff)
    hub.remotes.append(session)  # stopped with the fixture
    from sesame.bridge._loop import to_deferred

    await to_deferred(hub.bridge.submit(session.astart()))
    try:
        await hub.wait_for(lambda: session.registrations == 1, what="first registration")
        ep = endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=127.0.0.1:port={echo_port}:"
                     f"{hub.endpoint_kwargs(hub.client_token())}")
        p = await ep.connect(protocol.Factory.forProtocol(_Echoing)).addTimeout(WAIT, reactor)
        assert await p.roundtrip(b"before") == b"before"
        p.transport.loseConnection()
        old = hub.hub.routes[("default", "edge-1", "netconn")]

        proxy.blackhole()
        t0 = time.monotonic()
        # dead within ping + grace of the last answered ping; then one backoff (+20 %
        # jitter) and a TLS handshake + registration on a fresh connection (< 1 s here)
        bound = ping + grace + backoff * 1.2 + 1.5
        await hub.wait_for(lambda: session.registrations == 2, timeout=bound + 5,
                           what="re-registration through a fresh connection")
        took = time.monotonic() - t0
        assert took <= bound, f"the dead link was noticed after {took:.1f}s (bound {bound:.1f}s)"
        assert proxy.accepted >= 2, "the remote re-registered without a new connection?"
        assert hub.hub.routes[("default", "edge-1", "netconn")] is not old
        p = await ep.connect(protocol.Factory.forProtocol(_Echoing)).addTimeout(WAIT, reactor)
        assert await p.roundtrip(b"after") == b"after"
        p.transport.loseConnection()
    finally:
        proxy.close()


def test_keepalive_settings_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keepalive time and timeout must be positive"):
        RemoteSession("127.0.0.1:1", "edge-1", "t", {}, keepalive_time=0)
