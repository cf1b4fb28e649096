"""
``Sesame/Proxy`` through a real hub to a real remote serving the interop TestService
(and Health), every streaming shape, with grpcio as the client over the hub's TLS.

Everything blocking (grpcio's synchronous client) runs in a thread; the hub and the
remote run on the bridge loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
import pytest_twisted
from google.protobuf import any_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from twisted.internet import threads

from sesame.hub.proxy import Schema, parse_endpoint, parse_method
from sesame.testing import interop_pb2
from sesame.testing.hub import HubFixture
from sesame.testing.interop import AsyncInteropServicer, add_async_servicer
from sesame.tunnel import ServiceRegistry
from sesame.v1alpha1 import sesame_pb2

PROXY = "/sesame.v1alpha1.Sesame/Proxy"
EP = "namespaces/default/remotes/dev-1/endpoints/api"
TS = "sesame.testing.TestService"
MIB = 1024 * 1024


class Device(AsyncInteropServicer):
    """The interop servicer, telling the test what the device saw."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []
        self.cancelled = threading.Event()
        self.unary_bytes: list[str] = []

    async def UnaryCall(self, request, context):  # type: ignore[override]
        self.deadlines.append(context.time_remaining())
        self.unary_bytes.append(hashlib.sha256(request.payload.body).hexdigest())
        try:
            return await super().UnaryCall(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def FullDuplexCall(self, request_iterator, context):  # type: ignore[override]
        try:
            async for r in super().FullDuplexCall(request_iterator, context):
                yield r
        except (asyncio.CancelledError, GeneratorExit):  # (stopped while it waited to yield)
            self.cancelled.set()
            raise


def registry(device: Device) -> ServiceRegistry:
    reg = ServiceRegistry()
    add_async_servicer(reg, device)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, reg)
    return reg


class Lab:
    hub: HubFixture
    device: Device
    token: str
    other: str
    channel: grpc.Channel


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    lab = Lab()
    lab.hub = HubFixture(tmp_path_factory.mktemp("proxy"))
    pytest_twisted.blockon(lab.hub.start())
    lab.device = Device()
    pytest_twisted.blockon(lab.hub.start_remote("dev-1", offers={"api": registry(lab.device)}))
    pytest_twisted.blockon(lab.hub.start_remote(
        "dev-2", offers={"api": registry(Device())}, reflection=False))
    lab.token = lab.hub.client_token()
    lab.other = lab.hub.client_token(pattern="other-*")
    creds = grpc.ssl_channel_credentials(lab.hub.tls.ca_pem)
    lab.channel = grpc.secure_channel(lab.hub.target, creds, options=[
        ("grpc.max_receive_message_length", 8 * MIB), ("grpc.max_send_message_length", 8 * MIB)])
    try:
        yield lab
    finally:
        lab.channel.close()
        pytest_twisted.blockon(lab.hub.stop())


def dial(method: str, endpoint: str = EP, mask: Sequence[str] = ()) -> sesame_pb2.ProxyRequest:
    d = sesame_pb2.ProxyRequest.Dial(endpoint=endpoint, method=method)
    if mask:
        d.conn_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(mask)))
    return sesame_pb2.ProxyRequest(dial=d)


def content(msg: Any) -> sesame_pb2.ProxyRequest:
    a = any_pb2.Any()
    a.Pack(msg)
    return sesame_pb2.ProxyRequest(content=a)


class Result:
    def __init__(self) -> None:
        self.responses: list[sesame_pb2.ProxyResponse] = []
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.status: status_pb2.Status | None = None

    def kinds(self) -> list[str]:
        return [r.WhichOneof("data") for r in self.responses]

    def contents(self, cls: type) -> list[Any]:
        out = []
        for r in self.responses:
            if r.WhichOneof("data") == "content":
                m = cls()
                assert r.content.Unpack(m), r.content.type_url
                out.append(m)
        return out

    @property
    def error(self) -> status_pb2.Status | None:
        errs = [r.error for r in self.responses if r.WhichOneof("data") == "error"]
        assert len(errs) <= 1
        return errs[0] if errs else None


