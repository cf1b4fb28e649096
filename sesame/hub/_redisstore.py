"""
:class:`RedisStore`: the hub's :class:`~sesame.hub.store.Store` in a Redis server that
several hubs (and the ``sesame token`` / ``sesame route`` commands) share, and
:func:`open_store_url`, which opens a Redis or SQLite store from a URL.

Same records, same rules and same answers as :class:`~sesame.hub.store.SQLiteStore`
(the test suite runs against both); the validation and token hashing are the base
class's, so the two cannot drift.  Synchronous (redis-py's ``redis.Redis`` with
hiredis): the hub calls it from worker threads (``Store.networked``).

Key schema (``P`` is the ``prefix``, default ``sesame:``; names never hold ``:``)::

    key                              type    holds
    -------------------------------  ------  ---------------------------------------------
    P schema                         string  "1": this layout's version
    P changes                        string  counter, INCR by every mutation (change_marker)
    P bus                            channel every mutation PUBLISHes {"t": "store", "kind":
                                             token|namespace|remote|endpoint|route|secret,
                                             "op": create|update|delete|revoke, "id": ..., "ts":
                                             Redis time}; id: token id, route id, namespace,
                                             "ns/remote", "ns/remote/endpoint", secret name
    P namespaces                     set     namespace names
    P ns:<ns>                        hash    create_time
    P ns:<ns>:remotes                set     remote names of the namespace
    P ns:<ns>:tokens                 set     ids of the namespace's tokens (live and revoked)
    P tokens                         zset    token id -> create_time (list_tokens order)
    P revoked                        zset    token id -> revoke_time (revoked_since)
    P token:<id>                     hash    kind namespace [remote] [pattern] kdf iterations
                                             salt digest create_time [revoke_time]: what
                                             SQLiteStore keeps (PBKDF2 digest, never the secret)
    P remote:<ns>:<name>             hash    display_name description create_time
    P remote:<ns>:<name>:endpoints   set     endpoint names of the remote
    P endpoint:<ns>:<remote>:<name>  hash    display_name description create_time
    P routes                         zset    route id -> created (list_routes order)
    P routes:match                   hash    "<kind> <match>" -> route id (the unique pair)
    P route:<id>                     hash    kind match target created
    P kv:<name>                      string  Store.shared_secret values

``P hub:*``, ``P hubs``, ``P presence:*`` and ``P epoch`` belong to
:mod:`sesame.hub.cluster`.  Times are POSIX seconds from the writer's clock, stored
as Python's shortest round-trip float text, so a value reads back exactly.

Atomicity: every mutation is one Lua script, which Redis runs with nothing in between:
its checks (the namespace exists, the name is free, no remote is left), its writes,
the ``INCR`` of ``P changes`` and the ``PUBLISH`` on ``P bus``.  Two hubs racing to
create one name: one script runs first, the other finds the key and answers
"exists".  Reads are single commands or pipelines; a list read while another hub
deletes skips what vanished in between.  The scripts compute key names from the
prefix, so they need one Redis (or a primary with replicas), not Redis Cluster.

Errors: a connection refused, reset or timing out (and a Redis still loading its
AOF) raise :class:`~sesame.hub.store.StoreUnavailable` ("store unavailable: ...",
never a password); the next call tries again, so a restarted Redis is picked up by
itself.  Nothing is retried behind the caller's back: a write whose answer was lost
may or may not have happened, as with any network store.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sesame.hub.store import (
    DEFAULT_NAMESPACE,
    KDF_ITERATIONS,
    AlreadyExists,
    EndpointRecord,
    InvalidArgument,
    NamespaceRecord,
    NotFound,
    RemoteRecord,
    RouteRecord,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    TokenInfo,
    TokenKind,
    parse_token,
    redact_url,
)

if TYPE_CHECKING:  # pragma: no cover
    import redis

__all__ = [
    "DEFAULT_PREFIX",
    "REDIS_SCHEMA_VERSION",
    "RedisStore",
    "check_store_url",
    "open_store_url",
]

DEFAULT_PREFIX = "sesame:"
#: The key layout's version, in ``P schema``; a store refuses a newer one.
REDIS_SCHEMA_VERSION = 1
#: Seconds to connect, and to wait for an answer, before a call is "store unavailable".
DEFAULT_TIMEOUT = 3.0

_F = TypeVar("_F", bound=Callable[..., Any])

# -- Lua ------------------------------------------------------------------------------
# ARGV[1] is always the prefix.  A script answers {"ok", ...} or {code, field, value}
# with code one of notfound / exists / busy / again (a random id taken: draw again).

_PRELUDE = """
local P = ARGV[1]
local function changed(kind, op, id)
  redis.call('INCR', P .. 'changes')
  local t = redis.call('TIME')
  redis.call('PUBLISH', P .. 'bus', cjson.encode({t = 'store', kind = kind, op = op, id = id,
    ts = tonumber(t[1]) + tonumber(t[2]) / 1000000}))
