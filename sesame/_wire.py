"""
Zero-parse helpers for messages that are one length-delimited field.

The hot paths wrap and unwrap such messages on every chunk (NetConn
``bytes``, Stream ``tunnel``); building or parsing a protobuf object for
that would copy the payload twice.  Anything that is not exactly one such
field is left to protobuf by the callers.
"""

from __future__ import annotations

from typing import Any


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def wrap_field(tag: int, payload: bytes) -> bytes:
    """``payload`` as the only field of a message (``tag`` = field << 3 | 2)."""
    return bytes((tag,)) + varint(len(payload)) + payload


def only_field(msg: Any, tag: int) -> Any:
    """The payload when ``msg`` is exactly one length-delimited ``tag`` field, else None
    (a slice of ``msg``: a copy of bytes, a view into a memoryview)."""
    if not msg or msg[0] != tag:
        return None
    n = shift = 0
    i = 1
    end = len(msg)
    while i < end:
        b = msg[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    return msg[i:] if i + n == end else None
