"""Test-only helpers: waiting on another process's state, rewritable apps, clients held open, a full fd table.

The dispatcher under test and the load client are ``bench.server`` and
``bench.load``, which the benchmark lab uses too.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.server import HOST


def app_env(folder: Path) -> dict[str, str]:
    """Environment for a server whose app module is written into ``folder`` (and may be rewritten).

    Bytecode is not cached, so a rewrite of the same size in the same second is still seen.
    """
    return {"PYTHONPATH": f"{folder}:{os.environ.get('PYTHONPATH', '')}", "PYTHONDONTWRITEBYTECODE": "1"}


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """For state with no event to wait on (another process's /proc): check until true.

    Raises:
        TimeoutError: still false after ``timeout`` seconds; the message is ``what``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


@contextlib.contextmanager
def clients(port: int, count: int, line: bytes = b"hi\n") -> Iterator[list[socket.socket]]:
    """``count`` connections to 127.0.0.1:``port``, each sent ``line``, held open for the block."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((HOST, port), timeout=10))
            socks[-1].sendall(line)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def fd_table_full(room: int) -> Iterator[None]:
    """Within the block this process can open only ``room`` more fds (RLIMIT_NOFILE, restored after).

    Every free slot below the lowered limit, holes included, is taken by
    /dev/null, then ``room`` of them are given back.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8 + room, hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        for _ in range(room):
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def is_open(fd: int) -> bool:
    """Whether ``fd`` is an open file descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
