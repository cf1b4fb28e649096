"""
The hub against a fleet and a hostile user (issue 10): stream requests of two sessions of
one remote never cross, NetConn calls are checked before anything is read and wait for
their dial a bounded time in bounded numbers, and a revoked token ends what lives on it
within a second.  Real hub, real remotes, real grpcio over TLS on 127.0.0.1.
"""

from __future__ import annotations

import os

import grpc
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor

from sesame import _names as N
from sesame.bridge import to_deferred
from sesame.hub import _hub
from sesame.netconn import METHOD as NETCONN_METHOD
from sesame.remote import FixedTargetServicer, agent_offers, netconn_registry
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from tests import test_hub
from tests.test_hub import connect, roundtrip, within

# the fixtures of tests/test_hub.py, by assignment (pytest finds them by name)
sesame_hub = test_hub.sesame_hub
echo_factory = test_hub.echo_factory
echo_port = test_hub.echo_port


class Banner(protocol.Protocol):
    """Says which server it is at once, then echoes."""

    def connectionMade(self):
        self.transport.write(b"B:")

    def dataReceived(self, data):
        self.transport.write(data)


@pytest_twisted.ensureDeferred
async def test_two_sessions_of_one_remote_never_cross_streams(sesame_hub, echo_port):
    """An agent (netconn) and a second process serving ``web``, both registered as
    edge-1 with the same token: 400 concurrent connections split between the two
    endpoints each reach the right server (stream request ids used to be numbered per
    session and looked up across all of the remote's sessions)."""
    hub = sesame_hub
    banner = await within(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
                          .listen(protocol.Factory.forProtocol(Banner)))
    try:
        token = hub.remote_token("edge-1")
        await hub.start_remote("edge-1", offers=agent_offers([f"127.0.0.1:{echo_port}"],
                                                             reactor=reactor), token=token)
        await hub.start_remote("edge-1", token=token, offers={"web": netconn_registry(
            FixedTargetServicer(f"127.0.0.1:{banner.getHost().port}", reactor=reactor))})
        ctok = hub.client_token()

        async def one(i: int) -> None:
            payload = b"%d:" % i + os.urandom(64)
            if i % 2:
                conn = await connect(hub, ctok, endpoint="web")
                conn.transport.write(payload)
                assert await conn.until(2 + len(payload)) == b"B:" + payload
            else:
                conn = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
                await roundtrip(conn, payload)
            conn.transport.loseConnection()
            await within(conn.lost)

        results = await defer.DeferredList(
            [defer.ensureDeferred(one(i)) for i in range(400)], consumeErrors=True)
        failures = [r[1] for r in results if not r[0]]
        assert not failures, f"{len(failures)} of 400 failed, e.g. {failures[0].getErrorMessage()}"
        assert not hub.hub._pending  # every request answered and forgotten
    finally:
        await banner.stopListening()


# --- NetConn calls before their dial --------------------------------------------------------


def _dial_bytes(port: int) -> bytes:
    return rc_pb.NetConnRequest(dial=rc_pb.NetConnRequest.Dial(
        address=netaddr_pb2.NetAddr(network="tcp", address=f"127.0.0.1:{port}"))
    ).SerializeToString()


def _open_calls(hub, n: int, metadata: tuple, *, channel_count: int = 1,
                send: bytes | None = None) -> defer.Deferred:
    """On the bridge loop: ``n`` raw NetConn calls (spread over ``channel_count`` channels,
    i.e. client connections), optionally sending ``send``, never half-closing; fires with
    [(code, details)] in call order once every call has ended."""

    async def go():
        creds = hub.tls.channel_credentials(hub.tls.ca_pem)
        channels = [grpc.aio.secure_channel(hub.target, creds) for _ in range(channel_count)]
        try:
            calls = []
            for i in range(n):
                call = channels[i % channel_count].stream_stream(NETCONN_METHOD)(
                    metadata=metadata)
                if send is not None:
                    await call.write(send)
                calls.append(call)
            out = []
            for call in calls:
                out.append((await call.code(), await call.details()))
            return out
        finally:
            for ch in channels:
                await ch.close()

    return to_deferred(hub.bridge.submit(go()))


def _md(token: str | None, remote: str = "edge-1") -> tuple:
    md = [(N.MD_REMOTE, remote)]
    if token is not None:
        md.append((N.MD_AUTH, f"Bearer {token}"))
    return tuple(md)


@pytest_twisted.ensureDeferred
async def test_calls_without_a_token_are_refused_before_anything_is_read(sesame_hub, echo_port):
    """5,000 token-less calls that never send used to stay open (each holding memory):
    the token is checked from the metadata, so each ends with UNAUTHENTICATED after at
    most the short drain, while a real connection keeps working."""
    hub = sesame_hub
    await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    ctok = hub.client_token()
    live = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
    outcome = await within(_open_calls(hub, 300, _md(None), channel_count=3), 30)
    assert {code for code, _ in outcome} == {grpc.StatusCode.UNAUTHENTICATED}
    assert {details for _, details in outcome} == {"missing, invalid or revoked token"}
    wrong = await within(_open_calls(hub, 20, _md("ses_0123456789ab_" + "x" * 43)), 30)
    assert {code for code, _ in wrong} == {grpc.StatusCode.UNAUTHENTICATED}
    # a token that may not reach the remote: PERMISSION_DENIED, also without a dial
    other = hub.client_token(pattern="edge-2")
    denied = await within(_open_calls(hub, 5, _md(other)), 30)
    assert {code for code, _ in denied} == {grpc.StatusCode.PERMISSION_DENIED}
    await roundtrip(live, os.urandom(1000))
    assert hub.hub._pending_dials == 0 and not hub.hub._pending_dials_by_peer
    live.transport.loseConnection()
    await within(live.lost)


