"""
The hub's other faces: health and reflection, `sesame remotes`, and mTLS
(client certificates on top of tokens) for clients and remotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import defer, endpoints, protocol, reactor

from sesame.hub import Hub
from sesame.hub.tls import ensure_hub_tls, issue_client_cert
from sesame.netconn import NetConnError
from sesame.remote import RemoteSession, agent_offers
from sesame.testing.hub import HubFixture, escape


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Client(protocol.Protocol):
    def connectionMade(self):
        self.buf = bytearray()
        self.got = defer.Deferred()

    def dataReceived(self, data):
        self.buf += data
        if not self.got.called:
            self.got.callback(None)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = HubFixture(tmp_path_factory.mktemp("surface"))
    pytest_twisted.blockon(h.start())
    echo = pytest_twisted.blockon(endpoints.TCP4ServerEndpoint(
        reactor, 0, interface="127.0.0.1").listen(protocol.Factory.forProtocol(Echo)))
    h.echo_port = echo.getHost().port
    pytest_twisted.blockon(h.start_remote("edge-1", allow=[f"127.0.0.1:{h.echo_port}"]))
    yield h
    pytest_twisted.blockon(h.stop())
    pytest_twisted.blockon(echo.stopListening())


def _channel(h: HubFixture) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=h.ca_path.read_bytes())
    return grpc.secure_channel(h.target, creds)


def test_health_and_reflection(hub):
    with _channel(hub) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"sesame.v1alpha1.TunnelService", "sesame.v1alpha1.RemoteControl",
                "sesame.v1alpha1.Sesame", "sesame.admin.v1alpha1.Admin",
                "grpc.health.v1.Health"} <= names
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="sesame.admin.v1alpha1.Admin")]), timeout=10))
        files = answers[0].file_descriptor_response.file_descriptor_proto
        assert files, answers[0]  # a reflection client can build Admin's stubs


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "sesame", *args], env=full,
                          capture_output=True, text=True, timeout=60)


def test_sesame_remotes_reads_every_page(hub):
    hub.store.create_namespace("bulk")  # its own namespace: the other tests see none of it
    for i in range(1100):  # more than one page of ListRemotes (1000 at most)
        hub.store.create_remote(f"bulk-{i:04d}", namespace="bulk")
    out = _cli(hub.env(hub.client_token(namespace="bulk")), "remotes", "--namespace", "bulk",
               "--json")
    assert out.returncode == 0, out.stderr
    names = [r["name"] for r in json.loads(out.stdout)]
    assert sorted(names) == [f"bulk-{i:04d}" for i in range(1100)]


def test_sesame_remotes_lists_what_the_token_may_see(hub):
    out = _cli(hub.env(hub.client_token()), "remotes", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["edge-1"]["connected"] is True
    assert rows["edge-1"]["endpoints"] == ["netconn"]
    assert rows["edge-1"]["namespace"] == "default"
    table = _cli(hub.env(hub.client_token()), "remotes")
    assert table.returncode == 0 and "edge-1" in table.stdout and "netconn" in table.stdout
    # a token limited to other remotes sees none of edge-1
    narrow = _cli(hub.env(hub.client_token("edge-2*")), "remotes", "--json")
    assert narrow.returncode == 0 and json.loads(narrow.stdout) == []
    bad = _cli(hub.env("ses_0123456789ab_" + "x" * 43), "remotes")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "sesame remotes: UNAUTHENTICATED: missing, invalid or revoked token"


@pytest_twisted.ensureDeferred
async def test_mtls_hub_wants_a_client_certificate(tmp_path, hub):
    # a second hub sharing the first one's store, requiring client certificates
    tls = ensure_hub_tls(tmp_path, ["127.0.0.1"])
    cert, key = issue_client_cert(tmp_path, "laptop")
    (tmp_path / "client.pem").write_bytes(cert)
    (tmp_path / "client-key.pem").write_bytes(key)
    mhub = Hub(hub.store, bridge=hub.bridge)
    from sesame.bridge._loop import to_deferred

    port = await to_deferred(hub.bridge.submit(mhub.start(
        "127.0.0.1", 0, tls.server_credentials(require_client_cert=True))))
    rtok = hub.remote_token("edge-m")
    session = RemoteSession(f"127.0.0.1:{port}", "edge-m", rtok,
                            agent_offers([f"127.0.0.1:{hub.echo_port}"]),
                            credentials=tls.channel_credentials(tls.ca_pem, cert, key))
    await to_deferred(hub.bridge.submit(session.astart()))
    try:
        ok = await defer.ensureDeferred(_wait(lambda: session.registered.is_set()))
        assert ok, session.last_error
        base = (f"sesame:remote=edge-m:host=127.0.0.1:port={hub.echo_port}:"
                f"hub=127.0.0.1\\:{port}:ca={escape(str(tls.ca_path))}:token={hub.client_token()}")
        with pytest.raises(NetConnError) as err:
            await endpoints.clientFromString(reactor, base).connect(
                protocol.Factory.forProtocol(Client))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        p = await endpoints.clientFromString(
            reactor, base + f":cert={escape(str(tmp_path / 'client.pem'))}"
                            f":key={escape(str(tmp_path / 'client-key.pem'))}").connect(
            protocol.Factory.forProtocol(Client))
        p.transport.write(b"mutual")
        await p.got.addTimeout(10, reactor)
        assert bytes(p.buf).startswith(b"m")
        p.transport.abortConnection()
    finally:
        await to_deferred(hub.bridge.submit(session.astop()))
        await to_deferred(hub.bridge.submit(mhub.stop(0)))


def test_cert_without_key_is_refused_at_parse_time(hub, tmp_path):
    with pytest.raises(ValueError, match="^key: cert= and key= go together"):
        endpoints.clientFromString(
            reactor, f"sesame:remote=edge-1:host=127.0.0.1:port=1:{hub.endpoint_kwargs('t')}"
                     f":cert={escape(str(tmp_path / 'c.pem'))}")


async def _wait(pred, timeout: float = 10.0) -> bool:
    from twisted.internet import task

    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return pred()
