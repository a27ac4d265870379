"""The two distributions behind one interface, with real sockets, channels and (idle) processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from dispatcher.config import Config
from dispatcher.distribution import NAMES, Distribution, for_policy
from dispatcher.listeners import BindError, Listener, parse_bind
from dispatcher.master_accepts import MasterAccepts
from dispatcher.stats import DistributionFigures
from dispatcher.worker_process import WorkerProcess
from dispatcher.workers_accept import ReusePortAccept, SharedAccept
from shared import protocol
from shared.channel import close_fds, fds_from_ancillary, socketpair
from shared.protocol import Message

_ANC = socket.CMSG_SPACE(protocol.MAX_FDS * 4)


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class Events:
    """As the supervisor: a channel that fails takes its worker out of the distribution."""

    def __init__(self) -> None:
        self.faults: list[tuple[WorkerProcess, str]] = []
        self.distribution: Distribution | None = None

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None:
        close_fds(fds)

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        assert self.distribution is not None
        self.distribution.remove(worker)

    def on_exit(self, worker: WorkerProcess) -> None:
        pass

    def on_fault(self, worker: WorkerProcess, reason: str) -> None:
        self.faults.append((worker, reason))

    def on_refusal(self, worker: WorkerProcess) -> None:
        pass

    def on_max_requests(self, worker: WorkerProcess) -> None:
        pass


class Rig:
    """Workers that are real idle processes with real channels; the test holds each worker's end."""

    def __init__(self, distribution: Distribution) -> None:
        self.loop = asyncio.new_event_loop()
        self.distribution = distribution
        self.events = Events()
        self.events.distribution = distribution
        self.listeners: list[Listener] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[WorkerProcess] = []
        self.ends: list[socket.socket] = []

    def worker(self) -> WorkerProcess:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.procs.append(proc)
        master_end, worker_end = socketpair()
        worker_end.setblocking(False)
        self.ends.append(worker_end)
        worker = WorkerProcess(len(self.workers), 100 + len(self.workers), proc, os.pidfd_open(proc.pid),
                               master_end, self.loop, self.events, self.distribution.on_ack)
        self.workers.append(worker)
        return worker

    def received(self, worker: WorkerProcess) -> list[tuple[bytes, list[int]]]:
        """The datagrams waiting at ``worker``'s end, with their fds (the caller closes them)."""
        end = self.ends[self.workers.index(worker)]
        found = []
        with contextlib.suppress(BlockingIOError):
            while True:
                data, ancdata, _, _ = end.recvmsg(protocol.MAX_MESSAGE_BYTES, _ANC)
                found.append((data, fds_from_ancillary(ancdata)[0]))
        return found

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.channel.close()
                os.close(worker.pidfd)
            for end in self.ends:
                end.close()
            for listener in self.listeners:
                listener.close()
            self.distribution.close()
        finally:
            for proc in self.procs:
                proc.kill()
                proc.wait(10)
            self.loop.close()


@pytest.fixture
def make_rig() -> Iterator[type[Rig]]:
    before = open_fds()
    rigs: list[Rig] = []

    class Tracked(Rig):
        def __init__(self, distribution: Distribution) -> None:
            super().__init__(distribution)
            rigs.append(self)

    yield Tracked
    for rig in rigs:
        rig.close()
    assert open_fds() == before


def workers_accept(rig_class: type[Rig], policy: str, binds: int = 1) -> Rig:
    distribution = SharedAccept() if policy == "shared" else ReusePortAccept()
    rig = rig_class(distribution)
    rig.listeners = distribution.listen([parse_bind("127.0.0.1:0")] * binds, 16)
    # A reuseport worker's socket is its own: it closes it to new connections itself when it drains.
    expected = () if policy == "shared" else ("--own-listeners",)
    assert distribution.start(rig.loop, rig.listeners) == expected
    return rig


def test_the_policy_name_chooses_the_distribution_once() -> None:
    assert NAMES == ("round-robin", "shared", "reuseport")
    assert isinstance(for_policy(Config(app="a:b")), MasterAccepts)
    assert isinstance(for_policy(Config(app="a:b", policy="shared")), SharedAccept)
    assert isinstance(for_policy(Config(app="a:b", policy="reuseport")), ReusePortAccept)
    with pytest.raises(ValueError, match="unknown policy 'random'"):
        for_policy(Config(app="a:b", policy="random"))


@pytest.mark.parametrize("distribution", [MasterAccepts(Config(app="a:b")), SharedAccept()],
                         ids=["master-accepts", "workers-accept"])
def test_both_distributions_report_the_same_figures(distribution: Distribution) -> None:
    figures = distribution.figures()
    assert set(figures) == set(DistributionFigures.__annotations__)
    assert set(figures.values()) == {0}  # nothing counted before it starts


def test_shared_gives_each_ready_worker_a_copy_of_the_listening_socket(make_rig: type[Rig]) -> None:
    rig = workers_accept(make_rig, "shared")
    first, second = rig.worker(), rig.worker()
    rig.distribution.add(first)
    rig.distribution.add(second)
    for worker in (first, second):
        ((data, fds),) = rig.received(worker)
        try:
            assert protocol.decode(data) == protocol.Listen() and len(fds) == 1
            copy = os.fstat(fds[0])
            own = os.fstat(rig.listeners[0].sock.fileno())
            assert (copy.st_dev, copy.st_ino) == (own.st_dev, own.st_ino)  # the same socket
        finally:
            close_fds(fds)
    assert rig.distribution.remove(first) is False
    assert rig.distribution.remove(first) is False  # idempotent
    assert rig.distribution.remove(second) is True  # the last one


