"""
A cluster of real ``sesame hub --store redis://...`` processes on a throw-away
``redis-server`` (docs/CLUSTER.md, issue 11 "Tests (real parts)").

Everything here is a process of its own: the Redis server
(:class:`sesame.testing.redis.RedisServer`, one per test so no test sees another's
bus), the hubs, the remotes (``sesame remote``), ``sesame forward``,
``sesame token|route ...`` and ``sesame remotes``.  The test process plays the
client with the call the ``sesame:`` client endpoint makes
(``RemoteControl/NetConn`` over TLS trusting the cluster CA), so every status a hub
answers is seen as it is; targets are :class:`tests.e2e_support.TargetServer`
(sink / source / echo) and every transfer is checked by sha256.  Waits end on log
lines or conditions with deadlines; processes are stopped (or ``kill -9``-ed) by
PID.  The in-process cluster tests are in tests/test_cluster.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from sesame.netconn._wire import MAX_MESSAGE, METHOD, decode_bytes, encode_bytes
from sesame.testing.redis import RedisServer, redis_server_path
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from tests.e2e_support import (
    FORWARDING,
    REGISTERED,
    SESAME,
    WAIT,
    Proc,
    Procs,
    TargetServer,
    child_env,
    download_source,
    pattern_chunks,
    pattern_sha256,
    recv_all,
    recv_exactly,
    sesame,
    upload_sink,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    redis_server_path() is None,
    reason="redis-server is not installed (apt-get install redis-server; .ci/run does)")

#: Bytes each way per cell of the 3x3 matrix.
MATRIX_BYTES = 256 * 1024
#: A short lease for the lease-expiry test (SESAME_CLUSTER_LEASE / _RENEW, seconds).
SHORT_LEASE, SHORT_RENEW = 3.0, 1.0
#: How often hubs look for expired leases (sesame.hub.cluster.SWEEP).
SWEEP = 1.0
JOINED = r"sesame hub (\S+) joined the cluster \("


# --- the client: one NetConn call through a hub ---------------------------------------------


class NetConn:
    """A TCP connection through ``hub`` to ``127.0.0.1:port`` seen from ``remote``: the
    ``RemoteControl/NetConn`` call the ``sesame:`` client endpoint makes (a dial, the
    ``conn`` answer, then bytes both ways; half-close = end of the request stream).
    Raises ``grpc.RpcError`` when the hub (or the remote) refuses."""

    def __init__(self, channel: grpc.Channel, token: str, remote: str, port: int,
                 timeout: float = WAIT) -> None:
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        dial = rc_pb.NetConnRequest.Dial()
        dial.address.network = "tcp"
        dial.address.address = f"127.0.0.1:{port}"
        self._q.put(rc_pb.NetConnRequest(dial=dial).SerializeToString())
        self.call = channel.stream_stream(METHOD)(
            self._requests(), timeout=timeout,
            metadata=(("authorization", f"Bearer {token}"), ("sesame-remote", remote)))
        # however the call ends (a revoked token, a killed hub), grpc's thread consuming
        # _requests() must not wait in _q.get() for ever
        self.call.add_callback(lambda: self._q.put(None))
        try:
            first = next(self.call)
            if rc_pb.NetConnResponse.FromString(first).WhichOneof("data") != "conn":
                raise AssertionError(f"first NetConn answer is not conn: {first!r}")
        except BaseException:
            # grpc's thread consuming _requests() would wait in _q.get() for ever: one
            # leaked thread per refused attempt (a probe retried for 20 s left 156)
            self.close()
            raise
        self._buf = b""

    def _requests(self) -> Iterator[bytes]:
        while True:
            m = self._q.get()
            if m is None:
                return
            yield m

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_MESSAGE):
            self._q.put(encode_bytes(data[i:i + MAX_MESSAGE]))

    def shutdown(self) -> None:
        """Half-close (the remote shuts down the write side of its target socket)."""
        self._q.put(None)

    def recv(self) -> bytes:
        """The next chunk; b"" at the end of the stream (grpc.RpcError for a failed one)."""
        if self._buf:
            data, self._buf = self._buf, b""
            return data
        for msg in self.call:
            data = decode_bytes(msg, rc_pb.NetConnResponse)
            if data is None:
                return b""
            if data:
                return data
        return b""

    def recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = self.recv()
            if not data:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += data
        buf, self._buf = buf[:n], buf[n:]
        return buf

    def recv_all(self) -> bytes:
        out = bytearray()
        while True:
            data = self.recv()
            if not data:
                return bytes(out)
            out += data

    def close(self) -> None:
        self._q.put(None)
        self.call.cancel()


def echo_once(channel: grpc.Channel, token: str, remote: str, port: int, n: int = 64,
              timeout: float = WAIT) -> None:
    """Connect, echo ``n`` random bytes, check them, half-close, expect EOF, close."""
    c = NetConn(channel, token, remote, port, timeout)
    try:
        c.send(b"echo\n")
        msg = hashlib.sha256(str(time.monotonic_ns()).encode()).digest() * (n // 32 + 1)
        msg = msg[:n]
        c.send(msg)
        got = c.recv_exactly(n)
        assert got == msg, "echo answered other bytes"
        c.shutdown()
        assert c.recv_all() == b""
    finally:
        c.close()


def upload_sha(channel: grpc.Channel, token: str, remote: str, port: int, nbytes: int,
               seed: int) -> tuple[str, str]:
    """``nbytes`` to the sink → (sha256 sent, sha256 the target received)."""
    c = NetConn(channel, token, remote, port, 60)
    try:
        c.send(b"sink\n")
        sent = hashlib.sha256()
        for chunk in pattern_chunks(nbytes, seed):
            sent.update(chunk)
            c.send(chunk)
        c.shutdown()
        digest, _, total = c.recv_all().decode().strip().partition(" ")
        assert total == str(nbytes), f"the sink got {total} of {nbytes} bytes"
        return sent.hexdigest(), digest
    finally:
        c.close()


def download_sha(channel: grpc.Channel, token: str, remote: str, port: int, nbytes: int,
                 seed: int) -> tuple[str, int]:
    """``nbytes`` from the source → (sha256 of what arrived, how many bytes)."""
    c = NetConn(channel, token, remote, port, 60)
    try:
        c.send(f"source {nbytes} {seed}\n".encode())
        c.shutdown()
        h = hashlib.sha256()
        total = 0
        while True:
            data = c.recv()
            if not data:
                return h.hexdigest(), total
            h.update(data)
            total += len(data)
    finally:
        c.close()


def refusal(fn: Any, *args: Any) -> grpc.RpcError:
    """The grpc error ``fn(*args)`` raises (AssertionError when it succeeds)."""
    try:
        fn(*args)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args[2:]} succeeded")


# --- the cluster under test ---------------------------------------------------------------


@dataclass
class LabHub:
    name: str
    proc: Proc
    port: int
    data_dir: Path
    id: str
    http: int | None = None
    channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data_dir / "ca.pem"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {"name{labels}": value} (needs ``http=True``)."""
        assert self.http is not None, f"hub {self.name} has no --http"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def logged(self, pattern: str, start: int = 0) -> list[str]:
        rx = re.compile(pattern)
        with self.proc.err._cond:
            return [line for line in self.proc.err.lines[start:] if rx.search(line)]


