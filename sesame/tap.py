"""
``twistd sesame``: the hub and the remote agent as Twisted services.

    twistd -n sesame hub [--listen tcp:7443:interface=127.0.0.1] [--data-dir ./.sesame]
        [--store redis://HOST:PORT/DB]
    twistd -n sesame remote --hub HOST:PORT [--hub ...] --name edge-1 --token-file F \\
        --ca ca.pem --allow 127.0.0.1:22
    twistd -n sesame host    # a bare tunnel host (loopback only), for tunnel experiments
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from sesame import _grpcio, _routecli
from sesame import _names as N

try:  # before anything below imports grpc: it reads its engine choice once
    GRPC_IO: str | ValueError = _grpcio.choose_grpc_io()
except ValueError as _exc:
    GRPC_IO = _exc

DEFAULT_LISTEN = "tcp:7443:interface=127.0.0.1"
DEFAULT_DATA_DIR = "./.sesame"


class _ToTwistedLog(logging.Handler):
    """stdlib ``sesame.*`` records (hub/remote progress: "registered ...", refusals) into
    the Twisted log that ``twistd`` and ``sesame hub|remote`` print."""

    _formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        from twisted.logger import LogLevel

        try:
            level = (LogLevel.error if record.levelno >= logging.ERROR else
                     LogLevel.warn if record.levelno >= logging.WARNING else
                     LogLevel.info if record.levelno >= logging.INFO else LogLevel.debug)
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self._formatter.formatException(record.exc_info)
            Logger(namespace=record.name).emit(level, "{text}", text=text)
        except Exception:  # noqa: BLE001 - a handler never raises into the code that logged
            self.handleError(record)


def _log_stdlib_to_twisted() -> None:
    root = logging.getLogger("sesame")
    if not any(isinstance(h, _ToTwistedLog) for h in root.handlers):
        root.addHandler(_ToTwistedLog())
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)


class HubOptions(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the sesame hub: remotes register with it, clients reach them through it. "
        "TLS is on by default: the first start creates a private CA and a hub certificate "
        "in the data directory and prints the path of ca.pem, which remotes and clients need."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN,
         "Where to listen: a Twisted-style tcp:PORT:interface=HOST or HOST:PORT "
         f"(default {DEFAULT_LISTEN}; port 0 picks one)."],
        ["data-dir", "d", DEFAULT_DATA_DIR,
         "Directory for the SQLite store and generated TLS files (default ./.sesame)."],
        ["store", None, None,
         "Keep tokens, namespaces, remotes and routes in this store instead of "
         "DATA_DIR/hub.db: redis://[:PASSWORD@]HOST:PORT/DB, rediss://... (TLS; "
         "?ssl_ca_certs=FILE), sqlite:///PATH (env SESAME_STORE; the password is never "
         "logged)."],
        ["workers", None, "1",
         "Run this many hub processes on the one --listen port (SO_REUSEPORT; front doors "
         "too), each a member of the cluster on the Redis --store (required with more than "
         "one). Default 1."],
        ["advertise", None, None,
         "With a Redis --store (a cluster): HOST:PORT where the other hubs reach this one "
         "(default: the --listen address; a wildcard host becomes this machine's name)."],
        ["tls-cert", None, None, "PEM certificate to serve instead of the generated one."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["tls-ca", None, None,
         "PEM CA certificate that issued --tls-cert, for remotes and clients to trust "
         "(checked at start; the startup banner names it). Without it they use the "
         "system's trusted roots."],
        ["client-ca", None, None,
         "Require client certificates signed by this PEM CA (mTLS), in addition to tokens."],
        ["port-file", None, None, "Write the bound port to this file once listening."],
        ["http", None, None,
         "Also serve the management API as JSON REST under /v1alpha1/ (docs/MANAGEMENT.md) "
         "on this Twisted server endpoint, e.g. tcp:8080:interface=127.0.0.1 or "
         "ssl:8443:privateKey=key.pem:certKey=cert.pem (default: off). It carries admin "
         "tokens: plain TCP is refused unless on a loopback interface."],
    ]
    optFlags = [
        ["no-tls", None, "Serve plain gRPC (refused unless --listen is a loopback address)."],
        ["metrics-public", None,
         "Serve /metrics on the --http listener without the admin token (for a Prometheus "
         "scraper on loopback; the dashboard still needs the token)."],
    ]
    optParameters += _routecli.HUB_OPTIONS  # front doors: --vhost, --sni, --grpc-door, ...

    def postOptions(self) -> None:
        try:
            self.host, self.port = N.grpc_address(self["listen"])
        except ValueError as exc:
            raise usage.UsageError(f"--listen: {exc}") from None
        if not self["store"]:
            self["store"] = os.environ.get("SESAME_STORE") or None
        if self["store"]:
            from sesame.hub import check_store_url
            from sesame.hub.store import InvalidArgument

            try:
                check_store_url(self["store"])
            except InvalidArgument as exc:
                raise usage.UsageError(f"--store: {exc.reason}") from None
        if not N.ascii_digits(self["workers"]) or not 1 <= int(self["workers"]) <= 64:
            raise usage.UsageError(f"--workers: {self['workers']!r} is not a whole number "
                                   "from 1 to 64")
        self["workers"] = int(self["workers"])
        if self["workers"] > 1 and not (self["store"] or "").startswith(("redis://",
                                                                          "rediss://")):
            raise usage.UsageError("--workers: several hub processes share their state through "
                                   "a Redis --store (redis://HOST:PORT/DB)")
        if self["advertise"] and self["workers"] > 1:
            raise usage.UsageError("--advertise: with --workers each process advertises a port "
                                   "of its own (on the --listen host); leave --advertise out")
        if self["advertise"]:
            try:
                N.hub_address(self["advertise"])
            except ValueError as exc:
                raise usage.UsageError(f"--advertise: {exc}") from None
        _routecli.check_hub_options(self)
        if self["http"]:
            from sesame.hub import check_http_endpoint

            try:
                check_http_endpoint(self["http"])
            except ValueError as exc:
                raise usage.UsageError(f"--http: {exc}") from None
        if self["no-tls"] and not N.is_loopback(self.host):
            raise usage.UsageError(
                f"--no-tls: refusing to serve without TLS on {self.host}, which is not a "
                "loopback address")
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-ca"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-ca goes with --tls-cert (without them the hub "
                                   "generates its CA: DATA_DIR/ca.pem)")
        if self["no-tls"] and (self["tls-cert"] or self["client-ca"]):
            raise usage.UsageError("--no-tls: cannot be combined with --tls-cert or --client-ca")
        for key in ("tls-cert", "tls-key", "tls-ca", "client-ca"):
            if self[key] and not Path(self[key]).is_file():
                raise usage.UsageError(f"--{key}: {self[key]} is not a readable file")
        if self["tls-ca"]:
            why = _not_issued_by(Path(self["tls-cert"]).read_bytes(),
                                 Path(self["tls-ca"]).read_bytes())
            if why:
                raise usage.UsageError(f"--tls-ca: {why}")


def _not_issued_by(chain_pem: bytes, ca_pem: bytes) -> str | None:
    """Why the certificate chain ``chain_pem`` does not lead to a CA in ``ca_pem``
    (None when a certificate of the chain is one of them or directly issued by one)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        return "--tls-cert holds no PEM certificate"
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return "no PEM certificate in the file"
    for cert in chain:
        for ca in cas:
            if cert == ca:
                return None
            try:
                cert.verify_directly_issued_by(ca)
                return None
            except (ValueError, TypeError, InvalidSignature):  # another issuer
                continue
    return (f"the certificate in --tls-cert ({chain[0].subject.rfc4514_string()}) is not "
            "issued by this CA; remotes and clients trusting it would fail to connect")


