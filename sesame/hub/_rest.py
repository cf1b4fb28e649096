"""
JSON REST for gRPC services, from their descriptors' ``google.api.http``
annotations (the grpc-gateway conventions), as a twisted.web resource.

Nothing here knows a particular service: :class:`RestGateway` reads every
method's :class:`~google.api.http_pb2.HttpRule` (and its
``additional_bindings``), compiles the path templates
(``/v1alpha1/{parent=namespaces/*}/remotes``, ``{name=**}``, ``:verb``
suffixes), and turns an HTTP request into the method's request message:

* path variables set the fields they name (percent-decoded);
* ``body: "*"`` maps the whole JSON body onto the request, ``body: "field"``
  onto that field; no body rule means the body is ignored;
* every other field may come from the query string, by its JSON
  (``pageSize``) or proto (``page_size``) name, dotted for nested fields;
  repeated fields repeat the parameter; a FieldMask is comma-separated;
* for a PATCH whose request has an ``update_mask`` that the query does not
  give, the mask is the body's top-level JSON keys (as grpc-gateway does).

JSON goes through :mod:`google.protobuf.json_format` both ways.  The call
itself is ``call(method, request, token)``, a coroutine run on the bridge
loop (:meth:`sesame.bridge._loop.Bridge.deferred`), so the reactor never blocks.

Errors are Google JSON error bodies,
``{"error": {"code": 404, "message": ..., "status": "NOT_FOUND", "details": [...]}}``,
with the HTTP status of the gRPC code (``INVALID_ARGUMENT`` 400,
``UNAUTHENTICATED`` 401, ``PERMISSION_DENIED`` 403, ``NOT_FOUND`` 404,
``ALREADY_EXISTS`` 409, ...).  A path no binding matches is 404; a path that
matches only under other HTTP methods is 405 with ``Allow``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from google.rpc import status_pb2
from twisted.web import resource, server

from sesame.bridge import grpc_code

__all__ = ["HTTP_STATUS", "Binding", "RestGateway", "bindings", "compile_template",
           "error_json", "http_rules"]

log = logging.getLogger("sesame.rest")

Call = Callable[[MethodDescriptor, Message, "str | None"], Coroutine[Any, Any, Message]]

#: gRPC code → HTTP status (google/rpc/code.proto).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_VERBS = ("get", "put", "post", "delete", "patch")


class _BadRequest(Exception):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description

    def status(self) -> status_pb2.Status:
        from google.rpc import error_details_pb2

        st = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=str(self))
        if self.field:
            br = error_details_pb2.BadRequest()
            br.field_violations.add(field=self.field, description=self.description)
            st.details.add().Pack(br)
        return st


# --- rules and templates ----------------------------------------------------------------


def http_rules(method: MethodDescriptor) -> list[http_pb2.HttpRule]:
    """The method's ``google.api.http`` rule and its additional bindings (may be empty)."""
    opts = method.GetOptions()
    if not opts.HasExtension(annotations_pb2.http):
        # Options parsed before google.api.annotations was imported keep the
        # extension as unknown bytes; re-parse them.
        opts = descriptor_pb2.MethodOptions.FromString(opts.SerializeToString())
        if not opts.HasExtension(annotations_pb2.http):
            return []
    rule = opts.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _split_outside_braces(text: str, sep: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced '}'")
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError("unbalanced '{'")
    out.append("".join(cur))
    return out


def _segments_regex(segments: Sequence[str]) -> str:
    parts = []
    for s in segments:
        if s == "*":
            parts.append("[^/]+")
        elif s == "**":
            parts.append(".+")
        elif not s or any(c in s for c in "{}=*"):
            raise ValueError(f"bad path segment {s!r}")
        else:
            parts.append(re.escape(s))
    return "/".join(parts)


def compile_template(template: str) -> tuple[re.Pattern[str], list[tuple[str, str]]]:
    """A path template → (regex over the raw path, [(group, field path)]).

    Grammar (google/api/http.proto)::

        Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
        Segment  = "*" | "**" | LITERAL | Variable ;  Verb = ":" LITERAL ;
        Variable = "{" FieldPath [ "=" Segments ] "}" ;
    """
    if not template.startswith("/"):
        raise ValueError(f"template {template!r} must start with '/'")
    body, verb = template[1:], ""
    pieces = _split_outside_braces(body, ":")
    if len(pieces) > 2:
        raise ValueError(f"template {template!r} has more than one ':verb'")
    if len(pieces) == 2:
        body, verb = pieces
    regex, variables = [], []
    for seg in _split_outside_braces(body, "/"):
        if seg.startswith("{") and seg.endswith("}"):
            field, _, pattern = seg[1:-1].partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", field):
                raise ValueError(f"bad variable {seg!r} in {template!r}")
            group = f"v{len(variables)}"
            regex.append(f"(?P<{group}>{_segments_regex((pattern or '*').split('/'))})")
            variables.append((group, field))
        else:
            regex.append(_segments_regex([seg]))
    text = "/" + "/".join(regex) + (":" + re.escape(verb) if verb else "")
    return re.compile(text + r"\Z"), variables


@dataclass(frozen=True)
class Binding:
    """One HTTP route of one method."""

    method: MethodDescriptor
    verb: str  # GET, POST, ...
    template: str
    regex: re.Pattern[str]
    variables: tuple[tuple[str, str], ...]
    body: str
    response_body: str


def bindings(services: Iterable[ServiceDescriptor]) -> list[Binding]:
    """Every HTTP binding of every method; ValueError on a bad template or a clash."""
    out: list[Binding] = []
    seen: dict[tuple[str, str], str] = {}
    for svc in services:
        for m in svc.methods:
            for rule in http_rules(m):
                kind = rule.WhichOneof("pattern")
                if kind is None:
                    continue
                if kind == "custom":
                    verb, template = rule.custom.kind.upper(), rule.custom.path
                else:
                    verb, template = kind.upper(), getattr(rule, kind)
                regex, variables = compile_template(template)
                key = (verb, regex.pattern)
                if key in seen:
                    raise ValueError(f"{verb} {template} of {m.full_name} clashes with {seen[key]}")
                seen[key] = m.full_name
                out.append(Binding(m, verb, template, regex, tuple(variables), rule.body,
                                   rule.response_body))
    return out


# --- errors -----------------------------------------------------------------------------


def error_json(st: status_pb2.Status) -> tuple[int, bytes]:
    """A ``google.rpc.Status`` → (HTTP status, Google JSON error body)."""
    code = grpc_code(st.code)
    http = HTTP_STATUS.get(code, 500)
    details = []
    for d in st.details:
        try:
            details.append(json_format.MessageToDict(d))
        except (json_format.Error, TypeError, KeyError):  # a type we cannot resolve
            details.append({"@type": d.type_url})
    body = {"error": {"code": http, "message": st.message, "status": code.name,
                      "details": details}}
    return http, json.dumps(body, indent=2).encode() + b"\n"


def _simple_error(http: int, status: str, message: str) -> bytes:
    return json.dumps({"error": {"code": http, "message": message, "status": status,
                                 "details": []}}, indent=2).encode() + b"\n"


# --- requests -----------------------------------------------------------------------------


def _snake_to_camel(path: str) -> str:
    return ".".join(re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), p) for p in path.split("."))


