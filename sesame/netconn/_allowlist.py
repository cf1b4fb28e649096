"""
Dial allowlists for NetConn: which ``host:port`` a remote may connect to.

Default deny.  A pattern is ``HOST:PORTS``:

* ``HOST`` — an IP address (``127.0.0.1``, ``[::1]``), a CIDR block
  (``10.0.0.0/8``, ``[fd00::]/8``), a host name (``db.internal``), a name
  wildcard (``*.lab.example``: any name *under* lab.example), or ``*`` (any
  host);
* ``PORTS`` — a port (``22``), a range (``8000-8100``), or ``*``.

``*`` alone means ``*:*``.  Names match names and IP patterns match
addresses: a name the client asks for is allowed when a name pattern
matches it, or else when each address it resolves to that we would dial is
allowed by an address pattern (the dialer connects only to those checked
addresses, so DNS cannot swap them afterwards).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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


def split_host_port(address: str) -> tuple[str, str]:
    """``host:port`` / ``[v6]:port`` → (host, port text).  Raises AddressError."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1:end + 2] != ":":
            raise AddressError(f"{address!r}: expected [IPv6]:port")
        return address[1:end], address[end + 2:]
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{address!r}: expected host:port")
    if ":" in host:
        raise AddressError(f"{address!r}: IPv6 addresses must be bracketed, e.g. [::1]:22")
    return host, port


def parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise AddressError(f"{what}: port {text!r} is not a number in 1-65535")
    return int(text)


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
        return Rule(text, suffix=suffix, low=low, high=high)
    if "/" in name or not _valid_name(name):
        raise PatternError(f"allow pattern {text!r}: {host!r} is neither an address, "
                           "a CIDR block nor a host name")
    return Rule(text, name=name, low=low, high=high)


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
    "ip_literal",
    "parse_rule",
    "split_host_port",
]
