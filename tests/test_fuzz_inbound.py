"""
Every inbound message type, fuzzed at a real hub, a real remote and a real TunnelHost over
real grpc (issue 10): the machinery of ``bench/fuzz_inbound.py`` (see its docstring for the
targets and the checks), run with a small number of cases per target under the ``slow``
marker.  ``SESAME_FUZZ_CASES`` sets the total (default 300; the bench script runs 20,000+).

Outcomes that match a known, open defect are counted, not failed: each has a minimal
strict-xfail test below (they run in the normal suite).  When one is fixed its test
XPASSes, which fails the suite: remove the xfail mark and the defect's entry in
``fuzz_inbound.KNOWN`` / ``known_issue`` (so that a regression fails the fuzz again).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from sesame import _names as N
from sesame.bridge import get_bridge, to_deferred, wrap_tunnel
from sesame.netconn import METHOD as NETCONN
from sesame.type import grpctunnel_pb2 as st_pb
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from sesame.v1alpha1 import tunnel_pb2
from tests import test_hub

ROOT = Path(__file__).resolve().parent.parent


def _load_bench() -> object:
    spec = importlib.util.spec_from_file_location("fuzz_inbound", ROOT / "bench" / "fuzz_inbound.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_inbound", module)
    spec.loader.exec_module(module)
    return module


F = _load_bench()

# the fixtures of tests/test_hub.py, by assignment (pytest finds them by name)
sesame_hub = test_hub.sesame_hub
echo_factory = test_hub.echo_factory
echo_port = test_hub.echo_port

TOTAL_CASES = int(os.environ.get("SESAME_FUZZ_CASES", "300"))
PROMPT = 5.0


# --- the fuzz (slow) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_env():
    env = pytest_twisted.blockon(defer.ensureDeferred(F.start_env(reactor)))
    try:
        yield env
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(F.stop_env(env)))


def _on_loop(coro):
    """Run ``coro`` on the bridge loop from the fuzz thread (the reactor keeps running)."""
    return get_bridge().run(coro, 600)


@pytest.mark.slow
@pytest.mark.parametrize("target", list(F.TARGETS))
@pytest_twisted.ensureDeferred
async def test_every_inbound_message_ends_with_a_documented_status(fuzz_env, target):
    """Hypothesis batches against one target: every call ends with a documented status in
    time, tunnelled streams close after a cancel, clean connections echo (a failing example
    is shrunk and shown)."""
    stats = F.Stats()
    budget = F.split_budget(TOTAL_CASES, list(F.TARGETS))[target]
    # hypothesis runs in a thread: the remote dials on the reactor, which must keep running
    await threads.deferToThread(F.fuzz_target, fuzz_env, target, budget, _on_loop, stats,
                                strict=True)
    assert stats.cases[target] >= budget
    assert stats.failure_count == 0, stats.failures


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_after_the_fuzz_nothing_is_left_open_and_the_canary_still_works(fuzz_env):
    """The canary (opened before any fuzz) round-trips; hub, remote and host are back to
    their baseline (no pending dials, stream requests, extra sessions, token holders,
    tunnels, relays; bridge-loop tasks and threads bounded, allowing for the calls a known
    defect leaves open); the remote never re-registered; a fresh connection echoes."""
    final = await to_deferred(get_bridge().submit(F.final_check(fuzz_env)))
    assert final["problems"] == [], final


# --- what the fuzz found: fixed defects as regression tests, open ones as strict xfails -----


def _creds(hub):
    return hub.tls.channel_credentials(hub.tls.ca_pem)


def _bearer(token: str) -> tuple[str, str]:
    return (N.MD_AUTH, f"Bearer {token}")


async def _stream_call(hub, path: str, metadata: tuple, messages: list[bytes]) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(hub.target, _creds(hub)) as ch:
        call = ch.stream_stream(path)(metadata=metadata)
        for m in messages:
            try:
                await call.write(m)
            except Exception:  # noqa: BLE001 - the call is over; its status says why
                break
        try:
            await call.done_writing()
        except Exception:  # noqa: BLE001
            pass
        return await asyncio.wait_for(call.code(), 10)


def test_the_harness_reads_a_batch_of_frames_from_a_host():
    """Found by a full run: a case with the window extension also asks for batches, and a
    NetConn call refused right after a half-close sends its header and its status in one
    batch.  The harness read that as one unknown frame and waited for a close that had
    come: every frame of a batch counts, and a malformed batch is a failure."""
    from sesame.core._codec import encode_batch

    res = F.Result("host.sesame")
    fs = F.FrameSession("sesame", lambda data: None, res)
    header = st_pb.ServerToClient(stream_id=1)
    header.header.SetInParent()
    close = st_pb.ServerToClient(stream_id=1)
    close.close_stream.status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    close.close_stream.status.message = "no dial request before end of stream"
    fs.opened.add(1)
    fs.on_frame(encode_batch([header.SerializeToString(), close.SerializeToString()]))
    assert dict(fs.closes) == {1: [grpc.StatusCode.INVALID_ARGUMENT.value[0]]}
    assert fs.frames_in == 2 and res.failures == []
    cut = encode_batch([header.SerializeToString()])[:-1]
    fs.on_frame(cut)
    assert res.failures == ["peer sent an unparsable batch of frames: a batched frame of "
                            f"{len(cut) - 2} bytes at byte 3: empty or past the end"], res.failures


@pytest_twisted.ensureDeferred
async def test_a_netconn_refused_at_once_closes_its_stream_on_a_batching_tunnel(fuzz_env):
    """The case the full run shrank to, against the real TunnelHost: new NetConn stream,
    half-close, no dial: INVALID_ARGUMENT on the stream, the tunnel itself ends OK."""
    case = {"dialect": "sesame", "negotiate": False, "ext": True, "nscripts": 1,
            "order": [(0, ("new", "self", NETCONN, [], None, None)), (0, ("half", "self"))]}
    for _ in range(5):
        r = await to_deferred(get_bridge().submit(
            F.run_host_tunnel(fuzz_env, case, "host.sesame")))
        assert r.failures == [] and r.code == "OK", (r.failures, r.code, r.details)
        assert r.stream_codes == {"INVALID_ARGUMENT": 1}, r.stream_codes


@pytest_twisted.ensureDeferred
async def test_a_remote_that_hangs_up_before_its_ack_fails_the_client_at_once(fuzz_env):
    """Found by a full run: the remote opens the Stream, reads connect and dial, then
    cancels.  When that cancellation reached the hub as CancelledError (not as the end of
    the requests), the client's NetConn waited out the stream request timeout (3 s) for
    an answer that could no longer come.  Now it is UNAVAILABLE at once."""
    case = {"first": ("dial_echo", fuzz_env.shapes.dial_echo()), "ack": "cancel",
            "script": [], "client_half_close": False, "end": "eof"}

    async def run() -> list:
        out = []
        channel = fuzz_env.channel()
        try:
            for i in range(6):
                fake = fuzz_env.fakes[i % len(fuzz_env.fakes)]
                t0 = asyncio.get_running_loop().time()
                r = await F.run_stream_tunnel(fuzz_env, case, fake, channel)
                out.append((r.code, r.details, r.failures,
                            asyncio.get_running_loop().time() - t0))
        finally:
            await channel.close()
        return out

    for code, details, failures, took in await to_deferred(get_bridge().submit(run())):
        assert failures == [], (code, details, failures)
        assert code == "UNAVAILABLE", (code, details)
        # not the stream request timeout's "did not open a stream in 3s"
        assert details.startswith(("remote fz-", "the remote")), details
        assert "did not open a stream in" not in details, (details, took)


@pytest_twisted.ensureDeferred
async def test_an_unparsable_management_request_is_invalid_argument(sesame_hub):
    """Found by the fuzz: grpc's own deserializer ended it UNKNOWN, before the token was
    looked at.  The token comes first (UNAUTHENTICATED), then INVALID_ARGUMENT naming the
    message type."""
    hub = sesame_hub
    admin = hub.store.create_token("admin")[1]

    async def go():
        out = []
        async with grpc.aio.secure_channel(hub.target, _creds(hub)) as ch:
            for md in ((_bearer(admin),), (), (_bearer("garbage"),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/sesame.v1alpha1.Sesame/GetRemote")(
                        b"\xff\xff", metadata=md, timeout=10)
                out.append((info.value.code(), info.value.details()))
        return out

    (code, details), *unauthenticated = await to_deferred(hub.bridge.submit(go()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sesame.v1alpha1.GetRemoteRequest" in details
    assert [c for c, _ in unauthenticated] == [grpc.StatusCode.UNAUTHENTICATED] * 2


@pytest_twisted.ensureDeferred
async def test_an_unparsable_tunnel_message_is_invalid_argument(sesame_hub):
    hub = sesame_hub
    token = hub.remote_token("fz-a")
    code = await to_deferred(hub.bridge.submit(_stream_call(
        hub, N.TUNNEL_METHOD, (_bearer(token),), [b"\xff\xff"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest_twisted.ensureDeferred
async def test_an_unparsable_stream_message_is_invalid_argument(sesame_hub):
    hub = sesame_hub
    token = hub.remote_token("fz-b")
    code = await to_deferred(hub.bridge.submit(_stream_call(
        hub, N.STREAM_METHOD, (_bearer(token), (N.MD_STREAM_ID, "1")), [b"\xff\xff"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest_twisted.ensureDeferred
async def test_a_refused_netconn_keeps_its_status_while_the_client_is_still_sending(sesame_hub):
    """A client that sends its data right behind the dial (as a pipelining client does) to a
    remote that is not connected must still see UNAVAILABLE."""
    hub = sesame_hub
    token = hub.client_token()
    dial = F.dial_bytes("127.0.0.1:9")
    data = rc_pb.NetConnRequest(bytes=b"x" * 1000).SerializeToString()

    async def go():
        return [await _stream_call(hub, NETCONN, (_bearer(token), (N.MD_REMOTE, "nobody")),
                                   [dial, data, data, data, data]) for _ in range(10)]

    codes = await to_deferred(hub.bridge.submit(go()))
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes


def test_a_host_keeps_its_status_while_the_client_is_still_sending():
    """Found by the fuzz: a TunnelHost that ended a forward tunnel for a fatal frame while
    the client was still sending frames lost its INVALID_ARGUMENT to INTERNAL 'Internal
    error from Core' (a grpc-core race); it now drains the client's writes first."""
    from grpc_health.v1 import health, health_pb2_grpc

    from sesame.core import SesameCodec
    from sesame.tunnel import ServiceRegistry, TunnelHost

    services = ServiceRegistry()
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), services)
    host = TunnelHost(services)
    port = host.start("127.0.0.1:0")
    fatal = st_pb.ClientToServer(stream_id=1).SerializeToString()  # no frame set
    more = st_pb.ClientToServer(stream_id=1, message_data=b"x" * 1000).SerializeToString()

    async def go():
        codes = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for _ in range(10):
                call = ch.stream_stream(f"/{SesameCodec.service}/OpenTunnel")()
                for m in [fatal, more, more, more, more]:
                    try:
                        await call.write(m)
                    except Exception:  # noqa: BLE001 - the call is over; its status says why
                        break
                try:
                    await call.done_writing()
                except Exception:  # noqa: BLE001
                    pass
                codes.append(await asyncio.wait_for(call.code(), 10))
        return codes

    try:
        codes = get_bridge().run(go(), 60)
    finally:
        host.stop(0.5)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, codes


async def _answer_a_stream_request(hub, ch, rtok: str, ctok: str) -> tuple:
    """(bridge loop) Play remote fz-g by hand: register, let a client NetConn to it ask for
    a stream, open that Stream and read the hub's connect and dial.  Returns (control,
    client, stream, request id); the Stream waits for our answer to the dial."""
    control = ch.stream_stream(N.TUNNEL_METHOD)(
        metadata=(_bearer(rtok), (N.MD_ENDPOINTS, "netconn")))
    await control.write(tunnel_pb2.TunnelRequest(id=0, connect={
        "remote": "namespaces/default/remotes/fz-g", "stream_buffer": 4}).SerializeToString())
    await asyncio.wait_for(control.read(), PROMPT)  # connect
    client = ch.stream_stream(NETCONN)(metadata=(_bearer(ctok), (N.MD_REMOTE, "fz-g")))
    await client.write(F.dial_bytes("127.0.0.1:9"))
    request = tunnel_pb2.TunnelResponse.FromString(await asyncio.wait_for(control.read(), PROMPT))
    stream = ch.stream_stream(N.STREAM_METHOD)(
        metadata=(_bearer(rtok), (N.MD_STREAM_ID, str(request.id))))
    await stream.write(tunnel_pb2.StreamRequest(connect={
        "remote": "namespaces/default/remotes/fz-g"}).SerializeToString())
    for _ in range(2):  # connect, dial
        await asyncio.wait_for(stream.read(), PROMPT)
    return control, client, stream, request.id


@pytest_twisted.ensureDeferred
async def test_a_remote_breaking_the_tunnel_protocol_is_unavailable_to_the_client(sesame_hub):
    """Found by the fuzz: the client got the tunnel core's INVALID_ARGUMENT ('invalid
    frame: no frame set'); it did nothing wrong, its call's tunnel died (docs/TUNNELS.md)."""
    hub = sesame_hub
    rtok, ctok = hub.remote_token("fz-g"), hub.client_token()

    async def go():
        async with grpc.aio.secure_channel(hub.target, _creds(hub)) as ch:
            control, client, stream, k = await _answer_a_stream_request(hub, ch, rtok, ctok)
            await stream.write(tunnel_pb2.StreamRequest(dial={}).SerializeToString())
            await control.write(tunnel_pb2.TunnelRequest(id=k, stream={}).SerializeToString())
            # the hub's new_stream arrives; answer with a frame that has nothing set
            await asyncio.wait_for(stream.read(), PROMPT)
            await stream.write(wrap_tunnel(st_pb.ServerToClient(stream_id=1).SerializeToString()))
            code = await asyncio.wait_for(client.code(), PROMPT)
            details = await client.details()
            stream.cancel()
            control.cancel()
            return code, details

    code, details = await to_deferred(hub.bridge.submit(go()))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "broke the tunnel protocol: invalid frame" in details


@pytest_twisted.ensureDeferred
async def test_a_remote_answering_the_dial_with_garbage_fails_the_client_at_once(sesame_hub):
    """Found by the fuzz: the client used to wait STREAM_REQUEST_TIMEOUT (15 s) for "did not
    open a stream"; the remote's Stream call ends INVALID_ARGUMENT."""
    hub = sesame_hub
    rtok, ctok = hub.remote_token("fz-g"), hub.client_token()

    async def go():
        async with grpc.aio.secure_channel(hub.target, _creds(hub)) as ch:
            control, client, stream, _ = await _answer_a_stream_request(hub, ch, rtok, ctok)
            await stream.write(b"\xff\xff")  # not a StreamRequest
            try:
                return (await asyncio.wait_for(client.code(), PROMPT),
                        await asyncio.wait_for(stream.code(), PROMPT))
            except TimeoutError:
                return None  # still waiting for the stream request to time out
            finally:
                client.cancel()
                stream.cancel()
                control.cancel()

    assert await to_deferred(hub.bridge.submit(go())) == (grpc.StatusCode.UNAVAILABLE,
                                                           grpc.StatusCode.INVALID_ARGUMENT)


