"""Worker slots: numbered places (``worker 3``) that outlive the processes filling them.

A slot holds at most two processes: ``worker``, the one serving, and
``successor``, a new one starting to take its place (a rolling reload, a
recycle). A process that drains for good (replaced, or its slot removed by
a scale-down) leaves its slot for the table's ``retired`` until it exits.

Counters never go back: when a process exits, its counts are added to its
slot id's ``Totals``, which outlive the slot itself (a scale-down and up
again keeps them), and ``counts`` adds every live process of that id on top.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from dispatcher.lifecycle import Backoff, WorkerState
from dispatcher.stats import Totals
from dispatcher.worker_process import WorkerProcess

#: What replacing a slot's worker came to: None once the successor serves, else why not.
Replaced = asyncio.Future[str | None]


@dataclass
class Slot:
    """A numbered place for one worker, and the processes in it.

    The slot's state is derived: BACKOFF while a restart waits, else the
    serving process's state, else EXITED.
    """

    id: int
    totals: Totals
    worker: WorkerProcess | None = None
    successor: WorkerProcess | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    last_exit: str = ""
    restart_timer: asyncio.TimerHandle | None = None
    #: Why ``successor`` was started, and the future that says how it went.
    replacing: str = ""
    replaced: Replaced | None = None

    @property
    def state(self) -> WorkerState:
        if self.restart_timer is not None:
            return WorkerState.BACKOFF
        if self.worker is not None:
            return self.worker.state
        return WorkerState.EXITED

    def cancel_restart(self) -> None:
        if self.restart_timer is not None:
            self.restart_timer.cancel()
            self.restart_timer = None

    def settle_replacement(self, result: str | None) -> None:
        """Say how the replacement under way went (if one is), and forget it."""
        if self.replaced is not None and not self.replaced.done():
            self.replaced.set_result(result)
        self.replaced = None


class Slots:
    """The slot table, the retired processes, and the counters of those gone.

    Parameters:
        count: slots to begin with, numbered 0 to count - 1.
    """

    def __init__(self, count: int) -> None:
        self._totals: dict[int, Totals] = {}
        self._by_id: dict[int, Slot] = {}
        #: Processes draining for good, by key: their exit restarts nothing.
        self.retired: dict[int, WorkerProcess] = {}
        for _ in range(count):
            self.add()

    def __iter__(self) -> Iterator[Slot]:
        """The slots by id (a copy: the table may change while the caller goes through it)."""
        return iter([self._by_id[n] for n in sorted(self._by_id)])

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, slot_id: object) -> bool:
        return slot_id in self._by_id

    def get(self, slot_id: int) -> Slot | None:
        return self._by_id.get(slot_id)

    def add(self) -> Slot:
        """Add a slot with the lowest free id and return it."""
        slot_id = 0
        while slot_id in self._by_id:
            slot_id += 1
        slot = self._by_id[slot_id] = Slot(slot_id, totals=self._totals.setdefault(slot_id, Totals()))
        return slot

    def remove(self, slot_id: int) -> Slot:
        """Take slot ``slot_id`` out of the table (its processes are the caller's to retire)."""
        return self._by_id.pop(slot_id)

    def live(self) -> list[WorkerProcess]:
        """Every process not yet reaped: serving, starting as successors, retired."""
        found = [w for slot in self for w in (slot.worker, slot.successor) if w is not None]
        return found + list(self.retired.values())

    def serving(self) -> bool:
        """True while some slot's serving process is ready."""
        return any(s.worker is not None and s.worker.state is WorkerState.READY for s in self)

    def all_ready(self) -> bool:
        """True when there are slots and every slot's serving process is ready."""
        return bool(self._by_id) and all(
            s.worker is not None and s.worker.state is WorkerState.READY for s in self
        )

    def counts(self, slot: Slot) -> dict[str, int]:
        """The slot's counters: exited processes' totals plus every live one's of that id.

        A replaced worker still draining counts with its slot, so nothing
        goes back when a successor takes over.
        """
        counts = dict(slot.totals.__dict__)
        processes = [w for w in (slot.worker, slot.successor) if w is not None]
        processes += [w for w in self.retired.values() if w.id == slot.id]
        for worker in processes:
            for key, value in worker.counts().items():
                counts[key] += value
        return counts

    def exited(self, worker: WorkerProcess) -> None:
        """Keep an exited process's counts in its id's totals."""
        self._totals.setdefault(worker.id, Totals()).add(**worker.counts())
