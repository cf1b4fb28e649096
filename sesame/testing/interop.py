"""Servicers for ``sesame.testing.TestService``, a test service shaped after the gRPC interop one.

Two implementations with the same behaviour: :class:`InteropServicer` for ``grpc.server``
(thread pool) and :class:`AsyncInteropServicer` for ``grpc.aio.server``.

Behaviour, per method:

* every method first echoes request metadata as the gRPC interop ``custom_metadata`` case
  expects: keys starting with ``x-grpc-test-echo-initial`` are sent back as response headers,
  keys starting with ``x-grpc-test-echo-trailing-bin`` as trailers (also on failure);
* ``EmptyCall`` returns ``Empty``;
* ``UnaryCall`` waits ``sleep_ms`` (giving up early if the call ends), fails with
  ``response_status`` when its code is non-zero, else returns ``response_size`` zero bytes;
* ``StreamingOutputCall`` sends one response of ``size`` zero bytes per ``ResponseParameters``
  (each after waiting ``interval_us``), then fails with ``response_status`` if it is non-zero;
* ``StreamingInputCall`` returns the summed payload body sizes;
* ``FullDuplexCall`` answers each request as it arrives: fails with its ``response_status`` if
  non-zero, else sends one response per ``ResponseParameters``;
* ``HalfDuplexCall`` does the same, but only after the client half-closed;
* ``UnimplementedCall`` is left to the generated base class (``UNIMPLEMENTED``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from sesame.testing import interop_pb2, interop_pb2_grpc

__all__ = [
    "ECHO_INITIAL_PREFIX",
    "ECHO_TRAILING_PREFIX",
    "AsyncInteropServicer",
    "InteropServicer",
    "add_servicer",
    "add_async_servicer",
]

#: Request metadata keys with this prefix are echoed back as response headers.
ECHO_INITIAL_PREFIX = "x-grpc-test-echo-initial"
#: Request metadata keys with this prefix are echoed back as trailers.
ECHO_TRAILING_PREFIX = "x-grpc-test-echo-trailing-bin"

Metadata = tuple[tuple[str, str | bytes], ...]

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def _echoed(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[Metadata, Metadata]:
    """Split request metadata into the (initial, trailing) metadata to echo back."""
    initial: list[tuple[str, str | bytes]] = []
    trailing: list[tuple[str, str | bytes]] = []
    for key, value in metadata or ():
        if key.startswith(ECHO_INITIAL_PREFIX):
            initial.append((key, value))
        elif key.startswith(ECHO_TRAILING_PREFIX):
            trailing.append((key, value))
    return tuple(initial), tuple(trailing)


def _payload(size: int) -> interop_pb2.Payload:
    return interop_pb2.Payload(body=b"\0" * max(size, 0))


def _failure(
    request: interop_pb2.SimpleRequest | interop_pb2.StreamingOutputCallRequest,
) -> tuple[grpc.StatusCode, str] | None:
    """The (code, message) a request asks the call to fail with, or None."""
    if not request.HasField("response_status") or request.response_status.code == 0:
        return None
    return _status_code(request.response_status.code), request.response_status.message


def _total_size(requests: Iterable[interop_pb2.StreamingInputCallRequest]) -> int:
    return sum(len(r.payload.body) for r in requests)


# --------------------------------------------------------------------------------------------
# Synchronous servicer
# --------------------------------------------------------------------------------------------


def _echo(context: grpc.ServicerContext) -> None:
    initial, trailing = _echoed(context.invocation_metadata())
    if initial:
        context.send_initial_metadata(initial)
    if trailing:
        context.set_trailing_metadata(trailing)


class _CallEnd:
    """Lets a handler wait without outliving its RPC (cancellation, deadline, shutdown)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._ended: threading.Event | None = None

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the RPC ends first; return whether it is still going."""
        if seconds <= 0:
            return self._context.is_active()
        if self._ended is None:  # register the termination callback once, on first use
            self._ended = threading.Event()
            if not self._context.add_callback(self._ended.set):
                self._ended.set()  # already terminated
        return not self._ended.wait(seconds)


def _stream_responses(
    end: _CallEnd, parameters: Sequence[interop_pb2.ResponseParameters]
) -> Iterator[interop_pb2.StreamingOutputCallResponse]:
    for params in parameters:
        if not end.wait(params.interval_us / 1e6):
            return
        yield interop_pb2.StreamingOutputCallResponse(payload=_payload(params.size))


def _answer(
    context: grpc.ServicerContext, end: _CallEnd, request: interop_pb2.StreamingOutputCallRequest
) -> Iterator[interop_pb2.StreamingOutputCallResponse]:
    failure = _failure(request)
    if failure is not None:
        context.abort(*failure)
    yield from _stream_responses(end, request.response_parameters)


class InteropServicer(interop_pb2_grpc.TestServiceServicer):
    """``TestService`` for synchronous (thread pool) ``grpc.server`` instances."""

    def EmptyCall(self, request: empty_pb2.Empty, context: grpc.ServicerContext) -> empty_pb2.Empty:
        _echo(context)
        return empty_pb2.Empty()

    def UnaryCall(
        self, request: interop_pb2.SimpleRequest, context: grpc.ServicerContext
    ) -> interop_pb2.SimpleResponse:
        _echo(context)
        if request.sleep_ms > 0 and not _CallEnd(context).wait(request.sleep_ms / 1000):
            return interop_pb2.SimpleResponse()  # the call is over; nobody will read this
        failure = _failure(request)
        if failure is not None:
            context.abort(*failure)
        return interop_pb2.SimpleResponse(payload=_payload(request.response_size))

    def StreamingOutputCall(
        self, request: interop_pb2.StreamingOutputCallRequest, context: grpc.ServicerContext
    ) -> Iterator[interop_pb2.StreamingOutputCallResponse]:
        _echo(context)
        yield from _stream_responses(_CallEnd(context), request.response_parameters)
        failure = _failure(request)
        if failure is not None and context.is_active():
            context.abort(*failure)

    def StreamingInputCall(
        self,
        request_iterator: Iterator[interop_pb2.StreamingInputCallRequest],
        context: grpc.ServicerContext,
    ) -> interop_pb2.StreamingInputCallResponse:
        _echo(context)
        return interop_pb2.StreamingInputCallResponse(
            aggregated_payload_size=_total_size(request_iterator)
        )

    def FullDuplexCall(
        self,
        request_iterator: Iterator[interop_pb2.StreamingOutputCallRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[interop_pb2.StreamingOutputCallResponse]:
        _echo(context)
        end = _CallEnd(context)
        for request in request_iterator:
            yield from _answer(context, end, request)

    def HalfDuplexCall(
        self,
        request_iterator: Iterator[interop_pb2.StreamingOutputCallRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[interop_pb2.StreamingOutputCallResponse]:
        _echo(context)
        requests = list(request_iterator)  # returns once the client half-closes
        end = _CallEnd(context)
        for request in requests:
            yield from _answer(context, end, request)


# --------------------------------------------------------------------------------------------
# asyncio servicer
# --------------------------------------------------------------------------------------------


async def _async_echo(context: grpc.aio.ServicerContext) -> None:
    initial, trailing = _echoed(context.invocation_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    if trailing:
        context.set_trailing_metadata(trailing)


async def _async_stream_responses(
    parameters: Sequence[interop_pb2.ResponseParameters],
) -> AsyncIterator[interop_pb2.StreamingOutputCallResponse]:
    for params in parameters:
        if params.interval_us > 0:
            await asyncio.sleep(params.interval_us / 1e6)  # cancelled with the RPC
        yield interop_pb2.StreamingOutputCallResponse(payload=_payload(params.size))


async def _async_answer(
    context: grpc.aio.ServicerContext, request: interop_pb2.StreamingOutputCallRequest
) -> AsyncIterator[interop_pb2.StreamingOutputCallResponse]:
    failure = _failure(request)
    if failure is not None:
        await context.abort(*failure)
    async for response in _async_stream_responses(request.response_parameters):
        yield response


class AsyncInteropServicer(interop_pb2_grpc.TestServiceServicer):
    """``TestService`` for ``grpc.aio.server`` instances; same behaviour as InteropServicer."""

    async def EmptyCall(  # type: ignore[override]
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await _async_echo(context)
        return empty_pb2.Empty()

    async def UnaryCall(  # type: ignore[override]
        self, request: interop_pb2.SimpleRequest, context: grpc.aio.ServicerContext
    ) -> interop_pb2.SimpleResponse:
        await _async_echo(context)
        if request.sleep_ms > 0:
            await asyncio.sleep(request.sleep_ms / 1000)  # cancelled with the RPC
        failure = _failure(request)
        if failure is not None:
            await context.abort(*failure)
        return interop_pb2.SimpleResponse(payload=_payload(request.response_size))

    async def StreamingOutputCall(  # type: ignore[override]
        self, request: interop_pb2.StreamingOutputCallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[interop_pb2.StreamingOutputCallResponse]:
        await _async_echo(context)
        async for response in _async_stream_responses(request.response_parameters):
            yield response
        failure = _failure(request)
        if failure is not None:
            await context.abort(*failure)

    async def StreamingInputCall(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[interop_pb2.StreamingInputCallRequest],
        context: grpc.aio.ServicerContext,
    ) -> interop_pb2.StreamingInputCallResponse:
        await _async_echo(context)
        total = 0
        async for request in request_iterator:
            total += len(request.payload.body)
        return interop_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    async def FullDuplexCall(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[interop_pb2.StreamingOutputCallRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[interop_pb2.StreamingOutputCallResponse]:
        await _async_echo(context)
        async for request in request_iterator:
            async for response in _async_answer(context, request):
                yield response

    async def HalfDuplexCall(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[interop_pb2.StreamingOutputCallRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[interop_pb2.StreamingOutputCallResponse]:
        await _async_echo(context)
        requests = [request async for request in request_iterator]
        for request in requests:
            async for response in _async_answer(context, request):
                yield response


def add_servicer(server: grpc.Server, servicer: InteropServicer | None = None) -> InteropServicer:
    """Register ``TestService`` (a new :class:`InteropServicer` by default) on ``server``."""
    servicer = servicer if servicer is not None else InteropServicer()
    interop_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    return servicer


def add_async_servicer(
    server: grpc.aio.Server, servicer: AsyncInteropServicer | None = None
) -> AsyncInteropServicer:
    """Register ``TestService`` (a new :class:`AsyncInteropServicer` by default) on ``server``."""
    servicer = servicer if servicer is not None else AsyncInteropServicer()
    interop_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    return servicer
