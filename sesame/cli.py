"""
The ``sesame`` command.

    sesame hub [--listen ...] [--data-dir ./.sesame]       run the hub (foreground)
    sesame remote --hub H:P --name edge-1 --token-file F --ca ca.pem --allow 127.0.0.1:22
    sesame token create --remote edge-1 | --client [--remotes PATTERN]   print a token
                        [--data-dir DIR | --store redis://HOST:PORT/DB]
    sesame token revoke TOKEN_OR_ID | sesame token list
    sesame forward LISTEN_ENDPOINT CONNECT_ENDPOINT         e.g. tcp:2222 'sesame:remote=...'
    sesame stdio CONNECT_ENDPOINT                           for ssh ProxyCommand
    sesame demo                                             tunnels both ways, in-process

Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sesame import _grpcio
from sesame._cliutil import (
    STORE_HELP,
    CLIError,
    default_registry,
    open_store,
    quiet_repeated_stop_signals,
    stop_reactor,
)

DEFAULT_DATA_DIR = "./.sesame"


# --- services in the foreground ----------------------------------------------------------


def json_log_observer(out: Any = None) -> Any:
    """A twisted.logger observer writing one JSON object a line to ``out`` (stderr):
    twisted.logger's ``eventAsJSON`` (so ``eventsFromJSONLogFile`` reads it back) plus
    ``log_text``, the formatted message.  ``sesame hub|remote --log-format json`` uses it;
    under twistd, name it as the initial observer:
    ``twistd -n --logger sesame.cli.json_log_observer sesame hub``."""
    from twisted.logger import FileLogObserver, eventAsJSON, formatEvent

    def line(event: dict) -> str:
        return eventAsJSON({**event, "log_text": formatEvent(event)}) + "\n"

    return FileLogObserver(out or sys.stderr, line)


def _with_log_format(make: Any) -> Any:
    from twisted.python import usage

    class Options(make):  # type: ignore[misc, valid-type]
        optParameters = [["log-format", None, "text",
                          "Log lines on stderr as text or json (one JSON object a line)."]]

        def postOptions(self) -> None:
            if self["log-format"] not in ("text", "json"):
                raise usage.UsageError(f"--log-format: text or json, not {self['log-format']!r}")
            super().postOptions()

    Options.__name__ = make.__name__
    return Options


def _run_service(make: Any, argv: list[str], banner: Any = None) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    options = _with_log_format(make)()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        raise CLIError(str(exc)) from None
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from sesame import tap

    if make is tap.HubOptions and options["workers"] > 1 and tap.worker_index() is None:
        return _supervise_workers(options, argv)

    observer = (json_log_observer() if options["log-format"] == "json"
                else textFileLogObserver(sys.stderr))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    cls = {tap.HubOptions: tap.HubService, tap.RemoteOptions: tap.RemoteService}[make]
    svc = cls(options)
    failed: list[BaseException] = []

    def down(f: Any) -> None:  # replaces the service's own log-and-stop
        failed.append(f.value)
        stop_reactor(reactor)

    svc.on_start_failure = down

    def start() -> None:
        try:
            svc.startService()
        except Exception as exc:  # noqa: BLE001
            failed.append(exc)
            stop_reactor(reactor)
            return

        def up(_: object) -> None:
            if failed:
                return
            if banner is not None:
                banner(svc)
            if isinstance(svc, tap.RemoteService):
                watch.start(0.1, now=False)

        svc.ready.addCallback(up)

    def refused() -> None:
        # a remote the hub refuses before it ever registered (bad token, a name the token may
        # not register) is misconfigured: say so in one line and exit, rather than retry forever
        s = svc.session
        if s is None or s.registrations:
            watch.stop()
        elif s.fatal:
            watch.stop()
            failed.append(CLIError(f"hub {s.target} refused remote {options['name']}: {s.fatal}"))
            stop_reactor(reactor)

    from twisted.internet.task import LoopingCall

    watch = LoopingCall(refused)
    reactor.callWhenRunning(start)
    reactor.callWhenRunning(quiet_repeated_stop_signals, reactor)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: svc.running and svc.stopService())
    reactor.run()
    if failed:
        if isinstance(failed[0], CLIError):
            raise failed[0]
        raise CLIError(f"{type(failed[0]).__name__}: {failed[0]}")
    return 0


def _supervise_workers(options: Any, argv: list[str]) -> int:
    """``sesame hub --workers N``: run N hub processes on one port (SO_REUSEPORT), each a
    member of the cluster on the Redis store with a peer port of its own; restart one that
    dies (backoff 1 s doubling to 30 s); SIGTERM/SIGINT stop them all.  The exit status is
    1 when a worker fails before all listen (a configuration error: its log says why)."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from sesame import _names as N
    from sesame.hub.frontdoor import ReusePortEndpoint
    from sesame.tap import WORKER_ENV

    def free_port(interface: str) -> int:
        import socket

        with socket.socket(socket.AF_INET6 if ":" in interface else socket.AF_INET) as sock:
            sock.bind((interface, 0))
            return sock.getsockname()[1]

    def tcp(interface: str, number: int) -> str:
        escaped = interface.replace(":", "\\:")  # IPv6 colons, as endpoint strings escape them
        return f"tcp:{number}:interface={escaped}"

    n, host, port = options["workers"], options.host, options.port
    if port == 0:  # every worker must bind the same port: pick it here
        port = free_port(host)
    extra = ["--listen", tcp(host, port)]
    for flag in ("vhost", "sni", "grpc-door"):  # front doors on port 0: the same, picked here
        ep = ReusePortEndpoint.parse(None, options[flag]) if options[flag] else None
        if ep is not None and ep.port == 0:
            interface = ep.interface or "0.0.0.0"
            extra += [f"--{flag}", tcp(interface, free_port(interface))]
    tmp = Path(tempfile.mkdtemp(prefix="sesame-workers-"))

    def spawn(i: int) -> subprocess.Popen:
        (tmp / f"{i}.port").unlink(missing_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", "sesame", "hub", *argv, *extra,
             "--port-file", str(tmp / f"{i}.port")],
            env={**os.environ, WORKER_ENV: str(i)}, stdin=subprocess.DEVNULL)

    procs = {i: spawn(i) for i in range(n)}
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        deadline = time.monotonic() + 120
        while not stopping and not all((tmp / f"{i}.port").exists() for i in procs):
            for i, p in procs.items():
                if p.poll() is not None:
                    stop(signal.SIGTERM, None)
                    for q in procs.values():
                        q.wait()
                    raise CLIError(f"hub worker {i} exited ({p.returncode}) before listening; "
                                   "its log above says why")
            if time.monotonic() > deadline:
                stop(signal.SIGTERM, None)
                raise CLIError("hub workers did not all listen within 120 s")
            time.sleep(0.1)  # a supervisor's start-up wait, not a hot path
        if not stopping:
            if options["port-file"]:
                Path(options["port-file"]).write_text(f"{port}\n")
            where = N.join_host_port(host, port)
            print(f"sesame hub: {n} workers listening on {where} (pids "
                  f"{', '.join(str(p.pid) for p in procs.values())})", file=sys.stderr, flush=True)
        backoff: dict[int, float] = {}
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return 0  # all gone
            if stopping:
                if all(p.poll() is not None for p in procs.values()):
                    return 0
                continue
            for i, p in list(procs.items()):
                if p.pid == pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    delay = backoff.get(i, 0.5) * 2
                    backoff[i] = min(delay, 30.0)
                    print(f"sesame hub: worker {i} (pid {pid}) exited ({p.returncode}); "
                          f"restarting it in {backoff[i]:g}s", file=sys.stderr, flush=True)
                    time.sleep(backoff[i])
                    if not stopping:
                        procs[i] = spawn(i)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_banner(svc: Any) -> None:
    """What to type next, for this hub's TLS mode (generated CA, --tls-cert [--tls-ca],
    --no-tls): printed commands work when followed literally from the hub's directory."""
    import shlex

    from sesame import _names as N

    o = svc.options
    where = N.join_host_port(o.host, svc.port)
    data = shlex.quote(o["data-dir"])
    store_arg = f"--data-dir {data}"
    if o["store"]:
        from sesame.hub.store import redact_url

        shown = redact_url(o["store"])
        store_arg = f"--store {shlex.quote(shown)}"
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"sesame hub listening on {where}")
    ca: str | None = None
    if o["no-tls"]:
        say("no TLS (loopback only): remotes need --no-tls, clients SESAME_TLS=no or tls=no")
    elif o["tls-cert"]:
        if o["tls-ca"]:
            ca = shlex.quote(o["tls-ca"])
            say(f"hub certificate {o['tls-cert']}, issued by {o['tls-ca']} "
                "(remotes and clients need it)")
        else:
            say(f"hub certificate {o['tls-cert']}: remotes and clients check it against the "
                "system's trusted roots (start the hub with --tls-ca FILE if they need a CA file)")
    else:
        ca = shlex.quote(o['data-dir'] + '/ca.pem')
        say(f"hub CA certificate: {o['data-dir']}/ca.pem (remotes and clients need it)")
    remote_tls = " --no-tls" if o["no-tls"] else (f" --ca {ca}" if ca else "")
    env_tls = "SESAME_TLS=no " if o["no-tls"] else (f"SESAME_CA={ca} " if ca else "")
    if o["store"]:
        say(f"store: {shown}" + (" (type the password where it shows ***)"
                                 if shown != o["store"] else ""))
    say("next, in another terminal, start a remote that may reach its own port 22:")
    say(f"  .venv/bin/sesame token create {store_arg} --remote edge-1 > edge-1.token")
    say(f"  .venv/bin/sesame remote --hub {where} --name edge-1 --token-file edge-1.token"
        f"{remote_tls} --allow 127.0.0.1:22")
    say("then forward a local port to it:")
    say(f"  export SESAME_HUB={where} {env_tls}"
        f"SESAME_TOKEN=$(.venv/bin/sesame token create {store_arg} --client)")
    say("  .venv/bin/sesame forward tcp:2222:interface=127.0.0.1 "
        "'sesame:remote=edge-1:host=127.0.0.1:port=22'")


