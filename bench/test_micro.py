"""Micro benchmarks of the per-connection hot path: the master's, and the worker's socket objects.

``make bench`` runs them:

    .venv/bin/python -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' --benchmark-only

What one round-robin connection costs the master, piece by piece: encoding
the hand-off, decoding the ack (the fast path and the general decoder), the
SCM_RIGHTS round trip over a real SOCK_SEQPACKET socketpair (one connection
per hand-off, and four: the batch a busy master sends), and the policy's
choose + ack bookkeeping. The kernel's share (sendmsg, recvmsg, close) is in
the round trip only. Then a whole turn of the master's loop with the real
acceptor, scheduler and channels (accept, deal, send, read the acks, close the
copies), and the same turn as bare compiled calls: what the Python around
them costs. And on the worker's side, the socket object it makes for every
connection, standard and ``worker.sockets.Socket``.

``tests/test_bench_micro.py`` runs each once with timing off, so every one
also checks its result in ``make test``.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from dispatcher.acceptor import Acceptor
from dispatcher.config import Config
from dispatcher.listeners import Listener, open_listeners, parse_bind
from dispatcher.policies import round_robin
from dispatcher.policies.round_robin import PyRoundRobin, RoundRobin
from dispatcher.scheduler import HANDOFF_FDS, Scheduler
from dispatcher.worker_process import WorkerProcess
from shared import hotpath, protocol
from shared.channel import close_fds, fds_from_ancillary, socketpair
from shared.protocol import Ack, Handoff
from worker.sockets import Socket

pytestmark = pytest.mark.bench

#: A connection id (the master uses the fd number; any u32 encodes the same way).
CONN_ID = 1234
_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(protocol.MAX_FDS * _FD_SIZE)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves more fds open than it found."""
    before = _open_fds()
    yield
    after = _open_fds()
    assert after == before, f"{after - before} fd(s) leaked"


# Protocol

#: Connections per hand-off: one (light load) and a batch dealt in one turn of the master's loop.
BATCHES = [1, 4]


def _ids(batch: int) -> list[int]:
    return [CONN_ID + i for i in range(batch)]


@pytest.mark.parametrize("batch", BATCHES)
def test_encode_handoff(benchmark: BenchmarkFixture, batch: int) -> None:
    data = benchmark(protocol.encode_handoff, _ids(batch))
    assert protocol.decode(data) == Handoff(tuple(_ids(batch)))


def test_encode_handoff_general(benchmark: BenchmarkFixture) -> None:
    """The general encoder, for comparison with ``encode_handoff``."""
    data = benchmark(protocol.encode, Handoff((CONN_ID,)))
    assert data == protocol.encode_handoff([CONN_ID])


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_ack(benchmark: BenchmarkFixture, batch: int) -> None:
    data = protocol.encode_ack(_ids(batch), True)
    assert benchmark(protocol.decode_ack, data) == (tuple(_ids(batch)), True, 0)


def test_decode_ack_general(benchmark: BenchmarkFixture) -> None:
    data = protocol.encode_ack((CONN_ID,), True)
    assert benchmark(protocol.decode, data) == Ack((CONN_ID,), True)


# One hand-off over a real socketpair


@pytest.fixture
def channel_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(master end, worker end) of a SOCK_SEQPACKET pair, blocking, closed afterwards."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with master, worker:
        yield master, worker


