"""
Which of grpcio's two I/O engines a sesame process runs on.

grpcio 1.80 and later do their socket I/O through the "EventEngine" by default; the
engine before it (the "iomgr" poller) is still built in and is chosen with
``GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`` in the environment,
read once, when ``grpc`` is first imported.  Measured on the project's 2-core machines
(docs/PERFORMANCE.md, "Data path, fourth pass"; ``bench/grpc_engines.py``), the older
engine spends less per message: a bare grpc.aio round trip over TLS takes ~340 µs
instead of ~450 and ~250 µs of server CPU instead of ~280, and receiving 1 MiB messages
costs ~12 % less.  End to end, a hub's CPU per port-map round trip went from ~580 µs to
~480-530 and ``sesame forward`` bulk from 190-231 to 220-242 MiB/s.

So the ``sesame`` command, ``twistd sesame`` and the ``sesame:`` endpoint-string
parsers ask for it before they import grpc (:func:`choose_grpc_io`), unless told
otherwise:

* ``SESAME_GRPC_IO=event-engine`` keeps grpcio's default; ``SESAME_GRPC_IO=iomgr``
  (the default) asks for the older engine;
* a ``GRPC_EXPERIMENTS`` that already names either experiment is left as it is;
* a process that imported grpc already keeps the engine it has (the variable is read
  only once), and so does a grpcio outside :data:`KNOWN_VERSIONS`, where these
  experiments may not exist (grpcio logs an error for an unknown one).

Library users choose for their own processes: call ``sesame.choose_grpc_io()`` first
thing, or set the variable themselves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV = "SESAME_GRPC_IO"
IOMGR = "iomgr"
EVENT_ENGINE = "event-engine"
#: grpcio releases whose EventEngine can be switched off with the two experiments below
#: (from the release that made it the Python default up to the newest one measured).
KNOWN_VERSIONS = ((1, 80), (1, 85))
EXPERIMENTS = ("event_engine_client", "event_engine_listener")


def _grpcio_version() -> tuple[int, int] | None:
    from importlib import metadata  # only when choosing: `import sesame` stays light

    try:
        text = metadata.version("grpcio")
    except metadata.PackageNotFoundError:
        return None
    try:
        major, minor = (int(p) for p in text.split(".")[:2])
    except ValueError:
        return None
    return major, minor


_chosen: str | None = None


def choose_grpc_io(environ: MutableMapping[str, str] | None = None,
                   version: tuple[int, int] | None = None) -> str:
    """Ask grpcio for the engine ``SESAME_GRPC_IO`` names (default: iomgr) by setting
    ``GRPC_EXPERIMENTS`` in ``environ`` (default: ``os.environ``) before grpc is imported.

    Returns what happened, for a log line: ``"iomgr"`` (asked for), ``"event-engine"``
    (left at grpcio's default on purpose), or why nothing was done (``"grpcio's default:
    grpc was imported first"``, ``"as GRPC_EXPERIMENTS says"``, ``"grpcio's default:
    grpcio X.Y not measured"``).  In this process (``environ`` None) only the first call
    decides; later ones return its answer.  ValueError for a ``SESAME_GRPC_IO`` that is
    neither ``iomgr`` nor ``event-engine``."""
    global _chosen
    if environ is not None:
        return _choose(environ, version, imported=False)
    if _chosen is None:
        _chosen = _choose(os.environ, version, imported="grpc" in sys.modules)
    return _chosen


def _choose(env: MutableMapping[str, str], version: tuple[int, int] | None,
            imported: bool) -> str:
    wanted = env.get(ENV, IOMGR).strip().lower() or IOMGR
    if wanted not in (IOMGR, EVENT_ENGINE):
        raise ValueError(f"{ENV}={env.get(ENV)!r}: use {IOMGR} or {EVENT_ENGINE}")
    if wanted == EVENT_ENGINE:
        return EVENT_ENGINE
    if imported:
        return "grpcio's default: grpc was imported first"
    current = env.get("GRPC_EXPERIMENTS", "")
    named = {item.strip().lstrip("-") for item in current.split(",")}
    if named & set(EXPERIMENTS):  # by name: event_engine_client_channel_resolver is another
        return "as GRPC_EXPERIMENTS says"
    have = _grpcio_version() if version is None else version
    low, high = KNOWN_VERSIONS
    if have is None or not low <= have <= high:
        shown = "?" if have is None else f"{have[0]}.{have[1]}"
        return f"grpcio's default: grpcio {shown} not measured"
    ours = ",".join(f"-{name}" for name in EXPERIMENTS)
    env["GRPC_EXPERIMENTS"] = f"{current},{ours}" if current.strip() else ours
    return IOMGR


__all__ = ["ENV", "EVENT_ENGINE", "IOMGR", "KNOWN_VERSIONS", "choose_grpc_io"]
