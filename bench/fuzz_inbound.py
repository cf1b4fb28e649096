#!/usr/bin/env python
"""
Hypothesis-driven fuzz of every inbound message type at a real hub, a real
remote and a real :class:`~sesame.tunnel.TunnelHost`, over real grpc (issue 10).

One process: a :class:`~sesame.testing.hub.HubFixture` hub (TLS, SQLite store),
a real :class:`~sesame.remote.RemoteSession` ``edge-1`` registered with it
(NetConn behind an allowlist: an echo server, a closed port, ``*.lab.example``),
a ``TunnelHost`` serving NetConn plus a tiny ``fuzz.Echo`` service (Unary, Bidi,
Stall: a handler that never reads), and a few hand-driven "fake remotes" (raw
control streams) that play a remote answering the hub's stream requests.
Before the run a *canary* NetConn connection is opened through the hub to the
echo server; it must still round-trip afterwards.

Targets (each example is a batch of cases run concurrently on the bridge loop):

``hub.tunnel``
    ``TunnelService/Tunnel``: tokens (none, garbage, revoked, client, admin,
    another remote's, the right one), ``sesame-endpoints`` metadata, a first
    message (connect with fuzzed names/buffers, other oneofs, mangled bytes,
    garbage) and later messages.
``hub.stream``
    ``TunnelService/Stream`` with made-up ``sesame-stream-id`` values, including
    the id of a real outstanding request of *another* remote (which must stay
    unclaimed).
``hub.netconn``
    ``RemoteControl/NetConn`` through the hub to the real remote: metadata,
    a dial (valid, fuzzed addresses/networks/timeouts, other oneofs, garbage),
    ``bytes``, garbage after the dial, oversized messages.  Clean cases must echo.
``hub.mgmt``
    every ``Sesame/*`` and ``Admin/*`` method (and ``Proxy`` and unknown paths)
    with requests built from the method's input type, mangled, or raw garbage.
``hub.stream_tunnel``
    the hub as *tunnel client*: a fake remote answers a stream request for a
    client's NetConn call, then feeds the hub fuzzed ``StreamRequest`` messages
    (acks, ``ServerToClient`` frames: headers, messages, bad sizes, closes with
    any status, window updates, bad ids, garbage).
``remote.tunnel``
    the real remote as *tunnel server*: the harness takes a real ``Stream`` the
    remote opened for the hub (``Hub.request_stream``) and writes fuzzed
    ``StreamResponse`` messages (``ClientToServer`` frames and worse) into it.
``host.sesame`` / ``host.grpctunnel``
    forward tunnels (``OpenTunnel``) in both dialects (with and without
    negotiation): random interleavings of per-stream frame scripts (new_stream
    with odd methods and metadata, messages with wrong sizes, continuation
    without envelope, half-close, cancel, window updates, floods past the
    window, duplicate / zero / never-created / reused / huge ids, empty frames,
    unknown fields, garbage).
``host.reverse``
    reverse tunnels (``OpenReverseTunnel``) fed ``ServerToClient`` garbage.

Checks, per case: the call ends with a status within ``CALL_TIMEOUT`` (no client
deadline is set, so a hang shows as a hang); the status is one documented for
that input (never UNKNOWN or INTERNAL except where PROTOCOL.md documents them);
tokens that are missing/invalid always give UNAUTHENTICATED; clean NetConn
cases echo exactly; garbage after a good dial is INVALID_ARGUMENT; in tunnels,
every stream the peer opened ends with ``close_stream`` after a cancel (or the
tunnel ends with a status).  After the run: the canary round-trips, the remote
never re-registered, nothing is left open (hub pending dials, stream requests,
sessions, token holders; remote tunnels and relays; host tunnels; bridge-loop
tasks; threads bounded).

Outcomes that match a known, reported defect are counted under
``known_findings`` (each has a strict-xfail test in tests/test_fuzz_inbound.py)
instead of ``failures``.

    python bench/fuzz_inbound.py [--cases 20000] [--seed N] [--targets a,b] [--max-batch 16]

Prints one JSON document; exit status 1 if anything failed.
"""

# ruff: noqa: E402  (imports after the sys.path set-up)
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import grpc
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sesame import _names as N
from sesame import _wire
from sesame.admin.v1alpha1 import admin_pb2  # registers the Admin types
from sesame.core._codec import split_batch
from sesame.grpctunnel.v1 import tunnel_pb2 as gt_pb
from sesame.hub import _hub
from sesame.netconn import METHOD as NETCONN
from sesame.netconn import NetConnServicer
from sesame.netconn._wire import encode_bytes
from sesame.type import grpctunnel_pb2 as st_pb
from sesame.type import netaddr_pb2
from sesame.v1alpha1 import remotecontrol_pb2 as rc_pb
from sesame.v1alpha1 import (
    sesame_pb2,
    tunnel_pb2,
)

SC = grpc.StatusCode

#: Every call must end with a status within this many seconds (no client deadline).
CALL_TIMEOUT = 25.0
#: After a cancel, every tunnelled stream must close within this many seconds.
CLOSE_WAIT = 10.0
#: The hub waits this long for a remote's Stream (15 s in production): the fuzz plays
#: remotes that never answer, and a case should not cost 15 s.
FUZZ_STREAM_REQUEST_TIMEOUT = 3.0
#: print every example's outcome to stderr (--progress)
PROGRESS = False
#: a write into a tunnel that does not complete within this many seconds: the far end
#: stopped reading
WRITE_STALL = 3.0
#: Concurrent fake remotes for hub.stream_tunnel (one case each at a time).
FAKE_REMOTES = 8

TARGETS: dict[str, int] = {  # relative share of the case budget
    "hub.tunnel": 12,
    "hub.stream": 10,
    "hub.netconn": 16,
    "hub.mgmt": 16,
    "hub.stream_tunnel": 8,
    "remote.tunnel": 12,
    "host.sesame": 12,
    "host.grpctunnel": 10,
    "host.reverse": 4,
}
#: cases per example (batch) drawn up to this, per target
MAX_BATCH: dict[str, int] = {
    "hub.tunnel": 16, "hub.stream": 16, "hub.netconn": 16, "hub.mgmt": 24,
    "hub.stream_tunnel": FAKE_REMOTES, "remote.tunnel": 8, "host.sesame": 4,
    "host.grpctunnel": 4, "host.reverse": 8,
}

OK_ = SC.OK
HUB_TUNNEL_CODES = {OK_, SC.UNAUTHENTICATED, SC.PERMISSION_DENIED, SC.INVALID_ARGUMENT,
                    SC.RESOURCE_EXHAUSTED}
HUB_STREAM_CODES = HUB_TUNNEL_CODES | {SC.NOT_FOUND}
NETCONN_CODES = {OK_, SC.INVALID_ARGUMENT, SC.PERMISSION_DENIED, SC.UNAUTHENTICATED,
                 SC.UNAVAILABLE, SC.DEADLINE_EXCEEDED, SC.RESOURCE_EXHAUSTED}
MGMT_CODES = {OK_, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.ALREADY_EXISTS, SC.PERMISSION_DENIED,
              SC.UNAUTHENTICATED, SC.FAILED_PRECONDITION, SC.UNIMPLEMENTED, SC.RESOURCE_EXHAUSTED}
#: tunnel-level ends of the outer call (PROTOCOL.md 2.3, 2.4, 2.14, 3.3): UNKNOWN is the
#: documented code for duplicate / never-created / reused (grpctunnel) stream ids
TUNNEL_OUTER_CODES = {OK_, SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}
DOCUMENTED_UNKNOWN = re.compile(
    r"cannot create stream ID \d+: (already exists|that ID has already been used)"
    r"|received frame for stream ID -?\d+: stream never created")
#: what a tunnel core says when the peer broke the tunnel (the whole tunnel ends)
TUNNEL_FATAL = re.compile(r"^invalid frame|stream never created|cannot create stream ID")
#: a tunnel client's protocol errors about the settings frame (PROTOCOL.md 3.2: "closed
#: with a protocol error"; the core reports them as INTERNAL)
DOCUMENTED_INTERNAL_SETTINGS = re.compile(
    r"protocol error: first frame must be settings|unexpected settings frame")
#: close_stream codes a served tunnelled stream may end with
STREAM_CLOSE_CODES = {0, 1, 3, 4, 7, 8, 12, 14}  # OK CANCELLED INVALID_ARGUMENT DEADLINE
# PERMISSION_DENIED RESOURCE_EXHAUSTED UNIMPLEMENTED UNAVAILABLE
#: a tunnel client reading bad responses (PROTOCOL.md 2.8/2.9/2.14: INTERNAL)
CLIENT_REASSEMBLY_INTERNAL = re.compile(
    r"response message envelope|envelope for response message|unrecognized frame type"
    r"|multiple responses")

CODE_BY_NUMBER = {c.value[0]: c for c in SC}

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1
INT64 = 2**63 - 1

# --- known defects (each has a strict-xfail test in tests/test_fuzz_inbound.py) ----------

KNOWN: dict[str, str] = {
}


def known_issue(target: str, code: SC | None, details: str, info: dict) -> str | None:
    """The KNOWN id an outcome is an instance of, or None."""
    return None


# --- wire-level tricks ------------------------------------------------------------------


def varint(n: int) -> bytes:
    """sesame._wire.varint, also for negatives (as uint64) and up to 70 bits (overlong)."""
    return _wire.varint(n & (UINT64 if n < 0 else (2**70 - 1)))


def key(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


def ld(field_number: int, payload: bytes) -> bytes:
    return key(field_number, 2) + varint(len(payload)) + payload


FIELD_NUMBERS = st.one_of(st.integers(1, 16), st.sampled_from([0, 19000, 19999, 2**29 - 1, 2**29,
                                                                2**32, 536870911]))


@st.composite
def wire_trick(draw: Any) -> tuple[str, bytes]:
    """(name, bytes) of one malformed or unusual piece of protobuf wire format."""
    f = draw(FIELD_NUMBERS)
    kind = draw(st.sampled_from([
        "truncated_varint", "overlong_varint", "too_long_varint", "huge_length", "length_past_end",
        "unknown_varint", "unknown_fixed64", "unknown_fixed32", "unknown_bytes", "group_start",
        "group_end", "wire_type_6", "wire_type_7", "field_zero", "nested_garbage", "negative_length",
    ]))
    if kind == "truncated_varint":
        return kind, key(f, 0) + b"\xff" * draw(st.integers(1, 12))
    if kind == "overlong_varint":  # 10 bytes for a small value: legal but odd
        return kind, key(f, 0) + b"\x81" + b"\x80" * 8 + b"\x00"
    if kind == "too_long_varint":  # 11+ bytes: invalid
        return kind, key(f, 0) + b"\x80" * draw(st.integers(10, 14)) + b"\x01"
    if kind == "huge_length":
        n = draw(st.sampled_from([2**31 - 1, 2**31, 2**32 + 5, 2**63, UINT64]))
        return kind, key(f, 2) + varint(n) + draw(st.binary(max_size=8))
    if kind == "length_past_end":
        body = draw(st.binary(max_size=16))
        return kind, key(f, 2) + varint(len(body) + draw(st.integers(1, 1000))) + body
    if kind == "unknown_varint":
        return kind, key(f + 1000, 0) + varint(draw(st.integers(0, UINT64)))
    if kind == "unknown_fixed64":
        return kind, key(f + 1000, 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "unknown_fixed32":
        return kind, key(f + 1000, 5) + draw(st.binary(min_size=4, max_size=4))
    if kind == "unknown_bytes":
        return kind, ld(f + 1000, draw(st.binary(max_size=64)))
    if kind == "group_start":
        return kind, key(f, 3) + draw(st.binary(max_size=8))
    if kind == "group_end":
        return kind, key(f, 4)
    if kind == "wire_type_6":
        return kind, key(f, 6) + draw(st.binary(max_size=4))
    if kind == "wire_type_7":
        return kind, key(f, 7)
    if kind == "field_zero":
        return kind, b"\x00" + draw(st.binary(max_size=4))
    if kind == "negative_length":
        return kind, key(f, 2) + varint(-1) + b"x"
    # nested garbage: a length-delimited known field number holding junk
    return kind, ld(draw(st.integers(1, 11)), draw(st.binary(max_size=32)))


def big_bytes(max_size: int, min_size: int = 0) -> st.SearchStrategy[bytes]:
    """Bytes of any size up to ``max_size`` without hypothesis holding them all."""
    return st.builds(lambda seed, n: random.Random(seed).randbytes(n),
                     st.integers(0, 2**32), st.integers(min_size, max_size))


GARBAGE = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"\xff\xff", b"\xff", b"\x80", b"\x0a", b"\x0a\xff\xff\xff\xff\x0f",
                     b"\x08", b"\x12\x05ab", b"\x00", b"\x07", b"\x1a\x80\x80\x80\x80\x10"]),
    wire_trick().map(lambda t: t[1]),
)