@pytest.mark.parametrize("batch", BATCHES)
def test_handoff_round_trip(
    benchmark: BenchmarkFixture,
    no_fd_leak: None,
    channel_pair: tuple[socket.socket, socket.socket],
    batch: int,
) -> None:
    """One hand-off of ``batch`` fds: the worker takes them, closes them and acks; the master reads the ack.

    Divide by ``batch`` for the cost per connection. Both ends are blocking
    but never wait: a SEQPACKET send lands in the peer's queue before it
    returns. The worker side does what ``shared.channel`` does; the master
    side reads into a buffer as its channel does and decodes with
    ``decode_ack``.
    """
    master, worker = channel_pair
    # The "accepted connections": ends of stream pairs, dups so the test owns
    # socket fds that nothing else uses.
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(batch)]
    conns = [left.dup() for left, _ in pairs]
    for left, _ in pairs:
        left.close()
    fds = [conn.fileno() for conn in conns]
    buf = bytearray(protocol.MAX_MESSAGE_BYTES + 1)
    view = memoryview(buf)
    received: list[int] = []

    def round_trip() -> tuple[tuple[int, ...], bool, int] | None:
        # Master: hand off.
        master.sendmsg(
            (protocol.encode_handoff(fds),), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)),)
        )
        # Worker: take them (its own copies of the fds), close those copies, ack.
        data, ancdata, flags, _ = worker.recvmsg(protocol.MAX_MESSAGE_BYTES + 1, _ANC_SIZE)
        got, unexpected = fds_from_ancillary(ancdata)
        close_fds(got)
        received.append(len(got))
        conn_ids = protocol.decode_handoff(data)
        if unexpected or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or conn_ids is None:
            raise AssertionError(f"bad hand-off: {data!r}, flags {flags}, {len(got)} fd(s)")
        worker.send(protocol.encode_ack(conn_ids, True, len(conn_ids)))
        # Master: read the ack.
        n, _, _, _ = master.recvmsg_into((view,), _ANC_SIZE)
        return protocol.decode_ack(buf, n)

    try:
        assert benchmark(round_trip) == (tuple(fds), True, batch)
    finally:
        view.release()
        for conn in conns:
            conn.close()
        for _, right in pairs:
            right.close()
    assert received and all(n == batch for n in received)


# The compiled hand-off against the pure-Python one (shared.hotpath)

HOTPATHS: list[tuple[str, hotpath.AcceptFds, hotpath.SendHandoff]] = [
    ("python", hotpath.py_accept_fds, hotpath.py_send_handoff)
]
if hotpath.COMPILED:
    HOTPATHS.append(("compiled", hotpath.accept_fds, hotpath.send_handoff))
#: Connections per accept batch and per hand-off: what a busy master takes in one turn.
HOT_BATCH = 16


@pytest.mark.parametrize("impl", HOTPATHS, ids=[name for name, _, _ in HOTPATHS])
def test_accept_batch(benchmark: BenchmarkFixture, no_fd_leak: None,
                      impl: tuple[str, hotpath.AcceptFds, hotpath.SendHandoff]) -> None:
    """Accept a backlog of ``HOT_BATCH`` connections as bare fds, up to EAGAIN (divide by 16 per connection).

    The clients connect before each round (not timed) and every fd is closed
    after it; what is timed is the accept loop alone, kernel included.
    """
    _, accept_fds, _ = impl
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(HOT_BATCH * 2)
    listener.setblocking(False)
    clients: list[socket.socket] = []
    taken: list[int] = []

    def setup() -> tuple[tuple[socket.socket, int], dict[str, object]]:
        for client in clients:
            client.close()
        close_fds(taken)
        clients[:] = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(HOT_BATCH)]
        taken.clear()
        return (listener, HOT_BATCH * 2), {}

    def accept(sock: socket.socket, limit: int) -> None:
        fds, error = accept_fds(sock, limit)
        taken.extend(fds)
        assert (len(fds), error) == (HOT_BATCH, errno.EAGAIN)

    try:
        benchmark.pedantic(accept, setup=setup, rounds=200)  # type: ignore[no-untyped-call]
    finally:
        for client in clients:
            client.close()
        close_fds(taken)
        listener.close()


@pytest.mark.parametrize("impl", HOTPATHS, ids=[name for name, _, _ in HOTPATHS])
def test_send_handoff(benchmark: BenchmarkFixture, no_fd_leak: None,
                      channel_pair: tuple[socket.socket, socket.socket],
                      impl: tuple[str, hotpath.AcceptFds, hotpath.SendHandoff]) -> None:
    """Send one hand-off of ``HOT_BATCH`` fds; the worker end reads it and closes its copies (both timed)."""
    _, _, send_handoff = impl
    master, worker = channel_pair
    fds = [os.dup(master.fileno()) for _ in range(HOT_BATCH)]

    def send() -> int:
        send_handoff(master, fds)
        _, ancdata, _, _ = worker.recvmsg(protocol.MAX_MESSAGE_BYTES + 1, _ANC_SIZE)
        got, _ = fds_from_ancillary(ancdata)
        close_fds(got)
        return len(got)

    try:
        assert benchmark(send) == HOT_BATCH
    finally:
        close_fds(fds)


# The policy


#: Both round-robins: the pure-Python reference and the compiled one the master uses.
POLICIES = [("python", PyRoundRobin)] + ([("compiled", RoundRobin)] if round_robin.COMPILED else [])


