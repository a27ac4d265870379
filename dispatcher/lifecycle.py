"""A worker slot's life as an explicit state machine, and its restart backoff.

A slot is a numbered place for one worker (``worker 3``) that outlives the
processes filling it: when its process exits, the slot waits out a backoff
and starts a new one.

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

#: States in which the slot has a live process.
ALIVE: Final = frozenset(
    {WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPING}
)


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
    """A numbered place for one worker, and the process in it (if any)."""

    id: int
    state: WorkerState = WorkerState.EXITED
    worker: WorkerProcess | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    last_exit: str = ""
    restart_timer: asyncio.TimerHandle | None = None
    #: Being removed by a scale-down: not restarted when its process exits.
    retiring: bool = False
    totals: Totals = field(default_factory=Totals)

    def to(self, new: WorkerState) -> None:
        """Move to ``new`` (see ``transition``)."""
        self.state = transition(self.state, new)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE
