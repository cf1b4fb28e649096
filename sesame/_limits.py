"""
Open files: raise the soft limit at start, and know when we are near it.

With the common soft limit of 1,024 a hub stopped registering remotes at about a
thousand, and then every new connection hung while grpc logged "File descriptor limit
reached. Retrying.".  So every long-running entry point (hub, remote, ``sesame
forward``) raises its soft ``RLIMIT_NOFILE`` to the hard limit first and says so, and the
hub counts its open files every two seconds (:class:`FileBudget`) to say, once, when it
comes within a tenth of the limit and when it is back below.

Counting means listing ``/proc/self/fd`` (about 17 ms at 19,000 files): callers do it
off the reactor.  No twisted or grpc here.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; ``(before, after)``.

    Unchanged (``before == after``) where it is already there or may not be raised.
    An unlimited hard limit is treated as 1,048,576 (the kernel's usual nr_open).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def open_file_limit() -> int:
    """The current soft ``RLIMIT_NOFILE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def count_open_files() -> int | None:
    """How many files this process has open (``/proc/self/fd``), or None where that
    cannot be read.  Costs about 1 us per open file: not for the reactor thread."""
    try:
        with os.scandir("/proc/self/fd") as entries:
            return sum(1 for _ in entries) - 1  # the directory being listed
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return open_file_limit()  # no file left even to look: at the limit
        return None


@dataclass
class FileBudget:
    """How close the process is to its open-file limit: :meth:`sample` records a count
    (taken off the reactor), :attr:`near` says whether it is within ``reserve`` of it."""

    limit: int
    reserve: int
    sampled: int = 0

    @classmethod
    def for_limit(cls, limit: int) -> FileBudget:
        """The budget of a process whose limit is ``limit``: a reserve of a tenth of it,
        at least 64."""
        return cls(limit, max(64, limit // 10))

    def sample(self, count: int | None = None) -> int:
        """Record a fresh count (``count_open_files()`` unless given); the count."""
        fresh = count_open_files() if count is None else count
        if fresh is not None:
            self.sampled = fresh
        return self.sampled

    @property
    def near(self) -> bool:
        """Within ``reserve`` files of the limit."""
        return self.sampled >= self.limit - self.reserve
