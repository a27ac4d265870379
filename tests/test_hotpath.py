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
