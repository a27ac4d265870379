"""Recycling: when a worker is due to be replaced (``--max-requests``, ``--max-memory``).

gunicorn's ``max_requests`` and PM2's ``max_memory_restart``. Each worker's
connection limit is drawn when it is started (``--max-requests`` plus a
random 0..``--max-requests-jitter``, so workers started together do not all
recycle at once); its memory is read from the kernel (psutil, at most once a
second). This module only says whether, and why, a worker is due; the
supervisor replaces it the way a rolling reload does (the new process first,
then the old one drains), and after a replacement that failed to boot it
waits ``RETRY_S`` before trying that slot again.
"""

from __future__ import annotations

import random

from dispatcher.worker_process import WorkerProcess

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

    def limit(self) -> int:
        """The connection limit of a worker about to start (0: none)."""
        return self.max_requests + random.randint(0, self.jitter) if self.max_requests else 0

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
