"""Health pings: is each worker's event loop still answering?

The master pings every live worker on one timer, all at once, and never
waits for an answer: a pong is just another message on the worker's
channel. The worker answers from its event loop (not a helper thread), so a
loop blocked by the app stops answering and is caught here. One ping is
outstanding per worker at a time; a worker silent for longer than the
timeout (counted from its last pong, or its start) is reported once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from dispatcher.worker_process import WorkerProcess
from shared.protocol import Ping, Pong

# What a pong may report, and as what.
_REPORTED: dict[str, tuple[type, ...]] = {
    "handled": (int,), "accepted": (int,), "active": (int,), "handed": (int,),
    "acked": (int,), "refused": (int,), "loop_lag_ms": (int, float),
}
_LIMIT = 2**63


class Health:
    """Ping bookkeeping for the master's workers.

    Parameters:
        interval_s: how often to ping.
        timeout_s: how long a worker may stay silent.
        on_unresponsive: called once with a worker and how long it was silent.
    """

    def __init__(
        self,
        interval_s: float,
        timeout_s: float,
        on_unresponsive: Callable[[WorkerProcess, float], None],
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._on_unresponsive = on_unresponsive

    def tick(self, workers: Iterable[WorkerProcess], now: float | None = None) -> None:
        """Ping who needs it; report who has been silent too long."""
        now = time.monotonic() if now is None else now
        for worker in workers:
            # A worker still loading its app has a blocked loop by design: the
            # boot timeout covers it, not the pings.
            if worker.returncode is not None or worker.channel.closed or not worker.ready:
                continue
            silent = now - worker.last_heard
            if silent > self.timeout_s:
                if not worker.unresponsive:
                    worker.unresponsive = True
                    self._on_unresponsive(worker, silent)
                continue
            if worker.ping_sent_at is None:
                worker.ping_seq += 1
                worker.ping_sent_at = now
                worker.channel.send(Ping(worker.ping_seq))

    @staticmethod
    def on_pong(worker: WorkerProcess, pong: Pong, now: float | None = None) -> None:
        """Record ``worker``'s answer: round trip and its own counters.

        Only the counters the master uses are kept, and only as non-negative
        numbers: the figures come from the worker and are not trusted.
        """
        now = time.monotonic() if now is None else now
        worker.last_heard = now
        worker.reported = {
            key: value for key, value in pong.stats.items()
            if key in _REPORTED and type(value) in _REPORTED[key] and 0 <= value < _LIMIT
        }
        if worker.ping_sent_at is not None and pong.seq == worker.ping_seq:
            rtt = now - worker.ping_sent_at
            worker.rtt_last_s = rtt
            worker.rtt_total_s += rtt
            worker.pongs += 1
            worker.ping_sent_at = None
