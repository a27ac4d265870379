"""The worker's side of a hand-off, in process, over a real channel with real sockets."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared import protocol
from shared.channel import socketpair
from worker.app import classify
from worker.runtime import Runtime


async def streams_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"bye\n")


def blocking_answer(sock: socket.socket, peer: Any) -> None:
    sock.recv(100)
    sock.sendall(b"bye\n")


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


@pytest.mark.parametrize("handler", [streams_answer, blocking_answer], ids=["streams", "blocking"])
def test_connection_ends_when_the_handler_returns_while_the_master_holds_its_copy(
    loop: asyncio.AbstractEventLoop, handler: Callable[..., Any]
) -> None:
    """The client sees EOF at once, not when the master gets round to closing its copy.

    A socket's last close sends the FIN; the master keeps its copy until it
    reads the worker's ack, which under load can be a scheduling slice later.
    """
    master_end, worker_end = socketpair()
    runtime = Runtime(0, worker_end, loop, threads=1)
    runtime.start(classify("test:handler", handler))
    conns = [socket.socketpair() for _ in range(2)]
    # The master's copies, kept open for the whole test (it has not read the ack).
    masters = [left.fileno() for left, _ in conns]
    try:
        master_end.sendmsg(
            [protocol.encode_handoff(masters)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", masters))],
        )
        for _, client in conns:
            client.sendall(b"hi\n")
            client.settimeout(10)

        async def read_to_eof(client: socket.socket) -> bytes:
            data = b""
            while chunk := await loop.sock_recv(client, 100):
                data += chunk
            return data

        async def clients() -> list[bytes]:
            for _, client in conns:
                client.setblocking(False)
            return await asyncio.wait_for(asyncio.gather(*(read_to_eof(c) for _, c in conns)), 10)

        assert loop.run_until_complete(clients()) == [b"bye\n", b"bye\n"]
        # One ack for the hand-off, naming both connections.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), True)
    finally:
        runtime.shutdown()
        master_end.close()
        for left, right in conns:
            left.close()
            right.close()


def test_a_draining_worker_refuses_the_whole_handoff(loop: asyncio.AbstractEventLoop) -> None:
    master_end, worker_end = socketpair()
    runtime = Runtime(0, worker_end, loop, threads=None)
    runtime.start(classify("test:handler", streams_answer))
    runtime.drain()
    conns = [socket.socketpair() for _ in range(3)]
    masters = [left.fileno() for left, _ in conns]
    before = len(os.listdir("/proc/self/fd"))
    try:
        master_end.sendmsg(
            [protocol.encode_handoff(masters)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", masters))],
        )

        # One refusal naming all three.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), False)
        # The worker closed its copies: the connections are the master's alone.
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        runtime.shutdown()
        master_end.close()
        for left, right in conns:
            left.close()
            right.close()
