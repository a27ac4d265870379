"""The hand-off's system-call loops, compiled and pure-Python, on real sockets: the same results, no leaks."""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import hotpath, protocol
from shared.channel import socketpair
from tests.helpers import is_open

#: (name, accept_fds, send_handoff): every implementation this machine has.
IMPLEMENTATIONS = [("python", hotpath.py_accept_fds, hotpath.py_send_handoff)]
try:
    from shared import _hotpath
except ImportError:  # test_compiled_is_built says so
    pass
else:
    IMPLEMENTATIONS.append(("compiled", _hotpath.accept_fds, _hotpath.send_handoff))

_ANC = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=IMPLEMENTATIONS, ids=[name for name, _, _ in IMPLEMENTATIONS])
def impl(request: pytest.FixtureRequest) -> Iterator[tuple[hotpath.AcceptFds, hotpath.SendHandoff]]:
    before = open_fds()
    _, accept_fds, send_handoff = request.param
    yield accept_fds, send_handoff
    assert open_fds() == before, "fds leaked"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    yield sock
    sock.close()


@contextlib.contextmanager
def connected(listener: socket.socket, count: int) -> Iterator[list[socket.socket]]:
    """``count`` clients connected to ``listener`` (in its backlog), closed after the block."""
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(protocol.MAX_MESSAGE_BYTES, _ANC)
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.extend(array.array("i", payload))
    return data, fds


@pytest.mark.skipif(os.environ.get(hotpath.PURE_PYTHON_ENV) == "1", reason="pure Python asked for")
def test_compiled_is_built() -> None:
    # The install builds it (make setup installs the compiler it needs); without it every
    # hand-off takes the slower pure-Python path.
    assert hotpath.COMPILED, hotpath.describe()
    assert any(name == "compiled" for name, _, _ in IMPLEMENTATIONS)


def test_pure_python_on_request() -> None:
    code = "from shared import hotpath; print(hotpath.COMPILED, hotpath.describe())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, hotpath.PURE_PYTHON_ENV: "1"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split()[0] == "False" and "DISPATCHER_PURE_PYTHON=1" in out


def test_accepts_the_backlog_then_eagain(impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff],
                                         listener: socket.socket) -> None:
    accept_fds, _ = impl
    with connected(listener, 5) as clients:
        fds, error = accept_fds(listener, 64)
        assert error == errno.EAGAIN
        assert len(fds) == 5
        for fd in fds:
            # Close-on-exec, and a connected stream socket whose peer is one of the clients.
            assert os.get_inheritable(fd) is False
            with socket.socket(fileno=os.dup(fd)) as sock:
                assert sock.type == socket.SOCK_STREAM
                assert sock.getpeername() in {c.getsockname() for c in clients}
            os.close(fd)
        assert accept_fds(listener, 64) == ([], errno.EAGAIN)


def test_stops_at_the_limit(impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff],
                            listener: socket.socket) -> None:
    accept_fds, _ = impl
    with connected(listener, 3):
        first, error = accept_fds(listener, 2)
        assert (len(first), error) == (2, 0)
        rest, error = accept_fds(listener, 2)
        assert (len(rest), error) == (1, errno.EAGAIN)
        assert accept_fds(listener, 0) == ([], 0)
        for fd in first + rest:
            os.close(fd)


def test_errors_come_back_as_errno(impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff]) -> None:
    accept_fds, _ = impl
    with socket.socket() as not_listening:
        not_listening.setblocking(False)
        assert accept_fds(not_listening, 4) == ([], errno.EINVAL)


@settings(max_examples=12, deadline=None)
@given(count=st.integers(1, protocol.MAX_FDS))
def test_send_handoff_matches_the_protocol(count: int) -> None:
    before = open_fds()
    for _, _, send_handoff in IMPLEMENTATIONS:
        master, worker = socketpair()
        with master, worker:
            master.setblocking(False)
            sent = [os.dup(master.fileno()) for _ in range(count)]
            try:
                send_handoff(master, sent)
                data, received = receive(worker)
                assert data == protocol.encode_handoff(sent)
                assert protocol.decode_handoff(data) == tuple(sent)
                # The worker got copies of the very same files; the sender kept its own.
                assert [os.fstat(fd).st_ino for fd in received] == [os.fstat(fd).st_ino for fd in sent]
                for fd in received:
                    os.close(fd)
            finally:
                for fd in sent:
                    os.close(fd)
    assert open_fds() == before


