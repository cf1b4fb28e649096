"""
``sesame:`` endpoints: reach a remote, or listen on one, through a hub.

Client (``clientFromString``)::

    sesame:remote=edge-1:host=127.0.0.1:port=22     dial 127.0.0.1:22 from edge-1
    sesame:remote=edge-1:endpoint=web               connect to what edge-1 serves as "web"

Server (``serverFromString``)::

    sesame:remote=edge-1:endpoint=web               serve "web" on remote edge-1

Common keys: ``hub`` (``HOST\\:PORT``, colons escaped; or ``$SESAME_HUB``),
``ca`` (PEM file of the hub's CA; or ``$SESAME_CA``; without it the system
roots are used), ``token`` / ``tokenFile`` (or ``$SESAME_TOKEN`` /
``$SESAME_TOKEN_FILE``), ``namespace``, ``tls=no`` (or ``$SESAME_TLS=no``;
loopback hubs started with ``--no-tls`` only),
``timeout`` (client: dial timeout seconds), ``cert`` / ``key`` (a client
certificate for hubs that require one; or ``$SESAME_CERT`` / ``$SESAME_KEY``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from twisted.internet import defer, interfaces
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from sesame import _names as N
from sesame.bridge import AioLoopCall, Bridge, LoopCall, get_bridge
from sesame.netconn import connectNetConn

log = Logger()

CLIENT_KEYS = {"remote", "host", "port", "endpoint", "hub", "ca", "token", "tokenFile",
               "namespace", "tls", "timeout", "cert", "key"}
SERVER_KEYS = {"remote", "endpoint", "hub", "ca", "token", "tokenFile", "namespace", "tls",
               "cert", "key"}


@dataclass(frozen=True)
class HubConfig:
    """Where the hub is and how to talk to it."""

    target: str
    token: str
    ca: bytes | None = None
    tls: bool = True
    cert: bytes | None = field(default=None, repr=False)  # client certificate (mTLS hubs)
    key: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials for the hub (CA, and a client certificate when
        ``cert``/``key`` are set), or None for a plain-text hub (``tls=false``)."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that authenticates to the hub: ``authorization: Bearer
        <token>``."""
        return ((N.MD_AUTH, f"Bearer {self.token}"),)


