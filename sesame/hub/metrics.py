"""
Hub metrics for Prometheus, the numbers the dashboard shows, and the fleet index
the management API pages through.

One :class:`HubMetrics` per :class:`~sesame.hub.Hub` (``hub.metrics``), each with
its own :class:`prometheus_client.CollectorRegistry`, so several hubs in one
process (tests) never share counters.

Hot path: a relayed connection gets a :class:`ConnStats` from
:meth:`HubMetrics.open_connection` and adds payload lengths to two plain int
attributes; nothing touches a lock or a label lookup per message.  The
collector (``/metrics``) and the dashboard read the live ``ConnStats`` plus the
totals of closed connections, so byte counters move while a long connection is
still open.  Front doors that count bytes themselves call :meth:`add_bytes`.

Fleet size: ``/metrics`` (:meth:`HubMetrics.render`) has fleet-level series only
by default: gauges of the whole hub (remotes, sessions, streams, connections),
byte and connection counters by direction, error counters by code or kind, and
one tunnel RTT histogram.  Their size does not depend on the number of remotes.
Per-remote series (``sesame_hub_remote_*``, by namespace, remote and route) are
opt-in: ``render(per_remote=N)`` for the N busiest remotes, ``per_remote=None`` for
all of them (``/metrics?remotes=N`` / ``?remotes=all``).

History: :meth:`HubMetrics.sample` appends one point to :attr:`HubMetrics.history`,
a ring (:class:`History`) of the last 15 minutes: hub throughput in and out,
open connections, remotes and sessions, plus the same for the busiest remotes of
the interval (and for remotes the dashboard is watching).  :meth:`start_sampling`
samples every :data:`HISTORY_INTERVAL` seconds on a Twisted clock; the dashboard
starts it when it is mounted.

Fleet index: :class:`FleetIndex` (``hub.metrics.fleet``) keeps the connected
remotes and their sessions in name order, rebuilt only when the set of sessions
changed, so a page of the listing or of the dashboard costs the page, not a sort
of the fleet.

Bounds: per-remote counters of a remote that is disconnected, has no open
connection and moved nothing for :data:`HISTORY_SPAN` seconds are dropped (their
bytes stay in the fleet totals); the error list, history and watch list are rings.

Tunnel RTT: grpcio does not expose HTTP/2 PING round trips to Python, and the
control stream (PROTOCOL.md §5.1) has no message the remote answers without side
effects.  The hub therefore times the one pure round trip of each ``Stream``
handshake (§5.2 steps 3-4): from writing ``dial{endpoint}`` to reading the
remote's ``dial{}`` ack, which the remote sends after a dictionary lookup, on the
remote's existing HTTP/2 connection.  So there is one sample per connection
routed to the remote, and none while it is idle.
"""

from __future__ import annotations

import bisect
import collections
import gc
import heapq
import logging
import operator
import threading
import time
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HISTORY_INTERVAL", "HISTORY_SPAN", "ConnStats", "FleetIndex", "FleetView",
           "History", "HubMetrics", "payload_len"]

log = logging.getLogger("sesame.metrics")

#: How many recent errors the dashboard keeps.
RECENT_ERRORS = 50
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Seconds between two history samples, and how far back the history goes.
HISTORY_INTERVAL = 5.0
HISTORY_SPAN = 900.0
#: Per sample, the history keeps the busiest remotes of the interval up to this many
#: (plus the watched ones); past it, a sample says it is incomplete.
HISTORY_REMOTES = 200
#: At most this many remotes are watched (their history recorded whatever their rank).
WATCH_MAX = 32

Key = tuple[str, str]  # (namespace, remote)


def payload_len(msg: bytes) -> int:
    """The ``bytes`` payload length of a NetConn message (field 2 in requests and responses),
    read from the message length alone (no parse, no copy); 0 for dial/conn messages."""
    n = len(msg)
    if not n or msg[0] != 0x12:
        return 0
    # tag + varint(len) + payload; ours are at most 1 MiB (3-byte varint), a peer's may
    # be as large as the call's 4 MiB message limit (4 bytes)
    if n <= 16386:
        return n - 2 if n <= 129 else n - 3
    return n - 4 if n <= 2097155 else n - 5


class ConnStats:
    """Bytes of one open connection: ``bytes_in`` towards the remote, ``bytes_out`` from it."""

    __slots__ = ("_closed", "_metrics", "bytes_in", "bytes_out", "key", "sampled_in",
                 "sampled_out")

    def __init__(self, metrics: HubMetrics, key: tuple[str, str, str]) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.sampled_in = 0  # how much of them the history has seen (HubMetrics.sample)
        self.sampled_out = 0
        self.key = key
        self._metrics = metrics
        self._closed = False

    def close(self) -> None:
        """The connection ended: fold its bytes into the totals (idempotent)."""
        if not self._closed:
            self._closed = True
            self._metrics._close(self)


