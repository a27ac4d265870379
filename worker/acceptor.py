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
  episode starts and one summary once accepting has run clean for a while
  (``shared.accept_errors.OverloadEpisode``);
- anything else concerns one client, which is gone: skipped, no pause.

Draining (``drain``): closing a listening socket resets the connections
still in its queue, unless another process holds the socket too. So before
closing a listener that is closing for good, the worker accepts what its
queue holds, until EAGAIN, and serves it. "For good" is read from the
socket itself: it carries the stop filter (``shared.syn_filter``), which
lets no new connection into the queue, so that loop ends. Read from the
socket rather than told: the worker loops until EAGAIN only when the loop
is sure to end.

- reuseport (``own_listeners``): the socket is this worker's alone, and its
  queue is lost with it, so the worker attaches the filter itself, whenever
  it drains (a stop, a reload, scaling down, its own SIGTERM). A SYN that
  the kernel sends to it meanwhile is dropped, sent again a second later,
  and then goes to another socket of the group, or is refused once none is
  left.
- shared: the socket is the master's too. Draining alone (a reload), the
  worker just closes its copy: the master's keeps the queue for the others.
  On a stop the master attaches the filter to the socket before it tells
  the workers to drain, and each takes what is queued before closing its
  copy; the last copy closed finds the queue empty. (On a Unix socket the
  filter is only the mark: the master removed the path, so no new client
  reaches it.)

What still gets reset: a handshake that completes between the last accept
and the close (see ``shared.syn_filter``), and, if the worker is out of
file descriptors while draining, what it could not accept.

fd ownership:
- A listener is ours from ``add`` on and is closed by ``drain()`` (when the
  worker starts draining) or ``close()`` (at shutdown, or when the master is
  gone: nothing would serve what is queued then).
- Each accepted connection goes to ``on_connection``, which owns it from then
  on. Nobody else holds a copy: connections accepted here are never acked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from shared import syn_filter
from shared.accept_errors import OverloadEpisode, is_listener_gone, is_overload

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
        own_listeners: no other process accepts on the listeners (reuseport),
            so ``drain`` closes them to new connections itself.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_connection: Callable[[socket.socket], None],
        overload_pause_s: float = 0.1,
        own_listeners: bool = False,
    ) -> None:
        self._loop = loop
        self._on_connection = on_connection
        self.overload_pause_s = overload_pause_s
        self._own_listeners = own_listeners
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
        self._stop()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    def drain(self) -> None:
        """Stop accepting for good; first take what each listener closing for good still holds.

        Every connection taken goes to ``on_connection`` before this returns.
        """
        self._stop()
        before = self.accepted
        for listener in self._listeners:
            if self._own_listeners:
                try:
                    syn_filter.attach(listener.fileno())
                except OSError as exc:
                    log.warning("cannot stop new connections to a listener before closing it (%s); "
                                "those queued on it are reset", exc.strerror)
            try:
                closing = syn_filter.attached(listener.fileno())
            except OSError:
                closing = False
            if closing:
                self._take_queued(listener)
            listener.close()
        self._listeners.clear()
        if self.accepted > before:
            log.info("accepted %d connection(s) still queued on the listeners", self.accepted - before)

    def _stop(self) -> None:
        self.closed = True
        self.overload.close()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())

    def _take_queued(self, listener: Listener) -> None:
        # It ends: the stop filter lets nothing new into the queue.
        while (taken := self._accept_one(listener)) is not None:
            if isinstance(taken, OSError):
                # Retrying would spin, and nothing will serve them later.
                log.warning("accept failed while draining: %s; the connections still queued "
                            "are reset", taken.strerror)
                return
            self._pass_on(taken)

    def _accept(self, listener: Listener) -> None:
        for _ in range(_BATCH):
            # on_connection may have drained the worker, and so closed us.
            if self.closed or self._resume_handle is not None:
                return
            taken = self._accept_one(listener)
            if taken is None:
                return
            if isinstance(taken, OSError):
                self._pause(taken)
                return
            self._pass_on(taken)

    def _accept_one(self, listener: Listener) -> socket.socket | OSError | None:
        """The next connection; None when the queue is empty; the overload error that stops accepting.

        A failure of one client (that client is gone) is skipped.
        """
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if is_overload(exc):
                    return exc
                if is_listener_gone(exc):
                    return None  # closed or not listening: nothing to take, ever
                log.debug("accept failed: %s; skipping that connection", exc)
                continue
            return sock

    def _pass_on(self, sock: socket.socket) -> None:
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
