"""Shared accept (Node's SCHED_NONE, gunicorn's model).

Every worker accepts on a copy of the same listening socket; the kernel's
accept queue decides who gets each connection, which favours whichever
worker happens to be waiting in accept (often the least busy, often not).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import ClassVar

from dispatcher.listeners import Listener
from dispatcher.policies.base import Policy


class SharedAccept(Policy):
    name: ClassVar[str] = "shared"
    master_accepts: ClassVar[bool] = False

    def __init__(self) -> None:
        self._keys: set[int] = set()

    def attach(self, key: int) -> None:
        self._keys.add(key)

    def detach(self, key: int) -> bool:
        self._keys.discard(key)
        return not self._keys

    @property
    def workers(self) -> int:
        return len(self._keys)

    def sockets_for_worker(self, listeners: Sequence[Listener], backlog: int) -> list[socket.socket]:
        return [listener.sock.dup() for listener in listeners]
