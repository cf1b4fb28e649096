"""
Plain-call tests of the sans-IO tunnel core (:mod:`sesame.core._machine`).

No I/O, threads or clocks: frames go in through ``receive_frame``, API calls
change state, and the frames and events that come out are compared exactly
with PROTOCOL.md section 2 (``sesame.type``) and section 3 (``grpctunnel.v1``).

The codecs are deliberately not imported here: ``sesame.core._codec`` registers
``grpctunnel.v1`` protobuf symbols that collide with the grpctunnel-py test
dependency (see tests/test_wire.py).  The core is codec-neutral, so each
dialect is described by its flow policy and id rule instead.
"""

from __future__ import annotations

import pytest

from sesame.core._frames import (
    CANCELLED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    RESOURCE_EXHAUSTED,
    STATUS_OK,
    UNAVAILABLE,
    UNKNOWN,
    Cancel,
    CloseStream,
    HalfClose,
    Headers,
    Invalid,
    LocalProtocolError,
    Message,
    MessageData,
    NewStream,
    Settings,
    Status,
    StreamClosedError,
    TunnelClosedError,
    TunnelError,
    WindowUpdate,
)
from sesame.core._machine import (
    GRPCTUNNEL_FLOW,
    GRPCTUNNEL_REV0,
    MAX_STREAM_ID,
    MAX_STRICT_STREAM_ID,
    SESAME_FLOW,
    Drained,
    FlowPolicy,
    HeadersReceived,
    MessageReceived,
    RequestsEnded,
    Role,
    SettingsReceived,
    StreamEnded,
    StreamRequested,
    StreamWritable,
    TunnelCore,
    TunnelTerminated,
)

SESAME = (SESAME_FLOW, False)
GRPCTUNNEL = (GRPCTUNNEL_FLOW, True)
DIALECTS = pytest.mark.parametrize(
    "dialect", [SESAME, GRPCTUNNEL], ids=["sesame", "grpctunnel"]
)
METHOD = "/pkg.Svc/Call"


def client(dialect=SESAME, **kw) -> TunnelCore:
    policy, strict = dialect
    return TunnelCore(Role.CLIENT, policy, strict_ids=strict, **kw)


def server(dialect=SESAME, **kw) -> TunnelCore:
    policy, strict = dialect
    return TunnelCore(Role.SERVER, policy, strict_ids=strict, **kw)


def new_stream(dialect, sid: int, method: str = METHOD, headers=()) -> NewStream:
    """The new_stream frame our own client sends in this dialect."""
    if dialect is GRPCTUNNEL:
        return NewStream(sid, method, headers, initial_window=65536, revision=1)
    return NewStream(sid, method, headers)


def opened(dialect=SESAME, *sids: int, **kw) -> TunnelCore:
    """A server with streams ``sids`` (default: 1) requested and accepted."""
    s = server(dialect, **kw)
    for sid in sids or (1,):
        [ev] = s.receive_frame(new_stream(dialect, sid))
        assert isinstance(ev, StreamRequested)
    assert s.data_to_send() == []
    return s


def client_with(dialect=SESAME, n: int = 1, **kw) -> tuple[TunnelCore, list[int]]:
    c = client(dialect, **kw)
    sids = [c.open_stream(METHOD) for _ in range(n)]
    c.data_to_send()
    return c, sids


def sizes(frames) -> list[int]:
    return [len(f.data) for f in frames if isinstance(f, (Message, MessageData))]


def ended(events) -> list[StreamEnded]:
    return [e for e in events if isinstance(e, StreamEnded)]


# --- 2.4 stream ids -------------------------------------------------------------


@DIALECTS
def test_ids_start_at_one_and_increase(dialect):
    c = client(dialect)
    assert [c.open_stream(METHOD) for _ in range(3)] == [1, 2, 3]
    frames = c.data_to_send()
    assert frames == [new_stream(dialect, 1), new_stream(dialect, 2), new_stream(dialect, 3)]


@DIALECTS
def test_ids_are_never_reused(dialect):
    c = client(dialect)
    a = c.open_stream(METHOD)
    c.cancel(a)
    c.receive_frame(CloseStream(a))  # late; ignored
    b = c.open_stream(METHOD)
    assert (a, b) == (1, 2)
    assert not c.is_live(a)
    assert c.is_live(b)


@pytest.mark.parametrize(
    ("dialect", "last"), [(SESAME, MAX_STREAM_ID), (GRPCTUNNEL, MAX_STRICT_STREAM_ID)],
    ids=["sesame-uint64", "grpctunnel-int64"],
)
def test_ids_exhausted(dialect, last):
    c = client(dialect, first_stream_id=last)
    assert c.open_stream(METHOD) == last
    with pytest.raises(TunnelClosedError, match="all stream IDs exhausted"):
        c.open_stream(METHOD)
    assert c.is_live(last)


def test_only_clients_open_streams():
    with pytest.raises(LocalProtocolError):
        server().open_stream(METHOD)


# --- 2.6 admission ---------------------------------------------------------------


@DIALECTS
def test_new_stream_requested(dialect):
    s = server(dialect)
    md = (("a", "1"), ("b-bin", b"\x00\xff"))
    assert s.receive_frame(new_stream(dialect, 1, METHOD, md)) == [
        StreamRequested(1, METHOD, md)
    ]
    assert s.data_to_send() == []
    assert s.is_live(1)