class RemoteOptions(usage.Options):
    synopsis = "--hub HOST:PORT [--hub ...] --name NAME --token-file F [--ca FILE] --allow PATTERN..."
    longdesc = (
        "Run a remote agent: dial out to the hub, register as NAME, and let clients "
        "open TCP connections to the addresses --allow permits (none by default). "
        "Reconnects with backoff when the hub goes away. With several hubs (--hub "
        "repeated, or a DNS name with several addresses) it keeps a session to each, "
        "or with --homes N to the first N that accept it, moving to the next hub when "
        "one of those is lost."
    )
    optParameters = [
        ["name", "n", None, "Remote name to register, or namespaces/NS/remotes/NAME."],
        ["token-file", None, None, "File holding this remote's token (env SESAME_TOKEN_FILE; "
                                   "or SESAME_TOKEN holds the token itself)."],
        ["ca", None, None, "The hub's CA certificate, e.g. the hub's .sesame/ca.pem (env SESAME_CA)."],
        ["cert", None, None, "Client certificate for a hub started with --client-ca (env SESAME_CERT)."],
        ["key", None, None, "Private key of --cert (env SESAME_KEY)."],
        ["homes", None, None, "Keep sessions to at most N of the hubs (env SESAME_HOMES; "
                              "default: all): the first N that accept, moving to the next "
                              "one when one of them is lost."],
    ]
    optFlags = [["no-tls", None, "Plain gRPC to a loopback hub started with --no-tls."]]

    def __init__(self) -> None:
        super().__init__()
        self["allow"] = []
        self["hub"] = []
        #: ``--homes`` (or ``SESAME_HOMES``): how many of the hubs to keep sessions to
        #: (None: all of them).
        self.homes: int | None = None

    def opt_hub(self, hub: str) -> None:
        """The hub to dial: HOST:PORT or tcp:HOST:PORT; repeatable, or comma-separated, for a
        session to each of several hubs (env SESAME_HUB, comma-separated)."""
        self["hub"].append(hub)

    def opt_allow(self, pattern: str) -> None:
        """HOST:PORTS a client may reach from here; repeatable (127.0.0.1:*, 10.0.0.0/8:22,
        db.internal:5432, [::1]:8000-8100, *:443)."""
        from sesame.netconn import Allowlist, PatternError

        try:
            Allowlist([pattern])
        except PatternError as exc:
            raise usage.UsageError(f"--allow: {exc}") from None
        self["allow"].append(pattern)

    opt_a = opt_allow

    def postOptions(self) -> None:
        from sesame.endpoints import hub_config, hub_targets, parse_homes

        env = os.environ
        if not self["name"]:
            raise usage.UsageError("--name: which remote name to register")
        if not self["hub"] and not env.get("SESAME_HUB"):
            raise usage.UsageError("--hub: which hub to dial (HOST:PORT; or set SESAME_HUB)")
        hubs, key = (self["hub"], "--hub") if self["hub"] else ([env["SESAME_HUB"]], "SESAME_HUB")
        try:
            targets = hub_targets(hubs, key)
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from None
        homes, key = ((self["homes"], "--homes") if self["homes"] is not None
                      else (env.get("SESAME_HOMES") or None, "SESAME_HOMES"))
        if homes is not None:
            try:
                self.homes = parse_homes(homes, len(targets), key)
            except ValueError as exc:
                raise usage.UsageError(str(exc)) from None
        kw = {"hub": ",".join(targets)}
        if self["token-file"]:
            kw["tokenFile"] = self["token-file"]
        if self["ca"]:
            kw["ca"] = self["ca"]
        if self["no-tls"]:
            kw["tls"] = "no"
        if self["cert"]:
            kw["cert"] = self["cert"]
        if self["key"]:
            kw["key"] = self["key"]
        try:
            self.hub = hub_config(kw)
            N.parse_remote(self["name"])
        except ValueError as exc:
            key = str(exc).split(":", 1)[0]
            flag = {"hub": "--hub", "tokenFile": "--token-file", "ca": "--ca", "tls": "--no-tls",
                    "token": "--token-file", "cert": "--cert", "key": "--key"}.get(key, "--name")
            raise usage.UsageError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None


