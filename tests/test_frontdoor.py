"""
Front doors on the hub: TCP port maps, HTTP virtual hosts (keep-alive,
WebSocket, X-Forwarded-*), TLS SNI passthrough and gRPC routing by
``:authority`` — with a real in-process hub, real remotes, real sockets
and real TLS.  Routes are added to the store at runtime and take effect
without a restart.  Plus the sans-IO sniffers on their own.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

import grpc
import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.web import resource, server

from sesame import netconn
from sesame.bridge._loop import get_bridge, to_deferred
from sesame.hub import _sniff as S
from sesame.hub._calls import parse_target
from sesame.hub.frontdoor import FrontDoors
from sesame.hub.tls import ensure_hub_tls
from sesame.testing import hub as testing_hub
from sesame.testing import interop_pb2, interop_pb2_grpc
from sesame.testing.interop import add_async_servicer

sesame_hub = testing_hub.sesame_hub
T = 10.0


def within(d, timeout=T):
    return defer.Deferred.fromCoroutine(d).addTimeout(timeout, reactor) if hasattr(
        d, "send") else d.addTimeout(timeout, reactor)


# --- sans-IO ------------------------------------------------------------------------------


def _client_hello(name: str | None) -> bytes:
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    if name:
        conn.set_tlsext_host_name(name.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def test_sni_from_a_real_client_hello_byte_by_byte():
    hello = _client_hello("Web.Edge-1.example")
    for i in range(len(hello)):
        assert S.client_hello_sni(hello[:i]) is None
    assert S.client_hello_sni(hello) == "web.edge-1.example"
    assert S.client_hello_sni(_client_hello(None)) == ""


def test_sni_refuses_what_is_not_tls():
    with pytest.raises(S.SniffError, match="not a TLS handshake"):
        S.client_hello_sni(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(S.SniffError, match="ClientHello"):
        S.client_hello_sni(bytes([22, 3, 1, 0, 4, 2, 0, 0, 0]))  # a ServerHello first


def _h2_headers(authority: str, stream: int = 1) -> bytes:
    import hpack

    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                    (":path", "/x.Y/Z"), (":authority", authority)])
    settings = b"\0\0\0\x04\0\0\0\0\0"
    headers = len(block).to_bytes(3, "big") + b"\x01\x04" + stream.to_bytes(4, "big") + block
    return S.H2_PREFACE + settings + headers


def test_h2c_authority_and_refusals():
    data = _h2_headers("api.edge-1:443", 3)
    for i in range(len(data)):
        assert S.h2c_authority(data[:i]) is None
    assert S.h2c_authority(data) == ("api.edge-1:443", 3)
    with pytest.raises(S.SniffError, match="not an HTTP/2"):
        S.h2c_authority(b"GET / HTTP/1.1\r\n")
    refusal = S.h2_refusal(3, 14, "offline – %")
    assert refusal[3] == 1 and refusal[5:9] == b"\0\0\0\x03"  # HEADERS on the client's stream
    import hpack

    n = int.from_bytes(refusal[:3], "big")
    fields = dict(hpack.Decoder().decode(refusal[9:9 + n]))
    assert fields["grpc-status"] == "14" and fields["grpc-message"] == "offline %E2%80%93 %25"


def test_settings_ack_filter_drops_only_the_first_ack():
    ack = b"\0\0\0\x04\x01\0\0\0\0"
    stream = _h2_headers("a")[:24 + 9] + ack + _h2_headers("a")[24 + 9:] + ack
    f = S.SettingsAckFilter()
    out = b"".join(f.feed(stream[i:i + 5]) for i in range(0, len(stream), 5))
    assert out == _h2_headers("a") + ack and f.done


def test_request_stream_rewrites_every_head_and_follows_bodies():
    seen = []

    def tag(head):
        seen.append((head.method, head.target, head.host))
        head.headers.append((b"X-Seen", b"1"))
        return head

    rs = S.RequestStream(tag)
    stream = (b"POST /a HTTP/1.1\r\nHost: A.example:8080\r\nContent-Length: 5\r\n\r\nhello"
              b"PUT /b HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;x=y\r\nabc\r\n0\r\nTrailer: t\r\n\r\n"
              b"GET /c HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
              b"GET /not-a-request HTTP/1.1\r\n\r\n")
    out = b"".join(rs.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert rs.awaiting_upgrade  # what follows the Upgrade waits for the backend's 101
    out += rs.upgrade_answered(True)
    assert seen == [(b"POST", b"/a", "a.example"), (b"PUT", b"/b", "a.example"),
                    (b"GET", b"/c", "a.example")]
    assert out.count(b"X-Seen: 1") == 3
    assert b"hello" in out and b"abc\r\n0\r\nTrailer: t\r\n\r\n" in out
    assert out.endswith(b"GET /not-a-request HTTP/1.1\r\n\r\n")  # passed through after Upgrade
    assert rs.passthrough


@pytest.mark.parametrize("bad, code, why", [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\nContent-Length: 5\r\n\r\n", 400, "bare LF"),
    # a bare LF between a header name and its colon (issue 10, defect 7)
    (b"GET / HTTP/1.1\r\nHost\n: other.test\r\n\r\n", 400, r"bare LF in the request head \(line 2\)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\n: chunked\r\nContent-Length: 3\r\n\r\nabc",
     400, r"bare LF in the request head \(line 3\)"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\rY: 2\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400, "control character 0x01"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", 400, "obsolete line folding"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "whitespace between a header name and its colon"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
    (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400, "no Host header"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid Host"),
    (b"GET http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "does not match"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400,
     "more than one Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", 400, "bad Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n", 400,
     "bad chunk size"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\n", 400, "bad chunk size"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400,
     "not followed by CRLF"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400,
     "other than chunked"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400, "unsupported HTTP version"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400, "bad Content-Length"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "both Transfer-Encoding and Content-Length"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 1\r\n\r\n"
     b"x", 400, "a body on an Upgrade"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (S.MAX_SNIFF + 10), 431, "larger than 65536"),
    # a complete head of 64-128 KiB, in one write (issue 10, defect 7)
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (S.MAX_SNIFF - 31) + b"\r\n\r\n", 431,
     "larger than 65536"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (2 * S.MAX_SNIFF - 40) + b"\r\n\r\n", 431,
     "larger than 65536"),
])
def test_request_stream_refuses_malformed_input(bad, code, why):
    for step in (len(bad), 1000, 7):  # the same answer however the bytes arrive
        rs = S.RequestStream(lambda h: h)
        with pytest.raises(S.HTTPError, match=why) as err:
            for i in range(0, len(bad), step):
                rs.feed(bad[i:i + step])
        assert err.value.code == code
        partial = err.value.partial  # what passed before the refusal: whole requests only
        assert len(partial) < len(bad) and bad.startswith(partial)


def test_request_heads_up_to_the_limit_are_forwarded():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (S.MAX_SNIFF - 32) + b"\r\n\r\n"
    assert len(head) == S.MAX_SNIFF
    assert S.RequestStream(lambda h: h).feed(b"\r\n" + head) == head  # a leading CRLF is dropped


def test_a_bare_lf_is_refused_before_the_head_ends():
    """h11 would end this head at the LF LF; a door waiting for CRLF CRLF answers at once."""
    rs = S.RequestStream(lambda h: h)
    assert rs.feed(b"GET / HTTP/1.1\r\nHost: a\r") == b""  # a CR waits for the byte after it
    with pytest.raises(S.HTTPError, match="bare LF"):
        rs.feed(b"\nX: 1\n\n")


def test_upgrade_waits_for_the_backends_answer():
    seen = []
    rs = S.RequestStream(lambda h: seen.append(h.target) or h)
    up = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    later = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    assert rs.feed(up + later).endswith(b"\r\n\r\n") and rs.awaiting_upgrade
    assert seen == [b"/ws"]  # the next head is held, not passed
    assert S.switched_protocols(b"HTTP/1.1 20", b"GET") is None
    assert S.switched_protocols(b"HTTP/1.1 200 OK", b"GET") is False
    assert rs.upgrade_answered(False) == later and seen == [b"/ws", b"/next"]  # still parsed
    rs2 = S.RequestStream(lambda h: h)
    rs2.feed(up + b"\x81\x05hello")
    assert S.switched_protocols(b"HTTP/1.1 101 Switching", b"GET") is True
    assert rs2.upgrade_answered(True) == b"\x81\x05hello" and rs2.passthrough
    assert S.switched_protocols(b"HTTP/1.1 200 Connection established", b"CONNECT") is True


def test_h2c_malformed_frames_are_sniff_errors():
    for flags, payload in ((0x8, b""), (0x8, b"\x05ab"), (0x20, b"\x00\x00")):
        frame = len(payload).to_bytes(3, "big") + bytes([1, flags | 0x4]) + b"\0\0\0\x01" + payload
        with pytest.raises(S.SniffError):
            S.h2c_authority(S.H2_PREFACE + frame)


def test_host_patterns():
    routes = {"web.example": "exact", "*.example": "wild", "*.b.example": "deeper"}
    assert S.pick(routes, "WEB.example.") == "exact"
    assert S.pick(routes, "x.example") == "wild"
    assert S.pick(routes, "x.b.example") == "deeper"
    assert S.pick(routes, "example") is None
    assert S.pick(routes, "other.org") is None


def test_targets_parse_and_refuse_with_reasons():
    t = parse_target("web@edge-1")
    assert (t.namespace, t.remote, t.endpoint, t.address) == ("default", "edge-1", "web", None)
    t = parse_target("[::1]:8080@namespaces/lab/remotes/edge-2")
    assert (t.namespace, t.remote, t.endpoint, t.address) == ("lab", "edge-2", "netconn", "[::1]:8080")
    assert str(parse_target("127.0.0.1:22@edge-1")) == "127.0.0.1:22@edge-1"
    assert parse_target("namespaces/lab/remotes/r/endpoints/web") == parse_target(
        "web@namespaces/lab/remotes/r")
    for bad, why in [("edge-1", "ENDPOINT@REMOTE"), ("web@", "ENDPOINT@REMOTE"),
                     ("1.2.3.4:0@edge-1", "port 1-65535"), ("b@d@bad name", "remote name"),
                     ("netconn@edge-1", "not a valid endpoint")]:
        with pytest.raises(ValueError, match=why):
            parse_target(bad)


# --- real front doors -----------------------------------------------------------------------


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    def connectionMade(self):
        self.data = bytearray()
        self.done = defer.Deferred()
        self.made = self.factory.made
        self.made.callback(self) if not self.made.called else None

    def dataReceived(self, data):
        self.data += data
        w = getattr(self, "want", None)
        if w is not None and w[0](self.data):
            self.want = None
            w[1].callback(bytes(self.data))

    def until(self, predicate):
        d = defer.Deferred()
        if predicate(self.data):
            d.callback(bytes(self.data))
        else:
            self.want = (predicate, d)
        return d.addTimeout(T, reactor)

    def connectionLost(self, reason=None):
        self.done.callback(bytes(self.data))


async def connect_raw(port: int) -> Collect:
    f = protocol.ClientFactory.forProtocol(Collect)
    f.made = defer.Deferred()
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await ep.connect(f).addTimeout(T, reactor)


def _responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Whole HTTP/1.1 responses (Content-Length framed) in ``data``."""
    out = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        n = int(headers.get(b"content-length", b"0"))
        if len(rest) < n:
            break
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


