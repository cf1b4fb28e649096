"""
Hypothesis sweeps of the tunnel core: a client core and a server core wired
back to back (in the spirit of h2's tests/test_state_machines.py).

Each example draws a program of random steps: API calls on either side
(open, send of random sizes, half-close, cancel, headers, close with a random
status, refuse, consume, drain, terminate, deliberate misuse), delivery of
some in-flight frames in either direction (so the two directions interleave
arbitrarily), and garbage frames of random kinds, ids and sizes injected into
either side.  Then the harness finishes every call politely and checks:

* nothing escapes the core except :class:`LocalProtocolError` from API calls,
  and ``receive_frame`` never raises;
* senders respect the window, and a receiver's un-credited flow cost never
  exceeds the window (``grpctunnel.v1``, byte-exact) or the window plus one
  frame's cost (``sesame.type``: a sender may go while its credit is positive);
* every stream id opened (client) or requested (server) gets exactly one
  :class:`StreamEnded`, and no other id gets any;
* the server puts exactly one header before data or close on accepted streams;
* once both sides are finished and the links are empty, no stream is left in
  either core's table;
* message bytes arrive whole and in order on streams that ended cleanly.

Streams that garbage frames touched are exempt from the content, wire-order
and leftover checks (the garbage may legitimately be a valid message or a
close), but never from the exactly-once, flow and no-exception ones.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sesame.core._frames import (
    UNAVAILABLE,
    Cancel,
    CloseStream,
    Frame,
    HalfClose,
    Headers,
    Invalid,
    LocalProtocolError,
    Message,
    MessageData,
    NewStream,
    Settings,
    Status,
    WindowUpdate,
)
from sesame.core._machine import (
    GRPCTUNNEL_FLOW,
    SESAME_FLOW,
    Drained,
    FlowPolicy,
    HeadersReceived,
    MessageReceived,
    RequestsEnded,
    Role,
    StreamEnded,
    StreamRequested,
    StreamWritable,
    TunnelCore,
    TunnelTerminated,
)

METHOD = "/pkg.Svc/Call"


class Side:
    """One core plus everything the harness knows about it."""

    def __init__(self, core: TunnelCore) -> None:
        self.core = core
        self.ended: Counter[int] = Counter()
        self.known: set[int] = set()  # opened (client) / requested (server)
        self.received: dict[int, list[bytes]] = defaultdict(list)
        self.sent: dict[int, list[bytes]] = defaultdict(list)
        self.unconsumed: deque[tuple[int, int]] = deque()
        self.requests_ended: set[int] = set()
        self.headers_seen: set[int] = set()
        self.terminated = 0
        self.drained = 0
        # flow bookkeeping, recomputed independently of the core
        self.send_credit: dict[int, int] = {}
        self.recv_cost: Counter[int] = Counter()
        self.granted: Counter[int] = Counter()
        self.max_frame_cost: Counter[int] = Counter()
        # server wire order: None | "requested" | "headers" | "closed"
        self.wire: dict[int, str] = {}


class Harness:
    def __init__(self, policy: FlowPolicy, strict: bool) -> None:
        self.policy = policy
        self.strict = strict
        self.client = Side(TunnelCore(Role.CLIENT, policy, strict_ids=strict))
        self.server = Side(TunnelCore(Role.SERVER, policy, strict_ids=strict))
        self.c2s: deque[Frame] = deque()
        self.s2c: deque[Frame] = deque()
        self.tainted: set[int] = set()
        self.rev0: set[int] = set()
        self.garbage_new: set[int] = set()  # ids a garbage new_stream may have created
        self.refused: set[int] = set()  # server streams the app refused (close, no header)
        self.client_end_status: dict[int, StreamEnded] = {}

    # --- plumbing -----------------------------------------------------------------

    def other(self, side: Side) -> Side:
        return self.server if side is self.client else self.client

    def link_from(self, side: Side) -> deque[Frame]:
        return self.c2s if side is self.client else self.s2c

    def flow_on(self, sid: int) -> bool:
        # Garbage data and window updates are accounted like any other frame;
        # only streams a garbage new_stream may have set up (revision 0, or an
        # arbitrary initial window) are beyond the harness's arithmetic.
        return self.policy.enabled and sid not in self.garbage_new and sid not in self.rev0

    def pump(self, side: Side, events=None) -> None:
        """Record ``side``'s events, move its frames onto the link, check both."""
        core = side.core
        if events is None:
            events = core.take_events()
        events = list(events) + core.take_events()
        for ev in events:
            self.on_event(side, ev)
        for frame in core.data_to_send():
            self.on_sent(side, frame)
            self.link_from(side).append(frame)
        self.propagate_termination()

    def on_event(self, side: Side, ev) -> None:
        if isinstance(ev, StreamEnded):
            if side is self.client:
                self.client_end_status[ev.stream_id] = ev
            side.ended[ev.stream_id] += 1
            assert side.ended[ev.stream_id] == 1, f"second StreamEnded for {ev.stream_id}"
            assert ev.stream_id in side.known, f"StreamEnded for unknown id {ev.stream_id}"
        elif isinstance(ev, StreamRequested):
            assert side is self.server
            assert ev.stream_id not in side.known, f"id {ev.stream_id} requested twice"
            side.known.add(ev.stream_id)
            side.wire[ev.stream_id] = "requested"
        elif isinstance(ev, MessageReceived):
            assert side.core.is_live(ev.stream_id)
            side.received[ev.stream_id].append(ev.data)
            side.unconsumed.append((ev.stream_id, ev.cost))
        elif isinstance(ev, RequestsEnded):
            assert side is self.server and ev.stream_id not in side.requests_ended
            side.requests_ended.add(ev.stream_id)
        elif isinstance(ev, HeadersReceived):
            assert side is self.client and ev.stream_id not in side.headers_seen
            side.headers_seen.add(ev.stream_id)
        elif isinstance(ev, StreamWritable):
            assert side.core.is_live(ev.stream_id)
        elif isinstance(ev, TunnelTerminated):
            side.terminated += 1
            assert side.terminated == 1
        elif isinstance(ev, Drained):
            side.drained += 1
            assert side.drained == 1 and side.core.draining

    def on_sent(self, side: Side, frame: Frame) -> None:
        sid = frame.stream_id
        if isinstance(frame, (Message, MessageData)) and self.flow_on(sid):
            credit = side.send_credit.get(sid, self.policy.send_window)
            n = len(frame.data)
            if self.policy.byte_exact:
                assert n <= credit, f"sent {n} bytes on {sid} with credit {credit}"
            else:
                assert credit > 0, f"sent on {sid} with credit {credit}"
            side.send_credit[sid] = credit - self.policy.cost(n)
        elif isinstance(frame, WindowUpdate):
            assert frame.increment > 0
            side.granted[sid] += frame.increment
        if side is self.server and sid not in self.tainted:
            state = side.wire.get(sid)
            if isinstance(frame, Headers):
                assert state == "requested", f"header on {sid} in state {state}"
                side.wire[sid] = "headers"
            elif isinstance(frame, (Message, MessageData)):
                assert state == "headers", f"data on {sid} in state {state}"
            elif isinstance(frame, CloseStream):
                assert state != "closed", f"second close_stream on {sid}"
                if state == "requested":
                    assert sid in self.refused, f"close_stream without header on {sid}"
                side.wire[sid] = "closed"

    def deliver(self, side: Side, frame: Frame, *, garbage: bool = False) -> None:
        """Feed ``frame`` to ``side`` and check the receive-window bound."""
        core = side.core
        sid = frame.stream_id
        if garbage:
            self.tainted.add(sid)
            if isinstance(frame, NewStream):
                self.garbage_new.add(sid)
        if isinstance(frame, WindowUpdate):
            if core.is_live(sid) or sid in core._streams:
                side.send_credit[sid] = (
                    side.send_credit.get(sid, self.policy.send_window) + frame.increment
                )
        counted = (
            isinstance(frame, (Message, MessageData))
            and core.is_live(sid)
            and sid not in side.requests_ended
        )
        if isinstance(frame, NewStream) and frame.revision == 0:
            self.rev0.add(sid)
        events = core.receive_frame(frame)  # must never raise
        if counted:
            cost = self.policy.cost(len(frame.data))
            side.recv_cost[sid] += cost
            side.max_frame_cost[sid] = max(side.max_frame_cost[sid], cost)
        self.pump(side, events)
        if counted and core.is_live(sid) and self.flow_on(sid):
            outstanding = side.recv_cost[sid] - side.granted[sid]
            window = self.policy.recv_window
            if self.policy.byte_exact:
                assert outstanding <= window, (sid, outstanding)
            else:
                slack = max(side.max_frame_cost[sid], self.policy.cost(self.policy.max_chunk))
                assert outstanding <= window + slack, (sid, outstanding)
                # and strictly: credit remained before the last frame
                assert outstanding - cost < window

    def deliver_some(self, to_server: bool, k: int) -> None:
        link, side = (self.c2s, self.server) if to_server else (self.s2c, self.client)
        for _ in range(k):
            if not link:
                return
            self.deliver(side, link.popleft())

    def propagate_termination(self) -> None:
        for side in (self.client, self.server):
            other = self.other(side)
            if side.core.terminated is not None and other.core.terminated is None:
                # the outer call is gone for both ends
                self.c2s.clear()
                self.s2c.clear()
                other.core.terminate(Status(UNAVAILABLE, "peer went away"), by_peer=True)
                self.pump(other)

    def call(self, side: Side, fn, *args) -> bool:
        try:
            fn(*args)
        except LocalProtocolError:
            self.pump(side)
            return False
        self.pump(side)
        return True

    # --- steps ---------------------------------------------------------------------

    def pick(self, side: Side, idx: int) -> int:
        """A stream id: ``idx >= 0`` picks a live one on ``side`` if any (else
        any id in play); -1 a fresh id, -2 id 0, -3 id -1."""
        ids = sorted(side.known | self.other(side).known) or [1]
        if idx >= 0:
            live = sorted(side.core.stream_ids()) or ids
            return live[idx % len(live)]
        return {-1: max(ids) + 1, -2: 0, -3: -1}.get(idx, max(ids) - idx)

    def step(self, op) -> None:
        c, s = self.client, self.server
        kind = op[0]
        if kind == "open":
            try:
                sid = c.core.open_stream(op[1])
            except LocalProtocolError:
                pass
            else:
                c.known.add(sid)
            self.pump(c)
        elif kind == "send":
            side = c if op[1] else s
            sid = self.pick(side, op[2])
            data = bytes([op[3] % 256]) * op[4]
            if self.call(side, side.core.send_message, sid, data):
                side.sent[sid].append(data)
        elif kind == "half_close":
            self.call(c, c.core.half_close, self.pick(c, op[1]))
        elif kind == "cancel":
            side = c if op[1] else s
            self.call(side, side.core.cancel, self.pick(side, op[2]))
        elif kind == "headers":
            self.call(s, s.core.send_headers, self.pick(s, op[1]), (("h", "v"),))
        elif kind == "close":
            self.call(s, s.core.close_stream, self.pick(s, op[1]), Status(op[2], "x"))
        elif kind == "refuse":
            sid = self.pick(s, op[1])
            self.refused.add(sid)  # before the frames are checked
            if not self.call(s, s.core.refuse_stream, sid, Status(op[2] or 14)):
                self.refused.discard(sid)
        elif kind == "consume":
            side = c if op[1] else s
            for _ in range(op[2]):
                if side.unconsumed:
                    side.core.consumed(*side.unconsumed.popleft())
            self.pump(side)
        elif kind == "deliver":
            self.deliver_some(op[1], op[2])
        elif kind == "drain":
            side = c if op[1] else s
            side.core.start_drain()
            self.pump(side)
        elif kind == "terminate":
            if op[2]:
                return
            side = c if op[1] else s
            side.core.terminate(Status(UNAVAILABLE, "outer call failed"), by_peer=True)
            self.pump(side)
        elif kind == "misuse":
            side = c if op[1] else s
            sid = self.pick(side, op[3])
            core = side.core
            calls = {
                "open": lambda: core.open_stream(METHOD),
                "half_close": lambda: core.half_close(sid),
                "headers": lambda: core.send_headers(sid),
                "close": lambda: core.close_stream(sid),
                "refuse": lambda: core.refuse_stream(sid, Status(14)),
            }
            refused_before = sid in self.refused
            if op[2] == "refuse" and side is s:
                self.refused.add(sid)
            try:
                result = calls[op[2]]()
            except LocalProtocolError:
                if not refused_before:
                    self.refused.discard(sid)
            else:
                if op[2] == "open":
                    side.known.add(result)
            self.pump(side)
        elif kind == "garbage":
            side = c if op[1] else s
            frame = op[2](self.pick(side, op[3]))
            self.deliver(side, frame, garbage=True)
        else:  # pragma: no cover
            raise AssertionError(op)

    # --- the end ---------------------------------------------------------------------

    def settle(self) -> None:
        for _ in range(10000):
            if not (self.c2s or self.s2c or self.client.unconsumed or self.server.unconsumed):
                return
            self.deliver_some(True, len(self.c2s))
            self.deliver_some(False, len(self.s2c))
            for side in (self.client, self.server):
                while side.unconsumed:
                    side.core.consumed(*side.unconsumed.popleft())
                self.pump(side)
        raise AssertionError("links never went quiet")

    def finish(self, abort: bool = False) -> None:
        """End every call politely, or (``abort``) lose the outer call first."""
        c, s = self.client, self.server
        if abort:
            (s if len(self.c2s) % 2 else c).core.terminate(Status(UNAVAILABLE, "lost"), by_peer=True)
            self.pump(c)
            self.pump(s)
        self.settle()
        for sid in c.core.stream_ids():
            c.core.half_close(sid)
        self.pump(c)
        self.settle()
        for sid in s.core.stream_ids():
            s.core.close_stream(sid)
        self.pump(s)
        self.settle()
        self.check_final()

    def check_final(self) -> None:
        c, s = self.client, self.server
        assert not (self.c2s or self.s2c)
        for side in (c, s):
            assert side.core.stream_ids() == []
            assert set(side.ended) == side.known
            assert all(n == 1 for n in side.ended.values())
            left = set(side.core._streams) - self.tainted
            assert not left, f"streams left in the table: {sorted(left)}"
            if side.core.terminated is not None:
                assert side.terminated == 1
        if s.core.draining and s.core.terminated is None and not s.core._streams:
            assert s.drained == 1
        # content: whole messages, in order, where nothing interfered
        for sid in s.requests_ended - self.tainted:
            assert s.received[sid] == c.sent[sid], f"requests of {sid} garbled"
        for sid in c.known - self.tainted:
            end = self.client_end_status[sid]
            if end.status.ok and not end.local:
                assert c.received[sid] == s.sent[sid], f"responses of {sid} garbled"


