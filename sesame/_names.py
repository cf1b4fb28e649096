"""
Names, metadata keys and small parsers shared by the hub, the remote agent,
endpoints and the CLI.

Metadata keys are sesame-Python extensions around the upstream schema (which
leaves authentication and stream correlation open, PROTOCOL.md §5):

``authorization: Bearer <token>``
    every call to the hub (remotes and clients alike);
``sesame-endpoints: netconn,web``
    on a remote's ``Tunnel`` call: the endpoints this session offers;
``sesame-stream-id: <k>``
    on a remote's ``Stream`` call: the ``TunnelResponse.stream`` id it answers;
``sesame-remote`` / ``sesame-endpoint``
    on a client's ``NetConn`` call to the hub: where to go.  Endpoint
    ``netconn`` (the default) means "dial host:port from the remote's agent".
"""

from __future__ import annotations

import re

#: The namespace of a remote, token or route that names none.
DEFAULT_NAMESPACE = "default"

MD_AUTH = "authorization"
MD_ENDPOINTS = "sesame-endpoints"
MD_STREAM_ID = "sesame-stream-id"
MD_REMOTE = "sesame-remote"
MD_ENDPOINT = "sesame-endpoint"
MD_INSTANCE = "sesame-instance"

NETCONN_ENDPOINT = "netconn"
TUNNEL_METHOD = "/sesame.v1alpha1.TunnelService/Tunnel"
STREAM_METHOD = "/sesame.v1alpha1.TunnelService/Stream"
LIST_REMOTES_METHOD = "/sesame.v1alpha1.Sesame/ListRemotes"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_RESOURCE = re.compile(r"^namespaces/([^/]+)/remotes/([^/]+)$")


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def parse_remote(text: str, namespace: str | None = None) -> tuple[str, str]:
    """``edge-1`` or ``namespaces/ns/remotes/edge-1`` → (namespace, name)."""
    m = _RESOURCE.match(text)
    if m:
        ns, name = m.group(1), m.group(2)
    else:
        ns, name = namespace or DEFAULT_NAMESPACE, text
    if not valid_name(name):
        raise ValueError(f"remote name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    if not valid_name(ns):
        raise ValueError(f"namespace {ns!r} must be 1-63 letters, digits, '.', '_' or '-'")
    return ns, name


def resource_name(namespace: str, name: str) -> str:
    return f"namespaces/{namespace}/remotes/{name}"


def parse_bearer(value: str, *, strict: bool = False) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>``, or None when the value
    is not one.  Whitespace around the token is dropped either way.

    The default is the HTTP rule (the twisted.web side): whitespace around the whole
    value is ignored, the scheme matches in any case (``bearer``, ``BEARER``) and a
    value with no token (``Bearer``, ``Bearer   ``) is None.

    ``strict`` is the rule gRPC metadata has always had here (:func:`bearer`): the value
    starts with exactly ``Bearer `` (that case, one space, nothing before it), and an
    empty token is ``""`` (which no store verifies), not None.
    """
    if strict:
        scheme, space, token = value.partition(" ")
        return token.strip() if space and scheme == "Bearer" else None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer(metadata: tuple) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry of gRPC call
    metadata (:func:`parse_bearer`, ``strict``), or None; entries of another scheme, and
    non-text values, are skipped."""
    for k, v in metadata or ():
        if k == MD_AUTH and isinstance(v, str):
            token = parse_bearer(v, strict=True)
            if token is not None:
                return token
    return None


def md_get(metadata: tuple, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def grpc_address(listen: str) -> tuple[str, int]:
    """
    A listen description → (host, port).  Accepts Twisted's
    ``tcp:7443:interface=127.0.0.1`` / ``tcp6:...`` and plain ``HOST:PORT``.

    :raises ValueError: ``"listen '...': port '٢٢' is not a number in 0-65535"`` for a
        port that is not ASCII digits 0-65535 (:func:`parse_port`), or naming the
        unsupported option or the missing host.
    """
    text = listen.strip()
    if text.startswith(("tcp:", "tcp6:")):
        # Twisted's grammar, escapes and keyword order included: tcp:PORT:INTERFACE:BACKLOG,
        # tcp6:PORT:BACKLOG:INTERFACE, or any of them as key=value
        args, kwargs = split_endpoint_description(text)
        kind, positional = args[0], args[1:]
        unknown = sorted(set(kwargs) - {"port", "interface", "backlog"})
        if unknown:
            raise ValueError(f"listen {listen!r}: unsupported option {unknown[0]!r}")
        names = ["port", "interface", "backlog"] if kind == "tcp" else ["port", "backlog", "interface"]
        if len(positional) > len(names):
            raise ValueError(f"listen {listen!r}: too many parts")
        for name, value in zip(names, positional, strict=False):
            if name in kwargs:
                raise ValueError(f"listen {listen!r}: {name} given twice")
            kwargs[name] = value
        port_text = kwargs.get("port", "")
        host = kwargs.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    else:
        if text.startswith("["):
            end = text.find("]")
            host, port_text = text[1:end], text[end + 2:]
        else:
            host, _, port_text = text.rpartition(":")
    # ASCII digits only: "٢٢" is not port 22, "²" not an uncaught int() error
    port = parse_port(port_text, f"listen {listen!r}", low=0)
    if not host:
        raise ValueError(f"listen {listen!r}: no host")
    return host, port


def hub_address(text: str) -> tuple[str, int]:
    """Where to dial a hub → (host, port).

    Takes ``HOST:PORT``, ``[IPV6]:PORT`` and Twisted's client spelling ``tcp:HOST:PORT``
    / ``tcp:host=HOST:port=PORT`` (``tcp6:`` too; colons of an IPv6 host escaped there,
    ``tcp6:host=\\:\\:1:port=7443``).  TLS is not part of the address: it comes from
    ``--ca`` / ``tls=``.

    :raises ValueError: saying which form is expected, for anything else (a port that is
        not ASCII digits 1-65535, no host, ``ssl:``/``tls:``/``unix:`` descriptions, or
        options such as ``timeout=``).
    """
    expected = "expected HOST:PORT, [IPV6]:PORT or tcp:HOST:PORT (tcp:host=HOST:port=PORT)"
    stripped = text.strip()
    kind = stripped.split(":", 1)[0]
    if kind in ("tcp", "tcp6"):
        args, kwargs = split_endpoint_description(stripped)
        positional = args[1:]
        unknown = sorted(set(kwargs) - {"host", "port", "interface"})
        if unknown:
            raise ValueError(f"{text!r}: unsupported option {unknown[0]!r}; {expected}")
        if "interface" in kwargs:  # the listen spelling, tcp:PORT:interface=HOST, as before
            kwargs.setdefault("host", kwargs.pop("interface"))
        host = kwargs["host"] if "host" in kwargs else (positional.pop(0) if positional else "")
        port_text = kwargs["port"] if "port" in kwargs else (positional.pop(0) if positional else "")
        if positional:
            raise ValueError(f"{text!r}: too many parts; {expected}")
    elif kind in ("ssl", "tls", "unix", "sesame"):
        raise ValueError(f"{text!r}: a hub is dialled over TCP (TLS comes from --ca / tls=); "
                         f"{expected}")
    elif stripped.startswith("["):
        end = stripped.find("]")
        if end < 0 or stripped[end + 1:end + 2] != ":":
            raise ValueError(f"{text!r}: {expected}")
        host, port_text = stripped[1:end], stripped[end + 2:]
    else:
        host, sep, port_text = stripped.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: {expected}")
    if not host:
        raise ValueError(f"{text!r}: no host; {expected}")
    if not port_text:
        raise ValueError(f"{text!r}: no port; {expected}")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number in 1-65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    return h in ("localhost", "::1") or h.startswith("127.")


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits ``0-9``.

    ``str.isdigit`` alone also takes ``²``, ``٢`` or ``２`` (which ``int`` refuses or
    reads as numbers), and ``int`` alone takes signs, spaces and ``_``.
    """
    return text.isascii() and text.isdigit()


def parse_port(text: str, what: str = "port", *, low: int = 1) -> int:
    """A TCP port written in ASCII digits, ``low``-65535: the one parser of ports typed by
    users or sent by peers (dial addresses, ``--allow`` patterns, endpoint keys, routes).

    ``parse_port("8080", "port")`` is 8080; ``"²"``, ``"٢٢"``, ``"+22"``, ``" 22"``,
    ``"2_2"``, ``"0"`` (unless ``low=0``) and ``"70000"`` are refused.

    :raises ValueError: ``"{what}: port '٢٢' is not a number in 1-65535"``.
    """
    if len(text) > 5 or not ascii_digits(text) or not low <= int(text) <= 65535:
        shown = repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"
        raise ValueError(f"{what}: port {shown} is not a number in {low}-65535")
    return int(text)


def split_endpoint_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint description into positional and keyword parameters.

    The grammar is the one ``serverFromString``/``clientFromString`` document: parameters
    are separated by ``:``, the first unescaped ``=`` in a parameter makes it
    ``key=value``, and a backslash takes the next character literally.  No endpoint is
    built and no plugin is loaded: ``"tcp:8080:interface=127.0.0.1"`` gives
    ``(["tcp", "8080"], {"interface": "127.0.0.1"})``.

    :raises ValueError: on a trailing backslash (it escapes nothing).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []  # the current parameter: [value] or [key, value]
    current: list[str] = []
    chars = iter(description)
    for ch in chars:
        if ch == ":":
            parts.append("".join(current))
            _add_parameter(parts, args, kwargs)
            parts, current = [], []
        elif ch == "=" and not parts:
            parts.append("".join(current))
            current = []
        elif ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(f"{description!r} ends with a backslash that escapes nothing")
            current.append(escaped)
        else:
            current.append(ch)
    parts.append("".join(current))
    _add_parameter(parts, args, kwargs)
    return args, kwargs


def _add_parameter(parts: list[str], args: list[str], kwargs: dict[str, str]) -> None:
    if len(parts) == 1:
        args.append(parts[0])
    else:
        kwargs[parts[0]] = parts[1]


#: Listen backlog sesame gives the TCP/TLS listeners it makes from a description (front
#: doors, ``sesame forward``).  Twisted's default is 50: a burst past it has the kernel
#: drop handshakes, and a client that already sent data sees a reset.
LISTEN_BACKLOG = 1024


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """A ``tcp:``/``tcp6:``/``ssl:`` server endpoint description with ``backlog=`` added
    unless it sets one; any other description unchanged."""
    if description.split(":", 1)[0] in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description

