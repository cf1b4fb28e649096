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

Each stream's lifecycle is one :class:`StreamState`, moved by
:class:`StreamInput`\\ s through a single table written as data,
:data:`_TRANSITIONS` ``(state, input) -> (effect, next state)``, as h2's
``H2StreamStateMachine`` does.  The table is the whole of the rules: who may
send what when (response headers once, nothing after half-close, a refusal
only before any answer), which late frames are ignored, which streams stay in
the stream table after they ended (a server close queued behind data).  A
pair that is absent is a protocol error, reported as the situation calls for:
an API call raises a :class:`LocalProtocolError` and leaves the stream as it
was; a frame from the peer ends the stream and tells the peer (a stream fault).
Tunnel-wide rules (stream ids, settings, draining) stay in plain code around
the table.  The credit arithmetic is apart too, in
:class:`~sesame.core._window.FlowWindow`: the table says *whether* a data frame
is expected, the window *how much* may flow.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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
from sesame.core._window import (
    GRPCTUNNEL_FLOW,
    GRPCTUNNEL_REV0,
    SESAME_FLOW,
    FlowControlError,
    FlowPolicy,
    FlowWindow,
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


class StreamState(enum.Enum):
    """
    Where one stream is in its life; a stream only ever takes its role's states.

    In both roles ``HEADERS`` means the response headers have passed (client:
    received; server: sent or queued) and ``HALF_CLOSED`` means the request
    side is over (client: ``half_close`` sent; server: received).  A stream is
    *live* (its API calls are allowed) in every state but
    :attr:`SERVER_CLOSING` and :attr:`CLOSED`; :class:`StreamEnded` is emitted
    on the way into either.
    """

    # Identity hash: the table is looked up on every frame, and Enum's own
    # __hash__ hashes the member's name in Python code.
    __hash__ = object.__hash__

    #: Created, nothing sent or received yet (only inside a call).
    IDLE = "idle"
    #: Client: ``new_stream`` sent; requests may go, no response headers yet.
    CLIENT_OPEN = "client open"
    #: Client: the response headers arrived; requests may still go.
    CLIENT_OPEN_HEADERS = "client open, headers received"
    #: Client: ``half_close`` sent (queued); no response headers yet.
    CLIENT_HALF_CLOSED = "client half-closed"
    #: Client: ``half_close`` sent and the response headers arrived.
    CLIENT_HALF_CLOSED_HEADERS = "client half-closed, headers received"
    #: Server: stream accepted; nothing answered; requests may come.
    SERVER_OPEN = "server open"
    #: Server: response headers sent (or queued); requests may come.
    SERVER_OPEN_HEADERS = "server open, headers sent"
    #: Server: the client half-closed; nothing answered yet.
    SERVER_HALF_CLOSED = "server half-closed"
    #: Server: the client half-closed; response headers sent.
    SERVER_HALF_CLOSED_HEADERS = "server half-closed, headers sent"
    #: Server: ended locally, its ``close_stream`` still queued behind data
    #: that waits for credit; only ``window_update`` and ``cancel`` matter.
    SERVER_CLOSING = "server closing"
    #: Over and out of the stream table.
    CLOSED = "closed"


class StreamInput(enum.Enum):
    """
    Everything that can happen to a stream: an API call of this side
    (``SEND_*``, ``REFUSE``, ``CANCEL``), a frame from the peer (``RECV_*``),
    or a step of the core itself (``FAULT``, ``CLOSE_SENT``, ``TERMINATE``).
    """

    __hash__ = object.__hash__  # see StreamState

    SEND_NEW_STREAM = "open_stream"
    SEND_HEADERS = "send_headers"
    SEND_MESSAGE = "send_message"
    SEND_HALF_CLOSE = "half_close"
    SEND_CLOSE = "close_stream"
    REFUSE = "refuse_stream"
    CANCEL = "cancel"
    RECV_NEW_STREAM = "new_stream frame"
    RECV_HEADERS = "header frame"
    RECV_MESSAGE = "message frame"  # the first (or only) chunk, with the size
    RECV_MESSAGE_DATA = "message_data frame"  # a continuation chunk
    RECV_HALF_CLOSE = "half_close frame"
    RECV_CANCEL = "cancel frame"
    RECV_CLOSE = "close_stream frame"
    RECV_WINDOW_UPDATE = "window_update frame"
    RECV_SETTINGS = "settings frame"  # addressed to a live stream: never legal
    #: The peer broke the rules on this stream: end it and tell the peer.
    FAULT = "stream fault"
    #: Server: the queued ``close_stream`` left.
    CLOSE_SENT = "close_stream sent"
    #: The tunnel is over.
    TERMINATE = "tunnel terminated"


_S = StreamState
_I = StreamInput

#: States in which a stream has ended (no API calls; StreamEnded was emitted).
_ENDED = frozenset({_S.SERVER_CLOSING, _S.CLOSED})
#: Server states after the client's half-close.
_REQUESTS_ENDED = frozenset({_S.SERVER_HALF_CLOSED, _S.SERVER_HALF_CLOSED_HEADERS})
#: Inputs that are frames from the peer: an absent pair is a stream fault.
_PEER_INPUTS = frozenset({
    _I.RECV_NEW_STREAM, _I.RECV_HEADERS, _I.RECV_MESSAGE, _I.RECV_MESSAGE_DATA,
    _I.RECV_HALF_CLOSE, _I.RECV_CANCEL, _I.RECV_CLOSE, _I.RECV_WINDOW_UPDATE,
    _I.RECV_SETTINGS,
})
#: API calls that an absent pair refuses, with the error they raise.  (The
#: other calls check the role first, which leaves no absent pair to reach.)
_REFUSALS: dict[StreamInput, tuple[type[LocalProtocolError], str]] = {
    _I.SEND_MESSAGE: (StreamClosedError, "stream closed for sending"),
    _I.SEND_HEADERS: (LocalProtocolError, "headers already sent"),
    _I.REFUSE: (LocalProtocolError, "stream already answered"),
}
_FRAME_INPUTS: dict[type, StreamInput] = {
    NewStream: _I.RECV_NEW_STREAM,
    Headers: _I.RECV_HEADERS,
    Message: _I.RECV_MESSAGE,
    MessageData: _I.RECV_MESSAGE_DATA,
    HalfClose: _I.RECV_HALF_CLOSE,
    Cancel: _I.RECV_CANCEL,
    CloseStream: _I.RECV_CLOSE,
    WindowUpdate: _I.RECV_WINDOW_UPDATE,
    Settings: _I.RECV_SETTINGS,
}


def _frame_input(frame: Frame) -> StreamInput:
    """The input a frame of a subclass of the frame types is (exact types: a dict hit)."""
    for cls, inp in _FRAME_INPUTS.items():
        if isinstance(frame, cls):
            return inp
    raise TypeError(f"not a tunnel frame: {frame!r}")


class _OutMessage:
    __slots__ = ("data", "view", "offset", "started")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.view = memoryview(data)
        self.offset = 0
        self.started = False


class _Stream:
    """One row of the stream table: state, window, send queue, reassembly."""

    __slots__ = ("stream_id", "policy", "state", "window", "queue", "queued_bytes", "asm",
                 "asm_size")

    def __init__(self, stream_id: int, policy: FlowPolicy, window: FlowWindow) -> None:
        self.stream_id = stream_id
        self.policy = policy
        self.state = StreamState.IDLE
        self.window = window
        self.queue: deque[Frame | _OutMessage] = deque()
        self.queued_bytes = 0  # message bytes in the queue
        self.asm: bytearray | None = None  # the message being reassembled
        self.asm_size = 0


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
        self.policy = policy  # the adapter may swap it after settings arrive
        self.strict_ids = strict_ids
        self.max_receive_message = max_receive_message
        self.max_send_message = max_send_message
        self.send_low_water = send_low_water
        self._streams: dict[int, _Stream] = {}
        self._out: list[Frame] = []
        self._events: list[Event] = []
        # Streams whose backlog went above send_low_water since their last
        # StreamWritable (only a backlog the caller could observe counts).
        self._backlogged: set[int] = set()
        # What the peer's messages are called, and the code of their faults.
        server = role is Role.SERVER
        self._peer_kind = "request" if server else "response"
        self._peer_code = INVALID_ARGUMENT if server else INTERNAL
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
        """How many streams are live (not yet ended)."""
        return sum(1 for s in self._streams.values() if s.state not in _ENDED)

    def stream_ids(self) -> list[int]:
        """The ids of the live streams, oldest first."""
        return [sid for sid, s in self._streams.items() if s.state not in _ENDED]

    def is_live(self, stream_id: int) -> bool:
        """Whether ``stream_id`` names a stream that has not ended."""
        s = self._streams.get(stream_id)
        return s is not None and s.state not in _ENDED

    def stream_state(self, stream_id: int) -> StreamState | None:
        """
        The state of a stream in the table.

        :param stream_id: any id.
        :returns: its :class:`StreamState`, or None once it left the table (or
            if it never was in it).
        """
        s = self._streams.get(stream_id)
        return s.state if s is not None else None

    def queued_bytes(self, stream_id: int) -> int:
        """Message bytes queued on the stream, waiting for credit (0 if unknown)."""
        s = self._streams.get(stream_id)
        return s.queued_bytes if s is not None else 0

    def send_credit(self, stream_id: int) -> int:
        """Credit this side holds for sending on the stream (0 if unknown)."""
        s = self._streams.get(stream_id)
        return s.window.credit if s is not None else 0

    def receive_window(self, stream_id: int) -> int:
        """Credit the peer still has for sending to us on this stream."""
        s = self._streams.get(stream_id)
        return s.window.available if s is not None else 0

    # --- output ---------------------------------------------------------------

    def data_to_send(self) -> list[Frame]:
        """Take the frames queued for the peer, oldest first."""
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[Event]:
        """Take the events for the adapter, oldest first."""
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
        self._process(s, _I.SEND_NEW_STREAM, frame)
        return sid

    def half_close(self, stream_id: int) -> None:
        """
        Client: no more requests; ``half_close`` follows the queued messages.

        A second call does nothing.

        :raises StreamClosedError: the stream has ended.
        :raises LocalProtocolError: called on the tunnel server.
        """
        s = self._live(stream_id)
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the tunnel client half-closes")
        self._process(s, _I.SEND_HALF_CLOSE)

    def cancel(self, stream_id: int, status: Status | None = None) -> None:
        """
        Abort a stream from this side.

        Client: send ``cancel`` and end with ``status`` (CANCELLED by
        default).  Server: end the stream with ``status`` at once, dropping
        queued output (the handler was cancelled or its deadline passed).
        Unknown or finished streams are ignored: cancel races are normal.
        """
        s = self._streams.get(stream_id)
        if s is None:
            return
        self._process(s, _I.CANCEL, status or Status(CANCELLED, "cancelled"))

    # --- local API: server role -----------------------------------------------

    def send_headers(self, stream_id: int, headers: Metadata = ()) -> None:
        """
        Server: queue the response headers (at most once, before any message).

        :raises LocalProtocolError: headers already sent, or called on the
            tunnel client.
        :raises StreamClosedError: the stream has ended.
        """
        s = self._live(stream_id)
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the tunnel server sends response headers")
        self._process(s, _I.SEND_HEADERS, headers)

    def close_stream(
        self, stream_id: int, status: Status = STATUS_OK, trailers: Metadata = ()
    ) -> None:
        """Server: finish a stream after everything queued on it."""
        s = self._live(stream_id)
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the tunnel server closes streams")
        self._process(s, _I.SEND_CLOSE, (status, tuple(trailers)))

    def refuse_stream(self, stream_id: int, status: Status) -> None:
        """Server: turn a just-requested stream away: status only, no header."""
        s = self._live(stream_id)
        self._process(s, _I.REFUSE, status)

    # --- local API: both roles ------------------------------------------------

    def send_message(self, stream_id: int, data: bytes) -> None:
        """Queue one whole serialized message; it leaves as credit allows."""
        s = self._live(stream_id)
        step = _TRANSITIONS.get((s.state, _I.SEND_MESSAGE))
        if step is None:
            raise self._refusal(s, _I.SEND_MESSAGE)
        if len(data) > self.max_send_message:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds the limit of {self.max_send_message}",
                RESOURCE_EXHAUSTED,
            )
        effect, s.state = step
        if effect is not None:
            effect(self, s, _OutMessage(data))

    def consumed(self, stream_id: int, cost: int) -> None:
        """
        The application took one :class:`MessageReceived` (its ``cost``):
        credit it back, plus any reassembly credit held back meanwhile.
        """
        s = self._streams.get(stream_id)
        if s is None or s.state in _ENDED or not s.policy.enabled:
            return
        self._return_credit(s, s.window.message_consumed(cost))

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
        for s in list(self._streams.values()):
            self._process(s, _I.TERMINATE, status)
        self._streams.clear()
        self._backlogged.clear()
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
        """Feed several frames (stopping if one ends the tunnel); returns the events."""
        for f in frames:
            if self.terminated is not None:
                break
            try:
                self._receive(f)
            except _Fatal as exc:
                self.terminate(exc.status, by_peer=False)
        return self.take_events()

    # --- the state table --------------------------------------------------------

    def _process(self, s: _Stream, inp: StreamInput, arg: Any = None) -> None:
        """
        Move ``s`` by ``inp``: take the next state from the table, then run the
        effect with ``arg`` (the frame, data or status the input carries).  An
        effect may move the stream on again (a fault ends it).
        """
        step = _TRANSITIONS.get((s.state, inp))
        if step is None:
            self._no_transition(s, inp, arg)
            return
        effect, s.state = step
        if effect is not None:
            effect(self, s, arg)

    def _no_transition(self, s: _Stream, inp: StreamInput, arg: Any) -> None:
        """An absent pair: an API call raises; a peer frame faults the stream."""
        if inp not in _PEER_INPUTS:
            raise self._refusal(s, inp)
        if inp is _I.RECV_SETTINGS:
            self._fault(s, INTERNAL, "settings frame sent to a stream")
        elif self.role is Role.SERVER:
            self._fault(s, INVALID_ARGUMENT, f"unexpected {type(arg).__name__} frame from client")
        else:
            self._fault(s, INTERNAL, f"unexpected {type(arg).__name__} frame from server")

    @staticmethod
    def _refusal(s: _Stream, inp: StreamInput) -> LocalProtocolError:
        refusal = _REFUSALS.get(inp)
        if refusal is not None:
            error, message = refusal
            return error(message)
        return LocalProtocolError(  # the core's own inputs: a bug in the table
            f"stream {s.stream_id}: no transition for {inp.name} in state {s.state.name}"
        )

    def _fault(self, s: _Stream, code: int, message: str) -> None:
        """A peer fault confined to one stream: end it, tell the peer."""
        self._process(s, _I.FAULT, Status(code, message))

    # --- transition effects: (core, stream, the input's argument) -------------

    def _fx_send_new_stream(self, s: _Stream, frame: NewStream) -> None:
        self._out.append(frame)

    def _fx_stream_requested(self, s: _Stream, frame: NewStream) -> None:
        method = frame.method if frame.method.startswith("/") else "/" + frame.method
        self._events.append(StreamRequested(s.stream_id, method, tuple(frame.headers)))

    def _fx_queue_headers(self, s: _Stream, headers: Metadata) -> None:
        self._enqueue(s, Headers(s.stream_id, tuple(headers)))

    # (SEND_MESSAGE with headers out: the effect is _enqueue itself.)

    def _fx_queue_headers_and_message(self, s: _Stream, message: _OutMessage) -> None:
        self._enqueue(s, Headers(s.stream_id, ()))
        self._enqueue(s, message)

    def _fx_queue_half_close(self, s: _Stream, _: None) -> None:
        self._enqueue(s, HalfClose(s.stream_id))

    def _fx_queue_close(self, s: _Stream, arg: tuple[Status, Metadata]) -> None:
        status, trailers = arg
        # End first (event + no more sends), then let the queue carry the
        # close frame out behind any data still waiting for credit.
        self._end(s, status, trailers, local=True)
        self._enqueue(s, CloseStream(s.stream_id, status, trailers))

    def _fx_queue_headers_and_close(self, s: _Stream, arg: tuple[Status, Metadata]) -> None:
        self._enqueue(s, Headers(s.stream_id, ()))
        self._fx_queue_close(s, arg)

    def _fx_refuse(self, s: _Stream, status: Status) -> None:
        self._out.append(CloseStream(s.stream_id, status))
        self._end(s, status, (), local=True)

    def _fx_reset_by_cancel(self, s: _Stream, status: Status) -> None:
        """Client, local cancel or fault: ``cancel`` goes out at once."""
        self._drop_queue(s)
        self._out.append(Cancel(s.stream_id))
        self._end(s, status, (), local=True)

    def _fx_reset_by_close(self, s: _Stream, status: Status) -> None:
        """Server, local cancel or fault: ``close_stream`` bypasses the queue."""
        self._close_now(s, status, header=False, local=True)

    def _fx_reset_by_header_close(self, s: _Stream, status: Status) -> None:
        """As :meth:`_fx_reset_by_close`, before any header went out."""
        self._close_now(s, status, header=True, local=True)

    def _fx_peer_cancel_close(self, s: _Stream, _: Cancel) -> None:
        self._close_now(s, Status(CANCELLED, "cancelled by client"), header=False, local=False)

    def _fx_peer_cancel_header_close(self, s: _Stream, _: Cancel) -> None:
        self._close_now(s, Status(CANCELLED, "cancelled by client"), header=True, local=False)

    def _fx_peer_closed(self, s: _Stream, frame: CloseStream) -> None:
        self._drop_queue(s)
        self._end(s, frame.status, tuple(frame.trailers), local=False)

    def _fx_headers_received(self, s: _Stream, frame: Headers) -> None:
        self._events.append(HeadersReceived(s.stream_id, tuple(frame.headers)))

    def _fx_requests_ended(self, s: _Stream, _: HalfClose) -> None:
        if s.asm is not None:
            self._fault(s, INVALID_ARGUMENT, "half-close in the middle of a request message")
            return
        self._events.append(RequestsEnded(s.stream_id))

    def _fx_credit(self, s: _Stream, frame: WindowUpdate) -> None:
        if s.window.add_credit(frame.increment) and s.queue:
            self._flush(s)

    def _fx_forget_closing(self, s: _Stream, _: Cancel) -> None:
        # Our close is still queued behind data; a cancel means the client
        # stopped listening, so nothing more will be credited.
        self._drop_queue(s)
        self._forget(s)

    def _fx_terminated(self, s: _Stream, status: Status) -> None:
        s.queue.clear()
        self._end(s, status, (), local=False)

    def _fx_message(self, s: _Stream, frame: Message) -> None:
        data = frame.data
        n = len(data)
        w = s.window
        try:
            cost = w.receive(n)
        except FlowControlError as exc:
            self._fault(s, exc.code, str(exc))
            return
        peer = self._peer_kind
        if s.asm is not None:
            self._fault(s, self._peer_code, f"received redundant {peer} message envelope")
            return
        size = frame.size
        if size < 0 or n > size:
            self._fault(
                s, self._peer_code,
                f"received more data than indicated by {peer} message envelope",
            )
            return
        if size > self.max_receive_message:
            self._fault(
                s,
                RESOURCE_EXHAUSTED,
                f"{peer} message of {size} bytes exceeds the limit of "
                f"{self.max_receive_message}",
            )
            return
        if n == size:
            w.message_delivered(cost)
            self._events.append(MessageReceived(s.stream_id, bytes(data), cost))
            return
        s.asm = bytearray(data)
        s.asm_size = size
        self._return_credit(s, w.fragment_received(cost))

    def _fx_message_data(self, s: _Stream, frame: MessageData) -> None:
        data = frame.data
        w = s.window
        try:
            cost = w.receive(len(data))
        except FlowControlError as exc:
            self._fault(s, exc.code, str(exc))
            return
        asm = s.asm
        if asm is None:
            self._fault(
                s, self._peer_code, f"never received envelope for {self._peer_kind} message"
            )
            return
        if len(asm) + len(data) > s.asm_size:
            self._fault(
                s, self._peer_code,
                f"received more data than indicated by {self._peer_kind} message envelope",
            )
            return
        asm += data
        if len(asm) == s.asm_size:
            s.asm = None
            w.message_delivered(cost)
            self._events.append(MessageReceived(s.stream_id, bytes(asm), cost))
        else:
            self._return_credit(s, w.fragment_received(cost))

    # --- internals: receive ---------------------------------------------------

    def _receive(self, frame: Frame) -> None:
        if self._expect_settings:
            self._expect_settings = False
            if not isinstance(frame, Settings) or frame.stream_id != -1:
                raise _Fatal(INTERNAL, "protocol error: first frame must be settings")
            self.peer_settings = SettingsReceived(tuple(frame.revisions), frame.initial_window)
            self._events.append(self.peer_settings)
            return
        inp = _FRAME_INPUTS.get(type(frame))
        if inp is None:
            if isinstance(frame, Invalid):
                raise _Fatal(INVALID_ARGUMENT, f"invalid frame: {frame.reason}")
            inp = _frame_input(frame)
        sid = frame.stream_id
        if inp is _I.RECV_SETTINGS:
            s = self._streams.get(sid)
            if s is not None and s.state not in _ENDED:
                self._process(s, inp, frame)  # no pair: settings never go to a stream
                return
            if sid > 0 and self._late_frame(sid):
                return
            raise _Fatal(INTERNAL, "unexpected settings frame")
        if sid <= 0 and not (self.strict_ids and sid == 0):
            raise _Fatal(INVALID_ARGUMENT, f"invalid frame: stream id {sid}")
        if inp is _I.RECV_NEW_STREAM and self.role is Role.SERVER:
            self._accept_new_stream(frame)
            return
        s = self._streams.get(sid)
        if s is None:
            if self._late_frame(sid):
                return  # late frame of a finished or refused stream
            raise _Fatal(UNKNOWN, f"received frame for stream ID {sid}: stream never created")
        # _process, inlined: this runs for every frame
        step = _TRANSITIONS.get((s.state, inp))
        if step is None:
            self._no_transition(s, inp, frame)
            return
        effect, s.state = step
        if effect is not None:
            effect(self, s, frame)

    def _late_frame(self, sid: int) -> bool:
        """A frame for no live stream: True if ``sid`` was used (ignore it)."""
        if self.role is Role.SERVER:
            return sid <= self._last_seen
        return self._any_allocated and sid <= self._last_allocated

    def _accept_new_stream(self, frame: NewStream) -> None:
        sid = frame.stream_id
        existing = self._streams.get(sid)
        if existing is not None and existing.state not in _ENDED:
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
        credit = None
        if frame.initial_window is not None and policy.enabled and policy.byte_exact:
            credit = frame.initial_window
        s = self._new_stream(sid, policy, credit)
        self._process(s, _I.RECV_NEW_STREAM, frame)

    def _return_credit(self, s: _Stream, cost: int) -> None:
        # A grpctunnel.v1 client sends nothing after half-close: its credit
        # would be wasted (sesame.type peers are credited all the same).
        discard = s.policy.byte_exact and s.state in _REQUESTS_ENDED
        n = s.window.release(cost, discard=discard)
        while n > 0:
            piece = min(n, MAX_UINT32)
            self._out.append(WindowUpdate(s.stream_id, piece))
            n -= piece

    def _close_now(self, s: _Stream, status: Status, *, header: bool, local: bool) -> None:
        """Server: drop the queue, [header and] close_stream now, end the stream."""
        self._drop_queue(s)
        if header:
            self._out.append(Headers(s.stream_id, ()))
        self._out.append(CloseStream(s.stream_id, status))
        self._end(s, status, (), local=local)

    # --- internals: send ------------------------------------------------------

    def _new_stream(
        self, sid: int, policy: FlowPolicy, send_credit: int | None = None
    ) -> _Stream:
        s = _Stream(sid, policy, FlowWindow(policy, send_credit))
        self._streams[sid] = s
        return s

    def _live(self, stream_id: int) -> _Stream:
        if self.terminated is not None:
            raise TunnelClosedError(f"tunnel closed: {self.terminated.message}")
        s = self._streams.get(stream_id)
        if s is None or s.state in _ENDED:
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
        if s.queued_bytes > self.send_low_water and s.state not in _ENDED:
            self._backlogged.add(s.stream_id)

    def _flush(self, s: _Stream) -> None:
        q = s.queue
        w = s.window
        max_chunk = s.policy.max_chunk
        out = self._out
        while q:
            item = q[0]
            if not isinstance(item, _OutMessage):
                q.popleft()
                out.append(item)
                if isinstance(item, CloseStream):
                    self._process(s, _I.CLOSE_SENT)
                    return
                continue
            view = item.view
            total = len(view)
            while True:
                remaining = total - item.offset
                n = w.charge(remaining if remaining < max_chunk else max_chunk, total)
                if n < 0:  # out of credit: wait for a window update
                    if self._backlogged:
                        self._maybe_writable(s)
                    return
                # a message that goes whole in one chunk goes as it is: no copy
                chunk = (item.data if n == total and type(item.data) is bytes
                         else bytes(view[item.offset:item.offset + n]))
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
        if self._backlogged:
            self._maybe_writable(s)

    def _maybe_writable(self, s: _Stream) -> None:
        sid = s.stream_id
        if (
            sid in self._backlogged and s.queued_bytes <= self.send_low_water
            and s.state not in _ENDED
        ):
            self._backlogged.discard(sid)
            self._events.append(StreamWritable(sid))

    def _drop_queue(self, s: _Stream) -> None:
        s.queue.clear()
        s.queued_bytes = 0

    def _end(self, s: _Stream, status: Status, trailers: Metadata, *, local: bool) -> None:
        """Emit the stream's one StreamEnded; leave the table if the state says CLOSED."""
        s.asm = None
        self._events.append(StreamEnded(s.stream_id, status, trailers, local))
        if s.state is _S.CLOSED:
            self._forget(s)

    def _forget(self, s: _Stream, _: object = None) -> None:
        """Take ``s`` out of the stream table (also the effect of ``CLOSE_SENT``)."""
        self._streams.pop(s.stream_id, None)
        self._backlogged.discard(s.stream_id)
        if self.draining:
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