def test_reuseport_gives_each_worker_its_own_socket_on_the_port(make_rig: type[Rig]) -> None:
    rig = workers_accept(make_rig, "reuseport")
    own = rig.listeners[0].sock
    assert own.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0  # holds the port only
    worker = rig.worker()
    rig.distribution.add(worker)
    ((_, fds),) = rig.received(worker)
    with socket.socket(fileno=fds[0]) as sibling:
        assert sibling.getsockname() == own.getsockname()
        assert sibling.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sibling.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert os.fstat(sibling.fileno()).st_ino != os.fstat(own.fileno()).st_ino


def test_reuseport_refuses_unix_binds(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BindError, match="the reuseport policy needs TCP addresses"):
        ReusePortAccept().listen([parse_bind(f"unix:{tmp_path}/s.sock")], 16)


@pytest.mark.parametrize("policy", ["shared", "reuseport"])
def test_a_worker_given_no_socket_gets_none_and_nothing_leaks(make_rig: type[Rig], policy: str) -> None:
    rig = workers_accept(make_rig, policy, binds=2)
    rig.listeners[1].sock.close()  # the second copy cannot be made
    worker = rig.worker()
    with pytest.raises(OSError):
        rig.distribution.add(worker)
    assert rig.received(worker) == []  # the fixture checks the first copy was closed


def test_a_worker_whose_channel_fails_while_given_its_socket_is_not_counted(make_rig: type[Rig]) -> None:
    rig = workers_accept(make_rig, "shared")
    healthy, gone = rig.worker(), rig.worker()
    rig.distribution.add(healthy)
    rig.ends[1].close()  # gone's end: the Listen send fails, its channel closes at once
    rig.distribution.add(gone)
    assert gone.channel.closed
    assert rig.distribution.remove(healthy) is True  # it was the last one left
    for _, fds in rig.received(healthy):
        close_fds(fds)


def test_an_ack_from_a_worker_that_accepts_itself_is_a_fault(make_rig: type[Rig]) -> None:
    rig = workers_accept(make_rig, "shared")
    worker = rig.worker()
    rig.distribution.add(worker)
    for _, fds in rig.received(worker):
        close_fds(fds)
    rig.distribution.on_ack(worker, (7, 8), True, 0)
    assert rig.events.faults == [(worker, "ack for connection 7 it was not given")]
    assert rig.distribution.remove(worker) is True  # it was removed already


def test_workers_that_accept_themselves_leave_the_master_nothing_to_settle(make_rig: type[Rig]) -> None:
    rig = workers_accept(make_rig, "shared")
    worker = rig.worker()
    assert rig.distribution.forget(worker) == 0
    rig.distribution.stop(sweep=True)
    rig.loop.run_until_complete(asyncio.wait_for(rig.distribution.settle(), 1))
    assert rig.distribution.close() == 0
    assert set(rig.distribution.figures().values()) == {0}


def settle_while(rig: Rig, handoff: MasterAccepts, meanwhile: Callable[[], None]) -> None:
    """Run ``handoff.settle()`` and, once it waits, ``meanwhile()``; settle must then return."""
    async def soon() -> None:
        await asyncio.sleep(0)
        meanwhile()

    async def both() -> None:
        await asyncio.gather(asyncio.wait_for(handoff.settle(), 5), soon())

    rig.loop.run_until_complete(both())


def one_handed_off(make_rig: type[Rig]) -> tuple[Rig, MasterAccepts, WorkerProcess, int, socket.socket]:
    """A hand-off distribution whose one worker holds one connection un-acked (fd, client's end)."""
    handoff = MasterAccepts(Config(app="a:b", window=1))
    rig = make_rig(handoff)
    worker = rig.worker()
    handoff.add(worker)
    server, client = socket.socketpair()
    fd = server.detach()
    handoff.scheduler.submit([fd], 0.0)
    assert handoff.figures()["in_flight"] == 1
    return rig, handoff, worker, fd, client


def test_handoff_settles_once_the_last_worker_refuses(make_rig: type[Rig]) -> None:
    rig, handoff, worker, fd, client = one_handed_off(make_rig)
    settle_while(rig, handoff, lambda: handoff.on_ack(worker, (fd,), False, 0))  # it began draining
    assert handoff.figures()["pending"] == 1  # nobody left to take it
    for _, fds in rig.received(worker):
        close_fds(fds)
    assert handoff.close() == 1
    client.close()


def test_handoff_settles_once_the_last_worker_is_gone(make_rig: type[Rig]) -> None:
    rig, handoff, worker, _, client = one_handed_off(make_rig)
    removed: list[bool] = []
    settle_while(rig, handoff, lambda: removed.append(handoff.remove(worker)))
    assert removed == [True]
    assert handoff.forget(worker) == 1  # back in the queue, first in line
    assert handoff.figures()["pending"] == 1
    for _, fds in rig.received(worker):
        close_fds(fds)
    assert handoff.close() == 1
    assert client.recv(1) == b""  # the master's copy was the last: closed
    client.close()
