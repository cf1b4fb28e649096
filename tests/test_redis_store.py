"""sesame.hub._redisstore against a real redis-server: what only a shared, networked store
has to get right (races between hubs, the bus, outages, URLs, the CLI).  The behaviour
both backends share is tests/test_store.py, which runs every test against both."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sesame.hub import RedisStore, check_store_url, open_store_url
from sesame.hub.store import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    SQLiteStore,
    StoreError,
    StoreUnavailable,
    parse_token,
    redact_url,
)
from sesame.testing.redis import RedisServer, redis_server_path

SESAME = str(Path(sys.executable).parent / "sesame")
PASSWORD = "hunter2-Secret"


def _prefix() -> str:
    return f"t-{secrets.token_hex(4)}:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefix() -> str:
    return _prefix()


@pytest.fixture
def store(redis_server: RedisServer, prefix: str) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, prefix=prefix)
    yield s
    s.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone (it gets killed), with a password."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        yield server


def _raw(server: RedisServer) -> Any:
    import redis

    return redis.Redis.from_url(server.url)


# -- races between hubs ------------------------------------------------------------------


def _race(stores: list[RedisStore], action: Callable[[RedisStore], object]) -> list[str]:
    """Run ``action`` on every store at once (one thread each); "ok" or the error's name."""
    barrier = threading.Barrier(len(stores))
    results: list[str] = []

    def run(s: RedisStore) -> None:
        barrier.wait(10)
        try:
            action(s)
            results.append("ok")
        except StoreError as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(results)


def test_racing_creates_have_exactly_one_winner(redis_server: RedisServer, prefix: str) -> None:
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(6)]
    try:
        stores[0].create_remote("base")
        for n in range(15):
            for action in (
                lambda s, n=n: s.create_namespace(f"ns{n}"),
                lambda s, n=n: s.create_remote(f"edge-{n}"),
                lambda s, n=n: s.create_endpoint("base", f"ep{n}"),
                lambda s, n=n: s.create_route("http", f"h{n}.example", "web@base"),
            ):
                assert _race(stores, action) == ["AlreadyExists"] * 5 + ["ok"]
        assert len(stores[1].list_routes()) == 15
        assert len(stores[2].list_remotes()) == 16
        assert len(stores[3].list_endpoints("base")) == 15
        assert len(stores[4].list_namespaces()) == 16
    finally:
        for s in stores:
            s.close()


def test_racing_revokes_revoke_once(redis_server: RedisServer, prefix: str) -> None:
    stores = [RedisStore(redis_server.url, prefix=prefix) for _ in range(4)]
    try:
        for _ in range(10):
            token_id, _ = stores[0].create_token("client")
            outcomes: list[bool] = []
            _race(stores, lambda s, t=token_id, out=outcomes: out.append(s.revoke(t)))
            assert sorted(outcomes) == [False, False, False, True]
    finally:
        for s in stores:
            s.close()


def test_deleting_a_namespace_while_others_fill_it_leaves_no_orphans(
        redis_server: RedisServer, prefix: str) -> None:
    a = RedisStore(redis_server.url, prefix=prefix)
    b = RedisStore(redis_server.url, prefix=prefix)
    raw = _raw(redis_server)
    try:
        for n in range(20):
            ns = f"lab{n}"
            a.create_namespace(ns)
            results = _race([a, b, a], lambda s, ns=ns, n=n: (
                s.delete_namespace(ns) if s is b else
                s.create_remote(f"edge-{secrets.token_hex(2)}", namespace=ns)))
            assert len(results) == 3 and set(results) <= {"ok", "NotFound", "InvalidArgument"}
            try:
                a.get_namespace(ns)
            except NotFound:  # deleted: nothing of it may remain
                leftovers = raw.keys(f"{prefix}ns:{ns}*") + raw.keys(f"{prefix}remote:{ns}:*")
                assert leftovers == []
                assert ns.encode() not in raw.smembers(f"{prefix}namespaces")
            else:  # kept: because a remote got in first, and every remote is listed
                remotes = a.list_remotes(ns)
                assert remotes
                assert len(raw.keys(f"{prefix}remote:{ns}:*")) == len(remotes)
        # a namespace with a live token is kept; with revoked ones it goes, tokens and all
        a.create_namespace("tok")
        token_id, _ = a.create_token("client", namespace="tok")
        with pytest.raises(InvalidArgument, match="live tokens"):
            b.delete_namespace("tok")
        b.revoke(token_id)
        b.delete_namespace("tok")
        assert raw.keys(f"{prefix}token:{token_id}") == []
        assert token_id not in b.revoked_since(0)
        assert token_id not in [t.id for t in a.list_tokens()]
    finally:
        a.close()
        b.close()