end
local function need_ns(ns)
  if redis.call('EXISTS', P .. 'ns:' .. ns) == 0 then return {'notfound', 'namespace', ns} end
end
local function need_remote(ns, name)
  local e = need_ns(ns)
  if e then return e end
  if redis.call('EXISTS', P .. 'remote:' .. ns .. ':' .. name) == 0 then
    return {'notfound', 'remote', name}
  end
end
local function need_endpoint(ns, remote, name)
  local e = need_remote(ns, remote)
  if e then return e end
  if redis.call('EXISTS', P .. 'endpoint:' .. ns .. ':' .. remote .. ':' .. name) == 0 then
    return {'notfound', 'endpoint', name}
  end
end
local function create_ns(name, now)
  redis.call('HSET', P .. 'ns:' .. name, 'create_time', now)
  redis.call('SADD', P .. 'namespaces', name)
  changed('namespace', 'create', name)
end
"""

_SCRIPTS: dict[str, str] = {
    # ARGV: P, schema version, default namespace, now
    "init": """
local v = redis.call('GET', P .. 'schema')
if v and tonumber(v) > tonumber(ARGV[2]) then return {'newer', v} end
if not v then redis.call('SET', P .. 'schema', ARGV[2]) end
if redis.call('EXISTS', P .. 'ns:' .. ARGV[3]) == 0 then create_ns(ARGV[3], ARGV[4]) end
return {'ok'}
""",
    # ARGV: P, name, now, exist_ok
    "ns_create": """
local t = redis.call('HGET', P .. 'ns:' .. ARGV[2], 'create_time')
if t then
  if ARGV[4] == '1' then return {'ok', t} end
  return {'exists', 'namespace', ARGV[2]}
end
create_ns(ARGV[2], ARGV[3])
return {'ok', ARGV[3]}
""",
    # ARGV: P, name
    "ns_delete": """
local name = ARGV[2]
local key = P .. 'ns:' .. name
local e = need_ns(name)
if e then return e end
if redis.call('SCARD', key .. ':remotes') > 0 then return {'busy', 'remotes'} end
local ids = redis.call('SMEMBERS', key .. ':tokens')
for _, id in ipairs(ids) do
  local tk = P .. 'token:' .. id
  if redis.call('EXISTS', tk) == 1 and redis.call('HEXISTS', tk, 'revoke_time') == 0 then
    return {'busy', 'live tokens'}
  end
end
for _, id in ipairs(ids) do
  redis.call('DEL', P .. 'token:' .. id)
  redis.call('ZREM', P .. 'tokens', id)
  redis.call('ZREM', P .. 'revoked', id)
end
redis.call('DEL', key, key .. ':tokens', key .. ':remotes')
redis.call('SREM', P .. 'namespaces', name)
changed('namespace', 'delete', name)
return {'ok'}
""",
    # ARGV: P, id, kind, namespace, remote, pattern, kdf, iterations, salt, digest, now
    "token_create": """
local e = need_ns(ARGV[4])
if e then return e end
local key = P .. 'token:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return {'again'} end
redis.call('HSET', key, 'kind', ARGV[3], 'namespace', ARGV[4], 'kdf', ARGV[7],
  'iterations', ARGV[8], 'salt', ARGV[9], 'digest', ARGV[10], 'create_time', ARGV[11])
if ARGV[5] ~= '' then redis.call('HSET', key, 'remote', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', key, 'pattern', ARGV[6]) end
redis.call('ZADD', P .. 'tokens', ARGV[11], ARGV[2])
redis.call('SADD', P .. 'ns:' .. ARGV[4] .. ':tokens', ARGV[2])
changed('token', 'create', ARGV[2])
return {'ok'}
""",
    # ARGV: P, id, now
    "token_revoke": """
local key = P .. 'token:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoke_time') == 1 then
  return {'ok', 0}
end
redis.call('HSET', key, 'revoke_time', ARGV[3])
redis.call('ZADD', P .. 'revoked', ARGV[3], ARGV[2])
changed('token', 'revoke', ARGV[2])
return {'ok', 1}
""",
    # ARGV: P, namespace, name, display_name, description, now
    "remote_create": """
