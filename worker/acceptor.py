"""Accepting connections in the worker (shared and reuseport policies).

Theory of operation
-------------------
Each listening socket the master sent with ``Listen`` is non-blocking and
watched by the worker's event loop. When one is readable, connections are
accepted until EAGAIN, bounded per wake-up so the channel to the master is
still read under a flood; under the shared policy every worker wakes for a
connection and the ones that lose the race get EAGAIN.

Accept errors are told apart by ``shared.accept_errors``, as in the master,
so the policies compare alike:
- out of a resource (EMFILE and the like): every listener leaves the loop
  and accepting resumes after ``overload_pause_s``; one log line when the
  episode starts and one when a connection is accepted again;
- anything else concerns one client, which is gone: skipped, no pause.

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

from shared.accept_errors import OverloadEpisode, is_overload

log = logging.getLogger(__name__)

# Connections accepted per wake-up before the loop gets a turn (as the master).
_BATCH = 64


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
        overload_pause_s: how long to stop accepting after EMFILE and the like.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_connection: Callable[[socket.socket], None],
        overload_pause_s: float = 0.1,
    ) -> None:
        self._loop = loop
        self._on_connection = on_connection
        self.overload_pause_s = overload_pause_s
        self._listeners: list[Listener] = []
        self._resume_handle: asyncio.TimerHandle | None = None
        self.overload = OverloadEpisode(log, loop, overload_pause_s)
        self.closed = False
        self.accepted = 0

    def add(self, listener: Listener) -> None:
        """Accept on ``listener`` (non-blocking, listening) from now on; it is ours to close."""
        if self.closed:
            listener.close()
            return
        self._listeners.append(listener)
        if self._resume_handle is None:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        """Stop accepting for good and close every listener."""
        self.closed = True
        self.overload.close()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    def _accept(self, listener: Listener) -> None:
        for _ in range(_BATCH):
            # on_connection may have drained the worker, and so closed us.
            if self.closed or self._resume_handle is not None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if is_overload(exc):
                    self._pause(exc)
                    return
                log.debug("accept failed: %s; skipping that connection", exc)
                continue
            self.accepted += 1
            self._on_connection(sock)

    def _pause(self, exc: OSError) -> None:
        self.overload.paused(exc)
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._resume_handle = self._loop.call_later(self.overload_pause_s, self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        for listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept, listener)