def test_method_without_leading_slash_is_normalised():
    s = server()
    assert s.receive_frame(NewStream(1, "pkg.Svc/Call")) == [StreamRequested(1, METHOD, ())]


@DIALECTS
@pytest.mark.parametrize("method", ["", "noslash", "/", "/noslash"])
def test_malformed_method_refused(dialect, method):
    s = server(dialect)
    assert s.receive_frame(new_stream(dialect, 1, method)) == []
    assert s.data_to_send() == [
        CloseStream(
            1, Status(INVALID_ARGUMENT, f'"{method}" is not a well-formed method name')
        )
    ]
    assert not s.is_live(1)
    # the refused id counts as seen: its late frames are ignored
    assert s.receive_frame(Message(1, 1, b"x")) == []
    assert s.receive_frame(HalfClose(1)) == []
    assert s.receive_frame(Cancel(1)) == []
    assert s.data_to_send() == []
    assert s.terminated is None


@pytest.mark.parametrize("method", ["svc/", "/svc/", "//x", "/a/b/c"])
def test_odd_but_slashed_methods_go_to_lookup(method):
    # Go only rejects empty or slash-less names; the rest fail the lookup.
    s = server()
    [ev] = s.receive_frame(NewStream(1, method))
    assert isinstance(ev, StreamRequested)


@DIALECTS
def test_duplicate_active_id_is_fatal(dialect):
    s = opened(dialect, 1, 2)
    events = s.receive_frame(new_stream(dialect, 1))
    status = Status(UNKNOWN, "cannot create stream ID 1: already exists")
    assert s.terminated == status
    assert events == [
        StreamEnded(1, status),
        StreamEnded(2, status),
        TunnelTerminated(status, by_peer=False),
    ]
    # a dead tunnel ignores input and refuses local use
    assert s.receive_frame(new_stream(dialect, 3)) == []
    with pytest.raises(TunnelClosedError):
        s.send_message(1, b"")


def test_reused_finished_id_refused_sesame():
    s = opened(SESAME, 1)
    s.close_stream(1)
    s.take_events()
    s.data_to_send()
    assert s.receive_frame(NewStream(1, METHOD)) == []
    assert s.data_to_send() == [
        CloseStream(1, Status(INVALID_ARGUMENT, "stream ID 1 was already used"))
    ]
    assert s.terminated is None


def test_reused_refused_id_refused_sesame():
    s = server()
    s.receive_frame(NewStream(1, "bad"))
    s.data_to_send()
    s.receive_frame(NewStream(1, METHOD))
    assert s.data_to_send() == [
        CloseStream(1, Status(INVALID_ARGUMENT, "stream ID 1 was already used"))
    ]


def test_reused_id_fatal_grpctunnel():
    s = opened(GRPCTUNNEL, 1)
    s.close_stream(1)
    s.take_events()
    s.receive_frame(new_stream(GRPCTUNNEL, 1))
    assert s.terminated == Status(UNKNOWN, "cannot create stream ID 1: that ID has already been used")


def test_out_of_order_new_stream_accepted_sesame():
    s = server()
    for sid in (3, 1, 2):
        assert s.receive_frame(NewStream(sid, METHOD)) == [StreamRequested(sid, METHOD, ())]
    assert sorted(s.stream_ids()) == [1, 2, 3]
    assert s.data_to_send() == []


def test_lower_id_fatal_grpctunnel():
    s = opened(GRPCTUNNEL, 3)
    events = s.receive_frame(new_stream(GRPCTUNNEL, 2))
    assert s.terminated is not None and s.terminated.code == UNKNOWN
    assert ended(events) == [StreamEnded(3, s.terminated)]


def test_id_zero_valid_grpctunnel_server():
    # grpctunnel.v1 servers start last_seen at -1, so id 0 is a valid first id.
    s = server(GRPCTUNNEL)
    assert s.receive_frame(new_stream(GRPCTUNNEL, 0)) == [StreamRequested(0, METHOD, ())]
    assert s.receive_frame(Message(0, 2, b"hi")) == [MessageReceived(0, b"hi", 2)]
    s.receive_frame(new_stream(GRPCTUNNEL, 0))
    assert s.terminated is not None


def test_sesame_server_skipping_ids_keeps_bounded_bookkeeping():
    s = server()
    for sid in range(2, 20000, 2):  # never uses odd ids, nor id 1
        s.receive_frame(NewStream(sid, METHOD))
        s.close_stream(sid)
    assert s.terminated is None
    assert len(s._used_above) <= 4096 + 1


# --- frames for unknown ids / invalid frames -----------------------------------------


@pytest.mark.parametrize(
    "frame",
    [Message(5, 1, b"x"), MessageData(5, b"x"), HalfClose(5), Cancel(5), WindowUpdate(5, 10)],
)
def test_server_frame_for_never_created_id_is_fatal(frame):
    s = opened(SESAME, 1)
    events = s.receive_frame(frame)
    status = Status(UNKNOWN, "received frame for stream ID 5: stream never created")
    assert s.terminated == status
    assert events == [StreamEnded(1, status), TunnelTerminated(status, by_peer=False)]


