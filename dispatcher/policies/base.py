"""The one shape every policy that chooses a worker has.

A policy knows workers only by an opaque key (unique per worker process) and
decides which one gets the next connection. It does no I/O: the scheduler
sends, the policy only counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar


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
