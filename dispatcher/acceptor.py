"""Accepting connections in the master (the hand-off distribution).

Theory of operation
-------------------
Each listening socket is non-blocking and watched by the event loop. When
one is readable, connections are accepted in a batch until EAGAIN (bounded
per wake-up, so one busy listener cannot starve the channels) and each fd
goes straight to the scheduler, which owns it from then on and sends the
batch's hand-offs when the batch ends (``flush``). The batch is accepted
in one call (``shared.hotpath.accept_fds``, compiled where built; one more
after each client gone before it was accepted): bare fds (close-on-exec,
from accept4), no socket object and no address for a connection the master
only passes on.

Accepting pauses, by removing the listeners from the loop, in two cases:
- the scheduler's pending queue is full: the kernel backlog holds the rest,
  and the scheduler calls ``resume`` once the queue has room;
- EMFILE, ENFILE, ENOBUFS or ENOMEM: the process or system is out of a
  resource; retrying at once would spin, so accepting resumes after
  ``overload_pause_s``. One line when the episode begins and one summary
  when it ends (``shared.accept_errors.OverloadEpisode``), not one per retry.
  With the fd budget (``dispatcher.fd_budget``) the master's own fds do not
  run out this way; the system's, or a lowered limit, still can.
Any other accept error concerns one connection (a client that went away)
and is skipped (``shared.accept_errors``, which the workers' accept loop
follows too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence

from dispatcher.listeners import Listener
from dispatcher.scheduler import Scheduler
from shared.accept_errors import OverloadEpisode, is_listener_gone, is_overload
from shared.hotpath import accept_fds

log = logging.getLogger(__name__)

# Connections accepted per wake-up before the loop gets a turn.
_BATCH = 64
# A queue that fills and drains all the time would log on every cycle.
_FULL_LOG_INTERVAL_S = 10.0


class Acceptor:
    """Accepts on the master's listeners and feeds the scheduler.

    Parameters:
        loop: the master's event loop.
        listeners: listening, non-blocking sockets (owned by the master).
        scheduler: receives every accepted fd.
        overload_pause_s: how long to stop accepting after EMFILE and the like.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Sequence[Listener],
        scheduler: Scheduler,
        overload_pause_s: float = 0.1,
    ) -> None:
        self._loop = loop
        self._listeners = list(listeners)
        self._scheduler = scheduler
        self.overload_pause_s = overload_pause_s
        self._watching = False
        self._stopped = True
        self.overload = OverloadEpisode(log, loop, overload_pause_s)
        self._full_logged_at = -_FULL_LOG_INTERVAL_S
        self._resume_handle: asyncio.TimerHandle | None = None
        self.accepted = 0
        self.errors = 0
        #: Told when accepting ran into this process's fd limit (the fd budget was wrong).
        self.on_fd_limit: Callable[[], None] | None = None
        self._fd_limit_met = False

    def start(self) -> None:
        self._stopped = False
        self._watch()

    def stop(self) -> None:
        """Stop accepting for good (the listeners stay open; the master closes them)."""
        self._stopped = True
        self._unwatch()
        self.overload.close()
        self._scheduler.on_room = None
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None

    def sweep(self, closed_to_new_only: bool = False) -> tuple[int, bool]:
        """Accept what the kernel backlog still holds, as far as the queue has room.

        Used while stopping, so clients that already connected are served
        rather than reset. The master closed the listeners to new connections
        just before (``Listener.close_to_new``), so nothing joins the backlog
        meanwhile; an inherited listener, which keeps taking connections, is
        left out with ``closed_to_new_only`` (the later sweeps, when the queue
        has room again).

        Returns:
            How many were accepted, and whether the room ran out before some
            backlog was empty (it may hold more).
        """
        before = self.accepted
        left = False
        for listener in self._listeners:
            if listener.sock.fileno() < 0 or (closed_to_new_only and not listener.closed_to_new):
                continue
            if not self._accept_batch(listener, limit=None):
                left = True
        return self.accepted - before, left

    def _watch(self) -> None:
        if self._watching or self._stopped:
            return
        self._watching = True
        for listener in self._listeners:
            self._loop.add_reader(listener.sock.fileno(), self._accept_batch, listener, _BATCH)

    def _unwatch(self) -> None:
        if not self._watching:
            return
        self._watching = False
        for listener in self._listeners:
            self._loop.remove_reader(listener.sock.fileno())

    def resume(self) -> None:
        """The scheduler has room again."""
        self._scheduler.on_room = None
        if self._resume_handle is None:
            self._watch()

    def _accept_batch(self, listener: Listener, limit: int | None) -> bool:
        """Accept up to ``limit`` (and the queue's room); return False if stopped by that bound."""
        scheduler = self._scheduler
        room = scheduler.room
        if limit is None or limit > room:
            limit = room
        fds: list[int] = []
        ended = False
        # Each failed accept counts against the bound too: an error that came
        # back every time (neither overload nor the listener gone) must not spin.
        tries = limit
        while len(fds) < limit and tries > 0:
            # The batch in one call (compiled: one accept4 loop, no addresses),
            # one more after each client that was gone.
            taken, error = accept_fds(listener.sock, min(limit - len(fds), tries))
            tries -= len(taken) + 1
            fds += taken
            if not error:
                break  # the limit was reached
            if error == errno.EAGAIN:  # EINTR is retried inside
                ended = True
                break
            self.errors += 1
            exc = OSError(error, os.strerror(error))
            if is_overload(exc):
                self._pause_overload(exc)
                ended = True
                break
            if is_listener_gone(exc):
                # Closed or not a listener: retrying would fail the same way forever.
                ended = True
                break
            # ECONNABORTED, EPROTO, EPERM (firewall): that one client is gone.
        if fds:
            # One clock read per batch, and a hand-off datagram per worker (per 16 fds).
            scheduler.submit(fds, time.monotonic())
            self.accepted += len(fds)
        if self._fd_limit_met:
            # Told once the batch is the scheduler's, so what it holds counts them.
            self._fd_limit_met = False
            if self.on_fd_limit is not None:
                self.on_fd_limit()
        if scheduler.full:
            self._pause_full()
        return ended

    def _pause_full(self) -> None:
        now = time.monotonic()
        if self._watching and now - self._full_logged_at >= _FULL_LOG_INTERVAL_S:
            self._full_logged_at = now
            scheduler = self._scheduler
            if scheduler.pending >= scheduler.max_pending:
                log.warning("pending queue full (%d connections); accepting paused, "
                            "the kernel backlog holds new connections", scheduler.pending)
            else:
                log.warning("fd budget reached (%d connections held, %d of them in flight); accepting "
                            "paused, the kernel backlog holds new connections",
                            scheduler.pending + scheduler.in_flight, scheduler.in_flight)
        self._unwatch()
        self._scheduler.on_room = self.resume

    def _pause_overload(self, exc: OSError) -> None:
        self.overload.paused(exc)
        if exc.errno == errno.EMFILE:
            self._fd_limit_met = True
        self._unwatch()
        if self._resume_handle is None and not self._stopped:
            self._resume_handle = self._loop.call_later(self.overload_pause_s, self._after_pause)

    def _after_pause(self) -> None:
        self._resume_handle = None
        if not self._scheduler.full:
            self._watch()
        else:
            self._scheduler.on_room = self.resume