def _call(lab: Lab, requests: Any, token: str | None = None, timeout: float = 30,
          on_response: Any = None) -> Result:
    res = Result()
    stub = lab.channel.stream_stream(PROXY, request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=sesame_pb2.ProxyResponse.FromString)
    md = (("authorization", f"Bearer {token or lab.token}"),)
    call = stub(iter(requests), metadata=md, timeout=timeout)
    try:
        for r in call:
            res.responses.append(r)
            if on_response is not None:
                on_response(r, call)
    except grpc.RpcError as exc:
        res.code, res.details = exc.code(), exc.details()
        res.status = rpc_status.from_call(exc)
    return res


def call(lab: Lab, requests: Any, **kw: Any) -> Any:
    return threads.deferToThread(_call, lab, list(requests), **kw)


def test_method_and_endpoint_names() -> None:
    for text in ("/grpc.health.v1.Health/Check", "grpc.health.v1.Health/Check",
                 "grpc.health.v1.Health.Check"):
        assert parse_method(text) == ("grpc.health.v1.Health", "Check")
    for bad in ("", "Check", "/a/b/c", "a b.C", "grpc.health.v1.Health/", "/.x/Y"):
        with pytest.raises(ValueError, match="is not a gRPC method"):
            parse_method(bad)
    assert parse_endpoint(EP) == ("default", "dev-1", "api")
    assert parse_endpoint("api@namespaces/lab/remotes/dev-9") == ("lab", "dev-9", "api")
    for bad in ("", "dev-1", "127.0.0.1:80@dev-1", "namespaces/x/remotes/y"):
        with pytest.raises(ValueError, match="is not an endpoint"):
            parse_endpoint(bad)
    with pytest.raises(ValueError, match="dependency b.proto is missing"):
        from google.protobuf import descriptor_pb2

        f = descriptor_pb2.FileDescriptorProto(name="a.proto", dependency=["b.proto"])
        Schema([f.SerializeToString()])


@pytest_twisted.ensureDeferred
async def test_unary_with_conn_header_content_and_no_error(lab: Lab) -> None:
    res = await call(lab, [dial("/grpc.health.v1.Health/Check"),
                           content(health_pb2.HealthCheckRequest())])
    assert res.code == grpc.StatusCode.OK, res.details
    assert res.kinds()[0] == "conn"
    conn = res.responses[0].conn
    assert (conn.namespace.name, conn.remote.name, conn.endpoint.name) == (
        "namespaces/default", "namespaces/default/remotes/dev-1", EP)
    assert [m.status for m in res.contents(health_pb2.HealthCheckResponse)] == [
        health_pb2.HealthCheckResponse.SERVING]
    assert res.responses[1].WhichOneof("data") == "header"
    assert res.error is None
    # the Any names the output type as the device's reflection described it
    [c] = [r.content for r in res.responses if r.WhichOneof("data") == "content"]
    assert c.type_url == "type.googleapis.com/grpc.health.v1.HealthCheckResponse"


@pytest_twisted.ensureDeferred
async def test_conn_mask_filters_conn_and_a_bad_mask_is_invalid(lab: Lab) -> None:
    res = await call(lab, [dial("grpc.health.v1.Health.Check", mask=["remote"]),
                           content(health_pb2.HealthCheckRequest())])
    assert res.code == grpc.StatusCode.OK, res.details
    conn = res.responses[0].conn
    assert conn.remote.name == "namespaces/default/remotes/dev-1"
    assert not conn.HasField("namespace") and not conn.HasField("endpoint")
    res = await call(lab, [dial("grpc.health.v1.Health/Check", mask=["remotes"])])
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dial.conn_mask" in res.details and res.responses == []