# -- the bus ---------------------------------------------------------------------------


def test_every_mutation_is_published_and_counted(redis_server: RedisServer,
                                                 store: RedisStore, prefix: str) -> None:
    raw = _raw(redis_server)
    bus = raw.pubsub()
    bus.subscribe(f"{prefix}bus")
    assert bus.get_message(timeout=5)["type"] == "subscribe"
    marker = store.change_marker()

    store.create_namespace("lab")
    token_id, _ = store.create_token("remote", remote="edge-1", namespace="lab")
    store.revoke(token_id)
    store.create_remote("edge-1", namespace="lab")
    store.update_remote("edge-1", namespace="lab", description="rack 4")
    store.create_endpoint("edge-1", "web", namespace="lab")
    store.update_endpoint("edge-1", "web", namespace="lab", display_name="Web")
    route = store.create_route("http", "web.example", "web@edge-1")
    store.delete_route(route.id)
    store.delete_endpoint("edge-1", "web", namespace="lab")
    store.delete_remote("edge-1", namespace="lab")
    store.delete_namespace("lab")
    store.shared_secret("peer", lambda: b"x")
    # refused changes publish nothing
    with pytest.raises(AlreadyExists):
        store.create_namespace("default")
    with pytest.raises(NotFound):
        store.delete_route("rt_000000000000")
    assert store.revoke(token_id) is False
    store.shared_secret("peer", lambda: b"y")  # exists: no change

    expected = [
        ("namespace", "create", "lab"),
        ("token", "create", token_id),
        ("token", "revoke", token_id),
        ("remote", "create", "lab/edge-1"),
        ("remote", "update", "lab/edge-1"),
        ("endpoint", "create", "lab/edge-1/web"),
        ("endpoint", "update", "lab/edge-1/web"),
        ("route", "create", route.id),
        ("route", "delete", route.id),
        ("endpoint", "delete", "lab/edge-1/web"),
        ("remote", "delete", "lab/edge-1"),
        ("namespace", "delete", "lab"),
        ("secret", "create", "peer"),
    ]
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(got) < len(expected) and time.monotonic() < deadline:
        m = bus.get_message(timeout=1)
        if m and m["type"] == "message":
            got.append(json.loads(m["data"]))
    assert bus.get_message(timeout=0.2) is None  # and nothing more
    bus.close()
    assert [(m["kind"], m["op"], m["id"]) for m in got] == expected
    assert all(m["t"] == "store" and abs(m["ts"] - time.time()) < 60 for m in got)
    assert store.change_marker() == marker + len(expected)


# -- outages -----------------------------------------------------------------------------


def test_kill_9_then_restart_loses_nothing(own_server: RedisServer) -> None:
    store = RedisStore(own_server.url)
    token_id, token = store.create_token("remote", remote="edge-1")
    revoked_id, revoked = store.create_token("client")
    store.revoke(revoked_id)
    route = store.create_route("tcp", "2222", "127.0.0.1:22@edge-1")
    secret = store.shared_secret("peer", lambda: secrets.token_bytes(32))
    port, pid = own_server.port, own_server.pid

    own_server.kill()
    for call in (lambda: store.verify(token), lambda: store.create_token("client"),
                 store.list_tokens, store.change_marker, lambda: store.revoked_since(0),
                 lambda: store.create_remote("edge-2"), store.list_routes,
                 lambda: store.shared_secret("other", bytes)):
        with pytest.raises(StoreUnavailable) as excinfo:
            call()
        message = str(excinfo.value)
        assert message.startswith("store unavailable: ")
        assert PASSWORD not in message and excinfo.value.code == "UNAVAILABLE"

    own_server.start()  # same port, same directory: the AOF
    assert (own_server.port, own_server.pid != pid) == (port, True)
    # the same store object reconnects by itself
    assert store.verify(token).id == token_id
    assert store.verify(revoked) is None
    assert store.list_routes() == [route]
    assert store.shared_secret("peer", bytes) == secret
    assert store.revoked_since(0) == [revoked_id]
    with RedisStore(own_server.url) as fresh:
        assert fresh.verify(token).remote == "edge-1"
    store.close()


