"""
The management API: ``sesame.v1alpha1.Sesame`` and ``sesame.admin.v1alpha1.Admin``
over gRPC on a real hub (real grpcio stubs, TLS, 127.0.0.1) and as JSON REST on a
real twisted.web listener (twisted.web.client.Agent), plus the ``--http`` option.

Nothing sleeps and nothing is mocked: every call crosses a socket.
"""

from __future__ import annotations

import base64
import json
import secrets
from io import BytesIO
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from sesame import _names as N
from sesame import tap
from sesame.admin.v1alpha1 import admin_pb2, admin_pb2_grpc
from sesame.hub import _rest, mgmt
from sesame.hub._http import MAX_BODY, admin_root, admin_site, check_http_endpoint
from sesame.testing.hub import HubFixture
from sesame.v1alpha1 import sesame_pb2, sesame_pb2_grpc

T = 10.0


# --- fixtures and helpers -------------------------------------------------------------


class Api:
    """A started hub with the REST site on its own 127.0.0.1 port, and tokens."""

    def __init__(self, fx: HubFixture, port: int) -> None:
        self.fx = fx
        self.base = f"http://127.0.0.1:{port}"
        self.admin = fx.store.create_token("admin")[1]
        self.client = fx.client_token()
        self.agent = Agent(reactor)

    async def rest(self, method: str, path: str, body: object = None, token: object = "admin",
                   raw: bytes | None = None, content_type: bytes = b"application/json",
                   ) -> tuple[int, dict, Headers]:
        headers = Headers({b"accept": [b"application/json"]})
        tok = self.admin if token == "admin" else token
        if tok:
            headers.addRawHeader(b"authorization", f"Bearer {tok}".encode())
        producer = None
        if raw is not None or body is not None:
            data = raw if raw is not None else json.dumps(body).encode()
            headers.addRawHeader(b"content-type", content_type)
            producer = FileBodyProducer(BytesIO(data))
        d = self.agent.request(method.encode(), (self.base + path).encode(), headers, producer)
        resp = await d.addTimeout(T, reactor)
        text = await readBody(resp)
        assert resp.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
        return resp.code, json.loads(text), resp.headers

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.fx.ca_path.read_bytes())
        return grpc.secure_channel(self.fx.target, creds)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    fx = HubFixture(tmp_path_factory.mktemp("mgmt"))
    pytest_twisted.blockon(fx.start())
    site = admin_site(admin_root(fx.hub, fx.store))  # the --http site (sesame.hub._http.listen_http)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield Api(fx, port.getHost().port)
    finally:
        pytest_twisted.blockon(port.stopListening())
        pytest_twisted.blockon(fx.stop())


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _violations(err: dict) -> dict[str, str]:
    out = {}
    for d in err["error"]["details"]:
        if d["@type"] == "type.googleapis.com/google.rpc.BadRequest":
            out.update({v["field"]: v["description"] for v in d["fieldViolations"]})
    return out


def _resource_info(err: dict) -> dict:
    (info,) = [d for d in err["error"]["details"]
               if d["@type"] == "type.googleapis.com/google.rpc.ResourceInfo"]
    return info


def _grpc_details(exc: grpc.RpcError) -> list:
    st = rpc_status.from_call(exc)
    assert st is not None, "no google.rpc.Status in the trailers"
    out = []
    for d in st.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                    error_details_pb2.PreconditionFailure):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out.append(msg)
    return out