@pytest_twisted.ensureDeferred
async def test_server_streaming(lab: Lab) -> None:
    req = interop_pb2.StreamingOutputCallRequest(
        response_parameters=[interop_pb2.ResponseParameters(size=n) for n in (1, 10, 100)])
    res = await call(lab, [dial(f"/{TS}/StreamingOutputCall"), content(req)])
    assert res.code == grpc.StatusCode.OK, res.details
    got = res.contents(interop_pb2.StreamingOutputCallResponse)
    assert [len(m.payload.body) for m in got] == [1, 10, 100]
    assert res.error is None


@pytest_twisted.ensureDeferred
async def test_client_streaming(lab: Lab) -> None:
    reqs = [content(interop_pb2.StreamingInputCallRequest(
        payload=interop_pb2.Payload(body=b"x" * n))) for n in (5, 50, 500)]
    res = await call(lab, [dial(f"/{TS}/StreamingInputCall"), *reqs])
    assert res.code == grpc.StatusCode.OK, res.details
    [total] = res.contents(interop_pb2.StreamingInputCallResponse)
    assert total.aggregated_payload_size == 555


@pytest_twisted.ensureDeferred
async def test_bidi_streaming_with_header_metadata_echoed(lab: Lab) -> None:
    hdr = sesame_pb2.ProxyRequest()
    hdr.header.data["x-grpc-test-echo-initial"].str.values.append("hello")
    reqs = [content(interop_pb2.StreamingOutputCallRequest(
        response_parameters=[interop_pb2.ResponseParameters(size=n)])) for n in (3, 4)]
    res = await call(lab, [dial(f"/{TS}/FullDuplexCall"), hdr, *reqs])
    assert res.code == grpc.StatusCode.OK, res.details
    assert [len(m.payload.body) for m in res.contents(
        interop_pb2.StreamingOutputCallResponse)] == [3, 4]
    [header] = [r.header for r in res.responses if r.WhichOneof("data") == "header"]
    assert list(header.data["x-grpc-test-echo-initial"].str.values) == ["hello"]


@pytest_twisted.ensureDeferred
async def test_a_4_mib_message_each_way(lab: Lab) -> None:
    body = os.urandom(4 * MIB - 64)
    req = interop_pb2.SimpleRequest(response_size=4 * MIB - 64,
                                    payload=interop_pb2.Payload(body=body))
    assert req.ByteSize() <= 4 * MIB
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), content(req)], timeout=60)
    assert res.code == grpc.StatusCode.OK, res.details
    assert lab.device.unary_bytes[-1] == hashlib.sha256(body).hexdigest()
    [out] = res.contents(interop_pb2.SimpleResponse)
    assert out.payload.body == bytes(4 * MIB - 64)
    # one byte over the limit: RESOURCE_EXHAUSTED, named
    big = interop_pb2.SimpleRequest(payload=interop_pb2.Payload(body=bytes(4 * MIB)))
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), content(big)], timeout=60)
    assert res.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (res.code, res.details)
    assert "over the proxy's limit" in res.details


@pytest_twisted.ensureDeferred
async def test_inner_error_with_details_is_final_and_outer_call_ok(lab: Lab) -> None:
    req = interop_pb2.SimpleRequest(response_status=interop_pb2.EchoStatus(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="device says no"))
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), content(req)])
    assert res.code == grpc.StatusCode.OK, res.details
    assert res.kinds()[-1] == "error"
    assert res.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert res.error.message == "device says no"


@pytest_twisted.ensureDeferred
async def test_deadline_reaches_the_device_and_expires_there(lab: Lab) -> None:
    lab.device.cancelled.clear()
    req = interop_pb2.SimpleRequest(sleep_ms=30_000)
    t0 = time.monotonic()
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), content(req)], timeout=1.5)
    assert time.monotonic() - t0 < 10
    seen = lab.device.deadlines[-1]
    assert seen is not None and 0 < seen <= 1.6  # (grpc rounds a timeout up a little)
    code = res.error.code if res.code == grpc.StatusCode.OK and res.error else res.code.value[0]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], (res.code, res.details)
    assert await threads.deferToThread(lab.device.cancelled.wait, 10)


