"""
Hub metrics for Prometheus, and the numbers the dashboard shows.

One :class:`HubMetrics` per :class:`~sesame.hub.Hub` (``hub.metrics``), each with
its own :class:`prometheus_client.CollectorRegistry`, so several hubs in one
process (tests) never share counters.

Hot path: a relayed connection gets a :class:`ConnStats` from
:meth:`HubMetrics.open_connection` and adds payload lengths to two plain int
attributes; nothing touches a lock or a label lookup per message.  The
collector (``/metrics``) and the dashboard read the live ``ConnStats`` plus the
totals of closed connections, so byte counters move while a long connection is
still open.  Front doors that count bytes themselves call :meth:`add_bytes`.

Gauges (remotes connected, sessions, streams open, stream requests pending) are
computed from hub state at scrape time.

Tunnel RTT: grpcio does not expose HTTP/2 PING round trips to Python, and the
control stream (PROTOCOL.md §5.1) has no message the remote answers without side
effects.  The hub therefore times the one pure round trip of each ``Stream``
handshake (§5.2 steps 3-4): from writing ``dial{endpoint}`` to reading the
remote's ``dial{}`` ack, which the remote sends after a dictionary lookup, on the
remote's existing HTTP/2 connection.  So there is one sample per connection
routed to the remote, and none while it is idle.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ConnStats", "HubMetrics", "payload_len"]

#: How many recent errors the dashboard keeps.
RECENT_ERRORS = 50
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def payload_len(msg: bytes) -> int:
    """The ``bytes`` payload length of a NetConn message (field 2 in requests and responses),
    read from the message length alone (no parse, no copy); 0 for dial/conn messages."""
    n = len(msg)
    if not n or msg[0] != 0x12:
        return 0
    # tag + varint(len) + payload; a NetConn message is at most 256 KiB (3-byte varint)
    return n - 2 if n <= 129 else n - 3 if n <= 16386 else n - 4


class ConnStats:
    """Bytes of one open connection: ``bytes_in`` towards the remote, ``bytes_out`` from it."""

    __slots__ = ("bytes_in", "bytes_out", "key", "_metrics", "_closed")

    def __init__(self, metrics: HubMetrics, key: tuple[str, str, str]) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.key = key
        self._metrics = metrics
        self._closed = False

    def close(self) -> None:
        """The connection ended: fold its bytes into the totals (idempotent)."""
        if not self._closed:
            self._closed = True
            self._metrics._close(self)


class HubMetrics:
    """Counters and gauges of one hub; see the module docstring."""

    def __init__(self, hub: Any, *, recent: int = RECENT_ERRORS) -> None:
        self.hub = hub
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        # (namespace, remote, route) -> [in, out] of closed connections and add_bytes()
        self._bytes: dict[tuple[str, str, str], list[int]] = {}
        self._opened: dict[tuple[str, str, str], int] = {}
        self._open: dict[tuple[str, str, str], int] = {}
        self._live: set[ConnStats] = set()
        self._dial_errors: dict[str, int] = {}
        self._auth_failures: dict[str, int] = {}
        self._rtt_last: dict[tuple[str, str], float] = {}
        self._samples: collections.deque[tuple[float, dict]] = collections.deque()
        self.recent_errors: collections.deque[dict] = collections.deque(maxlen=recent)
        self._rtt = Histogram(
            "sesame_hub_tunnel_rtt_seconds",
            "Hub<->remote round trip: time from the hub writing dial on a new Stream to the "
            "remote's dial ack (one sample per routed connection; not HTTP/2 PING, which "
            "grpcio does not expose)",
            ["namespace", "remote"], buckets=RTT_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))

    # --- the API front doors and the hub call ----------------------------------------

    def open_connection(self, namespace: str, remote: str, route: str = "") -> ConnStats:
        """Count a new connection; add to the returned stats' ``bytes_in``/``bytes_out``
        as data flows and call its ``close()`` at the end."""
        key = (namespace, remote, route)
        st = ConnStats(self, key)
        with self._lock:
            self._opened[key] = self._opened.get(key, 0) + 1
            self._open[key] = self._open.get(key, 0) + 1
            self._live.add(st)
        return st

    def _close(self, st: ConnStats) -> None:
        with self._lock:
            self._live.discard(st)
            self._open[st.key] = self._open.get(st.key, 1) - 1
            b = self._bytes.setdefault(st.key, [0, 0])
            b[0] += st.bytes_in
            b[1] += st.bytes_out

    def connection_opened(self, namespace: str, remote: str, route: str = "") -> None:
        key = (namespace, remote, route)
        with self._lock:
            self._opened[key] = self._opened.get(key, 0) + 1
            self._open[key] = self._open.get(key, 0) + 1

    def connection_closed(self, namespace: str, remote: str, route: str = "") -> None:
        key = (namespace, remote, route)
        with self._lock:
            self._open[key] = max(self._open.get(key, 0) - 1, 0)

    def add_bytes(self, namespace: str, remote: str, route: str, direction: str, n: int) -> None:
        """``direction`` "in" = towards the remote, "out" = from it; ``route`` "" for
        ``sesame:`` client connections, else the route id."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction: 'in' or 'out', not {direction!r}")
        with self._lock:
            b = self._bytes.setdefault((namespace, remote, route), [0, 0])
            b[direction == "out"] += n

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
        self._rtt.labels(namespace, remote).observe(seconds)
        self._rtt_last[(namespace, remote)] = seconds

    def _recent(self, remote: str, code: str, message: str) -> None:
        self.recent_errors.append({"time": time.time(), "remote": remote, "code": code,
                                   "message": message})

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

    def bytes_by_remote(self) -> dict[tuple[str, str], tuple[int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for (ns, remote, _), (i, o) in self.bytes_by_key().items():
            a, b = out.get((ns, remote), (0, 0))
            out[(ns, remote)] = (a + i, b + o)
        return out

    def open_connections(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return {k: v for k, v in self._open.items() if v}

    def dial_errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dial_errors)

    def auth_failures(self) -> dict[str, int]:
        with self._lock:
            return dict(self._auth_failures)

    def last_rtt(self, namespace: str, remote: str) -> float | None:
        return self._rtt_last.get((namespace, remote))

    def throughput(self, window: float = 3.0,
                   now: float | None = None) -> dict[tuple[str, str], tuple[float, float]]:
        """Bytes/s in and out per (namespace, remote) over about the last ``window``
        seconds, from samples taken when this is called (the dashboard polls it)."""
        now = time.monotonic() if now is None else now
        current = self.bytes_by_remote()
        with self._lock:
            s = self._samples
            if not s or now - s[-1][0] >= 0.2:
                s.append((now, current))
            while len(s) > 1 and now - s[1][0] >= window:
                s.popleft()
            t0, old = s[0]
        dt = now - t0
        if dt <= 0:
            return {k: (0.0, 0.0) for k in current}
        rates = {}
        for k, (i, o) in current.items():
            i0, o0 = old.get(k, (0, 0))
            rates[k] = (max(i - i0, 0) / dt, max(o - o0, 0) / dt)
        return rates

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    """Everything but the RTT histogram, computed when scraped."""

    def __init__(self, m: HubMetrics) -> None:
        self.m = m

    def describe(self) -> list:
        return []  # names are only known at scrape time; skip registry-time checks

    def collect(self) -> Iterator[Any]:
        m, hub = self.m, self.m.hub
        sessions = [s for s in list(hub.sessions.values()) if not s.closed]
        remotes = {(s.namespace, s.remote) for s in sessions}
        yield GaugeMetricFamily("sesame_hub_remotes_connected",
                                "Remotes with at least one live control stream", len(remotes))
        g = GaugeMetricFamily("sesame_hub_sessions", "Live control streams (Tunnel calls)",
                              labels=["namespace", "remote"])
        st = GaugeMetricFamily("sesame_hub_streams_open",
                               "Stream tunnels carrying a client connection",
                               labels=["namespace", "remote"])
        pend = GaugeMetricFamily("sesame_hub_stream_requests_pending",
                                 "Stream requests sent to the remote and not yet answered",
                                 labels=["namespace", "remote"])
        per: dict[tuple[str, str], list[int]] = {}
        for s in sessions:
            v = per.setdefault((s.namespace, s.remote), [0, 0, 0])
            v[0] += 1
            v[1] += s.connections
            v[2] += len(s.pending)
        for (ns, name), (n, c, p) in sorted(per.items()):
            g.add_metric([ns, name], n)
            st.add_metric([ns, name], c)
            pend.add_metric([ns, name], p)
        yield g
        yield st
        yield pend
        lab = ["namespace", "remote", "route"]
        op = GaugeMetricFamily("sesame_hub_connections_open",
                               "Client connections being relayed (route \"\" = sesame: clients)",
                               labels=lab)
        for k, v in sorted(m.open_connections().items()):
            op.add_metric(list(k), v)
        yield op
        with m._lock:
            opened = dict(m._opened)
        tot = CounterMetricFamily("sesame_hub_connections",
                                  "Client connections relayed to a remote", labels=lab)
        for k, v in sorted(opened.items()):
            tot.add_metric(list(k), v)
        yield tot
        b = CounterMetricFamily("sesame_hub_bytes",
                                "Payload bytes relayed; direction in = towards the remote, "
                                "out = from it", labels=[*lab, "direction"])
        for k, (i, o) in sorted(m.bytes_by_key().items()):
            b.add_metric([*k, "in"], i)
            b.add_metric([*k, "out"], o)
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
