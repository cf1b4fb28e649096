"""
``sesame:`` endpoints: reach a remote, or listen on one, through a hub.

Client (``clientFromString``)::

    sesame:remote=edge-1:host=127.0.0.1:port=22     dial 127.0.0.1:22 from edge-1
    sesame:remote=edge-1:endpoint=web               connect to what edge-1 serves as "web"

Server (``serverFromString``)::

    sesame:remote=edge-1:endpoint=web               serve "web" on remote edge-1

Common keys: ``hub`` (``HOST\\:PORT``, colons escaped; several hubs comma-separated,
``hub=a.example\\:7443,b.example\\:7443``; or ``$SESAME_HUB``, also comma-separated),
``ca`` (PEM file of the hub's CA; or ``$SESAME_CA``; without it the system
roots are used), ``token`` / ``tokenFile`` (or ``$SESAME_TOKEN`` /
``$SESAME_TOKEN_FILE``), ``namespace``, ``tls=no`` (or ``$SESAME_TLS=no``;
loopback hubs started with ``--no-tls`` only),
``timeout`` (client: dial timeout seconds), ``cert`` / ``key`` (a client
certificate for hubs that require one; or ``$SESAME_CERT`` / ``$SESAME_KEY``).

Server only: ``homes`` (or ``$SESAME_HOMES``): with several hubs, keep sessions to at
most that many of them, moving to the next hub when one is lost (default: all).
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from twisted.internet import defer, interfaces
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame import _names as N
from sesame.bridge import AioLoopCall, Bridge, LoopCall, get_bridge
from sesame.netconn import connectNetConn

log = Logger()

CLIENT_KEYS = {"remote", "host", "port", "endpoint", "hub", "ca", "token", "tokenFile",
               "namespace", "tls", "timeout", "cert", "key"}
SERVER_KEYS = {"remote", "endpoint", "hub", "ca", "token", "tokenFile", "namespace", "tls",
               "cert", "key", "homes"}


@dataclass(frozen=True)
class HubConfig:
    """Where the hub is (or the hubs are) and how to talk to it.

    ``targets`` holds every hub, in the order given (``hub=A,B``, ``--hub A --hub B``);
    ``target`` is the first of them (``targets`` defaults to ``(target,)``).  A remote
    keeps a session to each; a client uses the first that answers (:func:`hub_targets`).
    """

    target: str
    token: str
    ca: bytes | None = None
    tls: bool = True
    cert: bytes | None = field(default=None, repr=False)  # client certificate (mTLS hubs)
    key: bytes | None = field(default=None, repr=False)
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.targets:
            object.__setattr__(self, "targets", (self.target,))
        elif self.targets[0] != self.target:
            raise ValueError(f"target {self.target!r} is not the first of targets {self.targets!r}")

    def for_target(self, target: str) -> HubConfig:
        """The same credentials for the one hub at ``target``."""
        return replace(self, target=target, targets=(target,))

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


def hub_targets(values: str | Sequence[str], key: str = "hub") -> tuple[str, ...]:
    """The hubs named in ``values`` as ``HOST:PORT`` targets, in order.

    ``values`` is one string or several (``--hub`` given more than once), each one hub
    address (:func:`sesame._names.hub_address`: ``HOST:PORT``, ``[IPV6]:PORT``,
    ``tcp:HOST:PORT``) or several separated by commas: ``["a:7443,b:7443"]``,
    ``["a:7443", "b:7443"]`` and ``"a:7443,b:7443"`` are the same two hubs.

    :raises ValueError: starting with ``key`` and naming the bad part: an empty value
        (``"hub: empty hub address"``), an empty element (``"hub: empty hub address in
        'a:1,,b:2' (element 2)"``), a malformed one (``"hub: 'nope': expected
        HOST:PORT, ..."``) or the same hub twice (``"hub: 127.0.0.1:7443 is given
        twice"``).
    """
    texts = [values] if isinstance(values, str) else list(values)
    if not texts:
        raise ValueError(f"{key}: no hub address")
    targets: list[str] = []
    for text in texts:
        parts = text.split(",")
        if not text.strip():
            raise ValueError(f"{key}: empty hub address")
        for i, part in enumerate(parts, 1):
            if not part.strip():
                raise ValueError(f"{key}: empty hub address in {text!r} (element {i})")
            try:
                host, port = N.hub_address(part)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            target = N.join_host_port(host, port)
            if target in targets:
                raise ValueError(f"{key}: {target} is given twice")
            targets.append(target)
    return tuple(targets)


def hub_config(kw: Mapping[str, str], env: Mapping[str, str] | None = None) -> HubConfig:
    """Resolve hub/ca/token keys (or their environment variables); ValueError names the key.

    ``hub`` (or ``SESAME_HUB``) may name several hubs, comma-separated
    (:func:`hub_targets`)."""
    env = os.environ if env is None else env
    hub = kw.get("hub") or env.get("SESAME_HUB")
    hub_key = "hub" if kw.get("hub") else "SESAME_HUB"
    if not hub:
        raise ValueError("hub: no hub address (give hub=HOST\\:PORT or set SESAME_HUB)")
    targets = hub_targets(hub, hub_key)
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
    for target in targets:
        if not tls and not N.is_loopback(N.grpc_address(target)[0]):
            raise ValueError(f"{tls_key}: refusing plain text (no TLS) for hub {target!r}, "
                             "which is not a loopback address")
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
    return HubConfig(targets[0], token, ca, tls, cert, key, targets)


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
#: ``HubConfig.targets`` -> the hub of them that answered last: a client starts there.
_answered: dict[tuple[str, ...], str] = {}


def _channel_key(cfg: HubConfig) -> tuple:
    return (cfg.target, cfg.ca, cfg.tls, cfg.cert, cfg.key)


def hub_channel(cfg: HubConfig) -> grpc.aio.Channel:
    """One shared channel per hub (call on the bridge loop)."""
    key = _channel_key(cfg)
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


async def _hub_answered(cfg: HubConfig) -> bool:
    """(bridge loop) Whether the shared channel to ``cfg.target`` is connected.  Asked
    after a call failed UNAVAILABLE: a READY channel means the hub itself gave that status
    (its remote is not connected, the remote refused the dial); any other state means the
    hub was not reached (connection refused, reset, TLS failure, no route)."""
    ch = _channels.get(_channel_key(cfg))
    return ch is not None and ch.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY


def hub_order(cfg: HubConfig) -> tuple[str, ...]:
    """The order a client tries ``cfg.targets`` in: from the hub that answered last (in
    this process) on, then round to the ones before it; as given until one answers."""
    targets = cfg.targets
    last = _answered.get(targets)
    if last not in targets:
        return targets
    i = targets.index(last)
    return targets[i:] + targets[:i]


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


# --- several hubs: one session each --------------------------------------------------------

#: The hub a remote session's task talks to, for :class:`_NameTheHub` (set per session by
#: :meth:`RemoteSessions.astart`; the session's tasks inherit it).
_SESSION_HUB: contextvars.ContextVar[str | None] = contextvars.ContextVar("sesame_session_hub",
                                                                         default=None)


class _NameTheHub(logging.Filter):
    """Appends `` [hub HOST:PORT]`` to a ``sesame.remote`` record logged by the session of
    one of several hubs (unless it names that hub already), so log lines say which hub."""

    def filter(self, record: logging.LogRecord) -> bool:
        hub = _SESSION_HUB.get()
        if hub and isinstance(record.msg, str) and hub not in record.getMessage():
            record.msg = f"{record.msg} [hub {hub}]"
        return True


_name_the_hub = _NameTheHub()


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def needs_resolving(cfg: HubConfig) -> bool:
    """Whether a hub of ``cfg`` is named by a DNS name (rather than an IP address), which
    :func:`resolve_hubs` looks up."""
    return any(not _is_ip(N.grpc_address(t)[0]) for t in cfg.targets)


def resolve_hubs(cfg: HubConfig, getaddrinfo: Callable[..., Any] | None = None
                 ) -> list[tuple[str, str | None]]:
    """(blocking: call in a thread) The hubs a remote keeps a session to, as ``(target,
    server_name)`` pairs: a hub given by an IP address, or by a DNS name with one address,
    is itself (``server_name`` None: grpc resolves the name on every reconnect); a name
    with several addresses is one hub per address, ``server_name`` the name (for TLS
    verification).  A name that does not resolve now stays as it is (grpc keeps trying).
    Two hubs at one address are one (logged).  ``getaddrinfo`` stands in for
    :func:`socket.getaddrinfo` (tests)."""
    import socket

    lookup = getaddrinfo or socket.getaddrinfo
    hubs: list[tuple[str, str | None]] = []
    seen: dict[str, str] = {}  # address -> the hub it came from

    def add(target: str, name: str | None, address: str, given: str) -> None:
        if address in seen:
            log.warn("hub {given} is {address}, as is {other}: one session there",
                     given=given, address=address, other=seen[address])
            return
        seen[address] = given
        hubs.append((target, name))

    for target in cfg.targets:
        host, port = N.grpc_address(target)
        if _is_ip(host):
            add(target, None, target, target)
            continue
        try:
            infos = lookup(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warn("hub {hub}: cannot resolve {host} now ({why}); dialling it by name",
                     hub=target, host=host, why=exc)
            add(target, None, target, target)
            continue
        addresses = list(dict.fromkeys(N.join_host_port(str(info[4][0]), port) for info in infos))
        if len(addresses) <= 1:
            add(target, None, addresses[0] if addresses else target, target)
            continue
        log.info("hub {hub} resolves to {addresses}: one session each",
                 hub=target, addresses=", ".join(addresses))
        for address in addresses:
            add(address, host, address, target)
    return hubs


def parse_homes(text: str, hubs: int, key: str = "homes") -> int:
    """How many hubs a remote keeps sessions to (``--homes N``, ``homes=N``,
    ``SESAME_HOMES``): a whole number from 1 to ``hubs``, the number of hubs given.

    :raises ValueError: starting with ``key``: ``"homes: 'x' is not a number of hubs"``,
        ``"homes: must be at least 1"``, ``"homes: 3 is more than the 2 hubs given"``.
    """
    value = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,6}", value):
        shown = repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"
        raise ValueError(f"{key}: {shown} is not a number of hubs")
    n = int(value)
    if n < 1:
        raise ValueError(f"{key}: must be at least 1 (got {n})")
    if n > hubs:
        raise ValueError(f"{key}: {n} is more than the {hubs} hub{'s' if hubs != 1 else ''} "
                         "given")
    return n


class RemoteSessions:
    """One remote registered with several hubs: a :class:`~sesame.remote.RemoteSession`
    per hub (same remote, token, offers and ``sesame-instance``).  Quacks like one session
    where the CLI asks (``target``, ``registrations``, ``fatal``, ``last_error``).

    With ``homes`` (default: every hub) smaller than the number of hubs, the remote keeps
    sessions to at most ``homes`` of them: the first ones in order, and when a session is
    lost (its hub went away) or a hub does not register the remote (unreachable, or it
    refused), that session hands over to the next hub not in use, rotating through the
    list, with the backoff the session would have retried with (at once -- within a
    second -- after a healthy link dropped).  A hub that comes back is used again only
    when another is lost.  Otherwise each session registers and reconnects on its own.
    Either way :attr:`fatal` is set only once every hub has refused the remote.

    :param sessions: the sessions, one per hub, in the order the hubs were given.
    :param homes: how many of them to keep in use, 1 to ``len(sessions)``.
    """

    def __init__(self, sessions: Sequence[Any], bridge: Bridge | None = None,
                 homes: int | None = None) -> None:
        if not sessions:
            raise ValueError("no sessions")
        self.sessions = list(sessions)
        self.bridge = bridge or self.sessions[0].bridge
        count = len(self.sessions)
        if homes is not None and not 1 <= homes <= count:
            raise ValueError(f"homes: {homes} is not between 1 and the {count} hubs")
        #: How many hubs the remote keeps sessions to at a time.
        self.homes = count if homes is None else homes
        self._in_use: list[Any] = []  # the sessions started (rotating: at most ``homes``)
        self._stopping = False

    @classmethod
    def for_hubs(cls, cfg: HubConfig, remote: str, offers: Mapping[str, Any], *,
                 hubs: Sequence[tuple[str, str | None]] | None = None,
                 explain: bool = False, bridge: Bridge | None = None,
                 homes: int | None = None, **kw: Any) -> RemoteSessions:
        """A session for each of ``hubs`` (``(target, server_name)`` pairs from
        :func:`resolve_hubs`; by default ``cfg.targets`` as they are).  ``explain``: a
        session whose hub drops it after the TLS handshake says whether the hub wants a
        client certificate (:func:`client_cert_required`).  ``homes``: keep sessions to
        at most that many of them (:class:`RemoteSessions`; more than there are hubs
        after resolving -- two names for one address -- means all of them).  ``kw`` goes
        to every :class:`~sesame.remote.RemoteSession`."""
        from functools import partial

        from sesame.remote import RemoteSession

        if hubs is None:
            hubs = [(t, None) for t in cfg.targets]
        sessions = []
        extra = tuple(kw.pop("options", ()))
        for target, name in hubs:
            options = list(extra)
            if name is not None and cfg.tls:
                options.append(("grpc.ssl_target_name_override", name))
            probe = cfg.for_target(N.join_host_port(name, N.grpc_address(target)[1])
                                   if name else target)
            sessions.append(RemoteSession(
                target, remote, cfg.token, offers, credentials=cfg.credentials(),
                options=options, bridge=bridge,
                explain=partial(client_cert_required, probe) if explain else None, **kw))
        if homes is not None and homes > len(sessions):
            log.warn("homes {homes}: there are {n} hubs; keeping a session to each",
                     homes=homes, n=len(sessions))
            homes = len(sessions)
        return cls(sessions, bridge, homes)

    @property
    def rotating(self) -> bool:
        """Whether the remote is homed on fewer hubs than it has (``homes`` < hubs)."""
        return self.homes < len(self.sessions)

    @property
    def homed(self) -> tuple[str, ...]:
        """The hubs the remote is registered with right now, in the order they were given."""
        return tuple(s.target for s in self.sessions if s.registered.is_set())

    @property
    def in_use(self) -> tuple[str, ...]:
        """The hubs it has a session to (registered or trying), at most ``homes``."""
        return tuple(s.target for s in self.sessions if s in self._in_use)

    @property
    def targets(self) -> tuple[str, ...]:
        """The hubs, one per session."""
        return tuple(s.target for s in self.sessions)

    @property
    def target(self) -> str:
        """The hub (several: comma-separated)."""
        return ", ".join(self.targets)

    @property
    def registrations(self) -> int:
        """Registrations accepted so far, by all hubs."""
        return sum(s.registrations for s in self.sessions)

    @property
    def fatal(self) -> str | None:
        """Why every hub refused this remote (None while one has not): the reason, or each
        hub's."""
        if len(self.sessions) == 1:
            return self.sessions[0].fatal
        if not all(s.fatal for s in self.sessions):
            return None
        reasons = {s.fatal for s in self.sessions}
        return reasons.pop() if len(reasons) == 1 else "; ".join(
            f"{s.target}: {s.fatal}" for s in self.sessions)

    @property
    def last_error(self) -> str | None:
        """The last error of each session that has one, naming its hub."""
        if len(self.sessions) == 1:
            return self.sessions[0].last_error
        errors = [f"{s.target}: {s.last_error}" for s in self.sessions if s.last_error]
        return "; ".join(errors) or None

    def registered(self) -> list[Any]:
        """The sessions registered right now."""
        return [s for s in self.sessions if s.registered.is_set()]

    async def astart(self) -> None:
        """On the bridge loop: start a session to each hub -- or to the first ``homes`` of
        them, the others taking over as sessions are lost -- (each logs naming its hub)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if len(self.sessions) == 1:
            self._in_use = list(self.sessions)
            await self.sessions[0].astart()
            return
        remote_log = logging.getLogger("sesame.remote")
        if _name_the_hub not in remote_log.filters:
            remote_log.addFilter(_name_the_hub)
        if self.rotating:
            for s in self.sessions:
                s.handoff = self._handoff
                s.on_registered = self._registered
        self._in_use = self.sessions[:self.homes]
        for s in self._in_use:
            await loop.create_task(s.astart(), context=self._context(s))

    @staticmethod
    def _context(session: Any) -> contextvars.Context:
        """A context naming ``session``'s hub for :class:`_NameTheHub`."""
        ctx = contextvars.copy_context()
        ctx.run(_SESSION_HUB.set, session.target)
        return ctx

    def _registered(self, session: Any) -> None:
        """(bridge loop) ``session`` registered: say where the remote is homed now."""
        homed = self.homed
        logging.getLogger("sesame.remote").info(
            "homed on %s (%d of %d hubs)", ", ".join(homed), len(homed), len(self.sessions))

    def _handoff(self, session: Any, registered: bool, wait: float, delay: float) -> bool:
        """(bridge loop) ``session``'s attempt ended: hand the remote over to the next hub
        not in use, rotating through the list, starting it after ``wait`` seconds with
        backoff ``delay``.  False (the session retries its own hub) when stopping."""
        import asyncio

        if self._stopping or session not in self._in_use:
            return False
        i = self.sessions.index(session)
        n = len(self.sessions)
        following = (self.sessions[(i + k) % n] for k in range(1, n))
        nxt = next((s for s in following if s not in self._in_use), None)
        if nxt is None:
            return False
        self._in_use[self._in_use.index(session)] = nxt
        remote_log = logging.getLogger("sesame.remote")
        if registered:
            remote_log.warning("lost hub %s; moving to %s", session.target, nxt.target)
        else:
            how = "refused" if session.fatal else "did not register"
            remote_log.warning("hub %s %s %s (%s); trying %s in %.1fs", session.target, how,
                               session.resource, session.last_error, nxt.target, wait)
        asyncio.get_running_loop().create_task(nxt.astart(wait, delay),
                                               context=self._context(nxt))
        return True

    def start(self) -> RemoteSessions:
        """:meth:`astart` from another thread (not the bridge loop's).  Returns ``self``."""
        self.bridge.run(self.astart())
        return self

    async def first_registration(self, timeout: float) -> bool:
        """On the bridge loop: wait until a hub has registered this remote (True), every
        hub has refused it or ``timeout`` seconds passed (False)."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.registered():
                return True
            if all(s.fatal for s in self.sessions):
                return False
            await asyncio.sleep(0.05)
        return False

    async def astop(self) -> None:
        """On the bridge loop: stop every session (each says goodbye to its hub), at once."""
        import asyncio

        self._stopping = True
        await asyncio.gather(*(s.astop() for s in self.sessions), return_exceptions=True)

    def stop(self) -> None:
        """:meth:`astop` from another thread, waiting for it (at most 20 s)."""
        self.bridge.run(self.astop(), 20)


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
        """Connect through the hub (with several hubs: the first that answers, starting
        from the one that answered last).  A hub that cannot be reached -- the call fails
        UNAVAILABLE while its channel is not connected -- passes the attempt on to the
        next hub at once; any status the hub itself gives (PERMISSION_DENIED, remote not
        connected, the remote's dial refused) is the answer.  Cancelling the Deferred
        abandons the dial (``ConnectingCancelledError``)."""
        if len(self.hub.targets) == 1:
            return self._connect_via(self.hub, protocolFactory).addErrback(self._explain, self.hub)
        return self._connect_any(protocolFactory)

    def _connect_via(self, cfg: HubConfig, protocolFactory: Any) -> defer.Deferred:
        try:
            make = hub_call_factory(cfg, self.remote, self.endpoint)
            return connectNetConn(make, self.address or self.endpoint or "", protocolFactory,
                                  timeout=self.timeout, reactor=self.reactor, bridge=self.bridge)
        except Exception:  # noqa: BLE001
            return defer.fail()

    def _connect_any(self, protocolFactory: Any) -> defer.Deferred:
        from sesame.bridge import to_deferred
        from sesame.netconn import NetConnError

        order = hub_order(self.hub)
        bridge = self.bridge or get_bridge()
        inner: list[defer.Deferred] = []  # the attempt in flight
        unreached: list[str] = []

        def cancel(_: defer.Deferred) -> None:
            if inner and not inner[0].called:
                inner[0].cancel()  # its ConnectingCancelledError becomes ours

        outer = defer.Deferred(cancel)

        def attempt(i: int) -> None:
            cfg = self.hub.for_target(order[i])
            d = self._connect_via(cfg, protocolFactory)
            inner[:] = [d]
            d.addCallbacks(connected, failed, callbackArgs=(cfg,), errbackArgs=(i, cfg))

        def connected(proto: Any, cfg: HubConfig) -> None:
            _answered[self.hub.targets] = cfg.target
            if not outer.called:
                outer.callback(proto)

        def failed(f: Any, i: int, cfg: HubConfig) -> None:
            if outer.called:
                return
            if not (f.check(NetConnError) and f.value.code == grpc.StatusCode.UNAVAILABLE):
                if f.check(NetConnError):  # the hub answered, with a refusal
                    _answered[self.hub.targets] = cfg.target
                return finish(f)

            def checked(answered: bool) -> Any:
                if outer.called:
                    return None
                if answered:
                    _answered[self.hub.targets] = cfg.target
                    return finish(f)
                unreached.append(f"{cfg.target}: {f.value.details}")
                if i + 1 < len(order):
                    log.info("hub {hub} did not answer ({why}); trying {next}", hub=cfg.target,
                             why=f.value.details, next=order[i + 1])
                    return attempt(i + 1)
                last = f if len(unreached) == 1 else Failure(NetConnError(
                    grpc.StatusCode.UNAVAILABLE, f"no hub answered ({'; '.join(unreached)})"))
                return defer.maybeDeferred(self._explain, last, cfg).addBoth(finish)

            check = to_deferred(bridge.submit(_hub_answered(cfg)))
            check.addErrback(lambda _: False).addCallback(checked)

        def finish(result: Any) -> None:
            if not outer.called:
                outer.errback(result)

        attempt(0)
        return outer

    def _explain(self, f: Any, cfg: HubConfig) -> Any:
        """An mTLS hub drops a client without a certificate after the handshake, which grpc
        reports only as UNAVAILABLE "Socket closed": probe once (in a thread) and say so."""
        from sesame.netconn import NetConnError

        if not (f.check(NetConnError) and f.value.code == grpc.StatusCode.UNAVAILABLE
                and cfg.tls and cfg.cert is None):
            return f
        from twisted.internet import threads

        def reason(why: str | None) -> Any:
            if why is None:
                return f
            raise NetConnError(grpc.StatusCode.UNAVAILABLE, why)

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         client_cert_required, cfg).addCallback(reason)


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
    """Where a ``sesame:`` server endpoint listens: ``endpoint`` of ``remote`` via ``hub``
    (with several hubs: all of them, comma-separated as in ``hub=``; ``hubs`` lists them)."""

    hub: str
    remote: str
    endpoint: str
    hubs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.hubs:
            object.__setattr__(self, "hubs", tuple(self.hub.split(",")))


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
        """Unregister from every hub, then close the loopback port."""
        from sesame.bridge import to_deferred

        d = to_deferred(self.bridge.submit(self.session.astop()))
        d.addBoth(lambda _: self.tcp_port.stopListening())
        return d


@implementer(interfaces.IStreamServerEndpoint)
class SesameServerEndpoint:
    """
    Serve ``endpoint`` of ``remote``: connections the hub routes there reach
    the factory.  The factory listens on an ephemeral loopback port that only
    this session dials (it is never announced).  With several hubs
    (``hub.targets``; a DNS name with several addresses counts as one hub per
    address) it registers with each -- or with ``homes`` of them, moving to another
    when one is lost (:class:`RemoteSessions`); ``listen()`` fires once one has accepted.
    """

    REGISTER_WAIT = 10.0

    def __init__(self, reactor: Any, hub: HubConfig, remote: str, endpoint: str,
                 bridge: Bridge | None = None, homes: int | None = None) -> None:
        self.reactor = reactor
        self.hub = hub
        self.remote = remote
        self.endpoint = endpoint
        self.bridge = bridge or get_bridge()
        self.homes = homes

    async def _listen(self, factory: Any) -> SesameListeningPort:
        from twisted.internet import threads

        from sesame.bridge import to_deferred
        from sesame.remote import FixedTargetServicer, netconn_registry

        hubs = None
        if needs_resolving(self.hub):  # DNS in a thread, never on the reactor
            hubs = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                   resolve_hubs, self.hub)
        tcp = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        local = f"127.0.0.1:{tcp.getHost().port}"
        session = RemoteSessions.for_hubs(
            self.hub, self.remote,
            {self.endpoint: netconn_registry(
                FixedTargetServicer(local, reactor=self.reactor, bridge=self.bridge))},
            hubs=hubs, bridge=self.bridge, homes=self.homes)
        await to_deferred(self.bridge.submit(session.astart()))
        ok = await to_deferred(self.bridge.submit(session.first_registration(self.REGISTER_WAIT)))
        where = ",".join(self.hub.targets)
        if not ok and session.fatal:
            await to_deferred(self.bridge.submit(session.astop()))
            await tcp.stopListening()
            raise ConnectionRefusedError(f"hub {session.target} refused {self.remote}: "
                                         f"{session.fatal}")
        if not ok:
            log.warn("hub {hub} not reachable yet ({why}); {remote} keeps trying",
                     hub=where, why=session.last_error, remote=self.remote)
        return SesameListeningPort(
            SesameAddress(where, self.remote, self.endpoint, self.hub.targets),
            session, tcp, self.bridge)

    def listen(self, protocolFactory: Any) -> defer.Deferred:
        return defer.ensureDeferred(self._listen(protocolFactory))


def server_from_kwargs(reactor: Any, kw: Mapping[str, str],
                       env: Mapping[str, str] | None = None) -> SesameServerEndpoint:
    """Build a ``sesame:`` server endpoint (``sesame:remote=edge-1:endpoint=web``) from
    parsed endpoint-string keys: a Twisted server that listens *on* the remote.

    ``kw`` and ``env`` are as for :func:`client_from_kwargs`; nothing connects until
    ``listen`` is called.

    ``homes`` (or ``SESAME_HOMES``) keeps sessions to at most that many of the hubs
    (:func:`parse_homes`, :class:`RemoteSessions`).

    :raises ValueError: naming the offending key (unknown key, no ``endpoint=``, an
        invalid or reserved endpoint name, bad hub keys, ``homes`` not from 1 to the
        number of hubs).
    """
    _check_keys(kw, SERVER_KEYS, "server")
    remote = _remote(kw)
    endpoint = kw.get("endpoint")
    if not endpoint:
        raise ValueError("endpoint: missing (e.g. sesame:remote=edge-1:endpoint=web)")
    if not N.valid_name(endpoint) or endpoint == N.NETCONN_ENDPOINT:
        raise ValueError(f"endpoint: {endpoint!r} is not a valid endpoint name")
    cfg = hub_config(kw, env)
    env = os.environ if env is None else env
    homes = None
    if "homes" in kw:
        homes = parse_homes(kw["homes"], len(cfg.targets))
    elif env.get("SESAME_HOMES"):
        homes = parse_homes(env["SESAME_HOMES"], len(cfg.targets), "SESAME_HOMES")
    return SesameServerEndpoint(reactor, cfg, remote, endpoint, homes=homes)


__all__ = [
    "HubConfig",
    "RemoteSessions",
    "SesameAddress",
    "SesameClientEndpoint",
    "SesameServerEndpoint",
    "client_cert_required",
    "client_from_kwargs",
    "hub_config",
    "hub_order",
    "hub_targets",
    "needs_resolving",
    "parse_homes",
    "resolve_hubs",
    "server_from_kwargs",
]