# --- the fleet index ---------------------------------------------------------------------


@dataclass(frozen=True)
class FleetView:
    """The connected remotes at one moment, in (namespace, name) order.

    ``keys`` are the remotes, ``names`` their ids lowercased (for filters),
    ``sessions[key]`` their sessions by ascending id; ``flat`` is every session's
    ``(namespace, remote, id)`` in order, ``flat_sessions`` the sessions alongside.
    Sessions that closed since the view was made have ``closed`` set.
    """

    keys: list[Key]
    names: list[str]
    sessions: dict[Key, tuple[Any, ...]]
    flat: list[tuple[str, str, int]]
    flat_sessions: list[Any]

    @classmethod
    def of(cls, sessions: Iterable[Any]) -> FleetView:
        """The view of ``sessions`` (any order)."""
        live = [s for s in sessions if not s.closed]
        flat = sorted(map(_flat_key, live))
        by_key = {s.id: s for s in live}
        ordered = [by_key[k[2]] for k in flat]
        by: dict[Key, list[Any]] = {}
        keys: list[Key] = []
        for s in ordered:
            k = (s.namespace, s.remote)
            group = by.get(k)
            if group is None:
                by[k] = [s]
                keys.append(k)
            else:
                group.append(s)
        return cls(keys, [k[1].lower() for k in keys],
                   {k: tuple(v) for k, v in by.items()}, flat, ordered)

    def changed(self, added: Iterable[Any], removed: Iterable[Any]) -> FleetView:
        """A new view: this one with sessions ``added`` and ``removed`` (copy on write, so
        readers of this one are not disturbed; O(fleet) memory copies, O(changes × log fleet)
        comparisons)."""
        keys, names, by = list(self.keys), list(self.names), dict(self.sessions)
        flat, ordered = list(self.flat), list(self.flat_sessions)
        for s in removed:
            fk = _flat_key(s)
            i = bisect.bisect_left(flat, fk)
            if i < len(flat) and flat[i] == fk:
                del flat[i]
                del ordered[i]
            k = fk[:2]
            rest = tuple(x for x in by.get(k, ()) if x.id != s.id)
            if rest:
                by[k] = rest
            elif k in by:
                del by[k]
                j = bisect.bisect_left(keys, k)
                del keys[j]
                del names[j]
        for s in added:
            if s.closed:
                continue
            fk = _flat_key(s)
            i = bisect.bisect_left(flat, fk)
            if i < len(flat) and flat[i] == fk:
                continue
            flat.insert(i, fk)
            ordered.insert(i, s)
            k = fk[:2]
            if k in by:
                by[k] = tuple(sorted((*by[k], s), key=_session_id))
            else:
                by[k] = (s,)
                j = bisect.bisect_left(keys, k)
                keys.insert(j, k)
                names.insert(j, k[1].lower())
        return FleetView(keys, names, by, flat, ordered)

    def matching(self, needle: str = "", namespace: str | None = None) -> list[Key]:
        """The remotes whose id contains ``needle`` (lowercase), of ``namespace`` if given."""
        keys = self.keys
        if namespace is not None:
            lo = bisect.bisect_left(keys, (namespace, ""))
            hi = bisect.bisect_left(keys, (namespace + "\0", ""))
            idx: Iterable[int] = range(lo, hi)
        else:
            idx = range(len(keys))
        if not needle:
            return [keys[i] for i in idx]
        names = self.names
        return [keys[i] for i in idx if needle in names[i]]

    def sessions_after(self, after: tuple[str, str, int] | None) -> int:
        """The position in :attr:`flat` of the first session past ``after``."""
        return 0 if after is None else bisect.bisect_right(self.flat, after)


_flat_key = operator.attrgetter("namespace", "remote", "id")
_session_id = operator.attrgetter("id")
_EMPTY = FleetView([], [], {}, [], [])