@pytest.mark.parametrize("fds", [[], list(range(3, 3 + protocol.MAX_FDS + 1)), [-1], [2**31], [2**32],
                                 ["3"], [3.0]])
def test_send_handoff_refuses_what_the_protocol_cannot_carry(
        impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff], fds: list[int]) -> None:
    _, send_handoff = impl
    master, worker = socketpair()
    with master, worker:
        with pytest.raises(ValueError):
            send_handoff(master, fds)
        worker.setblocking(False)
        with pytest.raises(BlockingIOError):
            worker.recv(16)  # nothing went


def test_send_handoff_full_and_gone(impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff]) -> None:
    _, send_handoff = impl
    master, worker = socketpair()
    with master:
        master.setblocking(False)
        fd = os.dup(master.fileno())
        try:
            with pytest.raises(BlockingIOError):
                for _ in range(100_000):
                    send_handoff(master, [fd])
            worker.close()  # the queued copies are closed by the kernel with it
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                send_handoff(master, [fd])
        finally:
            os.close(fd)
            worker.close()


def test_a_closed_socket_is_ebadf(impl: tuple[hotpath.AcceptFds, hotpath.SendHandoff]) -> None:
    accept_fds, send_handoff = impl
    closed = socket.socket()
    closed.close()
    assert accept_fds(closed, 4) == ([], errno.EBADF)
    master, worker = socketpair()
    with worker:
        fd = os.dup(worker.fileno())
        master.close()
        try:
            with pytest.raises(OSError) as raised:
                send_handoff(master, [fd])
            assert raised.value.errno == errno.EBADF
        finally:
            os.close(fd)


def test_the_scheduler_and_the_master_on_the_pure_python_path() -> None:
    # The fallback is what runs without a compiler: the scheduler's and the
    # round-robin tests pass on it too.
    env = {**os.environ, hotpath.PURE_PYTHON_ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scheduler.py",
         "tests/test_roundrobin_integration.py",
         "-k", "test_scheduler or one_handoff_per_worker or burst_dealt"],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_takes_a_bare_fd_too() -> None:
    if not hotpath.COMPILED:
        pytest.skip("compiled hand-off not built")
    master, worker = socketpair()
    with master, worker:
        fd = os.dup(worker.fileno())
        try:
            _hotpath.send_handoff(master.fileno(), [fd])
            data, received = receive(worker)
            assert data == protocol.encode_handoff([fd]) and len(received) == 1
            os.close(received[0])
        finally:
            os.close(fd)


# Sending a whole deal, and settling acks

#: (name, send_dealt, read_ack): every implementation this machine has.
DEAL_AND_ACK: list[tuple[str, hotpath.SendDealt, hotpath.ReadAckFunction]] = [
    ("python", hotpath.py_send_dealt, hotpath.py_read_ack)]
if hotpath.COMPILED:
    DEAL_AND_ACK.append(("compiled", _hotpath.send_dealt, _hotpath.read_ack))

_BUF = protocol.MAX_MESSAGE_BYTES + 1


DealAndAck = tuple[hotpath.SendDealt, hotpath.ReadAckFunction]


@pytest.fixture(params=DEAL_AND_ACK, ids=[name for name, _, _ in DEAL_AND_ACK])
def deal_and_ack(request: pytest.FixtureRequest) -> Iterator[DealAndAck]:
    before = open_fds()
    _, send_dealt, read_ack = request.param
    yield send_dealt, read_ack
    assert open_fds() == before, "fds leaked"


