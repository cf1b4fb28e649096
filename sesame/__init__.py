"""
sesame: reverse tunnels and NAT traversal over gRPC streams, Twisted-native.

This package imports nothing else: every ``clientFromString`` loads it through the
endpoint plugins, so it stays free.  The layers, bottom first (a test keeps imports
pointing down): ``sesame.core`` (sans-IO tunnel state machines), ``sesame.bridge``
(every thread), ``sesame.tunnel`` (gRPC over a tunnel), ``sesame.netconn`` (TCP over
gRPC), ``sesame.relay`` / ``sesame.remote`` / ``sesame.endpoints`` / ``sesame.forward``,
``sesame.hub`` and the entry points ``sesame.cli`` and ``sesame.tap``.
"""

__version__ = "0.1.0.dev0"
