"""
Hand-offs between the bridge loop and the Twisted reactor.

:func:`reactor_inbox` is the mirror of the bridge's own
(:func:`sesame.bridge._loop.loop_inbox`), the same :class:`~sesame.bridge._loop.Inbox`:
any thread posts callables, one ``callFromThread`` drains everything queued.
When the reactor *is* the bridge loop (Twisted's asyncio reactor) both
directions collapse to scheduling on the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from sesame.bridge._loop import Bridge, Inbox, get_bridge, running_loop

log = Logger()


def reactor_inbox(reactor: Any) -> Inbox:
    """The :class:`~sesame.bridge._loop.Inbox` into ``reactor``: woken with
    ``callFromThread`` (``call_soon`` when the poster already runs on an asyncio reactor's
    loop), failures logged (``reactor hand-off failed``)."""

    loop = getattr(reactor, "_asyncioEventloop", None)  # Twisted's asyncio reactor

    def wake(drain: Callable[[], None]) -> None:
        if loop is not None and running_loop() is loop:
            loop.call_soon(drain)  # already on the reactor's loop: no self-pipe wake-up
        else:
            reactor.callFromThread(drain)

    def failed(exc: BaseException) -> None:
        log.failure("reactor hand-off failed")  # (the Failure of the exception being handled)

    return Inbox(wake, failed)


class Hop:
    """Both directions for one reactor/bridge pair."""

    _by_reactor: dict[int, Hop] = {}

    def __init__(self, reactor: Any, bridge: Bridge) -> None:
        self.reactor = reactor
        self.bridge = bridge
        self._to_reactor = reactor_inbox(reactor)

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

    def same_loop(self) -> bool:
        """Whether the reactor runs on the bridge's own loop (Twisted's asyncio reactor
        sharing it): then the two sides are one thread and a hop is a plain call."""
        return getattr(self.reactor, "_asyncioEventloop", None) is self.bridge.loop

    def to_reactor(self, fn: Callable[..., Any], *args: Any) -> None:
        self._to_reactor.post(fn, *args)
