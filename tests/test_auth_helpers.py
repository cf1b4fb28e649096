"""
The merged auth helpers: one bearer parser (:func:`sesame._names.parse_bearer`) under the
gRPC metadata reader (:func:`sesame._names.bearer`) and the twisted.web one
(:func:`sesame.hub._auth.bearer_token`), and one token check
(:func:`sesame.hub._auth.authorize`) under the hub's four doors.

The parsers are checked against verbatim copies of the three they replaced, over a
corpus of header values, so "the same inputs accepted and rejected" is a test, not a
claim.  The two rules differ (gRPC metadata: exactly ``Bearer ``, an empty token is
``""``; HTTP: any case, whitespace ignored, an empty token is None), and each caller
keeps its own.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sesame import _names as N
from sesame.hub import _auth
from sesame.hub._auth import ADMIN, UNAUTHENTICATED_MESSAGE, Need, Refused, authorize
from sesame.hub.store import SQLiteStore

# --- the replaced copies, verbatim (the oracles) -----------------------------------------


def _old_names_bearer(metadata: tuple) -> str | None:  # sesame/_names.py bearer
    for k, v in metadata or ():
        if k == N.MD_AUTH and isinstance(v, str) and v.startswith("Bearer "):
            return v[7:].strip()
    return None


def _old_dashboard_bearer(request: Any) -> str | None:  # sesame/hub/dashboard.py _bearer
    value = request.getHeader(b"authorization")
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _old_http_bearer_token(request: Any) -> str | None:  # sesame/hub/_http.py bearer_token
    raw = request.getHeader(b"authorization")
    if not raw:
        return None
    value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --- the corpus ------------------------------------------------------------------------------

_PIECES = ["", " ", "  ", "\t", "Bearer", "bearer", "BEARER", "BeArEr", "Basic", "Bearerx",
           "tok", "ses_0123456789ab_secret", "a b"]
#: Every value of up to three pieces (with and without a space between them), plus oddities.
VALUES = sorted({"".join(p) for n in range(4) for p in itertools.product(_PIECES, repeat=n)}
                | {f"{a} {b}" for a in _PIECES for b in _PIECES}
                | {"Bearer\u00a0tok", "Bearer \u00e9t\u00e9", "\u00a0Bearer tok", "Bearer\ntok"})


class _Request:
    def __init__(self, value: Any) -> None:
        self.value = value

    def getHeader(self, name: bytes) -> Any:
        assert name == b"authorization"
        return self.value


def _http_values() -> list[Any]:
    out: list[Any] = [None]
    for v in VALUES:
        out.append(v)
        out.append(v.encode("latin-1", "replace"))
    return out


def test_the_corpus_is_big_enough() -> None:
    assert len(VALUES) > 1500


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v)) for v in [
    "Bearer tok", "bearer tok", "BEARER tok", "  Bearer   tok  ", "Bearer a b", "Bearer",
    "Bearer ", "Bearer   ", "Basic tok", "Bearertok", "Bearer\ttok", " Bearer tok", "",
]])
def test_the_two_rules(value: str) -> None:
    """Where the gRPC metadata rule and the HTTP header rule part ways."""
    http = {"Bearer tok": "tok", "bearer tok": "tok", "BEARER tok": "tok",
            "  Bearer   tok  ": "tok", "Bearer a b": "a b", " Bearer tok": "tok"}
    grpc = {"Bearer tok": "tok", "  Bearer   tok  ": None, "Bearer a b": "a b",
            "Bearer ": "", "Bearer   ": ""}
    assert N.parse_bearer(value) == http.get(value)
    assert N.parse_bearer(value, strict=True) == grpc.get(value)


def test_http_rule_is_the_one_both_twisted_web_copies_had() -> None:
    for raw in _http_values():
        request = _Request(raw)
        want = _old_http_bearer_token(request)
        assert _old_dashboard_bearer(request) == want, raw  # the two copies agreed already
        assert _auth.bearer_token(request) == want, raw
        if isinstance(raw, str) and raw:
            assert N.parse_bearer(raw) == want, raw


def test_grpc_rule_is_the_old_metadata_reader() -> None:
    for v in VALUES:
        md = (("x-other", "Bearer nope"), (N.MD_AUTH, v))
        assert N.bearer(md) == _old_names_bearer(md), v
        assert N.parse_bearer(v, strict=True) == _old_names_bearer(((N.MD_AUTH, v),)), v


@pytest.mark.parametrize("md", [
    None, (), ((N.MD_AUTH, b"Bearer tok"),), ((N.MD_AUTH, "Basic x"), (N.MD_AUTH, "Bearer tok")),
    ((N.MD_AUTH, "Bearer first"), (N.MD_AUTH, "Bearer second")), (("Authorization", "Bearer tok"),),
    ((N.MD_AUTH, "Bearer "), (N.MD_AUTH, "Bearer later")),
])
def test_grpc_metadata_walk_is_unchanged(md: Any) -> None:
    """Non-text values and other schemes are skipped; the first Bearer entry wins, even
    an empty one."""
    assert N.bearer(md) == _old_names_bearer(md)


def test_context_token_reads_the_call_metadata() -> None:
    ctx = SimpleNamespace(invocation_metadata=lambda: ((N.MD_AUTH, "Bearer  tok "),))
    assert _auth.context_token(ctx) == "tok"
    assert _auth.context_token(SimpleNamespace(invocation_metadata=lambda: None)) is None


# --- authorize -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SQLiteStore(tmp_path / "s.db", kdf_iterations=1000)
    yield s
    s.close()


def _tokens(store: Any) -> dict[str, str]:
    store.create_namespace("ns")
    return {
        "admin": store.create_token("admin")[1],
        "remote": store.create_token("remote", remote="edge-1")[1],
        "client": store.create_token("client", pattern="edge-*")[1],
        "other-ns": store.create_token("client", pattern="*", namespace="ns")[1],
    }


@pytest.mark.parametrize("token", [None, "", "ses_0123456789ab_wrong", "garbage"])
def test_no_live_token_is_unauthenticated(store: Any, token: str | None) -> None:
    with pytest.raises(Refused) as err:
        authorize(store, token)
    assert (err.value.code, err.value.message, err.value.reason, err.value.remote) == (
        "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE, UNAUTHENTICATED_MESSAGE, "")
    assert UNAUTHENTICATED_MESSAGE == "missing, invalid or revoked token"  # shown verbatim


def test_a_revoked_token_is_unauthenticated_at_once(store: Any) -> None:
    token = _tokens(store)["admin"]
    assert authorize(store, token, ADMIN).kind == "admin"
    store.revoke(token)
    with pytest.raises(Refused) as err:
        authorize(store, token, ADMIN)
    assert err.value.code == "UNAUTHENTICATED"


def test_any_live_token_without_a_need(store: Any) -> None:
    for kind, token in _tokens(store).items():
        assert authorize(store, token).id == store.verify(token).id, kind


def test_admin_need(store: Any) -> None:
    tokens = _tokens(store)
    assert authorize(store, tokens["admin"], ADMIN).kind == "admin"
    for kind in ("remote", "client", "other-ns"):
        with pytest.raises(Refused) as err:
            authorize(store, tokens[kind], ADMIN)
        assert (err.value.code, err.value.message, err.value.remote) == (
            "PERMISSION_DENIED", "this needs an admin token", "")


#: verb -> (token, namespace, remote, allowed?) asked of it
_NEED_CASES = {
    "register": [("remote", "default", "edge-1", True), ("remote", "default", "edge-2", False),
                 ("remote", "ns", "edge-1", False), ("admin", "default", "edge-1", False),
                 ("client", "default", "edge-1", False)],
    "serve": [("remote", "default", "edge-1", True), ("remote", "default", "edge-9", False)],
    "reach": [("client", "default", "edge-7", True), ("client", "default", "core-1", False),
              ("client", "ns", "edge-7", False), ("other-ns", "ns", "anything", True),
              ("admin", "ns", "anything", True), ("remote", "default", "edge-1", False)],
}


@pytest.mark.parametrize(("verb", "kind", "ns", "remote", "ok"),
                         [(verb, *case) for verb, cases in _NEED_CASES.items() for case in cases])
def test_remote_needs_follow_the_token_rules(store: Any, verb: str, kind: str, ns: str,
                                             remote: str, ok: bool) -> None:
    tokens = _tokens(store)
    info = store.verify(tokens[kind])
    rule = info.may_reach if verb == "reach" else info.may_register
    assert rule(remote, ns) is ok  # the need asks exactly what the hub asked before
    need = Need(verb, ns, remote)
    if ok:
        assert authorize(store, tokens[kind], need) == info
        assert need.check(info) is info
        return
    for call in (lambda: authorize(store, tokens[kind], need), lambda: need.check(info)):
        with pytest.raises(Refused) as err:
            call()
        assert err.value.code == "PERMISSION_DENIED"
        # what the hub's Tunnel / Stream / NetConn answered and counted before
        assert err.value.message == f"this token may not {verb} remote namespaces/{ns}/remotes/{remote}"
        assert err.value.reason == f"token may not {verb} this remote"
        assert err.value.remote == remote


def test_an_unknown_need_is_a_bug(store: Any) -> None:
    with pytest.raises(ValueError, match="unknown need"):
        authorize(store, _tokens(store)["admin"], Need("fly"))


def test_the_twisted_web_adapter_and_authorize(store: Any) -> None:
    """What ``sesame.hub._http.authenticate`` and the dashboard's check are made of."""
    tokens = _tokens(store)
    assert authorize(store, _auth.bearer_token(_Request(f"bearer {tokens['admin']}".encode())),
                     ADMIN).kind == "admin"
    with pytest.raises(Refused) as err:
        authorize(store, _auth.bearer_token(_Request(b"Bearer ")), ADMIN)
    assert err.value.code == "UNAUTHENTICATED"