class Headers(resource.Resource):
    """Answers with the request's path and the X-Forwarded-* headers it saw."""

    isLeaf = True

    def render(self, request):
        fwd = [f"{k.decode()}={v.decode()}" for k, v in request.requestHeaders.getAllRawHeaders()
               for v in v if k.lower().startswith(b"x-forwarded")]
        body = request.content.read()
        return (f"{request.method.decode()} {request.path.decode()} {len(body)}\n"
                + "\n".join(sorted(fwd))).encode()


@pytest.fixture
def doors_on(sesame_hub):
    made = []

    async def make(**listeners):
        doors = FrontDoors(sesame_hub.hub, sesame_hub.store, reactor,
                           listeners={k: "tcp:0:interface=127.0.0.1" for k in listeners},
                           watch_interval=0.2)
        await doors.start()
        made.append(doors)
        return doors

    yield make
    for d in made:
        pytest_twisted.blockon(d.stop())


async def echo_server():
    return await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Echo))


@pytest_twisted.ensureDeferred
async def test_tcp_route_added_at_runtime_moves_bytes_and_closes_when_removed(sesame_hub, doors_on):
    echo = await echo_server()
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{echo.getHost().port}"])
    doors = await doors_on()
    probe = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Echo))
    port = probe.getHost().port
    await probe.stopListening()  # a port that was free a moment ago
    rec = sesame_hub.store.create_route("tcp", str(port), f"127.0.0.1:{echo.getHost().port}@edge-1")
    doors.changed()
    await wait_until(lambda: doors.tcp.get(rec.id) and doors.tcp[rec.id].listening)
    client = await connect_raw(port)
    payload = os.urandom(4 << 20)
    client.transport.write(payload)
    got = await client.until(lambda d: len(d) >= len(payload))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    metrics = sesame_hub.hub.metrics  # the route's traffic, counted under its id
    assert metrics.bytes_by_key()[("default", "edge-1", rec.id)] == (len(payload), len(payload))
    assert metrics.open_connections()[("default", "edge-1", rec.id)] == 1
    client.transport.loseConnection()
    await client.done.addTimeout(T, reactor)
    await wait_until(lambda: ("default", "edge-1", rec.id) not in metrics.open_connections())
    assert metrics.bytes_by_key()[("default", "edge-1", rec.id)] == (len(payload), len(payload))
    sesame_hub.store.delete_route(rec.id)
    doors.changed()
    await wait_until(lambda: rec.id not in doors._tcp_ports)
    with pytest.raises(Exception, match="refused"):
        await connect_raw(port)
    await echo.stopListening()


