"""Micro benchmarks of the per-connection hot path: the master's, and the worker's socket objects.

``make bench`` runs them:

    .venv/bin/python -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' --benchmark-only

What one round-robin connection costs the master, piece by piece: encoding
the hand-off, decoding the ack (the fast path and the general decoder), the
SCM_RIGHTS round trip over a real SOCK_SEQPACKET socketpair (one connection
per hand-off, and four: the batch a busy master sends), and the policy's
choose + ack bookkeeping. The kernel's share (sendmsg, recvmsg, close) is in
the round trip only. And on the worker's side, the socket object it makes for
every connection, standard and ``worker.sockets.Socket``.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from dispatcher.config import Config
from dispatcher.policies import round_robin
from dispatcher.policies.round_robin import PyRoundRobin, RoundRobin
from shared import hotpath, protocol
from shared.channel import close_fds, fds_from_ancillary
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
    assert set(chosen) == set(keys)
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
