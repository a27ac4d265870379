"""The scheduler with real worker processes, channels and connections: where every fd goes.

Each worker is a real (idle) child process with its pidfd and a real
SOCK_SEQPACKET channel; the test holds the worker's end, reads the hand-offs
off it and answers them. Connections are real socketpairs: the master's end
goes to the scheduler, the test keeps the client's end to see when the last
copy of the connection is closed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from dispatcher import scheduler as scheduler_module
from dispatcher.policies import RoundRobin
from dispatcher.scheduler import HANDOFF_FDS, Scheduler
from dispatcher.worker_process import WorkerProcess
from shared import protocol
from shared.channel import close_fds, fds_from_ancillary, socketpair
from shared.protocol import Message
from tests.helpers import is_open

#: Stuffed into a channel to fill it: not a hand-off.
FILLER = b"\xf0"
_ANC = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)


def open_fds() -> int:
    gc.collect()  # sockets only the collector closes
    return len(os.listdir("/proc/self/fd"))


def same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


class Events:
    """The ``WorkerEvents`` of the master, recorded; acks go on to the scheduler, as in the master."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.acks: list[tuple[WorkerProcess, tuple[int, ...], bool]] = []
        #: Acks the channel settled itself (the master's hot path): the worker, how many.
        self.settled: list[tuple[WorkerProcess, int]] = []
        self.messages: list[tuple[WorkerProcess, Message]] = []
        self.closed: list[tuple[WorkerProcess, str]] = []
        self.exits: list[WorkerProcess] = []
        self.faults: list[tuple[WorkerProcess, str]] = []
        self.refusals: list[WorkerProcess] = []
        self.limits: list[WorkerProcess] = []

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None:
        self.messages.append((worker, message))
        close_fds(fds)

    def on_ack(self, worker: WorkerProcess, conn_ids: tuple[int, ...], accepted: bool, load: int) -> None:
        self.acks.append((worker, conn_ids, accepted))
        assert self.scheduler is not None
        self.scheduler.on_ack(worker, conn_ids, accepted, load)

    def on_acked(self, worker: WorkerProcess, count: int, load: int) -> None:
        self.settled.append((worker, count))
        assert self.scheduler is not None
        self.scheduler.on_acked(worker, count, load)

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        self.closed.append((worker, reason))

    def on_exit(self, worker: WorkerProcess) -> None:
        self.exits.append(worker)

    def on_fault(self, worker: WorkerProcess, reason: str) -> None:
        self.faults.append((worker, reason))

    def on_refusal(self, worker: WorkerProcess) -> None:
        self.refusals.append(worker)

    def on_max_requests(self, worker: WorkerProcess) -> None:
        self.limits.append(worker)


def in_flight(policy: RoundRobin, key: int) -> int:
    """Un-acked hand-offs of worker ``key``, as the policy counts them: its window less its free slots."""
    return policy.in_flight(key)