@DIALECTS
@pytest.mark.parametrize(
    "frame",
    [Headers(3), Message(3, 1, b"x"), CloseStream(3), WindowUpdate(3, 1)],
)
def test_client_frame_for_never_allocated_id_is_fatal(dialect, frame):
    c, _ = client_with(dialect, 2)
    c.receive_frame(frame)
    assert c.terminated == Status(UNKNOWN, "received frame for stream ID 3: stream never created")


def test_client_frame_before_any_allocation_is_fatal():
    c = client()
    c.receive_frame(Headers(1))
    assert c.terminated is not None and c.terminated.code == UNKNOWN


def test_sesame_server_ignores_frames_for_gaps_below_last_seen():
    # Go: a frame for an inactive id <= last_seen is a late frame, ignored.
    s = opened(SESAME, 3)
    assert s.receive_frame(Message(2, 1, b"x")) == []
    assert s.terminated is None


@pytest.mark.parametrize(
    "frame",
    [Invalid(0, "no frame set"), Invalid(7, "no frame set"), Message(0, 1, b"x"),
     NewStream(0, METHOD), WindowUpdate(0, 5), Cancel(-1)],
)
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_invalid_frames_are_fatal_invalid_argument(frame, role):
    core = TunnelCore(role)
    if role is Role.CLIENT:
        core.open_stream(METHOD)
    else:
        core.receive_frame(NewStream(1, METHOD))
    core.take_events()
    events = core.receive_frame(frame)
    assert core.terminated is not None
    assert core.terminated.code == INVALID_ARGUMENT
    assert core.terminated.message.startswith("invalid frame")
    assert events == [StreamEnded(1, core.terminated), TunnelTerminated(core.terminated, False)]


def test_late_frames_for_finished_streams_ignored_server():
    s = opened(SESAME, 1)
    s.send_message(1, b"resp")
    s.close_stream(1)
    s.take_events()
    s.data_to_send()
    # The Go client's trailing cancel, and anything else late.
    for f in (Cancel(1), Message(1, 1, b"x"), MessageData(1, b"y"), HalfClose(1),
              WindowUpdate(1, 100)):
        assert s.receive_frame(f) == []
    assert s.data_to_send() == []
    assert s.terminated is None


@DIALECTS
def test_late_frames_for_finished_streams_ignored_client(dialect):
    c, [sid] = client_with(dialect)
    c.receive_frame(CloseStream(sid))
    c.take_events()
    for f in (Headers(sid), Message(sid, 1, b"x"), CloseStream(sid), WindowUpdate(sid, 9)):
        assert c.receive_frame(f) == []
    assert c.data_to_send() == []
    assert c.terminated is None


# --- 2.8 chunking --------------------------------------------------------------------


def test_chunking_sesame_16256():
    c, [sid] = client_with(SESAME)
    c.send_message(sid, bytes(range(256)) * 160)  # 40960 bytes
    frames = c.data_to_send()
    assert sizes(frames) == [16256, 16256, 8448]
    assert isinstance(frames[0], Message) and frames[0].size == 40960
    assert all(isinstance(f, MessageData) for f in frames[1:])
    assert b"".join(f.data for f in frames) == bytes(range(256)) * 160


def test_chunking_grpctunnel_16384_and_window():
    c, [sid] = client_with(GRPCTUNNEL)
    c.send_message(sid, b"a" * 200000)
    assert sizes(c.data_to_send()) == [16384] * 4  # exactly the 65536-byte window
    assert c.send_credit(sid) == 0
    c.receive_frame(WindowUpdate(sid, 1000))
    assert c.data_to_send() == [MessageData(sid, b"a" * 1000)]  # never above the window
    c.receive_frame(WindowUpdate(sid, 40000))
    assert sizes(c.data_to_send()) == [16384, 16384, 7232]
    assert c.send_credit(sid) == 0
    c.receive_frame(WindowUpdate(sid, 100000))
    assert sizes(c.data_to_send()) == [16384] * 5 + [11544]  # the rest of 200000
    assert c.send_credit(sid) == 100000 - 93464


@DIALECTS
def test_zero_length_message_is_one_frame(dialect):
    c, [sid] = client_with(dialect)
    c.send_message(sid, b"")
    assert c.data_to_send() == [Message(sid, 0, b"")]


def test_grpctunnel_zero_length_message_needs_no_credit():
    c, [sid] = client_with(GRPCTUNNEL)
    c.send_message(sid, b"x" * 65536)
    c.send_message(sid, b"")
    frames = c.data_to_send()
    assert frames[-1] == Message(sid, 0, b"")
    assert c.send_credit(sid) == 0


def test_sesame_zero_length_message_costs_258():
    c, [sid] = client_with(SESAME)
    c.send_message(sid, b"")
    assert c.send_credit(sid) == 65535 - 258


def test_message_size_limit_local():
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**31

    c, [sid] = client_with(SESAME)
    with pytest.raises(LocalProtocolError) as info:
        c.send_message(sid, Huge())
    assert info.value.code == RESOURCE_EXHAUSTED
    assert c.data_to_send() == []
    assert c.is_live(sid)
    c2, [sid2] = client_with(SESAME, max_send_message=10)
    c2.send_message(sid2, b"x" * 10)
    with pytest.raises(TunnelError) as info:
        c2.send_message(sid2, b"x" * 11)
    assert info.value.status.code == RESOURCE_EXHAUSTED


# --- 2.8 reassembly ------------------------------------------------------------------

