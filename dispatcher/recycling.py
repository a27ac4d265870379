"""Recycling: when a worker is due to be replaced (``--max-requests``, ``--max-memory``).

gunicorn's ``max_requests`` and PM2's ``max_memory_restart``. Each worker's
connection limit is drawn when it is started (``--max-requests`` plus a
random 0..``--max-requests-jitter``, so workers started together do not all
recycle at once); its memory is read from the kernel (psutil, at most once a
second). This module only says whether, and why, a worker is due; the
slot's worker is replaced the way a rolling reload does it (the new process
first, then the old one drains: ``Supervisor.replace``), one replacement per
slot at a time, and after one that failed to boot the slot is left alone
for ``RETRY_S``.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable

from dispatcher.lifecycle import WorkerState
from dispatcher.slots import Replaced, Slot
from dispatcher.worker_process import WorkerProcess

log = logging.getLogger(__name__)

#: After a recycle whose successor failed to boot, wait this long before trying again.
RETRY_S = 30.0


def served(worker: WorkerProcess) -> int:
    """Connections ``worker`` took: acked hand-offs, or its own accepts (shared, reuseport)."""
    return max(worker.lane.acked, worker.pulse.figure("accepted"))


class Recycling:
    """The limits past which a worker is replaced.

    Parameters:
        max_requests: connections a worker takes before it is replaced (0: no limit).
        jitter: up to this many more, drawn per worker.
        max_memory: RSS in bytes past which it is replaced (0: no limit).
    """

    def __init__(self, max_requests: int = 0, jitter: int = 0, max_memory: int = 0) -> None:
        self.max_requests = max_requests
        self.jitter = jitter
        self.max_memory = max_memory
        # Slot id -> no recycling before this (monotonic), after a replacement failed to boot.
        self._retry_at: dict[int, float] = {}

    def draw_max_requests(self) -> int:
        """The connection limit of a worker about to start (0: none)."""
        return self.max_requests + random.randint(0, self.jitter) if self.max_requests else 0

    def recycle_if_due(self, slot: Slot, replace: Callable[[Slot, str], Replaced]) -> None:
        """Replace ``slot``'s worker with ``replace`` if it is ready and due (and not being replaced)."""
        worker = slot.worker
        if (worker is None or slot.successor is not None or worker.state is not WorkerState.READY
                or time.monotonic() < self._retry_at.get(slot.id, 0.0)):
            return
        reason = self.reason(worker)
        if reason is None:
            return
        log.info("%r %s; replacing it", worker, reason)
        replace(slot, reason).add_done_callback(functools.partial(self._replaced, slot.id))

    def _replaced(self, slot_id: int, replaced: Replaced) -> None:
        if replaced.result() is not None:
            self._retry_at[slot_id] = time.monotonic() + RETRY_S

    def reason(self, worker: WorkerProcess) -> str | None:
        """Why ``worker`` is due for replacement, or None if it is not."""
        count = served(worker)
        if worker.max_requests and count >= worker.max_requests:
            return f"served {count} connections (max-requests {worker.max_requests})"
        if self.max_memory:
            rss = worker.sampler.sample().get("rss_bytes")
            if rss is not None and rss > self.max_memory:
                return f"uses {rss / 2**20:.1f} MiB (max-memory {self.max_memory / 2**20:.1f} MiB)"
        return None