class Rig:
    """A scheduler over real workers; ``close`` ends every process and closes every fd."""

    def __init__(self, window: int, max_pending: int, pending_timeout_s: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.events = Events()
        # What the scheduler tells each worker object, which passes it on to its events.
        self.faults = self.events.faults
        self.refusals = self.events.refusals
        self.limits = self.events.limits
        self.policy = RoundRobin(window)
        self.scheduler = Scheduler(self.policy, max_pending, pending_timeout_s)
        self.events.scheduler = self.scheduler
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[WorkerProcess] = []
        self.masters: dict[int, socket.socket] = {}  # key -> the master's end of the channel
        self.ends: dict[int, socket.socket] = {}  # key -> the worker's end, read by the test
        self.clients: list[socket.socket] = []
        self.client_of: dict[int, socket.socket] = {}  # the master's fd -> the client's end
        self.fillers_read = 0

    def add_workers(self, count: int, attach: bool = True, max_requests: int = 0) -> list[WorkerProcess]:
        added = []
        for _ in range(count):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            self.procs.append(proc)
            pidfd = os.pidfd_open(proc.pid)
            master_end, worker_end = socketpair()
            worker_end.setblocking(False)
            slot = len(self.workers)
            # Wired as the master wires them: the channel settles good acks itself.
            worker = WorkerProcess(slot, 100 + slot, proc, pidfd, master_end, self.loop, self.events,
                                   self.events.on_ack, max_requests, self.events.on_acked)
            self.workers.append(worker)
            self.masters[worker.key] = master_end
            self.ends[worker.key] = worker_end
            added.append(worker)
        if attach:
            for worker in added:
                self.scheduler.attach(worker)
        return added

    def submit(self, count: int, accepted_at: float) -> list[int]:
        """Accept ``count`` connections at ``accepted_at``, give them to the scheduler, return their fds."""
        fds = []
        for _ in range(count):
            server, client = socket.socketpair()
            client.setblocking(False)
            fd = server.detach()
            self.clients.append(client)
            self.client_of[fd] = client
            fds.append(fd)
        self.scheduler.submit(fds, accepted_at)
        return fds

    def client_sees_eof(self, fd: int) -> bool:
        """True once no copy of connection ``fd`` is open anywhere (master or worker)."""
        try:
            return self.client_of[fd].recv(1) == b""
        except BlockingIOError:
            return False

    def handoffs(self, worker: WorkerProcess) -> list[tuple[int, ...]]:
        """The hand-offs waiting at ``worker``'s end, oldest first, by their ids.

        Each fd that came is checked to be the very connection its id names (the
        master's fd of that number), then closed: the test plays a worker that
        took it. Fillers are counted and skipped.
        """
        end = self.ends[worker.key]
        found: list[tuple[int, ...]] = []
        while True:
            try:
                data, ancdata, flags, _ = end.recvmsg(protocol.MAX_MESSAGE_BYTES, _ANC)
            except BlockingIOError:
                return found
            fds, unexpected = fds_from_ancillary(ancdata)
            try:
                assert not unexpected and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
                if data == FILLER:
                    assert not fds
                    self.fillers_read += 1
                    continue
                ids = protocol.decode_handoff(data)
                assert ids is not None, data
                assert len(fds) == len(ids)
                for conn_id, fd in zip(ids, fds, strict=True):
                    assert same_file(conn_id, fd)
                found.append(ids)
            finally:
                close_fds(fds)

    def fill(self, worker: WorkerProcess) -> int:
        """Send fillers to ``worker`` until its channel takes no more; return how many."""
        count = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                self.masters[worker.key].send(FILLER)
                count += 1
        return count

    def run_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def waiter() -> None:
            while not predicate():
                await asyncio.sleep(0)  # let the loop's reader and writer callbacks run

        self.loop.run_until_complete(asyncio.wait_for(waiter(), timeout))

    def close(self) -> None:
        try:
            # The connections the scheduler still owns: in flight, dealt, queued.
            for worker in self.workers:
                lane = worker.lane
                close_fds([*lane.in_flight, *(fd for fd, _ in lane.staged)])
                lane.in_flight.clear()
                lane.staged = []
            self.scheduler.close_pending()
            for worker in self.workers:
                worker.channel.close()
                self.ends[worker.key].close()
                os.close(worker.pidfd)
            for client in self.clients:
                client.close()
        finally:
            for proc in self.procs:
                proc.kill()  # by its pid
                proc.wait(timeout=10)
            self.loop.close()


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    before = open_fds()
    rigs: list[Rig] = []

    def make(window: int, max_pending: int = 64, pending_timeout_s: float = 10.0) -> Rig:
        rig = Rig(window, max_pending, pending_timeout_s)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
    assert open_fds() == before


def test_a_burst_goes_out_as_one_handoff_per_worker_dealt_in_turn(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    fds = rig.submit(6, 100.0)
    # One datagram each, the connections dealt one per worker in turn.
    assert rig.handoffs(a) == [tuple(fds[0::2])]
    assert rig.handoffs(b) == [tuple(fds[1::2])]
    assert (scheduler.handoff_messages, scheduler.handed_off, scheduler.in_flight) == (2, 6, 6)
    assert scheduler.pending == 0
    assert a.lane.in_flight == dict.fromkeys(fds[0::2], 100.0)
    assert b.lane.in_flight == dict.fromkeys(fds[1::2], 100.0)
    assert (a.lane.handed_off, b.lane.handed_off) == (3, 3)
    assert in_flight(rig.policy, a.key) == in_flight(rig.policy, b.key) == 3
    # Un-acked, every connection is still the master's too.
    assert all(is_open(fd) and not rig.client_sees_eof(fd) for fd in fds)


def test_a_turn_beyond_a_datagram_goes_out_in_several(make_rig: Callable[..., Rig]) -> None:
    # A worker takes a datagram's fds all at once or refuses it whole, so one
    # is at most HANDOFF_FDS however large the window.
    rig = make_rig(window=64)
    (a,) = rig.add_workers(1)
    fds = rig.submit(HANDOFF_FDS * 2 + 3, 5.0)
    assert rig.handoffs(a) == [tuple(fds[:HANDOFF_FDS]), tuple(fds[HANDOFF_FDS:2 * HANDOFF_FDS]),
                               tuple(fds[2 * HANDOFF_FDS:])]
    assert (rig.scheduler.handoff_messages, rig.scheduler.in_flight) == (3, len(fds))
    assert a.lane.in_flight == dict.fromkeys(fds, 5.0)


def test_a_channel_that_fills_midway_through_a_turn_holds_the_rest(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=64, max_pending=128)
    (a,) = rig.add_workers(1)
    scheduler = rig.scheduler
    # Room for exactly one more datagram: the first goes, the second meets EAGAIN.
    filled = rig.fill(a)
    assert rig.ends[a.key].recv(16) == FILLER  # one read: room for one datagram
    fds = rig.submit(HANDOFF_FDS + 4, 7.0)
    sent = fds[:HANDOFF_FDS]
    assert a.lane.in_flight == dict.fromkeys(sent, 7.0) and scheduler.handoff_messages == 1
    # The rest wait first in line, and every slot left is held until the channel drains.
    assert scheduler.pending == 4
    assert a.lane.blocked_slots == 64 - HANDOFF_FDS and in_flight(rig.policy, a.key) == 64
    # The worker reads its channel: the fillers, then the first datagram; writable again, the rest goes.
    assert rig.handoffs(a) == [tuple(sent)] and rig.fillers_read == filled - 1
    rig.run_until(lambda: scheduler.pending == 0)
    assert rig.handoffs(a) == [tuple(fds[HANDOFF_FDS:])]
    assert a.lane.blocked_slots == 0 and in_flight(rig.policy, a.key) == len(fds)
    assert rig.faults == []


def test_loads_from_acks_and_pongs_steer_connections_to_the_least_loaded(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    first = rig.submit(2, 1.0)
    assert rig.handoffs(a) == [(first[0],)] and rig.handoffs(b) == [(first[1],)]
    # a's ack says it holds 4 connections; b's says 1.
    scheduler.on_ack(a, (first[0],), True, 4)
    scheduler.on_ack(b, (first[1],), True, 1)
    more = rig.submit(3, 2.0)
    assert rig.handoffs(b) == [tuple(more[:2])]  # b until it holds within one of a
    assert rig.handoffs(a) == [(more[2],)]
    # A pong saying a is idle now puts it first, though b is first in line.
    scheduler.report_load(a, 0)
    last = rig.submit(1, 3.0)
    assert rig.handoffs(a) == [tuple(last)]
    assert rig.handoffs(b) == []


def test_a_load_figure_not_refreshed_for_a_tick_is_forgotten(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    first = rig.submit(2, 1.0)
    rig.handoffs(a), rig.handoffs(b)
    scheduler.on_ack(a, (first[0],), True, 6)  # a was busy then
    scheduler.on_ack(b, (first[1],), True, 0)
    scheduler.age_loads()  # both reported since the last tick: kept
    more = rig.submit(1, 2.0)
    assert rig.handoffs(b) == [tuple(more)] and rig.handoffs(a) == []
    scheduler.on_ack(b, tuple(more), True, 1)
    scheduler.age_loads()  # a said nothing for a tick, but did in the one before: kept
    fill = rig.submit(1, 2.5)
    assert rig.handoffs(b) == [tuple(fill)] and rig.handoffs(a) == []
    scheduler.on_ack(b, tuple(fill), True, 1)
    scheduler.age_loads()  # nothing from a for two ticks: its 6 is forgotten, b's 1 kept
    last = rig.submit(1, 3.0)
    assert rig.handoffs(a) == [tuple(last)] and rig.handoffs(b) == []


def test_beyond_the_window_connections_wait_and_go_out_oldest_first_on_ack(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    first = rig.submit(4, 1.0)
    waiting = rig.submit(3, 2.0)
    assert scheduler.pending == 3
    assert rig.handoffs(a) == [(first[0], first[2])]
    assert rig.handoffs(b) == [(first[1], first[3])]
    scheduler.on_ack(b, (first[1], first[3]), True)
    # b's two freed slots take the two oldest waiting, in one hand-off.
    assert rig.handoffs(b) == [(waiting[0], waiting[1])]
    assert rig.handoffs(a) == []
    assert scheduler.pending == 1
    assert b.lane.in_flight == dict.fromkeys(waiting[:2], 2.0)
    assert scheduler.handoff_messages == 3 and scheduler.handed_off == 6


def test_an_accepted_ack_closes_the_masters_copies_and_frees_credit(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=2)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    fds = rig.submit(4, 1.0)
    (ids,) = rig.handoffs(a)
    assert rig.handoffs(b) == [tuple(fds[1::2])]
    assert in_flight(rig.policy, a.key) == 2
    # The worker answers over its channel; the master's loop reads the ack, and the
    # channel settles it (closes the master's copies) without the general path.
    rig.ends[a.key].send(protocol.encode_ack(ids, True, 5))
    rig.run_until(lambda: scheduler.acked == 2)
    assert rig.events.settled == [(a, 2)] and rig.events.acks == []
    for fd in ids:
        with pytest.raises(OSError):
            os.fstat(fd)
        assert rig.client_sees_eof(fd)  # no copy left anywhere
    for fd in fds[1::2]:
        assert is_open(fd) and not rig.client_sees_eof(fd)
    assert a.lane.in_flight == {} and a.lane.acked == 2 and scheduler.in_flight == 2
    assert in_flight(rig.policy, a.key) == 0
    # The freed credit: a (b is full) takes the next two.
    more = rig.submit(2, 2.0)
    assert rig.handoffs(a) == [tuple(more)]
    assert rig.handoffs(b) == []
    assert rig.faults == [] and rig.limits == [] and rig.refusals == []


# name -> (the ack's ids from a's hand-off and b's) -> (the ack, the fault it causes)
BAD_ACKS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], str]]] = {
    "unknown id": lambda mine, others: (
        (mine[0], 999_999), "ack for connection 999999 it was not given"),
    "same id twice": lambda mine, others: (
        (mine[0], mine[0]), f"ack naming a connection twice: {(mine[0], mine[0])}"),
    "same id twice, apart": lambda mine, others: (
        (mine[0], mine[1], mine[0]), f"ack naming a connection twice: {(mine[0], mine[1], mine[0])}"),
    "another worker's id": lambda mine, others: (
        (mine[0], others[0]), f"ack for connection {others[0]} it was not given"),
}


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "refused"])
@pytest.mark.parametrize("bad", list(BAD_ACKS))
def test_an_ack_naming_a_connection_not_given_is_not_believed_at_all(
    make_rig: Callable[..., Rig], bad: str, accepted: bool
) -> None:
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    fds = rig.submit(4, 1.0)
    (mine,) = rig.handoffs(a)
    (others,) = rig.handoffs(b)
    ids, fault = BAD_ACKS[bad](mine, others)
    scheduler.on_ack(a, ids, accepted)
    assert rig.faults == [(a, fault)]
    # Nothing of it believed: no fd closed, nothing re-queued, nothing counted.
    assert a.lane.in_flight == dict.fromkeys(mine, 1.0) and b.lane.in_flight == dict.fromkeys(others, 1.0)
    assert all(is_open(fd) and not rig.client_sees_eof(fd) for fd in fds)
    assert (scheduler.in_flight, scheduler.acked, scheduler.refused, scheduler.redispatched) == (4, 0, 0, 0)
    assert (a.lane.acked, a.lane.refused, scheduler.pending) == (0, 0, 0)
    assert rig.refusals == [] and rig.limits == []
    # The worker is sent nothing more.
    assert rig.policy.workers == 1
    more = rig.submit(2, 2.0)
    assert rig.handoffs(a) == []
    assert rig.handoffs(b) == [tuple(more)]


