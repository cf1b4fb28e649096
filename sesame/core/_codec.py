"""
Wire codecs: protobuf tunnel frames <-> the codec-neutral frames of
:mod:`sesame.core._frames`.

``SesameCodec`` speaks ``sesame.type`` (joeycumines/sesame), ``GrpcTunnelCodec``
speaks ``grpctunnel.v1`` (jhump/grpctunnel).  A codec is built for one role:
the tunnel client encodes ``ClientToServer`` and decodes ``ServerToClient``,
the tunnel server the reverse.  Decoding never raises: anything malformed
becomes an :class:`~sesame.core._frames.Invalid` frame that the core turns into the
right protocol error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from sesame._wire import varint
from sesame.core._frames import (
    Cancel,
    CloseStream,
    Frame,
    HalfClose,
    Headers,
    Invalid,
    Message,
    MessageData,
    Metadata,
    NewStream,
    Settings,
    Status,
    WindowUpdate,
)
from sesame.core._machine import GRPCTUNNEL_FLOW, SESAME_FLOW, FlowPolicy, Role
from sesame.grpctunnel.v1 import tunnel_pb2 as gt_pb
from sesame.type import grpcmetadata_pb2 as md_pb
from sesame.type import grpctunnel_pb2 as st_pb

NEGOTIATE_KEY = "grpctunnel-negotiate"


def status_to_proto(status: Status) -> status_pb2.Status:
    pb = status_pb2.Status(code=status.code, message=status.message)
    if status.details:
        pb.details.extend(status.details)
    return pb


def status_from_proto(pb: status_pb2.Status) -> Status:
    return Status(pb.code, pb.message, tuple(pb.details))


STATUS_DETAILS_KEY = "grpc-status-details-bin"
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
#: The gRPC spec's ``Timeout``: 1-8 ASCII digits and a unit (``str.isdigit`` would also
#: take ``٢`` or ``２``, which ``int`` reads as numbers).
_TIMEOUT_VALUE = re.compile(r"[0-9]{1,8}[HMSmun]")


def parse_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` value (1-8 ASCII digits and a unit ``H M S m u
    n``), or None when malformed."""
    if not isinstance(value, str) or not _TIMEOUT_VALUE.fullmatch(value):
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def handler_status(code: int, details: str | None, trailers: Metadata) -> tuple[Status, Metadata]:
    """
    What a servicer left behind → (status, trailers) for ``close_stream``.

    Rich details that grpc's helpers put in the ``grpc-status-details-bin``
    trailer travel in ``close_stream.status.details`` instead, as upstream does.
    """
    status = Status(code, details or "")
    out = []
    for k, v in trailers:
        if k == STATUS_DETAILS_KEY:
            try:
                pb = status_pb2.Status.FromString(v)
                status = Status(code, details or pb.message, status_from_proto(pb).details)
                continue
            except Exception:  # noqa: BLE001 - an unparsable trailer is passed on as is
                pass
        out.append((k, v))
    return status, tuple(out)


def _group(md: Metadata) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for k, v in md:
        grouped.setdefault(k, []).append(v)
    return grouped


def _bin(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _text(v: Any) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


class Codec:
    """Common shape of both codecs."""

    name: str
    policy: FlowPolicy
    strict_ids: bool
    first_stream_id: int

    def __init__(self, role: Role) -> None:
        self.role = role

    def encode(self, frame: Frame) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, data: bytes) -> Frame:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_batch(self, data: Any) -> list[Frame] | None:
        """The frames of a batched outer message, or None: ``data`` is one frame."""
        return None


# --- several frames in one outer message (a sesame-Python extension) -----------------------
#
# Between two sesame-Python peers that said so in their outer call's metadata
# (``sesame-tunnel-batch: 1``, sesame.tunnel), one outer message may carry several frames,
# each as one occurrence of field 2047 (length-delimited), which no frame message defines:
# a frame always starts with one of its own fields, so the two never look alike.  A unary
# call is then one outer message each way plus a header, not three each way; grpcio's cost
# is per message.  Go peers never say so and never get one.