def cmd_hub(args: argparse.Namespace) -> int:
    from sesame.tap import HubOptions

    return _run_service(HubOptions, args.rest, _hub_banner)


def cmd_remote(args: argparse.Namespace) -> int:
    from sesame.tap import RemoteOptions

    return _run_service(RemoteOptions, args.rest)


# --- tokens --------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    from sesame import _names as N
    from sesame.hub.store import StoreError, StoreUnavailable

    store = open_store(args.data_dir, args.store)
    try:
        if args.action == "create":
            kinds = [k for k in ("remote", "client", "admin") if getattr(args, k)]
            if len(kinds) != 1:
                raise CLIError("token create: give exactly one of --remote NAME, --client, --admin")
            if args.remotes and kinds[0] != "client":
                raise CLIError("--remotes: only client tokens take a remote pattern")
            if kinds[0] == "remote":
                try:
                    ns, name = N.parse_remote(args.remote, args.namespace)
                except ValueError as exc:
                    raise CLIError(f"--remote: {exc}") from None
                _, token = store.create_token("remote", remote=name, pattern=None, namespace=ns)
            else:
                _, token = store.create_token(kinds[0], remote=None, pattern=args.remotes,
                                              namespace=args.namespace or "default")
            print(token)
        elif args.action == "revoke":
            if not store.revoke(args.token):
                raise CLIError(f"token revoke: no live token {args.token[:16]!r}")
            print("revoked", file=sys.stderr)
        else:
            for t in store.list_tokens():
                state = "revoked" if t.revoked else "live"
                what = t.remote or (t.pattern or "*")
                print(f"{t.id}\t{t.kind}\t{t.namespace}\t{what}\t{state}")
    except StoreUnavailable as exc:
        raise CLIError(f"token {args.action}: {exc}") from None
    except StoreError as exc:
        raise CLIError(f"--{getattr(exc, 'field', 'token')}: {exc}") from None
    finally:
        store.close()
    return 0