@pytest_twisted.ensureDeferred
async def test_cancel_mid_stream_reaches_the_device(lab: Lab) -> None:
    lab.device.cancelled.clear()
    gate = threading.Event()

    def requests() -> Iterator[sesame_pb2.ProxyRequest]:
        yield dial(f"/{TS}/FullDuplexCall")
        yield content(interop_pb2.StreamingOutputCallRequest(
            response_parameters=[interop_pb2.ResponseParameters(size=8)]))
        gate.wait(30)  # keep the call open until the test cancels it

    def cancel_on_content(r: Any, c: Any) -> None:
        if r.WhichOneof("data") == "content":
            c.cancel()

    try:
        res = await threads.deferToThread(_call, lab, requests(), on_response=cancel_on_content)
    finally:
        gate.set()
    assert res.code == grpc.StatusCode.CANCELLED
    assert len(res.contents(interop_pb2.StreamingOutputCallResponse)) == 1
    assert await threads.deferToThread(lab.device.cancelled.wait, 10)


@pytest_twisted.ensureDeferred
async def test_errors_before_conn_have_precise_statuses(lab: Lab) -> None:
    check = health_pb2.HealthCheckRequest()
    cases = [
        # (requests, token, code, words in the message)
        ([dial(f"/{TS}/NoSuchMethod"), content(check)], None,
         grpc.StatusCode.INVALID_ARGUMENT, "has no method NoSuchMethod"),
        ([dial("not a method")], None, grpc.StatusCode.INVALID_ARGUMENT, "dial.method"),
        ([dial("/no.such.Service/X")], None, grpc.StatusCode.NOT_FOUND, "no service no.such.Service"),
        ([dial("/grpc.health.v1.Health/Check", endpoint="nope@dev-1")], None,
         grpc.StatusCode.NOT_FOUND, "does not offer endpoint 'nope'"),
        ([dial("/grpc.health.v1.Health/Check", endpoint="api@ghost")], None,
         grpc.StatusCode.NOT_FOUND, "no remote namespaces/default/remotes/ghost"),
        ([dial("/grpc.health.v1.Health/Check", endpoint="10.0.0.1:80@dev-1")], None,
         grpc.StatusCode.INVALID_ARGUMENT, "dial.endpoint"),
        ([content(check)], None, grpc.StatusCode.INVALID_ARGUMENT, "must be dial"),
        ([], None, grpc.StatusCode.INVALID_ARGUMENT, "ended before a dial"),
        ([dial("/grpc.health.v1.Health/Check")], lab.other,
         grpc.StatusCode.PERMISSION_DENIED, "may not reach remote"),
        ([dial("/grpc.health.v1.Health/Check")], "ses_000000000000_wrong",
         grpc.StatusCode.UNAUTHENTICATED, "missing, invalid or revoked token"),
        ([dial("/grpc.health.v1.Health/Check", endpoint="api@dev-2"), content(check)], None,
         grpc.StatusCode.FAILED_PRECONDITION, "serves no gRPC server reflection"),
    ]
    for requests, token, code, words in cases:
        res = await call(lab, requests, token=token)
        assert res.code == code, (requests[:1], res.code, res.details)
        assert words in res.details, (words, res.details)
        assert res.responses == [], requests[:1]
    # a remote the hub knows (its record) but that is not connected: UNAVAILABLE
    lab.hub.store.create_remote("dev-off")
    res = await call(lab, [dial("/grpc.health.v1.Health/Check", endpoint="api@dev-off")])
    assert res.code == grpc.StatusCode.UNAVAILABLE and res.responses == []
    assert res.details == "remote dev-off is not connected"
    # details ride along: ResourceInfo for NOT_FOUND, PreconditionFailure for reflection
    res = await call(lab, [dial("/grpc.health.v1.Health/Check", endpoint="api@ghost")])
    info = error_details_pb2.ResourceInfo()
    assert res.status.details[0].Unpack(info)
    assert info.resource_name == "namespaces/default/remotes/ghost"
    res = await call(lab, [dial("/grpc.health.v1.Health/Check", endpoint="api@dev-2")])
    pf = error_details_pb2.PreconditionFailure()
    assert res.status.details[0].Unpack(pf) and pf.violations[0].type == "REFLECTION"