def test_a_refused_handoff_goes_first_in_line_in_its_order_to_another_worker(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=2)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    rig.submit(4, 1.0)
    waiting = rig.submit(2, 2.0)
    (refused,) = rig.handoffs(a)
    (b_ids,) = rig.handoffs(b)
    assert scheduler.pending == 2
    scheduler.on_ack(a, refused, False)
    assert rig.refusals == [a] and rig.faults == []
    assert (a.lane.refused, scheduler.refused, scheduler.redispatched) == (2, 2, 2)
    assert a.lane.in_flight == {} and scheduler.in_flight == 2 and scheduler.pending == 4
    assert rig.policy.workers == 1  # a (draining) is sent nothing more
    # Still the master's: the worker closed only its own copies.
    assert all(is_open(fd) and not rig.client_sees_eof(fd) for fd in refused)
    scheduler.on_ack(b, b_ids, True)
    # Ahead of the ones that waited, in their order, with their accept time.
    assert rig.handoffs(b) == [refused]
    assert b.lane.in_flight == dict.fromkeys(refused, 1.0)
    scheduler.on_ack(b, refused, True)
    assert rig.handoffs(b) == [tuple(waiting)]
    assert rig.handoffs(a) == []
    assert all(rig.client_sees_eof(fd) for fd in refused)
    assert scheduler.pending == 0 and scheduler.acked == 4