# --- remotes --------------------------------------------------------------------------------


def _answers(channel: Any, timeout: float) -> bool:
    """Whether ``channel`` connects within ``timeout`` seconds (False at once when the
    first attempt fails: a refused or unreachable hub, not a wait for its backoff)."""
    import threading

    import grpc

    seen: list[Any] = []
    settled = threading.Event()

    def watch(state: Any) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            seen.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(watch)
    return bool(seen) and seen[0] == grpc.ChannelConnectivity.READY


def cmd_remotes(args: argparse.Namespace) -> int:
    """``sesame remotes``: the registered remotes the token may list (``Sesame/ListRemotes``)
    joined with the live sessions of the connected ones (``Admin/ListSessions``), both
    read page by page, so neither the answer nor any header grows with the fleet."""
    import datetime
    import json

    import grpc

    from sesame import _names as N
    from sesame._cliutil import hub_config_of
    from sesame.admin.v1alpha1 import admin_pb2, admin_pb2_grpc
    from sesame.v1alpha1 import sesame_pb2

    cfg = hub_config_of(args)
    creds = cfg.credentials()

    def open_channel(target: str) -> grpc.Channel:
        return (grpc.secure_channel(target, creds) if creds
                else grpc.insecure_channel(target))

    if len(cfg.targets) == 1:
        channel = open_channel(cfg.target)  # its own error says why, from the calls below
    else:  # several hubs (one cluster: any lists it all): the first that answers
        for target in cfg.targets:
            channel = open_channel(target)
            if _answers(channel, 10.0):
                break
            channel.close()
        else:
            raise CLIError(f"UNAVAILABLE: no hub answered ({', '.join(cfg.targets)})")
        cfg = cfg.for_target(target)

    def pages(call: Any, request: Any) -> Any:
        while True:
            try:
                resp = call(request, metadata=cfg.metadata(), timeout=30)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise CLIError(f"the hub at {cfg.target} is older than this command "
                                   "(no Admin/ListSessions): upgrade the hub") from None
                raise CLIError(f"{exc.code().name}: {exc.details()}") from None
            yield resp
            if not resp.next_page_token:
                return
            request.page_token = resp.next_page_token

    with channel:
        list_remotes = channel.unary_unary(
            N.LIST_REMOTES_METHOD,
            request_serializer=sesame_pb2.ListRemotesRequest.SerializeToString,
            response_deserializer=sesame_pb2.ListRemotesResponse.FromString)
        ns = args.namespace or ""
        remotes = [r.name for resp in pages(list_remotes, sesame_pb2.ListRemotesRequest(
            parent=f"namespaces/{ns}" if ns else "", page_size=1000)) for r in resp.remotes]
        live: dict[str, dict] = {}
        stub = admin_pb2_grpc.AdminStub(channel)
        for resp in pages(stub.ListSessions, admin_pb2.ListSessionsRequest(
                parent=f"namespaces/{ns or '-'}/remotes/-", page_size=1000)):
            for s in resp.sessions:
                remote = s.name.rsplit("/sessions/", 1)[0]
                e = live.setdefault(remote, {"connected_since": None, "endpoints": set(),
                                             "connections": 0, "hubs": set()})
                if s.hub:
                    e["hubs"].add(s.hub)
                since = s.connect_time.ToNanoseconds() / 1e9
                if e["connected_since"] is None or since < e["connected_since"]:
                    e["connected_since"] = since
                e["endpoints"].update(s.endpoints)
                e["connections"] += s.connections
    rows = []
    for name in remotes + sorted(set(live) - set(remotes)):
        _, ns_id, _, rid = name.split("/")
        e = live.get(name)
        rows.append({"name": rid, "namespace": ns_id, "connected": e is not None,
                     "connected_since": e["connected_since"] if e else None,
                     "endpoints": sorted(e["endpoints"]) if e else [],
                     "connections": e["connections"] if e else 0,
                     "hubs": sorted(e["hubs"]) if e else []})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    clustered = any(row["hubs"] for row in rows)
    print(f"{'NAME':20} {'NAMESPACE':12} {'CONNECTED SINCE':20} {'CONNS':>5}  ENDPOINTS"
          + ("  HUBS" if clustered else ""))
    for row in rows:
        since = (datetime.datetime.fromtimestamp(row["connected_since"]).strftime("%Y-%m-%d %H:%M:%S")
                 if row["connected"] else "offline")
        print(f"{row['name']:20} {row['namespace']:12} {since:20} {row['connections']:>5}  "
              f"{','.join(row['endpoints'])}" + (f"  {','.join(row['hubs'])}" if clustered else ""))
    return 0


