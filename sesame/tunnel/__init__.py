"""
gRPC over gRPC: carry any gRPC service over one gRPC stream, either way.

* :func:`open_tunnel` — forward tunnel: this process dials a
  :class:`TunnelHost` and calls the services registered there.
* :class:`ReverseTunnelServer` — reverse tunnel: this process dials out and
  *serves* services that the host calls (the NAT-traversal direction).
* :class:`TunnelHost` — the network-server end, on a ``grpc.aio`` server.
* :class:`ServiceRegistry` — where generated ``add_FooServicer_to_server``
  functions register servicers for a tunnel.

Both wire dialects are spoken: ``dialect="sesame"`` (``sesame.type``,
joeycumines/sesame) and ``dialect="grpctunnel"`` (``grpctunnel.v1``,
jhump/grpctunnel).
"""

from sesame.bridge import Bridge, get_bridge
from sesame.tunnel._channel import TunnelChannel, encode_timeout

# stream_factory and ext_*: for the layers above (remote agent, hub); not in __all__.
from sesame.tunnel._server import (
    ServiceRegistry,
    TunnelServicerContext,
    parse_timeout,
    stream_factory,  # noqa: F401
)

# Used by the layers above (remote agent, hub); not part of the public __all__.
from sesame.tunnel._service import (  # noqa: F401
    DIALECTS,
    EXT_BATCH_KEY,
    PeerExt,
    ReverseTunnelServer,
    TunnelHost,
    ext_apply,
    ext_forward,
    ext_metadata,
    ext_parse,
    open_tunnel,
)

__all__ = [
    "DIALECTS",
    "Bridge",
    "ReverseTunnelServer",
    "ServiceRegistry",
    "TunnelChannel",
    "TunnelHost",
    "TunnelServicerContext",
    "encode_timeout",
    "get_bridge",
    "open_tunnel",
    "parse_timeout",
]