def test_a_hung_server_times_out(own_server: RedisServer) -> None:
    store = RedisStore(own_server.url, timeout=0.5)
    _, token = store.create_token("client")
    os.kill(own_server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="store unavailable"):
            store.verify(token)
        assert time.monotonic() - started < 5
    finally:
        os.kill(own_server.pid, signal.SIGCONT)
    assert store.verify(token) is not None  # the next call works
    store.close()


def test_construction_needs_an_answering_server(own_server: RedisServer) -> None:
    dead = f"redis://:{PASSWORD}@127.0.0.1:{_free_port()}/0"
    with pytest.raises(StoreUnavailable) as excinfo:
        RedisStore(dead)
    assert str(excinfo.value).startswith("store unavailable: ") and PASSWORD not in str(
        excinfo.value)
    wrong = f"redis://:wrong-{PASSWORD}@127.0.0.1:{own_server.port}/0"
    with pytest.raises(StoreUnavailable) as excinfo:
        RedisStore(wrong)
    assert PASSWORD not in str(excinfo.value)
    with pytest.raises(StoreUnavailable):  # no password at all
        RedisStore(f"redis://127.0.0.1:{own_server.port}/0")
    with RedisStore(own_server.url) as ok:
        assert ok.list_namespaces()[0].name == "default"
        assert PASSWORD not in repr(ok) and PASSWORD not in ok.url


def test_secrets_are_stored_only_as_salted_hashes(redis_server: RedisServer,
                                                 store: RedisStore, prefix: str) -> None:
    made = [store.create_token("remote", remote="edge-1") for _ in range(3)]
    made.append(store.create_token("client"))
    raw = _raw(redis_server)
    values = b""
    for key in raw.keys(f"{prefix}*"):
        values += key
        kind = raw.type(key)
        if kind == b"hash":
            values += b"".join(k + v for k, v in raw.hgetall(key).items())
        elif kind == b"string":
            values += raw.get(key)
        elif kind == b"zset":
            values += b"".join(raw.zrange(key, 0, -1))
        elif kind == b"set":
            values += b"".join(raw.smembers(key))
    raw.execute_command("BGREWRITEAOF")
    time.sleep(0.2)
    on_disk = b"".join(p.read_bytes() for p in redis_server.directory.rglob("*") if p.is_file())
    for token_id, token in made:
        hashed = raw.hgetall(f"{prefix}token:{token_id}")
        assert set(hashed) >= {b"salt", b"digest", b"kdf", b"iterations"}
        secret = parse_token(token)[1].encode()
        assert secret not in values and secret not in on_disk
        assert token_id.encode() in values


# -- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    f"redis://default:{PASSWORD}@127.0.0.1:6379/0",
    f"rediss://:{PASSWORD}@redis.example:6380/2?ssl_ca_certs=/etc/ca@x.pem",
    f"redis://127.0.0.1/0?password={PASSWORD}",
    f"rediss://h/0?ssl_password={PASSWORD}&ssl_certfile=/c.pem",
    f"redis://:{PASSWORD[:4]}/{PASSWORD[4:]}@h:6379/0",  # an unencoded "/" in the password
    f"redis://:{PASSWORD[:4]}?{PASSWORD[4:]}@h:6379/0",
    f"redis://:{PASSWORD[:4]}#{PASSWORD[4:]}@h:6379/0",
    f"redis://:{PASSWORD[:4]}@{PASSWORD[4:]}@h:6379/0",
    f"redis://:{PASSWORD}@h:notaport/0",
])
def test_redact_url_never_shows_the_password(url: str) -> None:
    shown = redact_url(url)
    assert "***" in shown
    for part in (PASSWORD, PASSWORD[:4], PASSWORD[4:]):
        assert part not in shown, shown
    try:
        check_store_url(url)
    except InvalidArgument as exc:  # (the malformed ones)
        for part in (PASSWORD, PASSWORD[:4], PASSWORD[4:]):
            assert part not in str(exc)


