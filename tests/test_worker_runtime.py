"""The worker's side of a hand-off, in process, over a real channel with real sockets."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared import eventloop, protocol
from shared.channel import socketpair
from shared.exitcodes import ExitCode
from tests.helpers import fd_table_full
from worker.app import classify
from worker.runtime import Runtime
from worker.sockets import Socket


async def streams_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"bye\n")


async def streams_answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"bye\n")
    writer.close()
    await writer.wait_closed()


def next_message(
    loop: asyncio.AbstractEventLoop, master_end: socket.socket, kind: type[protocol.Message]
) -> protocol.Message:
    """The first message of ``kind`` the worker sent after its hello and ready, running its loop meanwhile."""
    master_end.setblocking(False)

    async def read() -> protocol.Message:
        while True:
            message = protocol.decode(await loop.sock_recv(master_end, protocol.MAX_MESSAGE_BYTES))
            if isinstance(message, kind):
                return message

    return loop.run_until_complete(asyncio.wait_for(read(), 10))


def next_ack(loop: asyncio.AbstractEventLoop, master_end: socket.socket) -> protocol.Message:
    """The first ack the worker sent (after its hello and ready), running its loop meanwhile."""
    return next_message(loop, master_end, protocol.Ack)


def still_answers(loop: asyncio.AbstractEventLoop, master_end: socket.socket) -> protocol.Message:
    """Ping the worker and return its pong."""
    master_end.send(protocol.encode(protocol.Ping(7)))
    return next_message(loop, master_end, protocol.Pong)


def escaped(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """What reaches the loop's exception handler from now on (an error no callback caught)."""
    caught: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: caught.append(context))
    return caught


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
        # One ack for the hand-off, sent as their tasks started; it held both then.
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
        acks = [next_ack(loop, master_end), next_ack(loop, master_end)]
        assert acks == [protocol.Ack((masters[0],), True, 0), protocol.Ack((masters[1],), True, 0)]
        runtime.drain()  # the server's iteration ends, and with it the server
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))


def acks_sent(master_end: socket.socket) -> list[protocol.Message]:
    """The acks already in the channel, without running the worker's loop."""
    acks = []
    master_end.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            message = protocol.decode(master_end.recv(protocol.MAX_MESSAGE_BYTES))
            if isinstance(message, protocol.Ack):
                acks.append(message)
    return acks


