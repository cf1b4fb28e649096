"""
Codec-neutral tunnel frames, statuses and the errors of the tunnel core.

Both wire dialects (``sesame.type`` and ``grpctunnel.v1``) decode into these
plain objects and encode from them, so the state machine in
:mod:`sesame.core._machine` never sees protobuf.  Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Metadata as grpcio carries it: (key, value) pairs, ``bytes`` values for
# keys ending in ``-bin`` and ``str`` values otherwise.  Keys may repeat.
Metadata = tuple[tuple[str, Any], ...]

# Canonical gRPC status codes (numbers from the gRPC spec).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Status:
    """
    The final status of a tunnelled call: ``google.rpc.Status`` in spirit.

    ``details`` holds ``google.protobuf.Any`` messages untouched; the core
    never looks inside them.
    """

    code: int = OK
    message: str = ""
    details: tuple[Any, ...] = ()

    @property
    def ok(self) -> bool:
        return self.code == OK


STATUS_OK = Status()


# --- frames -----------------------------------------------------------------
# One class per frame kind.  ``stream_id`` is always the first field.


@dataclass(slots=True)
class NewStream:
    stream_id: int
    method: str
    headers: Metadata = ()
    # grpctunnel.v1 only: the client's receive window and chosen revision.
    initial_window: int | None = None
    revision: int | None = None


@dataclass(slots=True)
class Headers:
    stream_id: int
    headers: Metadata = ()


@dataclass(slots=True)
class Message:
    """First (or only) chunk of one message; ``size`` is the whole length."""

    stream_id: int
    size: int
    data: bytes = b""


@dataclass(slots=True)
class MessageData:
    """A continuation chunk of the message in progress."""

    stream_id: int
    data: bytes = b""


@dataclass(slots=True)
class HalfClose:
    stream_id: int


@dataclass(slots=True)
class Cancel:
    stream_id: int


@dataclass(slots=True)
class CloseStream:
    stream_id: int
    status: Status = STATUS_OK
    trailers: Metadata = ()


@dataclass(slots=True)
class WindowUpdate:
    stream_id: int
    increment: int


@dataclass(slots=True)
class Settings:
    """grpctunnel.v1 tunnel-wide settings (stream id -1)."""

    stream_id: int = -1
    revisions: Sequence[int] = field(default_factory=tuple)
    initial_window: int = 0


@dataclass(slots=True)
class Invalid:
    """A frame the codec could not make sense of (no oneof set, id 0...)."""

    stream_id: int
    reason: str


Frame = (
    NewStream | Headers | Message | MessageData | HalfClose | Cancel | CloseStream
    | WindowUpdate | Settings | Invalid
)


# --- errors -----------------------------------------------------------------


class TunnelError(Exception):
    """Base of everything the tunnel core raises; carries a gRPC code."""

    code: int = UNKNOWN

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def status(self) -> Status:
        return Status(self.code, str(self))


class ProtocolError(TunnelError):
    """The peer broke the protocol badly enough to end the whole tunnel."""

    code = INVALID_ARGUMENT


class LocalProtocolError(TunnelError):
    """This side misused the core (sending on a finished stream, ...)."""

    code = INTERNAL


class StreamClosedError(LocalProtocolError):
    """An operation named a stream that has already finished."""

    code = CANCELLED


class TunnelClosedError(LocalProtocolError):
    """The tunnel is closed or draining; no new streams."""

    code = UNAVAILABLE
