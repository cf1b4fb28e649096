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
#
# RFC 9112 request heads, read strictly: whatever the door forwards, every backend must read
# the same way (same requests, same Host, same body framing).  h11 (the oracle of
# tests/test_sniff_fuzz.py) accepts everything forwarded here and parses it identically;
# where h11 is lenient (bare LF line ends, obs-fold, a second Host, HTTP/1.x other than 1.0
# and 1.1, control characters in values) the door refuses with 400, as docs/FRONTDOORS.md says.

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) (HTTP/1\.[01])")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
#: uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): reg-name, IPv4 or an IP literal
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
#: absolute-form (RFC 9112 3.2.2): scheme "://" authority (userinfo is refused)
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: every byte a head may hold outside its CRLFs: no control character but HTAB
_PLAIN = bytes(b for b in range(256) if b == 0x09 or 0x20 <= b != 0x7F)
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
#: fields that may appear once; a second would let two parsers disagree
_SINGLE = (b"host", b"content-length", b"transfer-encoding")
_WATCH = frozenset((*_SINGLE, b"connection", b"upgrade"))
#: fields a trailer must not carry (RFC 9110 6.5.1): framing and routing
_NOT_IN_TRAILER = frozenset(_SINGLE)


def _route_host(value: bytes) -> str:
    """The name a ``Host`` value (or an absolute target's authority) routes by."""
    h = value.decode("latin-1").lower()
    if h.startswith("["):
        return h[:h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if ":" in h else h


@dataclass
class RequestHead:
    """One parsed request head.  ``chunked``, ``length`` and ``upgrade`` are its body
    framing as :func:`parse_head` read it; ``on_head`` callbacks change only fields."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    chunked: bool = False
    length: int = 0
    upgrade: bool = False  # an Upgrade (Connection: upgrade) or CONNECT request

    def get(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def host(self) -> str:
        """The name this request routes by: its ``Host``, lower case, without the port."""
        return _route_host(self.get(b"host") or b"")

    def encode(self) -> bytes:
        lines = [b" ".join((self.method, self.target, self.version))]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


class HTTPError(SniffError):
    """A request the door refuses: ``code`` is the status to answer (400, 431), the
    message the reason given in the response body."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _bad_byte(raw: bytes, what: str) -> HTTPError:
    """The 400 for the first byte of ``raw`` that may not be there."""
    m = _BAD_BYTE.search(raw)
    assert m is not None
    line = raw.count(b"\r\n", 0, m.start()) + 1
    c = raw[m.start()]
    kind = ("bare LF" if c == 0x0A else "bare CR" if c == 0x0D else "NUL" if c == 0
            else f"control character 0x{c:02x}")
    return HTTPError(400, f"{kind} in the {what} (line {line})")


def _bad_request_line(line: bytes) -> HTTPError:
    parts = line.split(b" ")
    if len(parts) != 3:
        why = "malformed request line (not METHOD SP target SP version)"
    elif _TOKEN.fullmatch(parts[0]) is None:
        why = "invalid method"
    elif _REQUEST_LINE.fullmatch(b"GET " + parts[1] + b" HTTP/1.1") is None:
        why = "invalid request target"
    elif _VERSION.fullmatch(parts[2]) is not None:
        why = "unsupported HTTP version (HTTP/1.0 and HTTP/1.1 are served)"
    else:
        why = "malformed HTTP version"
    return HTTPError(400, why)


def _bad_field(line: bytes, what: str = "header") -> HTTPError:
    name, sep, _ = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        why = "obsolete line folding (a line starting with whitespace)"
    elif not sep:
        why = f"{what} line without a colon"
    elif not name:
        why = f"empty {what} name"
    elif name[-1:] in (b" ", b"\t"):
        why = f"whitespace between a {what} name and its colon"
    else:
        why = f"invalid character in a {what} name"
    return HTTPError(400, why)


def parse_head(raw: bytes) -> RequestHead:
    """One request head (without the final blank line), parsed strictly.

    Anything a lenient backend could read differently from us is refused
    with 400 and a reason (RFC 9112): bare CR/LF, NUL or another control
    character, obsolete line folding, whitespace before a colon, a request
    line other than ``METHOD SP target SP HTTP/1.0|1.1``, a repeated
    ``Host``/``Content-Length``/``Transfer-Encoding``, both of the last two,
    a transfer coding other than ``chunked`` (or any in HTTP/1.0), a bad
    ``Content-Length``, an HTTP/1.1 request without ``Host``, an invalid
    ``Host``, an absolute target naming another host than ``Host``, or a
    body on an Upgrade/CONNECT request.
    """
    if len(raw.translate(None, _PLAIN)) != 2 * raw.count(b"\r\n"):  # one C pass each
        raise _bad_byte(raw, "request head")
    lines = raw.split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise _bad_request_line(lines[0])
    method, target, version = m.groups()
    headers = []
    seen: dict[bytes, bytes] = {}
    connection: list[bytes] = []
    upgrade = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise _bad_field(line)
        value = value.strip(b" \t")
        headers.append((name, value))
        key = name.lower()
        if key in _WATCH:
            if key == b"connection":
                connection.append(value)
            elif key == b"upgrade":
                upgrade = upgrade or bool(value)
            elif key in seen:
                raise HTTPError(400, f"more than one {name.decode().title()} header")
            seen[key] = value
    head = RequestHead(method, target, version, headers)
    host = seen.get(b"host")
    if host is None:
        if version == b"HTTP/1.1":
            raise HTTPError(400, "no Host header (HTTP/1.1 requires one)")
    elif _HOST.fullmatch(host) is None:
        raise HTTPError(400, "invalid Host header")
    absolute = _ABSOLUTE.match(target) if target[:1] != b"/" else None
    if absolute is not None:  # absolute-form: its authority, not Host, names the site
        authority = absolute.group(1)
        if _HOST.fullmatch(authority) is None:
            raise HTTPError(400, "invalid authority in the request target")
        if host is not None and _route_host(authority) != _route_host(host):
            raise HTTPError(400, "Host does not match the request target")
    te, cl = seen.get(b"transfer-encoding"), seen.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if version == b"HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te.lower() != b"chunked":
            raise HTTPError(400, "a Transfer-Encoding other than chunked")
        head.chunked = True
    elif cl is not None:
        if not cl.isdigit() or len(cl) > 18:
            raise HTTPError(400, "bad Content-Length")
        head.length = int(cl)
    if method == b"CONNECT" or (upgrade and any(
            t.strip(b" \t").lower() == b"upgrade" for v in connection for t in v.split(b","))):
        if head.chunked or head.length:
            raise HTTPError(400, "a body on an Upgrade or CONNECT request")
        head.upgrade = True
    return head


def _check_trailer(line: bytes) -> None:
    if len(line.translate(None, _PLAIN)):
        raise _bad_byte(line, "chunked trailer")
    name, sep, _ = line.partition(b":")
    if not sep or _TOKEN.fullmatch(name) is None:
        raise _bad_field(line, "trailer")
    if name.lower() in _NOT_IN_TRAILER:
        raise HTTPError(400, f"{name.decode().title()} in a chunked trailer")


@dataclass
class RequestStream:
    """Finds request heads in a client's byte stream; ``on_head`` may rewrite each.

    ``feed`` returns the bytes to pass on (heads re-encoded, bodies as they
    came).  After a request asking for ``Upgrade`` (WebSocket) or ``CONNECT``,
    what follows is held (``awaiting_upgrade``) until the caller tells
    :meth:`upgrade_answered` whether the backend switched protocols: only
    then does the rest pass through untouched — a backend that answers 200
    instead keeps every later head parsed and rewritten.

    A head (request line through the blank line after the fields) may be
    ``limit`` bytes long; a longer one, complete or not, raises 431.  Empty
    lines before a request line are dropped (RFC 9112 2.2).  A refused head
    never reaches the output: ``SniffError.partial`` ends before it.
    """

    on_head: Callable[[RequestHead], RequestHead]
    limit: int = MAX_SNIFF
    _buf: bytearray = field(default_factory=bytearray)
    _state: str = "head"  # head | body | chunk-size | chunk-data | chunk-end | trailer | wait | tunnel
    _left: int = 0
    _scanned: int = 0  # bytes of _buf already searched for the end of a head
    _judged: int = 0  # bytes of an unfinished head already checked for bad bytes
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
        self._scanned = self._judged = 0
        return held if switched else self.feed(held)

    def _judge_partial_head(self, complete: bool) -> None:
        """A head not (or not yet) ended within the limit: the first of its ``limit`` bytes
        that may not be there gets 400 at once (a bare LF need not wait for a CRLF CRLF
        that may never come); past the limit, 431.  One pass over each byte, and the
        answer is the same however the bytes were split into writes."""
        buf, limit = self._buf, self.limit
        end = min(len(buf), limit + 1)
        if end == len(buf) and buf[-1:] == b"\r":
            end -= 1  # a CR is judged by the byte after it
        m = _BAD_BYTE.search(buf, self._judged, end) if end > self._judged else None
        if m is not None and m.start() < limit:
            raise _bad_byte(bytes(buf[:end]), "request head")
        self._judged = max(self._judged, end)
        if complete or len(buf) > limit or (len(buf) == limit and buf[-1:] != b"\r"):
            raise HTTPError(431, f"request head larger than {limit} bytes")

    def _parse(self, out: bytearray) -> None:
        buf = self._buf
        while buf:
            st = self._state
            if st == "tunnel":
                out += buf
                buf.clear()
            elif st == "wait":
                if len(buf) > self.limit:
                    raise HTTPError(400, "too much data before the upgrade was answered")
                break
            elif st == "head":
                if buf[:2] == b"\r\n":  # empty lines before a request line (RFC 9112 2.2)
                    n = 2
                    while buf[n:n + 2] == b"\r\n":
                        n += 2
                    del buf[:n]
                    self._scanned = self._judged = 0
                    continue
                i = buf.find(b"\r\n\r\n", max(self._scanned - 3, 0))
                if i < 0 or i + 4 > self.limit:
                    self._judge_partial_head(complete=i >= 0)
                    self._scanned = len(buf)
                    break
                self._scanned = self._judged = 0
                head = parse_head(bytes(buf[:i]))
                del buf[:i + 4]
                chunked, length, upgrade = head.chunked, head.length, head.upgrade
                out += self.on_head(head).encode()
                if upgrade:
                    self.upgrade_method = head.method
                    self._state = "wait"
                elif chunked:
                    self._state = "chunk-size"
                elif length:
                    self._state, self._left = "body", length
            elif st in ("body", "chunk-data"):
                n = min(self._left, len(buf))
                out += buf[:n]
                del buf[:n]
                self._left -= n
                if not self._left:
                    self._state = "head" if st == "body" else "chunk-end"
            elif st == "chunk-end":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
                out += buf[:2]
                del buf[:2]
                self._state = "chunk-size"
            elif st == "chunk-size":
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > 1024:
                        raise HTTPError(400, "chunk size line too long")
                    break
                line = bytes(buf[:i])
                size_text = line.split(b";", 1)[0]
                if _CHUNK_SIZE.fullmatch(size_text) is None or len(line.translate(None, _PLAIN)):
                    raise HTTPError(400, "bad chunk size line")
                del buf[:i + 2]
                out += line + b"\r\n"
                size = int(size_text, 16)
                self._state, self._left = ("chunk-data", size) if size else ("trailer", 0)
            elif st == "trailer":
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > self.limit:
                        raise HTTPError(431, "chunked trailer line too large")
                    break
                if i:
                    _check_trailer(bytes(buf[:i]))
                out += buf[:i + 2]
                del buf[:i + 2]
                if i == 0:
                    self._state = "head"


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