REASSEMBLY_CASES = [
    pytest.param(
        [Message(1, 10, b"abc"), Message(1, 3, b"abc")],
        "received redundant {} message envelope", id="redundant-envelope",
    ),
    pytest.param(
        [MessageData(1, b"abc")],
        "never received envelope for {} message", id="data-without-envelope",
    ),
    pytest.param(
        [Message(1, 4, b"abc"), MessageData(1, b"de")],
        "received more data than indicated by {} message envelope", id="too-much-data",
    ),
    pytest.param(
        [Message(1, 2, b"abc")],
        "received more data than indicated by {} message envelope", id="first-chunk-too-big",
    ),
    pytest.param(
        [Message(1, -1, b"")],
        "received more data than indicated by {} message envelope", id="negative-size",
    ),
]


@pytest.mark.parametrize(("frames", "text"), REASSEMBLY_CASES)
def test_reassembly_errors_server(frames, text):
    s = opened(SESAME, 1, 2)
    events = s.receive_frames(frames)
    status = Status(INVALID_ARGUMENT, text.format("request"))
    assert events == [StreamEnded(1, status, (), local=True)]
    assert s.data_to_send() == [Headers(1), CloseStream(1, status)]
    assert s.is_live(2) and s.terminated is None


@pytest.mark.parametrize(("frames", "text"), REASSEMBLY_CASES)
def test_reassembly_errors_client(frames, text):
    c, _ = client_with(SESAME, 2)
    events = c.receive_frames(frames)
    status = Status(INTERNAL, text.format("response"))
    assert events == [StreamEnded(1, status, (), local=True)]
    assert c.data_to_send() == [Cancel(1)]
    assert c.is_live(2) and c.terminated is None


def test_reassembly_across_frames_and_interleaved_streams():
    s = opened(SESAME, 1, 2)
    events = s.receive_frames([
        Message(1, 5, b"ab"), Message(2, 1, b"z"), MessageData(1, b"cd"), MessageData(1, b"e"),
    ])
    assert events == [MessageReceived(2, b"z", 258), MessageReceived(1, b"abcde", 258)]


@DIALECTS
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_oversized_message_resource_exhausted(dialect, role):
    if role is Role.SERVER:
        core = opened(dialect, 1, max_receive_message=100)
    else:
        core, _ = client_with(dialect, max_receive_message=100)
    assert core.receive_frame(Message(1, 100, b"x" * 100))[0] == MessageReceived(
        1, b"x" * 100, dialect[0].cost(100)
    )
    events = core.receive_frame(Message(1, 101, b"x"))
    peer = "request" if role is Role.SERVER else "response"
    status = Status(RESOURCE_EXHAUSTED, f"{peer} message of 101 bytes exceeds the limit of 100")
    assert events == [StreamEnded(1, status, (), local=True)]
    out = core.data_to_send()
    assert out == ([Headers(1), CloseStream(1, status)] if role is Role.SERVER else [Cancel(1)])


# --- 2.12 / 3.4 flow control ---------------------------------------------------------


def test_window_violation_sesame_after_255_frames():
    s = opened(SESAME, 1, 2)
    for _ in range(255):  # 254 x 258 = 65532 < 65535: the 255th still finds credit
        [ev] = s.receive_frame(Message(1, 1, b"x"))
        assert isinstance(ev, MessageReceived)
    assert s.receive_window(1) == 65535 - 255 * 258
    events = s.receive_frame(Message(1, 1, b"x"))
    status = Status(RESOURCE_EXHAUSTED, "flow control window exceeded")
    assert events == [StreamEnded(1, status, (), local=True)]
    assert s.data_to_send() == [Headers(1), CloseStream(1, status)]
    # the other stream is unaffected
    assert s.receive_frame(Message(2, 1, b"y")) == [MessageReceived(2, b"y", 258)]
    assert s.terminated is None


def test_window_violation_grpctunnel_byte_exact():
    s = opened(GRPCTUNNEL, 1, 2)
    for _ in range(4):
        s.receive_frame(Message(1, 16384, b"x" * 16384))
    assert s.receive_window(1) == 0
    events = s.receive_frame(Message(1, 1, b"x"))
    status = Status(RESOURCE_EXHAUSTED, "flow control window exceeded")
    assert ended(events) == [StreamEnded(1, status, (), local=True)]
    assert s.data_to_send() == [Headers(1), CloseStream(1, status)]
    assert s.receive_frame(Message(2, 1, b"y")) == [MessageReceived(2, b"y", 1)]


def test_window_violation_client_side():
    c, [a, b] = client_with(GRPCTUNNEL, 2)
    c.receive_frame(Message(a, 70000, b"x" * 65536))  # unfinished: credited at once
    assert c.data_to_send() == [WindowUpdate(a, 65536)]
    [ev] = c.receive_frame(MessageData(a, b"x" * 4464))
    assert ev == MessageReceived(a, b"x" * 70000, 4464)
    for _ in range(4):
        c.receive_frame(Message(b, 16384, b"y" * 16384))
    events = c.receive_frame(Message(b, 1, b"y"))
    assert ended(events) == [
        StreamEnded(b, Status(RESOURCE_EXHAUSTED, "flow control window exceeded"), (), True)
    ]
    assert c.data_to_send() == [Cancel(b)]
    assert c.is_live(a)


