"""
The hub's persistent state behind one interface, :class:`Store`: access tokens,
namespaces, remotes, endpoints and front-door routes.  :class:`SQLiteStore` is
the embedded default (one file, zero setup); ``RedisStore``
(``sesame.hub._redisstore``, ``sesame.hub.RedisStore``) keeps the same records in a
Redis server that several hubs share.  ``sesame.hub.open_store_url`` opens either
from a URL (``redis://``, ``rediss://``, ``sqlite:///path`` or a path); log such a
URL only through :func:`redact_url`.

Live connection state (which session serves which endpoint right now) is not
here: it lives in the hub's memory and is rebuilt when remotes reconnect.

Tokens
------
A token reads ``ses_<id>_<secret>``: ``id`` is 12 hex digits, stored in clear
and safe to show (``sesame token list``, logs); ``secret`` is
``secrets.token_urlsafe(32)`` (256 random bits) and is never stored: the store
keeps a PBKDF2-HMAC-SHA256 digest of it under a per-token random salt and
compares digests in constant time.  The printed token cannot be recovered from
the store, only revoked and replaced.

What a token allows (:class:`TokenInfo`):

``remote``
    register exactly its remote name, in its namespace (any number of sessions
    at once: the agent and a ``twistd web`` may share one remote's token).
``client``
    reach and list the remotes of its namespace whose name matches its pattern
    (an :func:`fnmatch.fnmatchcase` glob such as ``edge-*``; no pattern: all).
``admin``
    reach and list every remote in every namespace, and manage the hub.  It
    does not allow registering: a remote's identity comes from a remote token.
"""

from __future__ import annotations

import abc
import fnmatch
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from sesame import _names as N

__all__ = [
    "DEFAULT_NAMESPACE",
    "ROUTE_KINDS",
    "SCHEMA_VERSION",
    "TOKEN_KINDS",
    "AlreadyExists",
    "EndpointRecord",
    "InvalidArgument",
    "NamespaceRecord",
    "NotFound",
    "RemoteRecord",
    "RouteRecord",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenInfo",
    "parse_token",
    "redact_url",
]

DEFAULT_NAMESPACE = N.DEFAULT_NAMESPACE
TokenKind = Literal["remote", "client", "admin"]
TOKEN_KINDS: tuple[str, ...] = ("remote", "client", "admin")
#: Front-door route kinds: a hub TCP listener, an HTTP virtual host, a TLS SNI name,
#: a gRPC authority (or ``sesame-remote`` metadata value).
ROUTE_KINDS: tuple[str, ...] = ("tcp", "http", "sni", "grpc")
SCHEMA_VERSION = 3

TOKEN_PREFIX = "ses"
_ID_HEX = 12
_SECRET_BYTES = 32
_SALT_BYTES = 16
#: The secret has 256 random bits, so key stretching adds nothing against
#: guessing, even with the database in hand; the count stays low because the hub
#: verifies on every authenticated call (about 0.5 ms at 1,000 on the 2-core
#: box, 8 ms at 10,000).  Stored per token, so it can change later.
KDF_ITERATIONS = 1_000
_KDF = "pbkdf2_sha256"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_PATTERN_RE = re.compile(r"[A-Za-z0-9._*?!\[\]-]{1,128}\Z")
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{{_ID_HEX}}})_([A-Za-z0-9_-]{{16,256}})\Z")
_ID_RE = re.compile(rf"[0-9a-f]{{{_ID_HEX}}}\Z")


# -- errors -----------------------------------------------------------------


class StoreError(Exception):
    """Base of the store's errors.  ``code`` names the matching gRPC status."""

    code = "UNKNOWN"


class NotFound(StoreError, LookupError):
    """No ``field`` with value ``value``."""

    code = "NOT_FOUND"

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field} {value!r} not found")
        self.field = field
        self.value = value


class AlreadyExists(StoreError):
    """A ``field`` with value ``value`` exists already."""

    code = "ALREADY_EXISTS"

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field} {value!r} already exists")
        self.field = field
        self.value = value