def test_a_batched_ack_past_max_requests_calls_on_max_requests_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=4)
    (a,) = rig.add_workers(1, max_requests=3)
    scheduler = rig.scheduler
    fds = rig.submit(4, 1.0)
    assert rig.handoffs(a) == [tuple(fds)]
    scheduler.on_ack(a, (fds[0],), True)
    assert rig.limits == []
    scheduler.on_ack(a, tuple(fds[1:]), True)  # 1 -> 4, past 3 without landing on it
    assert rig.limits == [a]
    rig.submit(2, 2.0)
    (ids,) = rig.handoffs(a)
    scheduler.on_ack(a, ids, True)
    assert rig.limits == [a] and a.lane.acked == 6


def test_a_full_channel_holds_the_worker_until_it_drains(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=2)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    filled = rig.fill(a)
    assert filled > 0
    first = rig.submit(2, 1.0)
    # a's hand-off met EAGAIN: back in line, and b, which had room, took it.
    assert rig.handoffs(b) == [(first[1],), (first[0],)]
    assert a.lane.in_flight == {} and a.lane.handed_off == 0 and scheduler.handoff_messages == 2
    # Its slot, and its other free slot, are held: it is not chosen meanwhile.
    assert a.lane.blocked_slots == 2 and in_flight(rig.policy, a.key) == 2
    later = rig.submit(2, 2.0)
    assert scheduler.pending == 2  # a held, b full
    assert a.lane.blocked_slots == 2 and a.lane.handed_off == 0
    assert rig.faults == [] and rig.events.closed == []
    # The worker reads its channel (fillers only: no hand-off got through).
    assert rig.handoffs(a) == []
    assert rig.fillers_read == filled
    # Writable again: a's slots come back and what waited goes to it.
    rig.run_until(lambda: scheduler.pending == 0)
    assert rig.handoffs(a) == [tuple(later)]
    assert a.lane.blocked_slots == 0 and in_flight(rig.policy, a.key) == 2
    assert a.lane.in_flight == dict.fromkeys(later, 2.0)
    scheduler.on_ack(a, tuple(later), True)
    assert in_flight(rig.policy, a.key) == 0
    assert all(rig.client_sees_eof(fd) for fd in later)