@st.composite
def mangled(draw: Any, messages: st.SearchStrategy[Any], others: Iterable[type] = ()) -> tuple[str, bytes]:
    """(label, bytes): a message from ``messages``, serialized, then maybe mangled; or garbage;
    or a message of another type."""
    others = list(others)
    how = draw(st.sampled_from(
        ["as_is"] * 6 + ["append_trick", "prepend_trick", "insert_trick", "truncate", "flip",
                         "concat", "garbage"] + (["other_type"] if others else [])))
    if how == "garbage":
        return "garbage", draw(GARBAGE)
    if how == "other_type":
        cls = draw(st.sampled_from(others))
        msg = draw(pb(cls))
        return f"other:{cls.DESCRIPTOR.name}.{oneof_label(msg)}", msg.SerializeToString()
    msg = draw(messages)
    data = msg.SerializeToString()
    label = f"{msg.DESCRIPTOR.name}.{oneof_label(msg)}"
    if how == "as_is":
        return label, data
    if how in ("append_trick", "prepend_trick", "insert_trick"):
        name, trick = draw(wire_trick())
        if how == "append_trick":
            return f"{label}+{name}", data + trick
        if how == "prepend_trick":
            return f"{label}+{name}", trick + data
        at = draw(st.integers(0, len(data)))
        return f"{label}+{name}", data[:at] + trick + data[at:]
    if how == "truncate":
        if not data:
            return f"{label}+empty", data
        return f"{label}+truncated", data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        if not data:
            return f"{label}+empty", data
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        return f"{label}+flipped", bytes(b)
    # concat: protobuf merges; the last oneof member wins
    other = draw(messages)
    return f"{label}+concat", data + other.SerializeToString()


def oneof_label(msg: Any) -> str:
    desc = msg.DESCRIPTOR
    for oo in desc.oneofs:
        if len(oo.fields) > 1 or not oo.name.startswith("_"):
            which = msg.WhichOneof(oo.name)
            return which or "none"
    return "msg"


# --- protobuf message strategies ------------------------------------------------------------

INTERESTING_TEXT = [
    "", " ", "edge-1", "fz-a", "EDGE-1", "edge-1 ", "namespaces/default/remotes/edge-1",
    "namespaces/default/remotes/fz-a", "namespaces/-/remotes/-", "namespaces/default",
    "namespaces/default/remotes/", "namespaces//remotes/x", "namespaces/x/remotes/y/endpoints/z",
    "namespaces/default/remotes/edge-1/endpoints/netconn", "tokens/x", "tokens/", "routes/1",
    "*", "-", "..", "/", "//", "netconn", "web", "a" * 63, "a" * 64, "a" * 300, "é" * 70,
    "127.0.0.1:²", "٢٢", "\x00", "x\ny", "ß.lab.example", "xn--", "%2F", "${jndi}", "' OR 1=1 --",
    "namespaces/default/remotes/edge-1/sessions/1", "display_name,description", "*,name",
]


def text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(INTERESTING_TEXT),
        st.text(max_size=24),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._/", max_size=40),
    )


def _int_strategy(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted(v for v in {lo, hi, 0, 1, -1, 255, 256, 1000, 65535, 65536, 2**31 - 1, -(2**31),
                               2**32 - 1, 2**63 - 1, -(2**63), UINT64} if lo <= v <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


_RANGES = {
    "TYPE_INT32": (-(2**31), 2**31 - 1), "TYPE_SINT32": (-(2**31), 2**31 - 1),
    "TYPE_SFIXED32": (-(2**31), 2**31 - 1), "TYPE_INT64": (-(2**63), 2**63 - 1),
    "TYPE_SINT64": (-(2**63), 2**63 - 1), "TYPE_SFIXED64": (-(2**63), 2**63 - 1),
    "TYPE_UINT32": (0, UINT32), "TYPE_FIXED32": (0, UINT32), "TYPE_UINT64": (0, UINT64),
    "TYPE_FIXED64": (0, UINT64),
}


def _type_name(f: Any) -> str:
    from google.protobuf.descriptor import FieldDescriptor as FD

    for name in dir(FD):
        if name.startswith("TYPE_") and getattr(FD, name) == f.type:
            return name
    return "?"


_TYPE_NAMES: dict[int, str] = {}


def scalar(f: Any, hints: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    h = hints.get(f.full_name)
    if h is None:
        h = hints.get(f.name)
    if h is not None:
        return h
    t = _TYPE_NAMES.get(f.type)
    if t is None:
        t = _TYPE_NAMES[f.type] = _type_name(f)
    if t in _RANGES:
        return _int_strategy(*_RANGES[t])
    if t == "TYPE_BOOL":
        return st.booleans()
    if t in ("TYPE_DOUBLE", "TYPE_FLOAT"):
        return st.floats(width=32 if t == "TYPE_FLOAT" else 64)
    if t == "TYPE_STRING":
        return text()
    if t == "TYPE_BYTES":
        return st.one_of(st.binary(max_size=64), GARBAGE)
    if t == "TYPE_ENUM":
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                         st.integers(-5, 100), st.just(2**31 - 1))
    raise TypeError(f"no strategy for {f.full_name} ({t})")


def _fill(draw: Any, msg: Any, desc: Any, depth: int, hints: dict) -> None:
    picked = {}
    for oo in desc.oneofs:
        picked[oo.name] = draw(st.sampled_from([None, *oo.fields]))
    for f in desc.fields:
        oo = f.containing_oneof
        if oo is not None:
            if picked.get(oo.name) is not f:
                continue
        elif not draw(st.booleans()):
            continue
        _set(draw, msg, f, depth, hints)


def _set(draw: Any, msg: Any, f: Any, depth: int, hints: dict) -> None:
    mt = f.message_type
    if mt is not None and mt.GetOptions().map_entry:
        kf, vf = mt.fields_by_name["key"], mt.fields_by_name["value"]
        m = getattr(msg, f.name)
        for _ in range(draw(st.integers(0, 3 if depth > 0 else 1))):
            k = draw(scalar(kf, hints))
            if vf.message_type is not None:
                entry = m[k]
                if depth > 0:
                    _fill(draw, entry, vf.message_type, depth - 1, hints)
            else:
                m[k] = draw(scalar(vf, hints))
        return
    if f.is_repeated:
        c = getattr(msg, f.name)
        for _ in range(draw(st.integers(0, 3 if depth > 0 else 1))):
            if mt is not None:
                sub = c.add()
                if depth > 0:
                    _fill(draw, sub, mt, depth - 1, hints)
            else:
                c.append(draw(scalar(f, hints)))
        return
    if mt is not None:
        h = hints.get(f.full_name)
        if h is not None:
            getattr(msg, f.name).CopyFrom(draw(h))
            return
        sub = getattr(msg, f.name)
        sub.SetInParent()
        if depth > 0:
            _fill(draw, sub, mt, depth - 1, hints)
        return
    setattr(msg, f.name, draw(scalar(f, hints)))


def pb(cls: type, depth: int = 3, hints: dict | None = None) -> st.SearchStrategy[Any]:
    """Messages of ``cls`` with any subset of fields set (one member or none of each oneof),
    edge values for numbers, odd strings, nested messages down to ``depth``; ``hints``
    overrides the strategy of fields by full name (or bare name)."""
    hints = hints or {}

    @st.composite
    def build(draw: Any) -> Any:
        msg = cls()
        _fill(draw, msg, cls.DESCRIPTOR, depth, hints)
        return msg

    return build()


# --- domain strategies ---------------------------------------------------------------------

TOKENS = ["right", "right", "right", "none", "garbage", "malformed", "revoked", "client",
          "admin", "other_remote"]
OUTER_MD_VALUE = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], max_size=40)
OUTER_MD_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1,
                       max_size=20).filter(lambda k: not k.startswith("grpc-") and k[-4:] != "-bin")


def outer_extra_md() -> st.SearchStrategy[list[tuple[str, Any]]]:
    return st.lists(st.one_of(
        st.tuples(OUTER_MD_KEY, OUTER_MD_VALUE),
        st.tuples(OUTER_MD_KEY.map(lambda k: k + "-bin"), st.binary(max_size=32)),
        st.tuples(st.sampled_from([N.MD_REMOTE, N.MD_ENDPOINT, N.MD_ENDPOINTS, N.MD_STREAM_ID,
                                   "sesame-tunnel-window", "sesame-tunnel-chunk",
                                   "grpctunnel-negotiate"]), OUTER_MD_VALUE),
    ), max_size=3)


def md_safe(s: str) -> str:
    """``s`` as grpc lets a client send it in a (non-binary) metadata value."""
    return "".join(c if " " <= c <= "~" else "?" for c in s)


def remote_names(own: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([own, f"namespaces/default/remotes/{own}", "edge-1", "fz-other",
                         f"namespaces/other/remotes/{own}", f"namespaces/-/remotes/{own}",
                         own.upper(), own + ".", f" {own}", "namespaces/default/remotes/-"]),
        text())


def inner_headers() -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Metadata inside tunnel frames: no grpc validation on the way, so anything."""
    return st.lists(st.one_of(
        st.tuples(st.sampled_from(["grpc-timeout"]),
                  st.sampled_from(["1S", "100m", "99999999H", "0n", "-1S", "1.5S", "١S", "",
                                   "1", "S", "123456789S", "5u"])),
        st.tuples(st.sampled_from(["x-a", "X-Upper", ":authority", ":path", "grpc-status",
                                   "grpc-message", "content-type", "te", "x-bin", "a-bin",
                                   "", " ", "é", "x" * 300, "authorization",
                                   "sesame-remote", "grpc-status-details-bin"]),
                  st.one_of(st.text(max_size=16), st.binary(max_size=16))),
        st.tuples(st.text(max_size=12), st.one_of(st.text(max_size=12), st.binary(max_size=12))),
    ), max_size=4)


def durations() -> st.SearchStrategy[Any]:
    return st.builds(lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
                     st.one_of(st.sampled_from([0, 1, 2, -1, 30, 2**31, 2**62, INT64, -(2**63)]),
                               st.integers(-(2**63), INT64)),
                     st.one_of(st.sampled_from([0, 1, -1, 999_999_999, 10**9, 2**31 - 1,
                                                -(2**31)]), st.integers(-(2**31), 2**31 - 1)))


class Shapes:
    """Strategies that need the environment's ports and names."""

    def __init__(self, echo_port: int, closed_port: int) -> None:
        self.echo_port = echo_port
        self.closed_port = closed_port
        e, c = echo_port, closed_port
        self.addresses = st.one_of(
            st.sampled_from([
                f"127.0.0.1:{e}", f"127.0.0.1:{e}", f"127.0.0.1:{c}", f"localhost:{e}",
                f"[::1]:{e}", f"[::ffff:127.0.0.1]:{e}", f"127.1:{e}", f"0x7f000001:{e}",
                "127.0.0.1:²", "127.0.0.1:٢٢", "127.0.0.1:+22", "127.0.0.1:0", "127.0.0.1:65536",
                "127.0.0.1:", ":80", "127.0.0.1", "a.lab.example:80", "x.LAB.example.:80",
                ".lab.example:80", "a..lab.example:80", "a" * 64 + ".lab.example:80",
                "é" * 70 + ".lab.example:80", "bücher.lab.example:80", "a b.lab.example:80",
                "_x.lab.example:80", "\x00.lab.example:80", "１２７.０.０.１:" + str(e),
                "[fe80::1%" + "x" * 300 + "]:80", "lab.example:80", "10.0.0.1:80", "[::]:80",
                "0.0.0.0:" + str(e), "255.255.255.255:80", "[" * 5, "]:80", "x" * 2000 + ":80",
            ]),
            st.builds(lambda h, p: f"{h}:{p}", text(), st.one_of(st.integers(-5, 70000), text())),
            text(),
        )
        self.networks = st.one_of(st.sampled_from(["tcp", "tcp", "tcp", "", "tcp4", "tcp6", "udp",
                                                   "unix", "TCP", "tcp ", "ip"]), text())
        self.dial_hints = {
            "sesame.type.NetAddr.address": self.addresses,
            "sesame.type.NetAddr.network": self.networks,
            "sesame.v1alpha1.NetConnRequest.Dial.timeout": durations(),
        }
        self.netconn_request = pb(rc_pb.NetConnRequest, hints=self.dial_hints)

    def dial_echo(self) -> bytes:
        return dial_bytes(f"127.0.0.1:{self.echo_port}")

    def netconn_payload(self) -> st.SearchStrategy[tuple[str, bytes]]:
        """One NetConn request message (label, bytes)."""
        return st.one_of(
            st.just(("dial_echo", self.dial_echo())),
            st.binary(max_size=64).map(lambda b: ("bytes", encode_bytes(b))),
            mangled(self.netconn_request, [rc_pb.NetConnResponse]),
        )