@pytest.mark.parametrize("workers", [2, 8])
@pytest.mark.parametrize("make", [cls for _, cls in POLICIES], ids=[name for name, _ in POLICIES])
def test_round_robin_choose_ack(benchmark: BenchmarkFixture, workers: int,
                                make: Callable[[int], RoundRobin]) -> None:
    """One connection's bookkeeping in the default policy: choose a worker, then its ack with its load.

    The default window (64), so every worker is free and ``choose`` weighs them all.
    """
    policy = make(Config.window)
    keys = range(1, workers + 1)
    for key in keys:
        policy.attach(key)
    chosen: list[int] = []

    def step() -> None:
        key = policy.choose()
        assert key is not None
        policy.report(key, 1)
        policy.ack(key, True)
        chosen.append(key)

    benchmark(step)
    # In turn, each once the line has gone round (a run with the benchmark off calls it once).
    assert set(chosen) == set(list(keys)[:len(chosen)])
    assert all(policy.in_flight(key) == 0 for key in keys)  # every slot free again


@pytest.mark.parametrize("make", [cls for _, cls in POLICIES], ids=[name for name, _ in POLICIES])
def test_round_robin_deal(benchmark: BenchmarkFixture, make: Callable[[int], RoundRobin]) -> None:
    """A batch of ``HOT_BATCH`` accepted connections dealt to 2 workers, then acked (a turn's bookkeeping)."""
    policy = make(Config.window)
    for key in (1, 2):
        policy.attach(key)
    batch = list(range(HOT_BATCH))

    def turn() -> int:
        groups, dealt = policy.deal(batch)
        for key, conns in groups:
            policy.ack(key, True, len(conns))
        return dealt

    assert benchmark(turn) == HOT_BATCH
    assert policy.in_flight(1) == policy.in_flight(2) == 0


# The worker's side: a socket object for each connection

def _standard_socket(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)


#: How a worker made a connection's socket object before ``worker.sockets``, and how it does now.
SOCKET_MAKERS = [("standard", _standard_socket), ("worker", Socket.from_handoff)]


@pytest.mark.parametrize("make", [make for _, make in SOCKET_MAKERS], ids=[name for name, _ in SOCKET_MAKERS])
def test_socket_for_a_connection(benchmark: BenchmarkFixture, no_fd_leak: None,
                                 make: Callable[[int], socket.socket]) -> None:
    """Making the object for a handed-off fd and asking it what the event loop asks (type, family twice)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=5.0):
        server, _ = listener.accept()
        with server:
            fd = server.fileno()

            def wrap() -> tuple[int, int]:
                sock = make(fd)
                try:
                    return sock.type, sock.family if sock.family == socket.AF_INET else 0
                finally:
                    sock.detach()  # the fd stays server's

            assert benchmark(wrap) == (socket.SOCK_STREAM, socket.AF_INET)


# A whole turn of the master's loop, with the real acceptor, scheduler and channels

class _Events:
    """A master's ``WorkerEvents`` that only records: in a turn, a worker has nothing to tell."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def on_message(self, worker: WorkerProcess, message: protocol.Message, fds: list[int]) -> None:
        close_fds(fds)
        self.told.append(f"{worker}: {message}")

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        self.told.append(f"{worker}: channel closed, {reason}")

    def on_exit(self, worker: WorkerProcess) -> None:
        self.told.append(f"{worker}: exited")

    def on_fault(self, worker: WorkerProcess, reason: str) -> None:
        self.told.append(f"{worker}: fault, {reason}")

    def on_refusal(self, worker: WorkerProcess) -> None:
        self.told.append(f"{worker}: refused")

    def on_max_requests(self, worker: WorkerProcess) -> None:
        self.told.append(f"{worker}: max requests")


def _master_turn(acceptor: Acceptor, listener: Listener, workers: list[WorkerProcess]) -> None:
    """What the master does in one turn of its loop: a batch accepted and dealt, each worker's ack read."""
    acceptor._accept_batch(listener, ACCEPT_LIMIT)
    for worker in workers:
        worker.channel._on_readable()


def _its_system_calls(acceptor: Acceptor, listener: Listener, workers: list[WorkerProcess]) -> None:
    """The same turn as bare compiled calls, no Python around them (the scheduler's counts are not kept)."""
    scheduler = acceptor._scheduler
    policy = scheduler._policy
    fds, _ = hotpath.accept_fds(listener.sock, ACCEPT_LIMIT)
    groups, _ = policy.deal(fds)
    hotpath.send_dealt(groups, 0.0, scheduler._targets, HANDOFF_FDS)
    for worker in workers:
        channel = worker.channel
        try:
            got = hotpath.read_ack(channel.sock, channel._buf, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC,
                                    worker.lane.in_flight)
        except BlockingIOError:
            continue
        assert len(got) == 2, f"not settled: {got!r}"
        policy.ack(worker.key, True, got[0])