@pytest.mark.parametrize("unread", [False, True], ids=["EPIPE", "ECONNRESET"])
def test_a_gone_worker_gives_the_handoff_back_first_in_line_without_a_fault(
    make_rig: Callable[..., Rig], unread: bool
) -> None:
    rig = make_rig(window=5)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    if unread:
        rig.masters[a.key].send(FILLER)  # it dies with a message unread: ECONNRESET, then EPIPE
    rig.ends[a.key].close()
    fds = rig.submit(4, 1.0)
    # a's share came back first in line and went to b, in its order.
    assert rig.handoffs(b) == [(fds[1], fds[3]), (fds[0], fds[2])]
    assert rig.faults == []  # the worker is exiting: its pidfd will say so
    assert a.lane.in_flight == {} and a.lane.handed_off == 0 and rig.policy.workers == 1
    assert b.lane.in_flight == dict.fromkeys([fds[1], fds[3], fds[0], fds[2]], 1.0)
    assert (scheduler.handoff_messages, scheduler.in_flight, scheduler.pending) == (2, 4, 0)
    assert all(is_open(fd) for fd in fds)
    # Nothing more is tried on a (another try would meet EPIPE, still not a fault).
    more = rig.submit(1, 2.0)
    assert rig.handoffs(b) == [tuple(more)]
    assert rig.faults == [] and scheduler.handoff_messages == 3