def hub_config(kw: Mapping[str, str], env: Mapping[str, str] | None = None) -> HubConfig:
    """Resolve hub/ca/token keys (or their environment variables); ValueError names the key."""
    env = os.environ if env is None else env
    hub = kw.get("hub") or env.get("SESAME_HUB")
    if not hub:
        raise ValueError("hub: no hub address (give hub=HOST\\:PORT or set SESAME_HUB)")
    hub_key = "hub" if kw.get("hub") else "SESAME_HUB"
    try:
        host, port = N.hub_address(hub)
    except ValueError as exc:
        raise ValueError(f"{hub_key}: {exc}") from None
    token = kw.get("token")
    token_file = kw.get("tokenFile")
    key = "token" if token else "tokenFile"
    if not token and not token_file:
        token = env.get("SESAME_TOKEN")
        token_file = env.get("SESAME_TOKEN_FILE")
        key = "SESAME_TOKEN" if token else "SESAME_TOKEN_FILE"
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{key}: cannot read token file {token_file!r}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"{key}: token file {token_file!r} is empty")
    if not token:
        raise ValueError("token: no token (give token=, tokenFile=, or set SESAME_TOKEN / "
                         "SESAME_TOKEN_FILE)")
    tls_key = "tls" if kw.get("tls") else "SESAME_TLS"
    tls_text = (kw.get("tls") or env.get("SESAME_TLS") or "yes").lower()
    if tls_text not in ("yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"{tls_key}: {tls_text!r} is not yes or no")
    tls = tls_text in ("yes", "true", "1")
    if not tls and not N.is_loopback(host):
        raise ValueError(f"{tls_key}: refusing plain text (no TLS) for hub {hub!r}, which is "
                         "not a loopback address")
    ca_path = kw.get("ca") or env.get("SESAME_CA")
    ca = None
    if ca_path and tls:
        try:
            ca = Path(ca_path).read_bytes()
        except OSError as exc:
            raise ValueError(f"ca: cannot read {ca_path!r}: {exc.strerror}") from None
    cert = key = None
    cert_path = kw.get("cert") or env.get("SESAME_CERT")
    key_path = kw.get("key") or env.get("SESAME_KEY")
    if bool(cert_path) != bool(key_path):
        raise ValueError(f"{'key' if cert_path else 'cert'}: cert= and key= go together "
                         "(a client certificate and its private key, for mTLS hubs)")
    if cert_path and key_path and tls:
        for name, path in (("cert", cert_path), ("key", key_path)):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
            if name == "cert":
                cert = data
            else:
                key = data
    return HubConfig(N.join_host_port(host, port), token, ca, tls, cert, key)


def client_cert_required(cfg: HubConfig, timeout: float = 5.0) -> str | None:
    """(blocking) Why a TLS link to the hub failed, if it is the missing client certificate.

    A hub started with ``--client-ca`` completes the TLS 1.3 handshake with a client that
    has no certificate and then drops the connection, which grpc reports only as "Socket
    closed".  Probe once: if the hub closes without a word after a handshake without a
    client certificate (a hub that does not require one sends its HTTP/2 settings at
    once), say so.  None when ``cfg`` has a client certificate, no TLS, or the probe shows
    something else.
    """
    import socket
    import ssl

    if not cfg.tls or cfg.cert is not None:
        return None
    host, port = N.grpc_address(cfg.target)
    ctx = ssl.create_default_context(cadata=cfg.ca.decode("ascii", "replace") if cfg.ca else None)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            try:
                if tls.recv(1):
                    return None
            except (ssl.SSLError, ConnectionError):
                pass
    except (OSError, ssl.SSLError, ValueError):
        return None  # not reachable, or a TLS problem grpc reports well enough
    return (f"the hub at {cfg.target} requires a client certificate (it was started with "
            "--client-ca): give --cert and --key (or cert= and key=, SESAME_CERT and SESAME_KEY)")


_channels: dict[tuple, grpc.aio.Channel] = {}


def hub_channel(cfg: HubConfig) -> grpc.aio.Channel:
    """One shared channel per hub (call on the bridge loop)."""
    key = (cfg.target, cfg.ca, cfg.tls, cfg.cert, cfg.key)
    ch = _channels.get(key)
    if ch is None:
        creds = cfg.credentials()
        ch = (grpc.aio.secure_channel(cfg.target, creds) if creds
              else grpc.aio.insecure_channel(cfg.target))
        _channels[key] = ch
    return ch


async def close_hub_channels(target: str) -> None:
    """Close the shared channels to the hub at ``target`` (on the bridge loop); the next
    :func:`hub_channel` for it opens a new one.  Errors while closing are ignored."""
    for key in [k for k in _channels if k[0] == target]:
        ch = _channels.pop(key)
        try:
            await ch.close()
        except Exception:  # noqa: BLE001 - best effort: the channel is gone either way
            pass


def hub_call_factory(cfg: HubConfig, remote: str, endpoint: str | None) -> Any:
    """A NetConn call factory that goes through the hub to ``remote``."""
    extra = [(N.MD_REMOTE, remote)]
    if endpoint:
        extra.append((N.MD_ENDPOINT, endpoint))

    def make(method: str, md: Any) -> LoopCall:
        return AioLoopCall(hub_channel(cfg), method, (*md, *cfg.metadata(), *extra))

    make.target = f"sesame:{remote}"  # type: ignore[attr-defined]
    return make


def _check_keys(kw: Mapping[str, str], allowed: set[str], kind: str) -> None:
    for k in kw:
        if k not in allowed:
            raise ValueError(f"{k}: unknown key for a sesame {kind} endpoint "
                             f"(known: {', '.join(sorted(allowed))})")


def _remote(kw: Mapping[str, str]) -> str:
    remote = kw.get("remote")
    if not remote:
        raise ValueError("remote: missing (e.g. sesame:remote=edge-1:host=127.0.0.1:port=22)")
    try:
        ns, name = N.parse_remote(remote, kw.get("namespace"))
    except ValueError as exc:
        raise ValueError(f"remote: {exc}") from None
    return N.resource_name(ns, name)


# --- client ---------------------------------------------------------------------------


@implementer(interfaces.IStreamClientEndpoint)
class SesameClientEndpoint:
    """Connect through the hub to ``address`` from ``remote`` (or to its ``endpoint``)."""

    def __init__(self, reactor: Any, hub: HubConfig, remote: str, *, address: str | None = None,
                 endpoint: str | None = None, timeout: float | None = None,
                 bridge: Bridge | None = None) -> None:
        if (address is None) == (endpoint is None):
            raise ValueError("give exactly one of address (host:port) or endpoint")
        self.reactor = reactor
        self.hub = hub
        self.remote = remote
        self.address = address
        self.endpoint = endpoint
        self.timeout = timeout
        self.bridge = bridge

    def connect(self, protocolFactory: Any) -> defer.Deferred:
        try:
            make = hub_call_factory(self.hub, self.remote, self.endpoint)
            d = connectNetConn(make, self.address or self.endpoint or "", protocolFactory,
                               timeout=self.timeout, reactor=self.reactor, bridge=self.bridge)
        except Exception:  # noqa: BLE001
            return defer.fail()
        return d.addErrback(self._explain)

    def _explain(self, f: Any) -> Any:
        """An mTLS hub drops a client without a certificate after the handshake, which grpc
        reports only as UNAVAILABLE "Socket closed": probe once (in a thread) and say so."""
        from sesame.netconn import NetConnError

        if not (f.check(NetConnError) and f.value.code == grpc.StatusCode.UNAVAILABLE
                and self.hub.tls and self.hub.cert is None):
            return f
        from twisted.internet import threads

        def reason(why: str | None) -> Any:
            if why is None:
                return f
            raise NetConnError(grpc.StatusCode.UNAVAILABLE, why)

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         client_cert_required, self.hub).addCallback(reason)


