"""
Hand-offs between the bridge loop and the Twisted reactor.

:class:`ReactorInbox` is the mirror of :class:`sesame.bridge._loop.Inbox`: any
thread posts callables, one ``callFromThread`` drains everything queued.
When the reactor *is* the bridge loop (Twisted's asyncio reactor) both
directions collapse to scheduling on the same loop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from sesame.bridge._loop import Bridge, get_bridge

log = Logger()


class ReactorInbox:
    __slots__ = ("_reactor", "_items", "_pending", "_lock")

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._pending = False
        self._lock = threading.Lock()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._items.append((fn, args))
            if self._pending:
                return
            self._pending = True
        self._reactor.callFromThread(self._drain)

    def _drain(self) -> None:
        with self._lock:
            self._pending = False
            items, self._items = self._items, deque()
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one failure must not drop the rest
                log.failure("reactor hand-off failed")


class Hop:
    """Both directions for one reactor/bridge pair."""

    _by_reactor: dict[int, Hop] = {}

    def __init__(self, reactor: Any, bridge: Bridge) -> None:
        self.reactor = reactor
        self.bridge = bridge
        self._to_reactor = ReactorInbox(reactor)

    @classmethod
    def get(cls, reactor: Any = None, bridge: Bridge | None = None) -> Hop:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        bridge = bridge or get_bridge()
        hop = cls._by_reactor.get(id(reactor))
        if hop is None or hop.bridge is not bridge:
            hop = cls._by_reactor[id(reactor)] = Hop(reactor, bridge)
        return hop

    def to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        self.bridge.inbox.post(fn, *args)

    def to_reactor(self, fn: Callable[..., Any], *args: Any) -> None:
        self._to_reactor.post(fn, *args)
