"""
Front doors: public listeners on the hub that lead to remotes.

Routes are data in the store (``sesame route add``, the management API) and
take effect without a restart; a route to an offline remote stays and works
again when the remote reconnects.  Four kinds:

``tcp``
    ``MATCH`` is a port (bound on the hub's front-door interface) or any
    Twisted server endpoint description; every accepted connection goes to
    the route's target.
``http``
    One HTTP/1.1 listener (``--vhost``) routes by the ``Host`` header: exact
    names and ``*.domain`` wildcards.  Keep-alive and WebSocket upgrades work
    end to end (bodies are relayed as they come, never buffered whole);
    X-Forwarded-For/-Proto/-Host are set on every request (``--forwarded``:
    replace, append or off).  No route → 404, remote offline → 502.
``sni``
    One TLS listener (``--sni``) routes by the ClientHello's server name
    without terminating TLS: the client sees the remote's own certificate.
``grpc``
    One plain HTTP/2 listener (``--grpc``) routes gRPC connections by
    ``:authority`` (set with the client's ``grpc.default_authority``
    option); streaming, deadlines and metadata pass through untouched, as
    the hub relays the HTTP/2 bytes.  For gRPC over TLS use an ``sni`` route.

A target is ``ENDPOINT@REMOTE`` (an endpoint the remote offers, e.g. a
``twistd web --listen sesame:...``) or ``HOST:PORT@REMOTE`` (an address
the remote's NetConn allowlist lets it dial).  The hub reaches the remote
in-process (:mod:`sesame.hub._calls`), over the same ``Stream`` tunnels a
``sesame:`` client uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, interfaces
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sesame import _names as N
from sesame.hub import _sniff as S
from sesame.hub._calls import HubEndpoint, Target, parse_target
from sesame.netconn import SpliceHooks, can_splice, splice
from sesame.relay import Side, half_close, pair

log = Logger()

FORWARDED_MODES = ("replace", "append", "off")
LISTEN_RETRY = 30.0  # seconds between attempts to bind a tcp route that failed to listen
LINGER = 2.0  # seconds the HTTP door reads (and drops) what a client still sends after an error


@dataclass
class Route:
    """A route as the front doors hold it (its traffic is counted in ``hub.metrics``
    under the route id)."""

    id: str
    kind: str
    match: str
    target: Target | None
    error: str | None = None
    listening: str | None = None  # tcp: where it is bound


class _Out(Side):
    """The hub's connection to the remote side of a route."""

    stats: Any = None  # the connection's sesame.hub.metrics.ConnStats

    def dataReceived(self, data: bytes) -> None:
        if self.stats is not None:
            self.stats.bytes_out += len(data)
        super().dataReceived(data)
        door = self.peer
        if isinstance(door, _Door) and door._http is not None and door._http.awaiting_upgrade:
            door._upgrade_reply_seen(data)