class InvalidArgument(StoreError, ValueError):
    """Argument ``field`` is unacceptable; ``reason`` says why."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class StoreUnavailable(StoreError):
    """The store did not answer (a networked store: Redis down or unreachable).  The
    message starts with "store unavailable" and never carries a password."""

    code = "UNAVAILABLE"


# -- records ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as the store knows it: everything but the secret."""

    id: str
    kind: str
    namespace: str
    remote: str | None
    pattern: str | None
    create_time: float
    revoke_time: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None

    def may_register(self, remote: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """May a session holding this token register as ``namespace/remote``?"""
        return (
            not self.revoked
            and self.kind == "remote"
            and self.namespace == namespace
            and self.remote == remote
        )

    def may_reach(self, remote: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """May a client holding this token open connections to ``namespace/remote``?"""
        if self.revoked:
            return False
        if self.kind == "admin":
            return True
        if self.kind != "client" or self.namespace != namespace:
            return False
        return self.pattern is None or fnmatch.fnmatchcase(remote, self.pattern)

    def may_list(self, remote: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Is ``namespace/remote`` shown to this token by ``sesame remotes``?"""
        return self.may_reach(remote, namespace)


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    create_time: float

    @property
    def resource_name(self) -> str:
        return f"namespaces/{self.name}"


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    namespace: str
    name: str
    display_name: str
    description: str
    create_time: float

    @property
    def resource_name(self) -> str:
        return f"namespaces/{self.namespace}/remotes/{self.name}"


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    namespace: str
    remote: str
    name: str
    display_name: str
    description: str
    create_time: float

    @property
    def resource_name(self) -> str:
        return f"namespaces/{self.namespace}/remotes/{self.remote}/endpoints/{self.name}"


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """A front-door route: traffic matching ``match`` (a port for ``tcp``, a host
    name for ``http`` and ``sni``) goes to ``target`` (free text for the hub,
    e.g. an endpoint resource name)."""

    id: str
    kind: str
    match: str
    target: str
    created: float


# -- validation & tokens ----------------------------------------------------


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidArgument(
            field,
            f"{value!r} is not a valid name (1-63 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit)",
        )
    return value


def _check_text(field: str, value: object, limit: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidArgument(field, f"must be a string of at most {limit} characters")
    return value


def server_description_problem(description: str) -> str | None:
    """What is wrong with a Twisted server endpoint description, or None.  Checks the
    syntax (and builds tcp/unix endpoint objects); never listens."""
    from twisted.internet import endpoints

    try:
        args, kwargs = N.split_endpoint_description(description)
        kind = args[0] if args else ""
        if kind in ("tcp", "tcp6"):
            # Twisted reads the port with int(), which takes "٢٢" as 22: ASCII digits only
            N.parse_port(kwargs.get("port", args[1] if len(args) > 1 else ""), "port", low=0)
        if kind in ("tcp", "tcp6", "unix"):
            endpoints.serverFromString(None, description)  # builds the endpoint object only
        elif kind not in _BUILTIN_SERVER_TYPES and kind not in _server_plugin_prefixes():
            return f"unknown endpoint type {kind!r}"
    except (ValueError, TypeError, IndexError) as exc:
        return str(exc) or type(exc).__name__
    return None


#: Server endpoint types Twisted parses itself; the rest come from plugins.
_BUILTIN_SERVER_TYPES = frozenset({"tcp", "unix", "ssl"})


def _check_tcp_match(match: str) -> None:
    """A tcp route listens on a port 1-65535 (ASCII digits: ``²`` or ``٢٢`` are refused,
    not read as numbers) or a Twisted server endpoint description
    (``tcp:9000:interface=127.0.0.1``)."""
    if match.isdigit():  # digits of any script: meant as a port
        try:
            N.parse_port(match, "match")
        except ValueError:
            raise InvalidArgument("match", f"a tcp route's port must be 1-65535 in ASCII "
                                           f"digits, not {match!r}") from None
        return
    why = server_description_problem(match)
    if why:
        raise InvalidArgument(
            "match",
            f"a tcp route matches a port or a Twisted server endpoint description "
            f"(tcp:9000:interface=127.0.0.1), not {match!r}: {why}",
        )


def _server_plugin_prefixes() -> set[str]:
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    return {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}


def parse_token(token: str) -> tuple[str, str] | None:
    """Split ``ses_<id>_<secret>`` into ``(id, secret)``; None if malformed.

    Surrounding whitespace (a token file's newline) is ignored.
    """
    if not isinstance(token, str):
        return None
    m = _TOKEN_RE.match(token.strip())
    return (m.group(1), m.group(2)) if m else None


def _digest(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode("ascii"), salt, iterations)


# -- what every backend does the same way ---------------------------------------------
# (Backends in other modules reach these through :class:`Store`'s protected methods.)


@dataclass(frozen=True, slots=True)
class _TokenMaterial:
    """A new token's secret and what a store keeps of it (never the secret)."""

    secret: str
    kdf: str
    iterations: int
    salt: bytes
    digest: bytes

    def text(self, token_id: str) -> str:
        return f"{TOKEN_PREFIX}_{token_id}_{self.secret}"


def _token_material(
    kind: str, remote: str | None, pattern: str | None, iterations: int
) -> _TokenMaterial:
    """Check :meth:`Store.create_token`'s arguments (not the namespace) and make the secret."""
    if kind not in TOKEN_KINDS:
        raise InvalidArgument("kind", f"{kind!r} is not one of {', '.join(TOKEN_KINDS)}")
    if kind == "remote":
        if remote is None:
            raise InvalidArgument("remote", "a remote token needs the remote's name")
        _check_name("remote", remote)
    elif remote is not None:
        raise InvalidArgument("remote", f"only remote tokens name a remote, not {kind} tokens")
    if pattern is not None:
        if kind != "client":
            raise InvalidArgument("pattern", "only client tokens take a remotes pattern")
        if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
            raise InvalidArgument(
                "pattern",
                f"{pattern!r} is not a remote-name glob (names plus * ? [...])",
            )
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    salt = secrets.token_bytes(_SALT_BYTES)
    return _TokenMaterial(secret, _KDF, iterations, salt, _digest(secret, salt, iterations))


def _new_token_id() -> str:
    return secrets.token_hex(_ID_HEX // 2)


def _secret_matches(secret: str, kdf: str, iterations: int, salt: bytes, stored: bytes) -> bool:
    """Does ``secret`` hash to ``stored``?  (Constant time; False for an unknown KDF.)"""
    if kdf != _KDF:
        return False
    return hmac.compare_digest(_digest(secret, salt, iterations), stored)


def _token_id_of(token_id_or_token: str) -> str | None:
    """The id :meth:`Store.revoke` means: of a whole token, or a well-formed id; else None."""
    parsed = parse_token(token_id_or_token)
    token_id = parsed[0] if parsed else token_id_or_token
    if not isinstance(token_id, str) or not _ID_RE.match(token_id):
        return None
    return token_id


def _check_texts(display_name: str | None, description: str | None) -> None:
    """A remote's or endpoint's ``display_name`` and ``description`` (None: not given)."""
    if display_name is not None:
        _check_text("display_name", display_name, 256)
    if description is not None:
        _check_text("description", description)


def _check_route_kind(kind: object) -> str:
    if kind not in ROUTE_KINDS:
        raise InvalidArgument("kind", f"{kind!r} is not one of {', '.join(ROUTE_KINDS)}")
    return kind  # type: ignore[return-value]


def _route_match(kind: str, match: str, target: str) -> str:
    """Check :meth:`Store.create_route`'s arguments; the match as stored (host names in
    lower case)."""
    _check_route_kind(kind)
    if not isinstance(match, str) or not match or any(c.isspace() for c in match):
        raise InvalidArgument("match", "must be a non-empty string without spaces")
    if kind == "tcp":
        _check_tcp_match(match)
    if kind in ("http", "sni"):
        match = match.lower()
    if not isinstance(target, str) or not target.strip():
        raise InvalidArgument("target", "must be a non-empty string")
    _check_text("target", target)
    from sesame.hub._target import parse_target

    try:
        parse_target(target)
    except ValueError as exc:
        raise InvalidArgument("target", str(exc).removeprefix("target ")) from None
    return match


def _new_route_id() -> str:
    return f"rt_{secrets.token_hex(6)}"


# -- store URLs -------------------------------------------------------------------------

_REDACTED = "***"
#: A query parameter whose name holds one of these has a secret value (password,
#: ssl_password, token, ...).
_SECRET_WORDS = ("pass", "secret", "token", "auth")


def _secret_param(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``redis://:***@host:6379/0``): the
    form to log or put in an error.  Never raises; an unparsable URL loses everything
    that could be a password (the part before its last ``@``, secret query values)."""
    if not isinstance(url, str):
        return _REDACTED
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # a plain path: nothing secret in it
    head, qsep, query = rest.partition("?")
    if "@" in head and not rest.startswith("/"):  # (sqlite:///a@b.db has no user part)
        userinfo, _, hostpart = head.rpartition("@")
        if ":" in userinfo or "/" in userinfo:  # ("/": a password that broke the URL)
            head = f"{userinfo.partition(':')[0].partition('/')[0]}:{_REDACTED}@{hostpart}"
    elif "@" in query and not rest.startswith("/"):
        # "?" inside a password ("redis://:pa?ss@host"): everything before the last @ goes
        head, qsep, query = f":{_REDACTED}@{rest.rpartition('@')[2]}", "", ""
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            if any(word in query.lower() for word in _SECRET_WORDS):
                query = _REDACTED
        else:
            if any(_secret_param(k) for k, _ in pairs):
                query = urlencode([(k, _REDACTED if _secret_param(k) else v) for k, v in pairs],
                                  safe="*/:@")
    return f"{scheme}://{head}{qsep}{query}"


# -- interface --------------------------------------------------------------


class Store(abc.ABC):
    """What the hub needs from its persistent state.

    Names (namespaces, remotes, endpoints) are 1-63 characters of
    ``A-Z a-z 0-9 . _ -`` starting with a letter or digit.  Methods raise
    :class:`InvalidArgument`, :class:`NotFound` or :class:`AlreadyExists`, each
    carrying the offending field's name in ``field``; a networked store also
    :class:`StoreUnavailable` when its server does not answer.
    """

    #: True for a store that does network I/O (Redis): the hub never calls it on its
    #: event loop, and its calls may raise :class:`StoreUnavailable`.
    networked: bool = False

    # tokens
    @abc.abstractmethod
    def create_token(
        self,
        kind: TokenKind,
        remote: str | None = None,
        pattern: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> tuple[str, str]:
        """Create a token; returns ``(token_id, token)``.  ``token`` is the
        whole printable ``ses_<id>_<secret>`` and is not retrievable later.

        ``remote`` is required for (only for) ``kind="remote"``; ``pattern`` is
        allowed only for ``kind="client"``.  The namespace must exist.
        """

    @abc.abstractmethod
    def verify(self, token: str) -> TokenInfo | None:
        """The live token ``token`` is, or None (malformed, unknown, wrong
        secret, revoked).  Never raises for bad input."""

    @abc.abstractmethod
    def revoke(self, token_id_or_token: str) -> bool:
        """Revoke by id or whole token; False when there was no live token."""

    @abc.abstractmethod
    def get_token(self, token_id: str) -> TokenInfo: ...

    @abc.abstractmethod
    def list_tokens(self, include_revoked: bool = True) -> list[TokenInfo]: ...

    def revoked_since(self, when: float) -> list[str]:
        """Ids of the tokens revoked at ``when`` (store clock, seconds) or later.

        The hub asks this several times a second to end the sessions and connections of revoked
        tokens; a backend should answer from an index (this default reads every token).
        """
        return [t.id for t in self.list_tokens() if t.revoke_time is not None
                and t.revoke_time >= when]

    def change_marker(self) -> object:
        """Something that differs after any change to the store, by this process or
        another: the hub skips :meth:`revoked_since` while it stays equal.  The default
        (a new object each call) means "always look"."""
        return object()

    # namespaces
    @abc.abstractmethod
    def create_namespace(self, name: str, exist_ok: bool = False) -> NamespaceRecord: ...

    @abc.abstractmethod
    def get_namespace(self, name: str) -> NamespaceRecord: ...

    @abc.abstractmethod
    def list_namespaces(self) -> list[NamespaceRecord]: ...

    @abc.abstractmethod
    def delete_namespace(self, name: str) -> None:
        """Delete an empty namespace (no remotes, no live tokens); never the default."""

    # remotes
    @abc.abstractmethod
    def create_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> RemoteRecord: ...

    @abc.abstractmethod
    def get_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> RemoteRecord: ...

    @abc.abstractmethod
    def list_remotes(self, namespace: str | None = None) -> list[RemoteRecord]:
        """Remotes of ``namespace``, or of all namespaces when None."""

    @abc.abstractmethod
    def update_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> RemoteRecord:
        """Change the fields given (not None)."""

    @abc.abstractmethod
    def delete_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Delete a remote and its endpoints."""

    # endpoints
    @abc.abstractmethod
    def create_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> EndpointRecord: ...

    @abc.abstractmethod
    def get_endpoint(
        self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE
    ) -> EndpointRecord: ...

    @abc.abstractmethod
    def list_endpoints(
        self, remote: str, namespace: str = DEFAULT_NAMESPACE
    ) -> list[EndpointRecord]:
        """Endpoints of an existing remote (NotFound otherwise)."""

    @abc.abstractmethod
    def update_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> EndpointRecord: ...

    @abc.abstractmethod
    def delete_endpoint(
        self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE
    ) -> None: ...

    # routes
    @abc.abstractmethod
    def create_route(self, kind: str, match: str, target: str) -> RouteRecord:
        """``kind`` is one of :data:`ROUTE_KINDS`; ``(kind, match)`` is unique."""

    @abc.abstractmethod
    def get_route(self, route_id: str) -> RouteRecord: ...

    @abc.abstractmethod
    def list_routes(self, kind: str | None = None) -> list[RouteRecord]: ...

    @abc.abstractmethod
    def delete_route(self, route_id: str) -> None: ...

    # cluster-wide values
    @abc.abstractmethod
    def shared_secret(self, name: str, factory: Callable[[], bytes]) -> bytes:
        """The bytes stored under ``name`` (a name like a remote's); when there are none,
        ``factory()`` stored atomically and returned.  Every caller, in any process
        sharing the store, gets the same bytes: of two racing first callers one
        ``factory()`` result wins and both return it.  For values the hubs of a cluster
        must agree on (the peer secret, the cluster CA); never listed, never published."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the store is unusable afterwards."""

    # -- for backends: the rules every store applies the same way ------------------------
    # (Protected so that a backend in another module shares them instead of copying.)

    #: Check a name (namespace, remote, endpoint, secret): InvalidArgument for ``field``.
    _check_name = staticmethod(_check_name)
    #: Check :meth:`create_token`'s arguments and make the new secret and its digest.
    _token_material = staticmethod(_token_material)
    #: A new random token id.
    _new_token_id = staticmethod(_new_token_id)
    #: Does a presented secret match a stored digest (constant time)?
    _secret_matches = staticmethod(_secret_matches)
    #: The token id :meth:`revoke` is about, or None.
    _token_id_of = staticmethod(_token_id_of)
    #: Check ``display_name`` and ``description`` (None: not given).
    _check_texts = staticmethod(_check_texts)
    #: Check a route kind.
    _check_route_kind = staticmethod(_check_route_kind)
    #: Check :meth:`create_route`'s arguments; the match as stored.
    _route_match = staticmethod(_route_match)
    #: A new random route id.
    _new_route_id = staticmethod(_new_route_id)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- SQLite -----------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE namespaces (
    name TEXT PRIMARY KEY,
    create_time REAL NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('remote', 'client', 'admin')),
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    remote TEXT,
    pattern TEXT,
    kdf TEXT NOT NULL,
    iterations INTEGER NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    create_time REAL NOT NULL,
    revoke_time REAL
);
CREATE TABLE remotes (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    name TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    create_time REAL NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE endpoints (
    namespace TEXT NOT NULL,
    remote TEXT NOT NULL,
    name TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    create_time REAL NOT NULL,
    PRIMARY KEY (namespace, remote, name),
    FOREIGN KEY (namespace, remote) REFERENCES remotes(namespace, name) ON DELETE CASCADE
);
CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    match TEXT NOT NULL,
    target TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (kind, match)
);
"""

#: ``_MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``.
_MIGRATIONS: dict[int, str] = {
    0: _SCHEMA_V1,
    # 2: the hub asks for tokens revoked since a moment, several times a second
    1: "CREATE INDEX tokens_revoke_time ON tokens(revoke_time)",
    # 3: values every hub of a deployment shares (Store.shared_secret)
    2: "CREATE TABLE kv (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
}


class SQLiteStore(Store):
    """:class:`Store` in one SQLite file (WAL mode).

    Threads: one connection, opened with ``check_same_thread=False`` and used
    only under an internal lock.  The hub calls it from the reactor thread;
    each call is a short query, plus one PBKDF2 (under 1 ms, computed outside the
    lock) in :meth:`verify`.  Calls from other threads (e.g. moving ``verify``
    to a thread pool) are safe and simply serialized.

    Processes: the ``sesame token`` CLI opens the same file while the hub runs.
    WAL lets readers and one writer proceed together, writers wait up to
    ``timeout`` seconds for each other, and nothing is cached in memory, so a
    token created or revoked by the CLI counts at the hub's next ``verify``.

    :param path: the database file; it and a missing parent directory are
        created (0600 / 0700).
    :param clock: returns the current POSIX time; injected for tests.
    :param timeout: seconds to wait for another connection's write lock.
    :param kdf_iterations: PBKDF2 rounds for new tokens.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
        kdf_iterations: int = KDF_ITERATIONS,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._iterations = kdf_iterations
        self._lock = threading.RLock()
        self._writes = 0  # commits through this object (see change_marker)
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700, parents=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    # -- plumbing

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken before reading (no upgrade deadlocks)."""
        with self._lock:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
                self._writes += 1

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as db:
            has_meta = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if has_meta:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
            else:
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                version = 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}; this sesame knows up to "
                    f"{SCHEMA_VERSION}. Upgrade sesame."
                )
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                version += 1
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )
            db.execute(
                "INSERT OR IGNORE INTO namespaces (name, create_time) VALUES (?, ?)",
                (DEFAULT_NAMESPACE, self._clock()),
            )

    def schema_version(self) -> int:
        (row,) = self._read("SELECT value FROM meta WHERE key='schema_version'")
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _require_namespace(self, db: sqlite3.Connection, namespace: str) -> None:
        _check_name("namespace", namespace)
        if not db.execute("SELECT 1 FROM namespaces WHERE name=?", (namespace,)).fetchone():
            raise NotFound("namespace", namespace)

    # -- tokens

    def create_token(
        self,
        kind: TokenKind,
        remote: str | None = None,
        pattern: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> tuple[str, str]:
        new = _token_material(kind, remote, pattern, self._iterations)
        with self._tx() as db:
            self._require_namespace(db, namespace)
            while True:
                token_id = _new_token_id()
                if not db.execute("SELECT 1 FROM tokens WHERE id=?", (token_id,)).fetchone():
                    break
            db.execute(
                "INSERT INTO tokens (id, kind, namespace, remote, pattern, kdf, iterations,"
                " salt, digest, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    kind,
                    namespace,
                    remote,
                    pattern,
                    new.kdf,
                    new.iterations,
                    new.salt,
                    new.digest,
                    self._clock(),
                ),
            )
        return token_id, new.text(token_id)

    _TOKEN_COLUMNS = "id, kind, namespace, remote, pattern, create_time, revoke_time"

    def verify(self, token: str) -> TokenInfo | None:
        parsed = parse_token(token)
        if parsed is None:
            return None
        token_id, secret = parsed
        rows = self._read(
            f"SELECT {self._TOKEN_COLUMNS}, kdf, iterations, salt, digest FROM tokens WHERE id=?",
            (token_id,),
        )
        if not rows:
            return None
        *info, kdf, iterations, salt, stored = rows[0]
        # Outside the lock: the KDF is the slow part and touches no shared state.
        if not _secret_matches(secret, kdf, iterations, salt, stored):
            return None
        result = TokenInfo(*info)
        return None if result.revoked else result

    def revoke(self, token_id_or_token: str) -> bool:
        token_id = _token_id_of(token_id_or_token)
        if token_id is None:
            return False
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoke_time=? WHERE id=? AND revoke_time IS NULL",
                (self._clock(), token_id),
            )
            return cur.rowcount == 1

    def revoked_since(self, when: float) -> list[str]:
        rows = self._read("SELECT id FROM tokens WHERE revoke_time >= ?", (when,))
        return [r[0] for r in rows]

    def change_marker(self) -> object:
        # data_version moves when another connection (a `sesame token revoke`) commits;
        # our own writes bump _writes.
        with self._lock:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            return (version, self._writes)

    def get_token(self, token_id: str) -> TokenInfo:
        rows = self._read(f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE id=?", (token_id,))
        if not rows:
            raise NotFound("token", token_id)
        return TokenInfo(*rows[0])

    def list_tokens(self, include_revoked: bool = True) -> list[TokenInfo]:
        where = "" if include_revoked else " WHERE revoke_time IS NULL"
        rows = self._read(
            f"SELECT {self._TOKEN_COLUMNS} FROM tokens{where} ORDER BY create_time, id"
        )
        return [TokenInfo(*row) for row in rows]

    # -- namespaces

    def create_namespace(self, name: str, exist_ok: bool = False) -> NamespaceRecord:
        _check_name("name", name)
        with self._tx() as db:
            row = db.execute(
                "SELECT name, create_time FROM namespaces WHERE name=?", (name,)
            ).fetchone()
            if row:
                if exist_ok:
                    return NamespaceRecord(*row)
                raise AlreadyExists("namespace", name)
            now = self._clock()
            db.execute("INSERT INTO namespaces (name, create_time) VALUES (?, ?)", (name, now))
        return NamespaceRecord(name, now)

    def get_namespace(self, name: str) -> NamespaceRecord:
        _check_name("name", name)
        rows = self._read("SELECT name, create_time FROM namespaces WHERE name=?", (name,))
        if not rows:
            raise NotFound("namespace", name)
        return NamespaceRecord(*rows[0])

    def list_namespaces(self) -> list[NamespaceRecord]:
        rows = self._read("SELECT name, create_time FROM namespaces ORDER BY name")
        return [NamespaceRecord(*row) for row in rows]

    def delete_namespace(self, name: str) -> None:
        _check_name("name", name)
        if name == DEFAULT_NAMESPACE:
            raise InvalidArgument("name", "the default namespace cannot be deleted")
        with self._tx() as db:
            self._require_namespace(db, name)
            if db.execute("SELECT 1 FROM remotes WHERE namespace=? LIMIT 1", (name,)).fetchone():
                raise InvalidArgument("name", f"namespace {name!r} still has remotes")
            if db.execute(
                "SELECT 1 FROM tokens WHERE namespace=? AND revoke_time IS NULL LIMIT 1", (name,)
            ).fetchone():
                raise InvalidArgument("name", f"namespace {name!r} still has live tokens")
            db.execute("DELETE FROM tokens WHERE namespace=?", (name,))
            db.execute("DELETE FROM namespaces WHERE name=?", (name,))

    # -- remotes

    _REMOTE_COLUMNS = "namespace, name, display_name, description, create_time"

    def create_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> RemoteRecord:
        _check_name("name", name)
        _check_texts(display_name, description)
        with self._tx() as db:
            self._require_namespace(db, namespace)
            if db.execute(
                "SELECT 1 FROM remotes WHERE namespace=? AND name=?", (namespace, name)
            ).fetchone():
                raise AlreadyExists("remote", name)
            now = self._clock()
            db.execute(
                f"INSERT INTO remotes ({self._REMOTE_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (namespace, name, display_name, description, now),
            )
        return RemoteRecord(namespace, name, display_name, description, now)

    def _get_remote(self, db: sqlite3.Connection, name: str, namespace: str) -> RemoteRecord:
        _check_name("name", name)
        self._require_namespace(db, namespace)
        row = db.execute(
            f"SELECT {self._REMOTE_COLUMNS} FROM remotes WHERE namespace=? AND name=?",
            (namespace, name),
        ).fetchone()
        if row is None:
            raise NotFound("remote", name)
        return RemoteRecord(*row)

    def get_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> RemoteRecord:
        with self._lock:
            return self._get_remote(self._conn, name, namespace)

    def list_remotes(self, namespace: str | None = None) -> list[RemoteRecord]:
        if namespace is None:
            rows = self._read(
                f"SELECT {self._REMOTE_COLUMNS} FROM remotes ORDER BY namespace, name"
            )
        else:
            with self._lock:
                self._require_namespace(self._conn, namespace)
                rows = self._read(
                    f"SELECT {self._REMOTE_COLUMNS} FROM remotes WHERE namespace=? ORDER BY name",
                    (namespace,),
                )
        return [RemoteRecord(*row) for row in rows]

    def update_remote(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> RemoteRecord:
        _check_texts(display_name, description)
        with self._tx() as db:
            old = self._get_remote(db, name, namespace)
            new = RemoteRecord(
                namespace,
                name,
                old.display_name if display_name is None else display_name,
                old.description if description is None else description,
                old.create_time,
            )
            db.execute(
                "UPDATE remotes SET display_name=?, description=? WHERE namespace=? AND name=?",
                (new.display_name, new.description, namespace, name),
            )
        return new

    def delete_remote(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        with self._tx() as db:
            self._get_remote(db, name, namespace)
            db.execute("DELETE FROM remotes WHERE namespace=? AND name=?", (namespace, name))

    # -- endpoints

    _ENDPOINT_COLUMNS = "namespace, remote, name, display_name, description, create_time"

    def create_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str = "",
        description: str = "",
    ) -> EndpointRecord:
        _check_name("name", name)
        _check_texts(display_name, description)
        with self._tx() as db:
            self._get_remote(db, remote, namespace)
            if db.execute(
                "SELECT 1 FROM endpoints WHERE namespace=? AND remote=? AND name=?",
                (namespace, remote, name),
            ).fetchone():
                raise AlreadyExists("endpoint", name)
            now = self._clock()
            db.execute(
                f"INSERT INTO endpoints ({self._ENDPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (namespace, remote, name, display_name, description, now),
            )
        return EndpointRecord(namespace, remote, name, display_name, description, now)

    def _get_endpoint(
        self, db: sqlite3.Connection, remote: str, name: str, namespace: str
    ) -> EndpointRecord:
        _check_name("name", name)
        self._get_remote(db, remote, namespace)
        row = db.execute(
            f"SELECT {self._ENDPOINT_COLUMNS} FROM endpoints"
            " WHERE namespace=? AND remote=? AND name=?",
            (namespace, remote, name),
        ).fetchone()
        if row is None:
            raise NotFound("endpoint", name)
        return EndpointRecord(*row)

    def get_endpoint(
        self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE
    ) -> EndpointRecord:
        with self._lock:
            return self._get_endpoint(self._conn, remote, name, namespace)

    def list_endpoints(
        self, remote: str, namespace: str = DEFAULT_NAMESPACE
    ) -> list[EndpointRecord]:
        with self._lock:
            self._get_remote(self._conn, remote, namespace)
            rows = self._read(
                f"SELECT {self._ENDPOINT_COLUMNS} FROM endpoints"
                " WHERE namespace=? AND remote=? ORDER BY name",
                (namespace, remote),
            )
        return [EndpointRecord(*row) for row in rows]

    def update_endpoint(
        self,
        remote: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        display_name: str | None = None,
        description: str | None = None,
    ) -> EndpointRecord:
        _check_texts(display_name, description)
        with self._tx() as db:
            old = self._get_endpoint(db, remote, name, namespace)
            new = EndpointRecord(
                namespace,
                remote,
                name,
                old.display_name if display_name is None else display_name,
                old.description if description is None else description,
                old.create_time,
            )
            db.execute(
                "UPDATE endpoints SET display_name=?, description=?"
                " WHERE namespace=? AND remote=? AND name=?",
                (new.display_name, new.description, namespace, remote, name),
            )
        return new

    def delete_endpoint(self, remote: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        with self._tx() as db:
            self._get_endpoint(db, remote, name, namespace)
            db.execute(
                "DELETE FROM endpoints WHERE namespace=? AND remote=? AND name=?",
                (namespace, remote, name),
            )

    # -- routes

    _ROUTE_COLUMNS = "id, kind, match, target, created"

    def create_route(self, kind: str, match: str, target: str) -> RouteRecord:
        match = _route_match(kind, match, target)
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM routes WHERE kind=? AND match=?", (kind, match)
            ).fetchone():
                raise AlreadyExists("match", f"{kind} {match}")
            route_id = _new_route_id()
            now = self._clock()
            db.execute(
                f"INSERT INTO routes ({self._ROUTE_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (route_id, kind, match, target, now),
            )
        return RouteRecord(route_id, kind, match, target, now)

    def get_route(self, route_id: str) -> RouteRecord:
        rows = self._read(f"SELECT {self._ROUTE_COLUMNS} FROM routes WHERE id=?", (route_id,))
        if not rows:
            raise NotFound("route", route_id)
        return RouteRecord(*rows[0])

    def list_routes(self, kind: str | None = None) -> list[RouteRecord]:
        if kind is None:
            rows = self._read(f"SELECT {self._ROUTE_COLUMNS} FROM routes ORDER BY created, id")
        else:
            _check_route_kind(kind)
            rows = self._read(
                f"SELECT {self._ROUTE_COLUMNS} FROM routes WHERE kind=? ORDER BY created, id",
                (kind,),
            )
        return [RouteRecord(*row) for row in rows]

    def delete_route(self, route_id: str) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM routes WHERE id=?", (route_id,))
            if cur.rowcount != 1:
                raise NotFound("route", route_id)

    # -- shared values

    def shared_secret(self, name: str, factory: Callable[[], bytes]) -> bytes:
        _check_name("name", name)
        rows = self._read("SELECT value FROM kv WHERE name=?", (name,))
        if rows:
            return bytes(rows[0][0])
        value = factory()  # outside the lock and transaction: it may be slow (a CA key)
        if not isinstance(value, bytes):
            raise InvalidArgument("factory", f"must return bytes, not {type(value).__name__}")
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO kv (name, value) VALUES (?, ?)", (name, value))
            (stored,) = db.execute("SELECT value FROM kv WHERE name=?", (name,)).fetchone()
        return bytes(stored)
