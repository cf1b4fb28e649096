"""
Structured logs: ``sesame hub|remote --log-format json`` writes one JSON object a line
(twisted.logger's ``eventAsJSON``), and no token ever reaches a log line, whatever happens
(registration, connections, wrong tokens, a token revoked under a live remote).

Real ``sesame`` processes on 127.0.0.1 with TLS, as in tests/test_e2e.py.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from tests.e2e_support import (
    REGISTERED,
    SESAME,
    EchoConn,
    Hub,
    Procs,
    TargetServer,
    recv_all,
    sesame,
    start_forward,
    wait_until,
)

GRPC_CORE_LINE = re.compile(r"^[EWID]\d{4} ")  # grpc's own C-core logging, if any


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if not line.strip() or GRPC_CORE_LINE.match(line):
            continue
        event = json.loads(line)  # every other line is one JSON object
        assert isinstance(event, dict), line
        assert {"log_level", "log_namespace", "log_time", "log_text"} <= event.keys(), line
        out.append(event)
    return out


def test_json_logs_and_no_token_is_ever_logged(procs: Procs, target: TargetServer,
                                               tmp_path: Path) -> None:
    data = tmp_path / "data"
    port_file = tmp_path / "hub.port"
    hp = procs.start("hub", [*SESAME, "hub", "--listen", "tcp:0:interface=127.0.0.1",
                             "--data-dir", str(data), "--port-file", str(port_file),
                             "--log-format", "json"], cwd=tmp_path)
    port = wait_until(lambda: port_file.exists() and port_file.read_text().endswith("\n")
                      and int(port_file.read_text()), what="the hub's port file")
    hub = Hub(hp, port, data, port_file)

    remote_token = hub.token("--remote", "edge-1")
    client_token = hub.token("--client")
    admin_token = hub.token("--admin")
    other_remote = hub.token("--remote", "edge-2")
    secrets = [remote_token, client_token, admin_token, other_remote]
    bogus = "ses_0123456789ab_" + "S3cr3tNeverLogged" * 3
    (tmp_path / "edge-1.token").write_text(remote_token + "\n")

    remote = procs.start("remote", [
        *SESAME, "remote", "--hub", hub.address, "--name", "edge-1", "--token-file",
        str(tmp_path / "edge-1.token"), "--ca", str(hub.ca), "--allow",
        f"127.0.0.1:{target.port}", "--log-format", "json"], cwd=tmp_path)
    remote.wait_line(REGISTERED)
    hp.wait_line(r"remote default/edge-1 connected from")

    # traffic through the hub
    connect = f"sesame:remote=edge-1:host=127.0.0.1:port={target.port}"
    _, fport = start_forward(procs, connect, hub.client_env(client_token), name="forward")
    c = EchoConn(fport)
    c.roundtrip()
    c.close()

    # a client with a wrong token: refused, and the refusal is logged without the token
    bad_fwd, bport = start_forward(procs, connect, hub.client_env(bogus), name="bad-forward")
    with socket.create_connection(("127.0.0.1", bport), timeout=20) as s:
        assert recv_all(s) == b""
    bad_fwd.wait_line(r"UNAUTHENTICATED")

    # a remote with a token for another name (text logs): refused, exits
    (tmp_path / "edge-2.token").write_text(other_remote + "\n")
    wrong = procs.start("wrong-remote", [
        *SESAME, "remote", "--hub", hub.address, "--name", "edge-3", "--token-file",
        str(tmp_path / "edge-2.token"), "--ca", str(hub.ca), "--allow", "127.0.0.1:1"],
        cwd=tmp_path)
    assert wrong.wait_exit() == 2
    assert "PERMISSION_DENIED" in wrong.err.text()

    # revoke edge-1's token under the live remote: the hub logs it at the next connection
    r = sesame("token", "revoke", remote_token, "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    with socket.create_connection(("127.0.0.1", fport), timeout=20) as s:
        s.sendall(b"echo\n")
        assert recv_all(s) == b""
    hp.wait_line(r"token of remote default/edge-1 was revoked")

    procs.stop_all()
    hub_events = json_lines(hp.err.text())
    remote_events = json_lines(remote.err.text())
    texts = " ".join(e["log_text"] for e in hub_events)
    assert "remote default/edge-1 connected from" in texts
    assert any("registered namespaces/default/remotes/edge-1" in e["log_text"]
               for e in remote_events)
    assert any(e["log_level"]["name"] == "warn" for e in hub_events)  # the revocation

    everything = "\n".join(p.out.text() + "\n" + p.err.text() for p in procs.procs)
    assert everything.count("\n") > 10  # there is something to search
    for token in [*secrets, bogus]:
        secret = token.split("_", 2)[2]
        assert token not in everything
        assert secret not in everything, f"a token secret was logged: ...{secret[-6:]}"


def test_a_logged_exception_reaches_the_twisted_log_with_its_traceback() -> None:
    """``log.exception`` in sesame code under ``sesame hub`` (the stdlib->Twisted bridge of
    sesame.tap) must log the traceback, not raise from the handler into the caller."""
    import logging

    from twisted.logger import globalLogPublisher

    from sesame import tap

    root = logging.getLogger("sesame")
    before = list(root.handlers), root.level
    tap._log_stdlib_to_twisted()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        try:
            {}["missing"]
        except KeyError:
            logging.getLogger("sesame.mgmt").exception("GetRemote failed")
    finally:
        globalLogPublisher.removeObserver(events.append)
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    texts = [e["text"] for e in events if e.get("log_namespace") == "sesame.mgmt"]
    assert len(texts) == 1, events
    assert texts[0].startswith("GetRemote failed\nTraceback (most recent call last):")
    assert "KeyError: 'missing'" in texts[0]
