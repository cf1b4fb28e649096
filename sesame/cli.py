"""
The ``sesame`` command.

Until the hub lands this offers the tunnel layer on its own:

* ``sesame host``  — a tunnel host on loopback serving gRPC health and
  reflection on forward tunnels and accepting reverse tunnels;
* ``sesame demo``  — dial a host both ways and show a call in each
  direction (forward: we call the host; reverse: the host calls us).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sesame.tunnel import ServiceRegistry

DEFAULT_LISTEN = "127.0.0.1:7443"


def _registry() -> ServiceRegistry:

    reg = ServiceRegistry()
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, reg)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), reg)
    return reg


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def cmd_host(args: argparse.Namespace) -> int:
    from sesame.tunnel import TunnelHost

    if not _is_loopback(args.listen):
        print(f"sesame host: refusing to listen on {args.listen} without TLS; "
              "only loopback addresses are allowed until the hub (with TLS and tokens) lands",
              file=sys.stderr)
        return 2
    host = TunnelHost(_registry(), on_reverse_open=lambda ch, md: print(
        "reverse tunnel opened", flush=True))
    try:
        port = host.start(args.listen)
    except RuntimeError as exc:
        print(f"sesame host: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    where = f"{args.listen.rsplit(':', 1)[0]}:{port}"
    print(f"sesame tunnel host listening on {where} (dialects: sesame.type, grpctunnel.v1)")
    print("next, in another terminal:")
    print(f"  .venv/bin/sesame demo --target {where}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    host.stop(1)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sesame.tunnel import ReverseTunnelServer, TunnelHost, open_tunnel

    target = args.target
    local = None
    if target is None:
        local = TunnelHost(_registry())
        target = f"127.0.0.1:{local.start('127.0.0.1:0')}"
    try:
        ch = open_tunnel(target, dialect=args.dialect)
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        print(f"forward: Health/Check through a tunnel to {target} -> "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
        ch.close()
        if local is not None:
            rs = ReverseTunnelServer(target, _registry(), dialect=args.dialect).start()
            local.wait_for_reverse(5)
            resp = health_pb2_grpc.HealthStub(local.reverse_channel()).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            print("reverse: the host called Health/Check on us through our reverse tunnel -> "
                  f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
            rs.stop(1)
    except grpc.RpcError as exc:
        print(f"sesame demo: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        if local is not None:
            local.stop(0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sesame", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("host", help="run a tunnel host on loopback")
    h.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; loopback only)")
    h.set_defaults(func=cmd_host)
    d = sub.add_parser("demo", help="show a call in each tunnel direction")
    d.add_argument("--target", help="HOST:PORT of a running `sesame host` (default: start one)")
    d.add_argument("--dialect", default="sesame", choices=["sesame", "grpctunnel"])
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # grpc's C core logs connection teardown at INFO on stderr; a CLI user
    # wants our messages, not those.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