def dial_bytes(address: str, network: str = "tcp") -> bytes:
    return rc_pb.NetConnRequest(dial=rc_pb.NetConnRequest.Dial(
        address=netaddr_pb2.NetAddr(network=network, address=address))).SerializeToString()


# --- results --------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    code: str | None = None  # name of the final status of the case's main call; None = hang
    details: str = ""
    cases: int = 1
    calls: int = 1
    sent: collections.Counter = field(default_factory=collections.Counter)
    stream_codes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    case: str = ""  # a short description for reports
    written: int = 0  # messages the client tried to write on the main call

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def check_code(self, code: SC | None, allowed: set[SC], info: dict, *,
                   extra_ok: Callable[[SC, str], bool] | None = None) -> None:
        """Record ``code`` (None: hang) and flag it unless allowed or known."""
        self.code = code.name if code is not None else None
        if code is None:
            self.fail(f"no status within {CALL_TIMEOUT:g}s")
            return
        if code in allowed or (extra_ok is not None and extra_ok(code, self.details)):
            return
        k = known_issue(self.target, code, self.details, {**info, "written": self.written})
        if k is not None:
            self.known.append(k)
            return
        self.fail(f"status {code.name} not documented for this input: {self.details[:300]!r}")


    def expect(self, code: SC | None, expected: set[SC], why: str, info: dict | None = None) -> None:
        """A stronger oracle for this input: ``code`` must be one of ``expected`` (unless the
        outcome is an instance of a known defect, already counted by :meth:`check_code`)."""
        if code is None or code in expected:
            return
        info = {**(info or {}), "written": self.written}
        if known_issue(self.target, code, self.details, info) is not None:
            return
        self.fail(f"{why}: {code.name} {self.details[:200]!r}")


def short(obj: Any, n: int = 400) -> str:
    s = repr(obj)
    return s if len(s) <= n else s[:n] + "..."


# --- environment ----------------------------------------------------------------------------


def _echo_factory() -> Any:
    from twisted.internet import interfaces, protocol
    from zope.interface import implementer

    @implementer(interfaces.IHalfCloseableProtocol)
    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

        def readConnectionLost(self) -> None:
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            self.transport.loseConnection()

    return protocol.Factory.forProtocol(Echo)


def fuzz_echo_registry(netconn: NetConnServicer) -> Any:
    """The TunnelHost's services: NetConn and ``fuzz.Echo`` (Unary, Bidi, Stall)."""
    from sesame.tunnel import ServiceRegistry

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def bidi(request_iterator: Any, context: Any) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            await context.write(msg)

    async def stall(request_iterator: Any, context: Any) -> None:
        await asyncio.sleep(3600)  # never reads: a flood overruns its window

    reg = ServiceRegistry()
    netconn.add_to(reg)
    reg.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fuzz.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Stall": grpc.stream_stream_rpc_method_handler(stall),
    }),))
    return reg


HOST_METHODS = [NETCONN, NETCONN, "/fuzz.Echo/Unary", "/fuzz.Echo/Bidi", "/fuzz.Echo/Stall",
                "/fuzz.Echo/Nope", "/x.Y/Z", "", "nomethod", "/", "//", "fuzz.Echo/Unary",
                NETCONN + "/extra", "/sesame.v1alpha1.RemoteControl/", "/" + "a" * 500 + "/b"]
REMOTE_METHODS = [NETCONN, NETCONN, NETCONN, "/x.Y/Z", "", "/", NETCONN.upper(), "nomethod"]


class FakeRemote:
    """A hand-driven remote: a raw control stream (``connect`` sent, stream requests queued)."""

    def __init__(self, env: Env, name: str, token: str) -> None:
        self.env = env
        self.name = name
        self.token = token
        self.requests: asyncio.Queue[int] = asyncio.Queue()
        self.channel: Any = None
        self.call: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.channel = self.env.channel()
        md = ((N.MD_AUTH, f"Bearer {self.token}"), (N.MD_ENDPOINTS, "netconn"))
        self.call = self.channel.stream_stream(N.TUNNEL_METHOD)(metadata=md)
        await self.call.write(tunnel_pb2.TunnelRequest(id=0, connect={
            "remote": N.resource_name("default", self.name), "stream_buffer": 64})
            .SerializeToString())
        first = await asyncio.wait_for(self.call.read(), 10)
        assert tunnel_pb2.TunnelResponse.FromString(first).WhichOneof("data") == "connect"
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    return
                r = tunnel_pb2.TunnelResponse.FromString(msg)
                if r.WhichOneof("data") == "stream":
                    self.requests.put_nowait(r.id)

    async def answer(self, k: int, error: tuple[int, str] | None = None) -> None:
        reply = tunnel_pb2.TunnelRequest(id=k, stream={})
        if error is not None:
            reply.stream.error.code, reply.stream.error.message = error
        await self.call.write(reply.SerializeToString())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
            await asyncio.wait_for(self.call.code(), 5)
        if self.reader is not None:
            self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.channel.close()


class Canary:
    """An echo NetConn connection through the hub, opened before the run."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.buf = bytearray()
        self.call: Any = None
        self.channel: Any = None

    async def open(self) -> None:
        self.channel = self.env.channel()
        md = ((N.MD_AUTH, f"Bearer {self.env.tokens['client']}"), (N.MD_REMOTE, "edge-1"))
        self.call = self.channel.stream_stream(NETCONN)(metadata=md)
        await self.call.write(self.env.shapes.dial_echo())
        first = rc_pb.NetConnResponse.FromString(await asyncio.wait_for(self.call.read(), 10))
        assert first.WhichOneof("data") == "conn", first
        await self.roundtrip(b"canary-open")

    async def roundtrip(self, payload: bytes) -> None:
        await self.call.write(encode_bytes(payload))
        want = len(self.buf) + len(payload)
        while len(self.buf) < want:
            msg = await asyncio.wait_for(self.call.read(), 10)
            assert msg is not grpc.aio.EOF, "canary ended"
            self.buf += rc_pb.NetConnResponse.FromString(msg).bytes
        assert bytes(self.buf[-len(payload):]) == payload

    async def close(self) -> SC:
        await self.call.done_writing()
        while await asyncio.wait_for(self.call.read(), 10) is not grpc.aio.EOF:
            pass
        code = await asyncio.wait_for(self.call.code(), 10)
        await self.channel.close()
        return code


@dataclass
class Env:
    fx: Any
    bridge: Any
    reactor: Any
    echo_port: int
    closed_port: int
    remote: Any
    remote_servicer: NetConnServicer
    host: Any
    host_port: int
    host_servicer: NetConnServicer
    tokens: dict[str, str]
    shapes: Shapes
    creds: Any = None
    canary: Canary | None = None
    fakes: list[FakeRemote] = field(default_factory=list)
    steal: FakeRemote | None = None
    steal_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    remote_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: the remote's tunnels whose Stream call it left open (a failure): each keeps one
    #: grpc call (and a bridge-loop task waiting for its status) for ever
    left_open: list[Any] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)
    echo_listener: Any = None
    logged: collections.Counter = field(default_factory=collections.Counter)

    @property
    def hub(self) -> Any:
        return self.fx.hub

    def channel(self) -> Any:
        return grpc.aio.secure_channel(self.fx.target, self.creds)

    def token_md(self, role: str, own: str | None = None) -> list[tuple[str, str]]:
        if role == "none":
            return []
        if role == "garbage":
            return [(N.MD_AUTH, "Bearer ses_0123456789ab_" + "x" * 43)]
        if role == "malformed":
            return [(N.MD_AUTH, "Basic dXNlcjpwYXNz")]
        if role == "right":
            return [(N.MD_AUTH, f"Bearer {self.tokens[own or 'client']}")]
        return [(N.MD_AUTH, f"Bearer {self.tokens[role]}")]


def _free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _LogCounter(logging.Handler):
    def __init__(self, counter: collections.Counter) -> None:
        super().__init__(logging.ERROR)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        where = f"{record.name}: {msg[:80]}" + (f" [{type(exc).__name__}]" if exc else "")
        self.counter[where] += 1


async def start_env(reactor: Any) -> Env:
    """(reactor) The hub, the remote, the host, the fake remotes and the canary."""
    from twisted.internet import defer, threads
    from twisted.logger import LogLevel, globalLogPublisher

    from sesame.bridge import to_deferred
    from sesame.remote import netconn_registry
    from sesame.testing.hub import HubFixture
    from sesame.tunnel import TunnelHost

    fx = HubFixture()
    await fx.start()
    echo = reactor.listenTCP(0, _echo_factory(), interface="127.0.0.1")
    echo_port = echo.getHost().port
    closed_port = _free_closed_port()
    allow = [f"127.0.0.1:{echo_port}", f"127.0.0.1:{closed_port}", "*.lab.example:80"]
    remote_servicer = NetConnServicer(allow, reactor=reactor, bridge=fx.bridge)
    remote = await fx.start_remote("edge-1", offers={"netconn": netconn_registry(remote_servicer)})
    host_servicer = NetConnServicer(allow, reactor=reactor, bridge=fx.bridge)
    host = TunnelHost(fuzz_echo_registry(host_servicer), bridge=fx.bridge)
    host_port = await threads.deferToThread(host.start, "127.0.0.1:0")
    store = fx.store
    tokens = {
        "client": fx.client_token(),
        "client_fz": fx.client_token(pattern="fz-*"),
        "admin": store.create_token("admin")[1],
        "fz-a": fx.remote_token("fz-a"),
        "fz-b": fx.remote_token("fz-b"),
        "fz-s": fx.remote_token("fz-s"),
        "other_remote": fx.remote_token("fz-other"),
    }
    revoked = fx.client_token()
    fx.revoke(revoked)
    tokens["revoked"] = revoked
    for i in range(FAKE_REMOTES):
        tokens[f"fz-g{i}"] = fx.remote_token(f"fz-g{i}")
    env = Env(fx, fx.bridge, reactor, echo_port, closed_port, remote, remote_servicer, host,
              host_port, host_servicer, tokens, Shapes(echo_port, closed_port),
              echo_listener=echo)
    env.creds = fx.tls.channel_credentials(fx.tls.ca_pem)
    handler = _LogCounter(env.logged)
    for name in ("sesame", "grpc"):  # grpc: "Unexpected [X] raised by servicer method"
        logging.getLogger(name).addHandler(handler)
    env.saved["log_handler"] = handler

    def twisted_errors(event: dict) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("log_failure"):
            f = event.get("log_failure")
            env.logged[f"twisted: {str(event.get('log_format', ''))[:80]}"
                       + (f" [{f.type.__name__}]" if f is not None else "")] += 1

    globalLogPublisher.addObserver(twisted_errors)
    env.saved["twisted_observer"] = twisted_errors
    env.saved["STREAM_REQUEST_TIMEOUT"] = _hub.STREAM_REQUEST_TIMEOUT
    _hub.STREAM_REQUEST_TIMEOUT = FUZZ_STREAM_REQUEST_TIMEOUT

    async def loop_side() -> None:
        env.canary = Canary(env)
        await env.canary.open()
        for i in range(FAKE_REMOTES):
            fake = FakeRemote(env, f"fz-g{i}", tokens[f"fz-g{i}"])
            await fake.start()
            env.fakes.append(fake)
        env.steal = FakeRemote(env, "fz-s", tokens["fz-s"])
        await env.steal.start()

    await to_deferred(fx.bridge.submit(loop_side()))
    await defer.ensureDeferred(_settle(env, 0.3))
    env.baseline = await to_deferred(fx.bridge.submit(snapshot(env)))
    return env


async def _settle(env: Env, seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(env.reactor, seconds, lambda: None)


async def stop_env(env: Env) -> None:
    """(reactor) Undo :func:`start_env` (the canary is closed by the final check)."""
    from twisted.internet import threads
    from twisted.logger import globalLogPublisher

    from sesame.bridge import to_deferred

    async def loop_side() -> None:
        for fake in [*env.fakes, *([env.steal] if env.steal else [])]:
            await fake.close()
        if env.canary is not None and env.canary.call is not None and not env.canary.call.done():
            env.canary.call.cancel()
            with contextlib.suppress(Exception):
                await env.canary.channel.close()

    with contextlib.suppress(Exception):
        await to_deferred(env.bridge.submit(loop_side()))
    with contextlib.suppress(Exception):
        await threads.deferToThread(env.host.stop, 0.5)
    _hub.STREAM_REQUEST_TIMEOUT = env.saved.get("STREAM_REQUEST_TIMEOUT", 15.0)
    for name in ("sesame", "grpc"):
        logging.getLogger(name).removeHandler(env.saved["log_handler"])
    globalLogPublisher.removeObserver(env.saved["twisted_observer"])
    await env.fx.stop()
    await env.echo_listener.stopListening()


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _left_open_calls(env: Env) -> int:
    """How many of the Stream calls the remote left open (failures) are still open."""
    n = 0
    for conn in env.left_open:
        call = getattr(getattr(conn.outer, "_read", None), "__self__", None)
        if call is not None and not call.done():
            n += 1
    return n


async def snapshot(env: Env) -> dict[str, Any]:
    """(loop) What should be back to its baseline once every case is over."""
    hub = env.hub
    loop = asyncio.get_running_loop()
    return {
        "rss_mib": _rss_mib(),
        "threads": threading.active_count(),
        "loop_tasks": len(asyncio.all_tasks(loop)),
        "hub_sessions": len(hub.sessions),
        "hub_pending_streams": len(hub._pending),
        "hub_pending_dials": hub._pending_dials,
        "hub_pending_dials_by_peer": len(hub._pending_dials_by_peer),
        "hub_token_holders": sum(len(v) for v in hub._holders.values()),
        "hub_routes": len(hub.routes),
        "remote_streams": len(env.remote._streams),
        "remote_netconn_active": env.remote_servicer.active,
        "remote_registrations": env.remote.registrations,
        "host_tunnels": env.host.connections,
        "host_netconn_active": env.host_servicer.active,
    }


# --- running calls ---------------------------------------------------------------------------


async def raw_stream_call(channel: Any, path: str, md: list, messages: list[tuple[str, bytes]],
                          res: Result, *, half_close: bool = True,
                          wait_first: bool = False) -> tuple[SC | None, list[bytes]]:
    """Write ``messages`` (labels counted in ``res.sent``), half-close, and wait for the end;
    (code or None when no status came within CALL_TIMEOUT, responses).  With ``wait_first``
    the first message is followed by a wait for the first response (or the end), as the
    protocols' clients do (a connect, a dial)."""
    call = channel.stream_stream(path)(metadata=tuple(md))
    responses: list[bytes] = []
    first = asyncio.Event()

    async def reader() -> None:
        try:
            while True:
                m = await call.read()
                if m is grpc.aio.EOF:
                    return
                responses.append(m)
                first.set()
        except Exception:  # noqa: BLE001 - the status says it
            pass
        finally:
            first.set()

    async def go() -> SC:
        rt = asyncio.get_running_loop().create_task(reader())
        try:
            for i, (label, m) in enumerate(messages):
                if call.done():
                    break
                res.written += 1  # attempted: a write that fails may still race the status
                try:
                    await call.write(m)
                except Exception:  # noqa: BLE001 - the call ended; its status says why
                    break
                res.sent[label] += 1
                if i == 0 and wait_first:
                    await first.wait()
            if half_close and not call.done():
                with contextlib.suppress(Exception):
                    await call.done_writing()
            code = await call.code()
            res.details = (await call.details()) or ""
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rt, 5)
            return code
        finally:
            rt.cancel()

    try:
        return await asyncio.wait_for(go(), CALL_TIMEOUT), responses
    except TimeoutError:
        call.cancel()
        return None, responses