@pytest_twisted.ensureDeferred
async def test_bad_requests_after_conn_end_the_call_with_invalid_argument(lab: Lab) -> None:
    wrong = content(health_pb2.HealthCheckRequest())  # not a SimpleRequest
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), wrong])
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "content.type_url" in res.details and res.kinds() == ["conn"]
    hdr = sesame_pb2.ProxyRequest()
    hdr.header.data["grpc-timeout"].str.values.append("1S")
    res = await call(lab, [dial(f"/{TS}/UnaryCall"), hdr])
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT and "may not be set" in res.details
    res = await call(lab, [dial(f"/{TS}/StreamingInputCall"),
                           content(interop_pb2.StreamingInputCallRequest()),
                           sesame_pb2.ProxyRequest(header={})])
    assert res.code == grpc.StatusCode.INVALID_ARGUMENT and "at most one" in res.details
    # the hub and the device are fine afterwards
    res = await call(lab, [dial("/grpc.health.v1.Health/Check"),
                           content(health_pb2.HealthCheckRequest())])
    assert res.code == grpc.StatusCode.OK and res.error is None


# --- the JSON face: POST /v1alpha1/proxy on --http ----------------------------------------


@pytest.fixture(scope="module")
def http_port(lab: Lab) -> Iterator[int]:
    from twisted.internet import reactor

    from sesame.hub import listen_http

    port = pytest_twisted.blockon(listen_http(reactor, "tcp:0:interface=127.0.0.1",
                                              lab.hub.hub))
    try:
        yield port.getHost().port
    finally:
        pytest_twisted.blockon(port.stopListening())


