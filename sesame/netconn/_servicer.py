"""
:class:`NetConnServicer`, the remote's ``RemoteControl.NetConn`` service: it
reads the ``dial``, has :mod:`._dialer` check and connect, answers ``conn``,
then runs the :mod:`._relay` pumps until the target or the call is gone.

Every call ends with a status, whatever happens: hostile input gets
INVALID_ARGUMENT naming the problem, and an exception nobody expected (on the
loop, on the reactor while dialling, in a pump) ends the call with INTERNAL
and is logged, instead of leaving it open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure

from sesame.bridge import Bridge, Hop, grpc_code
from sesame.core import OK, Status
from sesame.netconn._address import _netaddr
from sesame.netconn._allowlist import Allowlist
from sesame.netconn._dialer import (
    DEFAULT_DIAL_TIMEOUT,
    _check_dial,
    _dial,
    _dial_status,
    _unexpected,
    _where,
)
from sesame.netconn._relay import (
    _Handover,
    _LoopTarget,
    _ReactorTarget,
    _ServerRelay,
    _TargetProtocol,
    _UpProducer,
    drop_handover,
    loop_targets_enabled,
)
from sesame.netconn._wire import METHOD
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb


class NetConnServicer:
    """
    Serves ``RemoteControl.NetConn``: dial behind ``allow``, relay bytes.

    Register it with :meth:`add_to` on a ``grpc.aio`` server running on the
    bridge loop, or on a :class:`~sesame.tunnel.ServiceRegistry` to serve it
    over tunnels.  ``active`` counts the calls relaying at the moment.

    :param allow: an :class:`~sesame.netconn._allowlist.Allowlist`, or its
        patterns (``HOST:PORTS``); the empty list denies everything.
    :param reactor: the reactor that dials and owns the target connections;
        the global one by default.
    :param bridge: the bridge whose loop runs the handlers; the process-wide
        one by default.
    :param default_timeout: the dial timeout in seconds when a ``dial`` gives none.
    :raises ~sesame.netconn.PatternError: a pattern of ``allow`` does not parse.
    """

    log = Logger()

    def __init__(self, allow: Allowlist | Sequence[str] = (), *, reactor: Any = None,
                 bridge: Bridge | None = None, default_timeout: float = DEFAULT_DIAL_TIMEOUT) -> None:
        self.allow = allow if isinstance(allow, Allowlist) else Allowlist(allow)
        self._reactor = reactor
        self._bridge = bridge
        self.default_timeout = default_timeout
        self.active = 0

    @property
    def hop(self) -> Hop:
        """The hand-off between this servicer's bridge loop and its reactor."""
        return Hop.get(self._reactor, self._bridge)

    def handler(self) -> grpc.GenericRpcHandler:
        """
        A generic RPC handler serving :data:`METHOD` with :meth:`NetConn` (and
        nothing else).

        :returns: a ``grpc.GenericRpcHandler`` for ``add_generic_rpc_handlers``.
        """
        return _NetConnHandler(self)

    def add_to(self, server: Any) -> None:
        """
        Serve NetConn on ``server``.

        :param server: a ``grpc.aio.Server`` (running on the bridge loop), or
            anything with ``add_generic_rpc_handlers``, e.g. a
            :class:`~sesame.tunnel.ServiceRegistry`.
        """
        server.add_generic_rpc_handlers((self.handler(),))

    async def NetConn(self, request_iterator: Any, context: Any) -> None:
        """
        The stream-stream handler of one call (runs on the bridge loop).

        Reads the ``dial``, checks it against :attr:`allow`, dials the target on
        the reactor, answers ``conn`` with the local and target addresses, then
        relays ``bytes`` both ways until the target closes.  A client half-close
        becomes a TCP half-close of the target; a target half-close is announced
        with an empty ``NetConnResponse``.  When the call ends for any other
        reason (cancelled, client gone), the target connection is aborted.

        :param request_iterator: not used (the handler reads with ``context.read()``).
        :param context: the call's ``grpc.aio`` servicer context.
        :returns: when the target has closed cleanly (status ``OK``).
        :raises grpc.aio.AbortError: through ``context.abort``: ``INVALID_ARGUMENT``
            (no dial first, bad address or network, a message that does not parse),
            ``PERMISSION_DENIED`` (not allowed), ``UNAVAILABLE`` (refused, unresolvable,
            unreachable, target lost mid-stream), ``DEADLINE_EXCEEDED`` (dial timeout),
            ``CANCELLED``, ``INTERNAL`` (an unexpected exception, logged).
        """
        hop = self.hop
        try:
            await self._serve(hop, context)
        except _Refusal as r:
            await context.abort(r.code, _capped(r.details))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it is, the call must end
            if context.done():
                raise  # over already (cancelled, client gone): nothing to settle
            hop.to_reactor(self._log_unexpected, Failure(), "NetConn call failed unexpectedly")
            await context.abort(grpc.StatusCode.INTERNAL, _capped(
                f"NetConn failed unexpectedly: {type(exc).__name__}: {exc}"))

    def _log_unexpected(self, failure: Failure, why: str, **fields: Any) -> None:
        """(reactor) Log what ended a call with INTERNAL."""
        self.log.failure(why, failure, **fields)

    async def _serve(self, hop: Hop, context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "no dial request before end of stream")
        try:
            req = rc_pb.NetConnRequest.FromString(first)
        except DecodeError as exc:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the first message does not parse as a NetConnRequest: {exc}") from None
        if req.WhichOneof("data") != "dial":
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first NetConn request must be a dial")
        status, host, port = self._check(req.dial)
        if status is not None:
            raise _Refusal(grpc_code(status.code), status.message)
        timeout = self.default_timeout
        if req.dial.HasField("timeout"):
            t = req.dial.timeout.seconds + req.dial.timeout.nanos / 1e9
            if t > 0:
                timeout = t
        relay = _ServerRelay(hop, context)
        fut: asyncio.Future[Any] = relay.loop.create_future()
        dialled = _where(host, port)
        # the target joins the loop unless the reactor runs on this very loop already
        on_loop = (loop_targets_enabled() and not hop.same_loop()
                   and isinstance(hop.reactor, PosixReactorBase))  # whose TCP has .socket
        build = _Handover if on_loop else (lambda: _TargetProtocol(relay))

        def failed(f: Failure) -> None:
            if _unexpected(f):
                self._log_unexpected(f, "NetConn dial of {where} failed unexpectedly",
                                     where=dialled)
            hop.to_loop(_settle, fut, None, f)

        def dial_in_reactor() -> None:
            # Every outcome settles ``fut``, an exception too: one escaping from here would
            # only be logged by the hand-off, and the call would wait for ``fut`` for ever.
            try:
                d = _dial(hop.reactor, self.allow, req.dial.address.network or "tcp", host,
                          port, timeout, build)
            except Exception:  # noqa: BLE001 - settles the call with INTERNAL (logged)
                d = defer.fail()
            d.addCallbacks(lambda proto: (hop.to_loop(_settle, fut, proto, None), proto)[1],
                           failed)
            relay.dial_deferred = d

        hop.to_reactor(dial_in_reactor)
        try:
            proto = await fut
        except asyncio.CancelledError:
            # posted after dial_in_reactor, so it runs after it: cancels the dial, or closes
            # a connection that was made while the cancellation was on its way
            hop.to_reactor(_abandon_dial, relay)
            if fut.done():  # settled, then cancelled before this resumed: nobody adopts it
                drop_handover(fut.result())
            raise
        if isinstance(proto, Failure):
            st = _dial_status(proto, dialled, timeout)
            raise _Refusal(grpc_code(st.code), st.message)
        if on_loop:
            if proto.sock is None:
                raise _Refusal(grpc.StatusCode.UNAVAILABLE, f"{dialled}: {proto.error}")
            local, remote = proto.host, proto.peer
            target: _LoopTarget | _ReactorTarget = await _LoopTarget.attach(relay, proto.sock)
        else:
            local, remote = proto.transport.getHost(), proto.transport.getPeer()
            target = _ReactorTarget(hop, proto.transport)
            hop.to_reactor(proto.transport.registerProducer, _UpProducer(relay), True)
        relay.target = target
        self.active += 1
        up: asyncio.Task[None] | None = None
        try:  # from here on, however the handler ends, the target connection goes with it
            await context.write(rc_pb.NetConnResponse(conn=rc_pb.NetConnResponse.Conn(
                local=_netaddr(local), remote=_netaddr(remote),
            )).SerializeToString())
            up = relay.loop.create_task(relay.pump_up())
            status = await relay.run_down()
        finally:
            self.active -= 1
            if up is not None:
                up.cancel()
            if relay._target_gone is None:
                target.abort()
        if relay.unexpected is not None:
            hop.to_reactor(lambda f: self._log_unexpected(
                f, "NetConn relay to {where} failed unexpectedly", where=dialled), relay.unexpected)
        if status.code != OK:
            raise _Refusal(grpc_code(status.code), status.message)

    def _check(self, dial: Any) -> tuple[Status | None, str, int]:
        return _check_dial(self.allow, dial)


