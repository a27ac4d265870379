"""``worker.sockets.Socket`` answers exactly as ``socket.socket`` does, on real sockets, and leaks no fd.

The class leans on how the standard library builds ``family`` and ``type``;
the first test fails loudly if that changes.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import select
import socket
from collections.abc import Iterator

import pytest

from worker.sockets import Socket

_TIMEOUT_S = 5.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pairs() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Connected (client, server-side) pairs over TCP on 127.0.0.1 and ::1, and a Unix stream."""
    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        try:
            listener = socket.create_server((host, 0), family=family)
        except OSError:
            continue  # no ::1 here
        with listener:
            client = socket.create_connection(listener.getsockname()[:2], timeout=_TIMEOUT_S)
            server, _ = listener.accept()
            yield client, server
    yield socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _accept_when_ready(listener: socket.socket) -> tuple[socket.socket, object]:
    """``listener.accept()``; a non-blocking one is first waited on (no sleep: poll)."""
    if listener.gettimeout() == 0.0:
        ready, _, _ = select.select([listener], [], [], _TIMEOUT_S)
        assert ready, "no connection to accept"
    return listener.accept()


def test_the_standard_answers_are_properties_over_the_c_types_ints() -> None:
    # What Socket relies on: were these to change, its answers could differ.
    assert isinstance(socket.socket.__dict__["family"], property)
    assert isinstance(socket.socket.__dict__["type"], property)
    with socket.socket() as sock:
        assert type(_socket.socket.family.__get__(sock)) is int
        assert type(_socket.socket.type.__get__(sock)) is int


def test_a_handed_off_fd_answers_as_a_standard_socket_of_it() -> None:
    before = _open_fds()
    for client, server in _pairs():
        with client, server:
            copy = os.dup(server.fileno())
            sock = Socket.from_handoff(copy)
            with sock:
                standard = socket.socket(fileno=os.dup(copy))
                with standard:
                    assert sock.family is standard.family
                    assert sock.type is standard.type
                    assert sock.getsockname() == standard.getsockname()
                assert sock.proto == 0  # not asked of the kernel: the default protocol
                # It is a working connection.
                sock.sendall(b"ping")
                client.settimeout(_TIMEOUT_S)
                assert client.recv(4) == b"ping"
            assert sock.fileno() == -1
            with pytest.raises(OSError) as raised:
                os.fstat(copy)
            assert raised.value.errno == errno.EBADF  # closed with the object
    assert _open_fds() == before


def test_an_fd_that_is_no_socket_is_refused_and_left_open() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            Socket.from_handoff(read_end)
        assert raised.value.errno == errno.ENOTSOCK
        os.fstat(read_end)  # still ours to close
    finally:
        os.close(read_end)
        os.close(write_end)


def test_accept_gives_a_socket_as_the_standard_accept_would() -> None:
    before = _open_fds()
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            made = socket.create_server((host, 0), family=family)
        except OSError:
            continue
        # Both from an fd, as the worker gets its listeners.
        with made, socket.socket(fileno=os.dup(made.fileno())) as standard_listener, \
                Socket(fileno=os.dup(made.fileno())) as listener:
            for blocking in (True, False):
                listener.setblocking(blocking)
                with contextlib.ExitStack() as stack:
                    stack.enter_context(socket.create_connection(listener.getsockname()[:2],
                                                                 timeout=_TIMEOUT_S))
                    stack.enter_context(socket.create_connection(listener.getsockname()[:2],
                                                                 timeout=_TIMEOUT_S))
                    standard_listener.setblocking(blocking)
                    if not blocking:
                        # Both handshakes are done once the standard one accepts its first.
                        standard_listener.settimeout(_TIMEOUT_S)
                        theirs, theirs_address = standard_listener.accept()
                        standard_listener.setblocking(False)
                    else:
                        theirs, theirs_address = standard_listener.accept()
                    ours, ours_address = _accept_when_ready(listener)
                    stack.enter_context(ours)
                    stack.enter_context(theirs)
                    assert type(ours) is Socket
                    assert (ours.family, ours.type, ours.proto) == (theirs.family, theirs.type, theirs.proto)
                    assert ours.family is theirs.family and ours.type is theirs.type
                    assert ours.gettimeout() == theirs.gettimeout()
                    assert ours_address[0] == theirs_address[0]
    assert _open_fds() == before


def test_a_non_blocking_listener_with_nothing_queued_raises_as_the_standard_one() -> None:
    with Socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_the_event_loop_wraps_a_handed_off_socket_in_a_transport() -> None:
    # What the streams interface does with it: uvloop asks its family and type.
    import uvloop

    async def exchange(server: socket.socket, client: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=server)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        client.sendall(b"hello\n")
        line = await asyncio.wait_for(reader.readline(), _TIMEOUT_S)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), _TIMEOUT_S)
        return line

    async def nothing() -> None:
        pass

    # uvloop opens a pipe of its own with its first loop and keeps it: not ours to count.
    uvloop.run(nothing())
    before = _open_fds()
    for runner in (asyncio.run, uvloop.run):
        for client, server in _pairs():
            with client, server:
                sock = Socket.from_handoff(os.dup(server.fileno()))
                assert runner(exchange(sock, client)) == b"hello\n"
    assert _open_fds() == before