BATCH_TAG = b"\xfa\x7f"  # field 2047, wire type 2
#: frames at least this large go in an outer message of their own (no extra copy)
BATCH_FRAME_MAX = 16 * 1024
#: a batch is sent once it holds this much
BATCH_BYTES = 64 * 1024


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded frames as one outer message."""
    parts: list[bytes] = []
    for f in frames:
        parts += (BATCH_TAG, varint(len(f)), f)
    return b"".join(parts)


def split_batch(data: Any) -> list[Any] | None:
    """The encoded frames of a batch (views when ``data`` is a memoryview), None when
    ``data`` is not a batch; ValueError for one that does not parse."""
    if data[:2] != BATCH_TAG:
        return None
    out = []
    i, end = 0, len(data)
    while i < end:
        if data[i:i + 2] != BATCH_TAG:
            raise ValueError(f"byte {i} is not a batched frame (field 2047)")
        n, i = _read_varint(data, i + 2)
        if not n or i + n > end:
            raise ValueError(f"a batched frame of {n} bytes at byte {i}: empty or past the end")
        out.append(data[i:i + n])
        i += n
    return out


# --- the data frames by hand --------------------------------------------------------------
#
# Nearly every byte a tunnel carries travels in a ``message`` frame (field 4: an
# EncodedMessage {size = 1, data = 2}) after ``stream_id`` (field 1), in both directions.
# Through protobuf that is two copies of the payload each way (into the message, out of
# it); built and read by hand, one.  Only the canonical layout protobuf itself writes is
# read here (fields in number order, each once, nothing else); anything else goes to
# protobuf, which stays the reference (tests/test_core.py compares the two).


def message_frame_head(stream_id: int, size: int, n: int) -> bytes | None:
    """The bytes of ``{stream_id, message: {size, data}}`` that come before ``data`` (``n``
    bytes long), as protobuf would write them; None for values protobuf encodes otherwise
    (negative ones)."""
    if stream_id < 0 or size < 0:
        return None
    inner = (b"\x08" + varint(size) if size else b"") + (b"\x12" + varint(n) if n else b"")
    return (b"\x08" + varint(stream_id) if stream_id else b"") + b"\x22" + varint(
        len(inner) + n) + inner


def encode_message_frame(stream_id: int, size: int, data: bytes) -> bytes | None:
    """``{stream_id, message: {size, data}}`` as protobuf would write it, with one copy of
    ``data``; None for values protobuf encodes otherwise (negative ones)."""
    head = message_frame_head(stream_id, size, len(data))
    if head is None:
        return None
    return head + data if data else head


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, next index); ValueError past the end or over 10 bytes."""
    n = shift = 0
    for j in range(i, min(i + 10, len(buf))):
        b = buf[j]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, j + 1
        shift += 7
    raise ValueError("truncated varint")


def decode_message_frame(buf: bytes | memoryview) -> tuple[int, int, bytes] | None:
    """``(stream_id, size, data)`` of a canonical ``message`` frame, else None (the caller
    asks protobuf); ``buf`` may be a memoryview (``data`` is bytes either way)."""
    try:
        i = 0
        sid = 0
        if buf[:1] == b"\x08":
            sid, i = _read_varint(buf, 1)
        if buf[i:i + 1] != b"\x22":
            return None
        n, i = _read_varint(buf, i + 1)
        if i + n != len(buf):
            return None
        size = 0
        if buf[i:i + 1] == b"\x08":
            size, i = _read_varint(buf, i + 1)
            if size >= 1 << 31:  # int32 on the wire: negative values are 10 bytes
                return None
        data = b""
        if i < len(buf):
            if buf[i] != 0x12:
                return None
            m, i = _read_varint(buf, i + 1)
            if i + m != len(buf):
                return None
            data = bytes(buf[i:])  # one copy whether buf is bytes or a memoryview
        if sid >= 1 << 64:
            return None
        return sid, size, data
    except ValueError:
        return None