# --- hub.tunnel -------------------------------------------------------------------------------


def tunnel_request_strategy(own: str) -> st.SearchStrategy[Any]:
    return pb(tunnel_pb2.TunnelRequest, hints={
        "sesame.v1alpha1.TunnelRequest.Connect.remote": remote_names(own),
        "sesame.v1alpha1.TunnelRequest.Connect.stream_buffer": _int_strategy(-(2**31), 2**31 - 1),
    })


@st.composite
def hub_tunnel_case(draw: Any) -> dict:
    own = "fz-a"
    req = tunnel_request_strategy(own)
    first = draw(st.one_of(
        st.builds(lambda r, b, i: ("TunnelRequest.connect",
                                   tunnel_pb2.TunnelRequest(id=i, connect={"remote": r, "stream_buffer": b})
                                   .SerializeToString()),
                  remote_names(own), _int_strategy(-(2**31), 2**31 - 1), _int_strategy(0, UINT64)),
        mangled(req, [tunnel_pb2.StreamRequest, tunnel_pb2.TunnelResponse]),
        st.none(),
    ))
    later = draw(st.lists(mangled(req, [tunnel_pb2.StreamRequest]), max_size=6))
    return {
        "token": draw(st.sampled_from(TOKENS)),
        "endpoints": draw(st.one_of(st.none(), st.sampled_from(
            ["netconn", "netconn,web", "", ",,", "bad name!", "a" * 70, "web, netconn ,",
             "é", "netconn," * 50]), OUTER_MD_VALUE)),
        "extra": draw(outer_extra_md()),
        "first": first,
        "later": later,
        "wait_first": draw(st.sampled_from([True, True, True, True, False])),
    }


async def run_hub_tunnel(env: Env, case: dict, channel: Any) -> Result:
    res = Result("hub.tunnel", case=short(case))
    md = env.token_md(case["token"], "fz-a")
    if case["endpoints"] is not None:
        md.append((N.MD_ENDPOINTS, md_safe(case["endpoints"])))
    md += case["extra"]
    msgs = ([case["first"]] if case["first"] is not None else []) + case["later"]
    code, responses = await raw_stream_call(channel, N.TUNNEL_METHOD, md, msgs, res,
                                            wait_first=case["wait_first"])
    res.check_code(code, HUB_TUNNEL_CODES, {"path": N.TUNNEL_METHOD})
    if case["token"] in ("none", "garbage", "malformed", "revoked"):
        res.expect(code, {SC.UNAUTHENTICATED}, "no valid token", {"path": N.TUNNEL_METHOD})
    if responses:
        try:
            first = tunnel_pb2.TunnelResponse.FromString(responses[0])
        except Exception as exc:  # noqa: BLE001
            res.fail(f"hub sent an unparsable TunnelResponse: {exc}")
        else:
            if first.WhichOneof("data") != "connect":
                res.fail(f"hub's first response is {first.WhichOneof('data')}, not connect")
            elif case["token"] in ("none", "garbage", "malformed", "revoked", "client", "admin"):
                res.fail(f"registered with token {case['token']!r}")
    return res


# --- hub.stream -------------------------------------------------------------------------------


@st.composite
def hub_stream_case(draw: Any) -> dict:
    own = "fz-b"
    req = pb(tunnel_pb2.StreamRequest, hints={
        "sesame.v1alpha1.StreamRequest.Connect.remote": remote_names(own)})
    first = draw(st.one_of(
        st.builds(lambda r: ("StreamRequest.connect",
                             tunnel_pb2.StreamRequest(connect={"remote": r}).SerializeToString()),
                  remote_names(own)),
        mangled(req, [tunnel_pb2.TunnelRequest, tunnel_pb2.StreamResponse]),
        st.none(),
    ))
    return {
        "token": draw(st.sampled_from(TOKENS)),
        "sid": draw(st.one_of(
            st.none(), st.just("<steal>"), st.just("<steal>"),
            st.integers(0, UINT64).map(str), st.integers(-(2**63), -1).map(str),
            st.sampled_from(["", " 1", "1 ", "٢", "²", "+1", "0x1", "1e3", "9" * 21, "9" * 20,
                             "18446744073709551616", "1,2", "1.0", "0"]),
            OUTER_MD_VALUE)),
        "extra": draw(outer_extra_md()),
        "first": first,
        "later": draw(st.lists(mangled(req, [tunnel_pb2.TunnelRequest]), max_size=4)),
        "wait_first": draw(st.sampled_from([True, True, True, True, False])),
    }


async def run_hub_stream(env: Env, case: dict, channel: Any) -> Result:
    res = Result("hub.stream", case=short(case))
    md = env.token_md(case["token"], "fz-b")
    sid = case["sid"]
    steal_task = None
    if sid == "<steal>":
        # a real outstanding request of another remote (fz-s): the fuzzed call must not get it
        session = env.hub.routes.get(("default", "fz-s", "netconn"))
        assert session is not None, "fz-s is not registered"
        async with env.steal_lock:  # one new request at a time: its id is ours
            before = set(env.hub._pending)
            steal_task = asyncio.get_running_loop().create_task(
                env.hub.request_stream(session, "netconn"))
            new: set[int] = set()
            for _ in range(200):
                await asyncio.sleep(0)
                new = set(env.hub._pending) - before
                if new:
                    break
        if not new:
            res.fail("could not make a stream request of fz-s")
            steal_task.cancel()
            return res
        sid = str(min(new))
    if sid is not None:
        md.append((N.MD_STREAM_ID, md_safe(sid)))
    md += case["extra"]
    msgs = ([case["first"]] if case["first"] is not None else []) + case["later"]
    try:
        code, responses = await raw_stream_call(channel, N.STREAM_METHOD, md, msgs, res,
                                                wait_first=case["wait_first"])
        res.check_code(code, HUB_STREAM_CODES, {"path": N.STREAM_METHOD})
        if case["token"] in ("none", "garbage", "malformed", "revoked"):
            res.expect(code, {SC.UNAUTHENTICATED}, "no valid token", {"path": N.STREAM_METHOD})
        if responses:
            res.fail(f"hub answered a made-up Stream ({len(responses)} messages), "
                     f"sid={sid!r} token={case['token']!r}")
        if steal_task is not None and steal_task.done():
            res.fail(f"another remote's stream request ended while the fuzz call ran: "
                     f"{short(steal_task.exception() if not steal_task.cancelled() else 'cancelled')}")
        if steal_task is not None and int(sid) not in env.hub._pending and not steal_task.done():
            res.fail("another remote's stream request was taken by the fuzz call")
    finally:
        if steal_task is not None:
            steal_task.cancel()
            with contextlib.suppress(BaseException):
                await steal_task
    return res


# --- hub.netconn ------------------------------------------------------------------------------


@st.composite
def hub_netconn_case(draw: Any, shapes: Shapes) -> dict:
    token = draw(st.sampled_from(["client"] * 6 + ["none", "garbage", "malformed", "revoked",
                                                   "client_fz", "admin", "fz-a"]))
    first = draw(st.one_of(
        st.just(("dial_echo", shapes.dial_echo())), st.just(("dial_echo", shapes.dial_echo())),
        st.just(("dial_echo", shapes.dial_echo())),
        st.builds(lambda a, n: ("dial_fuzz", dial_bytes(a, n)), shapes.addresses, shapes.networks),
        mangled(shapes.netconn_request, [rc_pb.NetConnResponse, tunnel_pb2.StreamRequest]),
        st.none(),
    ))
    body = draw(st.lists(st.one_of(
        st.binary(max_size=64).map(lambda b: ("bytes", encode_bytes(b))),
        st.binary(max_size=64).map(lambda b: ("bytes", encode_bytes(b))),
        big_bytes(200_000).map(lambda b: ("bytes", encode_bytes(b))),
    ), max_size=5))
    tail = draw(st.one_of(st.just([]), st.just([]),
                          st.lists(st.one_of(shapes.netconn_payload(),
                                             GARBAGE.map(lambda g: ("garbage", g))),
                                   min_size=1, max_size=3)))
    oversize = draw(st.integers(0, 199)) == 137  # rare (hypothesis favours 0 and the ends)
    return {
        "token": token,
        "remote": draw(st.one_of(st.just("edge-1"), st.just("edge-1"), st.just("edge-1"),
                                 st.just("edge-1"), st.none(), remote_names("edge-1"))),
        "endpoint": draw(st.one_of(st.none(), st.none(), st.none(), st.just("netconn"),
                                   st.sampled_from(["web", "", "NETCONN", "a" * 70]), OUTER_MD_VALUE)),
        "extra": draw(outer_extra_md()),
        "first": first, "body": body, "tail": tail, "oversize": oversize,
        "wait_first": draw(st.sampled_from([True, True, True, True, False])),
    }