def test_a_connection_is_acked_when_its_handler_starts_not_when_it_arrives(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Arrived and not started (the loop blocked before its task ran): no ack, so the master keeps it."""
    with running(loop, streams_answer) as (runtime, master_end), connections(3) as conns:
        masters = [left.fileno() for left, _ in conns]
        loop.run_until_complete(asyncio.sleep(0))  # hello and ready
        acks_sent(master_end)
        # The hand-off read, as the channel's reader callback does, and then
        # no turn of the loop: as if a handler had blocked it right after.
        fds = [os.dup(fd) for fd in masters]
        runtime._on_handoff(tuple(masters), fds)
        assert acks_sent(master_end) == []
        for _, client in conns:
            client.sendall(b"hi\n")
        loop.run_until_complete(asyncio.sleep(0))  # their tasks take their first step
        assert acks_sent(master_end) == [protocol.Ack(tuple(masters), True, 3)]

        async def answers() -> list[bytes]:
            return [await loop.sock_recv(client, 16) for _, client in conns]

        for _, client in conns:
            client.setblocking(False)
        assert loop.run_until_complete(asyncio.wait_for(answers(), 10)) == [b"bye\n"] * 3


def test_a_blocking_handler_waiting_for_a_thread_is_not_acked(loop: asyncio.AbstractEventLoop) -> None:
    """With every pool thread busy, a hand-off waits un-acked: the master still has it if the worker dies."""
    release = __import__("threading").Event()

    def blocking(sock: socket.socket, _peer: Any) -> None:
        if sock.recv(16) == b"hang\n":
            release.wait(10)
        sock.sendall(b"bye\n")

    with running(loop, blocking, threads=1) as (_, master_end), connections(2) as conns:
        masters = [left.fileno() for left, _ in conns]
        conns[0][1].sendall(b"hang\n")
        conns[1][1].sendall(b"hi\n")
        hand_off(master_end, masters)
        first = next_ack(loop, master_end)
        assert first == protocol.Ack((masters[0],), True, 1)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert acks_sent(master_end) == []  # the second waits for the only thread
        release.set()
        assert next_ack(loop, master_end) == protocol.Ack((masters[1],), True, 2)
        for _, client in conns:
            client.settimeout(10)
            assert client.recv(16) == b"bye\n"


async def takes_one_then_stops(worker: Any) -> None:
    async for sock, _ in worker.connections():
        sock.close()
        await worker.wait_draining()
        return


def test_a_custom_server_acks_only_the_connections_it_takes(loop: asyncio.AbstractEventLoop) -> None:
    with running(loop, takes_one_then_stops) as (runtime, master_end), connections(3) as conns:
        masters = [left.fileno() for left, _ in conns]
        loop.run_until_complete(asyncio.sleep(0))  # the server starts iterating
        hand_off(master_end, masters)
        assert next_ack(loop, master_end) == protocol.Ack((masters[0],), True, 0)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert acks_sent(master_end) == []  # never taken: still the master's
        runtime.drain()
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))


def open_sockets() -> int:
    """Sockets among this process's fds (uvloop keeps a spare fd on /dev/null, opened when first needed)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, gone by now
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


@pytest.fixture(params=["asyncio", "uvloop"])
def either_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """Each event loop the worker may run on: they close a stream's socket differently."""
    loop = eventloop.loop_factory(request.param)()
    yield loop
    loop.close()


@pytest.mark.parametrize("ending", ["close", "streams", "close on a thread"])
def test_a_custom_server_connection_is_handled_once_the_app_is_done_with_it(
    either_loop: asyncio.AbstractEventLoop, ending: str
) -> None:
    """``handled`` means finished, for a custom server too: counted when the app lets go of the socket.

    asyncio's transport closes the socket it was given; uvloop's detaches it
    and closes the fd itself. Either way it counts once.
    """
    loop = either_loop
    holding: list[socket.socket] = []
    release = asyncio.Event()

    async def finish(sock: socket.socket) -> None:
        if ending == "streams":
            reader, writer = await asyncio.open_connection(sock=sock)
            await reader.readline()
            await release.wait()
            writer.write(b"bye\n")
            writer.close()
            await writer.wait_closed()
            return
        loop = asyncio.get_running_loop()
        await loop.sock_recv(sock, 100)
        await release.wait()
        await loop.sock_sendall(sock, b"bye\n")
        if ending == "close":
            sock.close()
        else:
            await loop.run_in_executor(None, sock.close)

    async def serve(worker: Any) -> None:
        async with asyncio.TaskGroup() as tasks:
            async for sock, _ in worker.connections():
                holding.append(sock)
                tasks.create_task(finish(sock))

    with running(loop, serve) as (runtime, master_end), connections(1) as conns:
        ((master_copy, client),) = conns
        loop.run_until_complete(asyncio.sleep(0))  # the server starts iterating
        before = open_sockets()
        hand_off(master_end, [master_copy.fileno()])
        client.sendall(b"hi\n")

        async def until(predicate: Callable[[], object]) -> None:
            while not predicate():
                await asyncio.sleep(0)  # let the worker's callbacks and the app run

        loop.run_until_complete(asyncio.wait_for(until(lambda: holding), 10))
        assert runtime.handled == 0  # the app holds it: not finished
        release.set()
        loop.run_until_complete(asyncio.wait_for(until(lambda: runtime.handled), 10))
        assert open_sockets() == before  # the worker's copy is closed
        master_copy.close()
        client.settimeout(10)
        assert client.recv(100) == b"bye\n" and client.recv(100) == b""
        runtime.drain()  # the server's iteration ends, and with it the server
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))
        assert runtime.handled == 1


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
                while not runtime.handed_off:
                    await asyncio.sleep(0)  # let the channel's reader run

            loop.run_until_complete(asyncio.wait_for(handled(), 10))
        # One refusal naming all three, though one fd did arrive.
        assert next_ack(loop, master_end) == protocol.Ack(tuple(masters), False)
        assert runtime.draining
        assert (runtime.handed_off, runtime.acked, runtime.refused) == (3, 0, 3)
        # The fd that did arrive was closed: the connections are the master's alone.
        assert len(os.listdir("/proc/self/fd")) == before


