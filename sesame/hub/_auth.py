"""
The hub's token check, once for all of its doors: ``TunnelService`` and the in-hub
``NetConn`` (:mod:`sesame.hub._hub`), the management API over gRPC and REST
(:mod:`sesame.hub.mgmt`, :func:`sesame.hub._http.authenticate`) and the dashboard's admin
check (:mod:`sesame.hub.dashboard`).

:func:`authorize` turns (token, what is asked: a :class:`Need`) into the live
:class:`~sesame.hub.store.TokenInfo` or a :class:`Refused` that says precisely why: its
``code`` (the gRPC code's name), ``message`` (for the caller) and ``reason`` and
``remote`` (for the auth-failure counter and log).  Each door keeps its own thin adapter
that reads the token (:func:`context_token` of a gRPC call, :func:`bearer_token` of a
twisted.web request) and turns a :class:`Refused` into its own kind of answer.

No grpc, no twisted, no store import here: the ``--http`` option check loads this module
and stays light.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sesame import _names as N

if TYPE_CHECKING:  # pragma: no cover
    from sesame.hub.store import TokenInfo

__all__ = ["ADMIN", "UNAUTHENTICATED_MESSAGE", "Need", "Refused", "authorize", "bearer_token",
           "context_token"]

#: Every door's answer to a missing, malformed, unknown or revoked token (``sesame
#: remotes`` and the CLI show it verbatim).
UNAUTHENTICATED_MESSAGE = "missing, invalid or revoked token"


class Refused(Exception):
    """A token refused.

    ``code`` is the name of the gRPC status code (``UNAUTHENTICATED``: no live token;
    ``PERMISSION_DENIED``: a live token that may not do what was asked), ``message`` what
    the caller is told, ``reason`` what the auth-failure counter and log record, and
    ``remote`` the remote that was asked for ("" when none was).
    """

    def __init__(self, code: str, message: str, reason: str = "", remote: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or message
        self.remote = remote


@dataclass(frozen=True)
class Need:
    """What a live token is asked for.

    ``Need("admin")`` (:data:`ADMIN`): an admin token.  ``Need("register", ns, name)`` and
    ``Need("serve", ns, name)``: a remote token that may register as ``ns/name`` (the
    ``Tunnel`` and ``Stream`` calls); ``Need("reach", ns, name)``: a token that may open
    connections to ``ns/name`` (``NetConn``).
    """

    verb: str
    namespace: str = N.DEFAULT_NAMESPACE
    remote: str = ""

    def allows(self, info: TokenInfo) -> bool:
        if self.verb == "admin":
            return info.kind == "admin" and not info.revoked
        if self.verb in ("register", "serve"):
            return info.may_register(self.remote, self.namespace)
        if self.verb == "reach":
            return info.may_reach(self.remote, self.namespace)
        raise ValueError(f"unknown need {self.verb!r}")

    def check(self, info: TokenInfo) -> TokenInfo:
        """``info`` when it meets this need, else :class:`Refused` (PERMISSION_DENIED)."""
        if self.allows(info):
            return info
        if self.verb == "admin":
            raise Refused("PERMISSION_DENIED", "this needs an admin token")
        raise Refused(
            "PERMISSION_DENIED",
            f"this token may not {self.verb} remote {N.resource_name(self.namespace, self.remote)}",
            f"token may not {self.verb} this remote", self.remote)


#: An admin token.
ADMIN = Need("admin")


def authorize(store: Any, token: str | None, need: Need | None = None) -> TokenInfo:
    """The live token ``token`` is (checked against ``store`` now, so a revocation counts
    at once), meeting ``need`` when one is given.

    :raises Refused: UNAUTHENTICATED when there is no token (None or empty) or the store
        does not know it as a live one; PERMISSION_DENIED from :meth:`Need.check`.
    """
    info = store.verify(token) if token else None
    if info is None:
        raise Refused("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
    return info if need is None else need.check(info)


class VerifiedTokens:
    """Tokens this process verified lately, so a connection does not pay the KDF
    (PBKDF2, ~0.6 ms) and a store read, or with a networked store a round trip, each
    time it opens.

    Keys are a keyed SHA-256 of the whole token (a key made per process): the cache holds
    no secret and cannot be used to check guesses offline.  Only live tokens are kept;
    a wrong or unknown one is checked against the store every time.  An entry lasts
    ``ttl`` seconds at most, and :meth:`drop` removes a token's entries at once (the hub
    calls it for every revocation it learns of, from its poll or the cluster's bus, so a
    revocation is as prompt as it was without the cache).  At most ``size`` entries,
    least recently used out first.
    """

    def __init__(self, ttl: float = 30.0, size: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[TokenInfo, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _k(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def get(self, token: str | None) -> TokenInfo | None:
        """The live token ``token`` was when verified (within ``ttl``), or None."""
        if not token:
            return None
        k = self._k(token)
        hit = self._entries.get(k)
        if hit is None:
            return None
        if hit[1] <= self._clock():
            del self._entries[k]
            return None
        self._entries.move_to_end(k)
        return hit[0]

    def put(self, token: str, info: TokenInfo) -> None:
        """Remember that ``token`` verified as ``info`` (a live token) just now."""
        if info.revoked:
            return
        k = self._k(token)
        self._entries[k] = (info, self._clock() + self.ttl)
        self._entries.move_to_end(k)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, token_ids: Iterable[str]) -> int:
        """Forget the tokens with these ids (revoked); how many entries went."""
        ids = set(token_ids)
        if not ids or not self._entries:
            return 0
        gone = [k for k, (info, _) in self._entries.items() if info.id in ids]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()


def context_token(context: Any) -> str | None:
    """The bearer token of a gRPC call (:func:`sesame._names.bearer` of its metadata)."""
    return N.bearer(tuple(context.invocation_metadata() or ()))


def bearer_token(request: Any) -> str | None:
    """The token of a twisted.web request's ``Authorization: Bearer <token>`` header
    (:func:`sesame._names.parse_bearer`: any case, whitespace ignored), or None."""
    raw = request.getHeader(b"authorization")
    if not raw:
        return None
    return N.parse_bearer(raw.decode("latin-1") if isinstance(raw, bytes) else raw)
