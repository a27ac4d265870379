"""Accepting connections in the worker (shared and reuseport policies).

Theory of operation
-------------------
Each listening socket the master sent with ``Listen`` is non-blocking and
watched by the worker's event loop. When one is readable, connections are
accepted until EAGAIN; under the shared policy every worker wakes for a
connection and the ones that lose the race get EAGAIN.

fd ownership:
- A listener is ours from ``add`` on and is closed by ``close()`` (when the
  worker starts draining, or at shutdown).
- Each accepted connection goes to ``on_connection``, which owns it from then
  on. Nobody else holds a copy: connections accepted here are never acked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Listener(Protocol):
    """What the accept loop needs of a listening socket."""

    def fileno(self) -> int: ...

    def accept(self) -> tuple[socket.socket, Any]: ...

    def close(self) -> None: ...


class Acceptor:
    """Accepts on the worker's own listeners and passes each connection on.

    Parameters:
        loop: the worker's event loop.
        on_connection: called with each accepted socket, which it then owns.
        pause_s: how long to stop accepting on a listener after an error.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_connection: Callable[[socket.socket], None],
        pause_s: float = 0.1,
    ) -> None:
        self._loop = loop
        self._on_connection = on_connection
        self.pause_s = pause_s
        self._listeners: list[Listener] = []
        self.closed = False
        self.accepted = 0

    def add(self, listener: Listener) -> None:
        """Accept on ``listener`` (non-blocking, listening) from now on; it is ours to close."""
        if self.closed:
            listener.close()
            return
        self._listeners.append(listener)
        self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        """Stop accepting for good and close every listener."""
        self.closed = True
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    def _accept(self, listener: Listener) -> None:
        while not self.closed:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s; pausing accept for %.1f s", exc, self.pause_s)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(self.pause_s, self._resume, listener)
                return
            self.accepted += 1
            self._on_connection(sock)

    def _resume(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept, listener)
