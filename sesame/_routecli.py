"""
``sesame route add|rm|ls``: front-door routes in the hub's store.

Like ``sesame token``, it works on the store in ``--data-dir`` (or the one
``--store URL`` names: ``redis://HOST:PORT/DB``) directly; a running hub applies the
change within its watch interval (2 s) — no restart — and the management API
applies it at once.  Targets are checked here so a
typo is one clear line, not a dead route.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

KINDS_HELP = (
    "tcp: MATCH is a port (bound on the hub's --front-interface) or a Twisted server endpoint "
    "such as tcp:9000:interface=0.0.0.0; http: a Host name or *.domain (via --vhost); "
    "sni: a TLS server name or *.domain (via --sni); grpc: an :authority host (via --grpc-door)"
)


def add_parser(sub: Any, default_data_dir: str) -> None:
    r = sub.add_parser("route", help="add, remove or list front-door routes",
                       description="Front-door routes: public listeners on the hub that lead to "
                       "an endpoint of a remote (ENDPOINT@REMOTE) or an address the remote "
                       "dials (HOST:PORT@REMOTE). " + KINDS_HELP)
    rsub = r.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", help="add a route", epilog="examples: "
                          "sesame route add http web.edge-1.example web@edge-1;  "
                          "sesame route add tcp 2222 127.0.0.1:22@edge-1;  "
                          "sesame route add sni secure.example 127.0.0.1:443@edge-1")
    add.add_argument("kind", choices=("tcp", "http", "sni", "grpc"))
    add.add_argument("match", help="port / endpoint (tcp), host name (http, sni, grpc)")
    add.add_argument("target", help="ENDPOINT@REMOTE or HOST:PORT@REMOTE")
    rm = rsub.add_parser("rm", help="remove a route by id")
    rm.add_argument("id", help="the route id (rt_...) that `sesame route ls` shows")
    ls = rsub.add_parser("ls", help="list routes")
    ls.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    from sesame._cliutil import STORE_HELP

    for p in (add, rm, ls):
        p.add_argument("--data-dir", help="the hub's data directory "
                       f"(default $SESAME_DATA_DIR or {default_data_dir})")
        p.add_argument("--store", metavar="URL", help=STORE_HELP)
    r.set_defaults(func=cmd_route)


def cmd_route(args: argparse.Namespace) -> int:
    from sesame._cliutil import CLIError, open_store
    from sesame.hub import parse_target
    from sesame.hub.store import StoreError

    store = open_store(args.data_dir, args.store)
    try:
        if args.action == "add":
            try:
                parse_target(args.target)
            except ValueError as exc:
                raise CLIError(f"add: {exc}") from None
            rec = store.create_route(args.kind, args.match, args.target)
            print(rec.id)
        elif args.action == "rm":
            store.delete_route(args.id)
            print(f"removed {args.id}", file=sys.stderr)
        else:
            routes = store.list_routes()
            if args.json:
                print(json.dumps([{"id": r.id, "kind": r.kind, "match": r.match,
                                   "target": r.target, "created": r.created} for r in routes]))
            else:
                for r in routes:
                    print(f"{r.id}\t{r.kind}\t{r.match}\t{r.target}")
    except StoreError as exc:
        raise CLIError(f"{args.action}: {exc}") from None
    finally:
        store.close()
    return 0


#: HubOptions parameters for the front doors (sesame/tap.py adds them).
HUB_OPTIONS = [
    ["vhost", None, None,
     "HTTP front door: route requests by Host header (`sesame route add http ...`) on this "
     "Twisted server endpoint, e.g. tcp:8000:interface=0.0.0.0 or ssl:8443:privateKey=...; "
     "default: off."],
    ["sni", None, None,
     "TLS passthrough front door: route by the ClientHello server name without terminating "
     "TLS (`sesame route add sni ...`); default: off."],
    ["grpc-door", None, None,
     "HTTP/2 gRPC front door: route by :authority (`sesame route add grpc ...`); "
     "tls:PORT[:interface=0.0.0.0] serves TLS with the hub's certificate and ALPN h2 "
     "(certKey=/privateKey= for another); tcp:... is plain text; default: off."],
    ["front-interface", None, "127.0.0.1",
     "Where tcp routes given as a bare port listen (default 127.0.0.1; 0.0.0.0 to publish)."],
    ["forwarded", None, "replace",
     "X-Forwarded-For/-Proto/-Host on vhost requests: replace (drop what the client sent), "
     "append (to a trusted proxy's), or off."],
]


def check_hub_options(options: Any) -> None:
    """Usage errors for the front-door options (endpoint syntax is checked without listening)."""
    from twisted.python import usage

    from sesame.hub.frontdoor import FORWARDED_MODES

    if options["forwarded"] not in FORWARDED_MODES:
        raise usage.UsageError(f"--forwarded: one of {', '.join(FORWARDED_MODES)}, "
                               f"not {options['forwarded']!r}")
    from sesame.hub.store import server_description_problem

    for key in ("vhost", "sni", "grpc-door"):
        desc = options[key]
        if not desc:
            continue
        if desc.isdigit():  # digits of any script: meant as a bare port
            from sesame import _names as N

            try:  # ASCII digits only: "٢٢" is not port 22
                port = N.parse_port(desc, f"--{key}", low=0)
            except ValueError as exc:
                raise usage.UsageError(str(exc)) from None
            desc = options[key] = f"tcp:{port}:interface={options['front-interface']}"
        if desc.startswith("tls:"):  # our own: TLS with the hub's certificate, ALPN h2
            from sesame.hub.frontdoor import parse_tls_description

            try:
                parse_tls_description(desc)
            except ValueError as exc:
                raise usage.UsageError(f"--{key}: {exc}") from None
            continue
        why = server_description_problem(desc)
        if why:
            raise usage.UsageError(f"--{key}: {desc!r} is not a Twisted server endpoint: {why}")


def front_doors(hub: Any, store: Any, options: Any, reactor: Any, *,
                reuse_port: bool = False, tls_material: tuple[bytes, bytes] | None = None) -> Any:
    from sesame.hub.frontdoor import FrontDoors

    listeners = {kind: options[key] for kind, key in
                 (("http", "vhost"), ("sni", "sni"), ("grpc", "grpc-door")) if options[key]}
    return FrontDoors(hub, store, reactor, listeners=listeners,
                      tcp_interface=options["front-interface"], forwarded=options["forwarded"],
                      reuse_port=reuse_port, tls_material=tls_material)


__all__ = ["HUB_OPTIONS", "add_parser", "check_hub_options", "cmd_route", "front_doors"]
