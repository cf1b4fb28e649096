"""
TCP over gRPC: ``sesame.v1alpha1.RemoteControl/NetConn`` with Twisted on
both ends.

* :class:`NetConnServicer` runs on a remote: it answers ``NetConn`` calls by
  dialling (with Twisted, behind an :class:`~sesame.netconn._allowlist.Allowlist`
  that denies by default) and relaying bytes both ways.
* :func:`connectNetConn` / :class:`NetConnClientEndpoint` give a Twisted
  protocol a transport whose far end is a TCP connection made by the remote.
* :func:`splice` relays a plain TCP socket and a NetConn connection on the
  bridge loop alone (what the hub's port maps and ``sesame forward`` do when
  they can, :func:`can_splice`): no thread hand-off per chunk.

The gRPC side lives on the bridge loop, the Twisted side on the reactor;
:class:`~sesame.bridge._hop.Hop` moves batches between them.  Queued writes are
coalesced into messages of up to :data:`MAX_MESSAGE` bytes.  Both
directions have high/low water marks, so a slow reader at either end pauses
the writer at the other and nothing buffers without bound.

Wire behaviour (PROTOCOL.md §4): one ``dial`` first, one ``conn`` reply,
then ``bytes`` both ways.  Half-close is real TCP half-close: the client's
``loseWriteConnection`` half-closes the call, and the remote shuts down the
write side of its target socket while relaying the answer until the target
closes.  A target that half-closes its side is announced with an empty
``NetConnResponse`` (a non-``bytes`` message means end-of-stream to every
NetConn reader) and the call stays open for the client's remaining bytes.
"""

from __future__ import annotations

from sesame.netconn._address import NetConnAddress, NetConnError

# AddressError .. parse_port, HIGH_WATER, MAX_MESSAGE: also for the layers above
# (endpoints, the agent, twistd options); not in __all__.
from sesame.netconn._allowlist import AddressError, Allowlist, PatternError, parse_port  # noqa: F401
from sesame.netconn._client import (
    NetConnClientEndpoint,
    aio_call_factory,
    connectNetConn,
    tunnel_call_factory,
)
from sesame.netconn._servicer import NetConnServicer
from sesame.netconn._splice import SpliceHooks, can_splice, splice, splice_count
from sesame.netconn._transport import NetConnTransport
from sesame.netconn._wire import HIGH_WATER, MAX_MESSAGE, METHOD  # noqa: F401

__all__ = [
    "METHOD",
    "NetConnAddress",
    "NetConnClientEndpoint",
    "NetConnError",
    "NetConnServicer",
    "NetConnTransport",
    "SpliceHooks",
    "aio_call_factory",
    "can_splice",
    "connectNetConn",
    "splice",
    "splice_count",
    "tunnel_call_factory",
]
