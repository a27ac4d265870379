"""Micro benchmarks of the master's per-connection hot path (``make bench``).

    .venv/bin/python -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' --benchmark-only

What one round-robin connection costs the master, piece by piece: encoding
the hand-off, decoding the ack (the fast path and the general decoder), the
SCM_RIGHTS round trip over a real SOCK_SEQPACKET socketpair (one connection
per hand-off, and four: the batch a busy master sends), and the policy's
choose + ack bookkeeping. The kernel's share (sendmsg, recvmsg, close) is in
the round trip only.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from dispatcher.config import Config
from dispatcher.policies.round_robin import RoundRobin
from shared import protocol
from shared.channel import close_fds, fds_from_ancillary
from shared.protocol import Ack, Handoff

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


# The policy


@pytest.mark.parametrize("workers", [2, 8])
def test_round_robin_choose_ack(benchmark: BenchmarkFixture, workers: int) -> None:
    """One connection's bookkeeping in the default policy: choose a worker, then its ack with its load.

    The default window (12), so every worker is free and ``choose`` weighs them all.
    """
    policy = RoundRobin(window=Config.window)
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
    assert all(policy._credit[key] == policy.window for key in keys)  # every slot free again