class SesameCodec(Codec):
    name = "sesame.type"
    policy = SESAME_FLOW
    strict_ids = False
    first_stream_id = 1
    service = "sesame.type.TunnelService"

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        if role is Role.CLIENT:
            self._out_type, self._in_type = st_pb.ClientToServer, st_pb.ServerToClient
            self._decode_one: Callable[[Any], Frame] = self._decode_s2c
        else:
            self._out_type, self._in_type = st_pb.ServerToClient, st_pb.ClientToServer
            self._decode_one = self._decode_c2s

    # metadata (PROTOCOL.md 1.3.1)
    @staticmethod
    def md_to_proto(md: Metadata, pb: md_pb.GrpcMetadata) -> None:
        data = pb.data
        for k, values in _group(md).items():
            entry = data[k]
            if k.endswith("-bin"):
                entry.bin.values.extend(_bin(v) for v in values)
            else:
                entry.str.values.extend(_text(v) for v in values)

    @staticmethod
    def md_from_proto(pb: md_pb.GrpcMetadata) -> Metadata:
        out: list[tuple[str, Any]] = []
        for k, value in pb.data.items():
            which = value.WhichOneof("data")
            if which == "bin":
                out.extend((k, v) for v in value.bin.values)
            elif which == "str":
                out.extend((k, v) for v in value.str.values)
        return tuple(out)

    def encode_parts(self, frame: Frame) -> tuple[bytes, bytes] | None:
        """A ``message`` frame as (head, data): :meth:`encode` is their concatenation, for
        a writer that puts its own envelope around them in the same copy; None for every
        other frame."""
        if type(frame) is not Message:
            return None
        head = message_frame_head(frame.stream_id, frame.size, len(frame.data))
        return None if head is None else (head, frame.data)

    def encode(self, frame: Frame) -> bytes:
        t = type(frame)
        if t is Message:
            fast = encode_message_frame(frame.stream_id, frame.size, frame.data)
            if fast is not None:
                return fast
        pb = self._out_type(stream_id=frame.stream_id)
        if t is MessageData:
            pb.message_data = frame.data
        elif t is Message:
            pb.message.size = frame.size
            pb.message.data = frame.data
        elif t is WindowUpdate:
            pb.window_update = frame.increment
        elif t is NewStream:
            pb.new_stream.method = frame.method
            self.md_to_proto(frame.headers, pb.new_stream.header)
        elif t is Headers:
            pb.header.SetInParent()
            self.md_to_proto(frame.headers, pb.header)
        elif t is HalfClose:
            pb.half_close.SetInParent()
        elif t is Cancel:
            pb.cancel.SetInParent()
        elif t is CloseStream:
            cs = pb.close_stream
            cs.status.CopyFrom(status_to_proto(frame.status))
            if frame.trailers:
                self.md_to_proto(frame.trailers, cs.trailer)
        else:
            raise TypeError(f"{self.name} cannot encode {t.__name__}")
        return pb.SerializeToString()

    def decode(self, data: bytes) -> Frame:
        fast = decode_message_frame(data) if data[:1] == b"\x08" else None
        if fast is not None and fast[0]:
            return Message(*fast)
        try:
            pb = self._in_type.FromString(data)
        except DecodeError as exc:
            return Invalid(0, f"undecodable frame: {exc}")
        if pb.stream_id == 0:
            return Invalid(0, "stream id 0")
        return self._decode_one(pb)

    def decode_batch(self, data: Any) -> list[Frame] | None:
        try:
            frames = split_batch(data)
        except ValueError as exc:
            return [Invalid(0, f"undecodable batch of frames: {exc}")]
        if frames is None:
            return None
        return [self.decode(f) for f in frames]

    def _decode_c2s(self, pb: Any) -> Frame:
        sid = pb.stream_id
        which = pb.WhichOneof("frame")
        if which == "message_data":
            return MessageData(sid, pb.message_data)
        if which == "message":
            return Message(sid, pb.message.size, pb.message.data)
        if which == "window_update":
            return WindowUpdate(sid, pb.window_update)
        if which == "new_stream":
            ns = pb.new_stream
            return NewStream(sid, ns.method, self.md_from_proto(ns.header))
        if which == "half_close":
            return HalfClose(sid)
        if which == "cancel":
            return Cancel(sid)
        return Invalid(sid, "no frame set")

    def _decode_s2c(self, pb: Any) -> Frame:
        sid = pb.stream_id
        which = pb.WhichOneof("frame")
        if which == "message_data":
            return MessageData(sid, pb.message_data)
        if which == "message":
            return Message(sid, pb.message.size, pb.message.data)
        if which == "window_update":
            return WindowUpdate(sid, pb.window_update)
        if which == "header":
            return Headers(sid, self.md_from_proto(pb.header))
        if which == "close_stream":
            cs = pb.close_stream
            return CloseStream(
                sid,
                status_from_proto(cs.status),
                self.md_from_proto(cs.trailer) if cs.HasField("trailer") else (),
            )
        return Invalid(sid, "no frame set")