class Lab:
    """One Redis, the hubs and remotes of one test, and the test's tokens."""

    def __init__(self, tmp: Path, procs: Procs) -> None:
        from sesame.hub._redisstore import RedisStore

        self.tmp = tmp
        self.procs = procs
        self.redis = RedisServer(tmp / "redis")
        self.url = self.redis.url
        try:
            self.store = RedisStore(self.url)
            self.client_id, self.client = self.store.create_token("client", pattern="*")
        except BaseException:
            self.redis.stop()
            raise
        self.hubs: list[LabHub] = []
        self.targets: list[TargetServer] = []
        self.watches: list[BusWatch] = []

    def bus(self) -> BusWatch:
        """Watch the bus from now on (closed with the lab)."""
        w = BusWatch(self)
        self.watches.append(w)
        return w

    def close(self) -> None:
        try:
            for w in self.watches:
                w.close()
            for h in self.hubs:
                if h.channel is not None:
                    h.channel.close()
            for t in self.targets:
                t.close()
            self.store.close()
        finally:
            self.redis.stop()  # whatever else failed: no orphaned redis-server

    def target(self) -> TargetServer:
        t = TargetServer()
        self.targets.append(t)
        return t

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    # -- hubs

    def start_hubs(self, *names: str, http: bool = False, env: dict[str, str] | None = None,
                   extra: Sequence[str] = ()) -> list[LabHub]:
        """Start hubs named ``names`` at once; return when each joined the cluster and
        every hub of the lab has seen every other one join."""
        started = []
        for name in names:
            d = self.tmp / name
            d.mkdir()
            port_file = self.tmp / f"{name}.port"
            argv = [*SESAME, "hub", "--listen", "tcp:0:interface=127.0.0.1", "--data-dir",
                    str(d), "--store", self.url, "--port-file", str(port_file), *extra]
            if http:
                argv += ["--http", "tcp:0:interface=127.0.0.1", "--metrics-public"]
            proc = self.procs.start(f"hub-{name}", argv, cwd=self.tmp,
                                    env=child_env(**(env or {})))
            started.append((name, d, port_file, proc))
        new = []
        for name, d, port_file, proc in started:
            hub_id = proc.wait_line(JOINED, 30).group(1)
            port = int(port_file.read_text())
            http_port = None
            if http:
                http_port = int(proc.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
                                .group(1))
            h = LabHub(name, proc, port, d, hub_id, http_port)
            h.channel = grpc.secure_channel(h.address,
                                            grpc.ssl_channel_credentials(h.ca.read_bytes()))
            new.append(h)
        self.hubs += new
        for h in self.hubs:
            if not h.proc.alive():
                continue
            for o in self.hubs:
                if o is not h and o.proc.alive():
                    h.proc.wait_line(rf"\bhub {re.escape(o.id)} joined the cluster at ")
        return new

    # -- remotes

    def remote_token(self, name: str) -> tuple[str, Path]:
        """(token id, token file) for remote ``name``."""
        token_id, token = self.store.create_token("remote", remote=name)
        path = self.tmp / f"{name}-{token_id}.token"
        path.write_text(token + "\n")
        return token_id, path

    def start_remote(self, name: str, hubs: Sequence[LabHub], allow: Sequence[str], *,
                     token_file: Path | None = None, proc_name: str | None = None,
                     extra: Sequence[str] = (), wait: int | None = None) -> Proc:
        """``sesame remote --hub H ... --name NAME``; returns once it registered with
        ``wait`` hubs (default: all of ``hubs``; 0: at once)."""
        if token_file is None:
            token_file = self.remote_token(name)[1]
        argv = [*SESAME, "remote", "--name", name, "--token-file", str(token_file),
                "--ca", str(hubs[0].ca), *extra]
        for h in hubs:
            argv += ["--hub", h.address]
        for a in allow:
            argv += ["--allow", a]
        proc = self.procs.start(proc_name or f"remote-{name}", argv, cwd=self.tmp)
        for i in range(len(hubs) if wait is None else wait):
            self.wait_registered(proc, i + 1)
        return proc

    @staticmethod
    def wait_registered(proc: Proc, n: int = 1, timeout: float = WAIT) -> None:
        """Until ``proc`` logged its ``n``-th registration."""
        start = 0
        for _ in range(n):
            proc.wait_line(REGISTERED, timeout, start=start)
            start = proc.err.find(REGISTERED, start)[0] + 1  # type: ignore[index]


