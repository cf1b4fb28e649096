"""
The helpers that replaced repeated code (issue 9, item 6), each on its own:
:func:`sesame.bridge.grpc_code` (the status-code map of the hub, the REST gateway and the
tunnel channel), :class:`sesame.bridge.Inbox` (the loop's and the reactor's batched
hand-off), and :mod:`sesame.tunnel._served` (what the sync and async served calls share).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from twisted.logger import globalLogPublisher

from sesame.bridge import Inbox, grpc_code, loop_inbox, reactor_inbox
from sesame.core import UNKNOWN
from sesame.tunnel._served import Abort, ServedContext, split_timeout

# --- grpc_code -------------------------------------------------------------------------------


def test_grpc_code_maps_every_number_grpc_knows() -> None:
    for code in grpc.StatusCode:
        assert grpc_code(code.value[0]) is code
        assert grpc_code(code.value[0], grpc.StatusCode.UNAVAILABLE) is code


@pytest.mark.parametrize("number", [-1, 17, 99, 1 << 31])
def test_grpc_code_default_for_other_numbers(number: int) -> None:
    assert grpc_code(number) is grpc.StatusCode.UNKNOWN
    assert grpc_code(number, grpc.StatusCode.UNAVAILABLE) is grpc.StatusCode.UNAVAILABLE


# --- Inbox -----------------------------------------------------------------------------------


class _FakeLoop:
    def __init__(self) -> None:
        self.scheduled: list[Any] = []
        self.errors: list[dict] = []
        self.closed = False

    def call_soon_threadsafe(self, fn: Any) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.scheduled.append(fn)

    def call_exception_handler(self, context: dict) -> None:
        self.errors.append(context)

    def run(self) -> None:
        todo, self.scheduled = self.scheduled, []
        for fn in todo:
            fn()


class _FakeReactor:
    def __init__(self) -> None:
        self.scheduled: list[Any] = []

    def callFromThread(self, fn: Any, *args: Any) -> None:
        self.scheduled.append((fn, args))

    def run(self) -> None:
        todo, self.scheduled = self.scheduled, []
        for fn, args in todo:
            fn(*args)


def _make(kind: str) -> tuple[Inbox, Any]:
    side = _FakeLoop() if kind == "loop" else _FakeReactor()
    return (loop_inbox(side) if kind == "loop" else reactor_inbox(side)), side


@pytest.mark.parametrize("kind", ["loop", "reactor"])
def test_one_wake_up_drains_a_batch_in_order(kind: str) -> None:
    inbox, side = _make(kind)
    got: list[Any] = []
    for i in range(5):
        inbox.post(got.append, i)
    assert len(side.scheduled) == 1  # the pending flag stopped four more wake-ups
    side.run()
    assert got == [0, 1, 2, 3, 4]
    inbox.post(got.append, 5)  # drained: the next post wakes the other side again
    assert len(side.scheduled) == 1
    side.run()
    assert got[-1] == 5


@pytest.mark.parametrize("kind", ["loop", "reactor"])
def test_a_post_during_the_drain_schedules_another(kind: str) -> None:
    inbox, side = _make(kind)
    got: list[Any] = []
    inbox.post(lambda: inbox.post(got.append, "late"))
    side.run()
    assert got == [] and len(side.scheduled) == 1
    side.run()
    assert got == ["late"]


def test_loop_inbox_reports_failures_to_the_loop_and_runs_the_rest() -> None:
    inbox, loop = _make("loop")
    got: list[int] = []
    boom = ValueError("boom")

    def fail() -> None:
        raise boom

    inbox.post(fail)
    inbox.post(got.append, 1)
    loop.run()
    assert got == [1]
    assert loop.errors == [{"message": "sesame bridge callback failed", "exception": boom}]


def test_loop_inbox_after_the_loop_closed_drops_quietly() -> None:
    inbox, loop = _make("loop")
    loop.closed = True
    inbox.post(print, "never")  # no exception for the poster
    assert loop.scheduled == []


def test_reactor_inbox_logs_failures_and_runs_the_rest() -> None:
    inbox, reactor = _make("reactor")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    got: list[int] = []

    def fail() -> None:
        raise ValueError("boom")

    try:
        inbox.post(fail)
        inbox.post(got.append, 1)
        reactor.run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert got == [1]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_format"] == "reactor hand-off failed"
    assert failures[0]["log_namespace"] == "sesame.bridge._hop"
    assert failures[0]["log_failure"].check(ValueError)


def test_loop_inbox_into_a_real_loop_from_other_threads() -> None:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        inbox = loop_inbox(loop)
        got: list[int] = []
        done = threading.Event()
        posters = [threading.Thread(target=lambda b=b: [inbox.post(got.append, b * 100 + i)
                                                        for i in range(100)]) for b in range(4)]
        for t in posters:
            t.start()
        for t in posters:
            t.join()
        inbox.post(done.set)
        assert done.wait(5)
        assert sorted(got) == sorted(b * 100 + i for b in range(4) for i in range(100))
        for b in range(4):  # each poster's own calls stay in order
            assert [g for g in got if g // 100 == b] == [b * 100 + i for i in range(100)]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


# --- the served-call helpers -------------------------------------------------------------------


def test_split_timeout_without_one() -> None:
    md = (("a", "1"), ("b-bin", b"\0"))
    assert split_timeout(md) == (None, md)
    assert split_timeout(md, earliest=False) == (None, md)


def test_split_timeout_sync_rule_takes_the_earliest_and_every_entry_out() -> None:
    before = time.monotonic()
    deadline, md = split_timeout((("a", "1"), ("grpc-timeout", "9S"), ("grpc-timeout", "2S"),
                                  ("grpc-timeout", "bad"), ("grpc-timeout", b"1S"), ("b", "2")))
    assert before + 2 <= deadline <= time.monotonic() + 2
    assert md == (("a", "1"), ("b", "2"))


def test_split_timeout_async_rule_takes_the_last_and_keeps_binary_entries() -> None:
    before = time.monotonic()
    deadline, md = split_timeout((("a", "1"), ("grpc-timeout", "2S"), ("grpc-timeout", "9S"),
                                  ("grpc-timeout", "bad"), ("grpc-timeout", b"1S")),
                                 earliest=False)
    assert before + 9 <= deadline <= time.monotonic() + 9
    assert md == (("a", "1"), ("grpc-timeout", b"1S"))


def test_split_timeout_malformed_only() -> None:
    assert split_timeout((("grpc-timeout", "1x"),)) == (None, ())
    assert split_timeout((("grpc-timeout", "1x"),), earliest=False) == (None, ())


def _context(deadline: float | None = None) -> ServedContext:
    conn = SimpleNamespace(outer=SimpleNamespace(peer=lambda: "ipv4:127.0.0.1:1"))
    return ServedContext(SimpleNamespace(metadata=(("k", "v"),), deadline=deadline, conn=conn))


def test_served_context_state_and_final_status() -> None:
    ctx = _context()
    assert ctx.invocation_metadata() == (("k", "v"),)
    assert ctx.peer() == "ipv4:127.0.0.1:1"
    assert (ctx.peer_identities(), ctx.peer_identity_key(), ctx.auth_context()) == (None, None, {})
    assert ctx.time_remaining() is None
    assert ctx.final_status()[0].code == 0
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("nope")
    ctx.set_trailing_metadata([("t", "1")])
    assert (ctx.code(), ctx.details(), ctx.trailing_metadata()) == (
        grpc.StatusCode.NOT_FOUND, "nope", (("t", "1"),))
    status, trailers = ctx.final_status()
    assert (status.code, status.message, trailers) == (5, "nope", (("t", "1"),))


def test_served_context_time_remaining() -> None:
    assert 4 < _context(time.monotonic() + 5).time_remaining() <= 5
    assert _context(time.monotonic() - 1).time_remaining() == 0.0


@pytest.mark.parametrize(("code", "want"), [(grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN),
                                            (grpc.StatusCode.ABORTED, grpc.StatusCode.ABORTED)])
def test_served_context_abort(code: grpc.StatusCode, want: grpc.StatusCode) -> None:
    ctx = _context()
    with pytest.raises(Abort, match="why"):
        ctx._abort(code, "why")
    assert (ctx.code(), ctx.details()) == (want, "why")
    assert ctx.final_status()[0].code == (UNKNOWN if want is grpc.StatusCode.UNKNOWN else 10)


def test_both_contexts_are_served_contexts() -> None:
    from sesame.tunnel import TunnelServicerContext
    from sesame.tunnel._aserver import AsyncTunnelContext

    assert issubclass(TunnelServicerContext, ServedContext)
    assert issubclass(TunnelServicerContext, grpc.ServicerContext)
    assert issubclass(AsyncTunnelContext, ServedContext)
    assert not getattr(TunnelServicerContext, "__abstractmethods__", None)