local e = need_ns(ARGV[2])
if e then return e end
local key = P .. 'remote:' .. ARGV[2] .. ':' .. ARGV[3]
if redis.call('EXISTS', key) == 1 then return {'exists', 'remote', ARGV[3]} end
redis.call('HSET', key, 'display_name', ARGV[4], 'description', ARGV[5], 'create_time', ARGV[6])
redis.call('SADD', P .. 'ns:' .. ARGV[2] .. ':remotes', ARGV[3])
changed('remote', 'create', ARGV[2] .. '/' .. ARGV[3])
return {'ok'}
""",
    # ARGV: P, namespace, name, set display_name?, display_name, set description?, description
    "remote_update": """
local e = need_remote(ARGV[2], ARGV[3])
if e then return e end
local key = P .. 'remote:' .. ARGV[2] .. ':' .. ARGV[3]
if ARGV[4] == '1' then redis.call('HSET', key, 'display_name', ARGV[5]) end
if ARGV[6] == '1' then redis.call('HSET', key, 'description', ARGV[7]) end
changed('remote', 'update', ARGV[2] .. '/' .. ARGV[3])
local v = redis.call('HMGET', key, 'display_name', 'description', 'create_time')
return {'ok', v[1], v[2], v[3]}
""",
    # ARGV: P, namespace, name
    "remote_delete": """
local e = need_remote(ARGV[2], ARGV[3])
if e then return e end
local key = P .. 'remote:' .. ARGV[2] .. ':' .. ARGV[3]
for _, ep in ipairs(redis.call('SMEMBERS', key .. ':endpoints')) do
  redis.call('DEL', P .. 'endpoint:' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ep)
end
redis.call('DEL', key, key .. ':endpoints')
redis.call('SREM', P .. 'ns:' .. ARGV[2] .. ':remotes', ARGV[3])
changed('remote', 'delete', ARGV[2] .. '/' .. ARGV[3])
return {'ok'}
""",
    # ARGV: P, namespace, remote, name, display_name, description, now
    "endpoint_create": """
local e = need_remote(ARGV[2], ARGV[3])
if e then return e end
local key = P .. 'endpoint:' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[4]
if redis.call('EXISTS', key) == 1 then return {'exists', 'endpoint', ARGV[4]} end
redis.call('HSET', key, 'display_name', ARGV[5], 'description', ARGV[6], 'create_time', ARGV[7])
redis.call('SADD', P .. 'remote:' .. ARGV[2] .. ':' .. ARGV[3] .. ':endpoints', ARGV[4])
changed('endpoint', 'create', ARGV[2] .. '/' .. ARGV[3] .. '/' .. ARGV[4])
return {'ok'}
""",
    # ARGV: P, namespace, remote, name, set display_name?, display_name, set description?,
    # description
    "endpoint_update": """
local e = need_endpoint(ARGV[2], ARGV[3], ARGV[4])
if e then return e end
local key = P .. 'endpoint:' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[4]
if ARGV[5] == '1' then redis.call('HSET', key, 'display_name', ARGV[6]) end
if ARGV[7] == '1' then redis.call('HSET', key, 'description', ARGV[8]) end
changed('endpoint', 'update', ARGV[2] .. '/' .. ARGV[3] .. '/' .. ARGV[4])
local v = redis.call('HMGET', key, 'display_name', 'description', 'create_time')
return {'ok', v[1], v[2], v[3]}
""",
    # ARGV: P, namespace, remote, name
    "endpoint_delete": """
local e = need_endpoint(ARGV[2], ARGV[3], ARGV[4])
if e then return e end
redis.call('DEL', P .. 'endpoint:' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[4])
redis.call('SREM', P .. 'remote:' .. ARGV[2] .. ':' .. ARGV[3] .. ':endpoints', ARGV[4])
changed('endpoint', 'delete', ARGV[2] .. '/' .. ARGV[3] .. '/' .. ARGV[4])
return {'ok'}
""",
    # ARGV: P, id, kind, match, target, now
    "route_create": """
local pair = ARGV[3] .. ' ' .. ARGV[4]
if redis.call('HEXISTS', P .. 'routes:match', pair) == 1 then return {'exists', 'match', pair} end
local key = P .. 'route:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return {'again'} end
redis.call('HSET', key, 'kind', ARGV[3], 'match', ARGV[4], 'target', ARGV[5], 'created', ARGV[6])
redis.call('ZADD', P .. 'routes', ARGV[6], ARGV[2])
redis.call('HSET', P .. 'routes:match', pair, ARGV[2])
changed('route', 'create', ARGV[2])
return {'ok'}
""",
    # ARGV: P, id
    "route_delete": """