# --- strategies --------------------------------------------------------------------------

# stream picks: mostly ids in play (index into the sorted known ids), rarely
# a fresh id beyond them (negative values)
idx = st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6), st.integers(-3, -1))
codes = st.integers(0, 16)
sizes = st.one_of(
    st.just(0), st.integers(1, 400), st.integers(1, 400),
    st.integers(16000, 17000), st.integers(60000, 140000),
)
small_data = st.one_of(st.binary(max_size=40), st.integers(0, 70000).map(lambda n: b"g" * n))


def garbage(strict: bool):
    """Functions of a stream id making a random frame of any kind."""
    kinds = [
        st.builds(lambda m, w, r: lambda sid: NewStream(sid, m, (), w, r),
                  st.sampled_from([METHOD, "", "noslash", "x/y"]),
                  st.one_of(st.none(), st.integers(0, 70000)) if strict else st.none(),
                  st.sampled_from([0, 1, 1, 2]) if strict else st.none()),
        st.builds(lambda sz, d: lambda sid: Message(sid, len(d) + sz, d),
                  st.sampled_from([0, 0, 1, 100000, -1]), small_data),
        st.builds(lambda sz, d: lambda sid: Message(sid, sz, d),
                  st.integers(-5, 2**31 - 1), small_data),
        st.builds(lambda d: lambda sid: MessageData(sid, d), small_data),
        st.just(lambda sid: HalfClose(sid)),
        st.just(lambda sid: Cancel(sid)),
        st.builds(lambda n: lambda sid: WindowUpdate(sid, n),
                  st.sampled_from([0, 1, 258, 30000, 2**32 - 1])),
        st.builds(lambda c: lambda sid: CloseStream(sid, Status(c, "g")), codes),
        st.just(lambda sid: Headers(sid, (("g", "1"),))),
        st.builds(lambda w: lambda sid: Settings(sid, (0, 1), w), st.integers(0, 70000)),
        st.just(lambda sid: Settings(-1, (0, 1), 65536)),
        st.just(lambda sid: Invalid(sid, "no frame set")),
    ]
    return st.one_of(kinds)


