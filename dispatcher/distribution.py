"""How accepted connections reach workers: one interface, two distributions, chosen once at start.

As Node's cluster has ``round_robin_handle.js`` and ``shared_handle.js``
with one shape, the master has two distributions with one shape, and the
rest of the master never asks which one it has:

- ``MasterAccepts`` (``dispatcher.master_accepts``, policy ``round-robin``): the master
  accepts every connection and hands it to a worker it chooses;
- ``WorkersAccept`` (``dispatcher.workers_accept``, policies ``shared`` and
  ``reuseport``): each worker accepts on listening sockets of its own.

Both are told the same things in a worker's life: it is ready (``add``), it
takes no more (``remove``, which says whether it was the last), it is gone
(``forget``), what it acked and the load it reported; and, when the master
stops, to stop taking connections, to settle, and to close what is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from dispatcher.config import Config
from dispatcher.listeners import BindSpec, Listener
from dispatcher.master_accepts import MasterAccepts
from dispatcher.stats import DistributionFigures
from dispatcher.worker_process import WorkerProcess
from dispatcher.workers_accept import ReusePortAccept, SharedAccept, WorkersAccept

#: ``--policy`` names, the default first.
NAMES = (*MasterAccepts.POLICIES, *WorkersAccept.POLICIES)


class Distribution(Protocol):
    """How the connections clients make reach the workers."""

    def listen(self, specs: Sequence[BindSpec], backlog: int) -> list[Listener]:
        """Bind every spec the way this distribution needs; all or nothing.

        Raises:
            BindError: one spec failed; those already bound are closed again.
        """

    def start(self, loop: asyncio.AbstractEventLoop, listeners: Sequence[Listener]) -> tuple[str, ...]:
        """Begin; return the arguments every worker must be started with from now on."""

    def add(self, worker: WorkerProcess) -> None:
        """``worker`` is ready: it takes connections from now on.

        Raises:
            BindError, OSError: the worker cannot be given what it needs to take
                any; the caller replaces it.
        """

    def remove(self, worker: WorkerProcess) -> bool:
        """Send ``worker`` nothing more (what it holds may still be acked); idempotent.

        Returns:
            True when no worker is left to take connections.
        """

    def forget(self, worker: WorkerProcess) -> int:
        """``worker`` is gone (its channel was read to the end): what it held un-acked goes to others.

        Returns:
            How many connections it gave back.
        """

    def on_ack(self, worker: WorkerProcess, conn_ids: tuple[int, ...], accepted: bool, load: int) -> None:
        """``worker`` answered the hand-off of ``conn_ids``; it holds ``load`` connections now."""

    def on_acked(self, worker: WorkerProcess, count: int, load: int) -> None:
        """``worker``'s channel settled an accepted ack of ``count`` connections in its lane (their
        copies are closed); it holds ``load`` connections now."""

    def report_load(self, worker: WorkerProcess, load: int) -> None:
        """``worker`` said (in a pong) that it holds ``load`` connections."""

    #: Set by the master: called when accepting met the fd limit after all (it measures again).
    on_fd_limit: Callable[[], None] | None

    @property
    def connections_held(self) -> int:
        """Connections the master holds now (accepted fds: queued, dealt or in flight)."""

    def hold_at_most(self, connections: int, workers: int) -> int:
        """Hold at most ``connections`` connections (the master's fd budget) with ``workers`` slots.

        Returns:
            How many fewer than it would hold without that bound (0 when the
            bound takes nothing away, or it holds no connections at all).
        """

    def stop(self, sweep: bool) -> None:
        """Take no more connections; first, if ``sweep``, those the kernel's backlog holds."""

    async def settle(self) -> None:
        """Return once every connection taken is in a worker's hands, or no worker is left."""

    def close(self) -> int:
        """Close the connections no worker took (the master is stopping); return how many."""

    def figures(self) -> DistributionFigures:
        """Its counters, for the master's snapshot."""


def for_policy(config: Config) -> Distribution:
    """The distribution ``config.policy`` names.

    Raises:
        ValueError: no policy has that name.
    """
    if config.policy in MasterAccepts.POLICIES:
        return MasterAccepts(config)
    if config.policy == SharedAccept.name:
        return SharedAccept()
    if config.policy == ReusePortAccept.name:
        return ReusePortAccept()
    raise ValueError(f"unknown policy {config.policy!r}; choose from {', '.join(NAMES)}")