def test_protocol_worked_example_2_12():
    """PROTOCOL.md 2.12: one 100 000-byte message, tunnel client -> server."""
    c, [sid] = client_with(SESAME)
    s = opened(SESAME, sid)
    credits = []
    c.send_message(sid, b"m" * 100000)
    frames = c.data_to_send()
    assert sizes(frames) == [16256] * 5
    # reconstruct the credit after each send, then check the core agrees
    credit = 65535
    for n in sizes(frames):
        credit -= max(n, 258)
        credits.append(credit)
    assert credits == [49279, 33023, 16767, 511, -15745]
    assert c.send_credit(sid) == -15745  # frame 6 waits
    # The server credits frames of the unfinished message as they arrive:
    # frames 1-2 reach the 26 214 threshold -> window_update(32512).
    s.receive_frames(frames[:2])
    assert s.take_events() == []
    updates = s.data_to_send()
    assert updates == [WindowUpdate(sid, 32512)]
    c.receive_frames(updates)
    assert c.send_credit(sid) == -15745 + 32512 - 16256 - 2464 == -1953
    rest = c.data_to_send()
    assert sizes(rest) == [16256, 2464]  # frames 6 and 7 go out (511, then -1953)
    s.receive_frames(frames[2:4])
    assert s.data_to_send() == [WindowUpdate(sid, 32512)]
    s.receive_frame(frames[4])
    assert s.data_to_send() == []  # 16256 pending, below the threshold
    s.receive_frame(rest[0])
    assert s.data_to_send() == [WindowUpdate(sid, 32512)]
    # the final frame is credited only when the application consumes it
    [ev] = s.receive_frame(rest[1])
    assert ev == MessageReceived(sid, b"m" * 100000, 2464)
    assert s.receive_window(sid) == 65535 + 3 * 32512 - 6 * 16256 - 2464
    s.consumed(sid, ev.cost)
    assert s.data_to_send() == []  # 2464 pending, below the threshold
    # more small messages push it over
    for _ in range(92):  # 2464 + 92 * 258 = 26200: one short of 26214
        [ev] = s.receive_frame(Message(sid, 1, b"x"))
        s.consumed(sid, ev.cost)
    assert s.data_to_send() == []
    [ev] = s.receive_frame(Message(sid, 1, b"x"))
    s.consumed(sid, ev.cost)
    assert s.data_to_send() == [WindowUpdate(sid, 2464 + 93 * 258)]


def test_sesame_credit_needs_only_positive_credit():
    c, [sid] = client_with(SESAME)
    for _ in range(4):
        c.send_message(sid, b"x" * 16256)
    c.send_message(sid, b"x" * 16256)
    assert len(c.data_to_send()) == 5
    c.send_message(sid, b"y")
    assert c.data_to_send() == []
    c.receive_frame(WindowUpdate(sid, 15746))  # credit -15745 -> 1: any positive suffices
    assert c.data_to_send() == [Message(sid, 1, b"y")]
    assert c.send_credit(sid) == 1 - 258


def test_grpctunnel_credit_per_consumed_frame():
    s = opened(GRPCTUNNEL, 1)
    [ev] = s.receive_frame(Message(1, 5, b"hello"))
    assert s.data_to_send() == []
    s.consumed(1, ev.cost)
    assert s.data_to_send() == [WindowUpdate(1, 5)]


def test_grpctunnel_no_credit_after_half_close():
    s = opened(GRPCTUNNEL, 1)
    [ev] = s.receive_frame(Message(1, 5, b"hello"))
    s.receive_frame(HalfClose(1))
    s.consumed(1, ev.cost)
    assert s.data_to_send() == []


def test_no_credit_for_finished_stream():
    s = opened(SESAME, 1)
    evs = [s.receive_frame(Message(1, 1, b"x"))[0] for _ in range(200)]
    s.close_stream(1)
    for ev in evs:
        s.consumed(1, ev.cost)
    assert s.data_to_send() == [Headers(1), CloseStream(1)]


def test_grpctunnel_server_uses_client_initial_window():
    s = server(GRPCTUNNEL)
    s.receive_frame(NewStream(1, METHOD, (), initial_window=1000, revision=1))
    s.send_message(1, b"z" * 3000)
    assert sizes(s.data_to_send()) == [1000]
    assert s.send_credit(1) == 0


def test_grpctunnel_revision_zero_has_no_flow_control():
    s = server(GRPCTUNNEL)
    s.receive_frame(NewStream(1, METHOD, (), initial_window=65536, revision=0))
    s.send_message(1, b"z" * 100000)
    assert sizes(s.data_to_send()[1:]) == [16384] * 6 + [1696]
    for _ in range(10):
        [ev] = s.receive_frame(Message(1, 16384, b"q" * 16384))
        s.consumed(1, ev.cost)
    assert s.data_to_send() == []  # no window updates in revision 0
    assert s.terminated is None


def test_grpctunnel_unsupported_revision_refused():
    s = server(GRPCTUNNEL)
    assert s.receive_frame(NewStream(1, METHOD, (), 65536, revision=2)) == []
    assert s.data_to_send() == [
        CloseStream(1, Status(UNAVAILABLE, "server does not support protocol revision 2"))
    ]


def test_window_update_for_finished_stream_ignored():
    c, [sid] = client_with(SESAME)
    c.cancel(sid)
    c.data_to_send()
    c.take_events()
    assert c.receive_frame(WindowUpdate(sid, 1000)) == []
    assert c.data_to_send() == []


