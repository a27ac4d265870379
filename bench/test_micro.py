"""Micro benchmarks of the master's per-connection hot path (``make bench``).

    .venv/bin/python -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' --benchmark-only

What one round-robin connection costs the master, piece by piece: encoding
the hand-off, decoding the ack (the fast path and the general decoder), the
SCM_RIGHTS round trip over a real SOCK_SEQPACKET socketpair, and the policy's
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

from dispatcher.policies.round_robin import RoundRobin
from shared import protocol
from shared.channel import close_fds, fds_from_ancillary
from shared.protocol import Ack, Handoff

pytestmark = pytest.mark.bench

#: A connection id (the master uses the fd number; any u64 encodes the same way).
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


def test_encode_handoff(benchmark: BenchmarkFixture) -> None:
    data = benchmark(protocol.encode_handoff, CONN_ID)
    assert protocol.decode(data) == Handoff(CONN_ID)


def test_encode_handoff_general(benchmark: BenchmarkFixture) -> None:
    """The general encoder, for comparison with ``encode_handoff``."""
    data = benchmark(protocol.encode, Handoff(CONN_ID))
    assert data == protocol.encode_handoff(CONN_ID)


def test_decode_ack(benchmark: BenchmarkFixture) -> None:
    data = protocol.encode_ack(CONN_ID, True)
    assert benchmark(protocol.decode_ack, data) == (CONN_ID, True)


def test_decode_ack_general(benchmark: BenchmarkFixture) -> None:
    data = protocol.encode_ack(CONN_ID, True)
    assert benchmark(protocol.decode, data) == Ack(CONN_ID, True)


# One hand-off over a real socketpair


@pytest.fixture
def channel_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(master end, worker end) of a SOCK_SEQPACKET pair, blocking, closed afterwards."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with master, worker:
        yield master, worker


def test_handoff_round_trip(
    benchmark: BenchmarkFixture,
    no_fd_leak: None,
    channel_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Master sends a hand-off with an fd, worker takes it, closes its copy and acks, master reads the ack.

    Both ends are blocking but never wait: a SEQPACKET send lands in the
    peer's queue before it returns. The worker side does what
    ``shared.channel`` does; the master side reads into a buffer as its
    channel does and decodes with ``decode_ack``.
    """
    master, worker = channel_pair
    # The "accepted connection": one end of a stream pair, a dup so the test
    # owns a socket fd that nothing else uses.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = left.dup()
    left.close()
    handoff_anc = (
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, conn.fileno().to_bytes(_FD_SIZE, "little", signed=True)),
    )
    buf = bytearray(protocol.MAX_MESSAGE_BYTES + 1)
    view = memoryview(buf)
    received: list[int] = []

    def round_trip() -> tuple[int, bool] | None:
        # Master: hand off.
        master.sendmsg((protocol.encode_handoff(CONN_ID),), handoff_anc)
        # Worker: take it (its own copy of the fd), close that copy, ack.
        data, ancdata, flags, _ = worker.recvmsg(protocol.MAX_MESSAGE_BYTES + 1, _ANC_SIZE)
        fds, unexpected = fds_from_ancillary(ancdata)
        close_fds(fds)
        received.append(len(fds))
        message = protocol.decode(data)
        if unexpected or flags or not isinstance(message, Handoff):
            raise AssertionError(f"bad hand-off: {message!r}, flags {flags}, {len(fds)} fd(s)")
        worker.send(protocol.encode_ack(message.conn_id, True))
        # Master: read the ack.
        n, _, _, _ = master.recvmsg_into((view,), _ANC_SIZE)
        return protocol.decode_ack(bytes(buf[:n]))

    try:
        assert benchmark(round_trip) == (CONN_ID, True)
    finally:
        view.release()
        conn.close()
        right.close()
    assert received and all(n == 1 for n in received)


# The policy


def test_round_robin_choose_ack(benchmark: BenchmarkFixture) -> None:
    """One connection's bookkeeping in the default policy: choose a worker, then its ack."""
    policy = RoundRobin(window=1)
    for key in (1, 2):
        policy.attach(key)
    chosen: list[int] = []

    def step() -> None:
        key = policy.choose()
        assert key is not None
        policy.ack(key, True)
        chosen.append(key)

    benchmark(step)
    assert set(chosen) == {1, 2}
    assert all(policy.in_flight(key) == 0 for key in (1, 2))
