"""The one shape every policy that chooses a worker has.

A policy knows workers only by an opaque key (unique per worker process) and
decides which one gets the next connection. It does no I/O: the scheduler
sends, the policy only counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeVar

#: What is dealt: the policy never looks at it (the scheduler deals fds).
T = TypeVar("T")


class Policy(ABC):
    """How the master spreads the connections it accepts over its workers."""

    name: ClassVar[str]

    @abstractmethod
    def attach(self, key: int) -> None:
        """Worker ``key`` is ready for connections."""

    @abstractmethod
    def detach(self, key: int) -> None:
        """Worker ``key`` takes no more connections."""

    @abstractmethod
    def choose(self) -> int | None:
        """Return the worker for the next connection, or None if none is free.

        The chosen worker's capacity is taken until ``ack``.
        """

    def deal(self, conns: Sequence[T]) -> tuple[list[tuple[int, list[T]]], int]:
        """Choose a worker for each of ``conns`` in turn, as ``choose`` would, until none is free.

        Returns each chosen worker with its connections in order, workers in
        the order first chosen, and how many of ``conns`` (a prefix) were
        dealt. One call for a whole accepted batch.
        """
        lists: dict[int, list[T]] = {}
        for dealt, conn in enumerate(conns):
            key = self.choose()
            if key is None:
                return list(lists.items()), dealt
            lists.setdefault(key, []).append(conn)
        return list(lists.items()), len(conns)

    @abstractmethod
    def ack(self, key: int, accepted: bool, count: int = 1) -> None:
        """Worker ``key`` answered ``count`` hand-offs, freeing their capacity."""

    @abstractmethod
    def report(self, key: int, load: int) -> None:
        """Worker ``key`` said it holds ``load`` connections (in an ack or a pong)."""

    @abstractmethod
    def hold(self, key: int) -> int:
        """Take all of worker ``key``'s free capacity (its channel is full); return how much.

        ``ack`` gives it back. Until then the worker is not chosen.
        """

    @property
    @abstractmethod
    def workers(self) -> int:
        """How many workers are attached."""
