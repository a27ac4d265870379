"""The worker's accept loop on real listening sockets: which errors pause it and which it skips.

The kernel rarely produces ECONNABORTED or EMFILE on demand, so a real
listener is wrapped to raise a given error before it accepts for real.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared import syn_filter
from shared.accept_errors import OverloadEpisode
from worker.acceptor import Acceptor


class Failing:
    """A real listening socket whose first ``times`` accepts raise ``OSError(code)``."""

    def __init__(self, code: int, times: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.code = code
        self.left = times
        #: When each accept was tried (monotonic clock).
        self.calls: list[float] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls.append(time.monotonic())
        if self.left:
            self.left -= 1
            raise OSError(self.code, os.strerror(self.code))
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def accept_one(loop: asyncio.AbstractEventLoop, listener: Failing, pause_s: float,
               clean_s: float = 5.0) -> Acceptor:
    """Connect a client to ``listener`` and wait until an acceptor on it passes the connection on."""
    got: list[socket.socket] = []
    acceptor = Acceptor(loop, got.append, overload_pause_s=pause_s)
    acceptor.overload.clean_s = clean_s
    with socket.create_connection(listener.sock.getsockname(), timeout=10):
        acceptor.add(listener)

        async def accepted() -> None:
            while not got:
                await asyncio.sleep(0)  # let the loop's reader callbacks run

        try:
            loop.run_until_complete(asyncio.wait_for(accepted(), 10))
        finally:
            for sock in got:
                sock.close()
    assert len(got) == 1
    return acceptor


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM],
                         ids=errno.errorcode.get)
def test_an_error_of_one_client_is_skipped_without_pausing(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """That client is gone; the next connection is accepted in the same wake-up, as the master does."""
    before = open_fds()
    listener = Failing(code, times=1)
    # A pause would outlast the wait: only no pause at all passes.
    acceptor = accept_one(loop, listener, pause_s=3600)
    assert len(listener.calls) >= 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    acceptor.close()
    assert open_fds() == before


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM],
                         ids=errno.errorcode.get)
def test_an_overload_pauses_accepting_with_one_log_line_per_episode(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """Out of a resource, accepting again at once would spin: each retry waits the pause out."""
    caplog.set_level(logging.INFO, logger="worker.acceptor")
    before = open_fds()
    listener = Failing(code, times=3)
    pause_s = 0.05
    acceptor = accept_one(loop, listener, pause_s, clean_s=0.2)
    # Three failures, then the connection: each try after a failure came a
    # pause later (less a margin: a loop may run a timer a clock tick early).
    tries = listener.calls[:4]
    assert all(later - earlier >= pause_s - 1e-3 for earlier, later in itertools.pairwise(tries))

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "worker.acceptor"]

    assert len(lines()) == 1, lines()  # accepting again is no end yet: it must run clean a while
    assert lines()[0].startswith(f"accept failed: {os.strerror(code)}")

    async def summarised() -> None:
        while len(lines()) < 2:
            await asyncio.sleep(0.01)

    loop.run_until_complete(asyncio.wait_for(summarised(), 10))
    assert len(lines()) == 2
    assert re.fullmatch(rf"accepting ran clean for 0.2 s: accepts paused 3 time\(s\) over 0\.\d s "
                        rf"\({re.escape(os.strerror(code))}\)", lines()[1]), lines()[1]
    acceptor.close()
    assert open_fds() == before


def test_an_overload_pauses_every_listener(loop: asyncio.AbstractEventLoop) -> None:
    """Out of fds is out of fds on every listener: none of them is retried before the pause ends."""
    before = open_fds()
    failing, other = Failing(errno.EMFILE, times=1), Failing(errno.EMFILE, times=0)
    pause_s = 0.2
    got: list[socket.socket] = []
    acceptor = Acceptor(loop, got.append, overload_pause_s=pause_s)
    acceptor.add(failing)
    acceptor.add(other)

    async def until(predicate: Callable[[], object]) -> None:
        while not predicate():
            await asyncio.sleep(0)  # let the loop's reader callbacks run

    with socket.create_connection(failing.sock.getsockname(), timeout=10):
        loop.run_until_complete(asyncio.wait_for(until(lambda: failing.calls), 10))
    # The other listener's client arrives once the pause has begun.
    with socket.create_connection(other.sock.getsockname(), timeout=10):
        loop.run_until_complete(asyncio.wait_for(until(lambda: len(got) == 2), 10))
    assert other.calls[0] - failing.calls[0] >= pause_s - 1e-3
    for sock in got:
        sock.close()
    acceptor.close()
    assert open_fds() == before


def test_a_listener_given_after_draining_began_is_closed_at_once(loop: asyncio.AbstractEventLoop) -> None:
    accepted: list[socket.socket] = []
    acceptor = Acceptor(loop, accepted.append)
    before = open_fds()
    acceptor.close()  # the worker began draining
    late = socket.create_server(("127.0.0.1", 0))
    late.setblocking(False)
    acceptor.add(late)  # a Listen that crossed the Drain
    assert late.fileno() == -1 and open_fds() == before
    assert acceptor.accepted == 0 and accepted == []


def test_an_overload_that_comes_and_goes_is_one_episode_with_one_summary(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture,
) -> None:
    """Failing, accepting, failing again (the master at its fd limit): two lines, not two per retry."""
    caplog.set_level(logging.INFO, logger="test.episode")
    episode = OverloadEpisode(logging.getLogger("test.episode"), loop, pause_s=0.01, clean_s=0.2)
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def flapping() -> None:
        for _ in range(10):
            episode.paused(emfile)
            await asyncio.sleep(0.02)  # a pause, then a clean accept or two
        while episode.active:
            await asyncio.sleep(0.01)

    loop.run_until_complete(asyncio.wait_for(flapping(), 10))
    lines = [r.getMessage() for r in caplog.records if r.name == "test.episode"]
    assert len(lines) == 2, lines
    assert lines[0] == ("accept failed: Too many open files; "
                        "pausing accepts for 10 ms at a time until it passes")
    assert lines[1].startswith("accepting ran clean for 0.2 s: accepts paused 10 time(s) over 0.")


def queue_one(sock: socket.socket) -> socket.socket:
    """A client whose connection waits in ``sock``'s queue, its line sent."""
    client = socket.create_connection(sock.getsockname(), timeout=10)
    client.sendall(b"hi\n")
    return client


