"""
Writing to a plain TCP transport at once.

Twisted's ``transport.write`` never sends: it queues the bytes, asks the reactor
to watch the socket for writability (an ``epoll_ctl``), sends them on the next
reactor turn and stops watching (another ``epoll_ctl``).  A relay that moves
each chunk as it arrives pays that on every chunk, and its latency is one
reactor turn more per hop.  :func:`write_now` sends straight away when the
transport has nothing queued and hands Twisted only what the socket did not
take, so ordering, backpressure and error handling stay Twisted's.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import tcp

_PLAIN = (tcp.Server, tcp.Client)
#: ``SESAME_DIRECT_WRITES=0`` turns it off (for A/B measurements)
ENABLED = os.environ.get("SESAME_DIRECT_WRITES", "1") != "0"


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)`` (reactor thread), sending at once where that is safe:
    a plain (not TLS) connected TCP transport with nothing queued and its write side
    open.  Anything else, and whatever the socket does not take, goes through
    ``transport.write``."""
    if (ENABLED and data and type(transport) in _PLAIN and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not getattr(transport, "_tempDataBuffer", True)
            and not getattr(transport, "TLS", True)
            and not getattr(transport, "_writeDisconnecting", True)
            and not getattr(transport, "_writeDisconnected", True)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted reports on its own next turn
            sent = 0
        if sent >= len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


__all__ = ["write_now"]