def test_stream_writable_after_backlog_drains():
    c, [sid] = client_with(SESAME, send_low_water=20000)
    c.send_message(sid, b"x" * 200000)
    sent = sizes(c.data_to_send())
    assert sum(sent) == 5 * 16256
    assert c.queued_bytes(sid) == 200000 - 5 * 16256
    assert c.take_events() == []
    # a little credit: still above the low-water mark
    c.receive_frame(WindowUpdate(sid, 15746))
    c.data_to_send()
    assert c.take_events() == []
    # enough credit to bring the backlog down to the mark
    events = c.receive_frame(WindowUpdate(sid, 65535 + 2 * 16256))
    c.data_to_send()
    assert c.queued_bytes(sid) <= 20000
    assert events == [StreamWritable(sid)]
    # only once per backlog
    assert c.receive_frame(WindowUpdate(sid, 65535)) == []


# --- 2.5 / 2.7 headers, close, refuse -------------------------------------------------


def test_header_once_before_data_and_close():
    s = opened(SESAME, 1)
    s.send_message(1, b"a")
    s.send_message(1, b"b")
    with pytest.raises(LocalProtocolError, match="headers already sent"):
        s.send_headers(1, (("k", "v"),))
    s.close_stream(1, Status(NOT_FOUND, "nope"), (("t", "1"),))
    assert s.data_to_send() == [
        Headers(1),
        Message(1, 1, b"a"),
        Message(1, 1, b"b"),
        CloseStream(1, Status(NOT_FOUND, "nope"), (("t", "1"),)),
    ]
    assert s.take_events() == [StreamEnded(1, Status(NOT_FOUND, "nope"), (("t", "1"),), True)]


def test_explicit_headers_then_close():
    s = opened(SESAME, 1)
    s.send_headers(1, (("k", "v"),))
    s.close_stream(1)
    assert s.data_to_send() == [Headers(1, (("k", "v"),)), CloseStream(1)]


def test_close_without_anything_sends_empty_header():
    s = opened(GRPCTUNNEL, 1)
    s.close_stream(1)
    assert s.data_to_send() == [Headers(1), CloseStream(1, STATUS_OK)]
    with pytest.raises(StreamClosedError):
        s.send_message(1, b"x")
    with pytest.raises(StreamClosedError):
        s.close_stream(1)


def test_refused_stream_gets_close_only():
    s = opened(SESAME, 1)
    s.refuse_stream(1, Status(12, "/pkg.Svc/Call not implemented"))
    assert s.data_to_send() == [CloseStream(1, Status(12, "/pkg.Svc/Call not implemented"))]
    assert s.take_events() == [
        StreamEnded(1, Status(12, "/pkg.Svc/Call not implemented"), (), True)
    ]
    assert s.receive_frame(Message(1, 1, b"x")) == []


def test_refuse_after_headers_is_local_error():
    s = opened(SESAME, 1)
    s.send_headers(1)
    with pytest.raises(LocalProtocolError):
        s.refuse_stream(1, Status(UNAVAILABLE))


def test_client_receives_headers_once():
    c, [sid] = client_with(SESAME)
    assert c.receive_frame(Headers(sid, (("a", "1"),))) == [HeadersReceived(sid, (("a", "1"),))]
    assert c.receive_frame(Headers(sid, (("a", "2"),))) == []
    events = c.receive_frame(CloseStream(sid, Status(NOT_FOUND, "x"), (("t", "v"),)))
    assert events == [StreamEnded(sid, Status(NOT_FOUND, "x"), (("t", "v"),), False)]
    assert c.data_to_send() == []


def test_close_stream_waits_behind_blocked_data():
    s = opened(SESAME, 1)
    s.send_message(1, b"r" * 100000)
    s.close_stream(1)
    out = s.data_to_send()
    assert sizes(out) == [16256] * 5 and not any(isinstance(f, CloseStream) for f in out)
    assert s.take_events() == [StreamEnded(1, STATUS_OK, (), True)]
    assert not s.is_live(1)
    s.receive_frame(WindowUpdate(1, 65535))
    assert s.data_to_send() == [MessageData(1, b"r" * 16256), MessageData(1, b"r" * 2464),
                                CloseStream(1)]
    assert s.stream_ids() == [] and s._streams == {}


# --- 2.10 half-close and cancel ------------------------------------------------------


def test_half_close_then_messages_ignored():
    s = opened(SESAME, 1)
    assert s.receive_frame(Message(1, 1, b"a")) == [MessageReceived(1, b"a", 258)]
    assert s.receive_frame(HalfClose(1)) == [RequestsEnded(1)]
    assert s.receive_frame(Message(1, 1, b"b")) == []
    assert s.receive_frame(MessageData(1, b"b")) == []
    assert s.receive_frame(HalfClose(1)) == []
    assert s.data_to_send() == []
    assert s.is_live(1)


def test_client_half_close_follows_queued_data():
    c, [sid] = client_with(SESAME)
    c.send_message(sid, b"d" * 100000)
    c.half_close(sid)
    c.half_close(sid)  # idempotent
    out = c.data_to_send()
    assert not any(isinstance(f, HalfClose) for f in out)
    with pytest.raises(StreamClosedError):
        c.send_message(sid, b"more")
    c.receive_frame(WindowUpdate(sid, 65535))
    assert c.data_to_send()[-1] == HalfClose(sid)


