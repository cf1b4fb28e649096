"""
The hand-built ``message`` frames (sesame.core._codec.encode_message_frame /
decode_message_frame) against protobuf, the reference: the same bytes out, the same
frame in, and anything not in protobuf's canonical layout left to protobuf.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sesame.core import Message, Role, SesameCodec
from sesame.core._codec import decode_message_frame, encode_message_frame
from sesame.type import grpctunnel_pb2 as st_pb

SIDS = st.integers(min_value=1, max_value=(1 << 64) - 1)
SIZES = st.integers(min_value=0, max_value=(1 << 31) - 1)
DATA = st.binary(max_size=300) | st.sampled_from([b"", b"x" * 70_000])


def _pb(cls: type, sid: int, size: int, data: bytes) -> bytes:
    m = cls(stream_id=sid)
    m.message.size = size
    m.message.data = data
    return m.SerializeToString()


@settings(max_examples=300, deadline=None)
@given(SIDS, SIZES, DATA)
def test_same_bytes_as_protobuf_and_back(sid: int, size: int, data: bytes) -> None:
    for cls in (st_pb.ClientToServer, st_pb.ServerToClient):
        ref = _pb(cls, sid, size, data)
        assert encode_message_frame(sid, size, data) == ref
        assert decode_message_frame(ref) == (sid, size, data)
        # the reader hands the codec a view into the Stream message: same frame, bytes data
        got = decode_message_frame(memoryview(b"\x1a" + ref)[1:])
        assert got == (sid, size, data) and type(got[2]) is bytes
    client, server = SesameCodec(Role.CLIENT), SesameCodec(Role.SERVER)
    frame = Message(sid, size, data)
    assert server.decode(client.encode(frame)) == frame
    assert client.decode(server.encode(frame)) == frame
    assert server.decode(memoryview(client.encode(frame))) == frame


@settings(max_examples=300, deadline=None)
@given(SIDS, SIZES, DATA, st.integers(min_value=1, max_value=20))
def test_other_layouts_go_to_protobuf(sid: int, size: int, data: bytes, cut: int) -> None:
    ref = _pb(st_pb.ServerToClient, sid, size, data)
    # truncated, or with an unknown field after: not canonical, never misread
    assert decode_message_frame(ref[:-cut]) is None
    trailing = ref + b"\x78\x01"  # field 15, varint
    assert decode_message_frame(trailing) is None
    client = SesameCodec(Role.CLIENT)
    decoded = client.decode(trailing)  # protobuf skips the unknown field
    assert decoded == Message(sid, size, data)


def test_negative_values_are_left_to_protobuf() -> None:
    assert encode_message_frame(1, -1, b"x") is None
    neg = _pb(st_pb.ServerToClient, 3, -5, b"ab")  # int32 -5: a 10-byte varint
    assert decode_message_frame(neg) is None
    assert SesameCodec(Role.CLIENT).decode(neg) == Message(3, -5, b"ab")


@settings(max_examples=200, deadline=None)
@given(SIDS, SIZES, DATA)
def test_message_parts_in_one_envelope_match_the_wrapped_frame(sid: int, size: int,
                                                                data: bytes) -> None:
    """The writer's one-copy path (SesameCodec.encode_parts + StreamOuter.write_parts)
    sends exactly the Stream message the two-step path builds, and protobuf reads it."""
    import asyncio

    from sesame.bridge._connection import StreamOuter, wrap_tunnel
    from sesame.v1alpha1 import tunnel_pb2

    for role in (Role.CLIENT, Role.SERVER):
        codec = SesameCodec(role)
        frame = Message(sid, size, data)
        head, body = codec.encode_parts(frame)
        assert head + body == codec.encode(frame)
        sent: list[bytes] = []

        async def write(msg: bytes, sent: list[bytes] = sent) -> None:
            sent.append(msg)

        outer = StreamOuter(None, write, tunnel_pb2.StreamRequest, "test")
        asyncio.run(outer.write_parts(head, body))
        assert sent == [wrap_tunnel(codec.encode(frame))]
        reread = tunnel_pb2.StreamRequest.FromString(sent[0]).tunnel.SerializeToString()
        assert reread == codec.encode(frame)
    assert SesameCodec(Role.CLIENT).encode_parts(Message(-1, 0, b"x")) is None  # protobuf's