@contextlib.contextmanager
def channels(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``count`` (master end, worker end) pairs, non-blocking, closed after the block."""
    pairs = [socketpair() for _ in range(count)]
    for master, worker in pairs:
        master.setblocking(False)
        worker.setblocking(False)
    try:
        yield pairs
    finally:
        for master, worker in pairs:
            master.close()
            worker.close()


def test_send_dealt_sends_each_workers_group_in_chunks_and_marks_them_in_flight(
        deal_and_ack: DealAndAck) -> None:
    send_dealt, _ = deal_and_ack
    with channels(2) as ((m1, w1), (m2, w2)):
        first = [os.dup(m1.fileno()) for _ in range(20)]
        second = [os.dup(m1.fileno()) for _ in range(3)]
        flights: tuple[dict[int, float], dict[int, float]] = ({}, {})
        targets = {7: (m1, flights[0]), 9: (m2, flights[1])}
        received_all: list[int] = []
        try:
            assert send_dealt([(7, first), (9, second)], 2.5, targets, 16) == [(20, 2, 0), (3, 1, 0)]
            assert flights == (dict.fromkeys(first, 2.5), dict.fromkeys(second, 2.5))
            for end, expected in ((w1, first[:16]), (w1, first[16:]), (w2, second)):
                data, received = receive(end)
                received_all += received
                assert data == protocol.encode_handoff(expected)
                assert [os.fstat(fd).st_ino for fd in received] == [os.fstat(fd).st_ino for fd in expected]
        finally:
            for fd in received_all + first + second:
                os.close(fd)


def test_send_dealt_stops_a_worker_at_a_full_or_gone_channel_and_goes_on_with_the_others(
        deal_and_ack: DealAndAck) -> None:
    send_dealt, _ = deal_and_ack
    with channels(3) as ((full, _w1), (ok, ok_end), (gone, gone_end)):
        with contextlib.suppress(BlockingIOError):
            while True:
                full.send(b"\xf0")
        gone_end.close()
        fds = [os.dup(ok.fileno()) for _ in range(6)]
        flights: list[dict[int, float]] = [{}, {}, {}]
        targets = {1: (full, flights[0]), 2: (ok, flights[1]), 3: (gone, flights[2])}
        try:
            results = send_dealt([(1, fds[0:2]), (2, fds[2:4]), (3, fds[4:6])], 1.0, targets, 16)
            assert results[0] == (0, 0, errno.EAGAIN)
            assert results[1] == (2, 1, 0)
            assert results[2][:2] == (0, 0) and results[2][2] in (errno.EPIPE, errno.ECONNRESET)
            assert flights == [{}, dict.fromkeys(fds[2:4], 1.0), {}]
            _, received = receive(ok_end)
            for fd in received:
                os.close(fd)
            ok.close()  # a closed channel: EBADF, never another file's number
            assert send_dealt([(2, fds[:1])], 1.0, targets, 16) == [(0, 0, errno.EBADF)]
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("groups", [[(5, [3])], [(1, [-1])], [(1, ["3"])], [(1, [2**31])]],
                         ids=["no target", "negative", "not an int", "beyond an int"])
def test_send_dealt_refuses_a_bad_deal_before_sending_anything(
        deal_and_ack: DealAndAck, groups: list[tuple[int, list[int]]]
) -> None:
    send_dealt, _ = deal_and_ack
    with channels(1) as ((master, worker),):
        fd = os.dup(master.fileno())
        flight: dict[int, float] = {}
        try:
            with pytest.raises(ValueError):
                send_dealt([(1, [fd]), *groups], 1.0, {1: (master, flight)}, 16)
            assert flight == {}
            with pytest.raises(BlockingIOError):
                worker.recv(16)  # not even the good group went
        finally:
            os.close(fd)


def test_read_ack_settles_an_accepted_ack_of_connections_in_flight(
        deal_and_ack: DealAndAck) -> None:
    _, read_ack = deal_and_ack
    with channels(1) as ((master, worker),):
        mine = [os.dup(master.fileno()) for _ in range(3)]
        flight = dict.fromkeys(mine, 1.0)
        worker.send(protocol.encode_ack(mine[:2], True, 7))
        buf = bytearray(_BUF)
        assert read_ack(master, buf, _ANC, socket.MSG_CMSG_CLOEXEC, flight) == (2, 7)
        assert flight == {mine[2]: 1.0}
        assert not is_open(mine[0]) and not is_open(mine[1]) and is_open(mine[2])
        os.close(mine[2])
        with pytest.raises(BlockingIOError):
            read_ack(master, buf, _ANC, 0, flight)


ACKS_NOT_SETTLED = {
    "refused": lambda ids: protocol.encode_ack(ids, False),
    "not in flight": lambda ids: protocol.encode_ack((*ids, 999_999), True),
    "named twice": lambda ids: protocol.encode_ack((ids[0], ids[0]), True),
    "another message": lambda ids: protocol.encode(protocol.Pong(1, 0)),
    "empty": lambda ids: b"",
}


@pytest.mark.parametrize("kind", list(ACKS_NOT_SETTLED))
def test_read_ack_gives_back_anything_else_as_recvmsg_into_would_changing_nothing(
        deal_and_ack: DealAndAck, kind: str) -> None:
    _, read_ack = deal_and_ack
    with channels(1) as ((master, worker),):
        mine = [os.dup(master.fileno()) for _ in range(2)]
        flight = dict.fromkeys(mine, 1.0)
        data = ACKS_NOT_SETTLED[kind](tuple(mine))
        worker.send(data)
        buf = bytearray(_BUF)
        try:
            assert read_ack(master, buf, _ANC, 0, flight) == (len(data), [], 0)
            assert bytes(buf[:len(data)]) == data
            assert flight == dict.fromkeys(mine, 1.0) and all(is_open(fd) for fd in mine)
        finally:
            for fd in mine:
                os.close(fd)


def test_read_ack_gives_back_fds_and_truncation_for_the_caller(
        deal_and_ack: DealAndAck) -> None:
    _, read_ack = deal_and_ack
    with channels(1) as ((master, worker),):
        mine = os.dup(master.fileno())
        flight = {mine: 1.0}
        ack = protocol.encode_ack((mine,), True)
        # An ack that came with an fd is not settled: the fd is the caller's to close.
        worker.sendmsg((ack,), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [worker.fileno()])),))
        buf = bytearray(_BUF)
        n, ancdata, flags = read_ack(master, buf, _ANC, socket.MSG_CMSG_CLOEXEC, flight)
        assert n == len(ack) and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        ((level, kind, payload),) = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        (passed,) = array.array("i", payload)
        assert os.get_inheritable(passed) is False
        os.close(passed)
        # One too long for the buffer: truncated, left to the caller.
        worker.send(ack)
        small = bytearray(4)
        n, ancdata, flags = read_ack(master, small, _ANC, 0, flight)
        assert (n, ancdata) == (4, []) and flags & socket.MSG_TRUNC
        assert flight == {mine: 1.0} and is_open(mine)
        os.close(mine)
        worker.close()
        assert read_ack(master, buf, _ANC, 0, flight) == (0, [], 0)  # the end, as recvmsg_into reads it
        master.close()
        with pytest.raises(OSError) as raised:
            read_ack(master, buf, _ANC, 0, flight)
        assert raised.value.errno == errno.EBADF


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=1, max_size=40), in_flight_ids=st.sets(st.integers(0, 3), max_size=4))
def test_read_ack_both_ways_agree_on_any_datagram(data: bytes, in_flight_ids: set[int]) -> None:
    """Whatever a worker sends, both implementations settle the same or give back the same."""
    if not hotpath.COMPILED:
        pytest.skip("compiled hand-off not built")
    answers = []
    for read_ack in (hotpath.py_read_ack, _hotpath.read_ack):
        with channels(1) as ((master, worker),):
            # The ids a datagram may name: fds 0..3 of a table of our own, each a dup we may close.
            fds = [os.dup(master.fileno()) for _ in range(4)]
            ids = {i: fds[i] for i in in_flight_ids}
            rewritten = bytearray(data)
            if len(data) >= 10 and data[0] == protocol.MessageType.ACK:
                # Point an ack's ids at our fds (their low two bits choose which).
                for at in range(6, len(data) - 3, 4):
                    rewritten[at:at + 4] = fds[data[at + 3] % 4].to_bytes(4, "big")
            worker.send(bytes(rewritten))
            flight = {fd: 1.0 for fd in ids.values()}
            buf = bytearray(_BUF)
            got = read_ack(master, buf, _ANC, 0, flight)
            closed = [not is_open(fd) for fd in fds]
            answers.append((got if len(got) == 2 else (got[0], got[2], bytes(buf[:got[0]])),
                            sorted(fds.index(fd) for fd in flight), closed))
            for fd, gone in zip(fds, closed, strict=True):
                if not gone:
                    os.close(fd)
    assert answers[0] == answers[1]