def garbage_id():
    # mostly ids in play; sometimes a fresh one beyond, 0 or -1 (via pick)
    return st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(-3, -1))


def ops(strict: bool):
    """One step of a program; the repetitions weight the choice."""
    open_ = st.tuples(st.just("open"), st.sampled_from([METHOD] * 6 + ["", "noslash"]))
    send = st.tuples(st.just("send"), st.booleans(), idx, st.integers(0, 255), sizes)
    deliver = st.tuples(st.just("deliver"), st.booleans(), st.integers(1, 12))
    consume = st.tuples(st.just("consume"), st.booleans(), st.integers(1, 5))
    half_close = st.tuples(st.just("half_close"), idx)
    close = st.tuples(st.just("close"), idx, st.sampled_from([0, 0, 0, 1, 5, 13]))
    others = st.one_of(
        st.tuples(st.just("cancel"), st.booleans(), idx),
        st.tuples(st.just("headers"), idx),
        st.tuples(st.just("refuse"), idx, codes),
        st.tuples(st.just("drain"), st.booleans()),
        st.tuples(st.just("misuse"), st.booleans(),
                  st.sampled_from(["open", "half_close", "headers", "close", "refuse"]), idx),
    )
    # the outer call failing: executed for one draw in ten only, so it stays rare
    terminate = st.tuples(st.just("terminate"), st.booleans(), st.integers(0, 9))
    bad = st.tuples(st.just("garbage"), st.booleans(), garbage(strict), garbage_id())
    # st.one_of does not weight repeated branches; sampled_from does.
    weighted = [open_] * 4 + [send] * 12 + [deliver] * 10 + [consume] * 3 + [
        half_close, close, others, others, bad, terminate,
    ]
    return st.sampled_from(range(len(weighted))).flatmap(lambda i: weighted[i])


