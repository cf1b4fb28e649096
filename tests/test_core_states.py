"""
Plain-call tests of the stream state table (``_TRANSITIONS`` in
:mod:`sesame.core._machine`) and of the flow window
(:class:`sesame.core._window.FlowWindow`).

The table is checked against the spec below, :data:`LEGAL`, and then every legal
pair is driven through a real :class:`TunnelCore`: a stream is brought into the
state by API calls and frames, the input is applied the way it happens in use
(an API call, a frame from the peer, a window update that lets a queued close
out, ``terminate``), and the stream must land in the expected state.  Absent
pairs must be reported as the core always reported them: an API call raises
and leaves the stream alone; a frame from the peer ends the stream and tells
the peer.  No I/O, no clock, no sleeps.
"""

from __future__ import annotations

import pytest

from sesame.core._frames import (
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    STATUS_OK,
    UNAVAILABLE,
    Cancel,
    CloseStream,
    HalfClose,
    Headers,
    LocalProtocolError,
    Message,
    MessageData,
    NewStream,
    Settings,
    Status,
    StreamClosedError,
    TunnelError,
    WindowUpdate,
)
from sesame.core._machine import (
    _TRANSITIONS,
    GRPCTUNNEL_FLOW,
    GRPCTUNNEL_REV0,
    SESAME_FLOW,
    FlowPolicy,
    Role,
    StreamEnded,
    StreamInput,
    StreamState,
    TunnelCore,
)
from sesame.core._window import FlowControlError, FlowWindow

S = StreamState
I = StreamInput  # noqa: E741 - the table's own shorthand
METHOD = "/pkg.Svc/Call"

CLIENT_STATES = (
    S.CLIENT_OPEN, S.CLIENT_OPEN_HEADERS, S.CLIENT_HALF_CLOSED, S.CLIENT_HALF_CLOSED_HEADERS,
)
SERVER_LIVE = (
    S.SERVER_OPEN, S.SERVER_OPEN_HEADERS, S.SERVER_HALF_CLOSED, S.SERVER_HALF_CLOSED_HEADERS,
)

# --- the spec -----------------------------------------------------------------------

