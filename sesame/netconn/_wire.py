"""
NetConn on the wire, shared by both ends: the method name, the ``bytes``
message codec, and the sizes every side uses (message cap, water marks).

No Twisted, no gRPC calls: the client (:mod:`._client`), the transport
(:mod:`._transport`) and the server relay (:mod:`._relay`) all import from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sesame._wire import only_field, varint, wrap_field

METHOD = "/sesame.v1alpha1.RemoteControl/NetConn"
# Coalescing cap for one bytes message (receivers take any size up to the call's
# message limit, 4 MiB by default).  1 MiB: grpcio spends ~0.2 ms of CPU per message
# sent whatever its size (docs/PERFORMANCE.md, "Data path, third pass"), so a relay wants
# few large messages.  Kept a little under 1 MiB so that, framed, one message fits one
# tunnel frame of the window extension (EXT_CHUNK) instead of spilling into a second.
MAX_MESSAGE = 1024 * 1024 - 64
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


def encode_joined(parts: list[bytes], n: int) -> Iterator[bytes]:
    """The ``n`` bytes of ``parts`` (in order) as ``bytes`` messages of at most
    :data:`MAX_MESSAGE`, each byte copied once: consecutive parts go together while they
    fit one message (no join of everything followed by slicing it)."""
    if n <= MAX_MESSAGE:
        if n:
            yield b"".join([b"\x12", varint(n), *parts])
        return
    group: list[bytes] = []
    size = 0
    for part in parts:
        if group and size + len(part) > MAX_MESSAGE:
            yield b"".join([b"\x12", varint(size), *group])
            group, size = [], 0
        if len(part) > MAX_MESSAGE:
            yield from encode_chunks(part)
        elif part:
            group.append(part)
            size += len(part)
    if group:
        yield b"".join([b"\x12", varint(size), *group])


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


class Coalescer:
    """
    Raw bytes bound for one NetConn call, sent as few ``bytes`` messages as keep the
    call busy.  Bytes that find the call's writer idle leave at once (a round trip never
    waits here); bytes that arrive while it is still writing wait and leave as one
    message when it is done, up to :data:`MAX_MESSAGE`.  Under load, messages grow to the
    cap by themselves; nothing is ever delayed behind an idle writer.

    :param send: sends one encoded message.
    :param after_write: ``after_write(cb)`` -> True if the writer is busy and will call
        ``cb`` once done, False if it is idle (``LoopCall.after_write``).
    """

    __slots__ = ("_send", "_after_write", "_parts", "_n", "_armed", "_flush_cb")

    def __init__(self, send: Callable[[bytes], None],
                 after_write: Callable[[Callable[[], None]], bool]) -> None:
        self._send = send
        self._after_write = after_write
        self._parts: list[bytes] = []
        self._n = 0
        self._armed = False
        self._flush_cb = self._flushed

    @property
    def pending(self) -> int:
        """Bytes waiting for the writer."""
        return self._n

    def push(self, data: bytes) -> None:
        if not data:
            return
        if self._armed:
            if self._n + len(data) > MAX_MESSAGE:
                self.flush()  # a full message; the writer still calls us back
            if len(data) >= MAX_MESSAGE:
                for msg in encode_chunks(data):
                    self._send(msg)
                return
            self._parts.append(data)
            self._n += len(data)
            return
        if len(data) < MAX_MESSAGE and self._after_write(self._flush_cb):
            self._armed = True
            self._parts.append(data)
            self._n = len(data)
            return
        for msg in encode_chunks(data):
            self._send(msg)

    def flush(self) -> None:
        """Send what waits now (before a half-close, or when the writer is done)."""
        n = self._n
        if not n:
            return
        parts = self._parts
        self._parts = []
        self._n = 0
        for msg in encode_joined(parts, n):
            self._send(msg)

    def _flushed(self) -> None:
        self._armed = False
        self.flush()