DIALECTS = {"sesame": (SESAME_FLOW, False), "grpctunnel": (GRPCTUNNEL_FLOW, True)}


def run_program(policy, strict, program, garbage_allowed=True, abort=False) -> Harness:
    h = Harness(policy, strict)
    for op in program:
        if op[0] == "garbage" and not garbage_allowed:
            continue
        h.step(op)
    h.finish(abort)
    return h


# pytest-twisted wraps a hypothesis test's ``inner_test`` on every call, so one
# function object must not be parametrized (the wrappers would nest): each
# dialect gets its own test functions instead.


def _with_garbage(dialect: str):
    policy, strict = DIALECTS[dialect]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def test(data):
        program = data.draw(st.lists(ops(strict), min_size=10, max_size=80), label="program")
        abort = data.draw(st.booleans(), label="abort at the end")
        run_program(policy, strict, program, abort=abort)

    test.__doc__ = f"{dialect}: random API use, interleaving and garbage frames."
    return test


def _clean(dialect: str):
    policy, strict = DIALECTS[dialect]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def test(data):
        program = data.draw(st.lists(ops(strict), min_size=10, max_size=80), label="program")
        h = run_program(policy, strict, program, garbage_allowed=False)
        assert not h.tainted
        assert h.client.core._streams == {} and h.server.core._streams == {}

    test.__doc__ = f"{dialect}: without garbage, bytes arrive intact and the tables empty."
    return test