def _listen_backlog(port: int) -> int | None:
    """The accept-queue size of the listener on 127.0.0.1:port (``ss -ltn``: Send-Q), or
    None without ``ss``."""
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10).stdout.split()
    return int(out[2]) if len(out) >= 3 else None


@pytest_twisted.ensureDeferred
async def test_a_burst_of_connections_through_a_port_map_loses_none(sesame_hub, doors_on):
    """300 connections opened at once through a tcp route all echo every byte: the door
    listens with a deep backlog (Twisted's default of 50 dropped handshakes past 50, and
    clients that had sent their data saw resets: 140 of 2,000 in bench/e2e.py's bursts)."""
    echo = await echo_server()
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{echo.getHost().port}"])
    doors = await doors_on(http=True)
    probe = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Echo))
    port = probe.getHost().port
    await probe.stopListening()
    rec = sesame_hub.store.create_route("tcp", str(port), f"127.0.0.1:{echo.getHost().port}@edge-1")
    doors.changed()
    await wait_until(lambda: doors.tcp.get(rec.id) and doors.tcp[rec.id].listening)
    for listener in (port, doors.address("http").port):
        backlog = _listen_backlog(listener)
        assert backlog is None or backlog >= 1024, backlog
    payloads = [os.urandom(32 * 1024) for _ in range(300)]
    clients = await defer.gatherResults([defer.ensureDeferred(connect_raw(port)) for _ in payloads])
    for c, data in zip(clients, payloads, strict=True):
        c.transport.write(data)
    for c, data in zip(clients, payloads, strict=True):
        got = await c.until(lambda d, n=len(data): len(d) >= n)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        c.transport.loseConnection()
    await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_tcp_route_to_offline_remote_is_kept_and_works_when_it_connects(sesame_hub, doors_on):
    echo = await echo_server()
    doors = await doors_on()
    rec = sesame_hub.store.create_route(
        "tcp", "tcp:0:interface=127.0.0.1", f"127.0.0.1:{echo.getHost().port}@edge-2")
    doors.changed()
    await wait_until(lambda: doors.tcp.get(rec.id) and doors.tcp[rec.id].listening)
    port = int(doors.tcp[rec.id].listening.rsplit(":", 1)[1])
    c = await connect_raw(port)
    assert await c.done.addTimeout(T, reactor) == b""  # offline: closed, nothing sent
    err = sesame_hub.hub.metrics.recent_errors[-1]
    assert err["remote"] == "edge-2" and "not connected" in err["message"]
    assert sesame_hub.hub.metrics.dial_errors()["UNAVAILABLE"] >= 1
    await sesame_hub.start_remote("edge-2", [f"127.0.0.1:{echo.getHost().port}"])
    c = await connect_raw(port)
    c.transport.write(b"ping")
    assert await c.until(lambda d: d == b"ping") == b"ping"
    c.transport.loseConnection()
    await echo.stopListening()


