"""docs/NETCONN.md's "Twisted client in 10 lines" runs as written, against a real NetConn
server (grpcio, this process) and a real TCP target (this process's reactor); the client is
its own process, so its ``reactor.run()`` is a real one."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, utils
from twisted.internet.protocol import Protocol

from tests.netconn_helpers import WAIT, factory_of, make_carrier, within

DOC = Path(__file__).resolve().parent.parent / "docs" / "NETCONN.md"
ROOT = DOC.parent.parent


def client_block() -> str:
    section = DOC.read_text().split("## A Twisted client in 10 lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class Answer(Protocol):
    """The target: answers a request line with a tiny HTTP response, then closes."""

    def __init__(self) -> None:
        self.got = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if b"\r\n\r\n" in self.got:
            self.transport.write(b"HTTP/1.0 200 OK\r\n\r\nhello through NetConn")
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.got)


@pytest.fixture(scope="module")
def carrier():
    c = make_carrier("direct")
    yield c
    c.close()


def run_client(*args: str) -> defer.Deferred:
    d = utils.getProcessOutputAndValue(
        sys.executable, ["-c", client_block(), *args], env=dict(os.environ), path=str(ROOT))
    return within(d, 60)


def test_block_is_ten_lines():
    lines = [line for line in client_block().splitlines() if line.strip()]
    assert len(lines) <= 10, lines
    assert any("NetConnClientEndpoint" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_ten_line_client_runs(carrier):
    targets: list[Answer] = []
    port = reactor.listenTCP(0, factory_of(lambda: targets.append(Answer()) or targets[-1]),
                             interface="127.0.0.1")
    try:
        out, err, code = await run_client(carrier.via, f"127.0.0.1:{port.getHost().port}")
        assert code == 0, (out, err)
        assert len(targets) == 1
        request = await within(targets[0].done, WAIT)
        assert request == b"GET / HTTP/1.0\r\n\r\n"
        text = out.decode()
        assert text.startswith("target said: ")
        assert "hello through NetConn" in text, text
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ten_line_client_reports_a_failed_dial(carrier):
    """Its errback line: a dial the remote's allowlist denies is printed, and the client exits."""
    out, err, code = await run_client(carrier.via, "127.0.0.2:80")
    assert code == 0, (out, err)
    assert out.decode().startswith("NetConn failed: PERMISSION_DENIED"), (out, err)