def _round_trip(dialect: str):
    policy, strict = DIALECTS[dialect]

    @settings(max_examples=40, deadline=None)
    @given(sizes=st.lists(sizes, min_size=1, max_size=6), consume_late=st.booleans())
    def test(sizes, consume_late):
        h = Harness(policy, strict)
        c, s = h.client, h.server
        sid = c.core.open_stream(METHOD)
        c.known.add(sid)
        h.pump(c)
        for i, n in enumerate(sizes):
            data = bytes([i % 256]) * n
            c.core.send_message(sid, data)
            c.sent[sid].append(data)
            h.pump(c)
            if not consume_late:
                h.settle()
        c.core.half_close(sid)
        h.pump(c)
        h.settle()
        assert s.received[sid] == c.sent[sid]
        for i, n in enumerate(reversed(sizes)):
            data = bytes([255 - i % 256]) * n
            s.core.send_message(sid, data)
            s.sent[sid].append(data)
            h.pump(s)
        s.core.close_stream(sid)
        h.pump(s)
        h.settle()
        assert c.received[sid] == s.sent[sid]
        assert c.ended[sid] == s.ended[sid] == 1
        assert h.client_end_status[sid].status.ok
        h.check_final()

    test.__doc__ = f"{dialect}: a bidi exchange of random sizes (0 and above the window)."
    return test


