"""A worker's life as an explicit state machine, and its restart backoff.

A slot is a numbered place for one worker (``worker 3``) that outlives the
processes filling it: when its process exits, the slot waits out a backoff
(BACKOFF) and starts a new one. Each process moves through the states on
its own (``WorkerProcess.to``).

    STARTING --ready--> READY --drain--> DRAINING --exit--> EXITED --> BACKOFF
        |                 |                  |                ^           |
        +-----------------+-----kill--> STOPPING --exit-------+   <--spawn+

Every state change goes through ``transition``, which refuses the ones not
drawn above.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from dispatcher.stats import Totals

if TYPE_CHECKING:
    from dispatcher.worker_process import WorkerProcess


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    EXITED = "exited"
    BACKOFF = "backoff"


_ALLOWED: Final[dict[WorkerState, frozenset[WorkerState]]] = {
    WorkerState.STARTING: frozenset(
        {WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset({WorkerState.BACKOFF, WorkerState.STARTING}),
    WorkerState.BACKOFF: frozenset({WorkerState.STARTING, WorkerState.EXITED}),
}


class TransitionError(Exception):
    """A state change that the lifecycle does not allow (a bug in the master)."""


def transition(current: WorkerState, new: WorkerState) -> WorkerState:
    """Return ``new`` if a slot may go from ``current`` to it.

    Raises:
        TransitionError: the change is not allowed; nothing changes.
    """
    if new not in _ALLOWED[current]:
        raise TransitionError(f"worker cannot go from {current.value} to {new.value}")
    return new


@dataclass
class Backoff:
    """PM2's restart delay: ``initial_s`` x ``factor`` per crash, capped, reset by uptime.

    A worker that ran for at least ``reset_after_s`` is considered healthy, and
    its next restart starts over from ``initial_s``.
    """

    initial_s: float = 0.1
    factor: float = 1.5
    max_s: float = 15.0
    reset_after_s: float = 30.0
    _next_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def next_delay(self, uptime_s: float) -> float:
        """Return how long to wait before restarting a worker that ran ``uptime_s``."""
        if uptime_s >= self.reset_after_s:
            self._next_s = self.initial_s
        delay = self._next_s
        self._next_s = min(self._next_s * self.factor, self.max_s)
        return delay


@dataclass
class Slot:
    """A numbered place for one worker, and the processes in it.

    ``worker`` serves; ``successor`` is a new process starting to replace it
    (reload, recycle). The slot's own state is derived: BACKOFF while a
    restart waits, else the serving process's state, else EXITED.
    """

    id: int
    worker: WorkerProcess | None = None
    successor: WorkerProcess | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    last_exit: str = ""
    restart_timer: asyncio.TimerHandle | None = None
    #: Why ``successor`` was started, and the future that says how it went.
    replacing: str = ""
    outcome: asyncio.Future[str | None] | None = None
    #: No recycling before this (monotonic), after a replacement failed to boot.
    recycle_after: float = 0.0
    totals: Totals = field(default_factory=Totals)

    @property
    def state(self) -> WorkerState:
        if self.restart_timer is not None:
            return WorkerState.BACKOFF
        if self.worker is not None:
            return self.worker.state
        return WorkerState.EXITED
