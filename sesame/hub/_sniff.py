"""
Sans-IO parsers the front doors use to pick a route from a connection's
first bytes, and to rewrite HTTP/1.1 request heads on the way through.

* :func:`client_hello_sni` — the server name of a TLS ClientHello
  (RFC 8446 §4.1.2, RFC 6066 §3), across record fragments;
* :func:`h2c_authority` — ``:authority`` of the first HEADERS of a
  prior-knowledge HTTP/2 connection (what gRPC clients send in plain text);
* :class:`RequestStream` — finds every request head in an HTTP/1.1 byte
  stream (following Content-Length and chunked bodies, switching to
  passthrough after an Upgrade), so each head can get X-Forwarded-* fields.

Each needs-more-data answer is ``None``; a definite refusal raises
:class:`SniffError` with a reason.  Nothing here allocates more than the
caller's size limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SNIFF = 64 * 1024


class SniffError(Exception):
    """The first bytes are not what this door speaks (or are malformed).

    ``partial`` holds what :meth:`RequestStream.feed` had already passed
    before the error, so nothing valid is lost."""

    partial: bytes = b""


# --- TLS ------------------------------------------------------------------------------


def client_hello_sni(buf: bytes) -> str | None:
    """The SNI host name of the ClientHello at the start of ``buf``; ``""`` if the
    hello carries none; ``None`` while more bytes are needed."""
    hs = bytearray()
    pos = 0
    need = None
    while need is None or len(hs) < need:
        if len(buf) < pos + 5:
            return None
        ctype, major, length = buf[pos], buf[pos + 1], int.from_bytes(buf[pos + 3:pos + 5], "big")
        if ctype != 22 or major != 3:
            raise SniffError("not a TLS handshake record")
        if length == 0 or length > 16384 + 2048:
            raise SniffError("bad TLS record length")
        if len(buf) < pos + 5 + length:
            return None
        hs += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
        if need is None and len(hs) >= 4:
            if hs[0] != 1:
                raise SniffError("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > MAX_SNIFF:
                raise SniffError("ClientHello too large")
    return _hello_sni(bytes(hs[4:need]))


def _hello_sni(body: bytes) -> str:
    try:
        p = 2 + 32  # legacy_version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        if p == len(body):
            return ""  # no extensions at all
        end = p + 2 + int.from_bytes(body[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            etype = int.from_bytes(body[p:p + 2], "big")
            elen = int.from_bytes(body[p + 2:p + 4], "big")
            p += 4
            if etype == 0:  # server_name
                q = p + 2
                while q + 3 <= p + elen:
                    ntype, nlen = body[q], int.from_bytes(body[q + 1:q + 3], "big")
                    if ntype == 0:
                        name = body[q + 3:q + 3 + nlen]
                        if len(name) != nlen:
                            break
                        return name.decode("ascii").lower().rstrip(".")
                    q += 3 + nlen
                raise SniffError("malformed server_name extension")
            p += elen
        return ""
    except (IndexError, UnicodeDecodeError) as exc:
        raise SniffError(f"malformed ClientHello ({exc})") from None


def tls_alert(description: int = 112) -> bytes:
    """A fatal TLS alert record (112 = unrecognized_name, 80 = internal_error)."""
    return bytes([21, 3, 1, 0, 2, 2, description])


# --- HTTP/2 (h2c prior knowledge) -------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2c_authority(buf: bytes) -> tuple[str, int] | None:
    """``(authority, stream_id)`` of the first request; ``None`` while more is needed."""
    n = min(len(buf), len(H2_PREFACE))
    if buf[:n] != H2_PREFACE[:n]:
        raise SniffError("not an HTTP/2 prior-knowledge connection")
    if len(buf) < len(H2_PREFACE):
        return None
    pos = len(H2_PREFACE)
    block = bytearray()
    stream = 0
    while True:
        if len(buf) < pos + 9:
            return None
        length = int.from_bytes(buf[pos:pos + 3], "big")
        ftype, flags = buf[pos + 3], buf[pos + 4]
        sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if len(buf) < pos + 9 + length:
            return None
        payload = buf[pos + 9:pos + 9 + length]
        pos += 9 + length
        if ftype == 1:  # HEADERS
            if flags & 0x8:  # PADDED
                if not payload or payload[0] >= len(payload):
                    raise SniffError("bad HEADERS padding")
                payload = payload[1:len(payload) - payload[0]]
            if flags & 0x20:  # PRIORITY
                if len(payload) < 5:
                    raise SniffError("short HEADERS priority")
                payload = payload[5:]
            block += payload
            stream = sid
            if flags & 0x4:
                break
        elif ftype == 9 and stream:  # CONTINUATION
            block += payload
            if flags & 0x4:
                break
        elif stream:
            raise SniffError("HEADERS not followed by CONTINUATION")
    import hpack

    try:
        headers = hpack.Decoder().decode(bytes(block))
    except Exception as exc:  # noqa: BLE001 - hpack raises several kinds
        raise SniffError(f"bad HPACK block ({exc})") from None
    for k, v in headers:
        key = k.decode() if isinstance(k, bytes) else k
        if key in (":authority", "host"):
            value = v.decode() if isinstance(v, bytes) else v
            return value, stream
    return "", stream


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


#: An empty server SETTINGS frame.  gRPC clients send no request before the
#: server's preface arrives, so a door routing by ``:authority`` sends this
#: first, and removes the client's ACK of it (:class:`SettingsAckFilter`)
#: before the backend, which sends its own SETTINGS, sees the stream.
H2_SERVER_PREFACE = _frame(4, 0, 0, b"")


def h2_refusal(stream_id: int, grpc_status: int, message: str) -> bytes:
    """A trailers-only gRPC response and GOAWAY (after :data:`H2_SERVER_PREFACE`):
    the clean way to tell a gRPC client that no route (or no remote) answers."""
    import hpack

    block = hpack.Encoder().encode([
        (":status", "200"), ("content-type", "application/grpc"),
        ("grpc-status", str(grpc_status)), ("grpc-message", _pct(message))])
    return (_frame(1, 0x4 | 0x1, stream_id, block)  # HEADERS, END_HEADERS | END_STREAM
            + _frame(7, 0, 0, stream_id.to_bytes(4, "big") + b"\0\0\0\0"))  # GOAWAY NO_ERROR


class SettingsAckFilter:
    """Passes a client's HTTP/2 byte stream on, minus its first SETTINGS ACK."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._preface = len(H2_PREFACE)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buf += data
        out = bytearray()
        if self._preface:
            n = min(self._preface, len(self._buf))
            out += self._buf[:n]
            del self._buf[:n]
            self._preface -= n
        while not self._preface and len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if length > 16384:  # over the default frame size we advertised: not ours to judge
                self.done = True
                out += self._buf
                self._buf.clear()
                break
            if len(self._buf) < 9 + length:
                break
            if self._buf[3] == 4 and self._buf[4] & 1 and length == 0:
                del self._buf[:9]
                self.done = True
                out += self._buf
                self._buf.clear()
                break
            out += self._buf[:9 + length]
            del self._buf[:9 + length]
        return bytes(out)


