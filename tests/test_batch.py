"""
Several tunnel frames in one outer message (the ``sesame-tunnel-batch`` extension).

The codec's batch container against protobuf, and a real :class:`sesame.tunnel.TunnelHost`
played by hand over a real grpc.aio channel: a peer that says ``sesame-tunnel-batch: 1``
gets batches and may send them; a peer that does not (Go sesame) never sees one; a batch
that does not parse ends its tunnel with INVALID_ARGUMENT and leaves the host's other
tunnels alone.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from sesame.bridge import get_bridge
from sesame.core import Role, SesameCodec, encode_batch
from sesame.core._codec import _read_varint, split_batch
from sesame.core._frames import CloseStream, HalfClose, Headers, Invalid, Message, NewStream
from sesame.tunnel import ServiceRegistry, TunnelHost

OPEN = f"/{SesameCodec.service}/OpenTunnel"
CHECK = "/grpc.health.v1.Health/Check"
EXT = (("sesame-tunnel-window", "65535"), ("sesame-tunnel-chunk", "16256"))
PROMPT = 10


def _check_frames(sid: int) -> list[bytes]:
    """new_stream, the request, half_close: a unary Health/Check as encoded frames."""
    enc = SesameCodec(Role.CLIENT)
    req = health_pb2.HealthCheckRequest().SerializeToString()
    return [enc.encode(f) for f in (NewStream(sid, CHECK, ()), Message(sid, len(req), req),
                                    HalfClose(sid))]


# --- the container --------------------------------------------------------------------------

frames = st.lists(st.one_of(
    st.builds(Message, st.integers(1, 2**40), st.integers(0, 2**31 - 1), st.binary(max_size=64)),
    st.builds(HalfClose, st.integers(1, 2**40)),
    st.builds(NewStream, st.integers(1, 2**40), st.just("/a.B/C"), st.just(())),
), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(frames)
def test_a_batch_decodes_to_its_frames_in_order(fs: list) -> None:
    enc, dec = SesameCodec(Role.CLIENT), SesameCodec(Role.SERVER)
    encoded = [enc.encode(f) for f in fs]
    batch = encode_batch(encoded)
    for data in (batch, memoryview(batch)):
        assert dec.decode_batch(data) == [dec.decode(e) for e in encoded]
    # a single frame is never taken for a batch
    for e in encoded:
        assert dec.decode_batch(e) is None
        assert split_batch(e) is None


def test_a_broken_batch_is_one_invalid_frame_that_says_why() -> None:
    dec = SesameCodec(Role.SERVER)
    good = SesameCodec(Role.CLIENT).encode(HalfClose(1))
    for bad, why in [
        (b"\xfa\x7f\x05abc", "past the end"),
        (b"\xfa\x7f\x00", "empty"),
        (encode_batch([good]) + b"\x08\x01", "not a batched frame"),
        (b"\xfa\x7f\xff\xff\xff", "truncated varint"),
    ]:
        out = dec.decode_batch(bad)
        assert out is not None and len(out) == 1 and isinstance(out[0], Invalid), bad
        assert why in out[0].reason, (bad, out[0].reason)


def _top_level_fields(msg: bytes) -> set[int]:
    """The field numbers at the top level of a protobuf message (varint and
    length-delimited fields, all a frame has)."""
    fields, i = set(), 0
    while i < len(msg):
        tag, i = _read_varint(msg, i)
        fields.add(tag >> 3)
        n, i = _read_varint(msg, i)
        if tag & 7 == 2:
            i += n
        else:
            assert tag & 7 == 0, tag
    return fields


# --- a host played by hand --------------------------------------------------------------------


def _with_host(body):  # type: ignore[no-untyped-def]
    services = ServiceRegistry()
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), services)
    host = TunnelHost(services)
    port = host.start("127.0.0.1:0")

    async def go():  # type: ignore[no-untyped-def]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await body(ch)

    try:
        return get_bridge().run(go(), 60)
    finally:
        host.stop(0.5)


async def _frames_until_close(call, dec: SesameCodec) -> tuple[list, list[int]]:  # type: ignore[no-untyped-def]
    """The frames the host sends until the stream's close_stream, and how many frames
    each outer message held."""
    got: list = []
    per_message: list[int] = []
    while not any(isinstance(f, CloseStream) for f in got):
        msg = await asyncio.wait_for(call.read(), PROMPT)
        assert msg is not grpc.aio.EOF
        batch = dec.decode_batch(msg)
        fs = batch if batch is not None else [dec.decode(msg)]
        per_message.append(len(fs))
        got.extend(fs)
    return got, per_message


def test_a_peer_that_says_batch_gets_batches_and_may_send_them() -> None:
    dec = SesameCodec(Role.CLIENT)

    async def body(ch):  # type: ignore[no-untyped-def]
        call = ch.stream_stream(OPEN)(metadata=(*EXT, ("sesame-tunnel-batch", "1")))
        headers = dict(await asyncio.wait_for(call.initial_metadata(), PROMPT))
        await call.write(encode_batch(_check_frames(1)))  # one outer message for the call
        got, per_message = await _frames_until_close(call, dec)
        call.cancel()
        return headers, got, per_message

    headers, got, per_message = _with_host(body)
    assert headers.get("sesame-tunnel-batch") == "1"
    assert [type(f) for f in got] == [Headers, Message, CloseStream]
    assert health_pb2.HealthCheckResponse.FromString(got[1].data).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert got[2].status.code == 0
    assert per_message[0] >= 2  # the header and the response went out together


def test_a_peer_that_does_not_say_batch_never_gets_one() -> None:
    dec = SesameCodec(Role.CLIENT)

    async def body(ch):  # type: ignore[no-untyped-def]
        call = ch.stream_stream(OPEN)(metadata=EXT)  # window and chunk only, as before
        for f in _check_frames(1):
            await call.write(f)
        raw: list[bytes] = []
        got: list = []
        while not any(isinstance(f, CloseStream) for f in got):
            msg = await asyncio.wait_for(call.read(), PROMPT)
            assert msg is not grpc.aio.EOF
            raw.append(msg)
            got.append(dec.decode(msg))
        call.cancel()
        return raw, got

    raw, got = _with_host(body)
    assert [type(f) for f in got] == [Headers, Message, CloseStream]
    for msg in raw:  # each message is exactly one frame, as protobuf reads it
        assert split_batch(msg) is None
        assert _top_level_fields(msg) <= {1, 2, 3, 4, 5, 6}, msg  # ServerToClient's own


def test_a_broken_batch_ends_its_tunnel_and_no_other() -> None:
    dec = SesameCodec(Role.CLIENT)

    async def body(ch):  # type: ignore[no-untyped-def]
        md = (*EXT, ("sesame-tunnel-batch", "1"))
        good = ch.stream_stream(OPEN)(metadata=md)
        await good.write(_check_frames(1)[0])  # a call open on another tunnel meanwhile
        bad = ch.stream_stream(OPEN)(metadata=md)
        await bad.write(b"\xfa\x7f\x40" + b"x" * 10)  # says 64 bytes, holds 10
        try:
            await bad.done_writing()
        except Exception:  # noqa: BLE001 - the call may be over already
            pass
        code = await asyncio.wait_for(bad.code(), PROMPT)
        details = await bad.details()
        for f in _check_frames(1)[1:]:
            await good.write(f)
        got, _ = await _frames_until_close(good, dec)
        good.cancel()
        return code, details, got

    code, details, got = _with_host(body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "batch" in details and "past the end" in details, details
    assert [type(f) for f in got] == [Headers, Message, CloseStream]
    assert got[2].status.code == 0


def test_the_batch_key_is_granted_only_where_the_reader_reads_batches() -> None:
    from sesame.core import GrpcTunnelCodec
    from sesame.tunnel import PeerExt, ext_forward, ext_metadata, ext_parse

    assert ("sesame-tunnel-batch", "1") in ext_metadata(SesameCodec)
    # a peer hub of an earlier release relays the frames: no batches for it
    assert all(k != "sesame-tunnel-batch" for k, _ in ext_metadata(SesameCodec, batch=False))
    assert ext_metadata(GrpcTunnelCodec) == ()
    # and the grpctunnel.v1 dialect never reads one (a 2047 field is an undecodable frame)
    assert GrpcTunnelCodec(Role.SERVER).decode_batch(
        encode_batch([SesameCodec(Role.CLIENT).encode(HalfClose(1))])) is None
    # a relay passes on exactly what the far end granted
    for peer in (PeerExt(65535, 16256, False), PeerExt(16 << 20, 1 << 20, True)):
        assert ext_parse(ext_forward(peer)) == peer
    assert ext_forward(None) == ()