async def web_on_remote(sesame_hub, name="edge-1", endpoint="web"):
    ep = endpoints.serverFromString(
        reactor, f"sesame:remote={name}:endpoint={endpoint}:"
        + sesame_hub.endpoint_kwargs(sesame_hub.remote_token(name)))
    return await ep.listen(server.Site(Headers()))


@pytest_twisted.ensureDeferred
async def test_vhost_keep_alive_forwarded_headers_404_and_502(sesame_hub, doors_on):
    web = await web_on_remote(sesame_hub)
    doors = await doors_on(http=True)
    sesame_hub.store.create_route("http", "web.edge-1.hub.example", "web@edge-1")
    sesame_hub.store.create_route("http", "*.wild.example", "web@edge-1")
    doors.changed()
    await wait_until(lambda: "web.edge-1.hub.example" in doors.http)
    port = doors.address("http").port
    c = await connect_raw(port)
    body = os.urandom(100_000)
    c.transport.write(b"GET /one HTTP/1.1\r\nHost: web.edge-1.hub.example\r\n"
                      b"X-Forwarded-For: 6.6.6.6\r\n\r\n")
    await c.until(lambda d: len(_responses(bytes(d))) == 1)
    c.transport.write(b"POST /two HTTP/1.1\r\nHost: WEB.edge-1.hub.example:80\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
    data = await c.until(lambda d: len(_responses(bytes(d))) == 2)
    (s1, _, b1), (s2, _, b2) = _responses(data)
    assert s1 == s2 == 200
    assert b1.decode().splitlines() == [
        "GET /one 0", "X-Forwarded-For=127.0.0.1", "X-Forwarded-Host=web.edge-1.hub.example",
        "X-Forwarded-Proto=http"]  # the client's spoofed value was replaced
    assert b2.decode().splitlines()[0] == f"POST /two {len(body)}"
    c.transport.loseConnection()

    c = await connect_raw(port)
    c.transport.write(b"GET /w HTTP/1.1\r\nHost: a.wild.example\r\n\r\n")
    data = await c.until(lambda d: len(_responses(bytes(d))) == 1)
    assert _responses(data)[0][2].startswith(b"GET /w 0")
    c.transport.loseConnection()

    c = await connect_raw(port)
    c.transport.write(b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
    data = await c.done.addTimeout(T, reactor)
    status, _, text = _responses(data)[0]
    assert status == 404 and b"nobody" not in text and b"edge" not in text

    await web.stopListening()  # the remote's endpoint goes offline; the route stays
    c = await connect_raw(port)
    c.transport.write(b"GET / HTTP/1.1\r\nHost: web.edge-1.hub.example\r\n\r\n")
    data = await c.done.addTimeout(T, reactor)
    status, _, text = _responses(data)[0]
    assert status == 502 and b"offline" in text

    c = await connect_raw(port)
    c.transport.write(b"BROKEN\r\n\r\n")
    data = await c.done.addTimeout(T, reactor)
    assert _responses(data)[0][0] == 400


@pytest_twisted.ensureDeferred
async def test_vhost_cannot_be_talked_past(sesame_hub, doors_on):
    """A refused Upgrade, pipelined heads for another site, a second Host: none get through
    unrewritten or to the wrong backend."""
    web = await web_on_remote(sesame_hub)
    doors = await doors_on(http=True)
    sesame_hub.store.create_route("http", "web.example", "web@edge-1")
    doors.changed()
    await wait_until(lambda: "web.example" in doors.http)
    port = doors.address("http").port

    c = await connect_raw(port)  # twisted.web ignores Upgrade and answers 200: keep rewriting
    c.transport.write(b"GET /up HTTP/1.1\r\nHost: web.example\r\nConnection: Upgrade\r\n"
                      b"Upgrade: h2c\r\n\r\n"
                      b"GET /after HTTP/1.1\r\nHost: web.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    data = await c.until(lambda d: len(_responses(bytes(d))) == 2)
    (s1, _, b1), (s2, _, b2) = _responses(data)
    assert (s1, s2) == (200, 200)
    assert b2.decode().splitlines()[:2] == ["GET /after 0", "X-Forwarded-For=127.0.0.1"]
    c.transport.loseConnection()

    c = await connect_raw(port)  # two sites in the first write: refused as a whole
    c.transport.write(b"GET / HTTP/1.1\r\nHost: web.example\r\n\r\n"
                      b"GET / HTTP/1.1\r\nHost: internal.example\r\n\r\n")
    data = await c.done.addTimeout(T, reactor)
    assert [r[0] for r in _responses(data)] == [421]

    c = await connect_raw(port)
    c.transport.write(b"GET / HTTP/1.1\r\nHost: web.example\r\nHost: internal.example\r\n\r\n")
    data = await c.done.addTimeout(T, reactor)
    assert [r[0] for r in _responses(data)] == [400]

    # issue 10, defect 7: a bare LF before a colon, and a whole head of 64-128 KiB
    for head, status, why in [
            (b"GET / HTTP/1.1\r\nHost: web.example\r\nHost\n: internal.example\r\n\r\n", 400,
             b"bare LF in the request head (line 3)"),
            (b"POST / HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding\n: chunked\r\n"
             b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400, b"bare LF in the request head (line 3)"),
            (b"GET / HTTP/1.1\r\nHost: web.example\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", 431,
             b"request head larger than 65536 bytes")]:
        c = await connect_raw(port)
        c.transport.write(head)
        data = await c.done.addTimeout(T, reactor)
        assert [(r[0], r[2]) for r in _responses(data)] == [(status, why + b"\n")]
    await web.stopListening()


@pytest_twisted.ensureDeferred
async def test_tcp_route_that_cannot_listen_says_why_and_binds_once_free(sesame_hub):
    echo = await echo_server()
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{echo.getHost().port}"])
    blocker = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Echo))
    port = blocker.getHost().port
    doors = FrontDoors(sesame_hub.hub, sesame_hub.store, reactor, watch_interval=0.1,
                       listen_retry=0.2)
    await doors.start()
    try:
        rec = sesame_hub.store.create_route("tcp", str(port),
                                            f"127.0.0.1:{echo.getHost().port}@edge-1")
        doors.changed()
        await wait_until(lambda: rec.id in doors.tcp and doors.tcp[rec.id].error)
        assert "cannot listen" in doors.tcp[rec.id].error and "in use" in doors.tcp[rec.id].error
        await blocker.stopListening()
        await wait_until(lambda: doors.tcp[rec.id].listening)  # retried without any change
        assert doors.tcp[rec.id].error is None
        c = await connect_raw(port)
        c.transport.write(b"hi")
        assert await c.until(lambda d: d == b"hi") == b"hi"
        c.transport.loseConnection()
    finally:
        await doors.stop()
        await echo.stopListening()


class WebSocketEcho(protocol.Protocol):
    """The smallest RFC 6455 server: handshake, then echo text/binary frames."""

    def connectionMade(self):
        self.buf = b""
        self.open = False

    def dataReceived(self, data):
        self.buf += data
        if not self.open:
            if b"\r\n\r\n" not in self.buf:
                return
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"sec-websocket-key")][0]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                                      .digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.open = True
        while len(self.buf) >= 6:
            opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            pos = 2
            if n == 126:
                n, pos = struct.unpack(">H", self.buf[2:4])[0], 4
            if len(self.buf) < pos + 4 + n:
                return
            mask, payload = self.buf[pos:pos + 4], self.buf[pos + 4:pos + 4 + n]
            self.buf = self.buf[pos + 4 + n:]
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            hdr = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n))
            self.transport.write(hdr + data)


