"""
The hub: the server remotes register with and clients dial through.

What is in the package (each module says more):

* ``_hub`` — :class:`Hub`: ``TunnelService`` (``Register``, ``Stream``), the reverse
  dialer, sessions of connected remotes and the in-hub ``NetConn``;
* ``_calls`` — calls the hub itself makes through its remotes (front doors, ``Stream``
  tunnels), and ``_target`` — route targets (``host:port@remote``, ``endpoint@remote``);
* ``frontdoor`` and ``_sniff`` — TCP port maps, HTTP ``Host`` virtual hosts, TLS SNI
  passthrough and gRPC ``:authority`` routing;
* ``store`` — hashed tokens, namespaces, remotes, endpoints and routes (SQLite), and
  ``_redisstore`` — the same in Redis, shared by several hubs (``open_store_url``);
* ``mgmt`` (the gRPC management API), ``_rest`` (its JSON REST mapping), ``_http`` (the
  ``--http`` site), ``dashboard``, ``metrics`` and ``tls`` (the generated CA).

Importing ``sesame.hub`` loads none of that: the names below load their module on first
use, so ``sesame token list`` (the store only) never imports grpc, and ``import
sesame.hub.store`` stays as light as the store itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - names for type checkers; loaded lazily below
    from sesame.hub._calls import parse_target as parse_target
    from sesame.hub._http import check_http_endpoint as check_http_endpoint
    from sesame.hub._http import listen_http as listen_http
    from sesame.hub._hub import Hub as Hub
    from sesame.hub._hub import Session as Session
    from sesame.hub._hub import StreamOuter as StreamOuter
    from sesame.hub._hub import unwrap_tunnel as unwrap_tunnel
    from sesame.hub._hub import wrap_tunnel as wrap_tunnel
    from sesame.hub._redisstore import RedisStore as RedisStore
    from sesame.hub._redisstore import check_store_url as check_store_url
    from sesame.hub._redisstore import open_store_url as open_store_url
    from sesame.hub.frontdoor import FORWARDED_MODES as FORWARDED_MODES
    from sesame.hub.frontdoor import FrontDoors as FrontDoors
    from sesame.hub.store import SQLiteStore as SQLiteStore
    from sesame.hub.store import Store as Store
    from sesame.hub.store import StoreError as StoreError
    from sesame.hub.store import StoreUnavailable as StoreUnavailable
    from sesame.hub.store import redact_url as redact_url
    from sesame.hub.store import server_description_problem as server_description_problem
    from sesame.hub.tls import HubTLS as HubTLS
    from sesame.hub.tls import ensure_hub_tls as ensure_hub_tls

_LAZY = {
    "Hub": "_hub",
    "Session": "_hub",
    "StreamOuter": "_hub",
    "unwrap_tunnel": "_hub",
    "wrap_tunnel": "_hub",
    "parse_target": "_calls",
    "check_http_endpoint": "_http",
    "listen_http": "_http",
    "FORWARDED_MODES": "frontdoor",
    "FrontDoors": "frontdoor",
    "SQLiteStore": "store",
    "Store": "store",
    "StoreError": "store",
    "StoreUnavailable": "store",
    "redact_url": "store",
    "RedisStore": "_redisstore",
    "check_store_url": "_redisstore",
    "open_store_url": "_redisstore",
    "server_description_problem": "store",
    "HubTLS": "tls",
    "ensure_hub_tls": "tls",
}

__all__ = ["Hub", "Session", "StreamOuter", "unwrap_tunnel", "wrap_tunnel"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sesame.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sesame.hub.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
