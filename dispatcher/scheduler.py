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
- ``worker.staged``: dealt to a worker (its window slot is taken) and not
  yet sent. Every entry point (``submit``, ``on_ack``, ``attach``,
  ``forget``) sends what it staged before returning, one
  ``Handoff`` datagram per worker carrying all of that worker's fds, so a
  burst costs one ``sendmsg`` per worker rather than one per connection;
- ``worker.inflight``: sent in a ``Handoff``; the worker's copy is in the
  channel or in the worker.

and it leaves the master in exactly one of three ways:
- an ``Ack(accepted=True)`` naming it (one ack answers one hand-off, all
  its connections): the worker holds its own copy; ours is closed;
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
        # Workers with staged connections, in the order they were first dealt one.
        self._dirty: list[WorkerProcess] = []
        # Keys of workers whose load figure was reported since ``age_loads`` last
        # ran, and in the run before.
        self._fresh: set[int] = set()
        self._recent: set[int] = set()
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
        #: Hand-off datagrams sent: ``handed_off / handoff_messages`` connections each.
        self.handoff_messages = 0
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

    @property
    def room(self) -> int:
        """How many more connections the queue takes before it is full."""
        return max(0, self.max_pending - len(self._pending))

    def submit(self, fds: list[int], accepted_at: float) -> None:
        """Take ownership of connections ``fds`` (accepted at ``accepted_at``), deal them and send.

        Each goes to a free worker unless older ones are waiting or none is
        free; then it waits in the queue. The caller keeps the queue within
        ``room``.
        """
        pending = self._pending
        choose = self._policy.choose
        workers = self._workers
        dirty = self._dirty
        for fd in fds:
            if not pending:
                key = choose()
                if key is not None:
                    # _stage, inlined: this loop runs once per accepted connection.
                    staged = workers[key].staged
                    if not staged:
                        dirty.append(workers[key])
                    staged.append((fd, accepted_at))
                    continue
            pending.append((fd, accepted_at))
        self.flush()

    def pump(self) -> None:
        """Deal queued connections to free workers, oldest first (sent by ``flush``)."""
        pending = self._pending
        choose = self._policy.choose
        workers = self._workers
        while pending:
            key = choose()
            if key is None:
                break
            fd, accepted_at = pending.popleft()
            self._stage(workers[key], fd, accepted_at)
        if self.on_room is not None and len(pending) <= self._resume_mark:
            self.on_room()

    def _deal_pending(self) -> None:
        """Deal and send what waits in the queue, if anything does."""
        if self._pending:
            self.pump()
            self.flush()

    def _stage(self, worker: WorkerProcess, fd: int, accepted_at: float) -> None:
        if not worker.staged:
            self._dirty.append(worker)
        worker.staged.append((fd, accepted_at))

    def flush(self) -> None:
        """Send every staged connection: one hand-off datagram per worker."""
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            returned: list[tuple[int, float]] = []
            for worker in dirty:
                # At most a window of connections: the policy caps it at MAX_FDS.
                batch, worker.staged = worker.staged, []
                if batch and not self._send(worker, batch):
                    returned += batch
            if returned:
                # First in line again, oldest first (a stable sort keeps the
                # dealing order among those accepted together).
                returned.sort(key=lambda conn: conn[1])
                self._pending.extendleft(reversed(returned))
                self.pump()  # other workers may take them

    def _send(self, worker: WorkerProcess, batch: list[tuple[int, float]]) -> bool:
        """Hand ``batch`` to ``worker`` in one datagram; False if not sent (the caller re-queues it)."""
        try:
            worker.channel.send_handoff([fd for fd, _ in batch])
        except BlockingIOError:
            # The channel is full (of messages the worker has yet to read).
            # The slots the batch took, with every other free slot of this
            # worker, stay taken until the channel drains, so it is not
            # chosen again meanwhile. Health pings catch a worker that never
            # reads again.
            if not worker.blocked_slots:
                worker.channel.when_writable(functools.partial(self._unblocked, worker))
            worker.blocked_slots += len(batch) + self._policy.hold(worker.key)
            return False
        except OSError as exc:
            # Not sent: the connections are still only ours.
            self.stop_sending(worker)
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                self._on_fault(worker, f"hand-off could not be sent: {exc}")
            # Otherwise the worker is exiting; its pidfd will say so.
            return False
        inflight = worker.inflight
        for fd, accepted_at in batch:
            inflight[fd] = accepted_at
        count = len(batch)
        worker.handed_off += count
        self.inflight += count
        self.handed_off += count
        self.handoff_messages += 1
        return True

    def _unblocked(self, worker: WorkerProcess) -> None:
        slots, worker.blocked_slots = worker.blocked_slots, 0
        if worker.key in self._workers:
            self._policy.ack(worker.key, True, slots)
        self._deal_pending()

    # Workers

    def attach(self, worker: WorkerProcess) -> None:
        """``worker`` is ready: give it connections."""
        self._workers[worker.key] = worker
        self._policy.attach(worker.key)
        self.pump()
        self.flush()

    def stop_sending(self, worker: WorkerProcess) -> None:
        """Send ``worker`` nothing more; what it holds un-acked may still be acked."""
        if self._workers.pop(worker.key, None) is not None:
            self._policy.detach(worker.key)
        if worker.staged:
            # Dealt to it but not sent: first in line again.
            self._pending.extendleft(reversed(worker.staged))
            worker.staged = []

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
        self._deal_pending()
        return count

    def report_load(self, worker: WorkerProcess, load: int) -> None:
        """``worker`` said (in an ack or a pong) that it holds ``load`` connections."""
        self._policy.report(worker.key, load)
        self._fresh.add(worker.key)

    def age_loads(self) -> None:
        """Forget load figures not refreshed over the last two calls (the master's 1 s tick).

        A worker that is sent nothing neither acks nor, with pings off,
        reports: a figure from its last ack (taken when it was busiest) would
        keep it passed over after its connections ended. Forgotten, it counts
        as holding none but its un-acked hand-offs; its next ack corrects that.
        Two ticks, not one: with pings on, a pong lands in every such span
        whatever the timers' phase, so a real figure is never forgotten.
        """
        for key in self._workers:
            if key not in self._fresh and key not in self._recent:
                self._policy.report(key, 0)
        self._recent, self._fresh = self._fresh, set()

    def on_ack(self, worker: WorkerProcess, conn_ids: tuple[int, ...], accepted: bool, load: int = 0) -> None:
        """Handle ``worker``'s answer to the hand-off of ``conn_ids``; it now holds ``load`` connections."""
        inflight = worker.inflight
        for conn_id in conn_ids:
            if conn_id not in inflight:
                self.stop_sending(worker)
                self._on_fault(worker, f"ack for connection {conn_id} it was not given")
                return
        if len(conn_ids) > 1 and len(set(conn_ids)) < len(conn_ids):
            self.stop_sending(worker)
            self._on_fault(worker, f"ack naming a connection twice: {conn_ids}")
            return
        # Checked first, so a bad ack changes nothing (not even the order).
        answered = [(conn_id, inflight.pop(conn_id)) for conn_id in conn_ids]
        count = len(answered)
        self.inflight -= count
        if accepted:
            for conn_id, _ in answered:
                os.close(conn_id)
            before = worker.acked
            worker.acked += count
            self.acked += count
            if before < worker.max_requests <= worker.acked:
                self._on_limit(worker)
            self.report_load(worker, load)
            self._policy.ack(worker.key, True, count)
        else:
            worker.refused += count
            self.refused += count
            self._policy.ack(worker.key, False, count)
            self.stop_sending(worker)
            self._on_refused(worker)
            # First in line again, for another worker.
            self._pending.extendleft(reversed(answered))
            self.redispatched += count
        self._deal_pending()
        if self.on_settled is not None and not self._pending and not self.inflight:
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
