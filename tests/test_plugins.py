"""
Plugins install with a plain ``pip install`` and are found by Twisted;
a broken ``dropin.cache`` cannot break them; ``twistd sesame`` really runs.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

DISCOVER = """
import sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import sesame
makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
print(makers["sesame"].module, sesame.__file__)
"""


def test_twistd_plugin_discovered_here():
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "sesame" in makers
    assert makers["sesame"].module == "sesame.tap"
    assert IPlugin.providedBy(makers["sesame"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project installed by a plain ``pip install`` (no editable tricks)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    assert not (target / "twisted" / "__init__.py").exists(), "must not shadow Twisted"
    assert (target / "twisted" / "plugins" / "sesame_twistd.py").exists()
    return target


def _discover(target: Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", DISCOVER],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plain_pip_install_plugins_found(installed: Path, tmp_path: Path):
    out = _discover(installed, tmp_path)
    module, sesame_file = out.split()
    assert module == "sesame.tap"
    assert sesame_file.startswith(str(installed)), "the installed copy must be the one found"


def test_broken_dropin_cache_cannot_break_discovery(installed: Path, tmp_path: Path):
    plugins = installed / "twisted" / "plugins"
    cache = plugins / "dropin.cache"
    cache.write_bytes(b"\x80\x04 this is not a pickle")
    try:
        out = _discover(installed, tmp_path)
        assert out.split()[0] == "sesame.tap"
        # an unwritable plugin directory (system-wide installs) is fine too
        cache.unlink()
        plugins.chmod(0o555)
        out = _discover(installed, tmp_path)
        assert out.split()[0] == "sesame.tap"
    finally:
        plugins.chmod(0o755)


def _env_without_grpc_choice(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRPC_EXPERIMENTS", "SESAME_GRPC_IO")}
    return {**env, **extra}


def test_twistd_sesame_refuses_a_bad_grpc_engine(tmp_path: Path):
    out = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "sesame", "host"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=_env_without_grpc_choice(SESAME_GRPC_IO="quick"),
    )
    assert out.returncode != 0
    assert "SESAME_GRPC_IO='quick': use iomgr or event-engine" in out.stdout + out.stderr


def test_twistd_sesame_host_serves_a_tunnel(tmp_path: Path):
    from sesame.tunnel import open_tunnel

    proc = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "sesame", "host",
         "--listen", "127.0.0.1:0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env_without_grpc_choice(),
    )
    lines: queue.Queue[str] = queue.Queue()
    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output

    threading.Thread(target=pump, daemon=True).start()
    try:
        seen = []
        while True:
            line = lines.get(timeout=30)
            assert line is not None, f"twistd exited early: {seen}"
            seen.append(line)
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            if m:
                break
        # twistd sesame chose grpc's engine itself (sesame._grpcio), and says which
        assert any("sesame: grpc I/O engine: iomgr (SESAME_GRPC_IO chooses" in line
                   for line in seen), seen
        ch = open_tunnel(m.group(1))
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        ch.close()
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the signal that stopped it once shutdown is done
        assert proc.wait(30) in (0, -signal.SIGTERM)
        rest = []
        while (line := lines.get(timeout=30)) is not None:
            rest.append(line)
        assert any("Server Shut Down" in line for line in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_twistd_sesame_refuses_non_loopback(tmp_path: Path):
    out = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "sesame", "host",
         "--listen", "0.0.0.0:7443"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "only loopback addresses are allowed" in out.stdout + out.stderr