@pytest_twisted.ensureDeferred
async def test_a_call_that_never_dials_ends_with_deadline_exceeded(sesame_hub, echo_port,
                                                                   monkeypatch):
    monkeypatch.setattr(_hub, "DIAL_TIMEOUT", 0.5)
    hub = sesame_hub
    await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    ctok = hub.client_token()
    (code, details), = await within(_open_calls(hub, 1, _md(ctok)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == "no dial within 0.5s of the call's start"
    # a call that dials in time goes through (the raw call's bytes reach the echo server)
    assert hub.hub._pending_dials == 0
    ok = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
    await roundtrip(ok)
    ok.transport.loseConnection()
    await within(ok.lost)


@pytest_twisted.ensureDeferred
async def test_calls_waiting_for_their_dial_are_bounded_per_connection(sesame_hub, echo_port,
                                                                       monkeypatch):
    monkeypatch.setattr(_hub, "DIAL_TIMEOUT", 2.0)
    monkeypatch.setattr(_hub, "MAX_PENDING_DIALS_PER_PEER", 3)
    monkeypatch.setattr(_hub, "REFUSAL_DRAIN", 0.1)
    hub = sesame_hub
    await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    ctok = hub.client_token()
    outcome = await within(_open_calls(hub, 5, _md(ctok)))
    codes = [code for code, _ in outcome]
    # three wait for their dial (and time out); the rest are refused at once
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 3, outcome
    refused = [d for c, d in outcome if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) == 2, outcome
    assert refused[0].startswith("too many NetConn calls waiting for their dial (3 on this")
    # other connections were never limited, and the hub is back to zero
    ok = await connect(hub, ctok, host="127.0.0.1", port=echo_port)
    await roundtrip(ok)
    ok.transport.loseConnection()
    await within(ok.lost)
    assert hub.hub._pending_dials == 0


# --- revocation -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_revoking_a_client_token_ends_its_open_connections(sesame_hub, echo_port):
    hub = sesame_hub
    await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])
    doomed, spared = hub.client_token(), hub.client_token()
    conns = [await connect(hub, doomed, host="127.0.0.1", port=echo_port) for _ in range(3)]
    other = await connect(hub, spared, host="127.0.0.1", port=echo_port)
    for c in conns:
        await roundtrip(c)
    assert hub.revoke(doomed)
    # ended by the hub, with no further call or byte from the client (the hub looks
    # four times a second: 1.5 s leaves room for a loaded machine)
    reasons = await within(defer.gatherResults([c.lost for c in conns]), 1.5)
    assert all("revoked" in str(r) for r in reasons), reasons
    await roundtrip(other, b"spared")
    other.transport.loseConnection()
    await within(other.lost)


@pytest_twisted.ensureDeferred
async def test_revoking_a_remote_token_ends_its_sessions_without_a_call(sesame_hub, echo_port):
    hub = sesame_hub
    rtok = hub.remote_token("edge-7")
    s1 = await hub.start_remote("edge-7", allow=[f"127.0.0.1:{echo_port}"], token=rtok)
    s2 = await hub.start_remote("edge-7", token=rtok, offers={"web": netconn_registry(
        FixedTargetServicer(f"127.0.0.1:{echo_port}", reactor=reactor))})
    keep = await hub.start_remote("edge-8", allow=[f"127.0.0.1:{echo_port}"])
    ctok = hub.client_token()
    live = await connect(hub, ctok, remote="edge-7", host="127.0.0.1", port=echo_port)
    await roundtrip(live)
    assert hub.revoke(rtok)
    await hub.wait_for(lambda: not hub.routed("edge-7") and not hub.routed("edge-7", "web"),
                       timeout=1.5, what="edge-7's sessions to end")
    reason = await within(live.lost, 1.5)  # its connection went with it
    assert reason is not None
    # the remotes are told why, and do not get back in
    await hub.wait_for(lambda: "revoked" in (s1.last_error or "") and
                       "revoked" in (s2.last_error or ""), what="the remotes to hear why")
    assert hub.routed("edge-8") and keep.registrations == 1
    ok = await connect(hub, ctok, remote="edge-8", host="127.0.0.1", port=echo_port)
    await roundtrip(ok)
    ok.transport.loseConnection()
    await within(ok.lost)


def test_the_watcher_only_reads_the_store_when_it_changed(tmp_path):
    """change_marker moves for our own writes and for another connection's."""
    from sesame.hub.store import SQLiteStore

    a, b = SQLiteStore(tmp_path / "hub.db"), SQLiteStore(tmp_path / "hub.db")
    try:
        tid, tok = a.create_token("client")
        m0 = a.change_marker()
        assert a.change_marker() == m0
        assert b.revoke(tok)               # another connection (a `sesame token revoke`)
        m1 = a.change_marker()
        assert m1 != m0
        assert a.revoked_since(0) == [tid]
        assert a.revoked_since(a.get_token(tid).revoke_time + 1) == []
        a.create_token("client")           # our own write
        assert a.change_marker() != m1
    finally:
        a.close()
        b.close()