# --- the transition table -------------------------------------------------------

_T = TunnelCore
_Effect = Callable[[TunnelCore, _Stream, Any], None]

#: ``(state, input) -> (effect, next state)``, the rules of a stream's life.
#: The next state is set first, then the effect runs (it may move the stream on
#: again: a bad data frame faults it).  An absent pair is a protocol error (see
#: ``TunnelCore._no_transition``): API calls raise, peer frames fault the stream.
#: ``None`` as effect means the input is accepted and ignored.
_TRANSITIONS: dict[tuple[StreamState, StreamInput], tuple[_Effect | None, StreamState]] = {
    # A new stream leaves IDLE within the call that made it.
    (_S.IDLE, _I.SEND_NEW_STREAM):
        (_T._fx_send_new_stream, _S.CLIENT_OPEN),
    (_S.IDLE, _I.RECV_NEW_STREAM):
        (_T._fx_stream_requested, _S.SERVER_OPEN),

    # CLIENT_OPEN.  Absent: refuse_stream ("already answered"; the other
    # server calls stop at the role check) and the frames only a server gets
    # (new_stream, half_close, cancel) or nobody does (settings): stream faults.
    (_S.CLIENT_OPEN, _I.SEND_MESSAGE):
        (_T._enqueue, _S.CLIENT_OPEN),
    (_S.CLIENT_OPEN, _I.SEND_HALF_CLOSE):
        (_T._fx_queue_half_close, _S.CLIENT_HALF_CLOSED),
    (_S.CLIENT_OPEN, _I.CANCEL):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_OPEN, _I.RECV_HEADERS):
        (_T._fx_headers_received, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN, _I.RECV_MESSAGE):
        (_T._fx_message, _S.CLIENT_OPEN),
    (_S.CLIENT_OPEN, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.CLIENT_OPEN),
    (_S.CLIENT_OPEN, _I.RECV_CLOSE):
        (_T._fx_peer_closed, _S.CLOSED),
    (_S.CLIENT_OPEN, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.CLIENT_OPEN),
    (_S.CLIENT_OPEN, _I.FAULT):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_OPEN, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # CLIENT_OPEN_HEADERS: as CLIENT_OPEN; a second header is ignored.
    (_S.CLIENT_OPEN_HEADERS, _I.SEND_MESSAGE):
        (_T._enqueue, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.SEND_HALF_CLOSE):
        (_T._fx_queue_half_close, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.CANCEL):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_OPEN_HEADERS, _I.RECV_HEADERS):
        (None, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.RECV_MESSAGE):
        (_T._fx_message, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.RECV_CLOSE):
        (_T._fx_peer_closed, _S.CLOSED),
    (_S.CLIENT_OPEN_HEADERS, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.CLIENT_OPEN_HEADERS),
    (_S.CLIENT_OPEN_HEADERS, _I.FAULT):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_OPEN_HEADERS, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # CLIENT_HALF_CLOSED: no more messages (StreamClosedError); half_close again
    # does nothing.
    (_S.CLIENT_HALF_CLOSED, _I.SEND_HALF_CLOSE):
        (None, _S.CLIENT_HALF_CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.CANCEL):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.RECV_HEADERS):
        (_T._fx_headers_received, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED, _I.RECV_MESSAGE):
        (_T._fx_message, _S.CLIENT_HALF_CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.CLIENT_HALF_CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.RECV_CLOSE):
        (_T._fx_peer_closed, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.CLIENT_HALF_CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.FAULT):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # CLIENT_HALF_CLOSED_HEADERS
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.SEND_HALF_CLOSE):
        (None, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.CANCEL):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.RECV_HEADERS):
        (None, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.RECV_MESSAGE):
        (_T._fx_message, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.RECV_CLOSE):
        (_T._fx_peer_closed, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.CLIENT_HALF_CLOSED_HEADERS),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.FAULT):
        (_T._fx_reset_by_cancel, _S.CLOSED),
    (_S.CLIENT_HALF_CLOSED_HEADERS, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # SERVER_OPEN: nothing answered yet, so a message or a close sends an empty
    # header first and a refusal is still possible.  Absent: header and
    # close_stream frames from the client (stream fault), settings.
    (_S.SERVER_OPEN, _I.SEND_HEADERS):
        (_T._fx_queue_headers, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN, _I.SEND_MESSAGE):
        (_T._fx_queue_headers_and_message, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN, _I.SEND_CLOSE):
        (_T._fx_queue_headers_and_close, _S.SERVER_CLOSING),
    (_S.SERVER_OPEN, _I.REFUSE):
        (_T._fx_refuse, _S.CLOSED),
    (_S.SERVER_OPEN, _I.CANCEL):
        (_T._fx_reset_by_header_close, _S.CLOSED),
    (_S.SERVER_OPEN, _I.RECV_MESSAGE):
        (_T._fx_message, _S.SERVER_OPEN),
    (_S.SERVER_OPEN, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.SERVER_OPEN),
    (_S.SERVER_OPEN, _I.RECV_HALF_CLOSE):
        (_T._fx_requests_ended, _S.SERVER_HALF_CLOSED),
    (_S.SERVER_OPEN, _I.RECV_CANCEL):
        (_T._fx_peer_cancel_header_close, _S.CLOSED),
    (_S.SERVER_OPEN, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.SERVER_OPEN),
    (_S.SERVER_OPEN, _I.FAULT):
        (_T._fx_reset_by_header_close, _S.CLOSED),
    (_S.SERVER_OPEN, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # SERVER_OPEN_HEADERS: headers went out, so no second send_headers and no
    # refusal (LocalProtocolError).
    (_S.SERVER_OPEN_HEADERS, _I.SEND_MESSAGE):
        (_T._enqueue, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN_HEADERS, _I.SEND_CLOSE):
        (_T._fx_queue_close, _S.SERVER_CLOSING),
    (_S.SERVER_OPEN_HEADERS, _I.CANCEL):
        (_T._fx_reset_by_close, _S.CLOSED),
    (_S.SERVER_OPEN_HEADERS, _I.RECV_MESSAGE):
        (_T._fx_message, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN_HEADERS, _I.RECV_MESSAGE_DATA):
        (_T._fx_message_data, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN_HEADERS, _I.RECV_HALF_CLOSE):
        (_T._fx_requests_ended, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_OPEN_HEADERS, _I.RECV_CANCEL):
        (_T._fx_peer_cancel_close, _S.CLOSED),
    (_S.SERVER_OPEN_HEADERS, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.SERVER_OPEN_HEADERS),
    (_S.SERVER_OPEN_HEADERS, _I.FAULT):
        (_T._fx_reset_by_close, _S.CLOSED),
    (_S.SERVER_OPEN_HEADERS, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # SERVER_HALF_CLOSED: the client is done; its late data and half-closes are
    # ignored (credit is not returned, see _return_credit).
    (_S.SERVER_HALF_CLOSED, _I.SEND_HEADERS):
        (_T._fx_queue_headers, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED, _I.SEND_MESSAGE):
        (_T._fx_queue_headers_and_message, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED, _I.SEND_CLOSE):
        (_T._fx_queue_headers_and_close, _S.SERVER_CLOSING),
    (_S.SERVER_HALF_CLOSED, _I.REFUSE):
        (_T._fx_refuse, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.CANCEL):
        (_T._fx_reset_by_header_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.RECV_MESSAGE):
        (None, _S.SERVER_HALF_CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.RECV_MESSAGE_DATA):
        (None, _S.SERVER_HALF_CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.RECV_HALF_CLOSE):
        (None, _S.SERVER_HALF_CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.RECV_CANCEL):
        (_T._fx_peer_cancel_header_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.SERVER_HALF_CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.FAULT):
        (_T._fx_reset_by_header_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # SERVER_HALF_CLOSED_HEADERS
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.SEND_MESSAGE):
        (_T._enqueue, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.SEND_CLOSE):
        (_T._fx_queue_close, _S.SERVER_CLOSING),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.CANCEL):
        (_T._fx_reset_by_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.RECV_MESSAGE):
        (None, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.RECV_MESSAGE_DATA):
        (None, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.RECV_HALF_CLOSE):
        (None, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.RECV_CANCEL):
        (_T._fx_peer_cancel_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.SERVER_HALF_CLOSED_HEADERS),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.FAULT):
        (_T._fx_reset_by_close, _S.CLOSED),
    (_S.SERVER_HALF_CLOSED_HEADERS, _I.TERMINATE):
        (_T._fx_terminated, _S.CLOSED),

    # SERVER_CLOSING: ended (StreamEnded was emitted, API calls say "not open");
    # the close waits for credit, so window updates still count, and a cancel
    # means nobody will send more: forget the stream.  Everything else is late.
    (_S.SERVER_CLOSING, _I.CANCEL):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_HEADERS):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_MESSAGE):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_MESSAGE_DATA):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_HALF_CLOSE):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_CLOSE):
        (None, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.RECV_CANCEL):
        (_T._fx_forget_closing, _S.CLOSED),
    (_S.SERVER_CLOSING, _I.RECV_WINDOW_UPDATE):
        (_T._fx_credit, _S.SERVER_CLOSING),
    (_S.SERVER_CLOSING, _I.CLOSE_SENT):
        (_T._forget, _S.CLOSED),
    (_S.SERVER_CLOSING, _I.TERMINATE):
        (None, _S.CLOSED),

    # CLOSED: nothing; the stream is out of the table.
}


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
    "StreamInput",
    "StreamRequested",
    "StreamState",
    "StreamWritable",
    "TunnelCore",
    "TunnelTerminated",
]