class _Raw(protocol.Protocol):
    """Writes bytes as given and collects the answer until the server closes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(self.data)


async def raw_http(api: Api, head: bytes, body_parts: tuple[bytes, ...] = ()) -> bytes:
    """Send a request head (and body pieces) on a plain socket; the whole answer."""
    port = int(api.base.rsplit(":", 1)[1])
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    p = await endpoints.connectProtocol(ep, _Raw())
    p.transport.write(head)
    for part in body_parts:
        p.transport.write(part)
    return await p.closed.addTimeout(T, reactor)


# --- REST: every resource -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rest_namespaces_crud(api):
    ns = _uid("team")
    code, body, _ = await api.rest("POST", f"/v1alpha1/namespaces?resourceId={ns}", {})
    assert code == 200 and body["name"] == f"namespaces/{ns}" and body["createTime"]
    code, got, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}")
    assert (code, got) == (200, body)
    code, listing, _ = await api.rest("GET", "/v1alpha1/namespaces")
    assert code == 200
    assert {"namespaces/default", f"namespaces/{ns}"} <= {n["name"] for n in listing["namespaces"]}

    code, err, _ = await api.rest("POST", f"/v1alpha1/namespaces?resource_id={ns}", {})
    assert code == 409 and err["error"]["status"] == "ALREADY_EXISTS"
    assert err["error"]["code"] == 409
    assert "resource_id" in _violations(err)
    code, err, _ = await api.rest("POST", "/v1alpha1/namespaces", {})
    assert code == 400 and "resource_id" in _violations(err)

    # not empty: FAILED_PRECONDITION (400); the default namespace never goes
    await api.rest("POST", f"/v1alpha1/namespaces/{ns}/remotes?resourceId=r", {})
    code, err, _ = await api.rest("DELETE", f"/v1alpha1/namespaces/{ns}")
    assert code == 400 and err["error"]["status"] == "FAILED_PRECONDITION"
    await api.rest("DELETE", f"/v1alpha1/namespaces/{ns}/remotes/r")
    code, err, _ = await api.rest("DELETE", "/v1alpha1/namespaces/default")
    assert code == 400 and err["error"]["status"] == "FAILED_PRECONDITION"

    code, empty, _ = await api.rest("DELETE", f"/v1alpha1/namespaces/{ns}")
    assert (code, empty) == (200, {})
    code, err, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}")
    assert code == 404 and err["error"]["status"] == "NOT_FOUND"
    assert _resource_info(err)["resourceName"] == f"namespaces/{ns}"


@pytest_twisted.ensureDeferred
async def test_rest_remotes_crud(api):
    r = _uid("edge")
    base = "/v1alpha1/namespaces/default/remotes"
    code, created, _ = await api.rest("POST", f"{base}?resourceId={r}",
                                      {"displayName": "Edge", "description": "first"})
    assert code == 200
    assert created["name"] == f"namespaces/default/remotes/{r}"
    assert (created["displayName"], created["description"]) == ("Edge", "first")
    code, got, _ = await api.rest("GET", f"{base}/{r}")
    assert (code, got) == (200, created)

    # PATCH without a mask updates the fields in the body only
    code, patched, _ = await api.rest("PATCH", f"{base}/{r}", {"description": "second"})
    assert code == 200 and (patched["displayName"], patched["description"]) == ("Edge", "second")
    # an explicit mask wins over the body's keys
    code, patched, _ = await api.rest("PATCH", f"{base}/{r}?updateMask=displayName",
                                      {"displayName": "E", "description": "ignored"})
    assert code == 200 and (patched["displayName"], patched["description"]) == ("E", "second")
    code, err, _ = await api.rest("PATCH", f"{base}/{r}?updateMask=colour", {"displayName": "x"})
    assert code == 400 and err["error"]["status"] == "INVALID_ARGUMENT"
    assert "update_mask" in _violations(err) and "colour" in err["error"]["message"]
    code, err, _ = await api.rest("PATCH", f"{base}/{r}", {"displayName": "x" * 300})
    assert code == 400 and "remote.display_name" in _violations(err)

    code, listing, _ = await api.rest("GET", base)
    assert code == 200 and f"{base[10:]}/{r}" in {x["name"] for x in listing["remotes"]}
    assert "nextPageToken" not in listing  # one page

    code, err, _ = await api.rest("POST", f"{base}?resourceId={r}", {})
    assert code == 409 and "resource_id" in _violations(err)
    assert _resource_info(err)["resourceName"] == f"namespaces/default/remotes/{r}"
    code, err, _ = await api.rest("POST", f"{base}?resourceId=no/slash", {})
    assert code == 400 and "resource_id" in _violations(err)
    code, err, _ = await api.rest("POST", f"{base}?resourceId=-bad", {})
    assert code == 400 and "resource_id" in _violations(err)
    code, err, _ = await api.rest("POST", "/v1alpha1/namespaces/nope/remotes?resourceId=x", {})
    assert code == 404 and _resource_info(err)["resourceName"] == "namespaces/nope"

    # no resource_id: the server picks one
    code, generated, _ = await api.rest("POST", base, {})
    assert code == 200 and generated["name"].startswith("namespaces/default/remotes/remote-")
    await api.rest("DELETE", f"/v1alpha1/{generated['name']}")

    code, empty, _ = await api.rest("DELETE", f"{base}/{r}")
    assert (code, empty) == (200, {})
    code, err, _ = await api.rest("GET", f"{base}/{r}")
    assert code == 404 and err["error"]["status"] == "NOT_FOUND"
    code, err, _ = await api.rest("DELETE", f"{base}/{r}")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_rest_endpoints_crud(api):
    r = _uid("edge")
    await api.rest("POST", f"/v1alpha1/namespaces/default/remotes?resourceId={r}", {})
    base = f"/v1alpha1/namespaces/default/remotes/{r}/endpoints"
    code, ep, _ = await api.rest("POST", f"{base}?resourceId=web",
                                 {"displayName": "Web", "spec": {"tunnel": {}}})
    assert code == 200 and ep["name"] == f"namespaces/default/remotes/{r}/endpoints/web"
    assert ep["spec"] == {"tunnel": {}} and ep["displayName"] == "Web"
    code, got, _ = await api.rest("GET", f"{base}/web")
    assert (code, got) == (200, ep)
    code, patched, _ = await api.rest("PATCH", f"{base}/web", {"description": "port 80"})
    assert code == 200 and patched["description"] == "port 80" and patched["displayName"] == "Web"
    code, listing, _ = await api.rest("GET", base)
    assert code == 200 and [e["name"] for e in listing["endpoints"]] == [ep["name"]]
    code, err, _ = await api.rest("POST", f"{base}?resourceId=web", {})
    assert code == 409 and err["error"]["status"] == "ALREADY_EXISTS"
    code, err, _ = await api.rest(
        "POST", "/v1alpha1/namespaces/default/remotes/ghost/endpoints?resourceId=x", {})
    assert code == 404
    assert _resource_info(err)["resourceName"] == "namespaces/default/remotes/ghost"
    code, empty, _ = await api.rest("DELETE", f"{base}/web")
    assert (code, empty) == (200, {})
    code, err, _ = await api.rest("GET", f"{base}/web")
    assert code == 404
    assert _resource_info(err)["resourceType"] == "sesame.v1alpha1.Endpoint"


@pytest_twisted.ensureDeferred
async def test_rest_tokens_crud_and_the_secret_is_shown_once(api):
    r = _uid("tok")
    await api.rest("POST", f"/v1alpha1/namespaces/default/remotes?resourceId={r}", {})
    code, created, _ = await api.rest("POST", "/v1alpha1/tokens",
                                      {"kind": "client", "pattern": "tok-*"})
    assert code == 200
    secret = created["secret"]
    token = created["token"]
    assert secret.startswith("ses_") and token["name"] == f"tokens/{secret.split('_')[1]}"
    assert (token["kind"], token["namespace"], token["pattern"]) == ("client", "default", "tok-*")
    assert "revokeTime" not in token

    # the new token works, for reading what it may see
    code, seen, _ = await api.rest("GET", "/v1alpha1/namespaces/default/remotes", token=secret)
    assert code == 200 and seen["remotes"]
    assert all(x["name"].split("/")[-1].startswith("tok-") for x in seen["remotes"])

    code, got, _ = await api.rest("GET", f"/v1alpha1/{token['name']}")
    assert (code, got) == (200, token)
    code, listing, _ = await api.rest("GET", "/v1alpha1/tokens")
    assert code == 200 and token["name"] in {t["name"] for t in listing["tokens"]}
    text = json.dumps(listing) + json.dumps(got)
    assert secret.split("_", 2)[2] not in text and "secret" not in text  # the secret may hold "_"

    code, err, _ = await api.rest("POST", "/v1alpha1/tokens", {"kind": "emperor"})
    assert code == 400 and "token.kind" in _violations(err)
    code, err, _ = await api.rest("POST", "/v1alpha1/tokens", {"kind": "remote"})
    assert code == 400 and "token.remote" in _violations(err)
    code, err, _ = await api.rest("GET", f"/v1alpha1/tokens/{secret}")
    assert code == 400 and secret not in json.dumps(err)  # never echoed
    code, err, _ = await api.rest("GET", "/v1alpha1/tokens/0123456789ab")
    assert code == 404

    code, revoked, _ = await api.rest("DELETE", f"/v1alpha1/{token['name']}")
    assert code == 200 and revoked["revokeTime"]
    code, err, _ = await api.rest("GET", "/v1alpha1/namespaces/default/remotes", token=secret)
    assert code == 401 and err["error"]["status"] == "UNAUTHENTICATED"
    code, live, _ = await api.rest("GET", "/v1alpha1/tokens")
    assert token["name"] not in {t["name"] for t in live["tokens"]}
    code, every, _ = await api.rest("GET", "/v1alpha1/tokens?showRevoked=true")
    assert token["name"] in {t["name"] for t in every["tokens"]}


@pytest_twisted.ensureDeferred
async def test_rest_routes_crud_tells_the_hub(api):
    changes = []
    api.fx.hub.on_routes_changed = lambda: changes.append(1)  # the front doors' hook
    try:
        target = "web@edge-1"
        match = f"{_uid('web')}.hub.example"
        code, rt, _ = await api.rest("POST", "/v1alpha1/routes",
                                     {"kind": "http", "match": match.upper(), "target": target})
        assert code == 200 and rt["name"].startswith("routes/rt_")
        assert (rt["kind"], rt["match"], rt["target"]) == ("http", match, target)
        assert changes == [1]
        code, tcp, _ = await api.rest("POST", "/v1alpha1/routes", {
            "kind": "tcp", "match": "tcp:0:interface=127.0.0.1", "target": target})
        assert code == 200 and tcp["match"] == "tcp:0:interface=127.0.0.1"
        code, grpc_rt, _ = await api.rest("POST", "/v1alpha1/routes", {
            "kind": "grpc", "match": _uid("svc"), "target": target})
        assert code == 200 and grpc_rt["kind"] == "grpc"

        code, got, _ = await api.rest("GET", f"/v1alpha1/{rt['name']}")
        assert (code, got) == (200, rt)
        code, listing, _ = await api.rest("GET", "/v1alpha1/routes?kind=http")
        assert code == 200 and {x["kind"] for x in listing["routes"]} == {"http"}
        assert rt["name"] in {x["name"] for x in listing["routes"]}

        code, err, _ = await api.rest("POST", "/v1alpha1/routes",
                                      {"kind": "http", "match": match, "target": target})
        assert code == 409 and "route.match" in _violations(err)
        code, err, _ = await api.rest("POST", "/v1alpha1/routes",
                                      {"kind": "udp", "match": "53", "target": target})
        assert code == 400 and "route.kind" in _violations(err)
        code, err, _ = await api.rest("POST", "/v1alpha1/routes",
                                      {"kind": "tcp", "match": "tcp:nope", "target": target})
        assert code == 400 and "route.match" in _violations(err)
        code, err, _ = await api.rest("POST", "/v1alpha1/routes", {"kind": "sni", "match": "a.b"})
        assert code == 400 and "route.target" in _violations(err)
        code, err, _ = await api.rest("POST", "/v1alpha1/routes", {
            "kind": "sni", "match": "a.b", "target": "edge-1"})  # the store checks targets
        assert code == 400 and "route.target" in _violations(err)
        code, err, _ = await api.rest("GET", "/v1alpha1/routes?kind=udp")
        assert code == 400 and "kind" in _violations(err)

        before = len(changes)
        code, empty, _ = await api.rest("DELETE", f"/v1alpha1/{rt['name']}")
        assert (code, empty) == (200, {}) and len(changes) == before + 1
        code, err, _ = await api.rest("GET", f"/v1alpha1/{rt['name']}")
        assert code == 404 and _resource_info(err)["resourceName"] == rt["name"]
        for other in (tcp, grpc_rt):
            code, _, _ = await api.rest("DELETE", f"/v1alpha1/{other['name']}")
            assert code == 200
    finally:
        del api.fx.hub.on_routes_changed


# --- REST: errors, auth, paging ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rest_auth(api):
    path = "/v1alpha1/namespaces/default/remotes"
    code, err, headers = await api.rest("GET", path, token=None)
    assert code == 401 and err["error"]["status"] == "UNAUTHENTICATED"
    assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="sesame"']
    code, err, _ = await api.rest("GET", path, token="ses_0123456789ab_" + "x" * 43)
    assert code == 401
    # a client token reads, but may not write: 403
    code, _, _ = await api.rest("GET", path, token=api.client)
    assert code == 200
    code, err, _ = await api.rest("POST", f"{path}?resourceId={_uid('x')}", {}, token=api.client)
    assert code == 403 and err["error"]["status"] == "PERMISSION_DENIED"
    code, err, _ = await api.rest("GET", "/v1alpha1/tokens", token=api.client)
    assert code == 403
    code, err, _ = await api.rest("POST", "/v1alpha1/routes",
                                  {"kind": "grpc", "match": "x", "target": "y"}, token=api.client)
    assert code == 403
    # a remote token sees nothing
    remote_token = api.fx.remote_token(_uid("rt"))
    code, err, _ = await api.rest("GET", "/v1alpha1/namespaces", token=remote_token)
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_rest_client_token_sees_only_its_remotes(api):
    ns = _uid("vis")
    await api.rest("POST", f"/v1alpha1/namespaces?resourceId={ns}", {})
    for r in ("web-1", "web-2", "db-1"):
        await api.rest("POST", f"/v1alpha1/namespaces/{ns}/remotes?resourceId={r}", {})
    web = api.fx.client_token("web-*", namespace=ns)
    code, listing, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes", token=web)
    assert code == 200
    assert [x["name"] for x in listing["remotes"]] == [
        f"namespaces/{ns}/remotes/web-1", f"namespaces/{ns}/remotes/web-2"]
    code, _, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes/web-1", token=web)
    assert code == 200
    code, err, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes/db-1", token=web)
    assert code == 403
    code, err, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes/db-1/endpoints",
                                  token=web)
    assert code == 403
    # its own namespace only
    code, mine, _ = await api.rest("GET", "/v1alpha1/namespaces", token=web)
    assert code == 200 and [n["name"] for n in mine["namespaces"]] == [f"namespaces/{ns}"]
    code, _, _ = await api.rest("GET", "/v1alpha1/namespaces/default", token=web)
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_rest_paths_methods_and_bodies(api):
    code, err, _ = await api.rest("GET", "/v1alpha1/nothing/here")
    assert code == 404 and err["error"]["status"] == "NOT_FOUND"
    code, err, headers = await api.rest("PUT", "/v1alpha1/namespaces/default/remotes", {})
    assert code == 405
    assert headers.getRawHeaders(b"allow") == [b"GET, POST"]
    code, err, _ = await api.rest("POST", "/v1alpha1/namespaces/default/remotes?resourceId=j",
                                  raw=b"{not json")
    assert code == 400 and err["error"]["status"] == "INVALID_ARGUMENT"
    code, err, _ = await api.rest("POST", "/v1alpha1/namespaces/default/remotes?resourceId=j",
                                  {"displayName": 7, "colour": "red"})
    assert code == 400 and set(_violations(err)) & {"remote.display_name", "remote.colour"}
    code, err, _ = await api.rest("GET", "/v1alpha1/namespaces/default/remotes?colour=red")
    assert code == 400 and "colour" in _violations(err)
    code, err, _ = await api.rest("GET", "/v1alpha1/namespaces/default/remotes?pageSize=x")
    assert code == 400
    # (POST /v1alpha1/proxy answers newline-delimited JSON: tests/test_proxy.py)


@pytest_twisted.ensureDeferred
async def test_rest_body_is_json_whatever_the_content_type(api):
    """curl -d sends application/x-www-form-urlencoded; an '=' in the JSON must not matter."""
    r = _uid("form")
    code, made, _ = await api.rest(
        "POST", f"/v1alpha1/namespaces/default/remotes?resourceId={r}",
        {"description": "a=b&c=d"}, content_type=b"application/x-www-form-urlencoded")
    assert code == 200 and made["description"] == "a=b&c=d"
    await api.rest("DELETE", f"/v1alpha1/{made['name']}")


@pytest_twisted.ensureDeferred
async def test_rest_pagination(api):
    ns = _uid("page")
    await api.rest("POST", f"/v1alpha1/namespaces?resourceId={ns}", {})
    names = sorted(f"namespaces/{ns}/remotes/r{i:02d}" for i in range(7))
    for n in names:
        code, _, _ = await api.rest("POST", f"/v1alpha1/namespaces/{ns}/remotes"
                                    f"?resourceId={n.rsplit('/', 1)[1]}", {})
        assert code == 200
    path = f"/v1alpha1/namespaces/{ns}/remotes?pageSize=3"
    seen, pages, token, first_token = [], [], None, None
    while True:
        code, page, _ = await api.rest("GET", path + (f"&pageToken={token}" if token else ""))
        assert code == 200
        pages.append(len(page["remotes"]))
        seen += [x["name"] for x in page["remotes"]]
        token = page.get("nextPageToken")
        first_token = first_token or token
        if not token:
            break
    assert pages == [3, 3, 1] and seen == names

    # the token is bound to its list: another parent, or garbage, is INVALID_ARGUMENT
    code, err, _ = await api.rest(
        "GET", f"/v1alpha1/namespaces/default/remotes?pageSize=3&pageToken={first_token}")
    assert code == 400 and "page_token" in _violations(err)
    code, err, _ = await api.rest("GET", f"{path}&pageToken=bm90LWEtdG9rZW4")
    assert code == 400 and "page_token" in _violations(err)
    forged = base64.urlsafe_b64encode(b'["x", 1]').decode().rstrip("=")
    code, err, _ = await api.rest("GET", f"{path}&pageToken={forged}")
    assert code == 400 and "page_token" in _violations(err)
    code, err, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes?pageSize=-1")
    assert code == 400 and "page_size" in _violations(err)
    # page_size 0 is the server default, big enough for seven
    code, page, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}/remotes")
    assert len(page["remotes"]) == 7 and mgmt.DEFAULT_PAGE_SIZE >= 7
    # namespaces/- lists across namespaces
    code, page, _ = await api.rest("GET", "/v1alpha1/namespaces/-/remotes?pageSize=1000")
    assert set(names) <= {x["name"] for x in page["remotes"]}


# --- gRPC ---------------------------------------------------------------------------------


def test_grpc_remotes_and_endpoints_crud(api):
    admin = (("authorization", f"Bearer {api.admin}"),)
    r = _uid("g")
    parent = "namespaces/default"
    with api.channel() as ch:
        stub = sesame_pb2_grpc.SesameStub(ch)
        created = stub.CreateRemote(sesame_pb2.CreateRemoteRequest(
            parent=parent, resource_id=r, remote=sesame_pb2.Remote(display_name="G")),
            metadata=admin, timeout=T)
        name = f"{parent}/remotes/{r}"
        assert created.name == name and created.display_name == "G"
        assert created.create_time.seconds > 0
        assert stub.GetRemote(sesame_pb2.GetRemoteRequest(name=name), metadata=admin,
                              timeout=T) == created
        updated = stub.UpdateRemote(sesame_pb2.UpdateRemoteRequest(
            name=name, remote=sesame_pb2.Remote(display_name="ignored", description="d"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"])),
            metadata=admin, timeout=T)
        assert (updated.display_name, updated.description) == ("G", "d")
        with pytest.raises(grpc.RpcError) as e:
            stub.UpdateRemote(sesame_pb2.UpdateRemoteRequest(
                name=name, update_mask=field_mask_pb2.FieldMask(paths=["nope"])),
                metadata=admin, timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (br,) = _grpc_details(e.value)
        assert [v.field for v in br.field_violations] == ["update_mask"]

        with pytest.raises(grpc.RpcError) as e:
            stub.CreateRemote(sesame_pb2.CreateRemoteRequest(parent=parent, resource_id=r),
                              metadata=admin, timeout=T)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        kinds = {type(d).__name__: d for d in _grpc_details(e.value)}
        assert kinds["ResourceInfo"].resource_name == name
        assert kinds["BadRequest"].field_violations[0].field == "resource_id"

        ep = stub.CreateEndpoint(sesame_pb2.CreateEndpointRequest(
            parent=name, resource_id="ssh"), metadata=admin, timeout=T)
        assert ep.name == f"{name}/endpoints/ssh" and ep.spec.HasField("tunnel")
        eps = stub.ListEndpoints(sesame_pb2.ListEndpointsRequest(parent=name), metadata=admin,
                                 timeout=T)
        assert [x.name for x in eps.endpoints] == [ep.name] and not eps.next_page_token
        ep2 = stub.UpdateEndpoint(sesame_pb2.UpdateEndpointRequest(
            name=ep.name, endpoint=sesame_pb2.Endpoint(display_name="SSH")),
            metadata=admin, timeout=T)
        assert ep2.display_name == "SSH"
        assert stub.GetEndpoint(sesame_pb2.GetEndpointRequest(name=ep.name), metadata=admin,
                                timeout=T) == ep2
        stub.DeleteEndpoint(sesame_pb2.DeleteEndpointRequest(name=ep.name), metadata=admin,
                            timeout=T)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetEndpoint(sesame_pb2.GetEndpointRequest(name=ep.name), metadata=admin,
                             timeout=T)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        (info,) = _grpc_details(e.value)
        assert info.resource_name == ep.name

        listed = stub.ListRemotes(sesame_pb2.ListRemotesRequest(parent=parent), metadata=admin,
                                  timeout=T)
        assert name in [x.name for x in listed.remotes]
        stub.DeleteRemote(sesame_pb2.DeleteRemoteRequest(name=name), metadata=admin, timeout=T)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetRemote(sesame_pb2.GetRemoteRequest(name=name), metadata=admin, timeout=T)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        # bad names say which field
        with pytest.raises(grpc.RpcError) as e:
            stub.GetRemote(sesame_pb2.GetRemoteRequest(name="remotes/x"), metadata=admin,
                           timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _grpc_details(e.value)[0].field_violations[0].field == "name"


def test_grpc_auth(api):
    with api.channel() as ch:
        stub = sesame_pb2_grpc.SesameStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetRemote(sesame_pb2.GetRemoteRequest(name="namespaces/default/remotes/x"),
                           timeout=T)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateRemote(sesame_pb2.CreateRemoteRequest(parent="namespaces/default"),
                              metadata=(("authorization", f"Bearer {api.client}"),), timeout=T)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:  # Proxy checks the token first too
            next(stub.Proxy(iter([sesame_pb2.ProxyRequest()]), timeout=T))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            next(stub.Proxy(iter([sesame_pb2.ProxyRequest()]), timeout=T,
                            metadata=(("authorization", f"Bearer {api.client}"),)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the first request must be dial" in e.value.details()


def test_grpc_admin_tokens_and_routes(api):
    admin = (("authorization", f"Bearer {api.admin}"),)
    with api.channel() as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        made = stub.CreateToken(admin_pb2.CreateTokenRequest(
            token=admin_pb2.Token(kind="admin")), metadata=admin, timeout=T)
        assert made.secret.startswith("ses_") and made.token.kind == "admin"
        # the new admin token manages routes over gRPC too
        theirs = (("authorization", f"Bearer {made.secret}"),)
        rt = stub.CreateRoute(admin_pb2.CreateRouteRequest(route=admin_pb2.Route(
            kind="sni", match=f"{_uid('s')}.example", target="127.0.0.1:443@a")),
            metadata=theirs, timeout=T)
        assert rt.name in [x.name for x in stub.ListRoutes(
            admin_pb2.ListRoutesRequest(kind="sni"), metadata=theirs, timeout=T).routes]
        stub.DeleteRoute(admin_pb2.DeleteRouteRequest(name=rt.name), metadata=theirs, timeout=T)
        revoked = stub.DeleteToken(admin_pb2.DeleteTokenRequest(name=made.token.name),
                                   metadata=admin, timeout=T)
        assert revoked.HasField("revoke_time")
        with pytest.raises(grpc.RpcError) as e:
            stub.ListRoutes(admin_pb2.ListRoutesRequest(), metadata=theirs, timeout=T)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest_twisted.ensureDeferred
async def test_grpc_live_state_is_a_paged_list_not_a_header(api):
    """What `sesame remotes` relies on: ListRemotes pages every namespace without a parent
    and carries no header of ours; the live state is Admin/ListSessions, paged as well.

    (The blocking stub call is fine here: the hub runs on the bridge loop's thread.)"""
    name = _uid("live")
    session = await api.fx.start_remote(name)
    try:
        md = (("authorization", f"Bearer {api.client}"),)
        with api.channel() as ch:
            stub = sesame_pb2_grpc.SesameStub(ch)
            resp, call = stub.ListRemotes.with_call(sesame_pb2.ListRemotesRequest(),
                                                    metadata=md, timeout=T)
            assert f"namespaces/default/remotes/{name}" in [r.name for r in resp.remotes]
            assert not [k for k, _ in call.initial_metadata() if k.startswith("sesame-")]
            admin = admin_pb2_grpc.AdminStub(ch)
            got = admin.ListSessions(admin_pb2.ListSessionsRequest(
                parent=f"namespaces/default/remotes/{name}"), metadata=md, timeout=T)
        (s,) = got.sessions
        assert s.name.startswith(f"namespaces/default/remotes/{name}/sessions/")
        assert list(s.endpoints) == list(s.offered_endpoints) == [N.NETCONN_ENDPOINT]
        assert s.peer.startswith("127.0.0.1:") and s.connect_time.seconds > 0
        assert s.connections == 0 and s.stream_requests_pending == 0
        assert not got.next_page_token
    finally:
        await api.fx.stop_remote(session)


# --- the gateway's routing table ------------------------------------------------------------


def test_http_bindings_are_unambiguous():
    table = _rest.bindings(mgmt.SERVICES)
    assert len(table) == sum(len(s.methods) for s in mgmt.SERVICES)
    for b in table:
        sample = b.template
        for _, field in b.variables:
            start = sample.index("{" + field)
            end = sample.index("}", start)
            pattern = sample[start:end].partition("=")[2] or "*"
            sample = sample[:start] + pattern.replace("*", "x1") + sample[end + 1:]
        hits = [o.method.name for o in table if o.verb == b.verb and o.regex.match(sample)]
        assert hits == [b.method.name], (b.verb, sample, hits)


def test_compile_template_variables_and_verbs():
    regex, variables = _rest.compile_template("/v1/{name=things/*/parts/**}:undo")
    m = regex.match("/v1/things/a/parts/b/c:undo")
    assert m and m.group(variables[0][0]) == "things/a/parts/b/c"
    assert variables[0][1] == "name"
    assert not regex.match("/v1/things/a:undo")
    regex, variables = _rest.compile_template("/v1/{book.id}")
    assert regex.match("/v1/42") and variables == [("v0", "book.id")]
    with pytest.raises(ValueError):
        _rest.compile_template("v1/no-slash")
    with pytest.raises(ValueError):
        _rest.compile_template("/v1/{unclosed")


# --- the --http option ----------------------------------------------------------------------


@pytest.mark.parametrize("description", [
    "tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp6:8080:interface=\\:\\:",
    "tcp:8080:interface=10.1.2.3"])
def test_http_option_refuses_plain_tcp_beyond_loopback(description):
    with pytest.raises(usage.UsageError) as e:
        tap.HubOptions().parseOptions(["--http", description])
    assert str(e.value).startswith("--http: refusing to serve the management API")
    assert "not a loopback address" in str(e.value)


def test_http_option_accepts_loopback_tls_and_unix():
    for ok in ("tcp:8080:interface=127.0.0.1", "tcp6:8080:interface=\\:\\:1",
               "ssl:8443:privateKey=k.pem:certKey=c.pem", "unix:/tmp/sesame-admin.sock"):
        check_http_endpoint(ok)
    with pytest.raises(ValueError):
        check_http_endpoint("carrier-pigeon:1")
    assert "--http=" in str(tap.HubOptions())  # documented in --help


@pytest_twisted.ensureDeferred
async def test_hub_service_serves_rest_on_http(tmp_path: Path):
    opts = tap.HubOptions()
    opts.parseOptions(["--no-tls", "--listen", "tcp:0:interface=127.0.0.1",
                       "--data-dir", str(tmp_path), "--http", "tcp:0:interface=127.0.0.1"])
    svc = tap.HubService(opts)
    svc.startService()
    try:
        await svc.ready.addTimeout(T, reactor)
        port = await svc.http_ready.addTimeout(T, reactor)
        token = svc.hub.store.create_token("admin")[1]
        agent = Agent(reactor)
        resp = await agent.request(
            b"GET", f"http://127.0.0.1:{port.getHost().port}/v1alpha1/namespaces".encode(),
            Headers({b"authorization": [f"Bearer {token}".encode()]})).addTimeout(T, reactor)
        body = json.loads(await readBody(resp))
        assert resp.code == 200 and [n["name"] for n in body["namespaces"]] == ["namespaces/default"]
        # and the same hub answers the gRPC face
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            listed = admin_pb2_grpc.AdminStub(ch).ListNamespaces(
                admin_pb2.ListNamespacesRequest(),
                metadata=(("authorization", f"Bearer {token}"),), timeout=T)
        assert [n.name for n in listed.namespaces] == ["namespaces/default"]
    finally:
        listener = svc.http_listener
        await svc.stopService()
    assert listener is not None and not listener.connected  # stopService waited for it


# --- review fixes: body limits, JSON errors, the access log ---------------------------


@pytest_twisted.ensureDeferred
async def test_rest_refuses_a_declared_huge_body_before_reading_it(api):
    ns = _uid("huge")
    head = (f"POST /v1alpha1/namespaces?resourceId={ns} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {api.admin}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * MAX_BODY}\r\nExpect: 100-continue\r\n\r\n").encode()
    answer = await raw_http(api, head)  # no body sent: the server answers the head alone
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Content Too Large", answer[:200]
    assert b"100 Continue" not in answer
    err = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert err["error"]["code"] == 413 and str(MAX_BODY) in err["error"]["message"]
    code, _, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_rest_refuses_a_chunked_body_over_the_limit(api):
    ns = _uid("chunky")
    head = (f"POST /v1alpha1/namespaces?resourceId={ns} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {api.admin}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b" " * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 1)
    answer = await raw_http(api, head, (b"1\r\n{\r\n", *chunks, b"1\r\n}\r\n0\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == 413
    code, _, _ = await api.rest("GET", f"/v1alpha1/namespaces/{ns}")
    assert code == 404
    # the same request under the limit is served
    small = await raw_http(api, head.replace(b"Host: x", b"Host: x\r\nConnection: close"),
                           (b"1\r\n{\r\n", chunks[0], b"1\r\n}\r\n0\r\n\r\n"))
    assert small.startswith(b"HTTP/1.1 200 "), small[:200]
    await api.rest("DELETE", f"/v1alpha1/namespaces/{ns}")


@pytest_twisted.ensureDeferred
async def test_rest_deeply_nested_json_is_400_not_500(api):
    for raw in (b"[" * 200_000 + b"]" * 200_000,
                b'{"remote": ' * 50_000 + b"1" + b"}" * 50_000):
        code, err, _ = await api.rest(
            "POST", "/v1alpha1/namespaces/default/remotes?resourceId=deep", raw=raw)
        assert code == 400 and err["error"]["status"] == "INVALID_ARGUMENT", err


@pytest_twisted.ensureDeferred
async def test_rest_json_errors_name_the_field(api):
    base = "/v1alpha1/namespaces/default/remotes"
    code, err, _ = await api.rest("GET", f"{base}?pageSize=abc")
    assert code == 400 and "page_size" in _violations(err), err
    code, err, _ = await api.rest("GET", f"{base}?page_size=99999999999")
    assert code == 400 and "page_size" in _violations(err), err
    code, err, _ = await api.rest("POST", f"{base}?resourceId=f1", {"displayName": 7})
    assert code == 400 and "remote.display_name" in _violations(err), err
    code, err, _ = await api.rest("POST", f"{base}?resourceId=f1", {"createTime": "yesterday"})
    assert code == 400 and "remote.create_time" in _violations(err), err
    code, err, _ = await api.rest("POST", f"{base}?resourceId=f1", {"colour": "red"})
    assert code == 400 and "remote.colour" in _violations(err), err
    code, err, _ = await api.rest("POST", f"{base}?resourceId=f1", [1, 2])
    assert code == 400 and "remote" in _violations(err), err
    code, err, _ = await api.rest("POST", "/v1alpha1/tokens", {"kind": ["client"]})
    assert code == 400 and "token.kind" in _violations(err), err


@pytest_twisted.ensureDeferred
async def test_access_log_masks_a_token_pasted_into_a_path(api):
    secret = "S3cretPart" * 4
    lines: list[str] = []

    def observe(event: dict) -> None:
        text = formatEvent(event)  # the access log is legacy log.logfile output (log_io)
        if "/v1alpha1/tokens/" in text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        code, _, _ = await api.rest("GET", f"/v1alpha1/tokens/ses_0123456789ab_{secret}")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert code == 400
    assert lines and all(secret not in line for line in lines), lines
    assert any("/v1alpha1/tokens/ses_0123456789ab_***" in line for line in lines), lines