def _pct(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F and c != "%" else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in text)


# --- HTTP/1.1 ------------------------------------------------------------------------------

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


@dataclass
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]

    def get(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def host(self) -> str:
        h = (self.get(b"host") or b"").decode("latin-1").strip().lower()
        if h.startswith("["):
            return h[:h.find("]") + 1] if "]" in h else h
        return h.rsplit(":", 1)[0] if ":" in h else h

    def encode(self) -> bytes:
        lines = [b" ".join((self.method, self.target, self.version))]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


class HTTPError(SniffError):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
_BAD_IN_VALUE = re.compile(rb"[\r\n\0]")


def parse_head(raw: bytes) -> RequestHead:
    """One request head (without the final blank line), parsed strictly.

    Anything a lenient backend could read differently from us is refused
    with 400 (RFC 9112): bare CR/LF/NUL, obsolete line folding, a repeated
    ``Host``/``Content-Length``/``Transfer-Encoding``, or both of the last two.
    """
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") \
            or not parts[1] or _BAD_IN_VALUE.search(lines[0]):
        raise HTTPError(400, "malformed request line")
    headers = []
    seen: dict[bytes, int] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or _BAD_IN_VALUE.search(value):
            raise HTTPError(400, "malformed header line")
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        headers.append((name, value.strip(b" \t")))
    for key in (b"host", b"content-length", b"transfer-encoding"):
        if seen.get(key, 0) > 1:
            raise HTTPError(400, f"more than one {key.decode()} header")
    if seen.get(b"transfer-encoding") and seen.get(b"content-length"):
        raise HTTPError(400, "both Transfer-Encoding and Content-Length")
    return RequestHead(parts[0], parts[1], parts[2], headers)


@dataclass
class RequestStream:
    """Finds request heads in a client's byte stream; ``on_head`` may rewrite each.

    ``feed`` returns the bytes to pass on (heads re-encoded, bodies as they
    came).  After a request asking for ``Upgrade`` (WebSocket) or ``CONNECT``,
    what follows is held (``awaiting_upgrade``) until the caller tells
    :meth:`upgrade_answered` whether the backend switched protocols: only
    then does the rest pass through untouched — a backend that answers 200
    instead keeps every later head parsed and rewritten.
    """

    on_head: Callable[[RequestHead], RequestHead]
    limit: int = MAX_SNIFF
    _buf: bytearray = field(default_factory=bytearray)
    _state: str = "head"  # head | body | chunk-size | chunk-data | chunk-end | trailer | wait | tunnel
    _left: int = 0
    _scanned: int = 0  # bytes of _buf already searched for the end of a head
    upgrade_method: bytes = b""

    @property
    def passthrough(self) -> bool:
        return self._state == "tunnel"

    @property
    def awaiting_upgrade(self) -> bool:
        return self._state == "wait"

    def feed(self, data: bytes) -> bytes:
        if self._state == "tunnel":
            return data
        self._buf += data
        out = bytearray()
        try:
            self._parse(out)
        except SniffError as exc:
            exc.partial = bytes(out)
            raise
        return bytes(out)

    def upgrade_answered(self, switched: bool) -> bytes:
        """The backend's answer to the held Upgrade/CONNECT request; returns what to pass on."""
        if self._state != "wait":
            return b""
        self._state = "tunnel" if switched else "head"
        held, self._buf = bytes(self._buf), bytearray()
        self._scanned = 0
        return held if switched else self.feed(held)

    def _parse(self, out: bytearray) -> None:
        while self._buf:
            st = self._state
            if st == "tunnel":
                out += self._buf
                self._buf.clear()
            elif st == "wait":
                if len(self._buf) > self.limit:
                    raise HTTPError(400, "too much data before the upgrade was answered")
                break
            elif st == "head":
                i = self._buf.find(b"\r\n\r\n", max(self._scanned - 3, 0))
                if i < 0:
                    self._scanned = len(self._buf)
                    if len(self._buf) > self.limit:
                        raise HTTPError(431, "request head too large")
                    break
                self._scanned = 0
                raw = bytes(self._buf[:i])
                while raw.startswith(b"\r\n"):  # tolerated before a request line (RFC 9112 2.2)
                    raw = raw[2:]
                head = parse_head(raw)
                del self._buf[:i + 4]
                out += self.on_head(head).encode()
                self._after_head(head)
            elif st in ("body", "chunk-data"):
                n = min(self._left, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._left -= n
                if not self._left:
                    self._state = "head" if st == "body" else "chunk-end"
            elif st == "chunk-end":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
                out += self._buf[:2]
                del self._buf[:2]
                self._state = "chunk-size"
            elif st == "chunk-size":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    if len(self._buf) > 1024:
                        raise HTTPError(400, "chunk size line too long")
                    break
                line = bytes(self._buf[:i + 2])
                size_text = line[:i].split(b";", 1)[0]
                if not _CHUNK_SIZE.match(size_text) or _BAD_IN_VALUE.search(line[:i]):
                    raise HTTPError(400, "bad chunk size")
                del self._buf[:i + 2]
                out += line
                size = int(size_text, 16)
                self._state, self._left = ("chunk-data", size) if size else ("trailer", 0)
            elif st == "trailer":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    if len(self._buf) > self.limit:
                        raise HTTPError(431, "trailers too large")
                    break
                if _BAD_IN_VALUE.search(self._buf[:i]):
                    raise HTTPError(400, "malformed trailer line")
                out += self._buf[:i + 2]
                del self._buf[:i + 2]
                if i == 0:
                    self._state = "head"

    def _after_head(self, head: RequestHead) -> None:
        conn = (head.get(b"connection") or b"").lower()
        if head.method == b"CONNECT" or (head.get(b"upgrade") and b"upgrade" in conn):
            if head.get(b"transfer-encoding") is not None or (head.get(b"content-length") or b"0") != b"0":
                raise HTTPError(400, "an upgrade request with a body")
            self.upgrade_method = head.method
            self._state = "wait"
            return
        te = head.get(b"transfer-encoding")
        if te is not None:
            if te.lower() != b"chunked":
                raise HTTPError(400, "unsupported Transfer-Encoding")
            self._state = "chunk-size"
            return
        cl = head.get(b"content-length")
        if cl is not None:
            if not cl.isdigit() or len(cl) > 18:
                raise HTTPError(400, "bad Content-Length")
            self._left = int(cl)
            if self._left:
                self._state = "body"


def switched_protocols(response_start: bytes, method: bytes) -> bool | None:
    """Did the backend accept an Upgrade (101) or CONNECT (2xx)?  None: need more bytes."""
    if len(response_start) < 12:
        return None
    status = response_start[9:12]
    if not response_start.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        return False
    return status.startswith(b"2") if method == b"CONNECT" else status == b"101"


def http_response(code: int, reason: str, body: str, close: bool = True) -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(data)}\r\n" + ("connection: close\r\n" if close else "")
            + "\r\n").encode() + data


def host_matches(pattern: str, host: str) -> bool:
    """``web.example`` matches itself; ``*.example`` matches any name under example."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def pick(routes: dict[str, object], host: str) -> object | None:
    """The route for ``host``: an exact name first, else the longest wildcard."""
    host = host.lower().rstrip(".")
    if host in routes:
        return routes[host]
    best = None
    for pattern, route in routes.items():
        if pattern.startswith("*.") and host_matches(pattern, host) and (
                best is None or len(pattern) > len(best[0])):
            best = (pattern, route)
    return best[1] if best else None


__all__ = [
    "H2_PREFACE",
    "H2_SERVER_PREFACE",
    "MAX_SNIFF",
    "HTTPError",
    "RequestHead",
    "RequestStream",
    "SettingsAckFilter",
    "SniffError",
    "client_hello_sni",
    "h2_refusal",
    "h2c_authority",
    "host_matches",
    "http_response",
    "parse_head",
    "pick",
    "switched_protocols",
    "tls_alert",
]