class BusWatch(threading.Thread):
    """The cluster's bus (``sesame:bus``) seen from the test: when each store change was
    committed and published (what every hub receives at the same moment)."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self._r = lab.redis_client()
        self._ps = self._r.pubsub(ignore_subscribe_messages=True)
        self._ps.subscribe("sesame:bus")
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.start()

    def run(self) -> None:
        while not self._stopping:
            try:
                msg = self._ps.get_message(timeout=0.1)
            except Exception:  # noqa: BLE001 - Redis gone (a test kills it): stop watching
                return
            if msg is None or msg.get("type") != "message":
                continue
            with self._cond:
                self.seen.append((time.monotonic(), json.loads(msg["data"])))
                self._cond.notify_all()

    def wait(self, timeout: float = WAIT, **match: Any) -> float:
        """When the first message with all of ``match`` arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, m in self.seen:
                    if all(m.get(k) == v for k, v in match.items()):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no bus message {match} within {timeout:g}s")
                self._cond.wait(left)

    def close(self) -> None:
        self._stopping = True
        self.join(5)
        self._ps.close()
        self._r.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    procs = Procs()
    lab = Lab(tmp_path, procs)
    try:
        yield lab
    finally:
        try:
            procs.stop_all()
            # shown by pytest only when the test failed
            print(procs.describe())
        finally:
            lab.close()


def reachable(hub: LabHub, token: str, remote: str, port: int) -> bool:
    """Does one echo through ``hub`` work now (False on a grpc refusal)?"""
    try:
        echo_once(hub.channel, token, remote, port, timeout=5)
        return True
    except grpc.RpcError:
        return False


# --- 1. every client reaches every remote through every hub -----------------------------------


def test_matrix_every_remote_through_every_hub(lab: Lab) -> None:
    hubs = lab.start_hubs("a", "b", "c", http=True)
    target = lab.target()
    allow = [f"127.0.0.1:{target.port}"]
    remotes = [lab.start_remote(f"edge-{i}", [h], allow, wait=0) for i, h in enumerate(hubs)]
    for r in remotes:
        lab.wait_registered(r)
    # a forward per hub (the CLI client path: SESAME_HUB/SESAME_CA/SESAME_TOKEN), each to
    # the remote on the next hub
    forwards = []
    for i, h in enumerate(hubs):
        env = child_env(SESAME_HUB=h.address, SESAME_CA=str(h.ca), SESAME_TOKEN=lab.client)
        forwards.append(lab.procs.start(
            f"forward-{h.name}", [*SESAME, "forward", "tcp:0:interface=127.0.0.1",
                                  f"sesame:remote=edge-{(i + 1) % 3}:host=127.0.0.1:"
                                  f"port={target.port}"], env=env))
    for h in hubs:  # presence reached every hub (the bus): one probe per cell
        for i in range(3):
            wait_until(lambda h=h, i=i: reachable(h, lab.client, f"edge-{i}", target.port),
                       what=f"edge-{i} through hub {h.name}")
    seed = 0
    for h in hubs:
        for i in range(3):
            seed += 1
            sent, got = upload_sha(h.channel, lab.client, f"edge-{i}", target.port,
                                   MATRIX_BYTES, seed)
            assert sent == got, f"upload to edge-{i} through hub {h.name}"
            digest, total = download_sha(h.channel, lab.client, f"edge-{i}", target.port,
                                         MATRIX_BYTES, seed)
            assert (digest, total) == (pattern_sha256(MATRIX_BYTES, seed), MATRIX_BYTES), \
                f"download from edge-{i} through hub {h.name}"
    for i, f in enumerate(forwards):
        m = f.wait_line(FORWARDING)
        port = int(m.group("port") or m.group("rport"))
        sent, got = upload_sink(port, MATRIX_BYTES, 100 + i)
        assert sent == got, f"upload through forward-{hubs[i].name}"
        digest, total = download_source(port, MATRIX_BYTES, 100 + i)
        assert (digest, total) == (pattern_sha256(MATRIX_BYTES, 100 + i), MATRIX_BYTES)
    for h in hubs:
        m = h.metrics()
        assert m.get("sesame_cluster_peers") == 2, (h.name, m)
        # the two remotes on the other hubs were reached through the relay (probe, upload,
        # download, and the forward of the hub before)
        assert m.get("sesame_cluster_relayed_connections_total", 0) >= 2 * 3, (h.name, m)
        assert m.get("sesame_cluster_served_for_peers_total", 0) >= 2 * 3, (h.name, m)