class _Refusal(Exception):
    """How :meth:`NetConnServicer._serve` ends a call with a status (``NetConn`` aborts the
    call with it): told apart from what nobody expected, whatever the context's ``abort``
    raises (grpc.aio and the tunnels' contexts raise different exceptions)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


#: Status messages longer than this are cut: gRPC percent-encodes non-ASCII (up to 9 bytes
#: a character) and refuses trailers over 8 KiB, so a long message would reach the client
#: as RESOURCE_EXHAUSTED instead of the status.
MAX_STATUS_MESSAGE = 512


def _capped(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return message[:MAX_STATUS_MESSAGE - 3] + "..."


def _abandon_dial(relay: _ServerRelay) -> None:
    """Reactor: the call ended during the dial; cancel it or drop what it connected."""
    d = getattr(relay, "dial_deferred", None)
    if d is None:
        return
    d.cancel()
    d.addCallback(lambda proto: proto.transport.abortConnection() if proto is not None else None)
    d.addErrback(lambda f: None)


def _settle(fut: asyncio.Future, value: Any, failure: Failure | None) -> None:
    if not fut.done():
        fut.set_result(failure if failure is not None else value)
    else:
        drop_handover(value)  # the call went while its socket was on the way


class _NetConnHandler(grpc.GenericRpcHandler):
    def __init__(self, servicer: NetConnServicer) -> None:
        self._h = grpc.stream_stream_rpc_method_handler(servicer.NetConn)

    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        return self._h if details.method == METHOD else None