class HostOptions(usage.Options):
    optParameters = [["listen", "l", "127.0.0.1:7443", "HOST:PORT (loopback only)."]]

    def postOptions(self) -> None:
        host, _ = N.grpc_address(self["listen"])
        if not N.is_loopback(host):
            raise usage.UsageError(f"--listen {self['listen']}: only loopback addresses are "
                                   "allowed for a bare tunnel host")


class Options(usage.Options):
    synopsis = "hub|remote|host [options]"
    subCommands = [
        ["hub", None, HubOptions, "Run the hub."],
        ["remote", None, RemoteOptions, "Run a remote agent."],
        ["host", None, HostOptions, "Run a bare tunnel host (loopback, for experiments)."],
    ]

    def postOptions(self) -> None:
        if isinstance(GRPC_IO, ValueError):
            raise usage.UsageError(str(GRPC_IO))
        if self.subCommand is None:
            raise usage.UsageError("name a subcommand: hub, remote or host")


def _raise_file_limit(log: Any, what: str) -> Any:
    """Raise the soft open-file limit to the hard one (and say so); the FileBudget."""
    from sesame import _limits

    before, after = _limits.raise_open_file_limit()
    if after != before:
        log.info("sesame {what}: raised the open-file limit from {before} to {after}",
                 what=what, before=before, after=after)
    return _limits.FileBudget.for_limit(_limits.open_file_limit())