# --- 2. a route added with `sesame route add --store` works on every hub within 1 s ----------


def test_route_added_works_on_another_hub_within_1s(lab: Lab) -> None:
    a, c = lab.start_hubs("a", "c")
    target = lab.target()
    lab.start_remote("edge", [a], [f"127.0.0.1:{target.port}"])
    marks = {h.name: h.proc.mark() for h in (a, c)}
    bus = lab.bus()
    # tcp:0 -- every hub binds its own port for the route and logs it
    r = sesame("route", "add", "tcp", "tcp:0:interface=127.0.0.1",
               f"127.0.0.1:{target.port}@edge", "--store", lab.url)
    t_exit = time.monotonic()
    assert r.returncode == 0, r.stderr
    route_id = r.stdout.strip()
    # when the route was committed (its bus message): the command's own exit comes later
    t_commit = bus.wait(t="store", kind="route", id=route_id)
    listening = rf"front door tcp {re.escape(route_id)} listening on 127\.0\.0\.1:(\d+)"
    port = int(c.proc.wait_line(listening, start=marks["c"]).group(1))
    # the first request through hub C (whose remote is on hub A: the relay)
    with TcpEcho(port) as conn:
        conn.roundtrip()
    done = time.monotonic()
    took, took_commit = done - t_exit, done - t_commit
    assert took_commit < 1.0, f"route committed -> first request through hub C: {took_commit:.3f}s"
    assert took < 1.0, f"route add exited -> first request through hub C: {took:.3f}s"
    # and hub A (local session) serves it too
    port_a = int(a.proc.wait_line(listening, start=marks["a"]).group(1))
    with TcpEcho(port_a) as conn:
        conn.roundtrip()
    print(f"route add: first echo through hub C {took * 1000:.0f} ms after the command's exit, "
          f"{took_commit * 1000:.0f} ms after the commit")


