"""sesame.hub.store: tokens and hub state in a real SQLite file and in a real Redis
(every test taking ``store`` or ``backend`` runs against both)."""

from __future__ import annotations

import secrets
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sesame.hub.store import (
    DEFAULT_NAMESPACE,
    SCHEMA_VERSION,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    SQLiteStore,
    Store,
    StoreError,
    TokenInfo,
    parse_token,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state.db"


class Backend:
    """Opens stores on one place: an SQLite file, or a prefix in the module's Redis."""

    def __init__(self, kind: str, db_path: Path, redis_server: Any = None) -> None:
        self.kind = kind
        self.db_path = db_path
        self.redis_server = redis_server
        self.prefix = f"test-{secrets.token_hex(4)}:"  # a fresh key space for each test

    def __call__(self, **kwargs: Any) -> Store:
        if self.kind == "sqlite":
            return SQLiteStore(self.db_path, **kwargs)
        from sesame.hub import RedisStore

        return RedisStore(self.redis_server.url, prefix=self.prefix, **kwargs)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_server.url)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, db_path: Path) -> Backend:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return Backend(request.param, db_path, server)


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend(clock=Clock())
    yield s
    s.close()


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path, clock=Clock())
    yield s
    s.close()


def _db_bytes(path: Path) -> bytes:
    """The database with its WAL and shared-memory files, as stored on disk."""
    out = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = path.with_name(path.name + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


# -- tokens ---------------------------------------------------------------------


def test_create_and_verify(store: SQLiteStore) -> None:
    token_id, token = store.create_token("remote", remote="edge-1")
    assert token.startswith(f"ses_{token_id}_")
    assert parse_token(token) is not None
    info = store.verify(token)
    assert info == TokenInfo(
        token_id, "remote", DEFAULT_NAMESPACE, "edge-1", None, info.create_time
    )
    assert not info.revoked
    assert store.verify(token + "\n") == info  # token files end with a newline


def test_tokens_carry_at_least_256_random_bits(store: SQLiteStore) -> None:
    tokens = {store.create_token("client")[1] for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        _, secret = parse_token(token)
        assert len(secret) >= 43  # token_urlsafe(32): 32 bytes in base64url


@pytest.mark.parametrize(
    "bad",
    ["", "ses_", "nonsense", "ses_0123456789ab", "ses_zzzzzzzzzzzz_" + "a" * 43, None, 42],
)
def test_malformed_tokens_are_refused(store: SQLiteStore, bad) -> None:
    store.create_token("client")
    assert store.verify(bad) is None


def test_unknown_and_tampered_tokens_are_refused(store: SQLiteStore) -> None:
    token_id, token = store.create_token("client")
    _, secret = parse_token(token)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert store.verify(f"ses_{token_id}_{flipped}") is None
    assert store.verify(f"ses_{token_id}_{secret}x") is None
    other_id, other = store.create_token("client")
    # Right secret under another token's id.
    assert store.verify(f"ses_{other_id}_{secret}") is None
    assert store.verify(f"ses_ffffffffffff_{secret}") is None
    assert store.verify(token) is not None and store.verify(other) is not None


def test_revoke_by_id_and_by_token(store: SQLiteStore) -> None:
    id1, token1 = store.create_token("remote", remote="edge-1")
    id2, token2 = store.create_token("client", pattern="edge-*")
    assert store.revoke(id1) is True
    assert store.verify(token1) is None
    assert store.revoke(id1) is False  # already revoked
    assert store.revoke(token2) is True
    assert store.verify(token2) is None
    assert store.revoke("ffffffffffff") is False
    assert store.revoke("not an id") is False
    assert store.get_token(id1).revoked


def test_list_tokens_has_no_secrets(store: SQLiteStore) -> None:
    id1, token1 = store.create_token("remote", remote="edge-1")
    id2, _ = store.create_token("client", pattern="edge-*")
    id3, _ = store.create_token("admin")
    store.revoke(id2)
    listed = store.list_tokens()
    assert [t.id for t in listed] == [id1, id2, id3]
    assert [t.kind for t in listed] == ["remote", "client", "admin"]
    assert [t.revoked for t in listed] == [False, True, False]
    assert [t.id for t in store.list_tokens(include_revoked=False)] == [id1, id3]
    _, secret = parse_token(token1)
    assert all(secret not in repr(t) for t in listed)
    with pytest.raises(NotFound) as excinfo:
        store.get_token("ffffffffffff")
    assert excinfo.value.field == "token"


def test_secrets_are_stored_only_as_salted_hashes(sqlite_store: SQLiteStore,
                                                 db_path: Path) -> None:
    store = sqlite_store
    made = [store.create_token("remote", remote="edge-1") for _ in range(3)]
    made.append(store.create_token("client"))
    rows = sqlite3.connect(db_path).execute("SELECT * FROM tokens").fetchall()
    assert len(rows) == 4
    salts = {row[7] for row in rows}
    digests = {row[8] for row in rows}
    assert len(salts) == 4 and len(digests) == 4  # per-token salt
    for token_id, token in made:
        _, secret = parse_token(token)
        for row in rows:
            for value in row:
                if isinstance(value, bytes):
                    assert secret.encode() not in value
                else:
                    assert secret not in str(value) and token not in str(value)
        raw = _db_bytes(db_path)
        assert secret.encode() not in raw and token.encode() not in raw
        assert token_id.encode() in raw  # the ids are public and stored in clear
    store.close()
    raw = _db_bytes(db_path)
    for _, token in made:
        assert parse_token(token)[1].encode() not in raw


def test_create_token_argument_rules(store: SQLiteStore) -> None:
    cases = [
        (dict(kind="remote"), "remote"),
        (dict(kind="remote", remote="bad/name"), "remote"),
        (dict(kind="remote", remote=""), "remote"),
        (dict(kind="client", remote="edge-1"), "remote"),
        (dict(kind="admin", remote="edge-1"), "remote"),
        (dict(kind="remote", remote="edge-1", pattern="edge-*"), "pattern"),
        (dict(kind="admin", pattern="*"), "pattern"),
        (dict(kind="client", pattern=""), "pattern"),
        (dict(kind="client", pattern="a/b"), "pattern"),
        (dict(kind="root"), "kind"),
        (dict(kind="client", namespace="bad name"), "namespace"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument) as excinfo:
            store.create_token(**kwargs)
        assert excinfo.value.field == field, kwargs
    with pytest.raises(NotFound) as excinfo:
        store.create_token("client", namespace="nowhere")
    assert excinfo.value.field == "namespace"
    assert store.list_tokens() == []


# -- authorization ----------------------------------------------------------------


def test_remote_token_registers_exactly_its_name(store: SQLiteStore) -> None:
    store.create_namespace("lab")
    info = store.verify(store.create_token("remote", remote="edge-1")[1])
    assert info.may_register("edge-1")
    assert info.may_register("edge-1", DEFAULT_NAMESPACE)
    assert not info.may_register("edge-2")
    assert not info.may_register("edge-1", "lab")
    assert not info.may_register("edge-10")
    # A remote token is an identity, not a client credential.
    assert not info.may_reach("edge-1")
    assert not info.may_list("edge-1")
    lab = store.verify(store.create_token("remote", remote="edge-1", namespace="lab")[1])
    assert lab.may_register("edge-1", "lab") and not lab.may_register("edge-1")


def test_client_token_reaches_its_pattern(store: SQLiteStore) -> None:
    store.create_namespace("lab")
    every = store.verify(store.create_token("client")[1])
    edges = store.verify(store.create_token("client", pattern="edge-*")[1])
    one = store.verify(store.create_token("client", pattern="edge-1")[1])
    pick = store.verify(store.create_token("client", pattern="db-[ab]?")[1])
    assert every.may_reach("anything") and every.may_list("edge-1")
    assert edges.may_reach("edge-1") and edges.may_reach("edge-42")
    assert not edges.may_reach("db-1") and not edges.may_reach("Edge-1")
    assert one.may_reach("edge-1") and not one.may_reach("edge-10")
    assert pick.may_reach("db-a1") and not pick.may_reach("db-c1")
    assert edges.may_list("edge-7") and not edges.may_list("db-1")
    for info in (every, edges, one, pick):
        assert not info.may_register("edge-1")
        assert not info.may_reach("edge-1", "lab")  # other namespace


def test_admin_token_reaches_everything_but_registers_nothing(store: SQLiteStore) -> None:
    admin = store.verify(store.create_token("admin")[1])
    assert admin.may_reach("edge-1") and admin.may_reach("x", "lab") and admin.may_list("y")
    assert not admin.may_register("edge-1")


def test_revoked_info_allows_nothing(store: SQLiteStore) -> None:
    token_id, token = store.create_token("client")
    store.revoke(token_id)
    info = store.get_token(token_id)
    assert store.verify(token) is None
    assert not info.may_reach("edge-1") and not info.may_list("edge-1")


# -- CRUD -----------------------------------------------------------------------


def test_namespaces(store: SQLiteStore) -> None:
    assert [n.name for n in store.list_namespaces()] == [DEFAULT_NAMESPACE]
    lab = store.create_namespace("lab")
    assert lab.resource_name == "namespaces/lab"
    assert store.get_namespace("lab") == lab
    assert store.create_namespace("lab", exist_ok=True) == lab
    with pytest.raises(AlreadyExists) as excinfo:
        store.create_namespace("lab")
    assert excinfo.value.field == "namespace"
    with pytest.raises(InvalidArgument) as excinfo:
        store.create_namespace("-bad")
    assert excinfo.value.field == "name"
    with pytest.raises(InvalidArgument) as excinfo:
        store.delete_namespace(DEFAULT_NAMESPACE)
    assert excinfo.value.field == "name"

    store.create_remote("edge-1", namespace="lab")
    with pytest.raises(InvalidArgument, match="still has remotes"):
        store.delete_namespace("lab")
    store.delete_remote("edge-1", namespace="lab")
    token_id, _ = store.create_token("client", namespace="lab")
    with pytest.raises(InvalidArgument, match="still has live tokens"):
        store.delete_namespace("lab")
    store.revoke(token_id)
    store.delete_namespace("lab")
    with pytest.raises(NotFound) as excinfo:
        store.get_namespace("lab")
    assert excinfo.value.field == "namespace"
    with pytest.raises(NotFound):
        store.delete_namespace("lab")


def test_remotes(store: SQLiteStore) -> None:
    r = store.create_remote("edge-1", display_name="Edge one", description="rack 4")
    assert r.resource_name == "namespaces/default/remotes/edge-1"
    assert store.get_remote("edge-1") == r
    store.create_namespace("lab")
    store.create_remote("edge-1", namespace="lab")  # same name, other namespace
    store.create_remote("alpha")
    assert [x.name for x in store.list_remotes(DEFAULT_NAMESPACE)] == ["alpha", "edge-1"]
    assert [(x.namespace, x.name) for x in store.list_remotes()] == [
        ("default", "alpha"),
        ("default", "edge-1"),
        ("lab", "edge-1"),
    ]
    updated = store.update_remote("edge-1", description="rack 5")
    assert (updated.display_name, updated.description) == ("Edge one", "rack 5")
    assert updated.create_time == r.create_time
    assert store.get_remote("edge-1") == updated

    with pytest.raises(AlreadyExists) as excinfo:
        store.create_remote("edge-1")
    assert excinfo.value.field == "remote"
    with pytest.raises(NotFound) as excinfo:
        store.get_remote("edge-9")
    assert excinfo.value.field == "remote"
    with pytest.raises(NotFound) as excinfo:
        store.create_remote("edge-9", namespace="nowhere")
    assert excinfo.value.field == "namespace"
    with pytest.raises(NotFound) as excinfo:
        store.list_remotes("nowhere")
    assert excinfo.value.field == "namespace"
    for bad in ("", "a/b", "a:b", "x" * 64, ".hidden"):
        with pytest.raises(InvalidArgument) as excinfo:
            store.create_remote(bad)
        assert excinfo.value.field == "name"
    with pytest.raises(InvalidArgument) as excinfo:
        store.update_remote("edge-1", display_name="x" * 1000)
    assert excinfo.value.field == "display_name"
    store.delete_remote("edge-1")
    with pytest.raises(NotFound):
        store.delete_remote("edge-1")


def test_endpoints(store: SQLiteStore) -> None:
    store.create_remote("edge-1")
    web = store.create_endpoint("edge-1", "web", description="files")
    assert web.resource_name == "namespaces/default/remotes/edge-1/endpoints/web"
    store.create_endpoint("edge-1", "api")
    assert [e.name for e in store.list_endpoints("edge-1")] == ["api", "web"]
    assert store.get_endpoint("edge-1", "web") == web
    assert store.update_endpoint("edge-1", "web", display_name="Web").display_name == "Web"

    with pytest.raises(AlreadyExists) as excinfo:
        store.create_endpoint("edge-1", "web")
    assert excinfo.value.field == "endpoint"
    with pytest.raises(NotFound) as excinfo:
        store.create_endpoint("edge-2", "web")
    assert excinfo.value.field == "remote"
    with pytest.raises(NotFound) as excinfo:
        store.get_endpoint("edge-1", "nope")
    assert excinfo.value.field == "endpoint"
    with pytest.raises(InvalidArgument) as excinfo:
        store.create_endpoint("edge-1", "a b")
    assert excinfo.value.field == "name"

    store.delete_endpoint("edge-1", "api")
    assert [e.name for e in store.list_endpoints("edge-1")] == ["web"]
    store.delete_remote("edge-1")  # cascades to its endpoints
    store.create_remote("edge-1")
    assert store.list_endpoints("edge-1") == []


def test_routes(store: SQLiteStore) -> None:
    tcp = store.create_route("tcp", "2222", "namespaces/default/remotes/edge-1/endpoints/ssh")
    http = store.create_route("http", "Docs.Example.TEST", "web@edge-1")
    assert http.match == "docs.example.test"
    assert store.get_route(tcp.id) == tcp
    assert store.list_routes() == [tcp, http]
    assert store.list_routes("http") == [http]
    with pytest.raises(AlreadyExists) as excinfo:
        store.create_route("tcp", "2222", "127.0.0.1:22@elsewhere")
    assert excinfo.value.field == "match"
    store.create_route("sni", "2222.example", "x@y")  # (kind, match) is what is unique
    for args, field in [
        (("udp", "53", "x@y"), "kind"),
        (("tcp", "0", "x@y"), "match"),
        (("tcp", "http", "x@y"), "match"),
        (("http", "", "x@y"), "match"),
        (("http", "a b", "x@y"), "match"),
        (("http", "ok.example", " "), "target"),
        (("http", "ok.example", "edge-1/web"), "target"),
        (("tcp", "22", "127.0.0.1:0@edge-1"), "target"),
    ]:
        with pytest.raises(InvalidArgument) as excinfo:
            store.create_route(*args)
        assert excinfo.value.field == field, args
    with pytest.raises(InvalidArgument) as excinfo:
        store.list_routes("udp")
    assert excinfo.value.field == "kind"
    store.delete_route(tcp.id)
    with pytest.raises(NotFound) as excinfo:
        store.delete_route(tcp.id)
    assert excinfo.value.field == "route"


def test_errors_name_their_grpc_code() -> None:
    assert NotFound("remote", "x").code == "NOT_FOUND"
    assert AlreadyExists("remote", "x").code == "ALREADY_EXISTS"
    err = InvalidArgument("pattern", "bad")
    assert err.code == "INVALID_ARGUMENT" and isinstance(err, ValueError)
    assert str(err) == "pattern: bad"


# -- persistence, processes, threads ------------------------------------------------


def test_state_survives_reopen(backend: Backend) -> None:
    with backend() as first:
        token_id, token = first.create_token("remote", remote="edge-1")
        revoked_id, revoked = first.create_token("client")
        first.revoke(revoked_id)
        first.create_namespace("lab")
        first.create_remote("edge-1", description="kept")
        first.create_endpoint("edge-1", "web")
        route = first.create_route("tcp", "2222", "t@r")
        assert first.shared_secret("kept", lambda: b"value") == b"value"
    with backend() as second:
        assert second.verify(token).id == token_id
        assert second.verify(revoked) is None
        assert second.get_remote("edge-1").description == "kept"
        assert [e.name for e in second.list_endpoints("edge-1")] == ["web"]
        assert second.get_namespace("lab").name == "lab"
        assert second.list_routes() == [route]
        assert second.shared_secret("kept", bytes) == b"value"
        if isinstance(second, SQLiteStore):
            assert second.schema_version() == SCHEMA_VERSION


@pytest.mark.usefixtures("sqlite_store")
def test_file_mode_wal_and_schema_version(db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "namespaces", "tokens", "remotes", "endpoints", "routes", "kv"} <= tables


def test_newer_schema_is_refused(backend: Backend) -> None:
    backend().close()
    if backend.kind == "sqlite":
        raw = sqlite3.connect(backend.db_path)
        raw.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        raw.commit()
        raw.close()
    else:
        backend.redis().set(f"{backend.prefix}schema", "99")
    with pytest.raises(StoreError, match="schema version 99"):
        backend()


#: Version 2 of the SQLite schema, as sesame before the ``kv`` table wrote it.
_SCHEMA_V2 = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE namespaces (name TEXT PRIMARY KEY, create_time REAL NOT NULL)",
    "CREATE TABLE tokens (id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('remote', "
    "'client', 'admin')), namespace TEXT NOT NULL REFERENCES namespaces(name), remote TEXT, "
    "pattern TEXT, kdf TEXT NOT NULL, iterations INTEGER NOT NULL, salt BLOB NOT NULL, "
    "digest BLOB NOT NULL, create_time REAL NOT NULL, revoke_time REAL)",
    "CREATE TABLE remotes (namespace TEXT NOT NULL REFERENCES namespaces(name), name TEXT NOT "
    "NULL, display_name TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '', "
    "create_time REAL NOT NULL, PRIMARY KEY (namespace, name))",
    "CREATE TABLE endpoints (namespace TEXT NOT NULL, remote TEXT NOT NULL, name TEXT NOT NULL, "
    "display_name TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '', create_time "
    "REAL NOT NULL, PRIMARY KEY (namespace, remote, name), FOREIGN KEY (namespace, remote) "
    "REFERENCES remotes(namespace, name) ON DELETE CASCADE)",
    "CREATE TABLE routes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, match TEXT NOT NULL, "
    "target TEXT NOT NULL, created REAL NOT NULL, UNIQUE (kind, match))",
    "CREATE INDEX tokens_revoke_time ON tokens(revoke_time)",
    "INSERT INTO meta VALUES ('schema_version', '2')",
    "INSERT INTO namespaces VALUES ('default', 1700000000.0)",
    "INSERT INTO routes VALUES ('rt_000000000001', 'tcp', '2222', 'ssh@edge-1', 1700000001.0)",
]


def test_a_version_2_database_upgrades(db_path: Path) -> None:
    db_path.parent.mkdir()
    raw = sqlite3.connect(db_path)
    for statement in _SCHEMA_V2:
        raw.execute(statement)
    raw.commit()
    raw.close()
    with SQLiteStore(db_path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        assert [r.id for r in store.list_routes()] == ["rt_000000000001"]  # data kept
        token_id, token = store.create_token("client")
        assert store.verify(token).id == token_id
        assert store.shared_secret("peer", lambda: b"one") == b"one"
    with SQLiteStore(db_path) as again:  # and the upgrade happens once
        assert again.shared_secret("peer", lambda: b"two") == b"one"
        assert again.schema_version() == 3


def test_second_process_sees_creations_and_revocations(backend: Backend) -> None:
    """The hub keeps its store open while the ``sesame token`` CLI writes the same file."""
    with backend() as hub, backend() as cli:
        token_id, token = cli.create_token("remote", remote="edge-1")
        assert hub.verify(token) is not None
        assert cli.revoke(token_id)
        assert hub.verify(token) is None


def test_kdf_cost_is_per_token(backend: Backend) -> None:
    with backend(kdf_iterations=2_000) as old:
        token_id, token = old.create_token("client")
    with backend() as new:
        assert new.verify(token) is not None
        if backend.kind == "sqlite":
            stored = sqlite3.connect(backend.db_path).execute(
                "SELECT iterations FROM tokens").fetchone()
            assert stored == (2_000,)
        else:
            stored = backend.redis().hget(f"{backend.prefix}token:{token_id}", "iterations")
            assert stored == b"2000"


def test_closed_store_raises(backend: Backend) -> None:
    s = backend()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_tokens()


def test_concurrent_use_from_threads_is_safe(store: SQLiteStore) -> None:
    made: list[str] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                _, token = store.create_token("remote", remote=f"edge-{n}")
                made.append(token)
                assert store.verify(token).remote == f"edge-{n}"
                store.create_remote(f"r{n}-{i}")
                store.list_remotes()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(made) == 60 and len(store.list_tokens()) == 60
    assert len(store.list_remotes()) == 60


# -- shared secrets, revocations, change markers ---------------------------------------


def test_shared_secret_is_created_once(store: Store) -> None:
    calls: list[int] = []

    def make() -> bytes:
        calls.append(1)
        return secrets.token_bytes(32)

    first = store.shared_secret("peer-secret", make)
    assert isinstance(first, bytes) and len(first) == 32
    assert store.shared_secret("peer-secret", make) == first
    assert len(calls) == 1  # not called while the value exists
    assert store.shared_secret("cluster-ca", lambda: b"\x00\xffbinary") == b"\x00\xffbinary"
    with pytest.raises(InvalidArgument) as excinfo:
        store.shared_secret("bad name", make)
    assert excinfo.value.field == "name"
    with pytest.raises(InvalidArgument) as excinfo:
        store.shared_secret("text", lambda: "not bytes")  # type: ignore[arg-type, return-value]
    assert excinfo.value.field == "factory"


def test_racing_shared_secret_callers_agree(backend: Backend) -> None:
    stores = [backend() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    got: list[bytes] = []

    def slow_factory() -> bytes:
        barrier.wait(10)  # every caller has found nothing and made its own value
        return secrets.token_bytes(16)

    def call(s: Store) -> None:
        got.append(s.shared_secret("raced", slow_factory))

    threads = [threading.Thread(target=call, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert len(got) == 4 and len(set(got)) == 1


def test_revoked_since_and_change_marker(store: Store) -> None:
    marker = store.change_marker()
    assert store.change_marker() == marker  # nothing changed
    id1, _ = store.create_token("client")
    id2, _ = store.create_token("client")
    after_create = store.change_marker()
    assert after_create != marker
    assert store.revoked_since(0) == []
    store.revoke(id1)
    first_revoke = store.get_token(id1).revoke_time
    assert store.change_marker() != after_create
    store.revoke(id2)
    assert sorted(store.revoked_since(0)) == sorted([id1, id2])
    assert sorted(store.revoked_since(first_revoke)) == sorted([id1, id2])  # inclusive
    assert store.revoked_since(first_revoke + 0.5) == [id2]
    assert store.revoked_since(store.get_token(id2).revoke_time + 0.5) == []
    for change in (lambda: store.create_namespace("lab"),
                   lambda: store.create_remote("edge-1"),
                   lambda: store.create_endpoint("edge-1", "web"),
                   lambda: store.create_route("http", "a.example", "web@edge-1")):
        before = store.change_marker()
        change()
        assert store.change_marker() != before


def test_listing_orders_match(store: Store) -> None:
    """Both backends list in the same order: tokens and routes by creation time then id,
    namespaces by name, remotes by namespace then name, endpoints by name."""
    for ns in ("zeta", "a-b", "a", "A"):
        store.create_namespace(ns)
    assert [n.name for n in store.list_namespaces()] == ["A", "a", "a-b", "default", "zeta"]
    for ns, name in [("a-b", "x"), ("a", "y"), ("a", "X"), ("zeta", "b"), ("default", "m")]:
        store.create_remote(name, namespace=ns)
    assert [(r.namespace, r.name) for r in store.list_remotes()] == [
        ("a", "X"), ("a", "y"), ("a-b", "x"), ("default", "m"), ("zeta", "b")]
    for name in ("web", "API", "api", "z-1"):
        store.create_endpoint("m", name)
    assert [e.name for e in store.list_endpoints("m")] == ["API", "api", "web", "z-1"]
    ids = [store.create_token("client")[0] for _ in range(5)]
    assert [t.id for t in store.list_tokens()] == ids
    routes = [store.create_route("http", f"h{i}.example", "web@m").id for i in range(5)]
    assert [r.id for r in store.list_routes()] == routes
