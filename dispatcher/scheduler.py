"""Handing accepted connections to workers: the pending queue, hand-offs and acks.

Theory of operation
-------------------
Every accepted connection is an fd owned by the master until a worker acks
it. Its number doubles as the connection's id on the wire: it is unique for
as long as the master holds it, which is exactly as long as an ack can refer
to it.

Where each master fd is, at every moment, is one of:
- ``_pending``: accepted, waiting for a free worker (FIFO, bounded by
  ``max_pending``; the acceptor stops accepting when it is full, so the rest
  wait in the kernel's backlog);
- ``worker.inflight``: sent in a ``Handoff``; the worker's copy is in the
  channel or in the worker.

and it leaves the master in exactly one of three ways:
- ``Ack(accepted=True)``: the worker holds its own copy; ours is closed;
- the pending timeout or shutdown: closed, the client sees the connection
  end without an answer;
- never otherwise. A refused hand-off goes to another worker; a worker that
  dies, or whose channel fails, gives its un-acked hand-offs back to the
  front of the queue (``forget``), where they are re-dispatched first.

A worker's copy in flight in a dead worker's channel is closed by the kernel
with the socket; ours is still here, so nothing is lost.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Callable

from dispatcher.policies import Policy
from dispatcher.worker_process import WorkerProcess

log = logging.getLogger("master")


class Scheduler:
    """The master's side of the hand-off.

    Parameters:
        policy: chooses the worker for each connection (a master-accepting one).
        max_pending: how many accepted connections may wait for a worker.
        pending_timeout_s: how long one may wait before it is closed.
        on_fault: told (once per failure) that a worker could not be sent to.
        on_refused: told that a worker refused a hand-off (it is draining).
        on_limit: told that a worker's acks reached its ``max_requests``.
    """

    def __init__(
        self,
        policy: Policy,
        max_pending: int,
        pending_timeout_s: float,
        on_fault: Callable[[WorkerProcess, str], None],
        on_refused: Callable[[WorkerProcess], None],
        on_limit: Callable[[WorkerProcess], None],
    ) -> None:
        self._policy = policy
        self._workers: dict[int, WorkerProcess] = {}
        self._pending: collections.deque[tuple[int, float]] = collections.deque()
        self.max_pending = max_pending
        self.pending_timeout_s = pending_timeout_s
        self._resume_mark = max(0, max_pending - max(1, max_pending // 4))
        self._on_fault = on_fault
        self._on_refused = on_refused
        self._on_limit = on_limit
        #: Set by the acceptor while it is paused because the queue was full.
        self.on_room: Callable[[], None] | None = None
        #: Called when nothing is pending or in flight (set while stopping).
        self.on_settled: Callable[[], None] | None = None
        self.inflight = 0
        self.handed_off = 0
        self.acked = 0
        self.refused = 0
        self.redispatched = 0
        self.expired = 0

    # Queue

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_pending

    @property
    def settled(self) -> bool:
        return not self._pending and not self.inflight

    @property
    def attached(self) -> int:
        return self._policy.workers

    def submit(self, fd: int, accepted_at: float) -> None:
        """Take ownership of connection ``fd`` (accepted at ``accepted_at``) and hand it off or queue it."""
        if not self._pending:
            key = self._policy.choose()
            if key is not None:
                if not self._send(key, fd, accepted_at):
                    self.pump()  # it went back in line: another worker may take it
                return
        self._pending.append((fd, accepted_at))

    def pump(self) -> None:
        """Hand queued connections to free workers, oldest first."""
        pending = self._pending
        choose = self._policy.choose
        while pending:
            key = choose()
            if key is None:
                break
            fd, accepted_at = pending.popleft()
            self._send(key, fd, accepted_at)
        if self.on_room is not None and len(pending) <= self._resume_mark:
            self.on_room()

    def _send(self, key: int, fd: int, accepted_at: float) -> bool:
        """Hand ``fd`` to worker ``key``; False if it went back to the queue instead."""
        worker = self._workers[key]
        try:
            worker.channel.send_handoff(fd, fd)
        except BlockingIOError:
            # The channel is full (of messages the worker has yet to read):
            # the connection goes back first in line, and the slot it took
            # stays taken until the channel drains, so this worker is not
            # chosen again and again meanwhile. Health pings catch a worker
            # that never reads again.
            self._pending.appendleft((fd, accepted_at))
            worker.blocked_slots += 1
            if worker.blocked_slots == 1:
                worker.channel.when_writable(functools.partial(self._unblocked, worker))
            return False
        except OSError as exc:
            # Not sent: the connection is still only ours, first in line again.
            self._pending.appendleft((fd, accepted_at))
            self.stop_sending(worker)
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                self._on_fault(worker, f"hand-off could not be sent: {exc}")
            # Otherwise the worker is exiting; its pidfd will say so.
            return False
        worker.inflight[fd] = accepted_at
        worker.handed_off += 1
        self.inflight += 1
        self.handed_off += 1
        return True

    def _unblocked(self, worker: WorkerProcess) -> None:
        slots, worker.blocked_slots = worker.blocked_slots, 0
        if worker.key in self._workers:
            for _ in range(slots):
                self._policy.ack(worker.key, True)
        if self._pending:
            self.pump()

    # Workers

    def attach(self, worker: WorkerProcess) -> None:
        """``worker`` is ready: give it connections."""
        self._workers[worker.key] = worker
        self._policy.attach(worker.key)
        self.pump()

    def stop_sending(self, worker: WorkerProcess) -> None:
        """Send ``worker`` nothing more; what it holds un-acked may still be acked."""
        if self._workers.pop(worker.key, None) is not None:
            self._policy.detach(worker.key)

    def forget(self, worker: WorkerProcess) -> int:
        """``worker`` is gone: re-queue its un-acked hand-offs first in line.

        Returns:
            How many connections were re-queued.
        """
        self.stop_sending(worker)
        count = len(worker.inflight)
        if count:
            # First in line again, with their accept times: they are the oldest.
            self._pending.extendleft(reversed(worker.inflight.items()))
            worker.inflight.clear()
            self.inflight -= count
            self.redispatched += count
        if self._pending:
            self.pump()
        return count

    def on_ack(self, worker: WorkerProcess, conn_id: int, accepted: bool) -> None:
        """Handle ``worker``'s answer to hand-off ``conn_id``."""
        try:
            accepted_at = worker.inflight.pop(conn_id)
        except KeyError:
            self.stop_sending(worker)
            self._on_fault(worker, f"ack for connection {conn_id} it was not given")
            return
        self.inflight -= 1
        if accepted:
            os.close(conn_id)
            worker.acked += 1
            if worker.acked == worker.max_requests:
                self._on_limit(worker)
            self.acked += 1
            self._policy.ack(worker.key, True)
        else:
            worker.refused += 1
            self.refused += 1
            self._policy.ack(worker.key, False)
            self.stop_sending(worker)
            self._on_refused(worker)
            key = self._policy.choose(exclude=worker.key)
            if key is None:
                self._pending.appendleft((conn_id, accepted_at))
            elif self._send(key, conn_id, accepted_at):
                self.redispatched += 1
        if self._pending:
            self.pump()
        elif self.on_settled is not None and not self.inflight:
            self.on_settled()

    # Ending

    def expire(self, now: float) -> int:
        """Close queued connections accepted longer than the pending timeout ago; return how many.

        The whole queue is scanned (at most ``max_pending``, once a second):
        re-queued connections keep their accept time, so it is not sorted.
        """
        limit = now - self.pending_timeout_s
        if not any(accepted_at <= limit for _, accepted_at in self._pending):
            return 0
        keep: collections.deque[tuple[int, float]] = collections.deque()
        count = 0
        for fd, accepted_at in self._pending:
            if accepted_at <= limit:
                os.close(fd)
                count += 1
            else:
                keep.append((fd, accepted_at))
        self._pending = keep
        self.expired += count
        if self.on_room is not None:
            self.on_room()
        return count

    def close_pending(self) -> int:
        """Close every queued connection (shutdown); return how many."""
        count = len(self._pending)
        while self._pending:
            os.close(self._pending.popleft()[0])
        return count
