"""Round-robin (Node's SCHED_RR): the oldest free worker gets the next connection.

Each worker has ``window`` slots (Node: 1). A hand-off takes a slot and the
worker's ack gives it back, so a worker never holds more than ``window``
un-acked hand-offs and a worker whose event loop is stuck stops receiving
connections.

Workers with a free slot wait in one FIFO, each at most once: the one
chosen goes to the back of the line if it still has a free slot, and a
worker whose ack frees its first slot joins at the back. With a window of
1 that is exactly Node's queue of free workers; with a larger window a
burst is dealt out one connection per worker in turn, not ``window`` to
the first worker.
"""

from __future__ import annotations

import collections
import contextlib
from typing import ClassVar

from dispatcher.policies.base import Policy
from shared.protocol import MAX_FDS


class RoundRobin(Policy):
    name: ClassVar[str] = "round-robin"
    master_accepts: ClassVar[bool] = True

    def __init__(self, window: int = 1) -> None:
        if not 1 <= window <= MAX_FDS:
            # A worker's whole window fits in one hand-off datagram.
            raise ValueError(f"window must be 1 to {MAX_FDS}")
        self.window = window
        self._free: collections.deque[int] = collections.deque()
        self._credit: dict[int, int] = {}

    def attach(self, key: int) -> None:
        if key in self._credit:
            raise ValueError(f"worker {key} is already attached")
        self._credit[key] = self.window
        self._free.append(key)

    def detach(self, key: int) -> bool:
        if self._credit.pop(key, None) is not None:
            with contextlib.suppress(ValueError):  # not in line: it had no free slot
                self._free.remove(key)
        return not self._credit

    def choose(self, exclude: int | None = None) -> int | None:
        free = self._free
        if not free:
            return None
        key = free[0]
        if key == exclude:
            if len(free) == 1:
                return None
            key = free[1]
            del free[1]
        else:
            free.popleft()
        credit = self._credit[key] - 1
        self._credit[key] = credit
        if credit:
            free.append(key)
        return key

    def ack(self, key: int, accepted: bool, count: int = 1) -> None:
        credit = self._credit.get(key)
        if credit is None:
            return  # detached meanwhile: its slots went with it
        if credit + count > self.window:
            raise ValueError(f"worker {key} acked more hand-offs than it was given")
        self._credit[key] = credit + count
        if credit == 0:
            self._free.append(key)

    def hold(self, key: int) -> int:
        credit = self._credit.get(key, 0)
        if credit:
            self._credit[key] = 0
            self._free.remove(key)  # it had a free slot, so it is in line
        return credit

    @property
    def workers(self) -> int:
        return len(self._credit)

    def in_flight(self, key: int) -> int:
        """Un-acked hand-offs of worker ``key``."""
        return self.window - self._credit[key]
