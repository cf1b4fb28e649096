"""
NetConn against hostile input (issue 10, defects 5, 6 and 8): every call ends with a status,
at once, and leaves the other calls of the same server alone.

* names that fail IDNA encoding under a ``*.domain`` rule (they used to hang: the exception
  escaped on the reactor and the call was never settled);
* any unexpected exception in the dial path or the relay pumps (injected) settles the call;
* an unparsable message after a valid dial ends the call with INVALID_ARGUMENT and closes the
  target (it used to stall until the client's deadline), directly, through a tunnel and
  through a hub;
* ports are ASCII digits only (``²`` and Arabic-Indic digits used to give UNKNOWN or be read
  as numbers).

Real grpcio, real sockets on 127.0.0.1, no sleeps (Deferreds with timeouts).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.threads import deferToThread

from sesame.netconn import NetConnError, connectNetConn
from sesame.netconn._allowlist import Allowlist
from sesame.netconn._wire import encode_bytes
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from tests.netconn_helpers import (
    WAIT,
    EchoTarget,
    HalfRecorder,
    Lab,
    MiB,
    Source,
    eventually,
    factory_of,
    make_carrier,
    within,
)

PROMPT = 5.0  # "at once": well under WAIT (the raw calls' deadline)
GARBAGE = b"\xff\xff"


@pytest.fixture(scope="module", params=("direct", "tunnel"))
def carrier(request: pytest.FixtureRequest):
    c = make_carrier(request.param)
    yield c
    c.close()


@pytest_twisted.async_yield_fixture
async def lab(carrier):
    lab = Lab(carrier)
    saved = carrier.servicer.allow
    yield lab
    carrier.servicer.allow = saved
    await lab.close()
    await eventually(lambda: carrier.servicer.active == 0, what="servicer.active == 0")
    await eventually(lambda: carrier.open_streams() == 0, what="no open tunnel streams")


class KeepRecorder(HalfRecorder):
    keep = True


async def dial_error(lab: Lab, address: str, timeout: float = PROMPT, **kw: Any) -> NetConnError:
    try:
        p = await within(connectNetConn(lab.carrier.target, address, factory_of(KeepRecorder), **kw),
                         timeout)
    except NetConnError as exc:
        return exc
    p.transport.abortConnection()
    raise AssertionError(f"{address} connected")


async def roundtrip(p: KeepRecorder, payload: bytes = b"still alive") -> None:
    start = p.nbytes
    p.transport.write(payload)
    await p.wait_bytes(start + len(payload))
    assert bytes(p.buf[start:start + len(payload)]) == payload


def dial_msg(address: str) -> bytes:
    return rc_pb.NetConnRequest(dial=rc_pb.NetConnRequest.Dial(
        address=netaddr_pb2.NetAddr(network="tcp", address=address))).SerializeToString()


def raw_call(channel: grpc.Channel, messages: list[bytes],
             metadata: tuple = ()) -> tuple[grpc.StatusCode, str, list[bytes], float]:
    """(blocking: run in a thread) A NetConn call with hand-built request bytes:
    (code, details, responses, seconds it took)."""
    call = channel.stream_stream("/sesame.v1alpha1.RemoteControl/NetConn")
    got: list[bytes] = []
    t0 = time.monotonic()
    try:
        for msg in call(iter(messages), timeout=WAIT, metadata=metadata):
            got.append(msg)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", got, time.monotonic() - t0
    return grpc.StatusCode.OK, "", got, time.monotonic() - t0


# --- defect 5: names that fail IDNA encoding --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_names_that_fail_idna_end_with_invalid_argument_at_once(lab, carrier):
    """Under ``*.lab.example:P``: a 64-character label, an empty label, 70 × 'é', and other
    names no resolver takes, each get INVALID_ARGUMENT naming the problem, at once."""
    echo = lab.listen(EchoTarget)
    carrier.servicer.allow = Allowlist([f"*.lab.example:{echo}", "127.0.0.1:*"])
    live = await lab.connect(echo, KeepRecorder)
    await roundtrip(live)
    for name, words in ((f"{'x' * 64}.lab.example", "too long"),
                        ("a..lab.example", "empty"),
                        (f"{'é' * 70}.lab.example", "too long"),
                        (f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 50}.lab.example", "too long"),
                        ("a b.lab.example", "not allowed"),
                        ("a\x00b.lab.example", "not allowed"),
                        ("-a.lab.example", "hyphen")):
        exc = await dial_error(lab, f"{name}:{echo}")
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, (name, exc)
        assert "host name" in exc.details and words in exc.details.lower(), (name, exc.details)
        await roundtrip(live, name.encode() + b" did not hurt")
    # a name that encodes is dialled as usual (here it does not resolve)
    exc = await dial_error(lab, f"ünïcode.lab.example:{echo}", timeout=WAIT)
    assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
    live.transport.loseConnection()
    assert (await live.wait_lost()).check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_unicode_patterns_match_their_a_labels(lab, carrier):
    """A pattern in Unicode and a dial in A-labels (or the other way round) are the same name:
    matching is on the IDNA form, so neither is denied for its spelling."""
    echo = lab.listen(EchoTarget)
    carrier.servicer.allow = Allowlist([f"*.bücher.example:{echo}"])
    for name in ("x.bücher.example", "x.xn--bcher-kva.example", "X.BÜCHER.example"):
        exc = await dial_error(lab, f"{name}:{echo}", timeout=WAIT)
        assert exc.code == grpc.StatusCode.UNAVAILABLE, (name, exc)  # allowed; no such host
    exc = await dial_error(lab, f"x.bucher.example:{echo}")
    assert exc.code == grpc.StatusCode.PERMISSION_DENIED, exc


@pytest_twisted.ensureDeferred
async def test_an_unexpected_exception_while_dialling_settles_the_call(lab, carrier, monkeypatch):
    """Whatever goes wrong on the reactor while dialling, the call ends with INTERNAL at once."""
    import sesame.netconn._servicer as servicer_module

    echo = lab.listen(EchoTarget)
    live = await lab.connect(echo, KeepRecorder)

    def boom(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("injected dial failure")

    monkeypatch.setattr(servicer_module, "_dial", boom)
    exc = await dial_error(lab, f"127.0.0.1:{echo}")
    assert exc.code == grpc.StatusCode.INTERNAL, exc
    assert "injected dial failure" in exc.details
    await roundtrip(live)
    monkeypatch.undo()
    live.transport.loseConnection()
    assert (await live.wait_lost()).check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_an_unexpected_exception_checking_the_dial_settles_the_call(lab, carrier,
                                                                       monkeypatch):
    """An exception on the loop side (the check) gives INTERNAL, not UNKNOWN."""
    echo = lab.listen(EchoTarget)

    def boom(dial: Any) -> Any:
        raise RuntimeError("injected check failure")

    monkeypatch.setattr(carrier.servicer, "_check", boom)
    exc = await dial_error(lab, f"127.0.0.1:{echo}")
    assert exc.code == grpc.StatusCode.INTERNAL, exc
    assert "injected check failure" in exc.details


@pytest_twisted.ensureDeferred
async def test_an_unexpected_exception_in_the_upload_pump_ends_the_call(lab, carrier,
                                                                      monkeypatch):
    """The upload pump failing ends the call with INTERNAL and aborts the target connection."""
    import sesame.netconn._relay as relay_module

    echo = lab.listen(EchoTarget)
    p = await lab.connect(echo, KeepRecorder)
    target = await lab.next_accepted(echo)
    await roundtrip(p)

    def boom(msg: bytes, cls: type, **kw: Any) -> Any:
        raise RuntimeError("injected pump failure")

    monkeypatch.setattr(relay_module, "decode_bytes", boom)
    p.transport.write(b"this one breaks the pump")
    reason = await p.wait_lost(PROMPT)
    assert reason.check(error.ConnectionLost), reason
    assert "INTERNAL" in str(reason.value) and "injected pump failure" in str(reason.value)
    await target.wait_lost(PROMPT)


# --- defect 6: garbage after a valid dial -----------------------------------------------------------


async def _garbage_after_dial(lab: Lab, channel: grpc.Channel, metadata: tuple = (),
                              good: Any = None) -> None:
    """The check shared by the carriers and the hub: a concurrent call (``good`` makes it)
    moves 8 MiB through an echo target and checks their sha256 while another call sends
    dial, bytes, ``ff ff``, bytes, half-close; that one ends with INVALID_ARGUMENT at once and
    its target connection is closed."""
    echo = lab.listen(EchoTarget)
    live = await (good or (lambda port: lab.connect(port, HalfRecorder)))(echo)
    src = Source(live.transport, 8 * MiB, then=None)

    messages = [dial_msg(f"127.0.0.1:{echo}"), encode_bytes(b"hello"), GARBAGE,
                encode_bytes(b"more data")]
    call = deferToThread(raw_call, channel, messages, metadata)
    code, details, responses, took = await within(call, WAIT + 5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details, took)
    assert took < PROMPT, took
    assert "NetConnRequest" in details and "parse" in details.lower(), details
    assert rc_pb.NetConnResponse.FromString(responses[0]).WhichOneof("data") == "conn"
    # the garbage call's target (the second one accepted) is closed, without "more data"
    await lab.next_accepted(echo)
    target = await lab.next_accepted(echo)
    await target.wait_lost(PROMPT)
    assert target.nbytes <= len(b"hello"), target.nbytes

    await live.wait_bytes(8 * MiB, 60)
    assert src.finished and live.digest == src.digest
    live.transport.loseConnection()
    assert (await live.wait_lost()).check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_garbage_after_a_valid_dial_ends_the_call(lab, carrier):
    await _garbage_after_dial(lab, carrier.raw_channel)


@pytest_twisted.ensureDeferred
async def test_garbage_first_message_is_invalid_argument(lab, carrier):
    """An unparsable first message is INVALID_ARGUMENT (it was UNKNOWN)."""
    code, details, _, _ = await within(deferToThread(raw_call, carrier.raw_channel, [GARBAGE]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "NetConnRequest" in details, details


@pytest_twisted.ensureDeferred
async def test_garbage_after_a_valid_dial_through_the_hub(tmp_path):
    """The same through a hub: the hub relays the client's messages as they are, the remote
    refuses the garbage, the hub passes its status on."""
    from sesame.endpoints import hub_call_factory
    from sesame.testing.hub import HubFixture

    fx = HubFixture(tmp_path / "hub")
    await fx.start()
    channel = None
    try:
        await fx.start_remote("edge-1", allow=["127.0.0.1:*"])
        token = fx.client_token()
        cfg = fx.hub_config(token)
        channel = grpc.secure_channel(fx.target, cfg.credentials())
        md = (*cfg.metadata(), ("sesame-remote", "edge-1"))
        factory = hub_call_factory(cfg, "edge-1", None)
        lab = Lab(None)  # type: ignore[arg-type]

        def good(port: int) -> Any:
            return within(connectNetConn(factory, f"127.0.0.1:{port}", factory_of(HalfRecorder)))

        try:
            await _garbage_after_dial(lab, channel, md, good)
        finally:
            await lab.close()
    finally:
        if channel is not None:
            channel.close()
        await fx.stop()


# --- defect 8: ports are ASCII digits ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_non_ascii_digits_in_dial_ports_are_invalid_argument(lab, carrier):
    echo = lab.listen(EchoTarget)
    for port in ("²", "٢٢", "２２", "٢", "²²", "1" * 5000, "+22", " 22", "22 ", "2_2"):
        exc = await dial_error(lab, f"127.0.0.1:{port}")
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, (port, exc)
        assert "port" in exc.details, exc.details
    # ASCII digits are fine, leading zeros included
    p = await lab.connect(f"127.0.0.1:{echo:05d}", KeepRecorder)
    await roundtrip(p)
    p.transport.loseConnection()
    assert (await p.wait_lost()).check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_long_hostile_input_keeps_its_status(lab, carrier):
    """What a client sends is echoed cut short: a status message past gRPC's 8 KiB metadata
    limit would reach the client as RESOURCE_EXHAUSTED instead of the status."""
    cases = [
        ("é" * 3000 + ":80", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 100_000, {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("[" + "é" * 3000 + "]:80", {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("[fe80::1%" + "é" * 3000 + "]:80", {}, grpc.StatusCode.PERMISSION_DENIED),
        ("127.0.0.1:" + "9" * 5000, {}, grpc.StatusCode.INVALID_ARGUMENT),
        ("127.0.0.1:80", {"network": "é" * 3000}, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for address, kw, code in cases:
        try:
            p = await within(connectNetConn(lab.carrier.target, address,
                                            factory_of(KeepRecorder), **kw), PROMPT)
        except NetConnError as exc:
            assert exc.code == code, (address[:20], exc.code, exc.details[:200])
            assert len(exc.details) <= 512, len(exc.details)
            continue
        p.transport.abortConnection()
        raise AssertionError(f"{address[:20]}... connected")


@pytest_twisted.ensureDeferred
async def test_names_that_encode_to_ip_addresses_are_checked_as_addresses(lab, carrier):
    """``１２７.０.０.１`` (fullwidth digits) is not an IP literal, but its IDNA form is
    ``127.0.0.1``: it is checked (and dialled) as that address, never let through as a name
    only address rules could allow and then dialled directly."""
    echo = lab.listen(EchoTarget)
    carrier.servicer.allow = Allowlist([f"10.0.0.0/8:{echo}"])
    for name in ("１２７.０.０.１", "１２７.0.0.1"):
        exc = await dial_error(lab, f"{name}:{echo}")
        assert exc.code == grpc.StatusCode.PERMISSION_DENIED, (name, exc)
    carrier.servicer.allow = Allowlist([f"127.0.0.1:{echo}"])
    p = await lab.connect(f"１２７.０.０.１:{echo}", KeepRecorder)
    assert p.transport.getPeer().host == "127.0.0.1"
    await roundtrip(p)
    p.transport.loseConnection()
    assert (await p.wait_lost()).check(error.ConnectionDone)
    exc = await dial_error(lab, f"１２７.０.０.１:{echo}", network="tcp6")
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