class TcpEcho:
    """An ``echo`` connection to a front-door port (a plain TCP client)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(b"echo\n")

    def roundtrip(self, n: int = 64) -> None:
        msg = hashlib.sha256(str(time.monotonic_ns()).encode()).digest() * (n // 32 + 1)
        self.sock.sendall(msg[:n])
        assert recv_exactly(self.sock, n) == msg[:n]

    def __enter__(self) -> TcpEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
            recv_all(self.sock)  # the echo ends too
        finally:
            self.sock.close()


# --- 3. a revoke ends sessions and connections on every hub within 1 s ----------------------


class Reader(threading.Thread):
    """Reads a NetConn until it ends; ``ended`` (monotonic) and ``how`` say when and how."""

    def __init__(self, conn: NetConn) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.ended: float | None = None
        self.how = ""
        self.start()

    def run(self) -> None:
        try:
            while self.conn.recv():
                pass
            self.how = "EOF"
        except grpc.RpcError as exc:
            self.how = f"{exc.code().name}: {exc.details()}"
        self.ended = time.monotonic()


def test_revoke_ends_sessions_and_connections_within_1s(lab: Lab) -> None:
    a, b = lab.start_hubs("a", "b")
    target = lab.target()
    remote_id, token_file = lab.remote_token("edge")
    remote = lab.start_remote("edge", [a], [f"127.0.0.1:{target.port}"], token_file=token_file)
    wait_until(lambda: reachable(b, lab.client, "edge", target.port), what="edge through hub b")
    # a client connection through hub B (relayed to A) on a token we revoke, and one on
    # another token that must live on
    doomed_id, doomed = lab.store.create_token("client", pattern="*")
    conn = NetConn(b.channel, doomed, "edge", target.port)
    conn.send(b"echo\nhello")
    assert conn.recv_exactly(5) == b"hello"
    other = NetConn(b.channel, lab.client, "edge", target.port)
    other.send(b"echo\nhello")
    assert other.recv_exactly(5) == b"hello"
    reader = Reader(conn)
    bus = lab.bus()
    r = sesame("token", "revoke", doomed_id, "--store", lab.url)
    assert r.returncode == 0, r.stderr
    # from the commit of the revocation (its bus message; the command exits after it)
    t_commit = bus.wait(t="store", kind="token", op="revoke", id=doomed_id)
    reader.join(WAIT)
    assert reader.ended is not None, "the connection on the revoked token is still open"
    took_client = reader.ended - t_commit
    assert took_client < 1.0, f"revoke -> client connection through hub B ended: {took_client:.3f}s"
    assert reader.how.startswith("UNAUTHENTICATED") and "revoked" in reader.how, reader.how
    other.send(b" again")  # the other token's connection lives on
    assert other.recv_exactly(6) == b" again"
    err = refusal(echo_once, b.channel, doomed, "edge", target.port)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err

    # the remote's token, while it is registered on hub A
    mark_a, mark_r = a.proc.mark(), remote.mark()
    r = sesame("token", "revoke", remote_id, "--store", lab.url)
    assert r.returncode == 0, r.stderr
    t_commit = bus.wait(t="store", kind="token", op="revoke", id=remote_id)
    _, t_hub, _ = a.proc.wait_line_at(r"remote default/edge disconnected", start=mark_a)
    _, t_remote, _ = remote.wait_line_at(r"hub refused remote .*edge: UNAUTHENTICATED: .*revoked",
                                         start=mark_r)
    took_hub, took_remote = t_hub - t_commit, t_remote - t_commit
    assert took_hub < 1.0, f"revoke -> session on hub A ended: {took_hub:.3f}s"
    assert took_remote < 1.0, f"revoke -> remote told: {took_remote:.3f}s"
    # the remote is gone from the whole cluster
    for h in (a, b):
        err = refusal(echo_once, h.channel, lab.client, "edge", target.port)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (h.name, err)
    other.close()
    print(f"revoke -> client conn ended {took_client * 1000:.0f} ms ({reader.how}); "
          f"session on A ended {took_hub * 1000:.0f} ms, remote told {took_remote * 1000:.0f} ms")


# --- 4. kill -9 the hub of a remote homed on one of two hubs ------------------------------------


def test_kill9_hub_remote_moves_and_lease_runs_out(lab: Lab) -> None:
    lease_env = {"SESAME_CLUSTER_LEASE": str(SHORT_LEASE), "SESAME_CLUSTER_RENEW": str(SHORT_RENEW)}
    a, b = lab.start_hubs("a", "b", http=True, env=lease_env)
    target = lab.target()
    allow = [f"127.0.0.1:{target.port}"]
    # edge names both hubs but keeps one session (--homes 1: the first, b); solo has only b
    edge = lab.start_remote("edge", [b, a], allow, extra=["--homes", "1"], wait=0)
    solo = lab.start_remote("solo", [b], allow, wait=0)
    lab.wait_registered(edge)
    lab.wait_registered(solo)
    assert edge.err.find(rf"registered \S+edge with the hub at {re.escape(b.address)}")
    wait_until(lambda: a.metric(f'sesame_cluster_hub_sessions{{hub="{b.id}"}}') == 2,
               what="hub a sees both sessions on hub b")
    for name in ("edge", "solo"):
        echo_once(a.channel, lab.client, name, target.port)  # relayed a -> b
    assert not edge.err.find(rf"with the hub at {re.escape(a.address)}"), "homed on both"
    mark_a, mark_e = a.proc.mark(), edge.mark()

    b.proc.kill9()
    t_kill = time.monotonic()
    # the remote moves to hub a within its backoff: after a healthy link it tries the next
    # hub "at once" (a random 0-1 s spread), plus 0.5 s slack for noticing and registering
    _, t_moved, _ = edge.wait_line_at(rf"registered \S+edge with the hub at {re.escape(a.address)}",
                                      start=mark_e)
    moved = t_moved - t_kill
    assert moved < 1.0 + 0.5, f"kill -9 -> edge registered on hub a: {moved:.2f}s"
    assert edge.err.find(rf"lost hub {re.escape(b.address)}; moving to {re.escape(a.address)}",
                         mark_e)
    echo_once(a.channel, lab.client, "edge", target.port)  # served by hub a itself now
    # the dead hub's lease runs out: hub a forgets it (and solo's session) within the TTL
    _, t_left, _ = a.proc.wait_line_at(
        rf"hub {re.escape(b.id)} left the cluster \(its lease ran out\)", SHORT_LEASE + 5,
        start=mark_a)
    left = t_left - t_kill
    # the lease runs out at most SHORT_LEASE after the last renewal before the kill; hub a
    # looks once a SWEEP; 0.5 s slack for a loaded box
    assert left <= SHORT_LEASE + SWEEP + 0.5, f"kill -9 -> lease ran out on hub a: {left:.2f}s"
    m = a.metrics()
    assert m["sesame_cluster_peers"] == 0, m
    assert not any(b.id in k for k in m), "a ghost of the dead hub in hub a's metrics"
    err = refusal(echo_once, a.channel, lab.client, "solo", target.port)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "not connected" in err.details(), err.details()
    # and in Redis: no key of the dead hub is left, and it is out of the lease set
    r = lab.redis_client()
    try:
        ttls = {k: r.pttl(k) for k in (f"sesame:hub:{b.id}", f"sesame:presence:{b.id}")}
        assert r.exists(*ttls) == 0, ttls
        wait_until(lambda: r.zscore("sesame:hubs", b.id) is None, SHORT_RENEW + 1,
                   what="the dead hub out of sesame:hubs (removed at hub a's next renewal)")
    finally:
        r.close()
    print(f"kill -9 hub b: edge re-registered on hub a after {moved:.2f}s; hub a dropped "
          f"hub b after {left:.2f}s (lease {SHORT_LEASE:g}s)")


def test_hub_stalled_past_its_lease_is_whole_again(lab: Lab) -> None:
    """A hub frozen (SIGSTOP) for longer than its lease is dropped by the others; when it
    runs again, the cluster sees its sessions again, and it sees the others' (neither
    side's sessions may stay forgotten)."""
    lease_env = {"SESAME_CLUSTER_LEASE": str(SHORT_LEASE), "SESAME_CLUSTER_RENEW": str(SHORT_RENEW)}
    a, b = lab.start_hubs("a", "b", env=lease_env)
    target = lab.target()
    allow = [f"127.0.0.1:{target.port}"]
    on_a = lab.start_remote("edge-a", [a], allow, wait=0)
    on_b = lab.start_remote("edge-b", [b], allow, wait=0)
    lab.wait_registered(on_a)
    lab.wait_registered(on_b)
    wait_until(lambda: reachable(a, lab.client, "edge-b", target.port), what="edge-b via a")
    wait_until(lambda: reachable(b, lab.client, "edge-a", target.port), what="edge-a via b")
    mark_a, mark_b = a.proc.mark(), b.proc.mark()
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        a.proc.wait_line(rf"hub {re.escape(b.id)} left the cluster \(its lease ran out\)",
                         SHORT_LEASE + 5, start=mark_a)
        err = refusal(echo_once, a.channel, lab.client, "edge-b", target.port)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    t_cont = time.monotonic()
    b.proc.wait_line(r"lease had run out .* re-publishing its 1 session", start=mark_b)
    wait_until(lambda: reachable(a, lab.client, "edge-b", target.port), 5,
               what="edge-b through hub a after hub b ran again")
    wait_until(lambda: reachable(b, lab.client, "edge-a", target.port), 5,
               what="edge-a through hub b after hub b ran again")
    print(f"hub b stalled past its lease: whole again {time.monotonic() - t_cont:.2f}s after "
          f"SIGCONT")