def test_half_close_mid_message_is_stream_error():
    s = opened(SESAME, 1)
    s.receive_frame(Message(1, 10, b"abc"))
    events = s.receive_frame(HalfClose(1))
    status = Status(INVALID_ARGUMENT, "half-close in the middle of a request message")
    assert events == [StreamEnded(1, status, (), True)]


@DIALECTS
def test_cancel_on_server(dialect):
    s = opened(dialect, 1)
    s.send_message(1, b"x" * 100000)
    s.data_to_send()
    events = s.receive_frame(Cancel(1))
    status = Status(CANCELLED, "cancelled by client")
    assert events == [StreamEnded(1, status, (), False)]
    assert s.data_to_send() == [CloseStream(1, status)]  # queued data dropped
    assert s._streams == {}


def test_cancel_on_server_before_header_sends_header():
    s = opened(SESAME, 1)
    s.receive_frame(Cancel(1))
    assert s.data_to_send() == [Headers(1), CloseStream(1, Status(CANCELLED, "cancelled by client"))]


def test_cancel_of_kept_stream_forgets_it():
    s = opened(SESAME, 1)
    s.send_message(1, b"x" * 100000)
    s.close_stream(1)
    s.data_to_send()
    s.take_events()
    assert s.receive_frame(Cancel(1)) == []  # already ended: no second StreamEnded
    assert s.data_to_send() == []
    assert s._streams == {}


def test_server_local_cancel():
    s = opened(SESAME, 1)
    s.cancel(1, Status(4, "deadline exceeded"))
    assert s.data_to_send() == [Headers(1), CloseStream(1, Status(4, "deadline exceeded"))]
    assert s.take_events() == [StreamEnded(1, Status(4, "deadline exceeded"), (), True)]
    s.cancel(1)  # ignored
    s.cancel(99)  # ignored
    assert s.data_to_send() == [] and s.take_events() == []


def test_client_cancel_drops_queue():
    c, [sid] = client_with(SESAME)
    c.send_message(sid, b"x" * 100000)
    c.data_to_send()
    c.cancel(sid)
    assert c.data_to_send() == [Cancel(sid)]
    assert c.take_events() == [StreamEnded(sid, Status(CANCELLED, "cancelled"), (), True)]
    with pytest.raises(StreamClosedError):
        c.half_close(sid)


# --- 2.13 drain ----------------------------------------------------------------------


@DIALECTS
def test_graceful_drain(dialect):
    s = opened(dialect, 1, 2)
    s.start_drain()
    assert s.take_events() == []
    assert s.receive_frame(new_stream(dialect, 3)) == []
    assert s.data_to_send() == [CloseStream(3, Status(UNAVAILABLE, "transport is closing"))]
    # existing streams carry on
    assert s.receive_frame(Message(1, 1, b"a")) == [MessageReceived(1, b"a", dialect[0].cost(1))]
    s.close_stream(1)
    assert Drained() not in s.take_events()
    s.close_stream(2)
    assert s.take_events() == [StreamEnded(2, STATUS_OK, (), True), Drained()]
    s.start_drain()
    assert s.take_events() == []


def test_drain_waits_for_queued_close():
    s = opened(SESAME, 1)
    s.start_drain()
    s.send_message(1, b"x" * 100000)
    s.close_stream(1)
    assert Drained() not in s.take_events()
    assert s.receive_frame(WindowUpdate(1, 65535)) == [Drained()]


def test_drain_with_no_streams():
    s = server()
    s.start_drain()
    assert s.take_events() == [Drained()]


def test_client_draining_refuses_open():
    c = client()
    c.start_drain()
    with pytest.raises(TunnelClosedError):
        c.open_stream(METHOD)


# --- terminate -------------------------------------------------------------------------


def test_terminate_ends_every_stream_once():
    s = opened(SESAME, 1, 2, 3)
    s.send_message(3, b"x" * 100000)
    s.close_stream(3)  # ended, close still queued
    s.take_events()
    st = Status(UNAVAILABLE, "gone")
    s.terminate(st, by_peer=True)
    assert s.take_events() == [StreamEnded(1, st), StreamEnded(2, st), TunnelTerminated(st, True)]
    s.terminate(Status(CANCELLED))
    assert s.take_events() == []
    assert s._streams == {}
    assert s.receive_frame(Message(1, 1, b"x")) == []
    with pytest.raises(TunnelClosedError):
        s.send_headers(1)


def test_terminate_client():
    c, sids = client_with(GRPCTUNNEL, 2)
    c.terminate(Status(CANCELLED, "tunnel closed"))
    events = c.take_events()
    assert [e.stream_id for e in ended(events)] == sids
    with pytest.raises(TunnelClosedError):
        c.open_stream(METHOD)


# --- 3.2 grpctunnel settings ----------------------------------------------------------


def test_settings_expected_first():
    c = client(GRPCTUNNEL, expect_settings=True)
    assert c.receive_frame(Settings(-1, (0, 1), 65536)) == [SettingsReceived((0, 1), 65536)]
    assert c.peer_settings == SettingsReceived((0, 1), 65536)
    assert c.terminated is None