def test_a_message_handler_that_raises_is_logged_and_the_others_still_run(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Any] = []

    def broken_handler(payload: Any) -> None:
        raise RuntimeError("broken on purpose")

    with running(loop, streams_answer) as (runtime, master_end):
        errors = escaped(loop)
        runtime.api.on_message(broken_handler)
        runtime.api.on_message(got.append)
        master_end.send(protocol.encode(protocol.UserMessage({"n": 1})))

        async def delivered() -> None:
            while not got:
                await asyncio.sleep(0)  # let the channel's reader run

        loop.run_until_complete(asyncio.wait_for(delivered(), 10))
        assert got == [{"n": 1}]
        (record,) = [r for r in caplog.records if r.exc_info]
        assert "broken_handler" in record.getMessage() and record.name == "worker.api"
        assert record.exc_info is not None and record.exc_info[0] is RuntimeError
        assert isinstance(still_answers(loop, master_end), protocol.Pong)
        assert errors == []


def send_with_fd(master_end: socket.socket, message: protocol.Message, fd: int) -> None:
    master_end.sendmsg(
        [protocol.encode(message)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    )


@pytest.mark.parametrize("what", ["pipe", "connected socket"])
def test_a_listen_fd_that_is_no_listening_socket_is_closed_and_the_worker_goes_on(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    with running(loop, streams_answer) as (runtime, master_end):
        errors = escaped(loop)
        before = len(os.listdir("/proc/self/fd"))
        if what == "pipe":
            ours, other = os.pipe()
        else:
            left, right = socket.socketpair()
            ours, other = left.detach(), right.detach()
        send_with_fd(master_end, protocol.Listen(), ours)
        os.close(ours)
        os.close(other)
        # Messages are read in order: the pong comes once the Listen was dealt with.
        pong = still_answers(loop, master_end)
        assert isinstance(pong, protocol.Pong) and "handed_off" in pong.stats
        assert len(os.listdir("/proc/self/fd")) == before
        assert errors == []
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "Listen" in record.getMessage() and "\n" not in record.getMessage()
        assert not runtime.draining


def test_an_empty_datagram_from_the_master_is_a_protocol_error(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """It reads like the master closing the channel, and is not: the worker says so, then exits."""
    with running(loop, streams_answer) as (runtime, master_end):
        master_end.send(b"")
        code = loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))
        assert code is ExitCode.MASTER_GONE  # it can no longer trust what its master sends
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.runtime"]
    assert "channel to master failed: empty datagram (protocol error); exiting" in messages
    assert not [m for m in messages if "master is gone" in m]


def test_an_interface_that_fails_to_start_fails_the_boot_in_one_line(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a worker that never gets ready: the master hears why, and the worker exits as a failed boot."""
    from worker import interfaces

    def broken(app: Any, context: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/srv/app/worker/interfaces/streams.py")

    monkeypatch.setattr(interfaces, "create", broken)
    with running(loop, streams_answer) as (runtime, master_end):
        assert loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10)) is ExitCode.WORKER_BOOT_FAILED
        error = next_message(loop, master_end, protocol.Error)
        assert isinstance(error, protocol.Error) and error.code == ExitCode.WORKER_BOOT_FAILED
        assert error.message == ("app test:handler: the streams interface failed to start: PermissionError: "
                                 "[Errno 13] Permission denied: '/srv/app/worker/interfaces/streams.py'")
        assert not runtime.ready


def test_a_handed_off_connection_reaches_the_app_as_the_workers_socket(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # worker.sockets.Socket: the cheaper object, with the standard answers. A
    # blocking handler is given the very object the runtime made.
    given: list[tuple[type, socket.AddressFamily, socket.SocketKind, bytes]] = []

    def blocking(sock: socket.socket, addr: Any) -> None:
        given.append((type(sock), sock.family, sock.type, sock.recv(4)))

    with running(loop, blocking, threads=1) as (runtime, master_end), connections(1) as conns:
        (master_copy, client), = conns
        client.sendall(b"ping")
        hand_off(master_end, [master_copy.fileno()])
        next_ack(loop, master_end)
        runtime.drain()
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))
    assert given == [(Socket, socket.AF_UNIX, socket.SOCK_STREAM, b"ping")]