def _resolve(desc: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """Field descriptors along ``a.b.c`` (JSON or proto names); KeyError if there is none."""
    fields = []
    for part in dotted.split("."):
        if desc is None:
            raise KeyError(dotted)
        f = desc.fields_by_name.get(part) or next(
            (x for x in desc.fields if x.json_name == part), None)
        if f is None:
            raise KeyError(dotted)
        fields.append(f)
        desc = f.message_type
    return fields


def _scalar_json(field: FieldDescriptor, text: str) -> Any:
    """A query/path string as the JSON value json_format expects for ``field``."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        low = text.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise _BadRequest(field.name, f"{text!r} is not a boolean")
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.FieldMask":
        return ",".join(_snake_to_camel(p.strip()) for p in text.split(",") if p.strip())
    return text  # json_format parses numbers, enums, Timestamps... from strings


_FAILED_FIELD = re.compile(r'Failed to parse (\w+) field')
_NO_FIELD = re.compile(r'has no field named "(\w+)" at "\w+((?:\.\w+)*)"')


def _parse_error_field(desc: Descriptor, message: str) -> str:
    """The request field (proto names, dotted) a json_format ParseError is about, or ""."""
    parts = _FAILED_FIELD.findall(message)
    unknown = _NO_FIELD.search(message)
    if unknown:  # 'Message type "X" has no field named "bogus" at "Req.remote"'
        parts = [p for p in unknown.group(2).split(".") if p] + [unknown.group(1)]
    names, d = [], desc
    for part in parts:
        f = None if d is None else (d.fields_by_name.get(part) or next(
            (x for x in d.fields if x.json_name == part), None))
        if f is None:  # not a field (an unknown key, a list index): name it as sent
            names.append(_snake_of(part))
            d = None
            continue
        names.append(f.name)
        d = f.message_type
    return ".".join(names)


def _snake_of(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _put(target: dict, fields: list[FieldDescriptor], value: Any) -> None:
    """Set ``value`` at the field path in a JSON dict, replacing either spelling of a key."""
    for f in fields[:-1]:
        sub = target.pop(f.name, None)
        sub = target.get(f.json_name, sub)
        if not isinstance(sub, dict):
            sub = {}
        target[f.json_name] = sub
        target = sub
    last = fields[-1]
    target.pop(last.name, None)
    target[last.json_name] = value


class RestGateway(resource.Resource):
    """A twisted.web leaf serving ``services`` as JSON REST; see the module docstring.

    :param call: ``call(method, request, token) -> coroutine`` of the response
        message; it raises an exception with a ``status()`` method returning a
        ``google.rpc.Status`` (such as :class:`sesame.hub.mgmt.ApiError`) to fail.
    :param token_of: the bearer token of a twisted.web request, or None.
    :param bridge: where ``call`` runs; the process-wide bridge by default.
    :param streams: streaming methods (full names) served by a twisted.web render function
        of their own, e.g. ``Sesame.Proxy`` (:class:`sesame.hub._proxyweb.RestProxy`); the other
        streaming methods are 501.
    """

    isLeaf = True

    def __init__(self, services: Iterable[ServiceDescriptor], call: Call,
                 token_of: Callable[[Any], str | None], bridge: Any = None,
                 streams: dict[str, Callable[[Any], Any]] | None = None) -> None:
        super().__init__()
        self.bindings = bindings(services)
        self._call = call
        self._token_of = token_of
        self._bridge = bridge
        #: streaming methods served by a render function of their own (full name → it)
        self.streams = dict(streams or {})

    # -- dispatch

    def render(self, request: Any) -> Any:
        try:
            path = request.path.decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(request, 400, "INVALID_ARGUMENT", "the path is not UTF-8")
        matches = [(b, m) for b in self.bindings if (m := b.regex.match(path))]
        if not matches:
            return self._fail(request, 404, "NOT_FOUND", f"no such resource path: {path}")
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            # a WebSocket (a GET upgrade) on a streaming method's path: its own face
            stream = next((self.streams[b.method.full_name] for b, _ in matches
                           if b.method.full_name in self.streams), None)
            if stream is not None:
                return stream(request)
        verb = request.method.decode("ascii", "replace").upper()
        chosen = next(((b, m) for b, m in matches if b.verb == verb), None)
        if chosen is None:
            allowed = sorted({b.verb for b, _ in matches})
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return self._fail(request, 405, "UNIMPLEMENTED",
                              f"{verb} is not allowed on {path} (allowed: {', '.join(allowed)})")
        binding, match = chosen
        if binding.method.client_streaming or binding.method.server_streaming:
            stream = self.streams.get(binding.method.full_name)
            if stream is not None:
                return stream(request)
            return self._fail(request, 501, "UNIMPLEMENTED",
                              f"{binding.method.full_name} is a streaming method, not served "
                              "over REST")
        try:
            message = self.build_request(binding, match, request)
        except _BadRequest as exc:
            return self._status(request, exc.status())
        except Exception:
            log.exception("cannot build a %s request", binding.method.full_name)
            return self._fail(request, 500, "INTERNAL", "internal error")
        from sesame.bridge import get_bridge

        bridge = self._bridge or get_bridge()
        gone: list[bool] = [False]
        request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))
        d = bridge.deferred(self._call(binding.method, message, self._token_of(request)))
        d.addCallbacks(lambda resp: self._respond(request, binding, resp, gone),
                       lambda f: self._failed(request, f, gone))
        return server.NOT_DONE_YET

    # -- request building

    def build_request(self, binding: Binding, match: re.Match[str], request: Any) -> Message:
        cls = message_factory.GetMessageClass(binding.method.input_type)
        desc = binding.method.input_type
        # The query string only: twisted.web also puts form-encoded bodies in request.args
        # (curl -d sends that content type), and the body is JSON whatever it says.
        query = parse_qs(urlsplit(request.uri).query.decode("utf-8", "replace"),
                         keep_blank_values=True)
        data: dict[str, Any] = {}
        bound: set[str] = set()  # top-level fields the path or the body set
        if binding.body:
            raw = b""
            if request.content is not None:
                request.content.seek(0)
                raw = request.content.read()
            if raw.strip():
                try:
                    payload = json.loads(raw)
                except ValueError as exc:
                    raise _BadRequest("", f"the request body is not JSON: {exc}") from None
                except RecursionError:
                    raise _BadRequest("", "the request body is nested too deeply") from None
                if binding.body == "*":
                    if not isinstance(payload, dict):
                        raise _BadRequest("", "the request body must be a JSON object")
                    data = payload
                else:
                    field = desc.fields_by_name.get(binding.body)
                    if field is None:
                        raise _BadRequest("", f"body field {binding.body!r} does not exist")
                    if (field.message_type is not None and not field.is_repeated
                            and not isinstance(payload, dict)
                            and not field.message_type.full_name.startswith("google.protobuf.")):
                        raise _BadRequest(field.name, "the request body must be a JSON object")
                    data[field.json_name] = payload
                    bound.add(field.name)
                    if (binding.verb == "PATCH" and isinstance(payload, dict)
                            and "update_mask" in desc.fields_by_name
                            and not any(k in query for k in ("updateMask", "update_mask"))):
                        mask = ",".join(_snake_to_camel(k) for k in payload)
                        data["updateMask"] = mask
        # the query string: every field the path and body do not bind
        path_fields = {f.split(".")[0] for _, f in binding.variables}
        for key, values in sorted(query.items()):
            try:
                fields = _resolve(desc, key)
            except KeyError:
                raise _BadRequest(key, "unknown query parameter") from None
            top = fields[0].name
            if binding.body == "*" or top in bound or top in path_fields:
                raise _BadRequest(key, "set by the path or the body, not the query string")
            last = fields[-1]
            if any(f.is_repeated for f in fields[:-1]):
                raise _BadRequest(key, "cannot be set from the query string")
            if last.is_repeated:
                value: Any = [_scalar_json(last, v) for v in values]
            else:
                value = _scalar_json(last, values[-1])
            _put(data, fields, value)
        # the path variables win
        for group, field_path in binding.variables:
            try:
                fields = _resolve(desc, field_path)
            except KeyError:
                raise _BadRequest(field_path, "not a field of the request") from None
            _put(data, fields, unquote(match.group(group)))
        try:
            return json_format.ParseDict(data, cls())
        except json_format.ParseError as exc:
            raise _BadRequest(_parse_error_field(desc, str(exc)), str(exc)) from None
        except RecursionError:
            raise _BadRequest("", "the request is nested too deeply") from None

    # -- responses

    def _respond(self, request: Any, binding: Binding, resp: Message, gone: list[bool]) -> None:
        if gone[0]:
            return
        out = getattr(resp, binding.response_body) if binding.response_body else resp
        body = json.dumps(json_format.MessageToDict(out), indent=2).encode() + b"\n"
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.write(body)
        request.finish()

    def _failed(self, request: Any, failure: Any, gone: list[bool]) -> None:
        if gone[0]:
            return
        status = getattr(failure.value, "status", None)
        if callable(status):
            st = status()
        else:
            log.error("REST call failed: %s", failure.getTraceback())
            st = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
        request.write(self._status(request, st))
        request.finish()

    def _status(self, request: Any, st: status_pb2.Status) -> bytes:
        """Set the response code and headers for ``st``; returns the JSON error body."""
        http, body = error_json(st)
        request.setResponseCode(http)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if http == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="sesame"')
        return body

    def _fail(self, request: Any, http: int, status: str, message: str) -> bytes:
        request.setResponseCode(http)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return _simple_error(http, status, message)
