"""Numbers about the master and its workers: sampled, summed, kept monotonic.

Two sources: what each worker says of itself in its pongs (connections
active and handled, event-loop lag), and what the kernel says of each
process, read with psutil (memory, CPU, open fds). psutil reads are cached
for ``max_age_s`` so that a status request and a metrics scrape in the same
second cost one read.

Counters stay monotonic across worker restarts: when a process exits, its
counts are added to its slot's ``Totals``, and reports add the live process's
counts on top.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import psutil


class ProcessSampler:
    """psutil readings of one process, at most one real read per ``max_age_s``."""

    def __init__(self, pid: int, max_age_s: float = 1.0) -> None:
        self.pid = pid
        self.max_age_s = max_age_s
        self._process: psutil.Process | None = None
        self._at = float("-inf")
        self._sample: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        """Return rss_bytes, uss_bytes, cpu_percent and open_fds (empty if the process is gone)."""
        now = time.monotonic()
        if now - self._at < self.max_age_s:
            return self._sample
        self._at = now
        try:
            if self._process is None:
                self._process = psutil.Process(self.pid)
                self._process.cpu_percent(None)  # the first reading only sets the baseline
            process = self._process
            with process.oneshot():
                memory = process.memory_full_info()
                self._sample = {
                    "rss_bytes": memory.rss,
                    "uss_bytes": memory.uss,
                    "cpu_percent": process.cpu_percent(None),
                    "open_fds": process.num_fds(),
                }
        except (psutil.Error, OSError):
            # psutil reads /proc, which takes an fd: at the fd limit that is a
            # plain OSError (EMFILE). The snapshot goes without these figures
            # rather than fail.
            self._sample = {}
        return self._sample


@dataclass
class Totals:
    """Counts of a slot's processes that have exited (so counters never go back)."""

    handed_off: int = 0
    acked: int = 0
    refused: int = 0
    handled: int = 0
    accepted: int = 0

    def add(self, **counts: int) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + counts.get(field.name, 0))


class Rate:
    """Events per second of a monotonic counter, over the last ``update`` interval."""

    def __init__(self) -> None:
        self._last_count = 0
        self._last_at = time.monotonic()
        self.per_s = 0.0

    def update(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self._last_at
        if elapsed > 0:
            self.per_s = (count - self._last_count) / elapsed
        self._last_count = count
        self._last_at = now



class DistributionFigures(TypedDict):
    """What a distribution counts, as the master's snapshot reports it."""

    accepted: int
    accept_errors: int
    accept_rate: float
    pending: int
    in_flight: int
    handed_off: int
    handoff_messages: int
    redispatched: int
    expired: int
