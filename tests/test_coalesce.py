"""
Coalescing of relayed bytes into NetConn messages while the carrier is busy writing.

:class:`sesame.netconn._wire.Coalescer` against a writer the test plays (busy or idle,
done when the test says), and the two carriers' ``after_write``: a tunnel's writer
(:meth:`sesame.bridge.TunnelConnection.after_write`, real asyncio loop, an outer call
whose writes finish when the test says) and a served tunnel stream's ``flushed``.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from sesame.bridge import TunnelConnection
from sesame.bridge._connection import StreamOuter
from sesame.core import Role, SesameCodec
from sesame.hub.metrics import payload_len
from sesame.netconn._wire import MAX_MESSAGE, Coalescer, decode_bytes, encode_bytes
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from sesame.v1alpha1 import tunnel_pb2


class Writer:
    """The carrier as the coalescer sees it: busy or idle, and its after-write callbacks."""

    def __init__(self) -> None:
        self.busy = False
        self.sent: list[bytes] = []
        self.waiting: list[Callable[[], None]] = []

    def send(self, msg: bytes) -> None:
        self.sent.append(msg)
        self.busy = True  # what was just sent is being written

    def after_write(self, cb: Callable[[], None]) -> bool:
        if not self.busy:
            return False
        self.waiting.append(cb)
        return True

    def done(self) -> None:
        """The writer wrote everything: idle, then the callbacks (which may send again)."""
        self.busy = False
        cbs, self.waiting = self.waiting, []
        for cb in cbs:
            cb()

    def payloads(self) -> list[bytes]:
        out = []
        for m in self.sent:
            data = decode_bytes(m, rc_pb.NetConnRequest)
            assert data is not None
            out.append(bytes(data))
        return out


def test_idle_writer_sends_at_once() -> None:
    w = Writer()
    c = Coalescer(w.send, w.after_write)
    c.push(b"ping")
    assert w.payloads() == [b"ping"]
    assert c.pending == 0


def test_busy_writer_gets_one_message_when_done() -> None:
    w = Writer()
    c = Coalescer(w.send, w.after_write)
    c.push(b"a")  # idle: goes now, and the writer is busy with it
    c.push(b"bb")
    c.push(b"ccc")
    assert w.payloads() == [b"a"]
    assert c.pending == 5
    w.done()
    assert w.payloads() == [b"a", b"bbccc"]
    assert c.pending == 0


def test_flush_before_half_close_keeps_order() -> None:
    w = Writer()
    c = Coalescer(w.send, w.after_write)
    c.push(b"first")
    c.push(b"second")
    c.flush()  # what a half-close does first
    assert w.payloads() == [b"first", b"second"]
    w.done()  # the armed callback finds nothing left
    assert w.payloads() == [b"first", b"second"]


def test_cap_sends_full_messages_while_busy() -> None:
    w = Writer()
    c = Coalescer(w.send, w.after_write)
    c.push(b"x")
    chunk = b"y" * (MAX_MESSAGE // 3 + 1)
    for _ in range(3):
        c.push(chunk)
    # two chunks fit one message; the third would pass the cap: the two leave now
    assert [len(p) for p in w.payloads()] == [1, 2 * len(chunk)]
    assert c.pending == len(chunk)
    w.done()
    assert [len(p) for p in w.payloads()] == [1, 2 * len(chunk), len(chunk)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(min_size=0, max_size=300),
    st.integers(min_value=MAX_MESSAGE - 8, max_value=2 * MAX_MESSAGE + 8),  # a large write
    st.sampled_from(["done", "flush"]))))
def test_every_byte_in_order_and_no_message_over_the_cap(ops: list) -> None:
    w = Writer()
    c = Coalescer(w.send, w.after_write)
    expected = bytearray()
    for i, op in enumerate(ops):
        if op == "done":
            w.done()
        elif op == "flush":
            c.flush()
        else:
            data = op if isinstance(op, bytes) else bytes([i % 251]) * op
            expected += data
            c.push(data)
            if not w.busy:
                assert c.pending == 0
        assert c.pending <= MAX_MESSAGE
        assert len(w.waiting) <= 1  # one callback per wait, however many pushes
    w.done()
    c.flush()
    payloads = w.payloads()
    assert b"".join(payloads) == bytes(expected)
    assert all(0 < len(p) <= MAX_MESSAGE for p in payloads)


def test_payload_len_matches_the_encoding_at_every_varint_width() -> None:
    for n in (0, 1, 127, 128, 16383, 16384, MAX_MESSAGE, 2097151, 2097152, 4 * 1024 * 1024):
        assert payload_len(encode_bytes(b"\0" * n)) == n
    assert payload_len(rc_pb.NetConnRequest().SerializeToString()) == 0


# --- the tunnel's writer ------------------------------------------------------------------


async def _tunnel_with_gated_writes() -> tuple[TunnelConnection, list[asyncio.Future],
                                               list[bytes]]:
    loop = asyncio.get_running_loop()
    gates: list[asyncio.Future] = []
    written: list[bytes] = []
    never: asyncio.Future = loop.create_future()

    async def read() -> object:
        return await never

    async def write(msg: bytes) -> None:
        gate = loop.create_future()
        gates.append(gate)
        await gate
        written.append(msg)

    outer = StreamOuter(read, write, tunnel_pb2.StreamRequest, "test")
    conn = TunnelConnection(types.SimpleNamespace(loop=loop), SesameCodec(Role.CLIENT), outer,
                            Role.CLIENT)
    conn.start()
    return conn, gates, written


class _Handler:
    def on_headers(self, headers: tuple) -> None: ...
    def on_message(self, data: bytes, cost: int) -> None: ...
    def on_requests_ended(self) -> None: ...
    def on_writable(self) -> None: ...
    def on_end(self, status: object, trailers: tuple, local: bool) -> None: ...


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _release_until(gates: list[asyncio.Future], done: Callable[[], bool]) -> None:
    """Let the outer call's writes finish, one at a time, until ``done()``."""
    for _ in range(100):
        if done():
            return
        for g in gates:
            if not g.done():
                g.set_result(None)
                break
        await _turns(2)
    raise AssertionError("the writer never got there")