# --- 5. a dual-homed remote: kill -9 one of its hubs during 200 connections, 0 fail -----------

ATTEMPTS = 200
KILL_AFTER = 60


def served(h: LabHub) -> float:
    return h.metric("sesame_cluster_served_for_peers_total")


def test_dual_homed_remote_survives_kill9_of_a_hub(lab: Lab) -> None:
    a, b, c = lab.start_hubs("a", "b", "c", http=True)
    target = lab.target()
    lab.start_remote("edge", [a, b], [f"127.0.0.1:{target.port}"])
    # hub C knows both sessions (one on A, one on B)
    wait_until(lambda: all(c.metric(f'sesame_cluster_hub_sessions{{hub="{h.id}"}}') == 1
                           for h in (a, b)), what="hub C sees the sessions on A and B")
    before = {h.name: served(h) for h in (a, b)}
    failures: list[str] = []
    victim = survivor = None
    kill_at = 0.0
    t0 = time.monotonic()
    for i in range(ATTEMPTS):
        if i == KILL_AFTER:
            # kill the hub that has been serving hub C's relays (C prefers the newest
            # session of the remote), between two attempts
            now = {h.name: served(h) for h in (a, b)}
            victim, survivor = (a, b) if now["a"] - before["a"] >= now["b"] - before["b"] else (b, a)
            assert served(victim) - before[victim.name] == KILL_AFTER, (before, now)
            # and a connection open through it when it dies
            held = NetConn(c.channel, lab.client, "edge", target.port, timeout=60)
            held.send(b"echo\nheld")
            assert held.recv_exactly(4) == b"held"
            assert served(victim) - before[victim.name] == KILL_AFTER + 1
            reader = Reader(held)
            kill_at = time.monotonic()
            victim.proc.kill9()
            after_kill = served(survivor)
        try:
            echo_once(c.channel, lab.client, "edge", target.port, 64, timeout=10)
        except (grpc.RpcError, AssertionError, EOFError) as exc:
            desc = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else exc
            failures.append(f"attempt {i}: {desc}")
    took = time.monotonic() - t0
    assert not failures, f"{len(failures)} of {ATTEMPTS} failed: {failures[:5]}"
    assert victim is not None and survivor is not None
    # every attempt after the kill went through the survivor
    assert served(survivor) - after_kill == ATTEMPTS - KILL_AFTER
    # the connection that was open through the dead hub ended, with an error, promptly
    reader.join(WAIT)
    assert reader.ended is not None, "a connection through the dead hub is still open"
    assert reader.how.startswith("UNAVAILABLE"), reader.how
    held_end = reader.ended - kill_at
    assert held_end < 2.0, f"kill -9 -> connection through the dead hub ended: {held_end:.2f}s"
    skipped = c.logged(rf"relay of default/edge through hub {re.escape(victim.id)} failed")
    print(f"{ATTEMPTS} attempts through hub C in {took:.2f}s, 0 failed; killed hub "
          f"{victim.name} after {KILL_AFTER} ({time.monotonic() - kill_at:.2f}s before the end); "
          f"hub C tried the dead hub {len(skipped)} time(s); the connection open through it "
          f"ended after {held_end:.2f}s ({reader.how})")