class GrpcTunnelCodec(Codec):
    """
    ``grpctunnel.v1``.  ``-bin`` metadata values travel as text whose
    characters are the bytes U+0000-U+00FF (Latin-1), as grpctunnel-py does;
    the proto field is a ``string``, so raw non-UTF-8 bytes cannot be sent.
    """

    name = "grpctunnel.v1"
    policy = GRPCTUNNEL_FLOW
    strict_ids = True
    first_stream_id = 1
    service = "grpctunnel.v1.TunnelService"

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        if role is Role.CLIENT:
            self._out_type, self._in_type = gt_pb.ClientToServer, gt_pb.ServerToClient
            self._decode_one: Callable[[Any], Frame] = self._decode_s2c
        else:
            self._out_type, self._in_type = gt_pb.ServerToClient, gt_pb.ClientToServer
            self._decode_one = self._decode_c2s

    @staticmethod
    def md_to_proto(md: Metadata, pb: gt_pb.Metadata) -> None:
        for k, values in _group(md).items():
            entry = pb.md[k]
            entry.val.extend(_text(v) for v in values)

    @staticmethod
    def md_from_proto(pb: gt_pb.Metadata) -> Metadata:
        out: list[tuple[str, Any]] = []
        for k, value in pb.md.items():
            if k.endswith("-bin"):
                out.extend((k, v.encode("latin-1", "replace")) for v in value.val)
            else:
                out.extend((k, v) for v in value.val)
        return tuple(out)

    def encode(self, frame: Frame) -> bytes:
        pb = self._out_type(stream_id=frame.stream_id)
        t = type(frame)
        client = self.role is Role.CLIENT
        if t is MessageData:
            if client:
                pb.more_request_data = frame.data
            else:
                pb.more_response_data = frame.data
        elif t is Message:
            m = pb.request_message if client else pb.response_message
            m.size = frame.size
            m.data = frame.data
        elif t is WindowUpdate:
            pb.window_update = frame.increment
        elif t is NewStream:
            ns = pb.new_stream
            ns.method_name = frame.method
            self.md_to_proto(frame.headers, ns.request_headers)
            ns.initial_window_size = frame.initial_window or 0
            ns.protocol_revision = frame.revision or 0
        elif t is Headers:
            pb.response_headers.SetInParent()
            self.md_to_proto(frame.headers, pb.response_headers)
        elif t is HalfClose:
            pb.half_close.SetInParent()
        elif t is Cancel:
            pb.cancel.SetInParent()
        elif t is CloseStream:
            cs = pb.close_stream
            cs.status.CopyFrom(status_to_proto(frame.status))
            if frame.trailers:
                self.md_to_proto(frame.trailers, cs.response_trailers)
        elif t is Settings:
            pb.settings.supported_protocol_revisions.extend(frame.revisions)
            pb.settings.initial_window_size = frame.initial_window
        else:
            raise TypeError(f"{self.name} cannot encode {t.__name__}")
        return pb.SerializeToString()

    def decode(self, data: bytes) -> Frame:
        try:
            pb = self._in_type.FromString(data)
        except DecodeError as exc:
            return Invalid(0, f"undecodable frame: {exc}")
        return self._decode_one(pb)

    def _decode_c2s(self, pb: Any) -> Frame:
        sid = pb.stream_id
        which = pb.WhichOneof("frame")
        if which == "more_request_data":
            return MessageData(sid, pb.more_request_data)
        if which == "request_message":
            return Message(sid, pb.request_message.size, pb.request_message.data)
        if which == "window_update":
            return WindowUpdate(sid, pb.window_update)
        if which == "new_stream":
            ns = pb.new_stream
            return NewStream(
                sid,
                ns.method_name,
                self.md_from_proto(ns.request_headers),
                ns.initial_window_size,
                ns.protocol_revision,
            )
        if which == "half_close":
            return HalfClose(sid)
        if which == "cancel":
            return Cancel(sid)
        return Invalid(sid, "no frame set")

    def _decode_s2c(self, pb: Any) -> Frame:
        sid = pb.stream_id
        which = pb.WhichOneof("frame")
        if which == "more_response_data":
            return MessageData(sid, pb.more_response_data)
        if which == "response_message":
            return Message(sid, pb.response_message.size, pb.response_message.data)
        if which == "window_update":
            return WindowUpdate(sid, pb.window_update)
        if which == "response_headers":
            return Headers(sid, self.md_from_proto(pb.response_headers))
        if which == "close_stream":
            cs = pb.close_stream
            return CloseStream(
                sid,
                status_from_proto(cs.status),
                self.md_from_proto(cs.response_trailers) if cs.HasField("response_trailers") else (),
            )
        if which == "settings":
            st = pb.settings
            return Settings(sid, tuple(st.supported_protocol_revisions), st.initial_window_size)
        return Invalid(sid, "no frame set")


CODECS: dict[str, type[Codec]] = {"sesame": SesameCodec, "grpctunnel": GrpcTunnelCodec}