def test_forget_requeues_unacked_connections_first_in_line_with_their_accept_times(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=3)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    early = rig.submit(2, 100.0)
    late = rig.submit(1, 200.0)
    assert rig.handoffs(a) == [(early[0],), (late[0],)]
    assert rig.handoffs(b) == [(early[1],)]
    assert scheduler.forget(a) == 2
    assert a.lane.in_flight == {} and rig.policy.workers == 1 and scheduler.redispatched == 2
    # Re-dispatched at once to b, oldest first, in one hand-off, with their accept times.
    assert rig.handoffs(b) == [(early[0], late[0])]
    assert b.lane.in_flight == {early[1]: 100.0, early[0]: 100.0, late[0]: 200.0}
    assert scheduler.pending == 0 and scheduler.in_flight == 3
    assert all(is_open(fd) and not rig.client_sees_eof(fd) for fd in [*early, *late])
    # b is full now: the next waits, behind nothing re-queued.
    rig.submit(1, 300.0)
    assert scheduler.pending == 1 and rig.handoffs(b) == []


def test_forget_with_no_worker_left_keeps_them_queued_for_the_next(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=1)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    first = rig.submit(2, 1.0)
    rig.submit(1, 2.0)
    rig.handoffs(a)
    rig.handoffs(b)
    assert scheduler.forget(a) == 1
    assert scheduler.forget(b) == 1
    assert scheduler.pending == 3 and scheduler.in_flight == 0
    (c,) = rig.add_workers(1, attach=False)
    scheduler.attach(c)
    # A re-queued one goes first (window 1), ahead of the one that waited all along.
    (ids,) = rig.handoffs(c)
    assert len(ids) == 1 and ids[0] in first
    assert c.lane.in_flight == {ids[0]: 1.0} and scheduler.pending == 2


def test_expire_closes_only_connections_waiting_longer_than_the_timeout(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=1, pending_timeout_s=10.0)
    (a,) = rig.add_workers(1)
    scheduler = rig.scheduler
    handed = rig.submit(1, 50.0)
    old = rig.submit(2, 0.0)
    new = rig.submit(1, 8.0)
    assert rig.handoffs(a) == [tuple(handed)]
    # Refused: first in line again, though accepted after the ones behind it.
    scheduler.on_ack(a, tuple(handed), False)
    assert scheduler.pending == 4
    rooms: list[int] = []
    scheduler.on_room = lambda: rooms.append(scheduler.pending)
    assert scheduler.expire(15.0) == 2  # accepted at or before 5.0: only the two old ones
    for fd in old:
        assert not is_open(fd) and rig.client_sees_eof(fd)
    for fd in (*handed, *new):
        assert is_open(fd) and not rig.client_sees_eof(fd)
    assert scheduler.pending == 2 and scheduler.expired == 2 and rooms == [2]
    assert scheduler.expire(15.0) == 0
    assert scheduler.close_pending() == 2
    assert scheduler.pending == 0
    for fd in (*handed, *new):
        assert not is_open(fd) and rig.client_sees_eof(fd)


def test_a_disbelieved_ack_leaves_the_handoff_order_as_it_was(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=4)
    (a,) = rig.add_workers(1)
    (b,) = rig.add_workers(1, attach=False)
    scheduler = rig.scheduler
    fds = rig.submit(3, 1.0)
    assert rig.handoffs(a) == [tuple(fds)]
    scheduler.on_ack(a, (fds[0], fds[0]), True)
    assert len(rig.faults) == 1
    # The supervisor kills it; its exit gives its connections back, oldest first.
    scheduler.forget(a)
    scheduler.attach(b)
    assert rig.handoffs(b) == [tuple(fds)]


def test_handoffs_that_all_meet_a_full_channel_keep_the_oldest_first(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=2)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    rig.fill(a)
    rig.fill(b)
    fds = rig.submit(4, 1.0)
    assert scheduler.pending == 4 and scheduler.handoff_messages == 0
    assert rig.handoffs(a) == []  # a reads its channel; b still does not
    rig.run_until(lambda: scheduler.pending == 2)
    (got,) = rig.handoffs(a)
    assert got[0] == fds[0]  # the oldest goes first


