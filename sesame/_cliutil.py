"""
What the entry points share: the one-line :class:`CLIError`, opening the hub's store
from ``--data-dir`` or ``--store URL``, and the default service registry a demo or agent
serves.

Below :mod:`sesame.cli`, :mod:`sesame.tap` and :mod:`sesame._routecli`, so none of them
needs to import another (they used to, in a cycle).  Importing this module loads no
grpc: ``sesame token list`` stays a small SQLite program (and loads redis-py only for a
``redis://`` store).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sesame.hub.store import Store
    from sesame.tunnel import ServiceRegistry

DEFAULT_DATA_DIR = "./.sesame"
#: Options that name the hub's store, for ``--help`` texts.
STORE_HELP = ("the hub's store as a URL instead of --data-dir: redis://[:PASSWORD@]HOST:PORT/DB, "
              "rediss://... (TLS), sqlite:///PATH/hub.db (env SESAME_STORE)")


class CLIError(Exception):
    """A one-line error for the user."""


def open_store(data_dir: str | None = None, store: str | None = None) -> Store:
    """The hub's store: the one the URL ``store`` names (``redis://``, ``rediss://``,
    ``sqlite:///path``), else the SQLite file ``hub.db`` in ``data_dir``.  Neither given:
    ``$SESAME_STORE``, else ``$SESAME_DATA_DIR``, else ``./.sesame``.

    :raises CLIError: both given; a malformed URL or a store that does not answer (the
        message names the problem, never a password); a ``data_dir`` that does not exist
        (the hub creates it on first start).
    """
    if store and data_dir:
        raise CLIError("give --store or --data-dir, not both")
    if not data_dir:
        store = store or os.environ.get("SESAME_STORE") or None
    if store:
        from sesame.hub import open_store_url
        from sesame.hub.store import InvalidArgument, StoreError, redact_url

        try:
            return open_store_url(store)
        except InvalidArgument as exc:
            raise CLIError(f"--store: {exc.reason}") from None
        except StoreError as exc:
            raise CLIError(f"--store {redact_url(store)}: {exc}") from None
    from sesame.hub.store import SQLiteStore

    data_dir = data_dir or os.environ.get("SESAME_DATA_DIR") or DEFAULT_DATA_DIR
    path = Path(data_dir)
    if not path.is_dir():
        raise CLIError(f"--data-dir: {data_dir} does not exist (start the hub once, or create it)")
    return SQLiteStore(path / "hub.db")


def hub_config_of(args: Any) -> Any:
    """The :class:`sesame.endpoints.HubConfig` of a client command's ``--hub``, ``--ca`` and
    ``--token-file`` (else ``$SESAME_HUB``, ``$SESAME_CA``, ``$SESAME_TOKEN[_FILE]``);
    :class:`CLIError` saying what is wrong."""
    from sesame.endpoints import hub_config

    kw = {"hub": args.hub or ""}
    if args.ca:
        kw["ca"] = args.ca
    if args.token_file:
        kw["tokenFile"] = args.token_file
    try:
        return hub_config(kw)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def default_registry() -> ServiceRegistry:
    """A :class:`~sesame.tunnel.ServiceRegistry` serving ``grpc.health.v1.Health`` (status
    SERVING) and server reflection: what ``sesame demo`` and a bare tunnel host offer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from sesame.tunnel import ServiceRegistry

    reg = ServiceRegistry()
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, reg)
    reg.add_reflection()
    return reg


def stop_reactor(reactor: Any) -> None:
    """``reactor.stop()``, unless the reactor is stopping already (then nothing: a second
    stop is not an error worth a traceback)."""
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def quiet_repeated_stop_signals(reactor: Any) -> None:
    """Make a second SIGTERM or SIGINT during shutdown a log line instead of a
    ``ReactorNotRunning`` traceback.

    Twisted's handlers call ``reactor.stop()`` for every signal; the second one, while
    the hub drains, raises.  Call this once the reactor runs (its handlers are installed
    then); handlers that are not Twisted's (or none) are left alone.
    """
    import signal

    from twisted.logger import Logger

    log = Logger(namespace="sesame")
    stopping: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)
        if getattr(previous, "__self__", None) is not reactor:
            continue

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            if stopping:
                log.info("{signal} again: already shutting down",
                         signal=signal.Signals(num).name)
                return
            stopping.append(True)  # before the reactor gets to it: signals can come in pairs
            previous(num, frame)

        signal.signal(number, handler)