# --- forward and stdio ----------------------------------------------------------------------


def _log_warnings_to_stderr() -> None:
    """Show warnings and errors (a refused or failed connection...) on stderr, a line each."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _connect_endpoint(reactor: Any, description: str) -> Any:
    """The client endpoint of a CONNECT_ENDPOINT argument (:class:`CLIError` if it is not one)."""
    from twisted.internet import endpoints

    try:
        return endpoints.clientFromString(reactor, description)
    except ValueError as exc:
        raise CLIError(f"CONNECT_ENDPOINT: {exc}") from None


def _react(main: Callable[[Any], Coroutine[Any, Any, None]]) -> int:
    """Run ``main(reactor)`` under ``task.react``, Twisted's warnings on stderr; the exit
    status."""
    from twisted.internet import defer, task

    _log_warnings_to_stderr()
    try:
        task.react(lambda r: defer.ensureDeferred(main(r)))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cmd_forward(args: argparse.Namespace) -> int:
    from twisted.internet import defer, endpoints, reactor

    try:
        from sesame import _names as N

        listen = endpoints.serverFromString(reactor, N.with_backlog(args.listen))
    except ValueError as exc:
        raise CLIError(f"LISTEN_ENDPOINT: {exc}") from None
    connect = _connect_endpoint(reactor, args.connect)
    from sesame import _limits
    from sesame.relay import RelayFactory

    before, after = _limits.raise_open_file_limit()  # every forwarded connection is a file
    if after != before:
        print(f"sesame forward: raised the open-file limit from {before} to {after}",
              file=sys.stderr)

    async def main(_reactor: Any) -> None:
        port = await listen.listen(RelayFactory(connect))
        addr = port.getHost()
        if hasattr(addr, "host") and hasattr(addr, "port"):  # tcp: print HOST:PORT, not a repr
            from sesame import _names as N

            addr = N.join_host_port(addr.host, addr.port)
        print(f"forwarding {addr} -> {args.connect}", file=sys.stderr, flush=True)
        await defer.Deferred()  # until interrupted

    return _react(main)


def cmd_stdio(args: argparse.Namespace) -> int:
    from twisted.internet import reactor, stdio

    connect = _connect_endpoint(reactor, args.connect)
    from sesame.relay import StdioRelay

    async def main(_reactor: Any) -> None:
        relay = StdioRelay(connect)
        stdio.StandardIO(relay)
        await relay.done

    return _react(main)


# --- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sesame.tunnel import ReverseTunnelServer, TunnelHost, open_tunnel

    local = TunnelHost(default_registry())
    target = f"127.0.0.1:{local.start('127.0.0.1:0')}"
    try:
        ch = open_tunnel(target, dialect=args.dialect)
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        print(f"forward: Health/Check through a tunnel to {target} -> "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
        ch.close()
        rs = ReverseTunnelServer(target, default_registry(), dialect=args.dialect).start()
        local.wait_for_reverse(5)
        resp = health_pb2_grpc.HealthStub(local.reverse_channel()).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        print("reverse: the host called Health/Check on us through our reverse tunnel -> "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
        rs.stop(1)
    except grpc.RpcError as exc:
        raise CLIError(f"{exc.code().name}: {exc.details()}") from None
    finally:
        local.stop(0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``sesame`` command line: one subcommand per job (hub, remote, token, route,
    remotes, forward, stdio, demo), each with ``func`` set to the function that runs it."""
    p = argparse.ArgumentParser(prog="sesame", description="Reach what sits behind NAT "
                                "through a sesame hub.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hub", help="run the hub in the foreground (see `sesame hub --help`)",
                       add_help=False)
    h.add_argument("rest", nargs=argparse.REMAINDER)
    h.set_defaults(func=cmd_hub)
    r = sub.add_parser("remote", help="run a remote agent (see `sesame remote --help`)",
                       add_help=False)
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_remote)

    t = sub.add_parser("token", help="create, revoke or list tokens")
    tsub = t.add_subparsers(dest="action", required=True)
    for name in ("create", "revoke", "list"):
        tp = tsub.add_parser(name)
        tp.add_argument("--data-dir", help="the hub's data directory "
                        "(default $SESAME_DATA_DIR or ./.sesame)")
        tp.add_argument("--store", metavar="URL", help=STORE_HELP)
        if name == "create":
            tp.add_argument("--remote", help="a token that may register this remote name")
            tp.add_argument("--client", action="store_true",
                            help="a token that may reach remotes (all, or --remotes)")
            tp.add_argument("--admin", action="store_true", help="a management token")
            tp.add_argument("--remotes", help="glob of remote names a client token may reach")
            tp.add_argument("--namespace", help="namespace (default: default)")
        elif name == "revoke":
            tp.add_argument("token", help="the token, or its id (ses_<id>)")
    t.set_defaults(func=cmd_token)

    from sesame import _callcli, _routecli

    _routecli.add_parser(sub, DEFAULT_DATA_DIR)
    _callcli.add_parser(sub)

    f = sub.add_parser("forward", help="listen on one endpoint, connect each connection to another")
    f.add_argument("listen", metavar="LISTEN_ENDPOINT", help="e.g. tcp:2222:interface=127.0.0.1")
    f.add_argument("connect", metavar="CONNECT_ENDPOINT",
                   help="e.g. 'sesame:remote=edge-1:host=127.0.0.1:port=22'")
    f.set_defaults(func=cmd_forward)
    rm = sub.add_parser("remotes", help="list the remotes your token may reach")
    rm.add_argument("--hub", default=os.environ.get("SESAME_HUB"), help="HOST:PORT ($SESAME_HUB)")
    rm.add_argument("--ca", default=os.environ.get("SESAME_CA"), help="hub CA file ($SESAME_CA)")
    rm.add_argument("--token-file", help="token file (else $SESAME_TOKEN / $SESAME_TOKEN_FILE)")
    rm.add_argument("--namespace", help="only this namespace")
    rm.add_argument("--json", action="store_true", help="machine-readable output")
    rm.set_defaults(func=cmd_remotes)
    s = sub.add_parser("stdio", help="connect stdin/stdout to an endpoint (ssh ProxyCommand)")
    s.add_argument("connect", metavar="CONNECT_ENDPOINT")
    s.set_defaults(func=cmd_stdio)
    d = sub.add_parser("demo", help="show a tunnelled call in each direction, in-process")
    d.add_argument("--dialect", default="sesame", choices=["sesame", "grpctunnel"])
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sesame`` command with ``argv`` (default: ``sys.argv[1:]``) and return its
    exit status: what the subcommand returns (0 on success); 2 with one line on stderr
    (``sesame COMMAND: why``) for a :class:`CLIError` (bad arguments, unreachable hub,
    refused token, ...) and for usage errors (argparse); 130 on Ctrl-C."""
    # grpc's C core logs connection teardown at INFO on stderr; a CLI user
    # wants our messages, not those.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:  # before anything imports grpc: it reads its engine choice once (sesame._grpcio)
        _grpcio.choose_grpc_io()
    except ValueError as exc:
        print(f"sesame: {exc}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("hub", "remote"):
        # these take twistd-style options of their own (sesame.tap)
        args = argparse.Namespace(command=argv[0], rest=argv[1:],
                                  func=cmd_hub if argv[0] == "hub" else cmd_remote)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"sesame {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["CLIError", "build_parser", "json_log_observer", "main"]


if __name__ == "__main__":
    sys.exit(main())
