"""
An in-process sesame hub for your own tests: real grpcio, real sockets on
127.0.0.1 with ephemeral ports, a freshly generated private CA and hub
certificate, and an SQLite token store in a temporary directory.

pytest (with pytest-twisted)::

    # conftest.py
    from sesame.testing.hub import sesame_hub  # noqa: F401  (the fixture)

    # test_app.py
    import pytest_twisted
    from twisted.internet import endpoints, reactor

    @pytest_twisted.ensureDeferred
    async def test_through_the_hub(sesame_hub):
        await sesame_hub.start_remote("edge-1", allow=["127.0.0.1:*"])
        ep = endpoints.clientFromString(
            reactor, "sesame:remote=edge-1:host=127.0.0.1:port=8080:"
            + sesame_hub.endpoint_kwargs(sesame_hub.client_token()))
        ...

trial::

    from twisted.trial import unittest
    from sesame.testing.hub import HubTestMixin

    class AppTests(HubTestMixin, unittest.TestCase):
        async def test_it(self):
            await self.sesame_hub.start_remote("edge-1", allow=["127.0.0.1:*"])
            ...

Everything that waits returns a Deferred (``await`` it in ``async def``
tests, ``yield`` it under ``inlineCallbacks``), so the helpers work under any
reactor, including the asyncio reactor where the gRPC loop *is* the reactor's
loop.  See docs/TESTING.md for a complete example.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer

from sesame import _names as N
from sesame.bridge import Bridge, get_bridge, to_deferred
from sesame.endpoints import HubConfig
from sesame.hub import Hub
from sesame.hub.store import SQLiteStore
from sesame.hub.tls import HubTLS, ensure_hub_tls
from sesame.remote import RemoteSession, agent_offers
from sesame.tunnel import ServiceRegistry

__all__ = ["HubFixture", "HubTestMixin", "RemoteRefused", "escape"]

DEFAULT_TIMEOUT = 10.0


class RemoteRefused(Exception):
    """The hub refused a remote :meth:`HubFixture.start_remote` started (bad token, ...)."""


def escape(value: str) -> str:
    """Escape ``value`` for use inside a Twisted endpoint string (``\\``, ``:``, ``=``)."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class HubFixture:
    """
    One in-process hub listening on ``127.0.0.1`` (an ephemeral port), with TLS
    from a private CA generated in ``data_dir`` and an :class:`SQLiteStore`
    (``data_dir/hub.db``).

    :param data_dir: where the CA, certificates and store go; a new temporary
        directory (removed by :meth:`stop`) when omitted.
    :param bridge: the gRPC bridge; the process-wide one by default.

    Attributes once :meth:`start` has fired: ``hub`` (the :class:`~sesame.hub.Hub`),
    ``port``, ``target`` (``127.0.0.1:PORT``), ``tls`` (a :class:`HubTLS`;
    ``tls.ca_path`` is the CA file clients trust), ``store``.
    """

    host = "127.0.0.1"

    def __init__(self, data_dir: str | Path | None = None, *, bridge: Bridge | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(
            tempfile.mkdtemp(prefix="sesame-hub-"))
        self.bridge = bridge or get_bridge()
        self.store: SQLiteStore | None = None
        self.tls: HubTLS | None = None
        self.hub: Hub | None = None
        self.port: int | None = None
        self.remotes: list[RemoteSession] = []
        self._remote_tokens: dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Create TLS material and the store, then listen. Fires with ``self``."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tls = ensure_hub_tls(self.data_dir, [self.host])
        self.store = SQLiteStore(self.data_dir / "hub.db")
        return self._listen(0)

    def _listen(self, port: int) -> defer.Deferred:
        assert self.store is not None and self.tls is not None
        hub = Hub(self.store, bridge=self.bridge)
        creds = self.tls.server_credentials()

        def started(bound: int) -> HubFixture:
            self.hub, self.port = hub, bound
            return self

        d = to_deferred(self.bridge.submit(hub.start(self.host, port, creds)))
        return d.addCallback(started)

    def stop_hub(self, grace: float | None = None) -> defer.Deferred:
        """Stop serving (like a crashed hub when ``grace`` is None: calls end at once).

        Remotes stay up and keep trying to reconnect; :meth:`restart_hub` brings
        a new hub back on the same port.
        """
        hub, self.hub = self.hub, None
        if hub is None:
            return defer.succeed(None)
        return to_deferred(self.bridge.submit(hub.stop(grace)))

    def restart_hub(self, grace: float | None = None) -> defer.Deferred:
        """Stop the hub and start a new one on the same port, store and TLS. Fires with self."""
        assert self.port is not None, "start() first"
        port = self.port
        d = self.stop_hub(grace)
        d.addCallback(lambda _: self._listen(port))
        return d

    async def _astop(self) -> None:
        from sesame import endpoints

        remotes, self.remotes = self.remotes, []
        for r in remotes:
            try:
                await r.astop()
            except Exception:  # noqa: BLE001 - best effort teardown
                pass
        hub, self.hub = self.hub, None
        if hub is not None:
            await hub.stop(None)
        # Client endpoints share one channel per hub; close the ones for this hub.
        await endpoints.close_hub_channels(self.target)

    def stop(self) -> defer.Deferred:
        """Stop the remotes started here and the hub; remove a temporary data dir."""
        target = self.target if self.port is not None else None
        d = to_deferred(self.bridge.submit(self._astop())) if target else defer.succeed(None)

        def cleanup(result: Any) -> Any:
            if self.store is not None:
                self.store.close()
                self.store = None
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            return result

        return d.addBoth(cleanup)

    # --- where and how ---------------------------------------------------------------

    @property
    def target(self) -> str:
        """The hub's gRPC address, ``127.0.0.1:PORT``."""
        assert self.port is not None, "start() first"
        return N.join_host_port(self.host, self.port)

    @property
    def ca_path(self) -> Path:
        assert self.tls is not None, "start() first"
        return self.tls.ca_path

    def remote_token(self, name: str, namespace: str = "default") -> str:
        """A new token allowed to register remote ``name``."""
        assert self.store is not None, "start() first"
        if namespace != "default":
            self.store.create_namespace(namespace, exist_ok=True)
        return self.store.create_token("remote", remote=name, namespace=namespace)[1]

    def client_token(self, pattern: str | None = None, namespace: str = "default") -> str:
        """A new client token reaching the remotes ``pattern`` matches (all when None)."""
        assert self.store is not None, "start() first"
        if namespace != "default":
            self.store.create_namespace(namespace, exist_ok=True)
        return self.store.create_token("client", pattern=pattern, namespace=namespace)[1]

    def revoke(self, token: str) -> bool:
        """Revoke ``token``: the hub refuses it from now on and ends the sessions and
        connections that live on it within about a second."""
        assert self.store is not None, "start() first"
        return self.store.revoke(token)

    def hub_config(self, token: str) -> HubConfig:
        """A :class:`~sesame.endpoints.HubConfig` for this hub with ``token``."""
        assert self.tls is not None, "start() first"
        return HubConfig(self.target, token, self.tls.ca_pem, True)

    def endpoint_kwargs(self, token: str) -> str:
        """``hub=...:ca=...:token=...`` (escaped) to append to a ``sesame:`` string."""
        return ":".join(f"{k}={escape(v)}" for k, v in (
            ("hub", self.target), ("ca", str(self.ca_path)), ("token", token)))

    def env(self, token: str) -> dict[str, str]:
        """The same as environment variables (``SESAME_HUB``, ``SESAME_CA``, ``SESAME_TOKEN``),
        for subprocesses such as ``twistd`` or the ``sesame`` CLI."""
        return {"SESAME_HUB": self.target, "SESAME_CA": str(self.ca_path), "SESAME_TOKEN": token}

    # --- remotes ---------------------------------------------------------------------

    def start_remote(
        self,
        name: str,
        allow: Sequence[str] = (),
        *,
        offers: Mapping[str, ServiceRegistry] | None = None,
        token: str | None = None,
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        reflection: bool = True,
    ) -> defer.Deferred:
        """
        Start a remote agent session registering ``name`` and serving NetConn
        behind ``allow`` (``HOST:PORTS`` patterns, default deny) — or
        ``offers`` instead (with gRPC reflection for them unless ``reflection``
        is false).  Fires with the :class:`RemoteSession` once the hub
        has registered it; fails with :class:`RemoteRefused` if the hub refuses
        it, or :class:`TimeoutError`.  :meth:`stop` stops it.
        """
        if token is None:
            token = self._remote_tokens.get(name)
            if token is None:
                token = self._remote_tokens[name] = self.remote_token(name)
        if offers is None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            offers = agent_offers(list(allow), reactor=reactor, bridge=self.bridge)
        assert self.tls is not None, "start() first"
        session = RemoteSession(self.target, name, token, offers,
                                credentials=self.tls.channel_credentials(self.tls.ca_pem),
                                bridge=self.bridge, reflection=reflection)
        self.remotes.append(session)

        async def go() -> RemoteSession:
            await session.astart()
            await wait_registered(session, timeout)
            return session

        return to_deferred(self.bridge.submit(go()))

    def stop_remote(self, session: RemoteSession) -> defer.Deferred:
        """Stop one remote session (the hub unregisters it)."""
        if session in self.remotes:
            self.remotes.remove(session)
        return to_deferred(self.bridge.submit(session.astop()))

    # --- observing the hub -----------------------------------------------------------

    def routed(self, remote: str, endpoint: str = N.NETCONN_ENDPOINT) -> bool:
        """Whether the hub currently routes ``endpoint`` of ``remote`` to a live session.

        Reads hub state: call it from :meth:`wait_for` predicates (which run on
        the gRPC loop), or after the hub has settled.
        """
        if self.hub is None:
            return False
        ns, name = N.parse_remote(remote)
        session = self.hub.routes.get((ns, name, endpoint))
        return session is not None and not session.closed

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT,
                 what: str = "condition") -> defer.Deferred:
        """
        Fire once ``predicate()`` holds, checked on the gRPC loop (where hub and
        remote state change) every few milliseconds; fail with
        :class:`TimeoutError` after ``timeout`` seconds.  E.g.
        ``await hub.wait_for(lambda: not hub.routed("edge-1", "web"))``.
        """
        async def go() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not predicate():
                if loop.time() >= deadline:
                    raise TimeoutError(f"{what} did not happen within {timeout:g}s")
                await asyncio.sleep(0.005)

        return to_deferred(self.bridge.submit(go()))