@implementer(interfaces.IHalfCloseableProtocol)
class _Door(Side):
    """An accepted front-door connection: sniff (if the kind needs it), dial, relay."""

    factory: DoorFactory

    def connectionMade(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._dial: defer.Deferred | None = None
        self._stats: Any = None  # sesame.hub.metrics.ConnStats once a route is chosen
        self._http: S.RequestStream | None = None
        self._route: Route | None = None
        self._h2_stream = 1
        self._h2: S.SettingsAckFilter | None = None
        self._sniff_timer: Any = None
        self._refused = False  # answered with an error status: read nothing more
        self._linger_timer: Any = None
        self._stopped = False  # a later request was refused: forward nothing more
        self._lost = False
        self._upgrade_reply = b""
        if self.factory.kind == "tcp":
            self._go(self.factory.route, b"")
            return
        if self.factory.kind == "http":  # one parser from the first byte: each head read once
            self._http = S.RequestStream(self._rewrite)
        # a client that never finishes its first request must not hold a slot forever
        self._sniff_timer = self.factory.doors.reactor.callLater(
            self.factory.doors.sniff_timeout, self._sniff_expired)

    def _sniff_expired(self) -> None:
        self._sniff_timer = None
        if self.factory.kind == "http":
            self.transport.write(S.http_response(408, "Request Timeout", "408 Request Timeout\n"))
        self.transport.loseConnection()

    def _sniffed(self) -> None:
        t, self._sniff_timer = self._sniff_timer, None
        if t is not None and t.active():
            t.cancel()

    # --- before the far side is connected ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self._forward(data)
            return
        if self._refused:
            return
        if self._dial is not None or self._route is not None:
            self._buf += data  # arrived while dialling: parsed once the far side is connected
            return
        if self._http is not None:
            self._sniff_http(data)
            return
        self._buf += data
        try:
            route = self._classify(self._buf)  # no copy: sniffing stays linear in the bytes read
        except S.SniffError as exc:
            self._refuse(exc)
            return
        if route is None:
            if len(self._buf) > S.MAX_SNIFF:
                self._refuse(S.SniffError("too large"))
            return
        if route.target is None:
            self._refuse(S.SniffError(route.error or "route has no usable target"), route=route)
            return
        first = bytes(self._buf)
        self._buf.clear()
        if self._h2 is not None:
            first = self._h2.feed(first)
        self._go(route, first)

    def _sniff_http(self, data: bytes) -> None:
        """Parse what arrived before the route is known; the first complete head picks it
        (:meth:`_rewrite`), and every head in the same write must name the same site."""
        assert self._http is not None
        try:
            first = self._http.feed(data)
        except _Misdirected:
            self._refuse(S.HTTPError(421, "requests for more than one site in one write"))
            return
        except S.SniffError as exc:  # 400/431 with the reason, or no route (404)
            self._refuse(exc)
            return
        route = self._route
        if route is None:
            return  # no complete head yet: the parser holds it (431 past its limit)
        if route.target is None:
            self._refuse(S.SniffError(route.error or "route has no usable target"), route=route)
            return
        self._go(route, first)

    def _classify(self, data: bytearray) -> Route | None:
        doors, kind = self.factory.doors, self.factory.kind
        if kind == "sni":
            name = S.client_hello_sni(data)
            if name is None:
                return None
            if not name:
                raise S.SniffError("the ClientHello names no server (SNI)")
            return self._lookup(doors.sni, name)
        if self._h2 is None and data.startswith(S.H2_PREFACE):
            self._h2 = S.SettingsAckFilter()
            self.transport.write(S.H2_SERVER_PREFACE)  # or the client sends no request
        found = S.h2c_authority(data)
        if found is None:
            return None
        authority, self._h2_stream = found
        if authority.startswith("["):
            host = authority[:authority.find("]") + 1]
        else:
            host = authority.rsplit(":", 1)[0]
        return self._lookup(doors.grpc, host)

    def _lookup(self, routes: dict[str, Route], host: str) -> Route:
        route = S.pick(routes, host)
        if route is None:
            raise _NoRoute(host)
        return route  # type: ignore[return-value]

    def _go(self, route: Route, first: bytes) -> None:
        self._sniffed()
        self._route = route
        if route.target is None:
            self._refuse(S.SniffError(route.error or "bad target"), route=route)
            return
        self._first = first
        self.transport.pauseProducing()
        t = route.target
        self._stats = self.factory.doors.hub.metrics.open_connection(t.namespace, t.remote, route.id)
        ep = self.factory.doors.endpoint(route)
        self._dial = ep.connect(Factory.forProtocol(_Out))
        self._dial.addCallbacks(self._connected, self._failed)

    def _connected(self, out: _Out) -> None:
        self._dial = None
        if self._lost:
            out.transport.abortConnection()
            return
        out.stats = self._stats
        # tcp and sni relay bytes untouched once connected: those can leave the reactor
        if (self.factory.kind in ("tcp", "sni") and not self._eof
                and can_splice(self.transport, out.transport) and self._splice(out)):
            return
        pair(self, out)
        first, rest = self._first, bytes(self._buf)
        self._first = b""
        self._buf.clear()
        if first:
            self._stats.bytes_in += len(first)
            out.transport.write(first)
        if rest:  # arrived while dialling: through the same filters as the rest
            self._forward(rest)
        if self._eof:
            self.readConnectionLost()
            return
        self.transport.resumeProducing()

    def _splice(self, out: _Out) -> bool:
        """A port map's (or an SNI route's) connection from here on is relayed on the bridge loop alone
        (:func:`sesame.netconn.splice`); the counters follow it there.  False: it could
        not be (no file descriptor to spare), nothing changed."""
        stats = self._stats
        rest = self._first + bytes(self._buf)  # sni: the ClientHello that chose the route

        def count_in(n: int) -> None:
            stats.bytes_in += n

        def count_out(n: int) -> None:
            stats.bytes_out += n

        # (the counters change on the loop thread from here on; only it writes them)
        if not splice(self.transport, out.transport, SpliceHooks(count_in, count_out, stats.close),
                      first=rest):
            return False
        self._buf.clear()
        self._first = b""
        stats.bytes_in += len(rest)
        return True

    def _failed(self, failure: Failure) -> None:
        self._dial = None
        if self._lost:  # the client left while we dialled: nothing failed
            return
        why = failure.getErrorMessage()
        route = self._route
        log.info("front door {kind} {match}: cannot reach {target}: {why}",
                 kind=self.factory.kind, match=route.match if route else "?",
                 target=str(route.target) if route else "?", why=why)
        self.factory.doors.record_error(route, why)
        if self.transport is None:
            return
        kind = self.factory.kind
        if kind == "http":
            self._refused = True
            self.transport.write(S.http_response(
                502, "Bad Gateway", "502 Bad Gateway: the service behind this name is not "
                "reachable right now (its remote is offline or refused the connection).\n"))
            self.transport.resumeProducing()  # paused while dialling
            self._linger()
            return
        if kind == "sni":
            self.transport.write(S.tls_alert(80))
        elif kind == "grpc":
            self.transport.write(S.h2_refusal(self._h2_stream, 14, "the remote behind this "
                                              "authority is not reachable"))
        self.transport.loseConnection()

    def _refuse(self, exc: Exception, route: Route | None = None) -> None:
        self._sniffed()
        self._refused = True  # one answer; what else arrives before the close is dropped
        kind = self.factory.kind
        if isinstance(exc, _NoRoute):
            self.factory.doors.record_error(None, f"{kind}: no route for {exc.host!r}")
        t = self.transport
        if kind == "http":
            if isinstance(exc, _NoRoute):
                t.write(S.http_response(404, "Not Found",
                                        "404 Not Found: no site is served under this name.\n"))
            elif isinstance(exc, S.HTTPError):
                t.write(S.http_response(exc.code, _REASONS.get(exc.code, "Bad Request"), f"{exc}\n"))
            else:
                t.write(S.http_response(502, "Bad Gateway", "502 Bad Gateway\n"))
            self._linger()
            return
        if kind == "sni":
            t.write(S.tls_alert(112 if isinstance(exc, _NoRoute) else 80))
        elif kind == "grpc" and isinstance(exc, _NoRoute):
            t.write(S.h2_refusal(self._h2_stream, 5, "no gRPC route for this authority"))
        t.loseConnection()

    def _linger(self) -> None:
        """After an HTTP error answer: send it and a FIN, then drop what the client still
        sends (the rest of a head over the limit, a body) until it closes or ``LINGER``
        seconds pass.  Closing with unread bytes would reset the connection, and a reset
        can destroy the answer before the client reads it (HTTP servers' lingering close)."""
        if self._eof:  # the client has finished sending: nothing to wait for
            self.transport.loseConnection()
            return
        half_close(self.transport)
        self._linger_timer = self.factory.doors.reactor.callLater(LINGER, self._linger_end)

    def _linger_end(self) -> None:
        self._linger_timer = None
        self.transport.loseConnection()

    # --- relaying ----------------------------------------------------------------------

    def _forward(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._h2 is not None and not self._h2.done:
            data = self._h2.feed(data)
        if self._http is not None and not self._http.passthrough:
            try:
                data = self._http.feed(data)
            except S.SniffError as exc:
                self._stop_after(exc)
                return
        self._stats.bytes_in += len(data)
        super().dataReceived(data)

    def _stop_after(self, exc: S.SniffError) -> None:
        """A later request on this connection names another site or is refused (400/431):
        pass on the requests before it, stop reading and half-close the backend, so that
        replies in flight still arrive; the connection ends when the backend is done.  (No
        status of our own: it could land inside a reply still on its way.)"""
        self._http = None
        self._stopped = True
        route = self._route
        log.info("front door http {match}: closing a keep-alive connection: {why}",
                 match=route.match if route else "?", why=str(exc) or "another site")
        if exc.partial and self.peer is not None:
            self._stats.bytes_in += len(exc.partial)
            super().dataReceived(exc.partial)
        self.transport.pauseProducing()
        if self.peer is not None:
            # the client stays paused: a registered producer would be resumed by the half-close
            self.peer.transport.unregisterProducer()
            half_close(self.peer.transport)

    def _upgrade_reply_seen(self, data: bytes) -> None:
        """The backend's first reply bytes after an Upgrade/CONNECT request: did it switch?"""
        http = self._http
        if http is None or not http.awaiting_upgrade:
            return
        self._upgrade_reply += data[:12]
        switched = S.switched_protocols(self._upgrade_reply, http.upgrade_method)
        if switched is None:
            return
        self._upgrade_reply = b""
        try:
            held = http.upgrade_answered(switched)
        except S.SniffError as exc:
            self._stop_after(exc)
            return
        if held and self.peer is not None:
            self._stats.bytes_in += len(held)
            self.peer.transport.write(held)

    def _rewrite(self, head: S.RequestHead) -> S.RequestHead:
        doors = self.factory.doors
        route = S.pick(doors.http, head.host)
        if self._route is None:  # the connection's first request picks its route
            if route is None:
                raise _NoRoute(head.host)
            self._route = route  # type: ignore[assignment]
        elif route is not self._route:
            raise _Misdirected()
        mode = doors.forwarded
        if mode == "off":
            return head
        names = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
        prior = head.get(b"x-forwarded-for") if mode == "append" else None
        head.headers = [(k, v) for k, v in head.headers if k.lower() not in names]
        client = getattr(self.transport.getPeer(), "host", "")
        xff = f"{prior.decode('latin-1')}, {client}" if prior else client
        proto = "https" if interfaces.ISSLTransport.providedBy(self.transport) else "http"
        head.headers += [(b"X-Forwarded-For", xff.encode()), (b"X-Forwarded-Proto", proto.encode())]
        host = head.get(b"host")
        if host:
            head.headers.append((b"X-Forwarded-Host", host))
        return head

    def readConnectionLost(self) -> None:
        if self.peer is None:
            self._eof = True  # delivered once the far side is connected
            if self._refused or (self._dial is None and self._route is None):
                self.transport.loseConnection()
            return
        super().readConnectionLost()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._sniffed()
        t, self._linger_timer = self._linger_timer, None
        if t is not None and t.active():
            t.cancel()
        d, self._dial = self._dial, None
        if self._stats is not None:
            self._stats.close()
        if d is not None:
            d.cancel()
        super().connectionLost(reason)


_REASONS = {400: "Bad Request", 421: "Misdirected Request", 431: "Request Header Fields Too Large"}


class _NoRoute(S.SniffError):
    def __init__(self, host: str) -> None:
        super().__init__(f"no route for {host!r}")
        self.host = host


class _Misdirected(S.SniffError):
    pass


def parse_tls_description(desc: str) -> tuple[int, dict[str, str]]:
    """``(port, parameters)`` of ``tls:PORT[:interface=IFACE][:backlog=N][:certKey=PEM
    :privateKey=PEM]``; ValueError saying what is wrong."""
    try:
        args, kwargs = N.split_endpoint_description(desc)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{desc!r}: {exc}") from None
    if len(args) != 2 or args[0] != "tls":
        raise ValueError(f"{desc!r}: expected tls:PORT[:interface=IFACE][:certKey=PEM"
                         ":privateKey=PEM]")
    port = N.parse_port(args[1], "tls port", low=0)
    unknown = set(kwargs) - {"interface", "backlog", "certKey", "privateKey"}
    if unknown:
        raise ValueError(f"{desc!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
    if ("certKey" in kwargs) != ("privateKey" in kwargs):
        raise ValueError(f"{desc!r}: give certKey and privateKey together")
    if not N.ascii_digits(kwargs.get("backlog", "1")):
        raise ValueError(f"{desc!r}: backlog must be a number")
    return port, kwargs


def tls_endpoint(reactor: Any, desc: str,
                 material: tuple[bytes, bytes] | None = None) -> Any:
    """A TLS listener offering ALPN ``h2`` (what gRPC clients insist on) from
    ``tls:PORT[:interface=IFACE][:backlog=N][:certKey=PEM:privateKey=PEM]``; the
    certificate is ``material`` (the hub's own: clients trust the hub's CA) unless the
    description names files.  ValueError saying what is wrong."""
    from twisted.internet import ssl

    port, kwargs = parse_tls_description(desc)
    if "certKey" in kwargs:
        with open(kwargs["certKey"], "rb") as f:
            cert_pem = f.read()
        with open(kwargs["privateKey"], "rb") as f:
            key_pem = f.read()
    elif material is not None:
        cert_pem, key_pem = material
    else:
        raise ValueError(f"{desc!r}: no certificate (name certKey and privateKey files)")
    pc = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    chain = [ssl.Certificate.loadPEM(c).original for c in _more_certs(cert_pem)]
    options = ssl.CertificateOptions(privateKey=pc.privateKey.original, certificate=pc.original,
                                     extraCertChain=chain or None, acceptableProtocols=[b"h2"])
    backlog = int(kwargs.get("backlog", BACKLOG))
    return endpoints.SSL4ServerEndpoint(reactor, port, options, backlog=backlog,
                                        interface=kwargs.get("interface", ""))


def _more_certs(pem: bytes) -> list[bytes]:
    """The certificates after the first in a PEM bundle (its chain)."""
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = [marker + p for p in pem.split(marker)[1:]]
    return parts[1:]


@implementer(interfaces.IStreamServerEndpoint)
class ReusePortEndpoint:
    """TCP on ``interface:port`` with ``SO_REUSEPORT`` set before ``bind``, so several
    processes listen on one port (each gets a share of the connections)."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 1024) -> None:
        self.reactor, self.port, self.interface, self.backlog = reactor, port, interface, backlog

    @classmethod
    def parse(cls, reactor: Any, desc: str) -> ReusePortEndpoint | None:
        """``tcp:PORT[:interface=HOST][:backlog=N]`` as such an endpoint; None for any
        other description (TLS, UNIX sockets, other options)."""
        args, kwargs = N.split_endpoint_description(desc)
        if not args or args[0] not in ("tcp", "tcp6") or set(kwargs) - {"interface", "backlog",
                                                                           "port"}:
            return None
        port_text = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        backlog = kwargs.get("backlog", str(BACKLOG))
        if not N.ascii_digits(port_text) or not N.ascii_digits(backlog):
            return None
        default = "::" if args[0] == "tcp6" else ""
        return cls(reactor, int(port_text), kwargs.get("interface", default), int(backlog))

    def listen(self, factory: Any) -> defer.Deferred:
        import socket

        try:
            family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self.interface, self.port))
                sock.listen(self.backlog)
                sock.setblocking(False)
                port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
            finally:
                sock.close()  # the reactor holds its own duplicate
        except Exception:  # noqa: BLE001 - the failure is the Deferred's
            return defer.fail()
        return defer.succeed(port)


#: Listen backlog of the front doors' TCP listeners (:data:`sesame._names.LISTEN_BACKLOG`;
#: bench/e2e.py's 200-connection burst through a port map lost up to 57 of 200 with
#: Twisted's default of 50).
BACKLOG = N.LISTEN_BACKLOG


class DoorFactory(Factory):
    protocol = _Door

    def __init__(self, doors: FrontDoors, kind: str, route: Route | None = None) -> None:
        self.doors = doors
        self.kind = kind
        self.route = route

    def doStart(self) -> None:  # no "Starting factory" noise per listener
        pass

    def doStop(self) -> None:
        pass


class FrontDoors:
    """The hub's front doors; runs on the reactor (see the module docstring).

    :param listeners: ``{"http": desc, "sni": desc, "grpc": desc}`` — server
        endpoint descriptions of the shared listeners (any may be missing).
    :param tcp_interface: where a ``tcp`` route given as a bare port binds.
    :param reuse_port: bind TCP listeners with ``SO_REUSEPORT`` (``sesame hub --workers``:
        the hub processes of one machine share every port; the kernel spreads the
        connections).
    """

    def __init__(self, hub: Any, store: Any, reactor: Any = None, *,
                 listeners: dict[str, str] | None = None, tcp_interface: str = "127.0.0.1",
                 forwarded: str = "replace", watch_interval: float = 2.0,
                 sniff_timeout: float = 15.0, listen_retry: float = LISTEN_RETRY,
                 reuse_port: bool = False,
                 tls_material: tuple[bytes, bytes] | None = None) -> None:
        if forwarded not in FORWARDED_MODES:
            raise ValueError(f"forwarded: {forwarded!r} is not one of {', '.join(FORWARDED_MODES)}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.hub = hub
        self.store = store
        self.reactor = reactor
        self.listener_specs = dict(listeners or {})
        self.tcp_interface = tcp_interface
        self.forwarded = forwarded
        self.watch_interval = watch_interval
        self.sniff_timeout = sniff_timeout  # seconds to send a request head / ClientHello
        self.listen_retry = listen_retry  # seconds between tries to bind a failed tcp route
        self.reuse_port = reuse_port
        #: (certificate PEM, key PEM) a ``tls:`` listener serves unless it names its own:
        #: the hub's own certificate
        self.tls_material = tls_material
        self._unreadable = False  # the store could not be read at the last look
        self.http: dict[str, Route] = {}
        self.sni: dict[str, Route] = {}
        self.grpc: dict[str, Route] = {}
        self.tcp: dict[str, Route] = {}
        self._tcp_ports: dict[str, tuple[tuple[str, str], Any]] = {}
        self.ports: dict[str, Any] = {}  # kind -> IListeningPort of the shared listeners
        self._watch: LoopingCall | None = None
        self._known: tuple = ()

    def endpoint(self, route: Route) -> HubEndpoint:
        assert route.target is not None
        return HubEndpoint(self.hub, route.target, reactor=self.reactor)

    def record_error(self, route: Route | None, message: str) -> None:
        """Count a connection a front door could not complete (dashboard: recent errors)."""
        m = self.hub.metrics
        if route is None:
            m.dial_error("NOT_FOUND", "", message)
        else:
            m.dial_error("UNAVAILABLE", route.target.remote if route.target else "",
                         f"route {route.id} ({route.kind} {route.match}): {message}")

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for kind, desc in self.listener_specs.items():
            ep = self._server_endpoint(desc)
            self.ports[kind] = await ep.listen(DoorFactory(self, kind))
            log.info("front door {kind} listening on {desc}", kind=kind, desc=desc)
        await defer.maybeDeferred(self.reconcile)
        self._watch = LoopingCall(self.reconcile)
        self._watch.clock = self.reactor
        self._watch.start(self.watch_interval, now=False)

    def _server_endpoint(self, desc: str) -> Any:
        """The server endpoint for ``desc``; a plain ``tcp:`` one with SO_REUSEPORT when
        :attr:`reuse_port` (other kinds as given).  TCP and TLS listeners get a backlog
        of :data:`BACKLOG` unless the description sets one."""
        if desc.startswith("tls:"):
            return tls_endpoint(self.reactor, desc, self.tls_material)
        desc = N.with_backlog(desc, BACKLOG)
        if self.reuse_port:
            ep = ReusePortEndpoint.parse(self.reactor, desc)
            if ep is not None:
                return ep
        return endpoints.serverFromString(self.reactor, desc)

    def address(self, kind: str) -> Any:
        """The bound address of a shared listener (``http``, ``sni``, ``grpc``)."""
        return self.ports[kind].getHost()

    def stop(self) -> defer.Deferred:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        ports = [p for p in self.ports.values()] + [p for _, p in self._tcp_ports.values()]
        self.ports.clear()
        self._tcp_ports.clear()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports],
                                   consumeErrors=True)

    def changed(self) -> None:
        """The routes in the store changed (any thread): apply them now."""
        self.reactor.callFromThread(self.reconcile)

    # --- routes --------------------------------------------------------------------------

    def reconcile(self) -> defer.Deferred | None:
        """Read the routes and apply them: at once from an embedded store, from a thread
        for a networked one (Redis: the reactor never waits on the network)."""
        if getattr(self.store, "networked", False):
            from twisted.internet import threads

            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                          self.store.list_routes)
            d.addCallbacks(self._apply_routes, self._routes_unreadable)
            return d
        try:
            records = self.store.list_routes()
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not stop the watch
            self._routes_unreadable(exc)
            return None
        self._apply_routes(records)
        return None

    def _routes_unreadable(self, why: Any) -> None:
        text = why.getErrorMessage() if hasattr(why, "getErrorMessage") else str(why)
        if self._unreadable:
            return  # said once per outage (every watch interval would flood the log)
        self._unreadable = True
        log.warn("front doors: cannot read routes (keeping the ones in force): {why}", why=text)

    def _apply_routes(self, records: list) -> None:
        if self._unreadable:
            self._unreadable = False
            log.info("front doors: routes readable again")
        key = tuple((r.id, r.kind, r.match, r.target) for r in records)
        if key == self._known:
            self._sync_tcp()  # only retries of listeners that failed
            return
        self._known = key
        old = {r.id: r for d in (self.http, self.sni, self.grpc, self.tcp) for r in d.values()}
        maps: dict[str, dict[str, Route]] = {"http": {}, "sni": {}, "grpc": {}, "tcp": {}}
        for rec in records:
            prev = old.get(rec.id)
            if prev is not None and (prev.kind, prev.match) == (rec.kind, rec.match) and \
                    str(prev.target) == rec.target:
                route = prev
            else:
                try:
                    target, error = parse_target(rec.target), None
                except ValueError as exc:
                    target, error = None, str(exc)
                    log.warn("route {id}: {why}", id=rec.id, why=error)
                route = Route(rec.id, rec.kind, rec.match, target, error)
            maps.setdefault(rec.kind, {})
            key_ = rec.id if rec.kind == "tcp" else rec.match.lower()
            maps[rec.kind][key_] = route
        self.http, self.sni, self.grpc = maps["http"], maps["sni"], maps["grpc"]
        self.tcp = maps["tcp"]
        self._sync_tcp()

    def _tcp_desc(self, match: str) -> str:
        if match.isdigit():
            return f"tcp:{match}:interface={self.tcp_interface}"
        return match

    def _sync_tcp(self) -> None:
        now = self.reactor.seconds()
        for rid in list(self._tcp_ports):
            spec, port = self._tcp_ports[rid]
            r = self.tcp.get(rid)
            if r is None or (r.match, str(r.target)) != spec:
                del self._tcp_ports[rid]
                d = defer.maybeDeferred(port.stopListening)
                d.addErrback(lambda f: log.warn("stop listening: {why}", why=f.getErrorMessage()))
                log.info("front door tcp {id} closed", id=rid)
            elif isinstance(port, _Failed) and now - port.when >= self.listen_retry:
                del self._tcp_ports[rid]  # try again below
        for rid, route in self.tcp.items():
            if rid in self._tcp_ports or route.target is None:
                continue
            self._listen_tcp(route)

    def _listen_tcp(self, route: Route) -> None:
        desc = self._tcp_desc(route.match)
        spec = (route.match, str(route.target))
        token = _Pending()
        self._tcp_ports[route.id] = (spec, token)
        try:
            d = self._server_endpoint(desc).listen(DoorFactory(self, "tcp", route))
        except Exception as exc:  # noqa: BLE001 - bad description: say so, keep the others
            d = defer.fail(exc)

        def ours() -> bool:  # still the attempt the table holds (not removed or redone meanwhile)
            cur = self._tcp_ports.get(route.id)
            return cur is not None and cur[1] is token

        def up(port: Any) -> None:
            if not ours():
                port.stopListening()
                return
            self._tcp_ports[route.id] = (spec, port)
            h = port.getHost()
            route.listening = f"{getattr(h, 'host', '')}:{getattr(h, 'port', '')}"
            route.error = None
            log.info("front door tcp {id} listening on {where} → {target}", id=route.id,
                     where=route.listening, target=str(route.target))

        def down(f: Failure) -> None:
            if not ours():
                return
            self._tcp_ports[route.id] = (spec, _Failed(self.reactor.seconds()))
            route.error = f"cannot listen on {desc}: {f.getErrorMessage()}"
            log.warn("route {id}: {why} (retrying every {n:g}s)", id=route.id, why=route.error,
                     n=self.listen_retry)

        d.addCallbacks(up, down)


class _Pending:
    """Stands for a tcp listener that is still being bound."""

    def stopListening(self) -> None:
        return None


class _Failed(_Pending):
    """A tcp listener that could not be bound at ``when`` (retried after LISTEN_RETRY)."""

    def __init__(self, when: float) -> None:
        self.when = when


__all__ = ["FORWARDED_MODES", "DoorFactory", "FrontDoors", "Route"]
