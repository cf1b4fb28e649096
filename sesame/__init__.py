"""
sesame: reverse tunnels and NAT traversal over gRPC streams, Twisted-native.

This package imports nothing but the standard library: every ``clientFromString`` loads
it through the endpoint plugins, so it stays free.  :func:`choose_grpc_io` picks grpcio's
I/O engine for this process; call it before anything imports grpc.  The layers, bottom first (a test keeps imports
pointing down): ``sesame.core`` (sans-IO tunnel state machines), ``sesame.bridge``
(every thread), ``sesame.tunnel`` (gRPC over a tunnel), ``sesame.netconn`` (TCP over
gRPC), ``sesame.relay`` / ``sesame.remote`` / ``sesame.endpoints`` / ``sesame.forward``,
``sesame.hub`` and the entry points ``sesame.cli`` and ``sesame.tap``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__version__ = "0.1.0.dev0"


def choose_grpc_io(environ: MutableMapping[str, str] | None = None,
                   version: tuple[int, int] | None = None) -> str:
    """Pick grpcio's I/O engine for this process before grpc is imported: see
    :func:`sesame._grpcio.choose_grpc_io` (imported only when called)."""
    from sesame._grpcio import choose_grpc_io as choose

    return choose(environ, version)


__all__ = ["__version__", "choose_grpc_io"]