@pytest_twisted.ensureDeferred
async def test_the_remote_ends_a_stream_whose_tunnel_broke(sesame_hub, echo_port):
    """Found by the fuzz: when the tunnel on a Stream ended with a protocol error the remote
    neither cancelled nor half-closed the call and stopped reading it: the call (and a task
    of the remote) never ended.  Now the remote cancels it, and keeps nothing of it."""
    hub = sesame_hub
    remote = await hub.start_remote("edge-1", allow=[f"127.0.0.1:{echo_port}"])

    async def go():
        session = hub.hub.routes[("default", "edge-1", "netconn")]
        outer, done, _ = await hub.hub.request_stream(session, "netconn")
        try:
            # a frame with nothing set: a protocol error that ends the remote's tunnel
            await outer.write(st_pb.ClientToServer(stream_id=1).SerializeToString())
            while await asyncio.wait_for(outer._read(), PROMPT) is not grpc.aio.EOF:
                pass
            ended = True
        except TimeoutError:
            ended = False  # still open
        except Exception:  # noqa: BLE001 - cancelled by the remote: an end too
            ended = True
        finally:
            if not done.done():
                done.set_result(None)
        for _ in range(50):  # and the remote let go of it
            if not remote._streams:
                break
            await asyncio.sleep(0.1)
        return ended, len(remote._streams)

    assert await to_deferred(hub.bridge.submit(go())) == (True, 0), \
        "the remote left its Stream call open"