def _is_edge1(remote: str | None) -> bool:
    if remote is None:
        return False
    try:
        return N.parse_remote(remote) == ("default", "edge-1")
    except ValueError:
        return False


async def run_hub_netconn(env: Env, case: dict, channel: Any) -> Result:
    res = Result("hub.netconn", case=short(case))
    md = env.token_md(case["token"])
    if case["remote"] is not None:
        md.append((N.MD_REMOTE, md_safe(case["remote"])))
    if case["endpoint"] is not None:
        md.append((N.MD_ENDPOINT, md_safe(case["endpoint"])))
    md += case["extra"]
    msgs = ([case["first"]] if case["first"] is not None else []) + case["body"] + case["tail"]
    if case["oversize"]:
        msgs.append(("oversize", encode_bytes(b"\0" * (4 * 1024 * 1024 + 16))))
    code, responses = await raw_stream_call(channel, NETCONN, md, msgs, res,
                                            wait_first=case["wait_first"])
    res.check_code(code, NETCONN_CODES, {"path": NETCONN})
    if code is None:
        return res
    if case["token"] in ("none", "garbage", "malformed", "revoked"):
        # (grpc refuses an oversized message before the hub can)
        res.expect(code, {SC.UNAUTHENTICATED} | ({SC.RESOURCE_EXHAUSTED} if case["oversize"]
                                                 else set()), "no valid token")
    steered = {k for k, _ in case["extra"]} & {N.MD_REMOTE, N.MD_ENDPOINT}
    right = (case["token"] == "client" and _is_edge1(md_safe(case["remote"] or "")) and not steered
             and case["endpoint"] in (None, "netconn")
             and not case["oversize"] and case["first"] is not None
             and case["first"][0] == "dial_echo")
    if right and not case["tail"]:
        # a clean connection: everything sent comes back, then OK
        sent = b"".join(rc_pb.NetConnRequest.FromString(m).bytes for _, m in case["body"])
        got = bytearray()
        for i, r in enumerate(responses):
            resp = rc_pb.NetConnResponse.FromString(r)
            if i == 0 and resp.WhichOneof("data") != "conn":
                res.fail(f"first response is {resp.WhichOneof('data')}, not conn")
            got += resp.bytes
        if code is not OK_:
            res.expect(code, {OK_}, "a clean echo connection")
        elif bytes(got) != sent:
            res.fail(f"echo mismatch: sent {len(sent)} bytes, got {len(got)}")
    if right and case["tail"] and case["tail"][0][0] == "garbage" \
            and not _parses(case["tail"][0][1]):
        res.expect(code, {SC.INVALID_ARGUMENT}, "garbage after a good dial")
    return res


def _parses(data: bytes) -> bool:
    try:
        rc_pb.NetConnRequest.FromString(data)
        return True
    except Exception:  # noqa: BLE001
        return False


# --- hub.mgmt ---------------------------------------------------------------------------------


def _mgmt_methods() -> list[tuple[str, Any, bool]]:
    from google.protobuf import message_factory

    from sesame.hub import mgmt

    out = []
    for svc in mgmt.SERVICES:
        for m in svc.methods:
            cls = message_factory.GetMessageClass(m.input_type)
            out.append((f"/{svc.full_name}/{m.name}", cls, m.client_streaming or m.server_streaming))
    return out


MGMT_HINTS = {"name": text(), "parent": text(), "page_token": st.one_of(text(), st.just("x" * 5000)),
              "resource_id": text(), "filter": text()}


@st.composite
def hub_mgmt_case(draw: Any) -> dict:
    methods = _mgmt_methods()
    path, cls, streaming = draw(st.sampled_from(
        [*methods, ("/sesame.v1alpha1.Sesame/Nope", sesame_pb2.GetRemoteRequest, False),
         ("/sesame.admin.v1alpha1.Admin/", sesame_pb2.GetRemoteRequest, False)]))
    msg = draw(mangled(pb(cls, hints=MGMT_HINTS), [sesame_pb2.Remote, admin_pb2.Token]))
    return {"path": path, "streaming": streaming, "token": draw(st.sampled_from(
        ["admin", "admin", "admin", "client", "client_fz", "fz-a", "none", "garbage", "revoked"])),
        "msg": msg, "more": draw(st.lists(mangled(pb(cls, hints=MGMT_HINTS)), max_size=2))
        if streaming else []}


async def run_hub_mgmt(env: Env, case: dict, channel: Any) -> Result:
    res = Result("hub.mgmt", case=short(case))
    md = tuple(env.token_md(case["token"]))
    label, data = case["msg"]
    if case["streaming"]:
        code, _ = await raw_stream_call(channel, case["path"], list(md),
                                        [case["msg"], *case["more"]], res)
    else:
        code = None
        try:
            await asyncio.wait_for(channel.unary_unary(case["path"])(data, metadata=md), CALL_TIMEOUT)
            code = OK_
            res.sent[label] += 1
        except grpc.aio.AioRpcError as exc:
            code, res.details = exc.code(), exc.details() or ""
            res.sent[label] += 1
        except TimeoutError:
            code = None
    res.check_code(code, MGMT_CODES, {"path": case["path"]})
    if case["token"] in ("none", "garbage", "revoked"):
        res.expect(code, {SC.UNAUTHENTICATED, SC.UNIMPLEMENTED}, "no valid token")
    return res


# --- tunnel frames ------------------------------------------------------------------------------

IDSEL = st.sampled_from(["self"] * 12 + ["zero", "never", "prev", "max", "neg"])
SIZE_REL = st.sampled_from(["exact"] * 6 + ["short", "short", "less", "neg", "huge", "zero"])


def c2s_op(payload: st.SearchStrategy[tuple[str, bytes]], methods: list[str]) -> st.SearchStrategy[tuple]:
    return st.one_of(
        st.tuples(st.just("msg"), IDSEL, SIZE_REL, payload),
        st.tuples(st.just("msg"), IDSEL, SIZE_REL, payload),
        st.tuples(st.just("msg"), IDSEL, SIZE_REL, payload),
        st.tuples(st.just("more"), IDSEL, st.binary(max_size=64)),
        st.tuples(st.just("half"), IDSEL),
        st.tuples(st.just("cancel"), IDSEL),
        st.tuples(st.just("wu"), IDSEL, st.one_of(st.sampled_from([0, 1, 258, 65535, 2**31, UINT32]),
                                                 st.integers(0, UINT32))),
        st.tuples(st.just("new"), IDSEL, st.sampled_from(methods), inner_headers(),
                  st.sampled_from([None, 0, 1, 2, -1]), st.sampled_from([None, 0, 1, 65536, UINT32])),
        st.tuples(st.just("empty"), IDSEL),
        st.tuples(st.just("raw"), GARBAGE),
        st.tuples(st.just("trick"), IDSEL, wire_trick()),
        st.tuples(st.just("flood"), IDSEL, st.integers(1, 300), st.sampled_from([0, 10, 1000, 16384,
                                                                                 65536, 262144])),
    )


@st.composite
def stream_script(draw: Any, payload: st.SearchStrategy[tuple[str, bytes]], methods: list[str]) -> list[tuple]:
    """The frames of one tunnelled stream: new_stream, a body, maybe an end."""
    method = draw(st.sampled_from(methods))
    ops: list[tuple] = [("new", draw(st.sampled_from(["self"] * 15 + ["prev", "zero", "max"])),
                         method, draw(inner_headers()),
                         draw(st.sampled_from([None, None, None, 1, 0, 7])),
                         draw(st.sampled_from([None, None, 65536, 0, 1, UINT32])))]
    ops += draw(st.lists(c2s_op(payload, methods), max_size=6))
    ops.append(draw(st.sampled_from([("half", "self"), ("half", "self"), ("cancel", "self"), None])))
    return [op for op in ops if op is not None]


@st.composite
def tunnel_case(draw: Any, shapes: Shapes, methods: list[str], dialects: list[str],
                outer_noise: bool = False) -> dict:
    payload = st.one_of(shapes.netconn_payload(),
                        st.binary(max_size=64).map(lambda b: ("raw_payload", b)),
                        big_bytes(300_000).map(lambda b: ("big_payload", b)))
    scripts = draw(st.lists(stream_script(payload, methods), min_size=1, max_size=5))
    rnd = draw(st.randoms(use_true_random=False))
    # interleave: each script keeps its own order
    queues = [collections.deque(s) for s in scripts]
    order: list[tuple[int, tuple]] = []
    while any(queues):
        i = rnd.choice([j for j, q in enumerate(queues) if q])
        order.append((i, queues[i].popleft()))
    if outer_noise:  # non-tunnel Stream messages between frames (the remote's outer call)
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, len(order)))
            order.insert(at, (-1, ("outer", draw(mangled(pb(tunnel_pb2.StreamResponse),
                                                         [tunnel_pb2.StreamRequest])))))
    return {
        "dialect": draw(st.sampled_from(dialects)),
        "negotiate": draw(st.booleans()),
        "ext": draw(st.booleans()),
        "order": order,
        "nscripts": len(scripts),
    }