def client_from_kwargs(reactor: Any, kw: Mapping[str, str],
                       env: Mapping[str, str] | None = None) -> SesameClientEndpoint:
    """Build a ``sesame:`` client endpoint from parsed endpoint-string keys.

    ``kw`` holds the keys of ``sesame:remote=edge-1:host=127.0.0.1:port=22`` (dial a
    host:port from the remote) or ``sesame:remote=edge-1:endpoint=web`` (connect to what
    the remote serves as ``web``), plus the hub keys of :func:`hub_config`; ``env``
    stands in for ``os.environ`` (``SESAME_HUB``, ``SESAME_TOKEN``, ...).  No I/O
    happens here: the endpoint dials when ``connect`` is called.

    :raises ValueError: naming the offending key, for an unknown key, a missing or
        malformed one, or both ``endpoint=`` and ``host=``/``port=``.
    """
    _check_keys(kw, CLIENT_KEYS, "client")
    remote = _remote(kw)
    endpoint = kw.get("endpoint")
    host, port = kw.get("host"), kw.get("port")
    if endpoint and (host or port):
        raise ValueError("endpoint: give either endpoint= or host= and port=, not both")
    address = None
    if not endpoint:
        if not host:
            raise ValueError("host: missing (or give endpoint=NAME)")
        if not port:
            raise ValueError("port: missing")
        p = N.parse_port(port, "port")  # ASCII digits only: ValueError naming the key
        address = N.join_host_port(host.strip("[]"), p)
    elif not N.valid_name(endpoint):
        raise ValueError(f"endpoint: {endpoint!r} is not a valid endpoint name")
    timeout = _parse_timeout(kw["timeout"]) if "timeout" in kw else None
    return SesameClientEndpoint(reactor, hub_config(kw, env), remote, address=address,
                                endpoint=endpoint, timeout=timeout)


#: A dial timeout as written in a ``sesame:`` string: ASCII decimal seconds (``float`` also
#: takes ``nan``, ``inf``, ``1e3``, ``٢``, ``1_0`` or spaces); a ``-`` is read, to be
#: refused as not positive.
_SECONDS = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _parse_timeout(text: str) -> float:
    """The ``timeout=`` key: positive, finite seconds in ASCII decimal (``5``, ``2.5``).

    :raises ValueError: ``"timeout: 'nan' is not a number of seconds"``, or ``"timeout:
        must be positive"``.
    """
    value = float(text) if _SECONDS.fullmatch(text) else math.nan
    if not math.isfinite(value):  # refused, or so many digits it overflowed to inf
        shown = repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"
        raise ValueError(f"timeout: {shown} is not a number of seconds")
    if value <= 0:
        raise ValueError("timeout: must be positive")
    return value


# --- server ---------------------------------------------------------------------------


@implementer(interfaces.IAddress)
@dataclass(frozen=True)
class SesameAddress:
    """Where a ``sesame:`` server endpoint listens: ``endpoint`` of ``remote`` via ``hub``."""

    hub: str
    remote: str
    endpoint: str