#: state -> {input: next state}: every legal pair.  Anything else is an error.
LEGAL: dict[StreamState, dict[StreamInput, StreamState]] = {
    S.IDLE: {
        I.SEND_NEW_STREAM: S.CLIENT_OPEN,
        I.RECV_NEW_STREAM: S.SERVER_OPEN,
    },
    S.CLIENT_OPEN: {
        I.SEND_MESSAGE: S.CLIENT_OPEN,
        I.SEND_HALF_CLOSE: S.CLIENT_HALF_CLOSED,
        I.CANCEL: S.CLOSED,
        I.RECV_HEADERS: S.CLIENT_OPEN_HEADERS,
        I.RECV_MESSAGE: S.CLIENT_OPEN,
        I.RECV_MESSAGE_DATA: S.CLIENT_OPEN,
        I.RECV_CLOSE: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.CLIENT_OPEN,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.CLIENT_OPEN_HEADERS: {
        I.SEND_MESSAGE: S.CLIENT_OPEN_HEADERS,
        I.SEND_HALF_CLOSE: S.CLIENT_HALF_CLOSED_HEADERS,
        I.CANCEL: S.CLOSED,
        I.RECV_HEADERS: S.CLIENT_OPEN_HEADERS,  # a second header is ignored
        I.RECV_MESSAGE: S.CLIENT_OPEN_HEADERS,
        I.RECV_MESSAGE_DATA: S.CLIENT_OPEN_HEADERS,
        I.RECV_CLOSE: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.CLIENT_OPEN_HEADERS,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.CLIENT_HALF_CLOSED: {
        I.SEND_HALF_CLOSE: S.CLIENT_HALF_CLOSED,  # idempotent
        I.CANCEL: S.CLOSED,
        I.RECV_HEADERS: S.CLIENT_HALF_CLOSED_HEADERS,
        I.RECV_MESSAGE: S.CLIENT_HALF_CLOSED,
        I.RECV_MESSAGE_DATA: S.CLIENT_HALF_CLOSED,
        I.RECV_CLOSE: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.CLIENT_HALF_CLOSED,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.CLIENT_HALF_CLOSED_HEADERS: {
        I.SEND_HALF_CLOSE: S.CLIENT_HALF_CLOSED_HEADERS,
        I.CANCEL: S.CLOSED,
        I.RECV_HEADERS: S.CLIENT_HALF_CLOSED_HEADERS,
        I.RECV_MESSAGE: S.CLIENT_HALF_CLOSED_HEADERS,
        I.RECV_MESSAGE_DATA: S.CLIENT_HALF_CLOSED_HEADERS,
        I.RECV_CLOSE: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.CLIENT_HALF_CLOSED_HEADERS,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.SERVER_OPEN: {
        I.SEND_HEADERS: S.SERVER_OPEN_HEADERS,
        I.SEND_MESSAGE: S.SERVER_OPEN_HEADERS,  # an empty header goes first
        I.SEND_CLOSE: S.SERVER_CLOSING,
        I.REFUSE: S.CLOSED,
        I.CANCEL: S.CLOSED,
        I.RECV_MESSAGE: S.SERVER_OPEN,
        I.RECV_MESSAGE_DATA: S.SERVER_OPEN,
        I.RECV_HALF_CLOSE: S.SERVER_HALF_CLOSED,
        I.RECV_CANCEL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.SERVER_OPEN,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.SERVER_OPEN_HEADERS: {
        I.SEND_MESSAGE: S.SERVER_OPEN_HEADERS,
        I.SEND_CLOSE: S.SERVER_CLOSING,
        I.CANCEL: S.CLOSED,
        I.RECV_MESSAGE: S.SERVER_OPEN_HEADERS,
        I.RECV_MESSAGE_DATA: S.SERVER_OPEN_HEADERS,
        I.RECV_HALF_CLOSE: S.SERVER_HALF_CLOSED_HEADERS,
        I.RECV_CANCEL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.SERVER_OPEN_HEADERS,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.SERVER_HALF_CLOSED: {
        I.SEND_HEADERS: S.SERVER_HALF_CLOSED_HEADERS,
        I.SEND_MESSAGE: S.SERVER_HALF_CLOSED_HEADERS,
        I.SEND_CLOSE: S.SERVER_CLOSING,
        I.REFUSE: S.CLOSED,
        I.CANCEL: S.CLOSED,
        I.RECV_MESSAGE: S.SERVER_HALF_CLOSED,  # ignored after half-close
        I.RECV_MESSAGE_DATA: S.SERVER_HALF_CLOSED,
        I.RECV_HALF_CLOSE: S.SERVER_HALF_CLOSED,
        I.RECV_CANCEL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.SERVER_HALF_CLOSED,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.SERVER_HALF_CLOSED_HEADERS: {
        I.SEND_MESSAGE: S.SERVER_HALF_CLOSED_HEADERS,
        I.SEND_CLOSE: S.SERVER_CLOSING,
        I.CANCEL: S.CLOSED,
        I.RECV_MESSAGE: S.SERVER_HALF_CLOSED_HEADERS,
        I.RECV_MESSAGE_DATA: S.SERVER_HALF_CLOSED_HEADERS,
        I.RECV_HALF_CLOSE: S.SERVER_HALF_CLOSED_HEADERS,
        I.RECV_CANCEL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.SERVER_HALF_CLOSED_HEADERS,
        I.FAULT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
    S.SERVER_CLOSING: {
        I.CANCEL: S.SERVER_CLOSING,  # already ended: cancel races are normal
        I.RECV_HEADERS: S.SERVER_CLOSING,
        I.RECV_MESSAGE: S.SERVER_CLOSING,
        I.RECV_MESSAGE_DATA: S.SERVER_CLOSING,
        I.RECV_HALF_CLOSE: S.SERVER_CLOSING,
        I.RECV_CLOSE: S.SERVER_CLOSING,
        I.RECV_CANCEL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.SERVER_CLOSING,
        I.CLOSE_SENT: S.CLOSED,
        I.TERMINATE: S.CLOSED,
    },
}

LEGAL_PAIRS = [(st, inp) for st, row in LEGAL.items() for inp in row]

#: Where :func:`apply` leaves a stream when the pair's effect moves it on at
#: once: with nothing queued, a close leaves straight away (``CLOSE_SENT``).
#: ``reach(SERVER_CLOSING)`` shows the close waiting behind data instead.
MOVES_ON = {(st, I.SEND_CLOSE): S.CLOSED for st in SERVER_LIVE}


def pair_id(pair) -> str:
    return f"{pair[0].name}-{pair[1].name}"


# --- driving a real core ------------------------------------------------------------


def reach(state: StreamState, policy: FlowPolicy = SESAME_FLOW) -> tuple[TunnelCore, int]:
    """A core with stream 1 in ``state``, its output and events already taken."""
    if state in CLIENT_STATES:
        core = TunnelCore(Role.CLIENT, policy)
        sid = core.open_stream(METHOD)
        if state in (S.CLIENT_HALF_CLOSED, S.CLIENT_HALF_CLOSED_HEADERS):
            core.half_close(sid)
        if state in (S.CLIENT_OPEN_HEADERS, S.CLIENT_HALF_CLOSED_HEADERS):
            core.receive_frame(Headers(sid))
    else:
        core = TunnelCore(Role.SERVER, policy)
        sid = 1
        core.receive_frame(NewStream(sid, METHOD))
        if state in (S.SERVER_OPEN_HEADERS, S.SERVER_HALF_CLOSED_HEADERS):
            core.send_headers(sid)
        if state in (S.SERVER_HALF_CLOSED, S.SERVER_HALF_CLOSED_HEADERS):
            core.receive_frame(HalfClose(sid))
        if state is S.SERVER_CLOSING:
            core.send_message(sid, b"q" * 200_000)  # more than the window: it waits
            core.close_stream(sid)
    core.data_to_send()
    core.take_events()
    assert core.stream_state(sid) is state
    return core, sid


def apply(core: TunnelCore, sid: int, inp: StreamInput) -> list:
    """Apply ``inp`` to stream ``sid`` the way it happens in use; return the events."""
    events: list = []
    receive = events.extend  # of core.receive_frame(...)
    if inp is I.SEND_MESSAGE:
        core.send_message(sid, b"m")
    elif inp is I.SEND_HEADERS:
        core.send_headers(sid, (("k", "v"),))
    elif inp is I.SEND_HALF_CLOSE:
        core.half_close(sid)
    elif inp is I.SEND_CLOSE:
        core.close_stream(sid)
    elif inp is I.REFUSE:
        core.refuse_stream(sid, Status(UNAVAILABLE, "busy"))
    elif inp is I.CANCEL:
        core.cancel(sid)
    elif inp is I.RECV_NEW_STREAM:
        receive(core.receive_frame(NewStream(sid, METHOD)))
    elif inp is I.RECV_HEADERS:
        receive(core.receive_frame(Headers(sid)))
    elif inp is I.RECV_MESSAGE:
        receive(core.receive_frame(Message(sid, 4, b"data")))
    elif inp is I.RECV_MESSAGE_DATA:
        receive(core.receive_frame(Message(sid, 8, b"data")))  # start one: the rest is due
        receive(core.receive_frame(MessageData(sid, b"more")))
    elif inp is I.RECV_HALF_CLOSE:
        receive(core.receive_frame(HalfClose(sid)))
    elif inp is I.RECV_CANCEL:
        receive(core.receive_frame(Cancel(sid)))
    elif inp is I.RECV_CLOSE:
        receive(core.receive_frame(CloseStream(sid, STATUS_OK)))
    elif inp is I.RECV_WINDOW_UPDATE:
        receive(core.receive_frame(WindowUpdate(sid, 1000)))
    elif inp is I.RECV_SETTINGS:
        receive(core.receive_frame(Settings(sid)))
    elif inp is I.FAULT:
        # a frame the role never receives: an absent pair, hence a fault
        frame = HalfClose(sid) if core.role is Role.CLIENT else Headers(sid)
        receive(core.receive_frame(frame))
    elif inp is I.CLOSE_SENT:
        receive(core.receive_frame(WindowUpdate(sid, 1_000_000)))  # the queued close leaves
    elif inp is I.TERMINATE:
        core.terminate(Status(UNAVAILABLE, "gone"))
    else:  # pragma: no cover
        raise AssertionError(inp)
    return events + core.take_events()


def state_after(core: TunnelCore, sid: int) -> StreamState:
    """The stream's state, CLOSED once it left the table."""
    state = core.stream_state(sid)
    return S.CLOSED if state is None else state


# --- the table ----------------------------------------------------------------------


def test_table_is_the_spec():
    assert {key: nxt for key, (_, nxt) in _TRANSITIONS.items()} == {
        (st, inp): nxt for st, row in LEGAL.items() for inp, nxt in row.items()
    }


def test_no_way_out_of_closed():
    assert not [key for key in _TRANSITIONS if key[0] is S.CLOSED]


@pytest.mark.parametrize(
    "states", [(S.IDLE, *CLIENT_STATES, S.CLOSED), (S.IDLE, *SERVER_LIVE, S.SERVER_CLOSING, S.CLOSED)],
    ids=["client", "server"],
)
def test_each_role_keeps_to_its_states(states):
    for (st, _), (_, nxt) in _TRANSITIONS.items():
        if st in states and st is not S.IDLE:
            assert nxt in states, (st, nxt)


def test_effects_are_callables_or_none():
    for effect, _ in _TRANSITIONS.values():
        assert effect is None or callable(effect)


def test_idle_pairs():
    c = TunnelCore(Role.CLIENT)
    sid = c.open_stream(METHOD)
    assert c.stream_state(sid) is S.CLIENT_OPEN
    s = TunnelCore(Role.SERVER)
    s.receive_frame(NewStream(1, METHOD))
    assert s.stream_state(1) is S.SERVER_OPEN


@pytest.mark.parametrize(
    "pair", [p for p in LEGAL_PAIRS if p[0] is not S.IDLE], ids=pair_id
)
def test_legal_pair_reaches_expected_state(pair):
    state, inp = pair
    core, sid = reach(state)
    events = apply(core, sid, inp)  # must not raise
    expected = MOVES_ON.get(pair, LEGAL[state][inp])
    assert state_after(core, sid) is expected
    ended = [e for e in events if isinstance(e, StreamEnded)]
    # StreamEnded exactly when the stream leaves the live states, never again
    was_live = state not in (S.SERVER_CLOSING, S.CLOSED)
    now_live = expected not in (S.SERVER_CLOSING, S.CLOSED)
    assert len(ended) == (1 if was_live and not now_live else 0)


@pytest.mark.parametrize("state", [*CLIENT_STATES, *SERVER_LIVE], ids=lambda s: s.name)
def test_stream_of_grpctunnel_dialect_walks_the_same_table(state):
    core, sid = reach(state, GRPCTUNNEL_FLOW)
    apply(core, sid, I.RECV_WINDOW_UPDATE)
    assert core.stream_state(sid) is state
    apply(core, sid, I.CANCEL)
    assert core.stream_state(sid) is None


# --- absent pairs: API calls raise and change nothing ---------------------------------


ILLEGAL_CALLS = [
    *[(st, I.SEND_MESSAGE, StreamClosedError, "stream closed for sending")
      for st in (S.CLIENT_HALF_CLOSED, S.CLIENT_HALF_CLOSED_HEADERS)],
    *[(st, I.SEND_HEADERS, LocalProtocolError, "headers already sent")
      for st in (S.SERVER_OPEN_HEADERS, S.SERVER_HALF_CLOSED_HEADERS)],
    *[(st, I.REFUSE, LocalProtocolError, "stream already answered")
      for st in (*CLIENT_STATES, S.SERVER_OPEN_HEADERS, S.SERVER_HALF_CLOSED_HEADERS)],
]


@pytest.mark.parametrize(
    ("state", "inp", "error", "message"), ILLEGAL_CALLS,
    ids=[pair_id(case) for case in ILLEGAL_CALLS],
)
def test_absent_pair_for_api_call_raises(state, inp, error, message):
    assert inp not in LEGAL[state]
    core, sid = reach(state)
    with pytest.raises(error) as info:
        apply(core, sid, inp)
    assert type(info.value) is error and str(info.value) == message
    assert core.stream_state(sid) is state
    assert core.data_to_send() == [] and core.take_events() == []


@pytest.mark.parametrize(
    "inp", [I.SEND_MESSAGE, I.SEND_HEADERS, I.SEND_CLOSE, I.REFUSE], ids=lambda i: i.name
)
def test_api_calls_on_a_closing_stream_say_it_is_not_open(inp):
    core, sid = reach(S.SERVER_CLOSING)
    with pytest.raises(StreamClosedError, match="stream 1 is not open"):
        apply(core, sid, inp)
    assert core.stream_state(sid) is S.SERVER_CLOSING


# --- absent pairs: peer frames fault the stream ---------------------------------------


ILLEGAL_FRAMES = [
    *[(st, inp, INTERNAL, f"unexpected {name} frame from server")
      for st in CLIENT_STATES
      for inp, name in ((I.RECV_NEW_STREAM, "NewStream"), (I.RECV_HALF_CLOSE, "HalfClose"),
                        (I.RECV_CANCEL, "Cancel"))],
    *[(st, I.RECV_SETTINGS, INTERNAL, "settings frame sent to a stream")
      for st in (*CLIENT_STATES, *SERVER_LIVE)],
    *[(st, inp, INVALID_ARGUMENT, f"unexpected {name} frame from client")
      for st in SERVER_LIVE
      for inp, name in ((I.RECV_HEADERS, "Headers"), (I.RECV_CLOSE, "CloseStream"))],
]


@pytest.mark.parametrize(
    ("state", "inp", "code", "message"), ILLEGAL_FRAMES,
    ids=[pair_id(case) for case in ILLEGAL_FRAMES],
)
def test_absent_pair_for_peer_frame_faults_the_stream(state, inp, code, message):
    assert inp not in LEGAL[state]
    core, sid = reach(state)
    events = apply(core, sid, inp)
    status = Status(code, message)
    assert events == [StreamEnded(sid, status, (), True)]
    if core.role is Role.CLIENT:
        expected = [Cancel(sid)]
    elif state in (S.SERVER_OPEN, S.SERVER_HALF_CLOSED):
        expected = [Headers(sid), CloseStream(sid, status)]  # the one header comes first
    else:
        expected = [CloseStream(sid, status)]
    assert core.data_to_send() == expected
    assert core.stream_state(sid) is None
    assert core.terminated is None  # a stream fault, not a tunnel one


def test_fault_inside_an_effect_ends_in_closed():
    # (SERVER_OPEN, RECV_HALF_CLOSE) is legal, but not in the middle of a message
    core, sid = reach(S.SERVER_OPEN)
    core.receive_frame(Message(sid, 10, b"abc"))
    events = core.receive_frame(HalfClose(sid))
    status = Status(INVALID_ARGUMENT, "half-close in the middle of a request message")
    assert events == [StreamEnded(sid, status, (), True)]
    assert core.stream_state(sid) is None


def test_window_overrun_is_a_fault_with_the_window_error():
    core, sid = reach(S.SERVER_OPEN, GRPCTUNNEL_FLOW)
    events = core.receive_frame(Message(sid, 70_000, b"x" * 65_537))
    status = Status(RESOURCE_EXHAUSTED, "flow control window exceeded")
    assert events == [StreamEnded(sid, status, (), True)]
    assert core.data_to_send()[-1] == CloseStream(sid, status)


# --- the window -----------------------------------------------------------------------


def test_window_starts_from_the_policy():
    w = FlowWindow(SESAME_FLOW)
    assert (w.credit, w.granted, w.taken, w.available) == (65535, 65535, 0, 65535)
    assert w.policy is SESAME_FLOW
    assert FlowWindow(GRPCTUNNEL_FLOW, send_credit=10).credit == 10


def test_charge_sesame_counts_frames_and_goes_while_positive():
    w = FlowWindow(SESAME_FLOW)
    assert w.charge(16256, 100_000) == 16256
    assert w.credit == 65535 - 16256
    assert w.charge(10, 10) == 10 and w.credit == 65535 - 16256 - 258  # min cost
    w.credit = 1
    assert w.charge(16256, 100_000) == 16256  # credit was positive: one may overshoot
    assert w.credit == 1 - 16256
    assert w.charge(1, 1) == -1  # now blocked
    assert w.credit == 1 - 16256  # and nothing was charged


def test_charge_byte_exact_never_exceeds_credit():
    w = FlowWindow(GRPCTUNNEL_FLOW, send_credit=100)
    assert w.charge(16384, 50_000) == 100
    assert w.credit == 0
    assert w.charge(16384, 50_000) == -1
    assert w.charge(0, 0) == 0  # an empty message needs no credit
    assert w.credit == 0


def test_charge_disabled_is_unlimited():
    w = FlowWindow(GRPCTUNNEL_REV0)
    w.credit = 0
    assert w.charge(16384, 10**9) == 16384
    assert w.credit == 0


def test_add_credit():
    w = FlowWindow(SESAME_FLOW)
    w.credit = -500
    assert w.add_credit(0) is False and w.add_credit(-7) is False
    assert w.credit == -500
    assert w.add_credit(400) is False  # applied, still not positive
    assert w.credit == -100
    assert w.add_credit(101) is True and w.credit == 1
    off = FlowWindow(GRPCTUNNEL_REV0)
    assert off.add_credit(1000) is False and off.credit == GRPCTUNNEL_REV0.send_window


def test_receive_sesame_overflow_only_once_credit_is_spent():
    w = FlowWindow(SESAME_FLOW)
    for _ in range(254):
        assert w.receive(1) == 258
    assert w.available == 65535 - 254 * 258 == 3
    assert w.receive(16256) == 16256  # credit remained before it
    with pytest.raises(FlowControlError) as info:
        w.receive(1)
    assert info.value.code == RESOURCE_EXHAUSTED
    assert str(info.value) == "flow control window exceeded"
    assert isinstance(info.value, TunnelError)
    assert w.taken == 254 * 258 + 16256  # the rejected frame was not charged


def test_receive_byte_exact_overflow():
    w = FlowWindow(GRPCTUNNEL_FLOW)
    assert w.receive(65536) == 65536
    assert w.receive(0) == 0
    with pytest.raises(FlowControlError):
        w.receive(1)
    assert w.available == 0


def test_receive_disabled_never_overflows_and_still_costs():
    w = FlowWindow(GRPCTUNNEL_REV0)
    assert w.receive(10**6) == 10**6
    assert w.taken == 0


def test_big_sender_is_noticed():
    pol = FlowPolicy("sesame.type", send_window=1 << 20, recv_window=1 << 20)
    w = FlowWindow(pol)
    for _ in range(5):
        w.receive(16256)
    assert w.taken == 81280 <= pol.compat_outstanding and not w.big_sender
    w.receive(16256)  # more outstanding than the protocol's default window allows
    assert w.big_sender


def test_release_batches_at_the_threshold():
    w = FlowWindow(SESAME_FLOW)  # threshold 26214
    assert w.release(0) == 0 and w.release(-3) == 0
    assert w.release(26213) == 0 and w.pending == 26213
    assert w.release(1) == 26214
    assert w.pending == 0 and w.granted == 65535 + 26214


def test_release_byte_exact_every_byte():
    w = FlowWindow(GRPCTUNNEL_FLOW)  # threshold 1
    assert w.release(1) == 1
    assert w.granted == 65537


def test_release_discard_drops_the_due_batch():
    w = FlowWindow(GRPCTUNNEL_FLOW)
    assert w.release(500, discard=True) == 0
    assert w.pending == 0 and w.granted == 65536


def test_release_uses_the_compat_threshold_until_the_peer_proves_more():
    pol = FlowPolicy("sesame.type", send_window=1 << 20, recv_window=1 << 20,
                     update_threshold=1 << 19)
    w = FlowWindow(pol)
    assert w.release(pol.compat_threshold) == pol.compat_threshold
    w.big_sender = True
    assert w.release(pol.compat_threshold) == 0  # now the policy's own threshold
    assert w.release((1 << 19) - pol.compat_threshold) == 1 << 19


def test_fragments_are_held_while_the_reader_lags():
    w = FlowWindow(SESAME_FLOW)
    assert w.fragment_received(300) == 300  # reader keeps up: credit at once
    w.message_delivered(258)
    w.message_delivered(0)  # zero-cost messages are not counted
    assert w.unconsumed == 1
    assert w.fragment_received(16256) == 0
    assert w.fragment_received(16256) == 0
    assert w.deferred == 32512
    assert w.message_consumed(258) == 258 + 32512  # caught up: all of it
    assert (w.unconsumed, w.deferred) == (0, 0)
    assert w.message_consumed(0) == 0


def test_consumed_keeps_holding_until_all_are_read():
    w = FlowWindow(SESAME_FLOW)
    w.message_delivered(300)
    w.message_delivered(400)
    w.fragment_received(1000)
    assert w.message_consumed(300) == 300
    assert w.message_consumed(400) == 1400