# --- 6. kill -9 Redis and restart it -------------------------------------------------------------

STORE_DOWN = r"\[sesame\.hub\.cluster#warn\] store unavailable \("
STORE_BACK = r"\[sesame\.hub\.cluster#info\] store available again"


def listed(lab: Lab, h: LabHub, admin: str) -> dict[str, list[str]]:
    """``sesame remotes --json`` through ``h``: connected remote -> the hubs holding it."""
    r = sesame("remotes", "--json", "--hub", h.address, "--ca", str(h.ca),
               env=child_env(SESAME_TOKEN=admin))
    assert r.returncode == 0, r.stderr
    return {row["name"]: row["hubs"] for row in json.loads(r.stdout) if row["connected"]}


def test_redis_kill9_and_restart(lab: Lab) -> None:
    a, b = lab.start_hubs("a", "b", http=True)
    target = lab.target()
    _, admin = lab.store.create_token("admin")
    _, new_token = lab.remote_token("edge-new")  # tokens made before the crash
    _, unseen = lab.store.create_token("client", pattern="*")  # no hub checks it before
    lab.start_remote("edge-old", [b], [f"127.0.0.1:{target.port}"])
    r = sesame("route", "add", "tcp", "tcp:0:interface=127.0.0.1",
               f"127.0.0.1:{target.port}@edge-old", "--store", lab.url)
    assert r.returncode == 0, r.stderr
    listening = rf"front door tcp {re.escape(r.stdout.strip())} listening on 127\.0\.0\.1:(\d+)"
    door = {h.name: int(h.proc.wait_line(listening).group(1)) for h in (a, b)}
    wait_until(lambda: reachable(a, lab.client, "edge-old", target.port), what="edge-old via a")
    # a connection through the relay (a -> b -> edge-old), open across the outage
    conn = NetConn(a.channel, lab.client, "edge-old", target.port, timeout=120)
    conn.send(b"echo\nbefore")
    assert conn.recv_exactly(6) == b"before"
    marks = {h.name: h.proc.mark() for h in (a, b)}

    lab.redis.kill()
    for h in (a, b):
        h.proc.wait_line(STORE_DOWN, 5, start=marks[h.name])
        assert h.metric("sesame_cluster_up") == 0
    # a remote registering now is refused (no token check, no epoch) and retries
    new = lab.start_remote("edge-new", [b], [f"127.0.0.1:{target.port}"], wait=0,
                           token_file=new_token)
    # during the outage: the open connection carries on
    conn.send(b"during")
    assert conn.recv_exactly(6) == b"during"
    # new NetConn calls need a token check the hubs cannot make: refused, clearly -- but
    # for a token a hub verified lately (its cache, 30 s): nobody can revoke it while the
    # store is down, so hub a, which checked lab.client before the outage, still serves it
    for h in (a, b):
        err = refusal(echo_once, h.channel, unseen, "edge-old", target.port)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (h.name, err)
        assert "store unavailable" in err.details(), (h.name, err.details())
    echo_once(a.channel, lab.client, "edge-old", target.port)  # raises if refused
    # front doors need no token: the routes the hubs hold keep working, through the relay
    # on hub a (its view of the cluster is kept) and locally on hub b
    for h in (a, b):
        with TcpEcho(door[h.name]) as c:
            c.roundtrip()
    new.wait_line(r"hub link lost \(UNAVAILABLE: store unavailable")
    assert not new.err.find(REGISTERED)
    lab.redis.start()  # same port, same AOF
    t_restart = time.monotonic()
    back = {}
    for h in (a, b):
        _, t_back, _ = h.proc.wait_line_at(STORE_BACK, 10, start=marks[h.name])
        back[h.name] = t_back - t_restart
    assert max(back.values()) < 5.0, f"restart -> 'store available again': {back}"
    # said once per outage
    for h in (a, b):
        downs = h.logged(STORE_DOWN, marks[h.name])
        assert len(downs) == 1, (h.name, downs)
    # presence rebuilt: the remote that was refused registers on b (at its next retry)
    # and is reachable through a
    lab.wait_registered(new, timeout=WAIT)
    wait_until(lambda: reachable(a, lab.client, "edge-new", target.port), timeout=5,
               what="edge-new through hub a")
    t_new = time.monotonic() - t_restart
    assert t_new < 5.0, f"restart -> edge-new reachable through hub a: {t_new:.2f}s"
    # the remote from before is still there everywhere, with the token from before (AOF)
    for h in (a, b):
        assert reachable(h, lab.client, "edge-old", target.port), h.name
        with TcpEcho(door[h.name]) as c:
            c.roundtrip()
        assert h.metric("sesame_cluster_up") == 1
        assert listed(lab, h, admin) == {"edge-old": [b.id], "edge-new": [b.id]}, h.name
    conn.send(b"after!")
    assert conn.recv_exactly(6) == b"after!"
    conn.shutdown()
    assert conn.recv_all() == b""
    conn.close()
    other = {h.name: len(h.logged(r"#warn\]", marks[h.name])) for h in (a, b)}
    print(f"redis restart -> store available again {back}; edge-new (refused during "
          f"the outage) reachable through a after {t_new:.2f}s; warnings logged during the outage: "
          f"{other}")