@pytest.mark.parametrize(
    "frame", [Headers(1), Settings(1, (0, 1), 65536), Invalid(-1, "no frame set")]
)
def test_settings_missing_is_fatal(frame):
    c = client(GRPCTUNNEL, expect_settings=True)
    c.open_stream(METHOD)
    c.take_events()
    c.receive_frame(frame)
    assert c.terminated == Status(INTERNAL, "protocol error: first frame must be settings")


def test_settings_to_a_stream_fails_that_stream():
    c, [a, b] = client_with(GRPCTUNNEL, 2)
    events = c.receive_frame(Settings(a, (1,), 10))
    assert events == [
        StreamEnded(a, Status(INTERNAL, "settings frame sent to a stream"), (), True)
    ]
    assert c.data_to_send() == [Cancel(a)]
    assert c.is_live(b) and c.terminated is None
    # to a finished stream: an ordinary late frame
    assert c.receive_frame(Settings(a, (1,), 10)) == []
    assert c.terminated is None


def test_settings_after_start_is_fatal():
    c, _ = client_with(GRPCTUNNEL, 1)
    c.receive_frame(Settings(-1, (1,), 10))
    assert c.terminated is not None and c.terminated.code == INTERNAL


# --- misuse ---------------------------------------------------------------------------


def test_role_misuse():
    c, [sid] = client_with(SESAME)
    with pytest.raises(LocalProtocolError):
        c.send_headers(sid)
    with pytest.raises(LocalProtocolError):
        c.close_stream(sid)
    s = opened(SESAME, 1)
    with pytest.raises(LocalProtocolError):
        s.half_close(1)
    with pytest.raises(StreamClosedError):
        s.send_message(7, b"")


def test_client_rejects_server_only_frames():
    c, [sid] = client_with(SESAME)
    events = c.receive_frame(NewStream(sid, METHOD))
    assert ended(events)[0].status.code == INTERNAL
    assert c.data_to_send() == [Cancel(sid)]


def test_server_rejects_client_only_frames():
    s = opened(SESAME, 1)
    events = s.receive_frame(CloseStream(1))
    assert ended(events)[0].status == Status(
        INVALID_ARGUMENT, "unexpected CloseStream frame from client"
    )


def test_custom_policy_cost():
    pol = FlowPolicy("test", min_cost=10)
    assert (pol.cost(0), pol.cost(10), pol.cost(11)) == (10, 10, 11)
    assert GRPCTUNNEL_FLOW.cost(0) == 0 and SESAME_FLOW.cost(0) == 258
    assert not GRPCTUNNEL_REV0.enabled
    assert OK == 0


# --- reassembly credit and slow readers ------------------------------------------------


@DIALECTS
def test_reassembly_credit_held_while_reader_lags(dialect):
    policy = dialect[0]
    s = opened(dialect, 1)
    [first] = s.receive_frame(Message(1, 1, b"a"))  # delivered, not consumed yet
    frames = [Message(1, 40000, b"b" * 16000), MessageData(1, b"b" * 16000)]
    assert s.receive_frames(frames) == []
    assert s.data_to_send() == []  # no credit while a delivered message is unread
    [second] = s.receive_frame(MessageData(1, b"b" * 8000))
    assert second == MessageReceived(1, b"b" * 40000, policy.cost(8000))
    s.consumed(1, first.cost)  # one of two read: only that one is credited
    if policy.byte_exact:  # grpctunnel.v1: credit per consumed frame, at once
        assert s.data_to_send() == [WindowUpdate(1, first.cost)]
        held = 2 * policy.cost(16000) + second.cost
        s.consumed(1, second.cost)  # caught up: the held credit goes back too
        assert s.data_to_send() == [WindowUpdate(1, held)]
    else:  # sesame.type: batched at the threshold
        assert s.data_to_send() == []
        s.consumed(1, second.cost)
        total = first.cost + 2 * policy.cost(16000) + second.cost
        assert s.data_to_send() == [WindowUpdate(1, total)]
    assert s.receive_window(1) == policy.recv_window


def test_slow_reader_pauses_sender_sesame():
    """64 KiB messages, nothing read: the sender stops after about one window."""
    c, [sid] = client_with(SESAME)
    s = opened(SESAME, sid)
    delivered = []
    for _ in range(20):
        c.send_message(sid, b"m" * 65536)
    for _ in range(50):
        frames = c.data_to_send()
        if not frames:
            break
        delivered += s.receive_frames(frames)
        c.receive_frames(s.data_to_send())
    buffered = sum(len(e.data) for e in delivered)
    assert len(delivered) == 1  # the first message, read by nobody
    assert c.send_credit(sid) <= 0
    assert buffered + len(s._streams[sid].asm or b"") <= 65535 + 65536 + 16256
    # reading releases everything held, and the sender resumes
    for ev in delivered:
        s.consumed(sid, ev.cost)
    c.receive_frames(s.data_to_send())
    assert sizes(c.data_to_send())


def test_zero_cost_message_does_not_hold_credit_grpctunnel():
    # Adapters skip consumed() for cost 0; that must not stall a later big message.
    s = opened(GRPCTUNNEL, 1)
    assert s.receive_frame(Message(1, 0, b"")) == [MessageReceived(1, b"", 0)]
    s.receive_frame(Message(1, 100000, b"x" * 16384))
    assert s.data_to_send() == [WindowUpdate(1, 16384)]