async def wait_registered(session: RemoteSession, timeout: float = DEFAULT_TIMEOUT) -> None:
    """(gRPC loop) Wait until ``session`` is registered; RemoteRefused / TimeoutError otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not session.registered.is_set():
        if session.fatal:
            raise RemoteRefused(f"hub refused {session.resource}: {session.fatal}")
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{session.resource} did not register within {timeout:g}s "
                               f"(last error: {session.last_error})")
        try:
            await asyncio.wait_for(session.registered.wait(), min(left, 0.05))
        except TimeoutError:
            pass


class HubTestMixin:
    """
    A :class:`twisted.trial.unittest.TestCase` mixin: ``setUp`` starts a
    :class:`HubFixture` as ``self.sesame_hub`` and registers its
    :meth:`~HubFixture.stop` with ``addCleanup`` (so it runs even when the
    test fails).  Put the mixin first::

        class AppTests(HubTestMixin, unittest.TestCase): ...

    If you override ``setUp``, return (or ``await``/``yield``) the Deferred
    of ``super().setUp()``.
    """

    sesame_hub: HubFixture

    def setUp(self) -> defer.Deferred:
        """Start :attr:`sesame_hub` (after any ``setUp`` of the other bases) and arrange
        for it to stop at cleanup; trial waits on the returned Deferred."""
        base = getattr(super(), "setUp", None)
        d = defer.maybeDeferred(base) if base is not None else defer.succeed(None)
        self.sesame_hub = HubFixture()
        self.addCleanup(self.sesame_hub.stop)  # type: ignore[attr-defined]
        d.addCallback(lambda _: self.sesame_hub.start())
        return d


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is optional
    _pytest = None

if _pytest is not None:

    @_pytest.fixture
    def sesame_hub(tmp_path: Path) -> Iterator[HubFixture]:
        """A started :class:`HubFixture` (needs pytest-twisted); stopped after the test."""
        import pytest_twisted

        fx = HubFixture(tmp_path / "sesame-hub")
        try:
            pytest_twisted.blockon(fx.start())
            yield fx
        finally:
            pytest_twisted.blockon(fx.stop())

    __all__.append("sesame_hub")