class FleetIndex:
    """:class:`FleetView` of ``hub.sessions``, brought up to date only when that changed.

    The change check is O(1): session ids are never reused and the dict keeps
    insertion order, so (size, newest key) changes with every registration and
    every unregistration.  A change is applied to a copy of the last view (the
    sessions that came and went: a set difference of ids), or the view is made
    again when much changed.  Safe from any thread: a view is built from one copy
    of the dict and replaces the old one in a single assignment.
    """

    #: Up to max(PATCH_MIN, fleet // PATCH_DIV) sessions that came or went, the last view
    #: is patched (each costs a few list moves of the fleet's size); past it, made again.
    PATCH_MIN = 64
    PATCH_DIV = 200

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._state: tuple[Any, dict[int, Any], FleetView] = (None, {}, _EMPTY)

    def view(self) -> FleetView:
        """The view of the hub's sessions now (the last one if nothing changed)."""
        sessions = getattr(self._hub, "sessions", None)
        if not sessions:
            if self._state[0] != (0, None):
                self._state = ((0, None), {}, _EMPTY)
            return self._state[2]
        try:
            sig: Any = (len(sessions), next(reversed(sessions)))
        except (RuntimeError, StopIteration):  # changed under us (another thread): redo
            sig = None
        old_sig, old, view = self._state
        if sig is not None and old_sig == sig:
            return view
        was = gc.isenabled()
        gc.disable()  # ~3 new containers per session: no collection passes meanwhile
        try:
            now = dict(sessions)  # one atomic copy
            added = now.keys() - old.keys() if old else now.keys()
            removed = old.keys() - now.keys() if old else ()
            if old and len(added) + len(removed) <= max(self.PATCH_MIN, len(now) // self.PATCH_DIV):
                view = view.changed([now[i] for i in added], [old[i] for i in removed])
            else:
                view = FleetView.of(now.values())
        finally:
            if was:
                gc.enable()
        self._state = (sig, now, view)
        return view


# --- history -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    time: float
    hub: tuple[float, float, int, int, int]  # rate in, rate out, connections, remotes, sessions
    keys: tuple[Key, ...]
    values: array  # 3 per key: rate in, rate out, connections
    complete: bool  # every remote that moved bytes or had a connection is in keys


class History:
    """A ring of samples over the last ``span`` seconds, one every ``interval``.

    Each sample holds the hub's totals and, for at most ``per_sample`` remotes
    (the busiest of the interval, then open connections) plus the watched ones,
    the remote's own rates and connections.  A remote absent from a complete
    sample was idle (0); absent from an incomplete one, unknown (``None``).
    Memory: at most ``span / interval`` samples × (``per_sample`` + :data:`WATCH_MAX`)
    remotes × ~20 bytes.
    """

    def __init__(self, interval: float = HISTORY_INTERVAL, span: float = HISTORY_SPAN,
                 per_sample: int = HISTORY_REMOTES) -> None:
        if interval <= 0 or span < interval:
            raise ValueError("history: interval must be positive and at most span")
        self.interval = interval
        self.span = span
        self.per_sample = per_sample
        self.samples: collections.deque[_Sample] = collections.deque(
            maxlen=int(span / interval))
        self._watched: collections.OrderedDict[Key, float] = collections.OrderedDict()
        self._lock = threading.Lock()  # watch() and watched() come from different threads

    # -- watching

    def watch(self, key: Key, now: float) -> None:
        """Record ``key`` in every sample from now on (for :attr:`span` seconds after the
        last call); the oldest watch goes past :data:`WATCH_MAX`."""
        with self._lock:
            self._watched[key] = now
            self._watched.move_to_end(key)
            while len(self._watched) > WATCH_MAX:
                self._watched.popitem(last=False)

    def watched(self, now: float) -> set[Key]:
        """The remotes watched now (watches older than :attr:`span` are dropped)."""
        with self._lock:
            while self._watched:
                key, at = next(iter(self._watched.items()))
                if now - at <= self.span:
                    break
                self._watched.popitem(last=False)
            return set(self._watched)

    # -- writing and reading

    def add(self, now: float, hub: tuple[float, float, int, int, int],
            remotes: dict[Key, tuple[float, float, int]], watched: Iterable[Key] = ()) -> None:
        """Append a sample: ``hub`` = (rate in, rate out, connections, remotes, sessions),
        ``remotes`` = every active remote's (rate in, rate out, connections)."""
        keep = set(watched)
        chosen = [k for k in keep if k in remotes]
        rest = [k for k in remotes if k not in keep]
        complete = len(rest) <= self.per_sample
        if not complete:
            rest = heapq.nlargest(self.per_sample, rest,
                                  key=lambda k: (remotes[k][0] + remotes[k][1], remotes[k][2]))
            # an incomplete sample names the watched remotes even when idle (0 is known)
            chosen += [k for k in keep if k not in remotes]
        keys = tuple(chosen + rest)
        values = array("f")
        for k in keys:
            values.extend(remotes.get(k, (0.0, 0.0, 0)))
        self.samples.append(_Sample(now, hub, keys, values, complete))

    def latest(self, key: Key) -> tuple[float, float] | None:
        """The remote's (rate in, rate out) in the newest sample; None if unknown."""
        if not self.samples:
            return None
        s = self.samples[-1]
        try:
            i = s.keys.index(key)
        except ValueError:
            return (0.0, 0.0) if s.complete else None
        return (float(s.values[3 * i]), float(s.values[3 * i + 1]))

    def series(self, key: Key | None = None) -> dict:
        """Columns for a chart: ``t`` (POSIX seconds), ``in``/``out`` (bytes/s), ``conns``
        and, for the hub (``key`` None), ``remotes`` and ``sessions``; for a remote, a
        ``None`` where a sample does not know it."""
        samples = list(self.samples)
        t = [round(s.time, 1) for s in samples]
        if key is None:
            return {"t": t, "in": [round(s.hub[0], 1) for s in samples],
                    "out": [round(s.hub[1], 1) for s in samples],
                    "conns": [s.hub[2] for s in samples],
                    "remotes": [s.hub[3] for s in samples],
                    "sessions": [s.hub[4] for s in samples]}
        r_in: list[float | None] = []
        r_out: list[float | None] = []
        conns: list[int | None] = []
        for s in samples:
            try:
                i = s.keys.index(key)
            except ValueError:
                z = 0 if s.complete else None
                r_in.append(z)
                r_out.append(z)
                conns.append(z)
                continue
            r_in.append(round(float(s.values[3 * i]), 1))
            r_out.append(round(float(s.values[3 * i + 1]), 1))
            conns.append(int(s.values[3 * i + 2]))
        return {"t": t, "in": r_in, "out": r_out, "conns": conns}


# --- the metrics ---------------------------------------------------------------------------


class HubMetrics:
    """Counters and gauges of one hub; see the module docstring."""

    def __init__(self, hub: Any, *, recent: int = RECENT_ERRORS,
                 history: History | None = None) -> None:
        self.hub = hub
        self.fleet = FleetIndex(hub)
        self.history = history or History()
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        # (namespace, remote, route) -> [in, out] of closed connections and add_bytes()
        self._bytes: dict[tuple[str, str, str], list[int]] = {}
        self._opened: dict[tuple[str, str, str], int] = {}
        self._open: dict[tuple[str, str, str], int] = {}
        self._live: set[ConnStats] = set()
        # fleet totals of closed connections and add_bytes(): [opened, in, out]; never pruned
        self._totals = [0, 0, 0]
        self._open_total = 0
        # per remote: [closed in, closed out], open connections, RTT [last, sum, count]
        self._remote_bytes: dict[Key, list[int]] = {}
        self._remote_open: dict[Key, int] = {}
        self._remote_rtt: dict[Key, list[float]] = {}
        self._last_active: dict[Key, float] = {}  # monotonic time of the last traffic
        self._unsampled: dict[Key, list[int]] = {}  # bytes the history has not seen yet
        self._last_sample: tuple[float, int, int] | None = None  # (time, total in, total out)
        self._created = time.time()
        self._samples_taken = 0
        self._sampling: Any = None
        self._dial_errors: dict[str, int] = {}
        self._auth_failures: dict[str, int] = {}
        self.recent_errors: collections.deque[dict] = collections.deque(maxlen=recent)
        self._rtt = Histogram(
            "sesame_hub_tunnel_rtt_seconds",
            "Hub<->remote round trip: time from the hub writing dial on a new Stream to the "
            "remote's dial ack (one sample per routed connection; not HTTP/2 PING, which "
            "grpcio does not expose)",
            buckets=RTT_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))

    # --- the API front doors and the hub call ----------------------------------------

    def open_connection(self, namespace: str, remote: str, route: str = "") -> ConnStats:
        """Count a new connection; add to the returned stats' ``bytes_in``/``bytes_out``
        as data flows and call its ``close()`` at the end."""
        key = (namespace, remote, route)
        st = ConnStats(self, key)
        with self._lock:
            self._count_open(key)
            self._live.add(st)
        return st

    def _count_open(self, key: tuple[str, str, str]) -> None:
        rk = (key[0], key[1])
        self._opened[key] = self._opened.get(key, 0) + 1
        self._open[key] = self._open.get(key, 0) + 1
        self._remote_open[rk] = self._remote_open.get(rk, 0) + 1
        self._totals[0] += 1
        self._open_total += 1
        self._last_active[rk] = time.monotonic()

    def _count_closed(self, key: tuple[str, str, str]) -> None:
        rk = (key[0], key[1])
        if self._open.get(key, 0) > 0:
            self._open[key] -= 1
            self._remote_open[rk] = max(self._remote_open.get(rk, 0) - 1, 0)
            self._open_total = max(self._open_total - 1, 0)
        self._last_active[rk] = time.monotonic()

    def _close(self, st: ConnStats) -> None:
        with self._lock:
            self._live.discard(st)
            self._count_closed(st.key)
            self._add(st.key, st.bytes_in, st.bytes_out,
                      st.bytes_in - st.sampled_in, st.bytes_out - st.sampled_out)

    def _add(self, key: tuple[str, str, str], n_in: int, n_out: int, new_in: int,
             new_out: int) -> None:
        """(lock held) Fold finished bytes into every total; ``new_*`` of them unsampled."""
        rk = (key[0], key[1])
        b = self._bytes.setdefault(key, [0, 0])
        b[0] += n_in
        b[1] += n_out
        r = self._remote_bytes.setdefault(rk, [0, 0])
        r[0] += n_in
        r[1] += n_out
        self._totals[1] += n_in
        self._totals[2] += n_out
        if new_in or new_out:
            u = self._unsampled.setdefault(rk, [0, 0])
            u[0] += new_in
            u[1] += new_out
        self._last_active[rk] = time.monotonic()

    def connection_opened(self, namespace: str, remote: str, route: str = "") -> None:
        """Count a connection whose bytes arrive through :meth:`add_bytes`."""
        with self._lock:
            self._count_open((namespace, remote, route))

    def connection_closed(self, namespace: str, remote: str, route: str = "") -> None:
        """The end of a :meth:`connection_opened` connection."""
        with self._lock:
            self._count_closed((namespace, remote, route))

    def add_bytes(self, namespace: str, remote: str, route: str, direction: str, n: int) -> None:
        """``direction`` "in" = towards the remote, "out" = from it; ``route`` "" for
        ``sesame:`` client connections, else the route id."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction: 'in' or 'out', not {direction!r}")
        n_in, n_out = (n, 0) if direction == "in" else (0, n)
        with self._lock:
            self._add((namespace, remote, route), n_in, n_out, n_in, n_out)

    def dial_error(self, code_name: str, remote: str = "", message: str = "") -> None:
        """A connection the hub could not complete, by gRPC status code name."""
        with self._lock:
            self._dial_errors[code_name] = self._dial_errors.get(code_name, 0) + 1
        self._recent(remote, code_name, message)

    def auth_failure(self, kind: str, remote: str = "", message: str = "") -> None:
        """A refused credential; ``kind`` is who presented it: remote, client, admin."""
        with self._lock:
            self._auth_failures[kind] = self._auth_failures.get(kind, 0) + 1
        self._recent(remote, f"auth:{kind}", message)

    def rtt(self, namespace: str, remote: str, seconds: float) -> None:
        """One tunnel round trip of ``namespace/remote`` (see the module docstring)."""
        self._rtt.observe(seconds)
        with self._lock:
            self._last_active[(namespace, remote)] = time.monotonic()
            r = self._remote_rtt.get((namespace, remote))
            if r is None:
                self._remote_rtt[(namespace, remote)] = [seconds, seconds, 1]
            else:
                r[0] = seconds
                r[1] += seconds
                r[2] += 1

    def _recent(self, remote: str, code: str, message: str) -> None:
        self.recent_errors.append({"time": time.time(), "remote": remote, "code": code,
                                   "message": message[:500]})

    # --- reading -------------------------------------------------------------------------

    def bytes_by_key(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(namespace, remote, route) -> (bytes in, bytes out) so far, open connections included."""
        with self._lock:
            out = {k: (v[0], v[1]) for k, v in self._bytes.items()}
            live = list(self._live)
        for st in live:
            i, o = out.get(st.key, (0, 0))
            out[st.key] = (i + st.bytes_in, o + st.bytes_out)
        return out

    def bytes_by_remote(self) -> dict[Key, tuple[int, int]]:
        """(namespace, remote) -> (bytes in, bytes out) so far, open connections included."""
        with self._lock:
            out = {k: (v[0], v[1]) for k, v in self._remote_bytes.items()}
            live = list(self._live)
        for st in live:
            rk = (st.key[0], st.key[1])
            i, o = out.get(rk, (0, 0))
            out[rk] = (i + st.bytes_in, o + st.bytes_out)
        return out

    def remote_numbers(self, keys: Sequence[Key]) -> dict[Key, dict]:
        """For each of ``keys`` (a page): bytes in and out so far, open connections, last RTT
        (seconds or None) and rates in and out from the newest history sample (None if
        unknown).  Costs the page plus one pass over the open connections."""
        want = set(keys)
        with self._lock:
            rows = {k: {"bytes_in": self._remote_bytes.get(k, (0, 0))[0],
                        "bytes_out": self._remote_bytes.get(k, (0, 0))[1],
                        "connections": self._remote_open.get(k, 0),
                        "rtt": self._remote_rtt[k][0] if k in self._remote_rtt else None}
                    for k in keys}
            live = list(self._live)
        for st in live:
            rk = (st.key[0], st.key[1])
            if rk in want:
                rows[rk]["bytes_in"] += st.bytes_in
                rows[rk]["bytes_out"] += st.bytes_out
        for k, row in rows.items():
            rate = self.history.latest(k)
            row["rate_in"], row["rate_out"] = rate if rate is not None else (None, None)
        return rows

    def totals(self) -> dict:
        """The whole hub: connections opened and open, bytes in and out so far."""
        with self._lock:
            opened, b_in, b_out = self._totals
            open_now = self._open_total
            live = list(self._live)
        for st in live:
            b_in += st.bytes_in
            b_out += st.bytes_out
        return {"connections_total": opened, "connections": open_now,
                "bytes_in": b_in, "bytes_out": b_out}

    def open_connections(self) -> dict[tuple[str, str, str], int]:
        """(namespace, remote, route) -> connections open now (non-zero ones)."""
        with self._lock:
            return {k: v for k, v in self._open.items() if v}

    def dial_errors(self) -> dict[str, int]:
        """Failed connections so far, by gRPC status code name."""
        with self._lock:
            return dict(self._dial_errors)

    def auth_failures(self) -> dict[str, int]:
        """Refused credentials so far, by who presented them (remote, client, admin)."""
        with self._lock:
            return dict(self._auth_failures)

    def last_rtt(self, namespace: str, remote: str) -> float | None:
        """The remote's latest tunnel round trip in seconds, None before its first."""
        r = self._remote_rtt.get((namespace, remote))
        return None if r is None else r[0]

    # --- history -------------------------------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Append one point to :attr:`history` (rates over the time since the last point)
        and drop the counters of remotes gone for longer than the history's span."""
        with self._sample_lock:  # one sample at a time (the timer's, a test's)
            self._sample(time.time() if now is None else now)

    def _sample(self, now: float) -> None:
        view = self.fleet.view()
        with self._lock:
            deltas, self._unsampled = self._unsampled, {}
            for st in self._live:
                d_in, d_out = st.bytes_in - st.sampled_in, st.bytes_out - st.sampled_out
                if d_in or d_out:
                    st.sampled_in += d_in
                    st.sampled_out += d_out
                    rk = (st.key[0], st.key[1])
                    d = deltas.setdefault(rk, [0, 0])
                    d[0] += d_in
                    d[1] += d_out
            opened = {k: n for k, n in self._remote_open.items() if n}
            _, b_in, b_out = self._totals
            open_now = self._open_total
            live = list(self._live)
        for st in live:
            b_in += st.bytes_in
            b_out += st.bytes_out
        t0, in0, out0 = self._last_sample or (self._created, 0, 0)
        self._last_sample = (now, b_in, b_out)
        dt = now - t0
        per = 1.0 / dt if dt > 0 else 0.0
        remotes = {k: (d[0] * per, d[1] * per, opened.get(k, 0)) for k, d in deltas.items()}
        for k, n in opened.items():
            if k not in remotes:
                remotes[k] = (0.0, 0.0, n)
        hub = (max(b_in - in0, 0) * per, max(b_out - out0, 0) * per, open_now,
               len(view.keys), len(view.flat))
        self.history.add(now, hub, remotes, self.history.watched(now))
        self._samples_taken += 1
        if self._samples_taken % 12 == 0:
            self._prune(view)

    def _prune(self, view: FleetView) -> None:
        """Forget per-remote counters of remotes long gone (the fleet totals keep their bytes)."""
        horizon = time.monotonic() - self.history.span
        connected = view.sessions
        with self._lock:
            gone = {k for k, at in self._last_active.items()
                    if at < horizon and k not in connected and not self._remote_open.get(k)}
            if not gone:
                return
            for d in (self._remote_bytes, self._remote_open, self._remote_rtt,
                      self._last_active, self._unsampled):
                for k in gone:
                    d.pop(k, None)
            for d3 in (self._bytes, self._opened, self._open):
                for k3 in [k3 for k3 in d3 if (k3[0], k3[1]) in gone]:
                    del d3[k3]

    def start_sampling(self, clock: Any) -> None:
        """Call :meth:`sample` every ``history.interval`` seconds on ``clock`` (a Twisted
        ``IReactorTime``; in a reactor's thread pool when it has one, as the fleet index
        may need an update) until :meth:`stop_sampling`, or until this object is gone (the
        timer holds it weakly).  Idempotent."""
        if self._sampling is not None:
            return
        ref = weakref.ref(self)
        interval = self.history.interval
        pool = getattr(clock, "getThreadPool", None)  # a reactor: sample off its thread

        def again(_: Any = None) -> None:
            m = ref()
            if m is not None and m._sampling is not None:
                m._sampling = clock.callLater(interval, tick)

        def tick() -> None:
            m = ref()
            if m is None or m._sampling is None:
                return
            if pool is None:
                try:
                    m.sample(clock.seconds())
                except Exception:
                    log.exception("history sample failed")
                again()
                return
            from twisted.internet.threads import deferToThreadPool

            d = deferToThreadPool(clock, pool(), m.sample, clock.seconds())
            d.addErrback(lambda f: log.error("history sample failed: %s", f.getTraceback()))
            d.addBoth(again)

        self._sampling = clock.callLater(interval, tick)

    def stop_sampling(self) -> None:
        """Stop :meth:`start_sampling`'s timer."""
        call, self._sampling = self._sampling, None
        if call is not None and call.active():
            call.cancel()

    # --- exposition ----------------------------------------------------------------------

    def render(self, per_remote: int | None = 0) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type: the fleet-level series,
        plus per-remote series for the ``per_remote`` busiest remotes (0: none, the
        default; None: every remote)."""
        if per_remote == 0:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return generate_latest(_WithRemotes(self, per_remote)), CONTENT_TYPE_LATEST

    def busiest(self, n: int | None) -> list[Key]:
        """The ``n`` remotes (all when None) with the most bytes relayed, then open
        connections, then by name; connected remotes and remotes with counters."""
        traffic = self.bytes_by_remote()
        with self._lock:
            open_by = dict(self._remote_open)
            rtt = set(self._remote_rtt)
        keys = set(self.fleet.view().sessions) | set(traffic) | set(open_by) | rtt

        def rank(k: Key) -> tuple:
            i, o = traffic.get(k, (0, 0))
            return (-(i + o), -open_by.get(k, 0), k)

        if n is None:
            return sorted(keys, key=rank)
        return heapq.nsmallest(n, keys, key=rank)


class _Collector:
    """The fleet-level series (everything but the RTT histogram), computed when scraped."""

    def __init__(self, m: HubMetrics) -> None:
        self.m = m

    def describe(self) -> list:
        return []  # names are only known at scrape time; skip registry-time checks

    def collect(self) -> Iterator[Any]:
        m = self.m
        view = m.fleet.view()
        live = [s for s in view.flat_sessions if not s.closed]
        yield GaugeMetricFamily("sesame_hub_remotes_connected",
                                "Remotes with at least one live control stream",
                                len({(s.namespace, s.remote) for s in live}))
        yield GaugeMetricFamily("sesame_hub_sessions", "Live control streams (Tunnel calls)",
                                len(live))
        yield GaugeMetricFamily("sesame_hub_streams_open",
                                "Stream tunnels carrying a client connection",
                                sum(s.connections for s in live))
        yield GaugeMetricFamily("sesame_hub_stream_requests_pending",
                                "Stream requests sent to remotes and not yet answered",
                                sum(len(s.pending) for s in live))
        t = m.totals()
        yield GaugeMetricFamily("sesame_hub_connections_open",
                                "Client connections being relayed (sesame: clients and front "
                                "doors)", t["connections"])
        yield CounterMetricFamily("sesame_hub_connections",
                                  "Client connections relayed to a remote", t["connections_total"])
        b = CounterMetricFamily("sesame_hub_bytes",
                                "Payload bytes relayed; direction in = towards the remote, "
                                "out = from it", labels=["direction"])
        b.add_metric(["in"], t["bytes_in"])
        b.add_metric(["out"], t["bytes_out"])
        yield b
        d = CounterMetricFamily("sesame_hub_dial_errors",
                                "Client connections that failed, by gRPC status code",
                                labels=["code"])
        for k, v in sorted(m.dial_errors().items()):
            d.add_metric([k], v)
        yield d
        a = CounterMetricFamily("sesame_hub_auth_failures",
                                "Refused tokens (unauthenticated or permission denied), by who "
                                "presented them", labels=["kind"])
        for k, v in sorted(m.auth_failures().items()):
            a.add_metric([k], v)
        yield a
        cluster = getattr(m.hub, "cluster", None)
        if cluster is not None:
            yield from _cluster_series(cluster)


def _cluster_series(cluster: Any) -> Iterator[Any]:
    """``sesame_cluster_*``: this hub's view of its cluster (sesame.hub.cluster)."""
    yield GaugeMetricFamily("sesame_cluster_up",
                            "1 while the cluster's store (Redis) answers, 0 in degraded mode",
                            1 if cluster.up else 0)
    yield GaugeMetricFamily("sesame_cluster_peers", "Other hubs with a live lease",
                            len(cluster.peers))
    per_hub = GaugeMetricFamily("sesame_cluster_hub_sessions",
                                "Sessions each hub of the cluster holds", labels=["hub"])
    per_hub.add_metric([cluster.id], len(cluster.local))
    for peer in sorted(cluster.peers.values(), key=lambda p: p.id):
        per_hub.add_metric([peer.id], len(peer.sessions))
    yield per_hub
    yield CounterMetricFamily("sesame_cluster_relayed_connections",
                              "Connections this hub relayed to the hub holding the remote",
                              cluster.relayed)
    yield CounterMetricFamily("sesame_cluster_served_for_peers",
                              "Relays this hub served for another hub", cluster.served_for_peers)
    yield CounterMetricFamily("sesame_cluster_bus_messages", "Bus messages applied",
                              cluster.bus_messages)
    yield GaugeMetricFamily("sesame_cluster_bus_lag_seconds",
                            "Age of the last bus message when it arrived", cluster.bus_lag)