local key = P .. 'route:' .. ARGV[2]
local v = redis.call('HMGET', key, 'kind', 'match')
if not v[1] then return {'notfound', 'route', ARGV[2]} end
redis.call('HDEL', P .. 'routes:match', v[1] .. ' ' .. v[2])
redis.call('DEL', key)
redis.call('ZREM', P .. 'routes', ARGV[2])
changed('route', 'delete', ARGV[2])
return {'ok'}
""",
    # ARGV: P, name, value
    "kv_setnx": """
local key = P .. 'kv:' .. ARGV[2]
local old = redis.call('GET', key)
if old then return {'ok', old} end
redis.call('SET', key, ARGV[3])
changed('secret', 'create', ARGV[2])
return {'ok', ARGV[3]}
""",
}

_TOKEN_FIELDS = ("kind", "namespace", "remote", "pattern", "create_time", "revoke_time",
                 "kdf", "iterations", "salt", "digest")
_TEXT_FIELDS = ("display_name", "description", "create_time")
_ROUTE_FIELDS = ("kind", "match", "target", "created")


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _time(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _num(value: float) -> str:
    """A time as Redis keeps it: Python's shortest text that reads back as the same float."""
    return repr(float(value))


def _guarded(method: _F) -> _F:
    """Redis errors out of ``method`` as store errors: StoreUnavailable when Redis cannot
    answer, StoreError otherwise (never a password in either)."""

    @functools.wraps(method)
    def wrapper(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except self._unavailable as exc:
            raise StoreUnavailable(f"store unavailable: {self._reason(exc)}") from None
        except self._redis_error as exc:
            raise StoreError(f"store error: {self._reason(exc)}") from None

    return wrapper  # type: ignore[return-value]


class RedisStore(Store):
    """:class:`~sesame.hub.store.Store` in Redis (the module docstring has the key
    schema and how each change stays atomic).

    Threads: one ``redis.Redis`` client (a connection pool), safe to call from any
    thread; several hubs and CLI processes may share the server and the prefix.

    :param url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...``
        (TLS; ``?ssl_ca_certs=FILE``, ``ssl_cert_reqs=`` and redis-py's other URL
        options).  Never logged: :attr:`url` is the redacted form.
    :param prefix: the first characters of every key (several deployments can share
        one Redis database with different prefixes); the URL's ``?prefix=`` when this
        is left at the default.
    :param clock: returns the current POSIX time; injected for tests.
    :param kdf_iterations: PBKDF2 rounds for new tokens.
    :param timeout: seconds to connect and to wait for each answer.
    :raises StoreUnavailable: Redis does not answer (also from every method later).
    :raises StoreError: the data under ``prefix`` has a newer layout than this sesame knows.
    """

    networked = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        kdf_iterations: int = KDF_ITERATIONS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
            raise InvalidArgument("prefix", "must be a string without spaces")
        self.url = redact_url(url)
        self.prefix = prefix
        self._clock = clock
        self._iterations = kdf_iterations
        self._secrets = [s for s in (urlsplit(url).password, _url_param(url, "password"),
                                     _url_param(url, "ssl_password")) if s]
        self._secrets += [unquote(s) for s in self._secrets]
        self._unavailable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError, ConnectionError, TimeoutError)
        self._redis_error: tuple[type[BaseException], ...] = (redis.exceptions.RedisError,)
        kind, options = _parse_url(url)
        if kind != "redis":
            raise InvalidArgument("store", f"{self.url} is not a redis:// or rediss:// URL")
        url_prefix = options.pop("prefix", None)
        if url_prefix is not None and prefix == DEFAULT_PREFIX:
            self.prefix = prefix = url_prefix  # the URL's ?prefix= unless one was passed
        self._client_url = urlunsplit(urlsplit(url)._replace(query=urlencode(options)))
        self._timeout = timeout
        try:
            self._redis: redis.Redis | None = redis.Redis.from_url(
                self._client_url,
                socket_connect_timeout=timeout, socket_timeout=timeout,
                retry=Retry(NoBackoff(), 0))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("store", f"{self.url}: {self._reason(exc)}") from None
        self._scripts = {name: self._redis.register_script(_PRELUDE + body)
                         for name, body in _SCRIPTS.items()}
        try:
            self._init()
        except BaseException:
            self.close()
            raise

    # -- plumbing

    @property
    def _r(self) -> redis.Redis:
        if self._redis is None:
            raise StoreError("the store is closed")
        return self._redis

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def async_client(self) -> Any:
        """A ``redis.asyncio.Redis`` on the same server, database and credentials (for
        :mod:`sesame.hub.cluster`: the lease, presence and the bus on the bridge loop)."""
        from sesame.hub.cluster import async_redis

        return async_redis(self._client_url, connect_timeout=self._timeout)

    def _reason(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact_url(text) if "://" in text else text

    def _run(self, script: str, *args: str | bytes | int) -> list[Any]:
        """Run a mutation script; its answer after "ok", or the store error it names."""
        out = self._scripts[script](keys=[], args=[self.prefix, *args], client=self._r)
        code = out[0].decode()
        if code == "ok":
            return out[1:]
        if code == "notfound":
            raise NotFound(out[1].decode(), out[2].decode())
        if code == "exists":
            raise AlreadyExists(out[1].decode(), out[2].decode())
        if code == "again":
            raise _TakenId()
        if code == "busy":
            raise _Busy(out[1].decode())
        raise StoreError(f"unexpected answer from the store: {code}")

    @_guarded
    def _init(self) -> None:
        out = self._scripts["init"](
            keys=[], client=self._r,
            args=[self.prefix, REDIS_SCHEMA_VERSION, DEFAULT_NAMESPACE, _num(self._clock())])
        if out[0] == b"newer":
            raise StoreError(
                f"{self.url} (prefix {self.prefix!r}) has schema version {out[1].decode()}; "
                f"this sesame knows up to {REDIS_SCHEMA_VERSION}. Upgrade sesame.")

    def close(self) -> None:
        """Close the connections; the store is unusable afterwards."""
        client, self._redis = self._redis, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} prefix={self.prefix!r}>"

    # -- tokens

    @_guarded
    def create_token(
        self,
        kind: TokenKind,
        remote: str | None = None,
        pattern: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> tuple[str, str]:
        new = self._token_material(kind, remote, pattern, self._iterations)
        self._check_name("namespace", namespace)
        while True:
            token_id = self._new_token_id()
            try:
                self._run("token_create", token_id, kind, namespace, remote or "",
                          pattern or "", new.kdf, new.iterations, new.salt, new.digest,
                          _num(self._clock()))
            except _TakenId:
                continue
            return token_id, new.text(token_id)

    def _token(self, token_id: str) -> tuple[TokenInfo, str, int, bytes, bytes] | None:
        v = self._r.hmget(self._key("token", token_id), _TOKEN_FIELDS)
        if v[0] is None:
            return None
        kind, ns, remote, pattern, created, revoked, kdf, iterations, salt, digest = v
        info = TokenInfo(token_id, kind.decode(), ns.decode(), _str(remote), _str(pattern),
                         float(created), _time(revoked))
        return info, kdf.decode(), int(iterations), salt, digest

    @_guarded
    def verify(self, token: str) -> TokenInfo | None:
        parsed = parse_token(token)
        if parsed is None:
            return None
        token_id, secret = parsed
        found = self._token(token_id)
        if found is None:
            return None
        info, kdf, iterations, salt, stored = found
        if not self._secret_matches(secret, kdf, iterations, salt, stored):
            return None
        return None if info.revoked else info

    @_guarded
    def revoke(self, token_id_or_token: str) -> bool:
        token_id = self._token_id_of(token_id_or_token)
        if token_id is None:
            return False
        (done,) = self._run("token_revoke", token_id, _num(self._clock()))
        return done == 1

    @_guarded
    def revoked_since(self, when: float) -> list[str]:
        return [i.decode() for i in self._r.zrangebyscore(self._key("revoked"), _num(when), "+inf")]

    @_guarded
    def change_marker(self) -> object:
        return int(self._r.get(self._key("changes")) or 0)

    @_guarded
    def get_token(self, token_id: str) -> TokenInfo:
        found = self._token(token_id) if isinstance(token_id, str) else None
        if found is None:
            raise NotFound("token", token_id)
        return found[0]

    @_guarded
    def list_tokens(self, include_revoked: bool = True) -> list[TokenInfo]:
        ids = [i.decode() for i in self._r.zrange(self._key("tokens"), 0, -1)]
        pipe = self._r.pipeline(transaction=False)
        for token_id in ids:
            pipe.hmget(self._key("token", token_id), _TOKEN_FIELDS[:6])
        out = []
        for token_id, v in zip(ids, pipe.execute(), strict=True):
            if v[0] is None:
                continue  # deleted since the first read
            kind, ns, remote, pattern, created, revoked = v
            out.append(TokenInfo(token_id, kind.decode(), ns.decode(), _str(remote),
                                 _str(pattern), float(created), _time(revoked)))
        out.sort(key=lambda t: (t.create_time, t.id))
        return [t for t in out if include_revoked or not t.revoked]

    # -- namespaces

    @_guarded
    def create_namespace(self, name: str, exist_ok: bool = False) -> NamespaceRecord:
        self._check_name("name", name)
        (created,) = self._run("ns_create", name, _num(self._clock()), int(bool(exist_ok)))
        return NamespaceRecord(name, float(created))

    @_guarded
    def get_namespace(self, name: str) -> NamespaceRecord:
        self._check_name("name", name)
        created = self._r.hget(self._key("ns", name), "create_time")
        if created is None:
            raise NotFound("namespace", name)
        return NamespaceRecord(name, float(created))

    @_guarded
    def list_namespaces(self) -> list[NamespaceRecord]:
        names = sorted(n.decode() for n in self._r.smembers(self._key("namespaces")))
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(self._key("ns", name), "create_time")
        return [NamespaceRecord(name, float(created))
                for name, created in zip(names, pipe.execute(), strict=True)
                if created is not None]

    @_guarded
    def delete_namespace(self, name: str) -> None:
        self._check_name("name", name)
        if name == DEFAULT_NAMESPACE:
            raise InvalidArgument("name", "the default namespace cannot be deleted")
        try:
            self._run("ns_delete", name)
        except _Busy as exc:
            raise InvalidArgument("name", f"namespace {name!r} still has {exc.what}") from None

    # -- remotes

    def _remote_record(self, namespace: str, name: str, v: Sequence[bytes | None]) -> RemoteRecord:
        return RemoteRecord(namespace, name, v[0].decode(), v[1].decode(),  # type: ignore[union-attr]
                            float(v[2]))  # type: ignore[arg-type]

    def _read_remote(self, name: str, namespace: str) -> RemoteRecord:
        self._check_name("name", name)
        self._check_name("namespace", namespace)
        pipe = self._r.pipeline(transaction=False)
        pipe.exists(self._key("ns", namespace))
        pipe.hmget(self._key("remote", namespace, name), _TEXT_FIELDS)
        ns_exists, v = pipe.execute()
        if not ns_exists:
            raise NotFound("namespace", namespace)
        if v[2] is None:
            raise NotFound("remote", name)
        return self._remote_record(namespace, name, v)

    @_guarded
    def create_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> RemoteRecord:
        self._check_name("name", name)
        self._check_texts(display_name, description)
        self._check_name("namespace", namespace)
        now = self._clock()
        self._run("remote_create", namespace, name, display_name, description, _num(now))
        return RemoteRecord(namespace, name, display_name, description, now)

    @_guarded
    def get_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> RemoteRecord:
        return self._read_remote(name, namespace)

    @_guarded
    def list_remotes(self, namespace: str | None = None) -> list[RemoteRecord]:
        if namespace is None:
            namespaces = sorted(n.decode() for n in self._r.smembers(self._key("namespaces")))
        else:
            self._check_name("namespace", namespace)
            if not self._r.exists(self._key("ns", namespace)):
                raise NotFound("namespace", namespace)
            namespaces = [namespace]
        pipe = self._r.pipeline(transaction=False)
        for ns in namespaces:
            pipe.smembers(self._key("ns", ns, "remotes"))
        pairs = sorted((ns, n.decode()) for ns, names in
                       zip(namespaces, pipe.execute(), strict=True) for n in names)
        for ns, name in pairs:
            pipe.hmget(self._key("remote", ns, name), _TEXT_FIELDS)
        return [self._remote_record(ns, name, v)
                for (ns, name), v in zip(pairs, pipe.execute(), strict=True) if v[2] is not None]

    @_guarded
    def update_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> RemoteRecord:
        self._check_texts(display_name, description)
        self._check_name("name", name)
        self._check_name("namespace", namespace)
        v = self._run("remote_update", namespace, name, int(display_name is not None),
                      display_name or "", int(description is not None), description or "")
        return self._remote_record(namespace, name, v)

    @_guarded
    def delete_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._check_name("name", name)
        self._check_name("namespace", namespace)
        self._run("remote_delete", namespace, name)

    # -- endpoints

    def _endpoint_record(
        self, namespace: str, remote: str, name: str, v: Sequence[bytes | None]
    ) -> EndpointRecord:
        return EndpointRecord(namespace, remote, name, v[0].decode(),  # type: ignore[union-attr]
                              v[1].decode(), float(v[2]))  # type: ignore[union-attr, arg-type]

    def _check_endpoint_names(self, remote: str, name: str, namespace: str) -> None:
        self._check_name("name", name)
        self._check_name("name", remote)  # (SQLiteStore names the remote "name" too)
        self._check_name("namespace", namespace)

    @_guarded
    def create_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> EndpointRecord:
        self._check_name("name", name)
        self._check_texts(display_name, description)
        self._check_endpoint_names(remote, name, namespace)
        now = self._clock()
        self._run("endpoint_create", namespace, remote, name, display_name, description,
                  _num(now))
        return EndpointRecord(namespace, remote, name, display_name, description, now)

    @_guarded
    def get_endpoint(
        self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE
    ) -> EndpointRecord:
        self._check_endpoint_names(remote, name, namespace)
        pipe = self._r.pipeline(transaction=False)
        pipe.exists(self._key("ns", namespace))
        pipe.exists(self._key("remote", namespace, remote))
        pipe.hmget(self._key("endpoint", namespace, remote, name), _TEXT_FIELDS)
        ns_exists, remote_exists, v = pipe.execute()
        if not ns_exists:
            raise NotFound("namespace", namespace)
        if not remote_exists:
            raise NotFound("remote", remote)
        if v[2] is None:
            raise NotFound("endpoint", name)
        return self._endpoint_record(namespace, remote, name, v)

    @_guarded
    def list_endpoints(
        self, remote: str, namespace: str = DEFAULT_NAMESPACE
    ) -> list[EndpointRecord]:
        self._read_remote(remote, namespace)
        names = sorted(n.decode() for n in
                       self._r.smembers(self._key("remote", namespace, remote, "endpoints")))
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hmget(self._key("endpoint", namespace, remote, name), _TEXT_FIELDS)
        return [self._endpoint_record(namespace, remote, name, v)
                for name, v in zip(names, pipe.execute(), strict=True) if v[2] is not None]

    @_guarded
    def update_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> EndpointRecord:
        self._check_texts(display_name, description)
        self._check_endpoint_names(remote, name, namespace)
        v = self._run("endpoint_update", namespace, remote, name, int(display_name is not None),
                      display_name or "", int(description is not None), description or "")
        return self._endpoint_record(namespace, remote, name, v)

    @_guarded
    def delete_endpoint(self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._check_endpoint_names(remote, name, namespace)
        self._run("endpoint_delete", namespace, remote, name)

    # -- routes

    @_guarded
    def create_route(self, kind: str, match: str, target: str) -> RouteRecord:
        match = self._route_match(kind, match, target)
        while True:
            route_id = self._new_route_id()
            now = self._clock()
            try:
                self._run("route_create", route_id, kind, match, target, _num(now))
            except _TakenId:
                continue
            return RouteRecord(route_id, kind, match, target, now)

    def _route(self, route_id: str, v: Sequence[bytes | None]) -> RouteRecord:
        kind, match, target, created = v
        return RouteRecord(route_id, kind.decode(), match.decode(),  # type: ignore[union-attr]
                           target.decode(), float(created))  # type: ignore[union-attr, arg-type]

    @_guarded
    def get_route(self, route_id: str) -> RouteRecord:
        v = self._r.hmget(self._key("route", route_id), _ROUTE_FIELDS) \
            if isinstance(route_id, str) else [None]
        if v[0] is None:
            raise NotFound("route", route_id)
        return self._route(route_id, v)

    @_guarded
    def list_routes(self, kind: str | None = None) -> list[RouteRecord]:
        if kind is not None:
            self._check_route_kind(kind)
        ids = [i.decode() for i in self._r.zrange(self._key("routes"), 0, -1)]
        pipe = self._r.pipeline(transaction=False)
        for route_id in ids:
            pipe.hmget(self._key("route", route_id), _ROUTE_FIELDS)
        routes = [self._route(route_id, v) for route_id, v in
                  zip(ids, pipe.execute(), strict=True) if v[0] is not None]
        routes.sort(key=lambda r: (r.created, r.id))
        return [r for r in routes if kind is None or r.kind == kind]

    @_guarded
    def delete_route(self, route_id: str) -> None:
        if not isinstance(route_id, str):
            raise NotFound("route", route_id)
        self._run("route_delete", route_id)

    # -- shared values

    @_guarded
    def shared_secret(self, name: str, factory: Callable[[], bytes]) -> bytes:
        self._check_name("name", name)
        value = self._r.get(self._key("kv", name))
        if value is not None:
            return value
        value = factory()  # before the script: it may be slow (a CA key)
        if not isinstance(value, bytes):
            raise InvalidArgument("factory", f"must return bytes, not {type(value).__name__}")
        (stored,) = self._run("kv_setnx", name, value)
        return stored


class _TakenId(Exception):
    """A freshly drawn random id is taken already: draw another."""


class _Busy(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# -- URLs -----------------------------------------------------------------------------

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Query options of a Redis URL that redis-py understands (plus our ``prefix``).
_REDIS_OPTIONS = frozenset({
    "db", "socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry_on_timeout",
    "max_connections", "health_check_interval", "client_name", "username", "password",
    "protocol", "prefix",
})
_TLS_OPTIONS = frozenset({
    "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_cert_reqs", "ssl_certfile",
    "ssl_keyfile", "ssl_password", "ssl_check_hostname", "ssl_min_version",
    "ssl_validate_ocsp", "ssl_validate_ocsp_stapled",
})


def _url_param(url: str, name: str) -> str | None:
    try:
        return dict(parse_qsl(urlsplit(url).query)).get(name)
    except ValueError:
        return None


def _parse_url(url: str) -> tuple[str, dict[str, str]]:
    """("redis", query options) or ("sqlite", {"path": ...}) for a store URL.

    :raises InvalidArgument: (field ``store``) what is wrong, without the password.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument("store", "empty store URL")
    shown = redact_url(url)
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:").removeprefix("//")
        if not path:
            raise InvalidArgument("store", f"{shown}: no file (sqlite:///path/to/hub.db)")
        return "sqlite", {"path": path}
    if not _URL_RE.match(url):
        return "sqlite", {"path": url}  # a plain path
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss"):
        raise InvalidArgument(
            "store", f"unsupported scheme {scheme!r} in {shown}: use redis://HOST:PORT/DB, "
                     "rediss://HOST:PORT/DB (TLS), sqlite:///PATH or a path")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InvalidArgument("store", f"{shown}: bad host or port") from None
    if "@" in parts.path or parts.fragment:
        raise InvalidArgument("store", f"{shown}: malformed URL (percent-encode / ? # @ in "
                                       "a password: %2F %3F %23 %40)")
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if db and not (db.isascii() and db.isdigit()):
        raise InvalidArgument(
            "store", f"bad database number {db[:20]!r} in {shown}: the path is /DB, "
                     "a number such as /0")
    try:
        options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)) \
            if parts.query else {}
    except ValueError:
        raise InvalidArgument("store", f"{shown}: malformed query") from None
    for name in options:
        if name in _TLS_OPTIONS:
            if scheme != "rediss":
                raise InvalidArgument("store", f"{shown}: {name} needs rediss:// (TLS)")
        elif name not in _REDIS_OPTIONS:
            raise InvalidArgument("store", f"{shown}: unknown option {name!r}")
    if "db" in options and not (options["db"].isascii() and options["db"].isdigit()):
        raise InvalidArgument("store", f"bad database number {options['db'][:20]!r} in {shown}")
    if "prefix" in options and (not options["prefix"]
                                or any(c.isspace() for c in options["prefix"])):
        raise InvalidArgument("store", f"{shown}: prefix must be non-empty, without spaces")
    return "redis", options


def check_store_url(url: str) -> str:
    """Check a store URL's form without connecting (for option parsing); its kind,
    ``"redis"`` or ``"sqlite"``.

    Accepted: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS;
    ``ssl_ca_certs``, ``ssl_cert_reqs`` and redis-py's other URL options in the query),
    an optional ``?prefix=`` for the keys (default ``sesame:``); ``sqlite:///path/hub.db``
    (``sqlite:relative.db``) or a plain path, where a directory means its ``hub.db``.

    :raises InvalidArgument: (field ``store``) what is wrong: an unsupported scheme, a
        database number that is not one, an unknown option...; never the password.
    """
    return _parse_url(url)[0]


def open_store_url(url: str, **kwargs: Any) -> Store:
    """The store ``url`` names (see :func:`check_store_url` for the forms): a
    :class:`RedisStore` or an :class:`~sesame.hub.store.SQLiteStore`.  ``kwargs`` go to
    the store's constructor (``clock``, ``kdf_iterations``; ``prefix`` and ``timeout``
    for Redis, where the URL's ``?prefix=`` wins).

    :raises InvalidArgument: a malformed URL (field ``store``).
    :raises StoreUnavailable: Redis does not answer.
    """
    kind, options = _parse_url(url)
    if kind == "sqlite":
        path = Path(options["path"]).expanduser()
        if path.is_dir():
            path = path / "hub.db"
        return SQLiteStore(path, **kwargs)
    if "prefix" in options:
        kwargs["prefix"] = options["prefix"]
    return RedisStore(url, **kwargs)