def test_http_authenticate_maps_refusals_to_api_errors(store: Any) -> None:
    import grpc

    from sesame.hub._http import authenticate
    from sesame.hub.mgmt import ApiError

    tokens = _tokens(store)
    assert authenticate(_Request(f"Bearer {tokens['client']}"), store).kind == "client"
    with pytest.raises(ApiError) as err:
        authenticate(_Request(f"Bearer {tokens['client']}"), store, admin=True)
    assert (err.value.code, err.value.message) == (grpc.StatusCode.PERMISSION_DENIED,
                                                   "this needs an admin token")
    with pytest.raises(ApiError) as err:
        authenticate(_Request(None), store)
    assert (err.value.code, err.value.message) == (grpc.StatusCode.UNAUTHENTICATED,
                                                   "missing, invalid or revoked token")


# --- the hub's cache of verified tokens --------------------------------------------------


def test_verified_tokens_keep_live_tokens_by_keyed_digest(store: Any) -> None:
    now = [100.0]
    cache = _auth.VerifiedTokens(ttl=30.0, size=2, clock=lambda: now[0])
    tokens = _tokens(store)
    info = store.verify(tokens["admin"])
    assert cache.get(tokens["admin"]) is None
    cache.put(tokens["admin"], info)
    assert cache.get(tokens["admin"]) is info
    assert cache.get(tokens["admin"] + "x") is None  # a near miss is not a hit
    assert cache.get(None) is None and cache.get("") is None
    # no secret in what it keeps: keys are digests, never the token text
    assert all(tokens["admin"].encode() not in k for k in cache._entries)
    now[0] += 30.0  # ttl over: checked against the store again
    assert cache.get(tokens["admin"]) is None
    assert len(cache) == 0


def test_verified_tokens_drop_revoked_ids_and_bound_their_size(store: Any) -> None:
    cache = _auth.VerifiedTokens(size=2)
    tokens = _tokens(store)
    infos = {k: store.verify(t) for k, t in tokens.items()}
    kinds = list(tokens)[:3]
    for k in kinds:
        cache.put(tokens[k], infos[k])
    assert len(cache) == 2 and cache.get(tokens[kinds[0]]) is None  # least recent out
    assert cache.drop([infos[kinds[1]].id]) == 1
    assert cache.get(tokens[kinds[1]]) is None
    assert cache.get(tokens[kinds[2]]) is infos[kinds[2]]
    store.revoke(tokens[kinds[2]])
    cache.drop([infos[kinds[2]].id])
    cache.put(tokens[kinds[2]], store.get_token(infos[kinds[2]].id))  # revoked: not kept
    assert cache.get(tokens[kinds[2]]) is None
    cache.put(tokens[kinds[0]], infos[kinds[0]])
    cache.clear()
    assert len(cache) == 0
