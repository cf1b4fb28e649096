"""
``sesame call REMOTE[/ENDPOINT] METHOD [JSON]``: call an API on a remote, by name,
through the hub's ``Sesame/Proxy`` — grpcurl for devices behind NAT.

* ``METHOD`` is ``package.Service/Method`` (or ``/package.Service/Method``,
  ``package.Service.Method``); ``list`` lists the endpoint's services and
  ``describe SYMBOL`` shows a service, method or message, both from the
  device's own gRPC reflection (asked through the same Proxy);
* the request is the ``JSON`` argument (several objects one after another for a
  client stream), else stdin: one JSON object per line, each sent as it is read
  (a unary call with nothing on stdin sends ``{}``);
* responses are printed one JSON object per line as they come; ``-v`` adds the
  response headers and trailers (on stderr);
* the exit status is 0 when the call ends OK, 64 + the gRPC code when it does
  not (as grpcurl does: 64 + 5 = 69 for NOT_FOUND), the status and its
  ``google.rpc`` details printed readably on stderr; 2 for usage and
  connection errors.

``ENDPOINT`` defaults to ``netconn`` (the one every remote has).  The hub, CA and
token come from ``--hub``/``--ca``/``--token-file`` or ``$SESAME_HUB``,
``$SESAME_CA``, ``$SESAME_TOKEN``/``$SESAME_TOKEN_FILE``, as for ``sesame remotes``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_BASE = 64  # exit status = 64 + the gRPC code of a call that did not end OK


class _CallFailed(Exception):
    """A proxied call ended with a non-OK status (already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "call", help="call a gRPC method on a remote through the hub (JSON in and out)",
        description="Call a gRPC API served by a remote, by name, through the hub "
        "(Sesame/Proxy): JSON in (argument, or stdin lines for a client stream), one JSON "
        "object per response line out.  Types come from the device's gRPC reflection.",
        epilog="examples: sesame call edge-1/api grpc.health.v1.Health/Check '{}';  "
               "sesame call edge-1/api list;  sesame call edge-1/api describe "
               "grpc.health.v1.Health.  Exit status: 0 OK, 64+code when the call fails "
               "(69 NOT_FOUND, 78 UNAVAILABLE...), 2 for usage/connection errors.")
    c.add_argument("target", metavar="REMOTE[/ENDPOINT]",
                   help="a remote name (or namespaces/NS/remotes/R), then /ENDPOINT "
                        "(default: netconn)")
    c.add_argument("method", metavar="METHOD",
                   help="package.Service/Method, or list, or describe")
    c.add_argument("data", metavar="JSON|SYMBOL", nargs="?",
                   help="the request as JSON (several objects for a client stream; default: "
                        "stdin); for describe, the service, method or message")
    c.add_argument("--hub", default=os.environ.get("SESAME_HUB"), help="HOST:PORT ($SESAME_HUB)")
    c.add_argument("--ca", default=os.environ.get("SESAME_CA"), help="hub CA file ($SESAME_CA)")
    c.add_argument("--token-file", help="token file (else $SESAME_TOKEN / $SESAME_TOKEN_FILE)")
    c.add_argument("-H", "--header", action="append", default=[], metavar="'KEY: VALUE'",
                   help="request metadata for the inner call (repeatable)")
    c.add_argument("--timeout", type=float, default=None,
                   help="seconds the call may take (its deadline reaches the device)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="also print response headers and trailers (stderr)")
    c.set_defaults(func=cmd_call)


def _target(text: str) -> tuple[str, str, str]:
    """``(namespace, remote, endpoint)`` of ``REMOTE[/ENDPOINT]``."""
    from sesame import _names as N
    from sesame._cliutil import CLIError

    if text.startswith("namespaces/"):  # namespaces/NS/remotes/R[/ENDPOINT]
        parts = text.split("/")
        remote_text, endpoint = "/".join(parts[:4]), "/".join(parts[4:])
    else:
        remote_text, _, endpoint = text.partition("/")
    try:
        ns, remote = N.parse_remote(remote_text)
    except ValueError as exc:
        raise CLIError(f"REMOTE: {exc}") from None
    endpoint = endpoint or N.NETCONN_ENDPOINT
    if not N.valid_name(endpoint):
        raise CLIError(f"ENDPOINT: {endpoint!r} is not an endpoint name")
    return ns, remote, endpoint


class _Client:
    """``Sesame/Proxy`` calls to one endpoint, over one channel to the hub."""

    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        from sesame._cliutil import hub_config_of

        self.cfg = hub_config_of(args)
        creds = self.cfg.credentials()
        opts = [("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20)]
        self.channel = (grpc.secure_channel(self.cfg.target, creds, options=opts) if creds
                        else grpc.insecure_channel(self.cfg.target, options=opts))
        self.ns, self.remote, self.endpoint = _target(args.target)
        self.timeout = args.timeout
        self.verbose = args.verbose

    @property
    def endpoint_name(self) -> str:
        from sesame.hub.proxy import endpoint_name

        return endpoint_name(self.ns, self.remote, self.endpoint)

    def proxy(self, method: str, requests: Iterator[Any], header: Any = None,
              timeout: float | None = None) -> Iterator[Any]:
        """The ProxyResponses of one call (after ``conn``); a ``_CallFailed`` or CLIError
        (printed) when it fails."""
        import grpc

        from sesame._cliutil import CLIError
        from sesame.v1alpha1 import sesame_pb2

        def reqs() -> Iterator[Any]:
            yield sesame_pb2.ProxyRequest(dial=sesame_pb2.ProxyRequest.Dial(
                endpoint=self.endpoint_name, method=method))
            if header is not None:
                yield sesame_pb2.ProxyRequest(header=header)
            for m in requests:
                yield _content(m)

        stub = self.channel.stream_stream(
            "/sesame.v1alpha1.Sesame/Proxy", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=sesame_pb2.ProxyResponse.FromString)
        call = stub(reqs(), metadata=self.cfg.metadata(), timeout=timeout)
        try:
            for resp in call:
                kind = resp.WhichOneof("data")
                if kind == "conn":
                    continue
                if kind == "error":
                    _print_status(resp.error)
                    raise _CallFailed(resp.error.code)
                yield resp
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE,) and "connect" in (exc.details() or "").lower():
                raise CLIError(f"UNAVAILABLE: {exc.details()}") from None
            from grpc_status import rpc_status

            st = rpc_status.from_call(exc)
            if st is None:
                from google.rpc import status_pb2

                st = status_pb2.Status(code=code.value[0], message=exc.details() or "")
            _print_status(st)
            raise _CallFailed(st.code) from None

    def schema(self, symbol: str, quiet: bool = False) -> Any:
        """The device's schema declaring ``symbol`` (a service or a message), via
        reflection through the Proxy; with ``quiet``, None when the device does not know
        the symbol (else that is an error, printed)."""
        from grpc_reflection.v1alpha import reflection_pb2

        from sesame.hub.proxy import Schema

        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        for resp in self.proxy("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               iter([req]), timeout=self.timeout or 30):
            if resp.WhichOneof("data") != "content":
                continue
            ans = reflection_pb2.ServerReflectionResponse()
            resp.content.Unpack(ans)
            if ans.HasField("error_response"):
                if quiet:
                    return None
                _say(f"ERROR: {_code_name(ans.error_response.error_code)}: the device knows no "
                     f"symbol {symbol}")
                raise _CallFailed(ans.error_response.error_code or 5)
            return Schema(ans.file_descriptor_response.file_descriptor_proto)
        _say(f"ERROR: the device's reflection gave no answer for {symbol}")
        raise _CallFailed(14)

    def services(self) -> list[str]:
        from grpc_reflection.v1alpha import reflection_pb2

        req = reflection_pb2.ServerReflectionRequest(list_services="")
        for resp in self.proxy("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               iter([req]), timeout=self.timeout or 30):
            if resp.WhichOneof("data") == "content":
                ans = reflection_pb2.ServerReflectionResponse()
                resp.content.Unpack(ans)
                return sorted(s.name for s in ans.list_services_response.service)
        return []


def _content(msg: Any) -> Any:
    from google.protobuf import any_pb2

    from sesame.v1alpha1 import sesame_pb2

    a = any_pb2.Any()
    a.Pack(msg)
    return sesame_pb2.ProxyRequest(content=a)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _code_name(code: int) -> str:
    import grpc

    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.name
    return f"CODE {code}"


def _print_status(st: Any) -> None:
    """``ERROR: NOT_FOUND: message`` and each detail, readably, on stderr."""
    from google.protobuf import json_format
    from google.rpc import error_details_pb2  # noqa: F401 - puts the detail types in the pool

    _say(f"ERROR: {_code_name(st.code)}: {st.message}")
    for d in st.details:
        try:
            shown = json.dumps(json_format.MessageToDict(d), sort_keys=True)
        except (TypeError, KeyError, json_format.Error):
            shown = f"{d.type_url} ({len(d.value)} bytes)"
        _say(f"  detail: {shown}")


def _headers(pairs: list[str]) -> Any:
    from sesame._cliutil import CLIError
    from sesame.hub.proxy import metadata_pb

    md = []
    for p in pairs:
        k, sep, v = p.partition(":")
        if not sep or not k.strip():
            raise CLIError(f"-H {p!r}: expected 'KEY: VALUE'")
        k, v = k.strip().lower(), v.strip()
        md.append((k, v.encode() if k.endswith("-bin") else v))
    return metadata_pb(md) if md else None


def _requests(cls: type, data: str | None, streaming: bool) -> Iterator[Any]:
    """Request messages from the argument, else stdin (lines, read as they come)."""
    from google.protobuf import json_format

    from sesame._cliutil import CLIError
    from sesame.hub.proxy import parse_json_stream

    def one(obj: Any, where: str) -> Any:
        msg = cls()
        try:
            json_format.ParseDict(obj, msg)
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise CLIError(f"{where} is not a {cls.DESCRIPTOR.full_name}: {exc}") from None
        return msg

    if data is not None:
        try:
            objs = parse_json_stream(data.encode())
        except Exception as exc:  # noqa: BLE001 - ApiError: its message says what is wrong
            raise CLIError(f"JSON: {getattr(exc, 'message', exc)}") from None
        if not streaming and len(objs) != 1:
            raise CLIError(f"JSON: this method takes one request, not {len(objs)}")
        for i, obj in enumerate(objs, 1):
            yield one(obj, f"JSON request {i}")
        return
    if sys.stdin is None or sys.stdin.isatty():
        if streaming:
            raise CLIError("give the requests as JSON, on the command line or on stdin")
        yield cls()
        return
    n = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        n += 1
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CLIError(f"stdin line {n} is not JSON: {exc}") from None
        yield one(obj, f"stdin line {n}")
    if n == 0 and not streaming:
        yield cls()


def _until_bad(requests: Iterator[Any], bad: list[Exception]) -> Iterator[Any]:
    """``requests`` until one cannot be made (kept in ``bad``: an exception inside grpc's
    request iteration would only show as UNKNOWN)."""
    try:
        yield from requests
    except Exception as exc:  # noqa: BLE001 - CLIError and friends, reported after the call
        bad.append(exc)


def _describe(schema: Any, symbol: str) -> str:
    """A readable, proto-like description of a service, method or message."""
    pool = schema.pool
    try:
        svc = pool.FindServiceByName(symbol)
    except KeyError:
        svc = None
    if svc is not None:
        lines = [f"service {svc.full_name} {{"]
        for m in svc.methods:
            lines.append(f"  {_method_line(m)}")
        return "\n".join([*lines, "}"])
    service, _, name = symbol.rpartition(".")
    try:
        m = pool.FindServiceByName(service).methods_by_name.get(name)
    except KeyError:
        m = None
    if m is not None:
        return _method_line(m, qualified=True)
    d = pool.FindMessageTypeByName(symbol)
    lines = [f"message {d.full_name} {{"]
    for f in d.fields:
        label = "repeated " if f.is_repeated else ""
        kind = (f.message_type.full_name if f.message_type is not None
                else f.enum_type.full_name if f.enum_type is not None
                else _SCALARS.get(f.type, str(f.type)))
        lines.append(f"  {label}{kind} {f.name} = {f.number};")
    return "\n".join([*lines, "}"])


_SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
            7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
            16: "sfixed64", 17: "sint32", 18: "sint64"}


def _method_line(m: Any, qualified: bool = False) -> str:
    cs = "stream " if m.client_streaming else ""
    ss = "stream " if m.server_streaming else ""
    name = m.full_name if qualified else m.name
    return (f"rpc {name}({cs}{m.input_type.full_name}) returns "
            f"({ss}{m.output_type.full_name});")


def cmd_call(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from sesame._cliutil import CLIError
    from sesame.hub.proxy import parse_method

    client = _Client(args)
    bad: list[Exception] = []
    try:
        with client.channel:
            if args.method == "list":
                for name in client.services():
                    print(name, flush=True)
                return 0
            if args.method == "describe":
                if not args.data:
                    raise CLIError("describe needs a SYMBOL (a service, method or message)")
                symbol = args.data.lstrip("/").replace("/", ".")
                # reflection finds services and messages, not methods: then the service
                schema = (client.schema(symbol, quiet=True)
                          or client.schema(symbol.rpartition(".")[0] or symbol))
                try:
                    print(_describe(schema, symbol), flush=True)
                except KeyError:
                    raise CLIError(f"the device knows no service, method or message "
                                   f"{symbol}") from None
                return 0
            try:
                service, name = parse_method(args.method)
            except ValueError as exc:
                raise CLIError(f"METHOD: {exc}") from None
            schema = client.schema(service)
            method = schema.method(service, name)
            if method is None:
                _say(f"ERROR: INVALID_ARGUMENT: service {service} on {client.endpoint_name} "
                     f"has no method {name}")
                return EXIT_BASE + 3
            in_cls = schema.message_class(method.input_type.full_name)
            out_cls = schema.message_class(method.output_type.full_name)
            if args.data is not None:  # all of it checked before the call starts
                requests: Any = list(_requests(in_cls, args.data, method.client_streaming))
            else:  # stdin: each line sent as it is read; a bad one ends the requests
                requests = _until_bad(_requests(in_cls, None, method.client_streaming), bad)
            header = _headers(args.header)
            lock = threading.Lock()
            for resp in client.proxy(f"/{service}/{name}", iter(requests), header,
                                     args.timeout):
                kind = resp.WhichOneof("data")
                if kind == "content":
                    msg = out_cls()
                    resp.content.Unpack(msg)
                    with lock:
                        print(json.dumps(json_format.MessageToDict(msg), separators=(",", ":")),
                              flush=True)
                elif args.verbose and kind in ("header", "trailer"):
                    md = json_format.MessageToDict(getattr(resp, kind))
                    _say(f"{kind}: {json.dumps(md.get('data', {}), sort_keys=True)}")
            if bad:
                raise bad[0]
            return 0
    except _CallFailed as exc:
        if bad:  # the call failed because a request could not be read: say that
            raise bad[0] from None
        return EXIT_BASE + exc.code


__all__ = ["EXIT_BASE", "add_parser", "cmd_call"]