def test_redact_url_keeps_the_rest() -> None:
    assert redact_url("redis://:pw@10.0.0.5:6379/3") == "redis://:***@10.0.0.5:6379/3"
    assert redact_url("redis://admin:pw@h/0") == "redis://admin:***@h/0"
    for plain in ("redis://10.0.0.5:6379/3", "rediss://h:6380/0?ssl_cert_reqs=required",
                  "sqlite:///var/lib/sesame/a@b.db", "/var/lib/sesame/hub.db", "redis://user@h"):
        assert redact_url(plain) == plain


@pytest.mark.parametrize("url,problem", [
    ("http://h:6379/0", "unsupported scheme 'http'"),
    ("postgres://u:hunter2@h/db", "unsupported scheme 'postgres'"),
    (f"redis://:{PASSWORD}@127.0.0.1:6379/zero", "bad database number 'zero'"),
    ("redis://127.0.0.1:6379/0/1", "bad database number '0/1'"),
    ("redis://127.0.0.1:6379/?db=x", "bad database number 'x'"),
    ("redis://127.0.0.1:99999/0", "bad host or port"),
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs needs rediss://"),
    ("redis://127.0.0.1:6379/0?colour=blue", "unknown option 'colour'"),
    ("redis://127.0.0.1/0?prefix=", "prefix must be non-empty"),
    ("sqlite://", "no file"),
    ("", "empty store URL"),
])
def test_bad_store_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        check_store_url(url)
    assert excinfo.value.field == "store"
    assert problem in str(excinfo.value)
    assert PASSWORD not in str(excinfo.value)


def test_store_urls_open_the_store_they_name(redis_server: RedisServer, tmp_path: Path) -> None:
    assert check_store_url("redis://127.0.0.1:6379") == "redis"
    assert check_store_url("rediss://h:6380/1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required") \
        == "redis"
    assert check_store_url("sqlite:///tmp/x.db") == check_store_url("x/hub.db") == "sqlite"
    for url, path in [(f"sqlite://{tmp_path}/a.db", tmp_path / "a.db"),
                      (str(tmp_path / "b.db"), tmp_path / "b.db"),
                      (str(tmp_path), tmp_path / "hub.db")]:  # a directory: its hub.db
        with open_store_url(url) as s:
            assert isinstance(s, SQLiteStore) and s.path == path
    with open_store_url(redis_server.url + "?prefix=via-url:") as s:
        assert isinstance(s, RedisStore) and s.prefix == "via-url:" and s.networked
        s.create_namespace("seen")
    assert _raw(redis_server).exists("via-url:ns:seen")
    with open_store_url(redis_server.url) as s:
        assert s.prefix == "sesame:"


def test_rediss_speaks_tls(redis_server: RedisServer) -> None:
    """rediss:// uses TLS (here against a plain-text server, which cannot answer it)."""
    with pytest.raises(StoreUnavailable):
        RedisStore(f"rediss://127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=none", timeout=1)


# -- the command line -------------------------------------------------------------------