class _WithRemotes:
    """The registry's series plus per-remote ones for :meth:`HubMetrics.render`."""

    def __init__(self, m: HubMetrics, n: int | None) -> None:
        self.m, self.n = m, n

    def collect(self) -> Iterator[Any]:
        yield from self.m.registry.collect()
        m = self.m
        keys = m.busiest(self.n)
        chosen = set(keys)
        view = m.fleet.view()
        rk = ["namespace", "remote"]
        g = GaugeMetricFamily("sesame_hub_remote_sessions",
                              "Live control streams of the remote", labels=rk)
        st = GaugeMetricFamily("sesame_hub_remote_streams_open",
                               "Stream tunnels of the remote carrying a client connection",
                               labels=rk)
        pend = GaugeMetricFamily("sesame_hub_remote_stream_requests_pending",
                                 "Stream requests sent to the remote and not yet answered",
                                 labels=rk)
        for k in sorted(keys):
            sessions = [s for s in view.sessions.get(k, ()) if not s.closed]
            g.add_metric(list(k), len(sessions))
            st.add_metric(list(k), sum(s.connections for s in sessions))
            pend.add_metric(list(k), sum(len(s.pending) for s in sessions))
        yield g
        yield st
        yield pend
        lab = ["namespace", "remote", "route"]
        with m._lock:
            opened = {k: v for k, v in m._opened.items() if (k[0], k[1]) in chosen}
            open_now = {k: v for k, v in m._open.items() if (k[0], k[1]) in chosen}
            rtt = {k: tuple(v) for k, v in m._remote_rtt.items() if k in chosen}
        op = GaugeMetricFamily("sesame_hub_remote_connections_open",
                               "Client connections being relayed (route \"\" = sesame: clients)",
                               labels=lab)
        for k, v in sorted(open_now.items()):
            op.add_metric(list(k), v)
        yield op
        tot = CounterMetricFamily("sesame_hub_remote_connections",
                                  "Client connections relayed to the remote", labels=lab)
        for k, v in sorted(opened.items()):
            tot.add_metric(list(k), v)
        yield tot
        b = CounterMetricFamily("sesame_hub_remote_bytes",
                                "Payload bytes relayed; direction in = towards the remote, "
                                "out = from it", labels=[*lab, "direction"])
        for k, (i, o) in sorted(m.bytes_by_key().items()):
            if (k[0], k[1]) in chosen:
                b.add_metric([*k, "in"], i)
                b.add_metric([*k, "out"], o)
        yield b
        r = SummaryMetricFamily("sesame_hub_remote_tunnel_rtt_seconds",
                                "The remote's tunnel round trips (see sesame_hub_tunnel_rtt_seconds)",
                                labels=rk)
        for k, (_, total, count) in sorted(rtt.items()):
            r.add_metric(list(k), count_value=int(count), sum_value=total)
        yield r
