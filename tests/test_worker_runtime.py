"""The worker's side of a hand-off, in process, over a real channel with real sockets."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared import protocol
from shared.channel import socketpair
from tests.helpers import fd_table_full
from worker.app import classify
from worker.runtime import Runtime


async def streams_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"bye\n")


async def streams_answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"bye\n")
    writer.close()
    await writer.wait_closed()


def next_ack(loop: asyncio.AbstractEventLoop, master_end: socket.socket) -> protocol.Message:
    """The first ack the worker sent (after its hello and ready), running its loop meanwhile."""
    master_end.setblocking(False)

    async def read() -> protocol.Message:
        while True:
            message = protocol.decode(await loop.sock_recv(master_end, protocol.MAX_MESSAGE_BYTES))
            if isinstance(message, protocol.Ack):
                return message

    return loop.run_until_complete(asyncio.wait_for(read(), 10))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@contextlib.contextmanager
def running(
    loop: asyncio.AbstractEventLoop, handler: Callable[..., Any], threads: int | None = None
) -> Iterator[tuple[Runtime, socket.socket]]:
    """A worker runtime serving ``handler``, and the master's end of its channel; both closed after."""
    master_end, worker_end = socketpair()
    runtime = Runtime(0, worker_end, loop, threads=threads)
    try:
        runtime.start(classify("test:handler", handler))
        yield runtime, master_end
    finally:
        runtime.shutdown()
        master_end.close()


@contextlib.contextmanager
def connections(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``count`` (master's copy, client) socket pairs, closed after."""
    conns = [socket.socketpair() for _ in range(count)]
    try:
        yield conns
    finally:
        for left, right in conns:
            left.close()
            right.close()


def hand_off(master_end: socket.socket, fds: list[int]) -> None:
    """Send ``fds`` as the master does: one hand-off, each fd its own id."""
    master_end.sendmsg(
        [protocol.encode_handoff(fds)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    )


@pytest.mark.parametrize("handler", [streams_answer, streams_answer_and_close], ids=["returns", "closes"])
def test_connection_ends_when_the_handler_returns_while_the_master_holds_its_copy(
    loop: asyncio.AbstractEventLoop, handler: Callable[..., Any]
) -> None:
    """The client sees EOF at once, not when the master gets round to closing its copy.

    A socket's last close sends the FIN; the master keeps its copy until it
    reads the worker's ack, which under load can be a scheduling slice later.
    """
    with running(loop, handler, threads=1) as (_, master_end), connections(2) as conns:
        # The master's copies, kept open for the whole test (it has not read the ack).
        masters = [left.fileno() for left, _ in conns]
        hand_off(master_end, masters)
        for _, client in conns:
            client.sendall(b"hi\n")
            client.setblocking(False)

        async def read_to_eof(client: socket.socket) -> bytes:
            data = b""
            while chunk := await loop.sock_recv(client, 100):
                data += chunk
            return data

        async def clients() -> list[bytes]:
            return await asyncio.wait_for(asyncio.gather(*(read_to_eof(c) for _, c in conns)), 10)

        assert loop.run_until_complete(clients()) == [b"bye\n", b"bye\n"]
        # One ack for the hand-off, naming both connections.
        # It holds the two it just took.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), True, 2)


async def custom_server(worker: Any) -> None:
    async for sock, _ in worker.connections():
        sock.close()


def test_a_custom_server_reports_no_load(loop: asyncio.AbstractEventLoop) -> None:
    """Its connections are the app's: the policy gets no figure from it and deals to it in turn."""
    with running(loop, custom_server) as (runtime, master_end), connections(2) as conns:
        masters = [left.fileno() for left, _ in conns]
        loop.run_until_complete(asyncio.sleep(0))  # the server starts iterating
        hand_off(master_end, masters)
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), True, 0)
        runtime.drain()  # the server's iteration ends, and with it the server
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))


def test_a_draining_worker_refuses_the_whole_handoff(loop: asyncio.AbstractEventLoop) -> None:
    with running(loop, streams_answer) as (runtime, master_end), connections(3) as conns:
        runtime.drain()
        masters = [left.fileno() for left, _ in conns]
        before = len(os.listdir("/proc/self/fd"))
        hand_off(master_end, masters)
        # One refusal naming all three.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), False)
        # The worker closed its copies: the connections are the master's alone.
        assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("given", [[], ["--protocol", str(protocol.VERSION - 1)]], ids=["none", "older"])
def test_a_worker_refuses_a_master_of_another_protocol_version(given: list[str]) -> None:
    """New code on disk, old master: the reloaded workers say so and exit instead of misreading it."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--id", "0", "--channel-fd", "0", "--master-pid", str(os.getpid()),
         "--app", "examples.hello:handler", *given],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 3
    assert f"this worker speaks protocol {protocol.VERSION}" in proc.stderr
    assert "restart the master" in proc.stderr


def test_a_handoff_beyond_the_fd_limit_is_refused_whole_and_the_worker_drains(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Out of descriptors, a worker refuses every connection of the hand-off and makes way for a fresh one."""
    with running(loop, streams_answer) as (runtime, master_end), connections(3) as conns:
        masters = [left.fileno() for left, _ in conns]
        before = len(os.listdir("/proc/self/fd"))
        with fd_table_full(room=1):  # room for exactly one of the three
            hand_off(master_end, masters)

            async def handled() -> None:
                while not runtime.handed:
                    await asyncio.sleep(0)  # let the channel's reader run

            loop.run_until_complete(asyncio.wait_for(handled(), 10))
        # One refusal naming all three, though one fd did arrive.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), False)
        assert runtime.draining
        assert (runtime.handed, runtime.acked, runtime.refused) == (3, 0, 3)
        # The fd that did arrive was closed: the connections are the master's alone.
        assert len(os.listdir("/proc/self/fd")) == before