@implementer(interfaces.IListeningPort)
class SesameListeningPort:
    def __init__(self, address: SesameAddress, session: Any, tcp_port: Any,
                 bridge: Bridge) -> None:
        self._address = address
        self.session = session
        self.tcp_port = tcp_port
        self.bridge = bridge

    def getHost(self) -> SesameAddress:
        return self._address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred:
        from sesame.bridge import to_deferred

        d = to_deferred(self.bridge.submit(self.session.astop()))
        d.addBoth(lambda _: self.tcp_port.stopListening())
        return d


@implementer(interfaces.IStreamServerEndpoint)
class SesameServerEndpoint:
    """
    Serve ``endpoint`` of ``remote``: connections the hub routes there reach
    the factory.  The factory listens on an ephemeral loopback port that only
    this session dials (it is never announced).
    """

    REGISTER_WAIT = 10.0

    def __init__(self, reactor: Any, hub: HubConfig, remote: str, endpoint: str,
                 bridge: Bridge | None = None) -> None:
        self.reactor = reactor
        self.hub = hub
        self.remote = remote
        self.endpoint = endpoint
        self.bridge = bridge or get_bridge()

    async def _listen(self, factory: Any) -> SesameListeningPort:
        from sesame.bridge import to_deferred
        from sesame.remote import FixedTargetServicer, RemoteSession, netconn_registry

        tcp = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        local = f"127.0.0.1:{tcp.getHost().port}"
        session = RemoteSession(
            self.hub.target, self.remote, self.hub.token,
            {self.endpoint: netconn_registry(
                FixedTargetServicer(local, reactor=self.reactor, bridge=self.bridge))},
            credentials=self.hub.credentials(), bridge=self.bridge,
        )
        await to_deferred(self.bridge.submit(session.astart()))

        async def first_registration() -> bool:
            import asyncio

            deadline = asyncio.get_running_loop().time() + self.REGISTER_WAIT
            while asyncio.get_running_loop().time() < deadline:
                if session.registered.is_set():
                    return True
                if session.fatal:
                    return False
                await asyncio.sleep(0.05)
            return False

        ok = await to_deferred(self.bridge.submit(first_registration()))
        if not ok and session.fatal:
            await to_deferred(self.bridge.submit(session.astop()))
            await tcp.stopListening()
            raise ConnectionRefusedError(f"hub {self.hub.target} refused {self.remote}: {session.fatal}")
        if not ok:
            log.warn("hub {hub} not reachable yet ({why}); {remote} keeps trying",
                     hub=self.hub.target, why=session.last_error, remote=self.remote)
        return SesameListeningPort(SesameAddress(self.hub.target, self.remote, self.endpoint),
                                   session, tcp, self.bridge)

    def listen(self, protocolFactory: Any) -> defer.Deferred:
        return defer.ensureDeferred(self._listen(protocolFactory))


def server_from_kwargs(reactor: Any, kw: Mapping[str, str],
                       env: Mapping[str, str] | None = None) -> SesameServerEndpoint:
    """Build a ``sesame:`` server endpoint (``sesame:remote=edge-1:endpoint=web``) from
    parsed endpoint-string keys: a Twisted server that listens *on* the remote.

    ``kw`` and ``env`` are as for :func:`client_from_kwargs`; nothing connects until
    ``listen`` is called.

    :raises ValueError: naming the offending key (unknown key, no ``endpoint=``, an
        invalid or reserved endpoint name, bad hub keys).
    """
    _check_keys(kw, SERVER_KEYS, "server")
    remote = _remote(kw)
    endpoint = kw.get("endpoint")
    if not endpoint:
        raise ValueError("endpoint: missing (e.g. sesame:remote=edge-1:endpoint=web)")
    if not N.valid_name(endpoint) or endpoint == N.NETCONN_ENDPOINT:
        raise ValueError(f"endpoint: {endpoint!r} is not a valid endpoint name")
    return SesameServerEndpoint(reactor, hub_config(kw, env), remote, endpoint)


__all__ = [
    "HubConfig",
    "SesameAddress",
    "SesameClientEndpoint",
    "SesameServerEndpoint",
    "client_cert_required",
    "client_from_kwargs",
    "hub_config",
    "server_from_kwargs",
]