# --- 7. two hubs racing registrations of one name agree on the winner ------------------------


def answers(h: LabHub, token: str, ports: Sequence[int]) -> tuple[str, ...]:
    """Through ``h``: for each port, "ok" when an echo to it works, else the status code."""
    out = []
    for port in ports:
        try:
            echo_once(h.channel, token, "edge", port, timeout=5)
            out.append("ok")
        except grpc.RpcError as exc:
            out.append(exc.code().name)
    return tuple(out)


def test_racing_registrations_of_one_name_agree_on_the_winner(lab: Lab) -> None:
    a, b = lab.start_hubs("a", "b", http=True)
    t1, t2 = lab.target(), lab.target()
    _, token_file = lab.remote_token("edge")
    ports = (t1.port, t2.port)
    winners = []
    for rnd, first in enumerate(("a", "b")):
        # the same name and token, started at the same moment (each round the other one
        # first), one on each hub; each may only reach its own target, so what a client
        # reaches says which process served it
        spec = {"a": (a, t1), "b": (b, t2)}
        procs = {}
        for name in (first, "b" if first == "a" else "a"):
            h, t = spec[name]
            procs[name] = lab.start_remote("edge", [h], [f"127.0.0.1:{t.port}"],
                                           token_file=token_file, wait=0,
                                           proc_name=f"remote-edge-on-{name}-{rnd}")
        for p in procs.values():
            lab.wait_registered(p)
        # both registrations have reached both hubs (the bus)
        for h, o in ((a, b), (b, a)):
            wait_until(lambda h=h, o=o: h.metric(
                f'sesame_cluster_hub_sessions{{hub="{o.id}"}}') == 1,
                what=f"hub {h.name} sees the session on hub {o.name}")
        # the epochs Redis handed out decide
        r = lab.redis_client()
        try:
            epochs = {}
            for h in (a, b):
                (entry,) = r.hgetall(f"sesame:presence:{h.id}").values()
                epochs[h.name] = json.loads(entry)["epoch"]
        finally:
            r.close()
        assert epochs["a"] != epochs["b"], epochs
        winner = "a" if epochs["a"] > epochs["b"] else "b"
        expected = ("ok", "PERMISSION_DENIED") if winner == "a" else ("PERMISSION_DENIED", "ok")
        for _ in range(3):
            got = {h.name: answers(h, lab.client, ports) for h in (a, b)}
            assert got == {"a": expected, "b": expected}, (
                f"round {rnd}: winner by epoch: the remote on hub {winner} {epochs}", got)
        winners.append(f"round {rnd} ({first} started first): epochs {epochs}, hub {winner} wins")
        for p in procs.values():
            p.stop()
        for h in (a, b):
            wait_until(lambda h=h: sum(v for k, v in h.metrics().items()
                                       if k.startswith("sesame_cluster_hub_sessions{")) == 0,
                       what=f"hub {h.name}: no sessions left")
    print("race: " + "; ".join(winners) + "; both hubs agreed every time")


def test_sesame_remotes_asks_the_first_hub_that_answers(lab: Lab) -> None:
    """``sesame remotes --hub DEAD,LIVE`` lists the cluster through the live hub at once
    (a refused hub is skipped on its first failed attempt, not after a timeout); with
    no hub answering it says so in one line."""
    import socket as _socket

    (a,) = lab.start_hubs("a")
    target = lab.target()
    lab.start_remote("edge-1", [a], [f"127.0.0.1:{target.port}"])
    _, admin = lab.store.create_token("admin")
    with _socket.socket() as s1, _socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        # bound, never listening: connections are refused
        dead1, dead2 = (f"127.0.0.1:{s.getsockname()[1]}" for s in (s1, s2))
        t0 = time.monotonic()
        r = sesame("remotes", "--json", "--hub", f"{dead1},{a.address}", "--ca", str(a.ca),
                   env=child_env(SESAME_TOKEN=admin))
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        rows = {row["name"]: row for row in json.loads(r.stdout)}
        assert rows["edge-1"]["connected"] and rows["edge-1"]["hubs"], rows
        assert took < 8.0, took  # not the 10 s a dead hub may take
        r = sesame("remotes", "--hub", f"{dead1},{dead2}", "--ca", str(a.ca),
                   env=child_env(SESAME_TOKEN=admin))
    assert r.returncode != 0
    assert "no hub answered" in r.stderr and dead1 in r.stderr and dead2 in r.stderr, r.stderr