class FrameSession:
    """One tunnel seen from its tunnel-client end (the fuzz), the other end being ours to test:
    writes fuzzed ClientToServer frames, reads ServerToClient ones (credits their data, records
    closes)."""

    def __init__(self, dialect: str, write: Callable[[bytes], Any], res: Result) -> None:
        self.dialect = dialect
        self.gt = dialect == "grpctunnel"
        self._write = write
        self.res = res
        self.lock = asyncio.Lock()
        self.closes: dict[int, list[int]] = collections.defaultdict(list)
        self.opened: set[int] = set()
        self.used: list[int] = []
        self.next_id = 1
        self.changed = asyncio.Event()
        self.ended = asyncio.Event()
        self.frames_in = 0
        self.stalled = False

    # ids
    def resolve(self, sel: str, own: int) -> int:
        if sel == "self":
            return own
        if sel == "zero":
            return 0
        if sel == "never":  # above everything used so far (huge ids aside)
            return max(i for i in [self.next_id, *self.used] if i < 2**62) + 1000
        if sel == "prev":
            return random.Random(own).choice(self.used) if self.used else own
        if sel == "max":
            return INT64 if self.gt else UINT64
        return -1 if self.gt else UINT64  # neg (sesame ids are unsigned)

    def encode(self, op: tuple, sid: int) -> tuple[str, bytes]:
        kind = op[0]
        P = gt_pb if self.gt else st_pb
        pbm = P.ClientToServer(stream_id=sid)
        if kind == "new":
            _, _, method, headers, rev, window = op
            if self.gt:
                pbm.new_stream.method_name = method
                for k, v in headers:
                    pbm.new_stream.request_headers.md[k].val.append(
                        v if isinstance(v, str) else v.decode("latin-1"))
                if rev is not None:
                    pbm.new_stream.protocol_revision = rev
                if window is not None:
                    pbm.new_stream.initial_window_size = window
            else:
                pbm.new_stream.method = method
                pbm.new_stream.header.SetInParent()
                for k, v in headers:
                    entry = pbm.new_stream.header.data[k]
                    if isinstance(v, bytes):
                        entry.bin.values.append(v)
                    else:
                        entry.str.values.append(v)
        elif kind == "msg":
            _, _, rel, (plabel, data) = op
            size = {"exact": len(data), "short": len(data) + 1 + (len(data) % 7), "less": max(len(data) - 1, 0) if data else 0,
                    "neg": -5, "huge": 5 * 1024 * 1024, "zero": 0}[rel]
            if rel == "less" and not data:
                data = b"x"
            if self.gt:
                pbm.request_message.size = size & UINT32
                pbm.request_message.data = data
            else:
                pbm.message.size = max(min(size, 2**31 - 1), -(2**31))
                pbm.message.data = data
            kind = f"msg:{rel}:{plabel}"
        elif kind == "more":
            if self.gt:
                pbm.more_request_data = op[2]
            else:
                pbm.message_data = op[2]
        elif kind == "half":
            pbm.half_close.SetInParent()
        elif kind == "cancel":
            pbm.cancel.SetInParent()
        elif kind == "wu":
            pbm.window_update = op[2]
        elif kind == "empty":
            pass
        elif kind == "trick":
            name, trick = op[2]
            pbm.half_close.SetInParent()
            return f"trick:{name}", pbm.SerializeToString() + trick
        return kind, pbm.SerializeToString()

    async def send(self, label: str, data: bytes) -> bool:
        if self.ended.is_set() or self.stalled:
            return False
        self.res.written += 1  # attempted (a write that fails may still race the status)
        try:
            async with self.lock:
                await asyncio.wait_for(self._write(data), WRITE_STALL)
        except TimeoutError:  # the far end stopped reading
            self.stalled = True
            return False
        except Exception:  # noqa: BLE001 - the tunnel is over
            return False
        self.res.sent[f"{'gt' if self.gt else 'sesame'}.{label}"] += 1
        return True

    async def play(self, order: list[tuple[int, tuple]], own_ids: dict[int, int],
                   raw_outer: Callable[[bytes], Any] | None = None) -> None:
        for i, op in order:
            if self.ended.is_set():
                return
            kind = op[0]
            if kind == "raw":
                await self.send("raw", op[1])
                continue
            if kind == "outer":
                label, data = op[1]
                if raw_outer is not None:
                    try:
                        async with self.lock:
                            await asyncio.wait_for(raw_outer(data), WRITE_STALL)
                        self.res.sent[f"StreamResponse:{label}"] += 1
                    except Exception:  # noqa: BLE001
                        return
                continue
            if i not in own_ids and kind == "new":
                own_ids[i] = self.next_id
                self.next_id += 1
            own = own_ids.get(i, self.next_id)
            sid = self.resolve(op[1], own)
            if kind == "flood":
                _, _, count, size = op
                count = min(count, max(1, 6 * 1024 * 1024 // max(size, 1)))  # <= ~6 MiB
                chunk = b"\x5a" * size
                for _ in range(count):
                    label, data = self.encode(("msg", "self", "exact", ("flood", chunk)), sid)
                    if not await self.send("flood", data):
                        return
                continue
            label, data = self.encode(op, sid)
            if await self.send(label, data) and kind == "new" and (sid > 0 or (self.gt and sid == 0)):
                self.opened.add(sid)
                self.used.append(sid)

    def on_frame(self, data: bytes) -> None:
        """A ServerToClient message arrived: one frame, or several when the case asked for
        batches (``sesame-tunnel-batch``, granted with the window extension)."""
        if not self.gt:
            try:
                frames = split_batch(data)
            except ValueError as exc:
                self.frames_in += 1
                self.res.fail(f"peer sent an unparsable batch of frames: {exc}")
                return
            if frames is not None:
                self.res.sent["ServerToClient:batch"] += 1
                for frame in frames:
                    self._on_one_frame(bytes(frame))
                return
        self._on_one_frame(data)

    def _on_one_frame(self, data: bytes) -> None:
        """One ServerToClient frame: record closes, credit data at once."""
        self.frames_in += 1
        try:
            f = (gt_pb if self.gt else st_pb).ServerToClient.FromString(data)
        except Exception as exc:  # noqa: BLE001
            self.res.fail(f"peer sent an unparsable frame: {exc}")
            return
        which = f.WhichOneof("frame")
        if which == "close_stream":
            code = f.close_stream.status.code
            self.closes[f.stream_id].append(code)
            self.res.stream_codes[CODE_BY_NUMBER.get(code, SC.UNKNOWN).name] += 1
            if code not in STREAM_CLOSE_CODES:
                self.res.fail(f"stream {f.stream_id} closed with {code} "
                              f"{f.close_stream.status.message[:200]!r}")
            self.changed.set()
        elif which in ("message", "response_message", "message_data", "more_response_data"):
            n = (len(f.message.data) if which == "message" else len(f.response_message.data)
                 if which == "response_message" else len(getattr(f, which)))
            credit = n if self.gt else max(n, 258)
            if credit:
                pbm = (gt_pb if self.gt else st_pb).ClientToServer(stream_id=f.stream_id,
                                                                   window_update=credit)
                asyncio.get_running_loop().create_task(self._credit(pbm.SerializeToString()))

    async def _credit(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            async with self.lock:
                await asyncio.wait_for(self._write(data), WRITE_STALL)

    async def finish_streams(self, dead: Callable[[], bool] | None = None) -> list[int] | None:
        """Grant every opened stream a large window, cancel it, and wait until each has closed
        (or the tunnel ended); the ids still open after CLOSE_WAIT.  None as soon as ``dead()``
        says the far end's tunnel is over (while its call stays open)."""
        for sid in sorted(self.opened):
            P = gt_pb if self.gt else st_pb
            await self.send("epilogue.wu", P.ClientToServer(stream_id=sid, window_update=2**30)
                            .SerializeToString())
            await self.send("epilogue.cancel", P.ClientToServer(
                stream_id=sid, cancel={}).SerializeToString())
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT
        while not self.ended.is_set():
            missing = [s for s in self.opened if not self.closes.get(s)]
            if not missing:
                return []
            if dead is not None and dead():
                return None
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return missing
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return []


def _tunnel_outer_ok(code: SC, details: str) -> bool:
    return code is SC.UNKNOWN and bool(DOCUMENTED_UNKNOWN.search(details))


async def run_host_tunnel(env: Env, case: dict, target: str) -> Result:
    """A forward tunnel to the TunnelHost, fed the case's interleaved stream scripts."""
    from sesame.tunnel import ext_metadata
    from sesame.tunnel._service import _codec_for, _paths

    res = Result(target, case=short(case), cases=case["nscripts"])
    dialect = case["dialect"]
    codec = _codec_for(dialect)
    md: list[tuple[str, str]] = []
    if dialect == "grpctunnel" and case["negotiate"]:
        md.append(("grpctunnel-negotiate", "on"))
    if dialect == "sesame" and case["ext"]:
        md += list(ext_metadata(codec))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{env.host_port}")
    call = channel.stream_stream(_paths(codec)[0])(metadata=tuple(md))
    fs = FrameSession(dialect, call.write, res)

    async def reader() -> None:
        with contextlib.suppress(Exception):
            while True:
                m = await call.read()
                if m is grpc.aio.EOF:
                    break
                fs.on_frame(m)
        fs.ended.set()
        fs.changed.set()

    rt = asyncio.get_running_loop().create_task(reader())
    try:
        async def body() -> SC:
            await fs.play(case["order"], {})
            missing = await fs.finish_streams()
            if missing:
                res.fail(f"streams {sorted(missing)[:8]} not closed within {CLOSE_WAIT:g}s "
                         "of a cancel, tunnel alive")
            with contextlib.suppress(Exception):
                await call.done_writing()
            code = await call.code()
            res.details = (await call.details()) or ""
            return code

        try:
            code: SC | None = await asyncio.wait_for(body(), CALL_TIMEOUT + CLOSE_WAIT)
        except TimeoutError:
            code = None
        res.check_code(code, TUNNEL_OUTER_CODES, {"path": "tunnel"}, extra_ok=_tunnel_outer_ok)
    finally:
        rt.cancel()
        call.cancel()
        await channel.close()
    return res


@st.composite
def reverse_case(draw: Any) -> dict:
    s2c = st.one_of(st.sampled_from(["sesame", "grpctunnel"]))
    dialect = draw(s2c)
    cls = gt_pb.ServerToClient if dialect == "grpctunnel" else st_pb.ServerToClient
    ids = _int_strategy(-5, 5) if dialect == "grpctunnel" else _int_strategy(0, 5)
    frames = draw(st.lists(mangled(pb(cls, hints={"stream_id": ids}),
                                   [gt_pb.ClientToServer if dialect == "grpctunnel"
                                    else st_pb.ClientToServer]), max_size=6))
    return {"dialect": dialect, "negotiate": draw(st.booleans()), "frames": frames}


async def run_host_reverse(env: Env, case: dict, channel: Any) -> Result:
    from sesame.tunnel._service import _codec_for, _paths

    res = Result("host.reverse", case=short(case))
    md = [("grpctunnel-negotiate", "on")] if case["negotiate"] else []
    path = _paths(_codec_for(case["dialect"]))[1]
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{env.host_port}")
    try:
        code, _ = await raw_stream_call(ch, path, md, case["frames"], res)
    finally:
        await ch.close()
    res.check_code(code, TUNNEL_OUTER_CODES | {SC.UNAVAILABLE}, {"path": "reverse"},
                   extra_ok=lambda c, d: _tunnel_outer_ok(c, d) or (
                       c is SC.INTERNAL and bool(DOCUMENTED_INTERNAL_SETTINGS.search(d))))
    return res


# --- remote.tunnel ---------------------------------------------------------------------------


async def run_remote_tunnel(env: Env, case: dict) -> Result:
    """A real Stream of the real remote (asked for through the hub), fed fuzzed frames."""
    from sesame.bridge import wrap_tunnel

    res = Result("remote.tunnel", case=short(case), cases=case["nscripts"])
    session = env.hub.routes.get(("default", "edge-1", "netconn"))
    if session is None:
        res.fail("edge-1 is not routed")
        return res
    async with env.remote_lock:  # one at a time, so the remote's new tunnel is this case's
        before = set(env.remote._streams)
        try:
            # this harness reads the remote's frames one per message: no batches for it
            outer, done, _ = await env.hub.request_stream(session, "netconn", batch=False)
        except Exception as exc:  # noqa: BLE001
            res.fail(f"the remote did not open a stream: {exc!r}")
            return res
        mine: Any = None
        for _ in range(400):
            new = set(env.remote._streams) - before
            if new:
                mine = new.pop()
                break
            await asyncio.sleep(0.005)
    write_raw = outer._write  # context.write of the hub's Stream call: StreamResponse bytes
    fs = FrameSession("sesame", lambda frame: write_raw(wrap_tunnel(frame)), res)
    outer_end: list[str] = []

    async def reader() -> None:
        try:
            while True:
                m = await outer._read()
                if m is grpc.aio.EOF:
                    outer_end.append("eof")
                    break
                r = tunnel_pb2.StreamRequest.FromString(m)
                if r.WhichOneof("data") != "tunnel":
                    res.fail(f"remote sent a {r.WhichOneof('data')} mid-tunnel")
                    continue
                fs.on_frame(r.tunnel.SerializeToString())
        except Exception as exc:  # noqa: BLE001
            outer_end.append(f"{type(exc).__name__}")
        fs.ended.set()
        fs.changed.set()

    def left_open() -> bool:
        """The remote's tunnel is over but its Stream call is still open."""
        if mine is None or not mine.is_closed:
            return False
        call = getattr(getattr(mine.outer, "_read", None), "__self__", None)
        return call is not None and not call.done()

    rt = asyncio.get_running_loop().create_task(reader())
    try:
        async def body() -> None:
            await fs.play(case["order"], {}, raw_outer=write_raw)
            missing = [] if fs.stalled else await fs.finish_streams(dead=left_open)
            # (missing None: the remote's tunnel is over -- counted below)
            if (fs.stalled or missing) and not fs.ended.is_set() and not left_open():
                if fs.stalled:
                    res.fail(f"a write to the remote's live tunnel blocked for {WRITE_STALL:g}s")
                else:
                    res.fail(f"streams {sorted(missing or [])[:8]} not closed within "
                             f"{CLOSE_WAIT:g}s of a cancel, and the remote's tunnel is live")

        try:
            await asyncio.wait_for(body(), CALL_TIMEOUT + CLOSE_WAIT)
        except TimeoutError:
            res.fail("remote tunnel case did not finish")
        if not fs.ended.is_set() and left_open():
            # its tunnel is over: the remote ends its call too (it cancels it, once the
            # tunnel's last frames are flushed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fs.ended.wait(), CLOSE_WAIT)
        if not fs.ended.is_set() and left_open():
            res.fail(f"the remote's tunnel is over but its Stream call is still open "
                     f"{CLOSE_WAIT:g}s later")
            env.left_open.append(mine)
            res.code = "LEFT_OPEN_BY_REMOTE"
        else:
            res.code = "ENDED_BY_REMOTE" if fs.ended.is_set() else "OK"
        res.details = ",".join(outer_end)
    finally:
        rt.cancel()
        if not done.done():
            done.set_result(None)  # the hub's Stream handler returns: the call ends OK
    return res


# --- hub.stream_tunnel -----------------------------------------------------------------------

S2C_IDSEL = st.sampled_from(["self"] * 10 + ["zero", "never", "max", "other"])


def s2c_op(shapes: Shapes) -> st.SearchStrategy[tuple]:
    payload = st.one_of(
        st.builds(lambda: ("conn", rc_pb.NetConnResponse(conn={}).SerializeToString())),
        st.binary(max_size=64).map(lambda b: ("bytes", encode_bytes(b))),
        mangled(pb(rc_pb.NetConnResponse), [rc_pb.NetConnRequest]),
        big_bytes(100_000).map(lambda b: ("big", encode_bytes(b))),
    )
    return st.one_of(
        st.tuples(st.just("hdr"), S2C_IDSEL, inner_headers()),
        st.tuples(st.just("msg"), S2C_IDSEL, SIZE_REL, payload),
        st.tuples(st.just("msg"), S2C_IDSEL, SIZE_REL, payload),
        st.tuples(st.just("more"), S2C_IDSEL, st.binary(max_size=64)),
        st.tuples(st.just("close"), S2C_IDSEL,
                  st.one_of(st.sampled_from([0, 0, 1, 2, 3, 5, 13, 14, 16, 17, 99, -1]),
                            st.integers(-(2**31), 2**31 - 1)),
                  text(), inner_headers()),
        st.tuples(st.just("wu"), S2C_IDSEL, st.sampled_from([0, 1, 65535, UINT32])),
        st.tuples(st.just("empty"), S2C_IDSEL),
        st.tuples(st.just("raw"), GARBAGE),
        st.tuples(st.just("outer"), mangled(pb(tunnel_pb2.StreamRequest), [tunnel_pb2.StreamResponse])),
    )


@st.composite
def stream_tunnel_case(draw: Any, shapes: Shapes) -> dict:
    return {
        "first": draw(st.one_of(st.just(("dial_echo", shapes.dial_echo())),
                                shapes.netconn_payload())),
        "ack": draw(st.sampled_from(["dial"] * 8 + ["eof", "connect", "garbage", "tunnel", "empty",
                                                     "error", "cancel"])),
        "script": draw(st.lists(s2c_op(shapes), max_size=8)),
        "client_half_close": draw(st.booleans()),
        "end": draw(st.sampled_from(["eof", "eof", "close_ok", "cancel"])),
    }


async def run_stream_tunnel(env: Env, case: dict, fake: FakeRemote, channel: Any) -> Result:
    """A client's NetConn to fake remote ``fake`` through the hub; the fake remote answers the
    stream request, then feeds the hub the case's script.  Both calls must end with a status:
    the client's within CALL_TIMEOUT, the fake remote's Stream within CALL_TIMEOUT after."""
    res = Result("hub.stream_tunnel", case=short(case))
    client_md = ((N.MD_AUTH, f"Bearer {env.tokens['client_fz']}"), (N.MD_REMOTE, fake.name))
    client = channel.stream_stream(NETCONN)(metadata=client_md)
    stream_call: Any = None
    sent_codes: list[int] = []
    own_sid = [1]
    got_new_stream = asyncio.Event()
    after_ack = [0]  # messages the fake remote wrote after its dial ack
    answered = [False]  # the fake remote opened the Stream and answered the hub's dial
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()

    async def drain(call: Any, on_message: Callable[[bytes], None] | None = None) -> None:
        with contextlib.suppress(Exception):
            while True:
                m = await call.read()
                if m is grpc.aio.EOF:
                    return
                if on_message is not None:
                    on_message(m)

    def on_hub_frame(m: bytes) -> None:
        if got_new_stream.is_set():
            return
        with contextlib.suppress(Exception):
            r = tunnel_pb2.StreamResponse.FromString(m)
            if r.WhichOneof("data") == "tunnel" and r.tunnel.WhichOneof("frame") == "new_stream":
                own_sid[0] = r.tunnel.stream_id or 1
                got_new_stream.set()

    async def fake_remote() -> None:
        nonlocal stream_call
        k = await fake.requests.get()
        if case["ack"] == "error":  # refuse on the control stream instead of opening a Stream
            await fake.answer(k, (3, "fuzz says no"))
            sent_codes.append(3)
            res.sent["TunnelRequest.stream.error"] += 1
            return
        md = ((N.MD_AUTH, f"Bearer {fake.token}"), (N.MD_STREAM_ID, str(k)))
        stream_call = fake.channel.stream_stream(N.STREAM_METHOD)(metadata=md)
        await stream_call.write(tunnel_pb2.StreamRequest(connect={
            "remote": N.resource_name("default", fake.name)}).SerializeToString())
        for _ in range(2):  # connect, dial
            m = await stream_call.read()
            if m is grpc.aio.EOF:
                return
        tasks.append(loop.create_task(drain(stream_call, on_hub_frame)))
        ack = case["ack"]
        acks = {"dial": tunnel_pb2.StreamRequest(dial={}).SerializeToString(),
                "connect": tunnel_pb2.StreamRequest(connect={"remote": "x"}).SerializeToString(),
                "garbage": b"\xff\xff", "empty": b"",
                "tunnel": tunnel_pb2.StreamRequest(tunnel={"stream_id": 1}).SerializeToString()}
        answered[0] = True
        if ack == "eof":
            await stream_call.done_writing()
            return
        if ack == "cancel":
            stream_call.cancel()
            return
        await stream_call.write(acks[ack])
        res.sent[f"StreamRequest.ack:{ack}"] += 1
        if ack != "dial":
            with contextlib.suppress(Exception):
                await stream_call.done_writing()
            return
        await fake.answer(k)
        with contextlib.suppress(TimeoutError):  # the hub's new_stream comes first
            await asyncio.wait_for(got_new_stream.wait(), 5)
        for op in case["script"]:
            label, data = encode_s2c(op, own_sid[0])
            if op[0] == "close" and op[1] == "self":
                sent_codes.append(op[2])
            after_ack[0] += 1
            try:
                if op[0] == "outer":
                    await stream_call.write(data)
                    res.sent[f"StreamRequest:{label}"] += 1
                else:
                    await stream_call.write(wrap_tunnel_frame(data))
                    res.sent[f"s2c.{label}"] += 1
            except Exception:  # noqa: BLE001 - the hub ended the call
                return
        end = case["end"]
        with contextlib.suppress(Exception):
            if end == "close_ok":
                after_ack[0] += 1
                await stream_call.write(wrap_tunnel_frame(st_pb.ServerToClient(
                    stream_id=own_sid[0], close_stream={"status": {"code": 0}}).SerializeToString()))
                sent_codes.append(0)
            elif end == "cancel":
                stream_call.cancel()
                return
            await asyncio.sleep(0.05)
            await stream_call.done_writing()

    while not fake.requests.empty():  # requests of earlier cases that gave up
        fake.requests.get_nowait()
    ft = loop.create_task(fake_remote())
    ct = loop.create_task(drain(client))
    code: SC | None = None
    try:
        async def client_side() -> SC:
            label, first = case["first"]
            with contextlib.suppress(Exception):
                await client.write(first)
                res.sent[f"client:{label}"] += 1
                if case["client_half_close"]:
                    await client.done_writing()
            c = await client.code()
            res.details = (await client.details()) or ""
            return c

        try:
            code = await asyncio.wait_for(client_side(), CALL_TIMEOUT)
        except TimeoutError:
            code = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ft, 5)
        if stream_call is not None:
            try:
                sc = await asyncio.wait_for(stream_call.code(), CALL_TIMEOUT)
                sd = (await stream_call.details()) or ""
            except TimeoutError:
                res.fail(f"the fake remote's Stream call did not end within {CALL_TIMEOUT:g}s "
                         "of the client's call")
            else:
                res.stream_codes[f"Stream:{sc.name}"] += 1
                if sc not in (OK_, SC.CANCELLED, SC.INVALID_ARGUMENT):
                    k = known_issue(res.target, sc, sd, {"path": N.STREAM_METHOD,
                                                         "written": 1 + after_ack[0]})
                    if k is not None:
                        res.known.append(k)
                    else:
                        res.fail(f"the fake remote's Stream call ended {sc.name}: {sd[:200]!r}")
    finally:
        for t in (ft, ct, *tasks):
            t.cancel()
        client.cancel()
        if stream_call is not None:
            stream_call.cancel()
    allowed = {OK_, SC.UNAVAILABLE, SC.RESOURCE_EXHAUSTED,
               *(CODE_BY_NUMBER.get(c, SC.UNKNOWN) for c in sent_codes)}
    info = {"path": NETCONN, "relayed": True, "answered": answered[0]}
    res.check_code(code, allowed, info, extra_ok=lambda c, d: (
        c is SC.INTERNAL and bool(CLIENT_REASSEMBLY_INTERNAL.search(d))))
    if answered[0] and code is SC.UNAVAILABLE and "did not open a stream in" in res.details:
        # the remote did open the Stream and answered (or hung up): no reason to wait
        res.fail(f"the client waited for the stream request timeout: {res.details!r}")
    return res


def wrap_tunnel_frame(frame: bytes) -> bytes:
    from sesame.bridge import wrap_tunnel

    return wrap_tunnel(frame)


def encode_s2c(op: tuple, own: int) -> tuple[str, bytes]:
    kind, sel = op[0], (op[1] if len(op) > 1 and isinstance(op[1], str) else "self")
    if kind == "raw":
        return "raw", op[1]
    if kind == "outer":
        return op[1][0], op[1][1]
    sid = {"self": own, "zero": 0, "never": own + 1000, "max": UINT64, "other": own + 1}[sel]
    f = st_pb.ServerToClient(stream_id=sid)
    if kind == "hdr":
        f.header.SetInParent()
        for k, v in op[2]:
            e = f.header.data[k]
            (e.bin.values if isinstance(v, bytes) else e.str.values).append(v)
    elif kind == "msg":
        _, _, rel, (plabel, data) = op
        size = {"exact": len(data), "short": len(data) + 3, "less": max(len(data) - 1, 0),
                "neg": -5, "huge": 5 * 1024 * 1024, "zero": 0}[rel]
        f.message.size = size
        f.message.data = data or (b"x" if rel == "less" else b"")
        kind = f"msg:{rel}:{plabel}"
    elif kind == "more":
        f.message_data = op[2]
    elif kind == "close":
        _, _, code, message, trailers = op
        f.close_stream.status.code = code
        f.close_stream.status.message = message
        for k, v in trailers:
            e = f.close_stream.trailer.data[k]
            (e.bin.values if isinstance(v, bytes) else e.str.values).append(v)
    elif kind == "wu":
        f.window_update = op[2]
    return kind, f.SerializeToString()


# --- the driver --------------------------------------------------------------------------------


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    cases: collections.Counter = field(default_factory=collections.Counter)
    calls: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    stream_statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    sent: collections.Counter = field(default_factory=collections.Counter)
    failures: list[dict] = field(default_factory=list)
    failure_count: int = 0
    known: collections.Counter = field(default_factory=collections.Counter)
    examples: collections.Counter = field(default_factory=collections.Counter)
    seconds: collections.Counter = field(default_factory=collections.Counter)
    #: (target, code) -> a few distinct status messages seen
    details: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: collections.defaultdict(dict))

    def add(self, r: Result) -> None:
        seen = self.details[r.target].setdefault(r.code or "NO_STATUS", [])
        d = re.sub(r"(?<![(\d ])\d+(?![\d )])", "N", r.details[:160])
        if len(seen) < 4 and d not in seen:
            seen.append(d)
        self.cases[r.target] += r.cases
        self.calls[r.target] += r.calls
        self.statuses[r.target][r.code or "NO_STATUS"] += 1
        self.stream_statuses[r.target].update(r.stream_codes)
        for k, v in r.sent.items():
            self.sent[f"{r.target}:{k}"] += v
        for k in r.known:
            self.known[k] += 1
        if r.failures:
            self.failure_count += 1
            if len(self.failures) < 60:
                self.failures.append({"target": r.target, "why": r.failures[:3], "code": r.code,
                                      "details": r.details[:300], "case": r.case[:600]})

    @property
    def total(self) -> int:
        return sum(self.cases.values())


def case_strategy(target: str, shapes: Shapes) -> st.SearchStrategy[Any]:
    if target == "hub.tunnel":
        return hub_tunnel_case()
    if target == "hub.stream":
        return hub_stream_case()
    if target == "hub.netconn":
        return hub_netconn_case(shapes)
    if target == "hub.mgmt":
        return hub_mgmt_case()
    if target == "hub.stream_tunnel":
        return stream_tunnel_case(shapes)
    if target == "remote.tunnel":
        return tunnel_case(shapes, REMOTE_METHODS, ["sesame"], outer_noise=True)
    if target == "host.sesame":
        return tunnel_case(shapes, HOST_METHODS, ["sesame"])
    if target == "host.grpctunnel":
        return tunnel_case(shapes, HOST_METHODS, ["grpctunnel"])
    if target == "host.reverse":
        return reverse_case()
    raise ValueError(target)


async def run_batch(env: Env, target: str, batch: list[Any]) -> list[Result]:
    """(loop) Run one example's cases concurrently; every exception becomes a failure."""
    channel = env.channel() if target.startswith("hub.") else None

    async def one(i: int, case: Any) -> Result:
        try:
            if target == "hub.tunnel":
                return await run_hub_tunnel(env, case, channel)
            if target == "hub.stream":
                return await run_hub_stream(env, case, channel)
            if target == "hub.netconn":
                return await run_hub_netconn(env, case, channel)
            if target == "hub.mgmt":
                return await run_hub_mgmt(env, case, channel)
            if target == "hub.stream_tunnel":
                return await run_stream_tunnel(env, case, env.fakes[i % len(env.fakes)], channel)
            if target == "remote.tunnel":
                return await run_remote_tunnel(env, case)
            if target in ("host.sesame", "host.grpctunnel"):
                return await run_host_tunnel(env, case, target)
            if target == "host.reverse":
                return await run_host_reverse(env, case, channel)
            raise ValueError(target)
        except Exception:  # noqa: BLE001 - a harness error is a failure too
            r = Result(target, case=short(case))
            r.fail("harness error: " + traceback.format_exc()[-800:])
            return r

    try:
        return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(batch))))
    finally:
        if channel is not None:
            await channel.close()