def test_a_stop_is_told_it_settled_wherever_that_happens(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=1)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    told: list[bool] = []
    scheduler.on_settled = lambda: told.append(scheduler.settled)
    rig.fill(a)
    rig.fill(b)
    rig.submit(1, 0.0)  # both channels full: it waits, nothing in flight
    assert scheduler.pending == 1 and scheduler.in_flight == 0 and told == []
    scheduler.expire(1e9)  # an expiry
    assert told == [True]
    fds = rig.submit(1, 1e9)
    scheduler.stop_sending(a)
    assert told == [True]  # b is still there to take it
    scheduler.stop_sending(b)  # a worker leaving: none is left
    assert told == [True, False]
    rig.handoffs(a), rig.handoffs(b)
    assert fds and scheduler.pending == 1


def test_the_fd_budget_counts_connections_in_flight_and_an_ack_makes_room(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(window=4, max_pending=64)
    (a,) = rig.add_workers(1)
    scheduler = rig.scheduler
    scheduler.limit_held(4)
    assert scheduler.room == 4
    fds = rig.submit(3, 1.0)
    assert scheduler.in_flight == 3 and scheduler.pending == 0
    assert scheduler.room == 1 and not scheduler.full  # in flight counts: they are the master's fds
    rig.submit(1, 1.0)
    assert scheduler.full
    rooms: list[int] = []
    scheduler.on_room = lambda: rooms.append(scheduler.room)
    first, _ = rig.handoffs(a)  # a hand-off per submit
    scheduler.on_ack(a, (first[0],), True)
    assert rooms == [1]  # a paused acceptor is told at once
    assert scheduler.room == 1 and not rig.client_sees_eof(fds[1])


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "refused"])
@pytest.mark.parametrize("bad", list(BAD_ACKS))
def test_a_bad_ack_over_the_channel_is_judged_by_the_scheduler_untouched(
    make_rig: Callable[..., Rig], bad: str, accepted: bool
) -> None:
    """The channel settles only good acks; anything else reaches ``on_ack`` as it came, disbelieved."""
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    fds = rig.submit(4, 1.0)
    (mine,) = rig.handoffs(a)
    (others,) = rig.handoffs(b)
    ids, fault = BAD_ACKS[bad](mine, others)
    rig.ends[a.key].send(protocol.encode_ack(ids, accepted))
    rig.run_until(lambda: bool(rig.faults))
    assert rig.events.acks == [(a, ids, accepted)] and rig.events.settled == []
    assert rig.faults == [(a, fault)]
    assert a.lane.in_flight == dict.fromkeys(mine, 1.0) and b.lane.in_flight == dict.fromkeys(others, 1.0)
    assert all(is_open(fd) and not rig.client_sees_eof(fd) for fd in fds)
    assert (scheduler.in_flight, scheduler.acked, scheduler.refused) == (4, 0, 0)


def test_a_refusal_over_the_channel_goes_to_another_worker(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    rig.submit(2, 1.0)
    (mine,) = rig.handoffs(a)
    rig.handoffs(b)
    rig.ends[a.key].send(protocol.encode_ack(mine, False))
    rig.run_until(lambda: bool(rig.refusals))
    assert rig.events.acks == [(a, mine, False)] and rig.events.settled == []
    assert rig.handoffs(b) == [mine]  # the refused one, to the other worker
    assert rig.faults == [] and rig.scheduler.refused == 1


def test_a_deal_cut_short_by_an_error_loses_nothing(make_rig: Callable[..., Rig],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory part-way through a deal: what went is counted, the rest goes by the usual path."""
    rig = make_rig(window=4)
    a, b = rig.add_workers(2)
    scheduler = rig.scheduler
    real = scheduler_module.send_dealt

    def first_group_then_fail(groups: list[tuple[int, list[int]]], *args: object) -> object:
        real(groups[:1], *args)  # type: ignore[arg-type]
        raise MemoryError

    monkeypatch.setattr(scheduler_module, "send_dealt", first_group_then_fail)
    with pytest.raises(MemoryError):
        rig.submit(4, 1.0)
    fds = list(rig.client_of)
    assert rig.handoffs(a) == [tuple(fds[0::2])]  # the group that went
    assert rig.handoffs(b) == [tuple(fds[1::2])]  # the other, sent again by flush
    assert a.lane.in_flight.keys() | b.lane.in_flight.keys() == set(fds)
    assert (scheduler.in_flight, scheduler.handed_off, a.lane.handed_off, b.lane.handed_off) == (4, 4, 2, 2)
    assert rig.faults == [] and scheduler.pending == 0