def _post(port: int, token: str | None, body: bytes) -> tuple[int, str, list[tuple[float, Any]]]:
    """POST the body; (HTTP status, content type, [(seconds since the request, JSON line)])."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    t0 = time.monotonic()
    conn.request("POST", "/v1alpha1/proxy", body=body, headers=headers)
    resp = conn.getresponse()
    lines = []
    while True:
        line = resp.readline()
        if not line:
            break
        lines.append((time.monotonic() - t0, json.loads(line)))
    conn.close()
    return resp.status, resp.getheader("content-type") or "", lines


def post(port: int, token: str | None, *objects: Any, raw: bytes | None = None) -> Any:
    import json

    body = raw if raw is not None else b"\n".join(json.dumps(o).encode() for o in objects)
    return threads.deferToThread(_post, port, token, body)


@pytest_twisted.ensureDeferred
async def test_rest_health_check_as_in_the_docs(lab: Lab, http_port: int) -> None:
    status, ctype, lines = await post(
        http_port, lab.token,
        {"dial": {"endpoint": "api@dev-1", "method": "grpc.health.v1.Health/Check"}},
        {"content": {"@type": "type.googleapis.com/grpc.health.v1.HealthCheckRequest"}})
    assert status == 200 and ctype == "application/x-ndjson"
    objs = [o for _, o in lines]
    assert objs[0] == {"result": {"conn": {
        "namespace": {"name": "namespaces/default"},
        "remote": {"name": "namespaces/default/remotes/dev-1"},
        "endpoint": {"name": EP}}}}
    contents = [o["result"]["content"] for o in objs if "content" in o.get("result", {})]
    assert contents == [{"@type": "type.googleapis.com/grpc.health.v1.HealthCheckResponse",
                         "status": "SERVING"}]
    assert not any("error" in o or "error" in o.get("result", {}) for o in objs)


@pytest_twisted.ensureDeferred
async def test_rest_streams_responses_as_they_happen(lab: Lab, http_port: int) -> None:
    params = [{"size": 4, "intervalUs": 400_000} for _ in range(3)]
    status, _, lines = await post(
        http_port, lab.token,
        {"dial": {"endpoint": EP, "method": f"{TS}/StreamingOutputCall"}},
        {"content": {"@type": f"type.googleapis.com/{TS.rpartition('.')[0]}."
                              "StreamingOutputCallRequest", "responseParameters": params}})
    assert status == 200
    got = [(t, o["result"]["content"]) for t, o in lines if "content" in o["result"]]
    assert [c["payload"]["body"] for _, c in got] == ["AAAAAA=="] * 3  # 4 zero bytes
    # each line left when the device sent it, not with the last one
    assert got[2][0] - got[0][0] >= 0.6, [t for t, _ in got]


@pytest_twisted.ensureDeferred
async def test_rest_bidi_streaming_with_a_header(lab: Lab, http_port: int) -> None:
    req_type = f"type.googleapis.com/{TS.rpartition('.')[0]}.StreamingOutputCallRequest"
    status, _, lines = await post(
        http_port, lab.token, {"dial": {"endpoint": EP, "method": f"{TS}/FullDuplexCall"}},
        {"header": {"data": {"x-grpc-test-echo-initial": {"str": {"values": ["hi"]}}}}},
        *[{"content": {"@type": req_type, "responseParameters": [{"size": n}]}}
          for n in (1, 2, 3)])
    assert status == 200
    results = [o["result"] for _, o in lines]
    assert [len(r["content"]["payload"].get("body", "")) for r in results if "content" in r] == [
        4, 4, 4]  # base64 of 1, 2 and 3 zero bytes
    [header] = [r["header"] for r in results if "header" in r]
    assert header["data"]["x-grpc-test-echo-initial"]["str"]["values"] == ["hi"]


@pytest_twisted.ensureDeferred
async def test_rest_client_streaming_and_errors(lab: Lab, http_port: int) -> None:
    req_type = f"type.googleapis.com/{TS.rpartition('.')[0]}.StreamingInputCallRequest"
    status, _, lines = await post(
        http_port, lab.token, {"dial": {"endpoint": EP, "method": f"/{TS}/StreamingInputCall"}},
        *[{"content": {"@type": req_type, "payload": {"body": "AAAA"}}} for _ in range(4)])
    assert status == 200
    [total] = [o["result"]["content"] for _, o in lines if "content" in o["result"]]
    assert total["aggregatedPayloadSize"] == 12
    # before conn: the HTTP status says it too, and the line is a google.rpc.Status
    for token, objs, raw, http, code, words in [
        (None, [{"dial": {"endpoint": EP, "method": "grpc.health.v1.Health/Check"}}], None,
         401, 16, "missing, invalid or revoked token"),
        (lab.other, [{"dial": {"endpoint": EP, "method": "grpc.health.v1.Health/Check"}}],
         None, 403, 7, "may not reach remote"),
        (lab.token, [{"dial": {"endpoint": "api@ghost", "method": "grpc.health.v1.Health/Check"}}],
         None, 404, 5, "no remote"),
        (lab.token, [], b"{not json", 400, 3, "does not parse"),
        (lab.token, [{"dial": {"endpoint": EP, "method": "grpc.health.v1.Health/Check"}},
                     {"content": {"@type": "type.googleapis.com/no.Such"}}], None,
         200, 3, "not a ProxyRequest"),
    ]:
        status, _, lines = await post(http_port, token, *objs, raw=raw)
        assert status == http, (objs, status, lines)
        err = lines[-1][1]["error"]
        assert err["code"] == code and words in err["message"], (words, err)
    # an inner failure is a result line with the status, after conn; the call itself is 200
    status, _, lines = await post(
        http_port, lab.token, {"dial": {"endpoint": EP, "method": f"{TS}/UnaryCall"}},
        {"content": {"@type": f"type.googleapis.com/{TS.rpartition('.')[0]}.SimpleRequest",
                     "responseStatus": {"code": 9, "message": "nope"}}})
    assert status == 200
    assert lines[-1][1] == {"result": {"error": {"code": 9, "message": "nope", "details": []}}}


# --- sesame call, end to end in a subprocess ----------------------------------------------


def _sesame_call(lab: Lab, *argv: str, stdin: str | None = None,
                 token: str | None = None) -> Any:
    import subprocess
    import sys

    env = dict(os.environ, SESAME_TOKEN=token or lab.token, GRPC_VERBOSITY="ERROR")
    env.pop("SESAME_TOKEN_FILE", None)
    cmd = [sys.executable, "-m", "sesame", "call", "--hub", lab.hub.target,
           "--ca", str(lab.hub.ca_path), *argv]

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, input=stdin if stdin is not None else "", env=env,
                              capture_output=True, text=True, timeout=60)

    return threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_sesame_call_unary_list_and_describe(lab: Lab) -> None:
    r = await _sesame_call(lab, "dev-1/api", "grpc.health.v1.Health/Check", "{}")
    assert (r.returncode, r.stdout) == (0, '{"status":"SERVING"}\n'), r.stderr
    r = await _sesame_call(lab, "dev-1/api", "list")
    assert r.returncode == 0, r.stderr
    assert {"grpc.health.v1.Health", TS, "grpc.reflection.v1alpha.ServerReflection"} <= set(
        r.stdout.split())
    r = await _sesame_call(lab, "namespaces/default/remotes/dev-1/api", "describe",
                           "grpc.health.v1.Health")
    assert r.returncode == 0, r.stderr
    assert ("rpc Check(grpc.health.v1.HealthCheckRequest) returns "
            "(grpc.health.v1.HealthCheckResponse);") in r.stdout
    assert "rpc Watch(grpc.health.v1.HealthCheckRequest) returns (stream " in r.stdout
    r = await _sesame_call(lab, "dev-1/api", "describe", "grpc.health.v1.Health/Check")
    assert r.stdout == ("rpc grpc.health.v1.Health.Check(grpc.health.v1.HealthCheckRequest) "
                        "returns (grpc.health.v1.HealthCheckResponse);\n"), r.stderr
    r = await _sesame_call(lab, "dev-1/api", "describe", "grpc.health.v1.HealthCheckResponse")
    assert "message grpc.health.v1.HealthCheckResponse {" in r.stdout
    assert "grpc.health.v1.HealthCheckResponse.ServingStatus status = 1;" in r.stdout


@pytest_twisted.ensureDeferred
async def test_sesame_call_streams_and_exit_statuses(lab: Lab) -> None:
    lines = "\n".join('{"payload": {"body": "AAAA"}}' for _ in range(5)) + "\n"
    r = await _sesame_call(lab, "dev-1/api", f"{TS}/StreamingInputCall", stdin=lines)
    assert (r.returncode, r.stdout) == (0, '{"aggregatedPayloadSize":15}\n'), r.stderr
    r = await _sesame_call(lab, "dev-1/api", f"{TS}/StreamingOutputCall",
                           '{"responseParameters": [{"size": 1}, {"size": 2}]}')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['{"payload":{"body":"AA=="}}', '{"payload":{"body":"AAA="}}']
    # the device's status: exit 64 + code, said on stderr
    r = await _sesame_call(lab, "dev-1/api", f"/{TS}/UnaryCall",
                           '{"responseStatus": {"code": 5, "message": "no such thing"}}')
    assert r.returncode == 64 + 5, (r.returncode, r.stderr)
    assert "ERROR: NOT_FOUND: no such thing" in r.stderr and r.stdout == ""
    # the hub's refusals, with their details printed readably
    r = await _sesame_call(lab, "ghost/api", "grpc.health.v1.Health/Check", "{}")
    assert r.returncode == 64 + 5, r.stderr
    assert "ERROR: NOT_FOUND: no remote namespaces/default/remotes/ghost" in r.stderr
    assert '"resourceName": "namespaces/default/remotes/ghost"' in r.stderr
    r = await _sesame_call(lab, "dev-1/api", "grpc.health.v1.Health/Check", "{}",
                           token=lab.other)
    assert r.returncode == 64 + 7 and "PERMISSION_DENIED" in r.stderr, r.stderr
    r = await _sesame_call(lab, "dev-1/api", "grpc.health.v1.Health/Check", '{"nope": 1}')
    assert r.returncode == 2, r.stderr
    assert "is not a grpc.health.v1.HealthCheckRequest" in r.stderr
    r = await _sesame_call(lab, "dev-1/api", "Check", "{}")
    assert r.returncode == 2 and "METHOD:" in r.stderr, r.stderr


# --- the WebSocket face on the same path ---------------------------------------------------


def _ws_exchange(port: int, token: str | None, messages: list[str], *,
                 keep_open_for: str | None = None) -> tuple[list[Any], Any]:
    """Open ws://.../v1alpha1/proxy, send ``messages`` (text), collect every JSON message
    until the server closes; (messages, close status)."""
    import json

    import websocket  # websocket-client

    headers = [f"Authorization: Bearer {token}"] if token else []
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/v1alpha1/proxy", header=headers,
                                     timeout=30)
    got: list[Any] = []
    try:
        for m in messages:
            ws.send(m)
        while True:
            op, data = ws.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return got, code
            if op == websocket.ABNF.OPCODE_TEXT:
                got.append(json.loads(data))
                if keep_open_for and keep_open_for in data.decode():
                    ws.send("")  # end the requests once the first answer is in
    finally:
        ws.close()


@pytest_twisted.ensureDeferred
async def test_websocket_bidi_as_messages_arrive(lab: Lab, http_port: int) -> None:
    import json

    req_type = f"type.googleapis.com/{TS.rpartition('.')[0]}.StreamingOutputCallRequest"
    msgs = [json.dumps({"dial": {"endpoint": EP, "method": f"{TS}/FullDuplexCall"}}),
            json.dumps({"content": {"@type": req_type, "responseParameters": [{"size": 2}]}})]
    # the requests stay open until the first answer came back: a real bidi exchange
    got, code = await threads.deferToThread(_ws_exchange, http_port, lab.token, msgs,
                                            keep_open_for="content")
    assert code == 1000
    kinds = [next(iter(m["result"])) for m in got]
    assert kinds[0] == "conn" and kinds.count("content") == 1, got
    assert not any("error" in m or "error" in m.get("result", {}) for m in got)


@pytest_twisted.ensureDeferred
async def test_websocket_refusals_and_bad_messages(lab: Lab, http_port: int) -> None:
    import json

    dial = json.dumps({"dial": {"endpoint": EP, "method": "grpc.health.v1.Health/Check"}})
    got, code = await threads.deferToThread(_ws_exchange, http_port, None, [dial, ""])
    assert got[-1]["error"]["code"] == 16 and code == 1000  # UNAUTHENTICATED, said in band
    got, code = await threads.deferToThread(_ws_exchange, http_port, lab.token, [dial, "{nope"])
    assert got[-1]["error"]["code"] == 3 and code == 1007
    # and a health check works after them
    check = json.dumps({"content": {
        "@type": "type.googleapis.com/grpc.health.v1.HealthCheckRequest"}})
    got, code = await threads.deferToThread(_ws_exchange, http_port, lab.token,
                                            [dial, check, "EOF"])
    assert code == 1000
    assert [m["result"]["content"]["status"] for m in got if "content" in m["result"]] == [
        "SERVING"]