def fuzz_target(env: Env, target: str, cases: int, execute: Callable[[Any], Any], stats: Stats, *,
                strict: bool = False, seed: int | None = None, max_batch: int | None = None) -> None:
    """Run about ``cases`` cases against ``target`` (hypothesis examples of concurrent batches).

    ``execute(coro)`` runs a coroutine on the bridge loop and returns its result.  With
    ``strict`` an unknown failure raises (hypothesis then shrinks it); otherwise it is
    recorded and the run goes on."""
    from hypothesis import seed as hseed

    mb = max(1, min(max_batch or MAX_BATCH[target], MAX_BATCH[target]))
    per_case = 3 if target in ("host.sesame", "host.grpctunnel", "remote.tunnel") else 1
    goal = stats.cases[target] + cases
    strategy = st.lists(case_strategy(target, env.shapes), min_size=1, max_size=mb)

    def run(examples: int, seed_: int | None) -> None:
        @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate, Phase.shrink] if strict else [Phase.generate],
                  print_blob=False, report_multiple_bugs=False)
        @given(batch=strategy)
        def example(batch: list[Any]) -> None:
            t0 = time.monotonic()
            results = execute(run_batch(env, target, batch))
            stats.seconds[target] += time.monotonic() - t0
            if PROGRESS:
                print(f"{target}: {len(batch)} cases in {time.monotonic() - t0:.2f}s "
                      f"{[r.code for r in results]} "
                      f"{[f for r in results for f in r.failures][:2]}", file=sys.stderr, flush=True)
            stats.examples[target] += 1
            for r in results:
                stats.add(r)
            if strict:
                bad = [r for r in results if r.failures]
                assert not bad, "\n".join(f"{r.failures} code={r.code} details={r.details!r}\n"
                                          f"case={r.case}" for r in bad)

        if seed_ is not None:
            example = hseed(seed_)(example)
        example()

    attempt = 0
    while stats.cases[target] < goal and attempt < 20:
        left = goal - stats.cases[target]
        run(max(1, int(left / ((mb + 1) / 2 * per_case) + 0.999)),
            None if seed is None else seed * 1000 + attempt)
        attempt += 1


