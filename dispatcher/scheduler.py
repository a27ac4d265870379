"""Handing accepted connections to workers: the pending queue, hand-offs and acks.

Theory of operation
-------------------
Every accepted connection is an fd owned by the master until a worker acks
it. Its number doubles as the connection's id on the wire: it is unique for
as long as the master holds it, which is exactly as long as an ack can refer
to it.

Where each master fd is, at every moment, is one of:
- ``_pending``: accepted, waiting for a free worker (FIFO, bounded by
  ``max_pending``, and with those in flight by ``max_held``, the fds the
  master may spend on connections (``dispatcher.fd_budget``); the acceptor
  stops accepting at either bound, so the rest wait in the kernel's
  backlog);
- ``lane.staged``: dealt to a worker (its window slot is taken) and not
  yet sent. Every entry point (``submit``, ``on_ack``, ``attach``,
  ``forget``) sends what it staged before returning, in ``Handoff``
  datagrams of up to ``HANDOFF_FDS`` fds per worker, so a burst costs a
  ``sendmsg`` per worker per 16 connections rather than one per
  connection. ``submit``, the hot path, deals a whole accepted batch in
  one call and sends it in another (``shared.hotpath.send_dealt``), so
  its connections pass through ``staged`` only if a worker's datagram
  did not go (then ``flush`` sends them again or re-queues them);
- ``lane.in_flight``: sent in a ``Handoff``; the worker's copy is in the
  channel or in the worker.

and it leaves the master in exactly one of three ways:
- an ``Ack(accepted=True)`` naming it (a worker acks each connection as
  its handler starts; an ack may name several): the worker holds its own
  copy; ours is closed. The worker's channel settles such an ack itself
  when every id it names is in the lane's ``in_flight``, each once
  (``shared.channel``: it closes our copies and calls ``on_acked``);
  anything else comes to ``on_ack``, which checks it the same way;
- the pending timeout or shutdown: closed, the client sees the connection
  end without an answer;
- never otherwise. A refused hand-off goes to another worker; a worker that
  dies, or whose channel fails, gives its un-acked hand-offs back to the
  front of the queue (``forget``), where they are re-dispatched first.

A worker's copy in flight in a dead worker's channel is closed by the kernel
with the socket; ours is still here, so nothing is lost.

Each worker's ``lane`` is the scheduler's own record of it (what it holds,
what it was dealt, its counts); nothing else writes it. What the scheduler
learns about a worker that the supervisor must act on (a bad ack, a
refusal, its ``max_requests`` reached) it tells the worker object, which
passes it on to whoever started it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dispatcher.policies import Policy
from shared.channel import Channel
from shared.hotpath import Sent, Targets, send_dealt

#: A connection the master holds: its fd (also its id on the wire) and when it was accepted.
Conn = tuple[int, float]

#: The most connections in one hand-off datagram (a turn may send a worker several). A
#: worker must have a free fd for each at once, or it refuses the whole datagram and
#: drains (``shared.channel``: MSG_CTRUNC): a worker near its fd limit, or one just
#: started into a full queue, takes what fits in a few datagrams instead of refusing one
#: of a whole window. Large enough for what a busy master deals a worker in one turn.
HANDOFF_FDS = 16


@dataclass(slots=True)
class Lane:
    """The scheduler's per-worker state: the master's copies it holds for one worker, and counts.

    Attributes:
        in_flight: conn ids (the master's fds) handed off and not yet acked,
            with the time each was accepted. Never replaced, only changed:
            the worker's channel (which settles acks) and the scheduler's
            send targets hold this very dict.
        staged: connections dealt to it and not yet sent.
        blocked_slots: window slots held by hand-offs that found its channel full.
        handed_off, acked, refused: connections sent to it, and how it answered.
    """

    in_flight: dict[int, float] = field(default_factory=dict)
    staged: list[Conn] = field(default_factory=list)
    blocked_slots: int = 0
    handed_off: int = 0
    acked: int = 0
    refused: int = 0


class Receiver(Protocol):
    """What the scheduler needs of a worker."""

    key: int
    lane: Lane
    channel: Channel
    #: Connections after which it is due for recycling (0: never).
    max_requests: int

    def faulted(self, reason: str) -> None:
        """It broke the protocol, or could not be sent to: it must be replaced."""

    def refused_handoff(self) -> None:
        """It refused a hand-off: it is draining."""

    def reached_max_requests(self) -> None:
        """Its acks reached ``max_requests``."""


class Scheduler:
    """The master's side of the hand-off.

    Parameters:
        policy: chooses the worker for each connection.
        max_pending: how many accepted connections may wait for a worker.
        pending_timeout_s: how long one may wait before it is closed.
    """

    def __init__(self, policy: Policy, max_pending: int, pending_timeout_s: float) -> None:
        self._policy = policy
        self._workers: dict[int, Receiver] = {}
        # Per attached worker, where ``send_dealt`` sends: its channel's socket and its in-flight dict.
        self._targets: Targets = {}
        # Workers with staged connections, in the order they were first dealt one.
        self._dirty: list[Receiver] = []
        # Keys of workers whose load figure was reported since ``age_loads`` last
        # ran, and in the run before.
        self._fresh: set[int] = set()
        self._recent: set[int] = set()
        self._pending: collections.deque[Conn] = collections.deque()
        self.max_pending = max_pending
        self.pending_timeout_s = pending_timeout_s
        #: Connections the master may hold in all, queued or in flight (its fd budget).
        self.max_held = sys.maxsize
        self._resume_room = 1
        self._set_resume_room()
        #: Set by the acceptor while it is paused because the queue was full.
        self.on_room: Callable[[], None] | None = None
        #: Called when nothing is pending or in flight, or no worker is left to
        #: take what is (set while stopping).
        self.on_settled: Callable[[], None] | None = None
        self.in_flight = 0
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

    def limit_held(self, max_held: int) -> None:
        """Hold at most ``max_held`` connections, queued and in flight (the fd budget allows no more)."""
        self.max_held = max(1, max_held)
        self._set_resume_room()
        self._tell_room()

    def _set_resume_room(self) -> None:
        # Accepting resumes once a quarter of the room is free again, not at
        # every single fd: a queue that fills and drains all the time would
        # add and remove the listeners on every turn.
        self._resume_room = max(1, min(self.max_pending, self.max_held) // 4)

    @property
    def full(self) -> bool:
        return self.room == 0

    @property
    def settled(self) -> bool:
        return not self._pending and not self.in_flight

    @property
    def attached(self) -> int:
        return self._policy.workers

    @property
    def room(self) -> int:
        """How many more connections may be accepted: the queue's room, within the fd budget."""
        pending = len(self._pending)
        return max(0, min(self.max_pending - pending, self.max_held - pending - self.in_flight))

    def _tell_room(self) -> None:
        """Resume a paused acceptor once there is room enough."""
        if self.on_room is not None and self.room >= self._resume_room:
            self.on_room()

    def submit(self, fds: list[int], accepted_at: float) -> None:
        """Take ownership of connections ``fds`` (accepted at ``accepted_at``), deal them and send.

        Each goes to a free worker unless older ones are waiting or none is
        free; then it waits in the queue. The caller keeps the queue within
        ``room``.
        """
        pending = self._pending
        groups: list[tuple[int, list[int]]] = []
        dealt = 0
        if not pending:
            # The whole batch in one call (the policy is compiled); no loop
            # here runs once per connection.
            groups, dealt = self._policy.deal(fds)
        if dealt < len(fds):
            pending.extend(zip(fds[dealt:], itertools.repeat(accepted_at)))
        if groups:
            self._hand_off(groups, accepted_at)

    def _hand_off(self, groups: list[tuple[int, list[int]]], accepted_at: float) -> None:
        """Send a deal: each worker's connections in one call, counted per worker here."""
        try:
            results = send_dealt(groups, accepted_at, self._targets, HANDOFF_FDS)
        except BaseException:
            # Out of memory, say, part-way: what went is what is in the in-flight dicts (a
            # connection is there exactly when its datagram went); the rest is staged.
            results = []
            for key, dealt_fds in groups:
                in_flight = self._workers[key].lane.in_flight
                sent = sum(1 for fd in dealt_fds if fd in in_flight)
                results.append((sent, -(-sent // HANDOFF_FDS), errno.EIO if sent < len(dealt_fds) else 0))
            self._count_sent(groups, results, accepted_at)
            raise
        self._count_sent(groups, results, accepted_at)

    def _count_sent(self, groups: list[tuple[int, list[int]]], results: list[Sent],
                    accepted_at: float) -> None:
        workers = self._workers
        for (key, dealt_fds), (sent, datagrams, error) in zip(groups, results, strict=True):
            worker = workers[key]
            if sent:
                worker.lane.handed_off += sent
                self.in_flight += sent
                self.handed_off += sent
                self.handoff_messages += datagrams
            if error:
                # A datagram did not go: the rest are staged, and ``_send``
                # tries them again and handles what it meets (a full
                # channel holds the worker, a gone one re-queues them).
                staged = worker.lane.staged
                if not staged:
                    self._dirty.append(worker)
                staged.extend(zip(dealt_fds[sent:], itertools.repeat(accepted_at)))
        if self._dirty:
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
        self._tell_room()

    def _deal_pending(self) -> None:
        """Deal and send what waits in the queue, if anything does."""
        if self._pending:
            self.pump()
            self.flush()

    def _stage(self, worker: Receiver, fd: int, accepted_at: float) -> None:
        staged = worker.lane.staged
        if not staged:
            self._dirty.append(worker)
        staged.append((fd, accepted_at))

    def flush(self) -> None:
        """Send every staged connection: one hand-off datagram per worker (per ``HANDOFF_FDS`` of them)."""
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            returned: list[Conn] = []
            for worker in dirty:
                lane = worker.lane
                batch, lane.staged = lane.staged, []
                sent = self._send(worker, batch) if batch else 0
                if sent < len(batch):
                    returned += batch[sent:]
            if returned:
                # First in line again, oldest first (a stable sort keeps the
                # dealing order among those accepted together).
                returned.sort(key=lambda conn: conn[1])
                self._pending.extendleft(reversed(returned))
                self.pump()  # other workers may take them

    def _send(self, worker: Receiver, batch: list[Conn]) -> int:
        """Hand ``batch`` to ``worker`` in datagrams of at most ``HANDOFF_FDS``; return how many went.

        The caller re-queues the rest.
        """
        lane = worker.lane
        sent = 0
        while sent < len(batch):
            chunk = batch[sent:sent + HANDOFF_FDS]
            try:
                worker.channel.send_handoff([conn[0] for conn in chunk])
            except BlockingIOError:
                # The channel is full (of messages the worker has yet to read).
                # The slots the rest of the batch took, with every other free
                # slot of this worker, stay taken until the channel drains, so
                # it is not chosen again meanwhile. Health pings catch a
                # worker that never reads again.
                if not lane.blocked_slots:
                    worker.channel.when_writable(functools.partial(self._unblocked, worker))
                lane.blocked_slots += len(batch) - sent + self._policy.hold(worker.key)
                return sent
            except OSError as exc:
                # Not sent: the connections are still only ours.
                self.stop_sending(worker)
                if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    worker.faulted(f"hand-off could not be sent: {exc}")
                # Otherwise the worker is exiting; its pidfd will say so.
                return sent
            lane.in_flight.update(chunk)
            count = len(chunk)
            lane.handed_off += count
            self.in_flight += count
            self.handed_off += count
            self.handoff_messages += 1
            sent += count
        return sent

    def _unblocked(self, worker: Receiver) -> None:
        lane = worker.lane
        slots, lane.blocked_slots = lane.blocked_slots, 0
        if worker.key in self._workers:
            self._policy.ack(worker.key, True, slots)
        self._deal_pending()

    # Workers

    def attach(self, worker: Receiver) -> None:
        """``worker`` is ready: give it connections."""
        self._workers[worker.key] = worker
        self._targets[worker.key] = (worker.channel.sock, worker.lane.in_flight)
        self._policy.attach(worker.key)
        self.pump()
        self.flush()

    def stop_sending(self, worker: Receiver) -> None:
        """Send ``worker`` nothing more; what it holds un-acked may still be acked."""
        if self._workers.pop(worker.key, None) is not None:
            del self._targets[worker.key]
            self._policy.detach(worker.key)
        lane = worker.lane
        if lane.staged:
            # Dealt to it but not sent: first in line again.
            self._pending.extendleft(reversed(lane.staged))
            lane.staged = []
        self._tell_if_settled()

    def _tell_if_settled(self) -> None:
        # Wherever that can become true: an ack, a worker leaving, an expiry.
        if self.on_settled is not None and (self.settled or not self._workers):
            self.on_settled()

    def forget(self, worker: Receiver) -> int:
        """``worker`` is gone: re-queue its un-acked hand-offs first in line.

        Returns:
            How many connections were re-queued.
        """
        self.stop_sending(worker)
        in_flight = worker.lane.in_flight
        count = len(in_flight)
        if count:
            # First in line again, with their accept times: they are the oldest.
            self._pending.extendleft(reversed(in_flight.items()))
            in_flight.clear()
            self.in_flight -= count
            self.redispatched += count
        self._deal_pending()
        return count

    def report_load(self, worker: Receiver, load: int) -> None:
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

    def on_ack(self, worker: Receiver, conn_ids: tuple[int, ...], accepted: bool, load: int = 0) -> None:
        """Handle ``worker``'s answer to the hand-off of ``conn_ids``; it now holds ``load`` connections."""
        lane = worker.lane
        in_flight = lane.in_flight
        count = len(conn_ids)
        # Checked first, so a bad ack changes nothing (not even the order). The
        # set operations run at C speed: an ack names up to a window of ids.
        named = set(conn_ids)
        if not named <= in_flight.keys():
            conn_id = next(i for i in conn_ids if i not in in_flight)
            self.stop_sending(worker)
            worker.faulted(f"ack for connection {conn_id} it was not given")
            return
        if len(named) < count:
            self.stop_sending(worker)
            worker.faulted(f"ack naming a connection twice: {conn_ids}")
            return
        if accepted:
            pop = in_flight.pop
            for conn_id in conn_ids:
                pop(conn_id)
            for conn_id in conn_ids:
                # Ours, and out of in_flight now: a close that fails (a bug elsewhere) must
                # not lose the ack's count or the worker's slots.
                with contextlib.suppress(OSError):
                    os.close(conn_id)
            self.on_acked(worker, count, load)
            return
        answered = [(conn_id, in_flight.pop(conn_id)) for conn_id in conn_ids]
        self.in_flight -= count
        lane.refused += count
        self.refused += count
        self._policy.ack(worker.key, False, count)
        self.stop_sending(worker)
        worker.refused_handoff()
        # First in line again, for another worker.
        self._pending.extendleft(reversed(answered))
        self.redispatched += count
        self._deal_pending()
        if self.on_settled is not None:  # only while stopping: the ack path makes no call otherwise
            self._tell_if_settled()

    def on_acked(self, worker: Receiver, count: int, load: int) -> None:
        """``worker`` acked ``count`` connections, already out of its lane's ``in_flight`` and closed.

        The channel's settled acks come here directly; ``on_ack`` comes here
        once it has checked, popped and closed them itself.
        """
        lane = worker.lane
        self.in_flight -= count
        if self.on_room is not None:  # paused at the fd budget: an ack frees an fd
            self._tell_room()
        before = lane.acked
        lane.acked += count
        self.acked += count
        if before < worker.max_requests <= lane.acked:
            worker.reached_max_requests()
        # report_load and _deal_pending, inlined: this runs for every ack.
        key, policy = worker.key, self._policy
        policy.report(key, load)
        self._fresh.add(key)
        policy.ack(key, True, count)
        if self._pending:
            self._deal_pending()
        if self.on_settled is not None:  # only while stopping: the ack path makes no call otherwise
            self._tell_if_settled()

    # Ending

    def expire(self, now: float) -> int:
        """Close queued connections accepted longer than the pending timeout ago; return how many.

        The whole queue is scanned (at most ``max_pending``, once a second):
        re-queued connections keep their accept time, so it is not sorted.
        """
        limit = now - self.pending_timeout_s
        if not any(accepted_at <= limit for _, accepted_at in self._pending):
            return 0
        keep: collections.deque[Conn] = collections.deque()
        count = 0
        for fd, accepted_at in self._pending:
            if accepted_at <= limit:
                os.close(fd)
                count += 1
            else:
                keep.append((fd, accepted_at))
        self._pending = keep
        self.expired += count
        self._tell_room()
        self._tell_if_settled()
        return count

    def close_pending(self) -> int:
        """Close every queued connection (shutdown); return how many."""
        count = len(self._pending)
        while self._pending:
            os.close(self._pending.popleft()[0])
        return count
