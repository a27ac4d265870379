"""Round-robin (Node's SCHED_RR): free workers take connections in turn, the least loaded first.

Each worker has ``window`` slots (Node: 1). A hand-off takes a slot and the
worker's ack gives it back, so a worker never holds more than ``window``
un-acked hand-offs and a worker whose event loop is stuck stops receiving
connections.

Workers with a free slot wait in one FIFO, each at most once: the one
chosen goes to the back of the line if it still has a free slot, and a
worker whose ack frees its first slot joins at the back. With a window of
1 and equal loads that is exactly Node's queue of free workers; with a
larger window a burst is dealt out one connection per worker in turn, not
``window`` to the first worker.

Node hands the next connection to the first free worker in line. Here it
goes to the first in line unless that worker holds two or more connections
more than the least loaded free worker, as far as the master knows: what
the worker said it held in its last ack or pong (``report``) plus what it
was sent since (its un-acked hand-offs). Then it goes to the first in line
within one of the least loaded. Within one of each other loads are
noise (a figure is taken as connections arrive and is stale once they
end), so with even loads this is plain round-robin.

Two things that otherwise depend on which worker got a CPU first come out
even this way: a burst is spread by count, since a worker that acks late
has been sent less and goes first once it acks; and a worker that has
connections queued behind CPU-bound work is passed over while another
holds fewer, so connections do not wait behind it. A report is refreshed
with every ack and pong; one not refreshed for two of the master's ticks
is forgotten (``Scheduler.age_loads``).

The master runs a compiled copy (``_round_robin.c``, built by the install):
the policy counts for every connection accepted, and its ``deal`` chooses
for a whole accepted batch in one call. ``PyRoundRobin`` here is the
reference it is tested against, call for call (``tests/test_policies.py``),
and what runs without it or with ``DISPATCHER_PURE_PYTHON=1``; ``COMPILED``
says which ``RoundRobin`` is.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import TYPE_CHECKING, ClassVar

from dispatcher.policies.base import Policy
from shared.hotpath import PURE_PYTHON_ENV

#: How many more connections than the least loaded free worker a worker may
#: hold and still take its turn.
_SLACK = 1


class PyRoundRobin(Policy):
    name: ClassVar[str] = "round-robin"

    def __init__(self, window: int = 1) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        #: Checked by ``Config``: 1 to ``shared.protocol.MAX_FDS``.
        self.window = window
        self._free: collections.deque[int] = collections.deque()
        self._credit: dict[int, int] = {}
        self._load: dict[int, int] = {}
        # Kept up to date so choose() only reads it: reported load + un-acked.
        self._estimate: dict[int, int] = {}

    def attach(self, key: int) -> None:
        if key in self._credit:
            raise ValueError(f"worker {key} is already attached")
        self._credit[key] = self.window
        self._load[key] = 0
        self._estimate[key] = 0
        self._free.append(key)

    def detach(self, key: int) -> None:
        self._load.pop(key, None)
        self._estimate.pop(key, None)
        if self._credit.pop(key, None) is not None:
            with contextlib.suppress(ValueError):  # not in line: it had no free slot
                self._free.remove(key)

    def choose(self) -> int | None:
        free = self._free
        if not free:
            return None
        if len(free) == 1:
            key = free.popleft()
        else:
            # The first in line that holds at most _SLACK more than the least
            # loaded (O(workers), and a worker count is small). Within that,
            # loads are noise (a figure is taken as connections arrive and is
            # stale once they end), and it is plain turns.
            estimate = self._estimate
            least = estimate[free[0]]
            for candidate in free:
                if estimate[candidate] < least:
                    least = estimate[candidate]
            limit = least + _SLACK
            for key in free:
                if estimate[key] <= limit:
                    break
            if free[0] == key:
                free.popleft()
            else:
                free.remove(key)
        self._estimate[key] += 1
        left = self._credit[key] - 1
        self._credit[key] = left
        if left:
            free.append(key)
        return key

    def report(self, key: int, load: int) -> None:
        old = self._load.get(key)
        if old is not None:
            self._load[key] = load
            self._estimate[key] += load - old

    def ack(self, key: int, accepted: bool, count: int = 1) -> None:
        credit = self._credit.get(key)
        if credit is None:
            return  # detached meanwhile: its slots went with it
        if count < 1:
            raise ValueError(f"worker {key} acked {count} hand-offs")
        if credit + count > self.window:
            raise ValueError(f"worker {key} acked more hand-offs than it was given")
        self._credit[key] = credit + count
        self._estimate[key] -= count
        if credit == 0:
            self._free.append(key)

    def hold(self, key: int) -> int:
        credit = self._credit.get(key, 0)
        if credit:
            self._credit[key] = 0
            self._estimate[key] += credit  # held slots count as un-acked until ack
            self._free.remove(key)  # it had a free slot, so it is in line
        return credit

    def in_flight(self, key: int) -> int:
        """Worker ``key``'s taken slots: its window less its free ones (KeyError if not attached)."""
        if key not in self._credit:
            raise KeyError(f"worker {key} is not attached")
        return self.window - self._credit[key]

    @property
    def workers(self) -> int:
        return len(self._credit)


#: The compiled copy is in use.
COMPILED = False

if TYPE_CHECKING:
    RoundRobin = PyRoundRobin
else:
    RoundRobin = PyRoundRobin
    if os.environ.get(PURE_PYTHON_ENV) != "1":
        try:
            from dispatcher.policies import _round_robin
        except ImportError:
            pass
        else:
            if _round_robin.SLACK != _SLACK:
                raise ImportError("dispatcher.policies._round_robin was built for another slack: "
                                  "rebuild it (pip install -e .)")

            class RoundRobin(_round_robin.RoundRobin, Policy):
                """Round-robin, compiled: ``PyRoundRobin``'s counting (tests/test_policies.py holds it)."""

                name: ClassVar[str] = "round-robin"

            COMPILED = True
