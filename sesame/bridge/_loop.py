"""
The bridge: the one place that owns threads.

Every ``grpc.aio`` object (outer channels, servers, calls) lives on a single
asyncio event loop.  When Twisted runs on its asyncio reactor that loop is
the reactor's own (no thread hop at all); otherwise the bridge starts one
dedicated daemon thread for it.  Work from other threads enters the loop
through :class:`Inbox`, which batches: many posts cost one wake-up, and the
wake-up drains everything queued (a pending flag stops a second hop).

Thread budget, whatever the number of tunnels, streams or connections:

* 1 bridge loop thread (0 under the asyncio reactor);
* grpcio's own C-core threads (a small fixed set);
* the handler pool for *synchronous* servicers, bounded by ``max_workers``
  (async servicers run on the loop and need none).

Synchronous client code (the ``grpc.Channel`` adapter) runs on the caller's
own threads and blocks only them.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_bridge: Bridge | None = None


class Inbox:
    """Batched hand-off of callables from any thread to one other side (an event loop,
    the reactor).

    ``wake(drain)`` asks the other side, from any thread, to call ``drain()`` soon; it
    runs once per batch (a pending flag stops a second wake-up until the drain has
    begun).  ``failed(exc)`` reports a callable that raised; the rest still run.
    :func:`loop_inbox` and :func:`sesame.bridge._hop.reactor_inbox` make the two there are.
    """

    __slots__ = ("_wake", "_failed", "_items", "_pending", "_lock")

    def __init__(self, wake: Callable[[Callable[[], None]], None],
                 failed: Callable[[BaseException], None]) -> None:
        self._wake = wake
        self._failed = failed
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._pending = False
        self._lock = threading.Lock()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` for the other side (in order); never blocks on it."""
        with self._lock:
            self._items.append((fn, args))
            if self._pending:
                return
            self._pending = True
        self._wake(self._drain)

    def _drain(self) -> None:
        # Clear the flag before draining so a post racing with us schedules
        # another drain instead of being lost.
        with self._lock:
            self._pending = False
            items, self._items = self._items, deque()
        for fn, args in items:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the rest
                self._failed(exc)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None (no exception to catch)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def loop_inbox(loop: asyncio.AbstractEventLoop) -> Inbox:
    """The :class:`Inbox` into ``loop``: woken with ``call_soon_threadsafe`` from other
    threads and plain ``call_soon`` from the loop's own (nothing once the loop is closed),
    failures go to the loop's exception handler."""

    def wake(drain: Callable[[], None]) -> None:
        try:
            if running_loop() is loop:
                loop.call_soon(drain)  # posted from the loop itself: no self-pipe wake-up
            else:
                loop.call_soon_threadsafe(drain)
        except RuntimeError:  # loop closed: the process is shutting down
            pass

    def failed(exc: BaseException) -> None:
        loop.call_exception_handler({"message": "sesame bridge callback failed", "exception": exc})

    return Inbox(wake, failed)


class Bridge:
    """Owner of the gRPC event loop (and, when needed, its thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="sesame-grpc-loop", daemon=True)
            self._thread.start()
            started.wait()
        self.loop = loop
        self.inbox = loop_inbox(loop)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_size = 16

    @property
    def owns_thread(self) -> bool:
        return self._thread is not None

    def in_loop(self) -> bool:
        """True when called on the bridge loop's own thread (inside its running loop)."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for it (never from the loop)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("Bridge.run() would block the gRPC loop; await instead")
        return self.submit(coro).result(timeout)

    def deferred(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Run a coroutine on the loop; a Deferred (fired in the reactor thread) of its result.

        Works from the reactor thread whether or not the reactor *is* this loop
        (Twisted's asyncio reactor), so Twisted services never block on the bridge.
        """
        if self.in_loop():
            from twisted.internet.defer import Deferred

            return Deferred.fromFuture(self.loop.create_task(coro))
        return to_deferred(self.submit(coro))

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the bridge loop: now when already there, else through the
        batched inbox (one wake-up drains every queued call, in order).  Never blocks."""
        if self.in_loop():
            fn(*args)
        else:
            self.inbox.post(fn, *args)

    def handler_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The bounded pool that runs synchronous servicer methods."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._pool_size, thread_name_prefix="sesame-handler"
            )
        return self._pool

    def set_handler_pool_size(self, n: int) -> None:
        """Size the pool of :meth:`handler_pool` (before its first use).

        :raises RuntimeError: when the pool is already running.
        """
        if self._pool is not None:
            raise RuntimeError("the handler pool is already running")
        self._pool_size = n

    def close(self) -> None:
        """Shut the handler pool down and stop the loop thread, if this bridge started one
        (a loop it was given is left to its owner)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def to_deferred(fut: concurrent.futures.Future[T]) -> Any:
    """A Twisted Deferred that fires (in the reactor thread) with ``fut``'s outcome."""
    from twisted.internet import defer, reactor

    d: defer.Deferred[T] = defer.Deferred()

    def done(f: concurrent.futures.Future[T]) -> None:
        def fire() -> None:
            exc = f.exception()
            if exc is not None:
                d.errback(exc)
            else:
                d.callback(f.result())

        reactor.callFromThread(fire)  # type: ignore[attr-defined]

    fut.add_done_callback(done)
    return d


def get_bridge() -> Bridge:
    """The process-wide bridge, created on first use."""
    global _bridge
    with _lock:
        if _bridge is None:
            _bridge = Bridge(_asyncio_reactor_loop())
        return _bridge


def _asyncio_reactor_loop() -> asyncio.AbstractEventLoop | None:
    """The loop of an installed Twisted asyncio reactor, if there is one."""
    import sys

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return None
    loop = getattr(reactor, "_asyncioEventloop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def _shutdown() -> None:
    if _bridge is not None:
        _bridge.close()


atexit.register(_shutdown)
