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

Nothing here opens or closes an fd; it only counts.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

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