async def final_check(env: Env, settle: float = 20.0) -> dict[str, Any]:
    """(loop) The canary still round-trips, nothing is left open, everything is up."""
    out: dict[str, Any] = {"problems": []}
    problems = out["problems"]
    try:
        await env.canary.roundtrip(b"canary-after-the-run")
        out["canary_roundtrip"] = "ok"
    except Exception as exc:  # noqa: BLE001
        problems.append(f"canary does not round-trip: {exc!r}")
        out["canary_roundtrip"] = repr(exc)
    base = env.baseline
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while True:
        now = await snapshot(env)
        diff = {k: (base[k], now[k]) for k in base
                if k not in ("threads", "loop_tasks", "rss_mib") and base[k] != now[k]}
        tasks_ok = now["loop_tasks"] <= base["loop_tasks"] + 5
        threads_ok = now["threads"] <= base["threads"] + 16 + 4
        if not diff and tasks_ok and threads_ok:
            break
        if loop.time() >= deadline:
            if diff:
                problems.append(f"not back to baseline (before, after): {diff}")
            if not tasks_ok:
                extra = [t for t in asyncio.all_tasks(loop)]
                names = collections.Counter(
                    getattr(t.get_coro(), "__qualname__", str(t.get_coro())) for t in extra)
                problems.append(f"bridge-loop tasks {base['loop_tasks']} -> {now['loop_tasks']}: "
                                f"{names.most_common(8)}")
            if not threads_ok:
                problems.append(f"threads {base['threads']} -> {now['threads']}: "
                                f"{[t.name for t in threading.enumerate()]}")
            break
        await asyncio.sleep(0.2)
    out["after"] = now
    out["baseline"] = base
    out["remote_stream_calls_left_open"] = _left_open_calls(env)
    if env.remote.fatal or env.remote.registrations != 1:
        problems.append(f"the remote re-registered or gave up: registrations="
                        f"{env.remote.registrations} fatal={env.remote.fatal!r}")
    # a fresh connection works, end to end
    try:
        ch = env.channel()
        call = ch.stream_stream(NETCONN)(metadata=((N.MD_AUTH, f"Bearer {env.tokens['client']}"),
                                                   (N.MD_REMOTE, "edge-1")))
        await call.write(env.shapes.dial_echo())
        await call.write(encode_bytes(b"fresh"))
        await call.done_writing()
        got = b""
        async for m in call:
            got += rc_pb.NetConnResponse.FromString(m).bytes
        code = await asyncio.wait_for(call.code(), 10)
        await ch.close()
        if code is not OK_ or got != b"fresh":
            problems.append(f"a fresh connection: {code.name} {got!r}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"a fresh connection failed: {exc!r}")
    return out


def report(stats: Stats, final: dict[str, Any], env: Env, args: Any = None) -> dict[str, Any]:
    dur = time.monotonic() - stats.started
    # inbound messages by target and type (the message, its oneof member or frame kind),
    # and the mangling applied to them across all targets
    types: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    mutations: collections.Counter = collections.Counter()
    for key, n in stats.sent.items():
        target, label = key.split(":", 1)
        base, _, mutation = label.partition("+")
        types[target][re.sub(r"(msg:[a-z]+):.*", r"\1", base)] += n
        if mutation:
            mutations[mutation] += n
    per_type = {t: dict(c.most_common()) for t, c in types.items()}
    return {
        "cases": stats.total,
        "calls": sum(stats.calls.values()),
        "inbound_messages": sum(stats.sent.values()),
        "duration_s": round(dur, 1),
        "cases_per_s": round(stats.total / dur, 1) if dur else None,
        "failures": stats.failure_count,
        "failure_examples": stats.failures,
        "known_findings": {k: {"cases": v, "what": KNOWN[k]} for k, v in stats.known.items()},
        "cases_per_target": dict(stats.cases),
        "calls_per_target": dict(stats.calls),
        "examples_per_target": dict(stats.examples),
        "seconds_per_target": {t: round(v, 1) for t, v in stats.seconds.items()},
        "statuses": {t: dict(c.most_common()) for t, c in stats.statuses.items()},
        "status_messages": {t: dict(v) for t, v in stats.details.items()},
        "tunnelled_stream_statuses": {t: dict(c.most_common())
                                      for t, c in stats.stream_statuses.items() if c},
        "inbound_messages_per_type": per_type,
        "mutations": dict(mutations.most_common()),
        "logged_errors": dict(env.logged.most_common(30)),
        "final_check": final,
        "settings": {"call_timeout_s": CALL_TIMEOUT, "close_wait_s": CLOSE_WAIT,
                     "hub_stream_request_timeout_s": FUZZ_STREAM_REQUEST_TIMEOUT,
                     "hub_dial_timeout_s": _hub.DIAL_TIMEOUT,
                     "seed": getattr(args, "seed", None)},
        "versions": {"python": sys.version.split()[0], "grpcio": grpc.__version__,
                     "hypothesis": __import__("hypothesis").__version__},
    }


def split_budget(total: int, targets: list[str]) -> dict[str, int]:
    weight = sum(TARGETS[t] for t in targets)
    return {t: max(1, round(total * TARGETS[t] / weight)) for t in targets}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000, help="total cases (default 20000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=4,
                   help="spread each target's cases over this many rounds (interleaves targets)")
    p.add_argument("--progress", action="store_true", help="one stderr line per example")
    args = p.parse_args()
    global PROGRESS
    PROGRESS = args.progress
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    logging.basicConfig(level=logging.CRITICAL)
    for name in ("sesame", "grpc"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False

    from twisted.internet import reactor, threads

    from sesame.bridge import get_bridge

    out: dict[str, Any] = {}

    def drive() -> None:
        env = None
        try:
            env = threads.blockingCallFromThread(
                reactor, lambda: __import__("twisted.internet.defer", fromlist=["x"])
                .ensureDeferred(start_env(reactor)))
            bridge = get_bridge()
            stats = Stats()
            budget = split_budget(args.cases, targets)
            for rnd in range(args.rounds):
                for t in targets:
                    share = budget[t] // args.rounds + (1 if rnd < budget[t] % args.rounds else 0)
                    if share:
                        fuzz_target(env, t, share, lambda coro: bridge.run(coro, 600), stats,
                                    seed=None if args.seed is None else args.seed + rnd,
                                    max_batch=args.max_batch)
                print(f"round {rnd + 1}/{args.rounds}: {stats.total} cases, "
                      f"{stats.failure_count} failing, {time.monotonic() - stats.started:.0f}s",
                      file=sys.stderr, flush=True)
            final = bridge.run(final_check(env), 120)
            try:
                code = bridge.run(env.canary.close(), 30)
                if code is not OK_:
                    final["problems"].append(f"the canary closed with {code.name}")
            except Exception as exc:  # noqa: BLE001
                final["problems"].append(f"closing the canary: {exc!r}")
            out.update(report(stats, final, env, args))
        except BaseException:  # noqa: BLE001
            out["harness_error"] = traceback.format_exc()
        finally:
            if env is not None:
                with contextlib.suppress(Exception):
                    threads.blockingCallFromThread(
                        reactor, lambda: __import__("twisted.internet.defer", fromlist=["x"])
                        .ensureDeferred(stop_env(env)))
            reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(lambda: threading.Thread(target=drive, name="fuzz-driver",
                                                     daemon=True).start())
    reactor.run(installSignalHandlers=False)
    print(json.dumps(out, indent=2, default=str))
    bad = (out.get("harness_error") or out.get("failures")
           or out.get("final_check", {}).get("problems"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