def test_tunnel_after_write_waits_for_the_writer_and_for_its_end() -> None:
    async def main() -> None:
        conn, gates, written = await _tunnel_with_gated_writes()
        called: list[str] = []
        await _turns()
        assert conn.after_write(lambda: called.append("idle")) is False  # nothing to write
        sid = conn.open_stream("/x.Y/Z", (), _Handler())
        conn.send_message(sid, b"hello")
        assert conn.after_write(lambda: called.append("first")) is True  # queued
        await _turns()
        assert len(gates) == 1 and not written  # the writer is in its first write
        assert conn.after_write(lambda: called.append("second")) is True
        assert called == []
        await _release_until(gates, lambda: bool(called))
        assert called == ["first", "second"]
        assert any(b"hello" in m for m in written)  # called back only once it was written
        # a writer that is gone calls back whoever still waits
        conn.send_message(sid, b"more")
        assert conn.after_write(lambda: called.append("at the end")) is True
        conn._writer_task.cancel()
        await _turns()
        assert called[-1] == "at the end"
        assert conn.after_write(lambda: called.append("never")) is False

    asyncio.run(main())


def test_batching_writer_groups_small_frames_and_sends_large_ones_alone() -> None:
    from sesame._wire import only_field
    from sesame.core import BATCH_FRAME_MAX
    from sesame.core._frames import Message, NewStream
    from sesame.tunnel import PeerExt, ext_apply

    big = b"B" * BATCH_FRAME_MAX

    async def main() -> list[list]:
        conn, gates, written = await _tunnel_with_gated_writes()
        # a peer that grants 1 MiB frames and said sesame-tunnel-batch: 1
        ext_apply(conn, PeerExt(16 << 20, 1 << 20, batch=True), own=True)
        assert conn.batch
        sid = conn.open_stream("/x.Y/Z", (), _Handler())
        for data in (b"small one", big, b"small two", b"small three"):
            conn.send_message(sid, data)
        await _release_until(gates, lambda: len(written) >= 3)
        dec = SesameCodec(Role.SERVER)
        out = []
        for msg in written:
            frame_bytes = only_field(msg, 0x1A)  # the Stream envelope's tunnel field
            assert frame_bytes is not None
            batch = dec.decode_batch(frame_bytes)
            out.append(batch if batch is not None else [dec.decode(frame_bytes)])
        conn._writer_task.cancel()
        await _turns()
        return out

    out = asyncio.run(main())
    shapes = [[(type(f).__name__, len(getattr(f, "data", b""))) for f in m] for m in out]
    assert shapes == [
        [("NewStream", 0), ("Message", 9)],  # small frames together, in order
        [("Message", len(big))],  # a large one alone (no batch container)
        [("Message", 9), ("Message", 11)],
    ], shapes
    assert isinstance(out[0][0], NewStream) and isinstance(out[1][0], Message)
    assert out[1][0].data == big


def test_relayed_sockets_read_a_whole_message_per_recv() -> None:
    import socket

    from sesame.netconn._splice import read_whole_messages

    async def main() -> tuple[int, int]:
        a, b = socket.socketpair()
        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                asyncio.Protocol, a)
            before = transport.max_size  # type: ignore[attr-defined]
            read_whole_messages(transport)
            after = transport.max_size  # type: ignore[attr-defined]
            transport.close()
            return before, after
        finally:
            b.close()

    before, after = asyncio.run(main())
    assert before < MAX_MESSAGE == after
    other = types.SimpleNamespace()  # a transport of another loop: left alone
    read_whole_messages(other)
    assert not hasattr(other, "max_size")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.integers(MAX_MESSAGE // 3, 2 * MAX_MESSAGE + 5)),
                max_size=6))
def test_joined_parts_become_capped_messages_in_order(sizes: list[int]) -> None:
    from sesame.netconn._wire import encode_joined

    parts = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    msgs = list(encode_joined(parts, sum(sizes)))
    payloads = [bytes(decode_bytes(m, rc_pb.NetConnResponse)) for m in msgs]
    assert b"".join(payloads) == b"".join(parts)
    assert all(0 < len(p) <= MAX_MESSAGE for p in payloads)
    if 0 < sum(sizes) <= MAX_MESSAGE:
        assert len(msgs) == 1  # what fits one message is one message
