"""
NetConn on the wire, shared by both ends: the method name, the ``bytes``
message codec, and the sizes every side uses (message cap, water marks).

No Twisted, no gRPC calls: the client (:mod:`._client`), the transport
(:mod:`._transport`) and the server relay (:mod:`._relay`) all import from here.
"""

from __future__ import annotations

from collections.abc import Iterator

from sesame._wire import only_field, wrap_field

METHOD = "/sesame.v1alpha1.RemoteControl/NetConn"
# Coalescing cap for one bytes message (receivers take any size). Kept a little
# under 256 KiB so that, framed, one message fits one 256 KiB tunnel frame of the
# window extension instead of spilling a few bytes into a second frame.
MAX_MESSAGE = 256 * 1024 - 64
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


def encode_bytes(data: bytes) -> bytes:
    """A ``bytes`` message (field 2 in both NetConnRequest and NetConnResponse)."""
    return wrap_field(0x12, data)


def encode_chunks(data: bytes) -> Iterator[bytes]:
    """``data`` as ``bytes`` messages of at most :data:`MAX_MESSAGE` each: one message,
    with no slice, in the usual case; none for empty data."""
    if len(data) <= MAX_MESSAGE:
        if data:
            yield encode_bytes(data)
        return
    view = memoryview(data)
    for i in range(0, len(data), MAX_MESSAGE):
        yield encode_bytes(bytes(view[i:i + MAX_MESSAGE]))


def decode_bytes(msg: bytes, cls: type, *, view: bool = False) -> bytes | memoryview | None:
    """The chunk of a ``bytes`` message, or None for any other message (EOF); ``view``: a
    memoryview into ``msg`` instead of a copy (for a consumer that takes one: an asyncio
    transport on the bridge loop)."""
    data = only_field(memoryview(msg) if view else msg, 0x12)
    if data is not None:
        return data
    pb = cls.FromString(msg)
    if pb.WhichOneof("data") == "bytes":
        return pb.bytes
    return None
