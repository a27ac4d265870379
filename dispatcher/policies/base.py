"""The one shape every scheduling policy has.

A policy knows workers only by an opaque key (unique per worker process) and
decides which one gets the next connection. It does no I/O on connections:
the scheduler sends, the policy only counts. Policies where the workers
accept for themselves (``master_accepts`` False) choose nothing and instead
say which listening sockets each worker gets.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from dispatcher.listeners import BindSpec, Listener, open_listener


class Policy(ABC):
    """How connections are spread over workers."""

    name: ClassVar[str]
    #: True: the master accepts and hands connections off (``choose``/``ack``).
    #: False: workers accept on sockets from ``sockets_for_worker``.
    master_accepts: ClassVar[bool]

    @abstractmethod
    def attach(self, key: int) -> None:
        """Worker ``key`` is ready for connections."""

    @abstractmethod
    def detach(self, key: int) -> bool:
        """Worker ``key`` takes no more connections; return True if it was the last one."""

    def choose(self, exclude: int | None = None) -> int | None:
        """Return the worker for the next connection (never ``exclude``), or None if none is free.

        The chosen worker's capacity is taken until ``ack``.
        """
        return None

    def ack(self, key: int, accepted: bool, count: int = 1) -> None:  # noqa: B027 - optional hook
        """Worker ``key`` answered ``count`` hand-offs, freeing their capacity."""

    def report(self, key: int, load: int) -> None:  # noqa: B027 - optional hook
        """Worker ``key`` said it holds ``load`` connections (with its latest ack)."""

    def hold(self, key: int) -> int:
        """Take all of worker ``key``'s free capacity (its channel is full); return how much.

        ``ack`` gives it back. Until then the worker is not chosen.
        """
        return 0

    @property
    @abstractmethod
    def workers(self) -> int:
        """How many workers are attached."""

    def open_listeners(self, specs: Sequence[BindSpec], backlog: int) -> list[Listener]:
        """Bind every spec the way this policy needs; all or nothing.

        Raises:
            BindError: one spec failed; those already bound are closed again.
        """
        listeners: list[Listener] = []
        try:
            for spec in specs:
                listeners.append(self.open_listener(spec, backlog))
        except BaseException:
            for listener in listeners:
                listener.close()
            raise
        return listeners

    def open_listener(self, spec: BindSpec, backlog: int) -> Listener:
        """Bind one spec (see ``open_listeners``)."""
        return open_listener(spec, backlog)

    def sockets_for_worker(self, listeners: Sequence[Listener], backlog: int) -> list[socket.socket]:
        """Return new sockets for a worker to accept on; the caller sends and closes them."""
        return []