def test_draining_its_own_listener_takes_what_is_queued_then_closes_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """reuseport: the socket is this worker's alone; closing it would reset its queue."""
    own = socket.create_server(("127.0.0.1", 0))
    own.setblocking(False)
    address = own.getsockname()
    got: list[socket.socket] = []
    acceptor = Acceptor(loop, got.append, own_listeners=True)
    acceptor.add(own)
    with queue_one(own) as client:
        acceptor.drain()  # the loop never ran: the connection was still in the kernel's queue
        assert own.fileno() == -1 and acceptor.closed
        assert len(got) == 1 and acceptor.accepted == 1
        with got[0] as conn:
            conn.settimeout(10)
            assert conn.recv(10) == b"hi\n"
            conn.sendall(b"answer\n")
        assert client.recv(10) == b"answer\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=10).close()


def test_draining_a_shared_listener_the_master_closes_takes_what_is_queued(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """shared, on a stop: the master attached the stop filter to the socket every worker holds."""
    masters = socket.create_server(("127.0.0.1", 0))
    copy = masters.dup()
    copy.setblocking(False)
    got: list[socket.socket] = []
    acceptor = Acceptor(loop, got.append)
    acceptor.add(copy)
    with queue_one(masters):
        syn_filter.attach(masters.fileno())
        masters.close()  # the master closes its own copy first
        acceptor.drain()
        assert copy.fileno() == -1 and len(got) == 1
        got[0].close()


def test_draining_alone_leaves_a_shared_queue_to_the_others(loop: asyncio.AbstractEventLoop) -> None:
    """shared, a reload: no stop filter, so the worker only closes its copy; the master's keeps the queue."""
    masters = socket.create_server(("127.0.0.1", 0))
    copy = masters.dup()
    copy.setblocking(False)
    got: list[socket.socket] = []
    acceptor = Acceptor(loop, got.append)
    acceptor.add(copy)
    with queue_one(masters):
        acceptor.drain()
        assert copy.fileno() == -1 and got == []
        masters.settimeout(10)
        conn, _ = masters.accept()  # still queued, for another worker
        conn.close()
    masters.close()