def ws_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    hdr = b"\x82" + (bytes([0x80 | n]) if n < 126 else b"\xfe" + struct.pack(">H", n))
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_through_a_vhost(sesame_hub, doors_on):
    ws = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(WebSocketEcho))
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{ws.getHost().port}"])
    doors = await doors_on(http=True)
    sesame_hub.store.create_route("http", "ws.example", f"127.0.0.1:{ws.getHost().port}@edge-1")
    doors.changed()
    await wait_until(lambda: "ws.example" in doors.http)
    c = await connect_raw(doors.address("http").port)
    key = base64.b64encode(os.urandom(16))
    c.transport.write(b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key
                      + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await c.until(lambda d: b"\r\n\r\n" in d)
    assert head.startswith(b"HTTP/1.1 101")
    expect = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert expect in head
    start = len(head)
    messages = [os.urandom(n) for n in (1, 125, 126, 4000)]
    for m in messages:
        c.transport.write(ws_frame(m))
    want = sum(len(m) + (2 if len(m) < 126 else 4) for m in messages)
    data = await c.until(lambda d: len(d) - start >= want)
    frames, rest = [], data[start:]
    while rest:
        n = rest[1] & 0x7F
        pos = 2 if n < 126 else 4
        n = n if n < 126 else struct.unpack(">H", rest[2:4])[0]
        frames.append(rest[pos:pos + n])
        rest = rest[pos + n:]
    assert frames == messages
    c.transport.loseConnection()
    await ws.stopListening()


class _CertCheck(protocol.Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)

    def dataReceived(self, data):
        self.factory.data += data
        if self.factory.data.endswith(b"\n"):
            self.factory.got.callback(self.factory.data)

    def connectionLost(self, reason=None):
        lost = getattr(self.factory, "lost", None)
        if lost is not None:
            lost.callback([reason])  # a list: a bare Failure would errback


@pytest_twisted.ensureDeferred
async def test_sni_passthrough_client_sees_the_remotes_certificate(sesame_hub, doors_on, tmp_path):
    remote_tls = ensure_hub_tls(tmp_path / "remote-tls", ["secure.edge-1.example"])
    cert = ssl.PrivateCertificate.loadPEM(remote_tls.cert_pem + remote_tls.key_pem)
    tls_server = await endpoints.SSL4ServerEndpoint(
        reactor, 0, cert.options(), interface="127.0.0.1").listen(protocol.Factory.forProtocol(Echo))
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{tls_server.getHost().port}"])
    doors = await doors_on(sni=True)
    sesame_hub.store.create_route("sni", "secure.edge-1.example",
                                  f"127.0.0.1:{tls_server.getHost().port}@edge-1")
    doors.changed()
    await wait_until(lambda: "secure.edge-1.example" in doors.sni)
    sni_port = doors.address("sni").port

    trust = ssl.Certificate.loadPEM(remote_tls.ca_pem)
    spliced = netconn.splice_count()
    f = protocol.ClientFactory.forProtocol(_CertCheck)
    f.made, f.got, f.data = defer.Deferred(), defer.Deferred(), b""
    ep = endpoints.wrapClientTLS(ssl.optionsForClientTLS("secure.edge-1.example", trust),
                                 endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", sni_port))
    p = await ep.connect(f).addTimeout(T, reactor)
    p.transport.write(b"through the hub, end to end\n")
    assert await f.got.addTimeout(T, reactor) == b"through the hub, end to end\n"
    from cryptography import x509

    peer = p.transport.getPeerCertificate().to_cryptography()
    sans = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "secure.edge-1.example" in sans.get_values_for_type(x509.DNSName)
    hub_cert = x509.load_pem_x509_certificate(sesame_hub.tls.cert_pem)
    assert peer == x509.load_pem_x509_certificate(remote_tls.cert_pem) != hub_cert
    assert netconn.splice_count() == spliced + 1  # after the ClientHello: relayed on the loop
    p.transport.loseConnection()

    # an unknown name gets a TLS alert, not the hub's certificate
    f2 = protocol.ClientFactory.forProtocol(_CertCheck)
    f2.made, f2.got, f2.data, f2.lost = defer.Deferred(), defer.Deferred(), b"", defer.Deferred()
    ep = endpoints.wrapClientTLS(ssl.optionsForClientTLS("other.example", trust),
                                 endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", sni_port))
    p2 = await ep.connect(f2).addTimeout(T, reactor)
    p2.transport.write(b"never delivered\n")
    [reason] = await f2.lost.addTimeout(T, reactor)
    assert reason.check(SSL.Error) and "unrecognized name" in str(reason.value)
    assert not f2.got.called
    await tls_server.stopListening()


async def _interop_server() -> tuple[grpc.aio.Server, int]:
    """(bridge loop) A plain-text grpc.aio server of the interop TestService on 127.0.0.1."""
    s = grpc.aio.server()
    add_async_servicer(s)
    port = s.add_insecure_port("127.0.0.1:0")
    await s.start()
    return s, port


@pytest_twisted.ensureDeferred
async def test_grpc_routing_by_authority_with_streaming_and_deadlines(sesame_hub, doors_on):
    bridge = get_bridge()
    srv, gport = await to_deferred(bridge.submit(_interop_server()))
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{gport}"])
    doors = await doors_on(grpc=True)
    sesame_hub.store.create_route("grpc", "api.edge-1", f"127.0.0.1:{gport}@edge-1")
    doors.changed()
    await wait_until(lambda: "api.edge-1" in doors.grpc)
    door = f"127.0.0.1:{doors.address('grpc').port}"

    async def calls():
        opts = [("grpc.default_authority", "api.edge-1")]
        async with grpc.aio.insecure_channel(door, options=opts) as ch:
            stub = interop_pb2_grpc.TestServiceStub(ch)
            r = await stub.UnaryCall(interop_pb2.SimpleRequest(response_size=314_159), timeout=T)
            sizes = [len(m.payload.body) async for m in stub.StreamingOutputCall(
                interop_pb2.StreamingOutputCallRequest(response_parameters=[
                    interop_pb2.ResponseParameters(size=n) for n in (31_415, 9, 2_653, 58_979)]),
                timeout=T)]
            try:
                await stub.FullDuplexCall(iter([interop_pb2.StreamingOutputCallRequest(
                    response_parameters=[interop_pb2.ResponseParameters(
                        size=1, interval_us=2_000_000)])]), timeout=0.3).read()
                late = None
            except grpc.aio.AioRpcError as exc:
                late = exc.code()
        async with grpc.aio.insecure_channel(door, options=[
                ("grpc.default_authority", "nobody.example")]) as ch:
            try:
                await interop_pb2_grpc.TestServiceStub(ch).EmptyCall(
                    interop_pb2.google_dot_protobuf_dot_empty__pb2.Empty(), timeout=T)
                missing = None
            except grpc.aio.AioRpcError as exc:
                missing = (exc.code(), exc.details())
        return len(r.payload.body), sizes, late, missing

    size, sizes, late, missing = await to_deferred(bridge.submit(calls()))
    assert size == 314_159
    assert sizes == [31_415, 9, 2_653, 58_979]
    assert late == grpc.StatusCode.DEADLINE_EXCEEDED
    assert missing == (grpc.StatusCode.NOT_FOUND, "no gRPC route for this authority")
    await to_deferred(bridge.submit(srv.stop(0)))


async def wait_until(predicate, timeout=T):
    """Poll a reactor-side condition once per reactor turn (no sleeps), with a timeout."""
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise TimeoutError("condition not reached")
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_sends_its_first_request_is_timed_out(sesame_hub):
    doors = FrontDoors(sesame_hub.hub, sesame_hub.store, reactor, sniff_timeout=0.3,
                       listeners={k: "tcp:0:interface=127.0.0.1" for k in ("http", "sni")})
    await doors.start()
    try:
        c = await connect_raw(doors.address("http").port)
        c.transport.write(b"GET / HTTP/1.1\r\nHost: slow")  # never finished
        data = await c.done.addTimeout(T, reactor)
        assert _responses(data)[0][0] == 408
        c = await connect_raw(doors.address("sni").port)
        assert await c.done.addTimeout(T, reactor) == b""  # closed, nothing said
    finally:
        await doors.stop()


@pytest.mark.parametrize("argv, message", [
    (["--vhost", "tcp:nope"], "--vhost: 'tcp:nope' is not a Twisted server endpoint"),
    (["--sni", "bogus:1"], "unknown endpoint type 'bogus'"),
    (["--forwarded", "sometimes"], "--forwarded: one of replace, append, off"),
])
def test_front_door_options_refused_at_parse_time(argv, message):
    from twisted.python import usage

    from sesame.tap import HubOptions

    with pytest.raises(usage.UsageError, match=message):
        HubOptions().parseOptions(argv)


def test_a_bare_front_door_port_binds_the_front_interface():
    from sesame.tap import HubOptions

    o = HubOptions()
    o.parseOptions(["--vhost", "8000", "--front-interface", "0.0.0.0"])
    assert o["vhost"] == "tcp:8000:interface=0.0.0.0"


@pytest_twisted.ensureDeferred
async def test_grpc_door_over_tls_with_alpn_h2_and_the_hubs_certificate(sesame_hub):
    """--grpc-door tls:PORT: grpcio checks the hub's certificate against the hub's CA;
    routing by :authority works inside the TLS as on the plain door."""
    from sesame.hub.frontdoor import parse_tls_description

    bridge = get_bridge()
    srv, gport = await to_deferred(bridge.submit(_interop_server()))
    await sesame_hub.start_remote("edge-1", [f"127.0.0.1:{gport}"])
    tls = sesame_hub.tls
    doors = FrontDoors(sesame_hub.hub, sesame_hub.store, reactor,
                       listeners={"grpc": "tls:0:interface=127.0.0.1"}, watch_interval=0.2,
                       tls_material=(tls.cert_pem, tls.key_pem))
    await doors.start()
    try:
        sesame_hub.store.create_route("grpc", "api.edge-1", f"127.0.0.1:{gport}@edge-1")
        doors.changed()
        await wait_until(lambda: "api.edge-1" in doors.grpc)
        door = f"127.0.0.1:{doors.address('grpc').port}"
        name = next(h for h in tls.hosts if not h[0].isdigit())  # a DNS SAN of the hub cert

        async def calls(ca: bytes) -> object:
            creds = grpc.ssl_channel_credentials(ca)
            opts = [("grpc.default_authority", "api.edge-1"),
                    ("grpc.ssl_target_name_override", name)]
            async with grpc.aio.secure_channel(door, creds, options=opts) as ch:
                stub = interop_pb2_grpc.TestServiceStub(ch)
                try:
                    r = await stub.UnaryCall(interop_pb2.SimpleRequest(response_size=4321),
                                             timeout=T)
                    return len(r.payload.body)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

        assert await to_deferred(bridge.submit(calls(tls.ca_pem))) == 4321
        # a client that does not trust the hub's CA gets no further than the handshake
        from sesame.hub.tls import _make_ca  # a stranger's CA

        other, _ = _make_ca()
        from cryptography.hazmat.primitives.serialization import Encoding

        code = await to_deferred(bridge.submit(calls(other.public_bytes(Encoding.PEM))))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await doors.stop()
        await to_deferred(bridge.submit(srv.stop(0)))
    for bad, words in [("tls:", "tls port"), ("tls:8443:colour=red", "unknown parameter"),
                       ("tls:8443:certKey=a.pem", "together"), ("tls:x", "tls port")]:
        with pytest.raises(ValueError, match=words):
            parse_tls_description(bad)
