"""The bridge: every thread sesame starts lives here.

One grpc.aio event loop (the reactor's own loop under Twisted's asyncio reactor, else one
dedicated thread), the batched hand-off between it and the reactor (:class:`Hop`), the
per-call adapters that move messages between grpc.aio calls and the reactor
(:class:`LoopCall` and friends) and :class:`TunnelConnection`, which runs a
:class:`~sesame.core.TunnelCore` over one outer gRPC stream.  Internal: the names below
are the API of the layers above (``sesame.tunnel``, ``sesame.netconn``, the hub).
"""

from __future__ import annotations

from sesame.bridge._calls import (
    HIGH_WATER,
    LOW_WATER,
    AioLoopCall,
    EndCallback,
    LoopCall,
    MessageCallback,
    TunnelLoopCall,
)
from sesame.bridge._codes import grpc_code
from sesame.bridge._connection import (
    DRAIN_IDLE,
    DRAIN_LIMIT,
    ClientOuter,
    OuterStream,
    ServerOuter,
    StreamHandler,
    StreamOuter,
    TunnelConnection,
    drain_requests,
    unwrap_tunnel,
    wrap_tunnel,
)
from sesame.bridge._hop import (
    Hop,
    reactor_inbox,
)
from sesame.bridge._loop import (
    Bridge,
    Inbox,
    get_bridge,
    loop_inbox,
    to_deferred,
)
from sesame.bridge._write import write_now

__all__ = [
    "write_now",
    "AioLoopCall",
    "Bridge",
    "ClientOuter",
    "DRAIN_IDLE",
    "DRAIN_LIMIT",
    "EndCallback",
    "HIGH_WATER",
    "Hop",
    "Inbox",
    "LOW_WATER",
    "LoopCall",
    "MessageCallback",
    "OuterStream",
    "ServerOuter",
    "StreamHandler",
    "StreamOuter",
    "TunnelConnection",
    "TunnelLoopCall",
    "drain_requests",
    "get_bridge",
    "grpc_code",
    "loop_inbox",
    "reactor_inbox",
    "to_deferred",
    "unwrap_tunnel",
    "wrap_tunnel",
]