def _sesame(*args: str, cwd: Path, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SESAME_STORE", "SESAME_DATA_DIR")}
    full_env.update(env or {})
    return subprocess.run([SESAME, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)


def test_token_cli_with_store(redis_server: RedisServer, tmp_path: Path) -> None:
    prefix = _prefix()
    url = f"{redis_server.url}?prefix={prefix}"
    made = _sesame("token", "create", "--client", "--remotes", "edge-*", "--store", url,
                   cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    with RedisStore(redis_server.url, prefix=prefix) as store:
        info = store.verify(token)
        assert info.kind == "client" and info.pattern == "edge-*"
        listed = _sesame("token", "list", "--store", url, cwd=tmp_path)
        assert listed.returncode == 0 and info.id in listed.stdout and "live" in listed.stdout
        gone = _sesame("token", "revoke", info.id, cwd=tmp_path, env={"SESAME_STORE": url})
        assert gone.returncode == 0, gone.stderr
        assert store.verify(token) is None
    assert not (tmp_path / ".sesame").exists()  # no SQLite store on the side


def test_route_cli_with_store(redis_server: RedisServer, tmp_path: Path) -> None:
    prefix = _prefix()
    url = f"{redis_server.url}?prefix={prefix}"
    added = _sesame("route", "add", "tcp", "2222", "127.0.0.1:22@edge-1", "--store", url,
                    cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    route_id = added.stdout.strip()
    listed = _sesame("route", "ls", "--json", "--store", url, cwd=tmp_path)
    assert [r["id"] for r in json.loads(listed.stdout)] == [route_id]
    with RedisStore(redis_server.url, prefix=prefix) as store:
        assert store.get_route(route_id).target == "127.0.0.1:22@edge-1"
        removed = _sesame("route", "rm", route_id, "--store", url, cwd=tmp_path)
        assert removed.returncode == 0, removed.stderr
        assert store.list_routes() == []


@pytest.mark.parametrize("args,problem", [
    (["token", "list", "--store", "http://127.0.0.1:6379/0"],
     "sesame token: --store: unsupported scheme 'http'"),
    (["token", "create", "--client", "--store", f"redis://:{PASSWORD}@127.0.0.1:6379/x"],
     "sesame token: --store: bad database number 'x'"),
    (["route", "ls", "--store", f"redis://:{PASSWORD}@127.0.0.1:{{dead}}/0"],
     "sesame route: --store redis://:***@127.0.0.1:"),
    (["token", "list", "--store", "redis://127.0.0.1:6379/0", "--data-dir", "."],
     "sesame token: give --store or --data-dir, not both"),
])
def test_cli_store_errors_are_one_clear_line(args: list[str], problem: str,
                                             tmp_path: Path) -> None:
    args = [a.replace("{dead}", str(_free_port())) for a in args]
    done = _sesame(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(problem), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert PASSWORD not in done.stderr + done.stdout
    if "dead" in problem or ":***@" in problem:
        assert "store unavailable" in done.stderr


def test_hub_takes_store_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.python import usage

    from sesame.tap import HubOptions

    o = HubOptions()
    o.parseOptions(["--store", "redis://127.0.0.1:6379/1"])
    assert o["store"] == "redis://127.0.0.1:6379/1"
    monkeypatch.setenv("SESAME_STORE", "redis://10.0.0.9:6379/2")
    o = HubOptions()
    o.parseOptions([])
    assert o["store"] == "redis://10.0.0.9:6379/2"
    monkeypatch.delenv("SESAME_STORE")
    o = HubOptions()
    o.parseOptions([])
    assert o["store"] is None  # SQLite in the data directory, as before
    for bad, problem in [("ftp://h/0", "unsupported scheme 'ftp'"),
                         (f"redis://:{PASSWORD}@h:6379/db1", "bad database number 'db1'")]:
        with pytest.raises(usage.UsageError) as excinfo:
            HubOptions().parseOptions(["--store", bad])
        assert str(excinfo.value).startswith(f"--store: {problem}")
        assert PASSWORD not in str(excinfo.value)


def test_hub_with_an_unreachable_store_does_not_start(tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{_free_port()}/0"
    done = _sesame("hub", "--no-tls", "--listen", "tcp:0:interface=127.0.0.1",
                   "--data-dir", str(tmp_path / "data"), "--store", url, cwd=tmp_path)
    assert done.returncode != 0
    assert "store unavailable" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


def test_hub_serves_tokens_from_a_redis_store(own_server: RedisServer, tmp_path: Path) -> None:
    """``sesame hub --store redis://...`` checks tokens that ``sesame token create --store``
    made (SESAME_STORE for both), and logs the store URL without its password."""
    env = {"SESAME_STORE": own_server.url, "SESAME_TLS": "no"}
    port_file = tmp_path / "port"
    hub = subprocess.Popen(
        [SESAME, "hub", "--no-tls", "--listen", "tcp:0:interface=127.0.0.1", "--port-file",
         str(port_file), "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert hub.poll() is None and time.monotonic() < deadline, hub.stdout.read()
            time.sleep(0.05)
        where = f"127.0.0.1:{port_file.read_text().strip()}"
        token = _sesame("token", "create", "--client", cwd=tmp_path, env=env).stdout.strip()
        ok = _sesame("remotes", "--hub", where, "--json", cwd=tmp_path,
                     env={**env, "SESAME_TOKEN": token})
        assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
        _sesame("token", "revoke", token, cwd=tmp_path, env=env)
        refused = _sesame("remotes", "--hub", where, cwd=tmp_path,
                          env={**env, "SESAME_TOKEN": token})
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    finally:
        os.kill(hub.pid, signal.SIGTERM)
        out, _ = hub.communicate(timeout=30)
    assert "redis://:***@127.0.0.1" in out and PASSWORD not in out
