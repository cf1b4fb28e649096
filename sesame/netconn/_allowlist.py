"""
Dial allowlists for NetConn: which ``host:port`` a remote may connect to.

Default deny.  A pattern is ``HOST:PORTS``:

* ``HOST`` — an IP address (``127.0.0.1``, ``[::1]``), a CIDR block
  (``10.0.0.0/8``, ``[fd00::]/8``), a host name (``db.internal``), a name
  wildcard (``*.lab.example``: any name *under* lab.example), or ``*`` (any
  host);
* ``PORTS`` — a port (``22``), a range (``8000-8100``), or ``*``; ports are
  ASCII digits (``²`` or ``٢٢`` are refused, not read as numbers).

``*`` alone means ``*:*``.  Names match names and IP patterns match
addresses: a name the client asks for is allowed when a name pattern
matches it, or else when each address it resolves to that we would dial is
allowed by an address pattern (the dialer connects only to those checked
addresses, so DNS cannot swap them afterwards).  Names are compared in their
IDNA form (:func:`host_name`): ``*.bücher.example`` allows
``x.xn--bcher-kva.example`` and ``X.Bücher.example`` alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import idna

from sesame import _names as N

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PatternError(ValueError):
    """An allowlist pattern that cannot be parsed; the message names it."""


class AddressError(ValueError):
    """A dial address that is not ``host:port``."""


@dataclass(frozen=True)
class Rule:
    text: str
    any_host: bool = False
    network: IPNetwork | None = None
    name: str | None = None  # exact name, lower case
    suffix: str | None = None  # ".lab.example" for *.lab.example
    low: int = 0
    high: int = 65535

    def port_ok(self, port: int) -> bool:
        return self.low <= port <= self.high

    def matches_name(self, host: str, port: int) -> bool:
        if not self.port_ok(port):
            return False
        if self.any_host:
            return True
        h = host.lower().rstrip(".")
        if self.name is not None:
            return h == self.name
        if self.suffix is not None:
            return h.endswith(self.suffix) and len(h) > len(self.suffix)
        return False

    def matches_ip(self, ip: IPAddress, port: int) -> bool:
        if not self.port_ok(port):
            return False
        if self.any_host:
            return True
        if self.network is not None:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return ip.version == self.network.version and ip in self.network
        return False


def shown(text: str, limit: int = 100) -> str:
    """``repr(text)``, cut after ``limit`` characters: what a client sent, echoed in a status
    message, must not push the status past gRPC's 8 KiB metadata limit (the client would
    see RESOURCE_EXHAUSTED instead of the status)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def split_host_port(address: str) -> tuple[str, str]:
    """``host:port`` / ``[v6]:port`` → (host, port text).  Raises AddressError."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1:end + 2] != ":":
            raise AddressError(f"{shown(address)}: expected [IPv6]:port")
        return address[1:end], address[end + 2:]
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{shown(address)}: expected host:port")
    if ":" in host:
        raise AddressError(f"{shown(address)}: IPv6 addresses must be bracketed, e.g. [::1]:22")
    return host, port


def parse_port(text: str, what: str) -> int:
    """A port 1-65535 in ASCII digits (:func:`sesame._names.parse_port`); AddressError
    ``"{what}: port '²' is not a number in 1-65535"`` otherwise."""
    try:
        return N.parse_port(text, what)
    except ValueError as exc:
        raise AddressError(str(exc)) from None


#: Longer than any name IDNA can encode to 253 characters; refused before encoding.
_MAX_NAME_TEXT = 1024


def host_name(host: str, what: str = "host name") -> str:
    """The ASCII form of a host name to dial or match: IDNA 2008 with the UTS #46 mapping
    (what browsers and Twisted's ``HostnameEndpoint`` use), so ``X.Bücher.example`` is
    ``x.xn--bcher-kva.example``; a trailing dot stays.

    :raises AddressError: naming the problem, for a name no resolver takes: an empty or
        64-character label, more than 253 characters, a space, ``_``, a control character,
        a label starting or ending with ``-``...
    """
    if len(host) > _MAX_NAME_TEXT:
        raise AddressError(f"{what} {shown(host)} is too long")
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except ValueError as exc:  # idna.IDNAError is a UnicodeError, hence a ValueError
        raise AddressError(f"{what} {shown(host)} is not valid: {exc}") from None


def parse_rule(text: str) -> Rule:
    t = text.strip()
    if t == "*":
        return Rule(text, any_host=True)
    try:
        host, ports = split_host_port(t)
    except AddressError:
        # "[fd00::]/8:22" style: bracketed CIDR
        if t.startswith("[") and "]/" in t:
            end = t.index("]")
            rest = t[end + 1:]
            prefix, sep, ports = rest[1:].partition(":")
            if not sep:
                raise PatternError(f"allow pattern {text!r}: expected HOST:PORTS") from None
            host = t[1:end] + "/" + prefix
        else:
            raise PatternError(f"allow pattern {text!r}: expected HOST:PORTS "
                               "(e.g. 127.0.0.1:*, 10.0.0.0/8:22, [::1]:8000-8100)") from None
    if ports == "*":
        low, high = 1, 65535
    else:
        lo, sep, hi = ports.partition("-")
        try:
            low = parse_port(lo, f"allow pattern {text!r}")
            high = parse_port(hi, f"allow pattern {text!r}") if sep else low
        except AddressError as exc:
            raise PatternError(str(exc)) from None
        if low > high:
            raise PatternError(f"allow pattern {text!r}: port range {ports} is backwards")
    if host == "*":
        return Rule(text, any_host=True, low=low, high=high)
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        net = None
    if net is not None:
        return Rule(text, network=net, low=low, high=high)
    name = host.lower().rstrip(".")
    if name.startswith("*."):
        suffix = name[1:]
        if not _valid_name(suffix[1:]):
            raise PatternError(f"allow pattern {text!r}: {host!r} is not a host name wildcard")
        return Rule(text, suffix="." + _pattern_name(text, suffix[1:]), low=low, high=high)
    if "/" in name or not _valid_name(name):
        raise PatternError(f"allow pattern {text!r}: {host!r} is neither an address, "
                           "a CIDR block nor a host name")
    return Rule(text, name=_pattern_name(text, name), low=low, high=high)


def _pattern_name(text: str, name: str) -> str:
    """A pattern's name as dials are matched: ASCII names as they are (lower case),
    others in their IDNA form (``bücher.example`` → ``xn--bcher-kva.example``)."""
    if name.isascii():
        return name
    try:
        return host_name(name).lower()
    except AddressError as exc:
        raise PatternError(f"allow pattern {text!r}: {exc}") from None


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    for label in name.split("."):
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


class Allowlist:
    """An ordered set of rules; empty means nothing is allowed."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(parse_rule(p) for p in patterns)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"Allowlist({[r.text for r in self.rules]!r})"

    def allows_name(self, host: str, port: int) -> bool:
        return any(r.matches_name(host, port) for r in self.rules)

    def allows_ip(self, ip: IPAddress | str, port: int) -> bool:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        return any(r.matches_ip(addr, port) for r in self.rules)

    def filter_ips(self, ips: Sequence[str], port: int) -> list[str]:
        return [ip for ip in ips if self.allows_ip(ip, port)]


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


__all__ = [
    "AddressError",
    "Allowlist",
    "PatternError",
    "Rule",
    "host_name",
    "ip_literal",
    "parse_port",
    "parse_rule",
    "shown",
    "split_host_port",
]
