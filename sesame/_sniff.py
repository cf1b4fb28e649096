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
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            if flags & 0x20:  # PRIORITY
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


def parse_head(raw: bytes) -> RequestHead:
    """One request head (without the final blank line)."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[2].startswith(b"HTTP/1."):
        raise HTTPError(400, "malformed request line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HTTPError(400, "malformed header line")
        headers.append((name, value.strip(b" \t")))
    head = RequestHead(parts[0], parts[1], parts[2], headers)
    if head.get(b"transfer-encoding") is not None and head.get(b"content-length") is not None:
        raise HTTPError(400, "both Transfer-Encoding and Content-Length")
    return head


@dataclass
class RequestStream:
    """Finds request heads in a client's byte stream; ``on_head`` may rewrite each.

    ``feed`` returns the bytes to pass on (heads re-encoded, bodies as they
    came).  After a request with ``Upgrade`` (WebSocket) or ``CONNECT`` the
    rest of the stream passes through untouched.
    """

    on_head: Callable[[RequestHead], RequestHead]
    limit: int = MAX_SNIFF
    _buf: bytearray = field(default_factory=bytearray)
    _state: str = "head"  # head | body | chunk-size | chunk-data | trailer | tunnel
    _left: int = 0

    @property
    def passthrough(self) -> bool:
        return self._state == "tunnel"

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

    def _parse(self, out: bytearray) -> None:
        while self._buf:
            st = self._state
            if st == "tunnel":
                out += self._buf
                self._buf.clear()
            elif st == "head":
                i = self._buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self._buf) > self.limit:
                        raise HTTPError(431, "request head too large")
                    break
                head = parse_head(bytes(self._buf[:i]).lstrip(b"\r\n"))
                del self._buf[:i + 4]
                out += self.on_head(head).encode()
                self._after_head(head)
            elif st == "body":
                n = min(self._left, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._left -= n
                if not self._left:
                    self._state = "head"
            elif st == "chunk-size":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    if len(self._buf) > 1024:
                        raise HTTPError(400, "chunk size line too long")
                    break
                line = bytes(self._buf[:i + 2])
                del self._buf[:i + 2]
                out += line
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HTTPError(400, "bad chunk size") from None
                if size < 0:
                    raise HTTPError(400, "bad chunk size")
                self._state, self._left = ("chunk-data", size + 2) if size else ("trailer", 0)
            elif st == "chunk-data":
                n = min(self._left, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._left -= n
                if not self._left:
                    self._state = "chunk-size"
            elif st == "trailer":
                i = self._buf.find(b"\r\n")
                if i < 0:
                    if len(self._buf) > self.limit:
                        raise HTTPError(431, "trailers too large")
                    break
                out += self._buf[:i + 2]
                del self._buf[:i + 2]
                if i == 0:
                    self._state = "head"

    def _after_head(self, head: RequestHead) -> None:
        conn = (head.get(b"connection") or b"").lower()
        if head.method == b"CONNECT" or (head.get(b"upgrade") and b"upgrade" in conn):
            self._state = "tunnel"
            return
        te = head.get(b"transfer-encoding")
        if te is not None:
            if te.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise HTTPError(400, "unsupported Transfer-Encoding")
            self._state = "chunk-size"
            return
        cl = head.get(b"content-length")
        if cl is not None:
            if not cl.isdigit():
                raise HTTPError(400, "bad Content-Length")
            self._left = int(cl)
            if self._left:
                self._state = "body"


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
    "tls_alert",
]
