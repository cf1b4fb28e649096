"""
The tunnel state machine: gRPC calls multiplexed over one message stream.

Sans-IO in the manner of h2's ``H2Connection``: codec-neutral frames
(:mod:`sesame.core._frames`) go in through :meth:`TunnelCore.receive_frame`, API
calls change state, and two queues come out: frames to write
(:meth:`TunnelCore.data_to_send`) and events for the adapter
(:meth:`TunnelCore.take_events`).  There are no threads, sockets, clocks,
reactors or grpcio here, so every rule below is testable by plain calls.

One core serves either role of PROTOCOL.md: the *tunnel client* starts
streams (``open_stream``), the *tunnel server* answers them.  Both wire
dialects share it; they differ only in a :class:`FlowPolicy` and a few id
rules (``strict_ids``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from sesame.core._frames import (
    CANCELLED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    STATUS_OK,
    UNAVAILABLE,
    UNKNOWN,
    Cancel,
    CloseStream,
    Frame,
    HalfClose,
    Headers,
    Invalid,
    LocalProtocolError,
    Message,
    MessageData,
    Metadata,
    NewStream,
    Settings,
    Status,
    StreamClosedError,
    TunnelClosedError,
    WindowUpdate,
)

MAX_UINT32 = 2**32 - 1
MAX_STREAM_ID = 2**64 - 1  # sesame.type: uint64 ids
MAX_STRICT_STREAM_ID = 2**63 - 1  # grpctunnel.v1: int64 ids
# Ids a sesame.type server has seen out of order are kept in a set until the
# gap below them fills.  Past this many, the lower half of the set is folded
# into the floor: the holes below it count as used (a late first use of one is
# refused as a re-use), which bounds memory for peers that skip ids.
MAX_ID_GAPS = 4096
DEFAULT_MAX_RECEIVE_MESSAGE = 4 * 1024 * 1024
MAX_SEND_MESSAGE = 2**31 - 1  # EncodedMessage.size is an int32


class Role(enum.Enum):
    CLIENT = "client"  # starts streams, sends requests
    SERVER = "server"  # runs handlers, sends responses


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """
    Per-stream flow control, one direction's rules for both directions.

    ``sesame.type`` counts frames (each costs at least ``min_cost``) and lets
    a sender go while its credit is positive; ``grpctunnel.v1`` revision 1
    counts bytes exactly and never lets a chunk exceed the credit.
    """

    name: str
    enabled: bool = True
    send_window: int = 65535  # credit we start with, per stream
    recv_window: int = 65535  # credit the peer starts with, per stream
    update_threshold: int = 26214  # return credit once this much was consumed
    min_cost: int = 258
    max_chunk: int = 16256
    byte_exact: bool = False  # chunks never exceed the remaining credit
    # Until a stream's sender shows it holds more credit than the protocol's
    # fixed 65,535 (+ one 16,256 chunk), return credit at the protocol's
    # threshold: a peer that never learned our larger window would wait
    # for an update we were batching (see the window extension in
    # sesame.tunnel._service).
    compat_threshold: int = 26214
    compat_outstanding: int = 65535 + 16256

    def cost(self, n: int) -> int:
        return n if n > self.min_cost else self.min_cost


SESAME_FLOW = FlowPolicy("sesame.type")
GRPCTUNNEL_FLOW = FlowPolicy(
    "grpctunnel.v1/1", send_window=65536, recv_window=65536, update_threshold=1,
    min_cost=0, max_chunk=16384, byte_exact=True,
)
GRPCTUNNEL_REV0 = FlowPolicy("grpctunnel.v1/0", enabled=False, min_cost=0, max_chunk=16384)


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """Server: the peer opened a stream; accept by doing nothing, or refuse."""

    stream_id: int
    method: str
    headers: Metadata


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """Client: the response headers arrived (once per stream at most)."""

    stream_id: int
    headers: Metadata


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """
    A whole message; hand ``cost`` back through :meth:`TunnelCore.consumed`
    once the application has taken it (one call per message with a non-zero
    cost; until then the stream's reassembly credit is held back).
    """

    stream_id: int
    data: bytes
    cost: int


@dataclass(frozen=True, slots=True)
class RequestsEnded:
    """Server: the client half-closed; no more requests will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """
    The stream is over: emitted exactly once for every stream ever opened.

    ``local`` says this side ended it (handler returned, cancel, local
    protocol error); otherwise the peer did (``close_stream``, ``cancel``) or
    the tunnel went away.
    """

    stream_id: int
    status: Status
    trailers: Metadata = ()
    local: bool = False


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """The stream's queued outgoing bytes fell below the low-water mark."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    revisions: tuple[int, ...]
    initial_window: int


@dataclass(frozen=True, slots=True)
class TunnelTerminated:
    """The tunnel is dead; every live stream has already ended."""

    status: Status
    by_peer: bool


@dataclass(frozen=True, slots=True)
class Drained:
    """Draining finished: no live streams remain."""


Event = (
    StreamRequested | HeadersReceived | MessageReceived | RequestsEnded | StreamEnded
    | StreamWritable | SettingsReceived | TunnelTerminated | Drained
)


# --- per-stream state ---------------------------------------------------------


class _OutMessage:
    __slots__ = ("view", "offset", "started")

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.offset = 0
        self.started = False


@dataclass(slots=True)
class _Stream:
    stream_id: int
    policy: FlowPolicy
    # sending
    credit: int = 0
    queue: deque = field(default_factory=deque)  # Frame | _OutMessage
    queued_bytes: int = 0
    blocked: bool = False  # queued bytes above low water since last Writable
    headers_sent: bool = False
    local_closed: bool = False  # client: half-closed; server: close queued
    # receiving
    granted: int = 0  # credit ever given to the peer (initial + updates)
    big_sender: bool = False  # the peer proved a window beyond the default
    taken: int = 0  # flow cost received
    pending_credit: int = 0
    unconsumed: int = 0  # MessageReceived events the app has not consumed yet
    deferred: int = 0  # cost of reassembly frames held back while it lags
    remote_closed: bool = False  # server: half_close seen
    headers_received: bool = False
    asm: bytearray | None = None
    asm_size: int = 0
    ended: bool = False


def _split_method(method: str) -> tuple[str, str] | None:
    """PROTOCOL.md 2.6 step 3: strip one ``/``, split at the next one.

    Only an empty name or one without a ``/`` is malformed; odd halves such as
    ``"svc/"`` are left to the method lookup (UNIMPLEMENTED), as in Go.
    """
    name = method[1:] if method.startswith("/") else method
    service, sep, meth = name.partition("/")
    if not sep:
        return None
    return service, meth


class TunnelCore:
    """
    One tunnel, one role.  See the module docstring.

    :param role: which end of the tunnel this is.
    :param policy: flow control for new streams.
    :param strict_ids: grpctunnel.v1 rule: stream ids strictly increase and a
        lower or equal id is fatal; otherwise sesame.type's tolerance of
        out-of-order creation applies.
    :param max_receive_message: refuse larger messages (RESOURCE_EXHAUSTED).
    :param send_low_water: emit :class:`StreamWritable` once a stream that
        had more than this queued drains to it.
    """

    def __init__(
        self,
        role: Role,
        policy: FlowPolicy = SESAME_FLOW,
        *,
        strict_ids: bool = False,
        first_stream_id: int = 1,
        max_receive_message: int = DEFAULT_MAX_RECEIVE_MESSAGE,
        max_send_message: int = MAX_SEND_MESSAGE,
        send_low_water: int = 65536,
        expect_settings: bool = False,
        max_stream_id: int | None = None,
    ) -> None:
        self.role = role
        self.policy = policy
        self.strict_ids = strict_ids
        self.max_receive_message = max_receive_message
        self.max_send_message = max_send_message
        self.send_low_water = send_low_water
        self._streams: dict[int, _Stream] = {}
        self._out: list[Frame] = []
        self._events: list[Event] = []
        self._blocked: set[int] = set()  # streams waiting for credit
        if max_stream_id is None:
            max_stream_id = MAX_STRICT_STREAM_ID if strict_ids else MAX_STREAM_ID
        self.max_stream_id = max_stream_id
        self._next_id = first_stream_id
        self._last_allocated = first_stream_id - 1
        self._any_allocated = False
        # server-side id bookkeeping: all ids <= _used_floor were used, plus
        # the set _used_above; the set stays tiny because ids are mostly dense.
        # grpctunnel.v1 servers start at -1 (Go's lastSeen), so id 0 is valid.
        floor = -1 if strict_ids else first_stream_id - 1
        self._last_seen = floor
        self._used_floor = floor
        self._used_above: set[int] = set()
        self._drained_sent = False
        self._expect_settings = expect_settings
        self.draining = False
        self.terminated: Status | None = None
        self.peer_settings: SettingsReceived | None = None

    # --- queries --------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self._streams.values() if not s.ended)

    def stream_ids(self) -> list[int]:
        return [sid for sid, s in self._streams.items() if not s.ended]

    def is_live(self, stream_id: int) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and not s.ended

    def queued_bytes(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.queued_bytes if s is not None else 0

    def send_credit(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.credit if s is not None else 0

    def receive_window(self, stream_id: int) -> int:
        """Credit the peer still has for sending to us on this stream."""
        s = self._streams.get(stream_id)
        return s.granted - s.taken if s is not None else 0

    # --- output ---------------------------------------------------------------

    def data_to_send(self) -> list[Frame]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    # --- local API: client role -----------------------------------------------

    def open_stream(self, method: str, headers: Metadata = ()) -> int:
        """Start a call; returns its stream id.  Raises when not allowed."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the tunnel client opens streams")
        self._check_open()
        if self.draining:
            raise TunnelClosedError("tunnel is draining")
        if self._next_id > self.max_stream_id:
            raise TunnelClosedError("all stream IDs exhausted")
        sid = self._next_id
        self._next_id += 1
        self._last_allocated = sid
        self._any_allocated = True
        s = self._new_stream(sid, self.policy)
        frame = NewStream(sid, method, tuple(headers))
        if self.policy.name.startswith("grpctunnel"):
            frame.initial_window = self.policy.recv_window
            frame.revision = 1 if self.policy.enabled else 0
        self._out.append(frame)
        s.headers_sent = True
        return sid

    def half_close(self, stream_id: int) -> None:
        s = self._live(stream_id)
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the tunnel client half-closes")
        if s.local_closed:
            return
        s.local_closed = True
        self._enqueue(s, HalfClose(stream_id))

    def cancel(self, stream_id: int, status: Status | None = None) -> None:
        """
        Abort a stream from this side.

        Client: send ``cancel`` and end with ``status`` (CANCELLED by
        default).  Server: end the stream with ``status`` at once, dropping
        queued output (the handler was cancelled or its deadline passed).
        Unknown or finished streams are ignored: cancel races are normal.
        """
        s = self._streams.get(stream_id)
        if s is None or s.ended:
            return
        status = status or Status(CANCELLED, "cancelled")
        self._drop_queue(s)
        if self.role is Role.CLIENT:
            self._out.append(Cancel(stream_id))
        else:
            self._send_close_now(s, status)
        self._end(s, status, (), local=True)

    # --- local API: server role -----------------------------------------------

    def send_headers(self, stream_id: int, headers: Metadata = ()) -> None:
        s = self._live(stream_id)
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the tunnel server sends response headers")
        if s.headers_sent:
            raise LocalProtocolError("headers already sent")
        if s.local_closed:
            raise StreamClosedError("stream already closed")
        s.headers_sent = True
        self._enqueue(s, Headers(stream_id, tuple(headers)))

    def close_stream(
        self, stream_id: int, status: Status = STATUS_OK, trailers: Metadata = ()
    ) -> None:
        """Server: finish a stream after everything queued on it."""
        s = self._live(stream_id)
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the tunnel server closes streams")
        if not s.headers_sent:
            s.headers_sent = True
            self._enqueue(s, Headers(stream_id, ()))
        s.local_closed = True
        # End first (event + no more sends), then let the queue carry the
        # close frame out behind any data still waiting for credit.
        self._end(s, status, tuple(trailers), local=True, keep=True)
        self._enqueue(s, CloseStream(stream_id, status, tuple(trailers)))

    def refuse_stream(self, stream_id: int, status: Status) -> None:
        """Server: turn a just-requested stream away: status only, no header."""
        s = self._live(stream_id)
        if s.headers_sent or s.queue:
            raise LocalProtocolError("stream already answered")
        s.headers_sent = True
        s.local_closed = True
        self._out.append(CloseStream(stream_id, status))
        self._end(s, status, (), local=True)

    # --- local API: both roles ------------------------------------------------

    def send_message(self, stream_id: int, data: bytes) -> None:
        """Queue one whole serialized message; it leaves as credit allows."""
        s = self._live(stream_id)
        if s.local_closed:
            raise StreamClosedError("stream closed for sending")
        if len(data) > self.max_send_message:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds the limit of {self.max_send_message}",
                RESOURCE_EXHAUSTED,
            )
        if self.role is Role.SERVER and not s.headers_sent:
            s.headers_sent = True
            self._enqueue(s, Headers(stream_id, ()))
        self._enqueue(s, _OutMessage(data))

    def consumed(self, stream_id: int, cost: int) -> None:
        """
        The application took one :class:`MessageReceived` (its ``cost``):
        credit it back, plus any reassembly credit held back meanwhile.
        """
        s = self._streams.get(stream_id)
        if s is None or s.ended or not s.policy.enabled:
            return
        if cost > 0 and s.unconsumed > 0:  # zero-cost messages were never counted
            s.unconsumed -= 1
        if s.unconsumed == 0 and s.deferred:
            cost += s.deferred
            s.deferred = 0
        self._return_credit(s, cost)

    def _return_credit(self, s: _Stream, cost: int) -> None:
        if cost <= 0:
            return
        stream_id = s.stream_id
        s.pending_credit += cost
        pol = s.policy
        threshold = pol.update_threshold
        if not s.big_sender and threshold > pol.compat_threshold:
            threshold = pol.compat_threshold
        if s.pending_credit >= threshold:
            if self.role is Role.SERVER and s.remote_closed and s.policy.byte_exact:
                s.pending_credit = 0
                return
            n = s.pending_credit
            s.pending_credit = 0
            s.granted += n
            while n > 0:
                piece = min(n, MAX_UINT32)
                self._out.append(WindowUpdate(stream_id, piece))
                n -= piece

    def start_drain(self) -> None:
        """Refuse new streams; let existing ones finish (then :class:`Drained`)."""
        if self.draining:
            return
        self.draining = True
        self._check_drained()

    def terminate(self, status: Status, *, by_peer: bool = False) -> None:
        """The tunnel is over (outer call ended or failed): end every stream."""
        if self.terminated is not None:
            return
        self.terminated = status
        self._blocked.clear()
        for s in list(self._streams.values()):
            if not s.ended:
                s.queue.clear()
                self._end(s, status, (), local=False)
        self._streams.clear()
        self._events.append(TunnelTerminated(status, by_peer))

    # --- input ----------------------------------------------------------------

    def receive_frame(self, frame: Frame) -> list[Event]:
        """Feed one decoded frame from the peer; returns the events it caused."""
        if self.terminated is not None:
            return self.take_events()
        try:
            self._receive(frame)
        except _Fatal as exc:
            self.terminate(exc.status, by_peer=False)
        return self.take_events()

    def receive_frames(self, frames: Iterable[Frame]) -> list[Event]:
        for f in frames:
            if self.terminated is not None:
                break
            try:
                self._receive(f)
            except _Fatal as exc:
                self.terminate(exc.status, by_peer=False)
        return self.take_events()

    # --- internals: receive ---------------------------------------------------

    def _receive(self, frame: Frame) -> None:
        if self._expect_settings:
            self._expect_settings = False
            if not isinstance(frame, Settings) or frame.stream_id != -1:
                raise _Fatal(INTERNAL, "protocol error: first frame must be settings")
            self.peer_settings = SettingsReceived(tuple(frame.revisions), frame.initial_window)
            self._events.append(self.peer_settings)
            return
        if isinstance(frame, Invalid):
            raise _Fatal(INVALID_ARGUMENT, f"invalid frame: {frame.reason}")
        sid = frame.stream_id
        if isinstance(frame, Settings):
            s = self._streams.get(sid)
            if s is not None and not s.ended:
                self._protocol_fault(s, INTERNAL, "settings frame sent to a stream")
                return
            if sid > 0 and self._late_frame(sid):
                return
            raise _Fatal(INTERNAL, "unexpected settings frame")
        if sid <= 0 and not (self.strict_ids and sid == 0):
            raise _Fatal(INVALID_ARGUMENT, f"invalid frame: stream id {sid}")
        if self.role is Role.SERVER:
            self._receive_as_server(frame)
        else:
            self._receive_as_client(frame)

    def _receive_as_server(self, frame: Frame) -> None:
        sid = frame.stream_id
        if isinstance(frame, NewStream):
            self._accept_new_stream(frame)
            return
        s = self._streams.get(sid)
        if s is None:
            if self._late_frame(sid):
                return  # late frame of a finished or refused stream
            raise _Fatal(UNKNOWN, f"received frame for stream ID {sid}: stream never created")
        if isinstance(frame, WindowUpdate):
            self._credit(s, frame.increment)
            return
        if s.ended:
            # Our close is still queued behind data; a cancel means the
            # client stopped listening, so nothing more will be credited.
            if isinstance(frame, Cancel):
                self._drop_queue(s)
                self._forget(s)
            return
        if isinstance(frame, (Message, MessageData)):
            if s.remote_closed:
                return
            self._data(s, frame)
        elif isinstance(frame, HalfClose):
            if not s.remote_closed:
                if s.asm is not None:
                    self._protocol_fault(
                        s, INVALID_ARGUMENT, "half-close in the middle of a request message"
                    )
                    return
                s.remote_closed = True
                self._events.append(RequestsEnded(sid))
        elif isinstance(frame, Cancel):
            status = Status(CANCELLED, "cancelled by client")
            self._drop_queue(s)
            self._send_close_now(s, status)
            self._end(s, status, (), local=False)
        else:
            self._protocol_fault(
                s, INVALID_ARGUMENT, f"unexpected {type(frame).__name__} frame from client"
            )

    def _late_frame(self, sid: int) -> bool:
        """A frame for no live stream: True if ``sid`` was used (ignore it)."""
        if self.role is Role.SERVER:
            return sid <= self._last_seen
        return self._any_allocated and sid <= self._last_allocated

    def _accept_new_stream(self, frame: NewStream) -> None:
        sid = frame.stream_id
        existing = self._streams.get(sid)
        if existing is not None and not existing.ended:
            raise _Fatal(UNKNOWN, f"cannot create stream ID {sid}: already exists")
        if self.strict_ids and sid <= self._last_seen:
            raise _Fatal(UNKNOWN, f"cannot create stream ID {sid}: that ID has already been used")
        reused = not self.strict_ids and self._id_used(sid)
        if not self.strict_ids:
            self._mark_used(sid)
        if sid > self._last_seen:
            self._last_seen = sid
        if reused:
            # Late frames of the old stream would be misattributed; refuse.
            self._out.append(
                CloseStream(sid, Status(INVALID_ARGUMENT, f"stream ID {sid} was already used"))
            )
            return
        policy = self.policy
        if frame.revision is not None and policy.name.startswith("grpctunnel"):
            if frame.revision == 0:
                policy = GRPCTUNNEL_REV0
            elif frame.revision != 1:
                self._out.append(
                    CloseStream(
                        sid,
                        Status(
                            UNAVAILABLE,
                            f"server does not support protocol revision {frame.revision}",
                        ),
                    )
                )
                return
        if self.draining:
            self._out.append(CloseStream(sid, Status(UNAVAILABLE, "transport is closing")))
            return
        if _split_method(frame.method) is None:
            self._out.append(
                CloseStream(
                    sid,
                    Status(INVALID_ARGUMENT, f'"{frame.method}" is not a well-formed method name'),
                )
            )
            return
        s = self._new_stream(sid, policy)
        if frame.initial_window is not None and policy.enabled and policy.byte_exact:
            s.credit = frame.initial_window
        method = frame.method if frame.method.startswith("/") else "/" + frame.method
        self._events.append(StreamRequested(sid, method, tuple(frame.headers)))

    def _receive_as_client(self, frame: Frame) -> None:
        sid = frame.stream_id
        s = self._streams.get(sid)
        if s is None:
            if self._late_frame(sid):
                return
            raise _Fatal(UNKNOWN, f"received frame for stream ID {sid}: stream never created")
        if isinstance(frame, WindowUpdate):
            self._credit(s, frame.increment)
            return
        if s.ended:
            return
        if isinstance(frame, Headers):
            if not s.headers_received:
                s.headers_received = True
                self._events.append(HeadersReceived(sid, tuple(frame.headers)))
        elif isinstance(frame, (Message, MessageData)):
            self._data(s, frame)
        elif isinstance(frame, CloseStream):
            self._drop_queue(s)
            self._end(s, frame.status, tuple(frame.trailers), local=False)
        else:
            self._protocol_fault(
                s, INTERNAL, f"unexpected {type(frame).__name__} frame from server"
            )

    def _data(self, s: _Stream, frame: Message | MessageData) -> None:
        data = frame.data
        n = len(data)
        pol = s.policy
        cost = pol.cost(n)
        if pol.enabled:
            avail = s.granted - s.taken
            # sesame.type: a sender may go while its credit is positive, so
            # a frame is legal iff credit remained before it (at most 255
            # frames / ~80 KiB outstanding).  grpctunnel.v1: bytes, exactly.
            if (n > avail) if pol.byte_exact else (avail <= 0):
                self._protocol_fault(s, RESOURCE_EXHAUSTED, "flow control window exceeded")
                return
            s.taken += cost
            if not s.big_sender and (
                s.taken - (s.granted - pol.recv_window) > pol.compat_outstanding
            ):
                s.big_sender = True
        peer = "request" if self.role is Role.SERVER else "response"
        code = INVALID_ARGUMENT if self.role is Role.SERVER else INTERNAL
        if isinstance(frame, Message):
            if s.asm is not None:
                self._protocol_fault(s, code, f"received redundant {peer} message envelope")
                return
            size = frame.size
            if size < 0 or n > size:
                self._protocol_fault(
                    s, code, f"received more data than indicated by {peer} message envelope"
                )
                return
            if size > self.max_receive_message:
                self._protocol_fault(
                    s,
                    RESOURCE_EXHAUSTED,
                    f"{peer} message of {size} bytes exceeds the limit of "
                    f"{self.max_receive_message}",
                )
                return
            if n == size:
                if cost:  # zero-cost messages need (and usually get) no consumed()
                    s.unconsumed += 1
                self._events.append(MessageReceived(s.stream_id, bytes(data), cost))
                return
            s.asm = bytearray(data)
            s.asm_size = size
            self._reassembly_credit(s, cost)
            return
        if s.asm is None:
            self._protocol_fault(s, code, f"never received envelope for {peer} message")
            return
        if len(s.asm) + n > s.asm_size:
            self._protocol_fault(
                s, code, f"received more data than indicated by {peer} message envelope"
            )
            return
        s.asm += data
        if len(s.asm) == s.asm_size:
            msg, s.asm = bytes(s.asm), None
            if cost:
                s.unconsumed += 1
            self._events.append(MessageReceived(s.stream_id, msg, cost))
        else:
            self._reassembly_credit(s, cost)

    def _reassembly_credit(self, s: _Stream, cost: int) -> None:
        """
        Credit a frame of an unfinished message.

        While the application keeps up (every delivered message consumed),
        such frames are credited at once: they sit in the reassembly buffer
        (bounded by max_receive_message), and a message larger than the
        window could never finish otherwise.  While it lags, their credit is
        held until it catches up, so unread messages cannot pile up beyond
        one window (a slow reader pauses the sender).
        """
        if s.unconsumed:
            s.deferred += cost
        else:
            self._return_credit(s, cost)

    def _protocol_fault(self, s: _Stream, code: int, message: str) -> None:
        """A peer fault confined to one stream: end it, tell the peer."""
        status = Status(code, message)
        self._drop_queue(s)
        if self.role is Role.SERVER:
            self._send_close_now(s, status)
        else:
            self._out.append(Cancel(s.stream_id))
        self._end(s, status, (), local=True)

    def _send_close_now(self, s: _Stream, status: Status) -> None:
        """Server: header (if none went out yet) and close_stream, bypassing the queue."""
        if not s.headers_sent:
            s.headers_sent = True
            self._out.append(Headers(s.stream_id, ()))
        s.local_closed = True
        self._out.append(CloseStream(s.stream_id, status))

    # --- internals: send ------------------------------------------------------

    def _new_stream(self, sid: int, policy: FlowPolicy) -> _Stream:
        s = _Stream(sid, policy, credit=policy.send_window, granted=policy.recv_window)
        self._streams[sid] = s
        return s

    def _live(self, stream_id: int) -> _Stream:
        if self.terminated is not None:
            raise TunnelClosedError(f"tunnel closed: {self.terminated.message}")
        s = self._streams.get(stream_id)
        if s is None or s.ended:
            raise StreamClosedError(f"stream {stream_id} is not open")
        return s

    def _check_open(self) -> None:
        if self.terminated is not None:
            raise TunnelClosedError(f"tunnel closed: {self.terminated.message}")

    def _enqueue(self, s: _Stream, item: Frame | _OutMessage) -> None:
        if isinstance(item, _OutMessage):
            s.queued_bytes += len(item.view)
        s.queue.append(item)
        if len(s.queue) == 1:
            self._flush(s)
        # Only a backlog the caller can observe (after this call) is worth a
        # StreamWritable later; one that drained at once is not.
        if s.queued_bytes > self.send_low_water and not s.ended:
            s.blocked = True

    def _flush(self, s: _Stream) -> None:
        q = s.queue
        pol = s.policy
        out = self._out
        while q:
            item = q[0]
            if not isinstance(item, _OutMessage):
                q.popleft()
                out.append(item)
                if isinstance(item, CloseStream):
                    self._forget(s)
                    return
                continue
            view = item.view
            total = len(view)
            while True:
                remaining = total - item.offset
                n = remaining if remaining < pol.max_chunk else pol.max_chunk
                if pol.enabled:
                    if s.credit <= 0 and not (pol.byte_exact and total == 0):
                        self._blocked.add(s.stream_id)
                        self._maybe_writable(s)
                        return
                    if pol.byte_exact and n > s.credit:
                        n = s.credit if s.credit > 0 else 0
                    s.credit -= pol.cost(n)
                chunk = bytes(view[item.offset:item.offset + n])
                if not item.started:
                    item.started = True
                    out.append(Message(s.stream_id, total, chunk))
                else:
                    out.append(MessageData(s.stream_id, chunk))
                item.offset += n
                s.queued_bytes -= n
                if item.offset >= total:
                    break
            q.popleft()
        self._blocked.discard(s.stream_id)
        self._maybe_writable(s)

    def _maybe_writable(self, s: _Stream) -> None:
        if s.blocked and s.queued_bytes <= self.send_low_water and not s.ended:
            s.blocked = False
            self._events.append(StreamWritable(s.stream_id))

    def _credit(self, s: _Stream, n: int) -> None:
        if not s.policy.enabled or n <= 0:
            return
        s.credit += n
        if s.queue and s.credit > 0:
            self._flush(s)

    def _drop_queue(self, s: _Stream) -> None:
        s.queue.clear()
        s.queued_bytes = 0
        self._blocked.discard(s.stream_id)

    def _end(
        self, s: _Stream, status: Status, trailers: Metadata, *, local: bool, keep: bool = False
    ) -> None:
        if s.ended:
            return
        s.ended = True
        s.asm = None
        self._events.append(StreamEnded(s.stream_id, status, trailers, local))
        if not keep:
            self._forget(s)

    def _forget(self, s: _Stream) -> None:
        self._streams.pop(s.stream_id, None)
        self._blocked.discard(s.stream_id)
        self._check_drained()

    def _check_drained(self) -> None:
        if (
            self.draining and not self._streams and self.terminated is None
            and not self._drained_sent
        ):
            self._drained_sent = True
            self._events.append(Drained())

    # --- internals: server id bookkeeping -------------------------------------

    def _id_used(self, sid: int) -> bool:
        return sid <= self._used_floor or sid in self._used_above

    def _mark_used(self, sid: int) -> None:
        if sid <= self._used_floor:
            return
        self._used_above.add(sid)
        if len(self._used_above) > MAX_ID_GAPS:
            ids = sorted(self._used_above)
            self._used_floor = ids[len(ids) // 2]
            self._used_above = set(ids[len(ids) // 2 + 1:])
        nxt = self._used_floor + 1
        while nxt in self._used_above:
            self._used_above.discard(nxt)
            self._used_floor = nxt
            nxt += 1


class _Fatal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.status = Status(code, message)


__all__ = [
    "GRPCTUNNEL_FLOW",
    "GRPCTUNNEL_REV0",
    "OK",
    "SESAME_FLOW",
    "Drained",
    "Event",
    "FlowPolicy",
    "HeadersReceived",
    "MessageReceived",
    "RequestsEnded",
    "Role",
    "SettingsReceived",
    "StreamEnded",
    "StreamRequested",
    "StreamWritable",
    "TunnelCore",
    "TunnelTerminated",
]