#: Set by ``sesame hub --workers N`` in each hub process it runs (0 .. N-1).
WORKER_ENV = "SESAME_HUB_WORKER"


def worker_index() -> int | None:
    """Which of ``sesame hub --workers N``'s processes this is, or None (a lone hub)."""
    text = os.environ.get(WORKER_ENV, "")
    return int(text) if N.ascii_digits(text) else None


def _start_failed(svc: service.Service, what: str) -> Any:
    """Under twistd: a service that cannot start says why and stops the process
    (rather than leave a daemon that listens nowhere)."""

    def failed(f: Any) -> None:
        from twisted.internet import reactor

        svc.log.error("sesame {what} could not start: {why}", what=what,  # type: ignore[attr-defined]
                      why=f.getErrorMessage())
        if reactor.running:
            import atexit

            from sesame._cliutil import stop_reactor

            atexit.register(_exit_failed)
            stop_reactor(reactor)

    return failed


def _exit_failed() -> None:
    """twistd has no exit status of its own: a service that failed to start exits 1."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(1)


def _explain_bind(f: Any, host: str, port: int) -> Any:
    """grpc says only "Failed to bind to address ...": find out why (in use, not ours...)."""
    if "Failed to bind" not in f.getErrorMessage():
        return f
    import socket

    where = N.join_host_port(host, port)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {where}: {exc.strerror}") from None
    raise RuntimeError(f"cannot listen on {where}")


class HubService(service.Service):
    log = Logger()

    def __init__(self, options: HubOptions, out: Any = None) -> None:
        self.options = options
        self.hub: Any = None
        self.port: int | None = None
        self.out = out or sys.stdout
        self.ready: Any = None  # a Deferred once started: fires when listening
        self.doors: Any = None  # the front doors (sesame.hub.frontdoor.FrontDoors) once serving
        self.on_start_failure: Any = _start_failed(self, "hub")
        self.http_ready: Any = None  # with --http: a Deferred of its listening port
        self.http_listener: Any = None
        self.files: Any = None  # sesame._limits.FileBudget
        self._files_watch: Any = None

    def startService(self) -> None:
        from sesame.bridge import get_bridge
        from sesame.hub import Hub
        from sesame.hub.store import SQLiteStore
        from sesame.hub.tls import ensure_hub_tls

        super().startService()
        _log_stdlib_to_twisted()
        self.files = _raise_file_limit(self.log, "hub")
        o = self.options
        data_dir = Path(o["data-dir"])
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if o["store"]:
            from sesame.hub import open_store_url
            from sesame.hub.store import redact_url

            store = open_store_url(o["store"])  # StoreUnavailable: the hub does not start
            self.log.info("sesame hub store: {url}", url=redact_url(o["store"]))
        else:
            store = SQLiteStore(data_dir / "hub.db")
        creds = None
        self.peer_ca: bytes | None = None  # what this hub trusts when it dials a peer hub
        #: (certificate, key) PEM a front door given as tls:PORT serves (the hub's own)
        self.door_tls: tuple[bytes, bytes] | None = None
        ca_note = "no TLS (loopback only)"
        if store.networked and not o["no-tls"] and not o["tls-cert"]:
            # a cluster: every hub issues its certificate from the one CA in the store
            from sesame.hub.tls import adopt_cluster_ca, cluster_ca_bundle

            adopt_cluster_ca(data_dir, store.shared_secret("cluster-ca", cluster_ca_bundle))
        if not o["no-tls"]:
            import grpc

            client_ca = Path(o["client-ca"]).read_bytes() if o["client-ca"] else None
            if o["tls-cert"]:
                self.door_tls = (Path(o["tls-cert"]).read_bytes(), Path(o["tls-key"]).read_bytes())
                creds = grpc.ssl_server_credentials(
                    [(self.door_tls[1], self.door_tls[0])],
                    root_certificates=client_ca, require_client_auth=client_ca is not None)
                ca_note = f"TLS with {o['tls-cert']}" + (
                    f"; clients and remotes trust {o['tls-ca']}" if o["tls-ca"] else "")
                self.peer_ca = Path(o["tls-ca"]).read_bytes() if o["tls-ca"] else None
            else:
                hosts = [o.host] if o.host not in ("0.0.0.0", "::") else []
                if not hosts:
                    import socket

                    hosts = [socket.getfqdn()]
                if o["advertise"]:
                    hosts.append(N.hub_address(o["advertise"])[0])
                tls = ensure_hub_tls(data_dir, hosts)
                self.door_tls = (tls.cert_pem, tls.key_pem)
                self.peer_ca = tls.ca_pem
                creds = tls.server_credentials(require_client_cert=client_ca is not None,
                                               client_ca=client_ca)
                ca_note = f"TLS; clients and remotes trust {tls.ca_path}"
                if tls.created:
                    ca_note += " (new CA created)"
        self.hub = Hub(store)
        if o["http"] and (worker_index() or 0) > 0:
            self.log.info("--http: served by worker 0 only")
        elif o["http"]:
            self._start_http(o["http"], store)

        def listening(port: int) -> int:
            self.port = port
            where = N.join_host_port(o.host, port)
            self.log.info("sesame hub listening on {where} ({tls})", where=where, tls=ca_note)
            if o["port-file"]:
                Path(o["port-file"]).write_text(f"{port}\n")
            return port

        # (Not grpc.max_allowed_incoming_connections: once reached, it kept refusing new
        # connections after others had closed -- see docs/PERFORMANCE.md, fleet.)
        worker = worker_index()
        self.ready = get_bridge().deferred(self.hub.start(
            o.host, o.port, creds, peer_port=0 if worker is not None else None))
        self._watch_files()
        self.ready.addErrback(_explain_bind, o.host, o.port)
        self.ready.addCallbacks(listening, self.on_start_failure)
        if store.networked:
            self.ready.addCallback(self._join_cluster)
        self.ready.addCallback(self._start_doors, store)

    def _join_cluster(self, port: int | None) -> Any:
        """A networked (Redis) store makes this hub a member of the cluster on it
        (sesame.hub.cluster): lease, presence, the bus, the peer relay."""
        from sesame.bridge import get_bridge
        from sesame.hub.cluster import advertise_address, join

        if self.hub is None or port is None:
            return port
        o = self.options
        creds = None
        if not o["no-tls"]:
            import grpc

            creds = grpc.ssl_channel_credentials(root_certificates=self.peer_ca)
        if worker_index() is not None and self.hub.peer_port:
            advertise = advertise_address(o.host, self.hub.peer_port)  # this process's own
        else:
            advertise = advertise_address(o.host, port, o["advertise"])

        def joined(cluster: Any) -> int:
            self.log.info("sesame hub {id} joined the cluster ({n} other hub(s)); peers reach "
                          "it at {advertise}", id=cluster.id, n=len(cluster.peers),
                          advertise=advertise)
            return port

        d = get_bridge().deferred(join(self.hub, advertise=advertise, channel_credentials=creds))
        d.addCallbacks(joined, self.on_start_failure)
        return d

    def _watch_files(self) -> None:
        """Every 2 s count the open files (in a thread: ~1 us a file) and say when the hub
        reaches its reserve and when it is back below."""
        from twisted.internet import threads
        from twisted.internet.task import LoopingCall

        from sesame import _limits

        def counted(n: int | None) -> None:
            if n is None:
                return
            was_near = self.files.near
            self.files.sample(n)
            if self.files.near and not was_near:
                self.log.warn(
                    "open files {n} of {limit}: new connections will wait until some close "
                    "(established ones keep working); raise the hard limit (ulimit -Hn, "
                    "LimitNOFILE=) for a larger fleet",
                    n=n, limit=self.files.limit)
            elif was_near and not self.files.near:
                self.log.info("open files back to {n} of {limit}: accepting new connections",
                              n=n, limit=self.files.limit)

        def check() -> Any:
            return threads.deferToThread(_limits.count_open_files).addCallback(counted)

        self._files_watch = LoopingCall(check)
        self._files_watch.start(2.0, now=True).addErrback(
            lambda f: self.log.failure("counting open files failed", f))

    def _start_doors(self, port: int, store: Any) -> int:
        """Front doors (routes in the store) once the hub serves; they follow route changes."""
        from twisted.internet import defer, reactor

        if self.hub is None or port is None:  # stopped, or the start failed
            return port
        self.doors = _routecli.front_doors(self.hub, store, self.options, reactor,
                                           reuse_port=worker_index() is not None,
                                           tls_material=self.door_tls)
        self.hub.on_routes_changed = self.doors.changed
        self.doors_ready = defer.ensureDeferred(self.doors.start())
        self.doors_ready.addErrback(self.on_start_failure)
        return port

    def _start_http(self, description: str, store: Any) -> None:
        """``--http``: the operator site (:func:`sesame.hub._http.admin_root`), its own listener."""
        from twisted.internet import reactor

        from sesame.hub import listen_http

        def up(port: Any) -> Any:
            self.http_listener = port
            addr = port.getHost()
            scheme = "https" if description.split(":", 1)[0] in ("ssl", "tls") else "http"
            where = (f"{scheme}://{N.join_host_port(addr.host, addr.port)}"
                     if hasattr(addr, "port") else description)
            self.log.info("sesame hub management API (REST) on {where}/v1alpha1/", where=where)
            self.log.info("sesame hub dashboard on {where}/dashboard, metrics on {where}/metrics",
                          where=where)
            return port

        self.http_ready = listen_http(reactor, description, self.hub, store,
                                      metrics_public=self.options["metrics-public"])
        self.http_ready.addCallbacks(up, self.on_start_failure)

    def stopService(self) -> Any:
        from twisted.internet import defer

        from sesame.bridge import get_bridge

        super().stopService()
        watch, self._files_watch = self._files_watch, None
        if watch is not None and watch.running:
            watch.stop()
        stopping = []  # front doors, --http and the hub itself, all awaited
        doors, self.doors = self.doors, None
        if doors is not None:
            stopping.append(doors.stop())
        http, self.http_listener = self.http_listener, None
        if http is not None:
            stopping.append(defer.maybeDeferred(http.stopListening))
        hub, self.hub = self.hub, None
        if hub is not None:
            stopping.append(get_bridge().deferred(hub.stop(1)))
        return defer.gatherResults(stopping, consumeErrors=True) if stopping else None


class RemoteService(service.Service):
    """The remote agent: a :class:`sesame.endpoints.RemoteSessions` -- one session per hub
    (``--hub`` repeated, or a DNS name resolved at start, in a thread, to several
    addresses), each registering and reconnecting on its own, or with ``--homes N``
    sessions to N of the hubs, moving to the next hub when one is lost -- offering
    NetConn behind ``--allow``.  ``session`` is that group once started (``ready``
    fired)."""

    log = Logger()

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self.session: Any = None
        self.ready: Any = None
        self.on_start_failure: Any = _start_failed(self, "remote")

    def startService(self) -> None:
        from twisted.internet import defer, reactor, threads

        from sesame.endpoints import needs_resolving, resolve_hubs

        super().startService()
        _log_stdlib_to_twisted()
        _raise_file_limit(self.log, "remote")  # every relayed connection is a file here
        o = self.options
        if not o["allow"]:
            self.log.warn("no --allow patterns: every dial will be refused (default deny)")
        where = ", ".join(o.hub.targets)
        plural = "s" if len(o.hub.targets) > 1 else ""
        homes = getattr(o, "homes", None)
        if homes is not None and homes < len(o.hub.targets):
            where += f" (homed on {homes} of them at a time)"
        self.log.info("sesame remote {name} dialling the hub{s} at {hub}; allowing {allow}",
                      name=o["name"], s=plural, hub=where, allow=", ".join(o["allow"]) or "nothing")
        if needs_resolving(o.hub):
            # DNS in a thread, never on the reactor: a name with several addresses is a hub each
            self.ready = threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                                   resolve_hubs, o.hub)
        else:
            self.ready = defer.succeed(None)
        self.ready.addCallback(self._start_sessions)
        self.ready.addErrback(self.on_start_failure)

    def _start_sessions(self, hubs: Any) -> Any:
        from twisted.internet import reactor

        from sesame.bridge import get_bridge
        from sesame.endpoints import RemoteSessions
        from sesame.remote import agent_offers

        if not self.running:  # stopped while resolving
            return None
        o = self.options
        self.session = RemoteSessions.for_hubs(
            o.hub, o["name"], agent_offers(o["allow"], reactor=reactor), hubs=hubs,
            explain=True, homes=getattr(o, "homes", None))
        return get_bridge().deferred(self.session.astart())

    def stopService(self) -> Any:
        from sesame.bridge import get_bridge

        super().stopService()
        if self.session is None:
            return None
        s, self.session = self.session, None
        return get_bridge().deferred(s.astop())


class TunnelHostService(service.Service):
    """A bare :class:`sesame.tunnel.TunnelHost` (health + reflection on forward tunnels)."""

    log = Logger()

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.host: Any = None
        self.port: int | None = None

    def startService(self) -> None:
        from sesame._cliutil import default_registry
        from sesame.tunnel import TunnelHost

        super().startService()
        host, port = N.grpc_address(self.listen)
        self.host = TunnelHost(default_registry())
        self.port = self.host.start(N.join_host_port(host, port))
        self.log.info("sesame tunnel host listening on {address}",
                      address=N.join_host_port(host, self.port))

    def stopService(self) -> Any:
        from sesame.bridge import to_deferred

        super().stopService()
        if self.host is None:
            return None
        host, self.host = self.host, None

        return to_deferred(host.bridge.submit(host.astop(1, close_tunnels=False)))


def makeService(options: Options) -> service.IService:
    """The ``twistd sesame`` service for parsed ``options``: a MultiService holding the
    hub (``twistd sesame hub``), a remote agent (``remote``) or a bare tunnel host
    (``host``).  Nothing listens or dials until the service starts."""
    from twisted.internet import reactor

    from sesame._cliutil import quiet_repeated_stop_signals

    reactor.callWhenRunning(quiet_repeated_stop_signals, reactor)
    Logger().info("sesame: grpc I/O engine: {engine} ({env} chooses: {iomgr} or {ee})",
                  engine=GRPC_IO, env=_grpcio.ENV, iomgr=_grpcio.IOMGR,
                  ee=_grpcio.EVENT_ENGINE)
    top = service.MultiService()
    sub = options.subOptions
    if options.subCommand == "hub":
        HubService(sub).setServiceParent(top)
    elif options.subCommand == "remote":
        RemoteService(sub).setServiceParent(top)
    elif options.subCommand == "host":
        TunnelHostService(sub["listen"]).setServiceParent(top)
    return top


__all__ = ["HostOptions", "HubOptions", "HubService", "Options", "RemoteOptions", "RemoteService",
           "TunnelHostService", "makeService"]