#: The most a turn accepts (the acceptor's bound per wake-up).
ACCEPT_LIMIT = 64
#: Connections per turn: W1's few (16 clients, a slow handler) and W0's about eight.
TURN_BATCHES = [2, 8]
TURNS = [("whole", _master_turn), ("system-calls", _its_system_calls)]
#: Bound on the idle processes that stand in for the workers.
IDLE_S = 60


@pytest.mark.parametrize("batch", TURN_BATCHES)
@pytest.mark.parametrize("turn", [turn for _, turn in TURNS], ids=[name for name, _ in TURNS])
def test_master_turn(benchmark: BenchmarkFixture, no_fd_leak: None, batch: int,
                     turn: Callable[[Acceptor, Listener, list[WorkerProcess]], None]) -> None:
    """One turn of the master's loop for ``batch`` new connections, 2 workers (divide by ``batch``).

    Timed: accepting the batch, dealing and sending it (``Acceptor``,
    ``Scheduler``, the compiled hand-off and policy, where built), then
    reading each worker's ack of the turn before and closing the master's
    copies (each ``WorkerProcess``'s channel, wired as the master wires it;
    the processes only sleep). Not timed, between turns: the workers' side,
    done here as a streams worker does it (take the fds, send the FIN, close,
    ack), and the clients, which close once answered, as wrk's do, and
    connect again. So the master's close is the last one and frees the
    socket, as under load. ``system-calls`` is the same turn made of the bare
    compiled calls: the difference is the Python around them. What it leaves
    out of a real turn: the event loop's wait and wake-up.
    """
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(RoundRobin(Config.window), Config.max_pending, 10.0)
    (listener,) = open_listeners([parse_bind("127.0.0.1:0")], 128)
    acceptor = Acceptor(loop, [listener], scheduler)
    events = _Events()
    ends: list[socket.socket] = []
    workers: list[WorkerProcess] = []
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[socket.socket] = []
    address = listener.sock.getsockname()
    taken = turns = 0

    def between_turns(connect: bool = True) -> tuple[tuple[Acceptor, Listener, list[WorkerProcess]],
                                                     dict[str, object]]:
        nonlocal taken, turns
        for worker, end in zip(workers, ends, strict=True):
            if not worker.lane.in_flight:
                continue
            _, ancdata, _, _ = end.recvmsg(protocol.MAX_MESSAGE_BYTES + 1, _ANC_SIZE)
            fds, _ = fds_from_ancillary(ancdata)
            taken += len(fds)
            for fd in fds:
                with socket.socket(fileno=fd) as conn:
                    conn.shutdown(socket.SHUT_WR)
            end.send(protocol.encode_ack(tuple(worker.lane.in_flight), True, 0))
        for client in clients:
            client.close()
        clients[:] = [socket.create_connection(address, timeout=5.0) for _ in range(batch)] if connect else []
        turns += connect
        return (acceptor, listener, workers), {}

    try:
        for key in (1, 2):
            proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({IDLE_S})"])
            procs.append(proc)
            master_end, worker_end = socketpair()
            ends.append(worker_end)
            workers.append(WorkerProcess(key, key, proc, os.pidfd_open(proc.pid), master_end, loop, events,
                                         scheduler.on_ack, on_acked=scheduler.on_acked))
            scheduler.attach(workers[-1])
        benchmark.pedantic(turn, setup=between_turns, rounds=300, warmup_rounds=5)  # type: ignore[no-untyped-call]
        between_turns(connect=False)  # the last turn's acks
        for worker in workers:
            worker.channel._on_readable()
    finally:
        for worker in workers:
            close_fds(list(worker.lane.in_flight))
            worker.channel.close()
            os.close(worker.pidfd)
        for proc in procs:
            proc.kill()
            proc.wait(timeout=5.0)
        for end in ends:
            end.close()
        scheduler.close_pending()
        listener.sock.close()
        loop.close()
    assert not events.told, events.told
    # Every turn took a whole batch, and the workers got every connection of it.
    assert turns and taken == turns * batch
