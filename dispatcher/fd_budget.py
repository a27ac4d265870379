"""The master's file descriptors: the open-files limit, and what is kept back from connections.

Theory of operation
-------------------
Every connection the master accepts is an fd it holds until a worker acks
it (``dispatcher.scheduler``). Left unbounded, a flood of clients takes
every fd the process may open, and then the master cannot start a worker
(a socketpair and a pidfd each, and for a moment the worker's end and the
exec error pipe), answer its control socket or serve metrics: the outage
outlasts the flood, since each fd the pending timeout frees is accepted
again at once. So:

- At start the soft RLIMIT_NOFILE is raised to the hard limit (as nginx's
  ``worker_rlimit_nofile`` and systemd services do); the workers inherit it.
- The fds open once the master is set up (listeners, control socket,
  metrics, the loop's own) are counted, and on top of them a reserve is
  kept: two per worker process (channel, pidfd) for up to three per slot
  (the one serving, its successor, one retiring), the fds a spawn needs
  while it runs, some control and metrics connections, and a margin for
  ``/proc`` reads and logging.
- The rest is what connections may hold: the scheduler accepts no more than
  that in all, queued and in flight (``Scheduler.max_held``), however high
  ``--max-pending`` is. The budget is recomputed when the slot count
  changes, and measured again when an accept meets EMFILE all the same (the
  limit lowered under a running master, fds held by something not counted).

``Keeper`` applies the budget for the master: at start, when the slot
count changes, after an EMFILE (measured again, and held less), and once a
second while it is below what it was at start (given back once fds are
free again). Nothing here opens or closes an fd; it only counts.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

#: A worker process holds two of the master's fds: its channel and its pidfd.
FDS_PER_PROCESS = 2
#: Processes a slot may have at once: serving, its successor, one retiring.
PROCESSES_PER_SLOT = 3
#: What a spawn holds while it runs: the worker's end of the socketpair and the exec error pipe.
SPAWN_FDS = 3
#: Control and metrics connections kept room for (more are served while fds allow).
SERVICE_FDS = 12
#: /proc reads by the samplers, log rotation, and what nothing here counts.
MARGIN_FDS = 16
#: Below this many connections the master can hardly serve at all: said loudly at start.
TOO_FEW = 16


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # a container may forbid it
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def current_limit() -> int:
    """The soft open-files limit now (``prlimit`` may have changed it under a running process)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds() -> int:
    """How many fds this process has open now."""
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own


@dataclass(frozen=True)
class FdBudget:
    """How many connections the master may hold, given its limit and what it keeps back.

    Attributes:
        limit: the soft open-files limit.
        fixed: fds open once the master was set up (not connections, not workers).
    """

    limit: int
    fixed: int

    @classmethod
    def measure(cls) -> FdBudget:
        """The budget of this process as it is now."""
        return cls(current_limit(), open_fds())

    def reserve(self, slots: int) -> int:
        """The fds kept back from connections for ``slots`` worker slots and the master's services."""
        return (self.fixed + FDS_PER_PROCESS * PROCESSES_PER_SLOT * slots + SPAWN_FDS
                + SERVICE_FDS + MARGIN_FDS)

    def connections(self, slots: int) -> int:
        """How many connections the master may hold with ``slots`` slots (at least 1)."""
        return max(1, self.limit - self.reserve(slots))


class Holder(Protocol):
    """What holds the master's connections (the distribution)."""

    @property
    def connections_held(self) -> int:
        """Connections held now, queued and in flight."""

    def hold_at_most(self, connections: int, workers: int) -> int:
        """Hold no more than ``connections``; return how many fewer than without the bound."""


class Keeper:
    """Keeps the connections a ``Holder`` holds within the master's fd budget.

    Parameters:
        holder: the distribution.
        slots: how many worker slots there are now.
        processes: how many worker processes are alive now (each holds fds).
        max_pending, window: the settings the budget caps, for the log line.
    """

    def __init__(self, holder: Holder, slots: Callable[[], int], processes: Callable[[], int],
                 max_pending: int, window: int) -> None:
        self._holder = holder
        self._slots = slots
        self._processes = processes
        self._max_pending = max_pending
        self._window = window
        self._budget: FdBudget | None = None
        self._at_start: FdBudget | None = None
        self._measured_at = 0.0
        self._logged = 0

    def start(self) -> None:
        """Measure (once everything the master keeps open is open) and apply."""
        self._budget = self._at_start = FdBudget.measure()
        self.apply()

    def apply(self) -> None:
        """Bound the holder for the slots there are now (at start, and after a scale)."""
        budget = self._budget
        if budget is None:
            return
        workers = self._slots()
        held = budget.connections(workers)
        short = self._holder.hold_at_most(held, workers)
        if short and held != self._logged:
            self._logged = held
            log.warning(
                "pending queue capped by the fd limit: at most %d connection(s) held, queued and in "
                "flight (%d fewer than --max-pending %d and %d worker(s) x window %d); open-files "
                "limit %d, of which %d are kept for workers, control and metrics",
                held, short, self._max_pending, workers, self._window,
                budget.limit, min(budget.reserve(workers), budget.limit),
            )
            if held < TOO_FEW:
                log.error("the fd limit (%d) leaves almost nothing for connections; raise it "
                          "(ulimit -n, LimitNOFILE=) or run fewer workers", budget.limit)

    def limit_met(self) -> None:
        """Accepting met EMFILE though the budget said there was room: measure again, and hold less.

        The limit was lowered under the master (``prlimit`` on a running
        process), or something it does not count holds fds. What is open now,
        less the connections and the worker processes, is the new fixed part.
        EMFILE says every fd below the limit is open (the kernel gives the
        lowest free one), so no fd is needed to count them, which at the limit
        could not be had anyway. At most once a second: each pause would ask
        again.
        """
        now = time.monotonic()
        if self._budget is None or now - self._measured_at < 1.0:
            return
        self._measured_at = now
        limit = current_limit()
        measured = self._beside(limit, limit)
        if measured != self._budget:
            log.warning("accept met the fd limit (%d open files; %d fixed fds, counted %d at start): "
                        "measuring the fd budget again", measured.limit, measured.fixed,
                        self._at_start.fixed if self._at_start else 0)
            self._budget = measured
            self.apply()

    def tick(self) -> None:
        """Once a second while the budget is below what it was at start: measure, and give it back.

        What was counted at EMFILE may have been passing (control connections,
        a spawn under way); counted again with fds to spare, the budget
        returns as far as the limit allows, and no further than at start.
        """
        start, budget = self._at_start, self._budget
        if start is None or budget is None or budget == start:
            return
        try:
            open_now = open_fds()
        except OSError:
            return  # at the limit still
        measured = self._beside(current_limit(), open_now)
        slots = self._slots()
        if measured.connections(slots) >= start.connections(slots) and measured.limit >= start.limit:
            measured = start
        elif measured.connections(slots) <= budget.connections(slots):
            return
        log.info("the fd budget grows again: %d connection(s) held at most", measured.connections(slots))
        self._budget = measured
        self.apply()

    def _beside(self, limit: int, open_now: int) -> FdBudget:
        """The budget, with as fixed what is open beside connections and worker processes."""
        fixed = open_now - self._holder.connections_held - FDS_PER_PROCESS * self._processes()
        return FdBudget(limit, fixed)
