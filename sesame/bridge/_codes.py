"""gRPC status codes by number: the one map from a wire code (``Status.code``) to
:class:`grpc.StatusCode`, for every layer above that hands a status to grpc."""

from __future__ import annotations

import grpc

_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def grpc_code(number: int, default: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` numbered ``number``; ``default`` (UNKNOWN unless
    given) for a number grpc has no code for."""
    return _BY_NUMBER.get(number, default)