test_back_to_back_with_garbage_sesame = _with_garbage("sesame")
test_back_to_back_with_garbage_grpctunnel = _with_garbage("grpctunnel")
test_back_to_back_clean_sesame = _clean("sesame")
test_back_to_back_clean_grpctunnel = _clean("grpctunnel")
test_round_trip_sesame = _round_trip("sesame")
test_round_trip_grpctunnel = _round_trip("grpctunnel")


def _overeager_sender(dialect: str):
    policy, strict = DIALECTS[dialect]

    @settings(max_examples=40, deadline=None)
    @given(
        extra=st.integers(1, 300000),
        # whole messages stay un-credited until consumed: many, some large
        sizes=st.lists(
            st.one_of(st.integers(0, 400), st.integers(0, 400), st.integers(16000, 17000)),
            min_size=1, max_size=300,
        ),
        other_stream=st.booleans(),
    )
    def test(extra, sizes, other_stream):
        h = Harness(policy, strict)
        c, s = h.client, h.server
        sids = [c.core.open_stream(METHOD) for _ in range(1 + other_stream)]
        c.known.update(sids)
        h.pump(c)
        h.deliver_some(True, len(h.c2s))
        sid = sids[0]
        # a bogus credit lets the sender overrun the receiver's window
        h.deliver(c, WindowUpdate(sid, extra), garbage=True)
        for i, n in enumerate(sizes):
            if not c.core.is_live(sid):
                break
            data = bytes([i]) * n
            c.core.send_message(sid, data)
            c.sent[sid].append(data)
            h.pump(c)
            h.deliver_some(True, len(h.c2s))  # the server never consumes
        # (Harness.deliver has checked the receive-window bound frame by frame.)
        if not s.core.is_live(sid):
            assert s.ended[sid] == 1
            assert h.client_end_status.get(sid) is None or not h.client_end_status[sid].status.ok
        if other_stream:
            assert s.core.is_live(sids[1])  # only the offending stream suffers
        h.finish()

    test.__doc__ = f"{dialect}: a sender given bogus credit is stopped at the window."
    return test


test_overeager_sender_sesame = _overeager_sender("sesame")
test_overeager_sender_grpctunnel = _overeager_sender("grpctunnel")
