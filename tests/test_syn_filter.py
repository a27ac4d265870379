"""The stop filter (``shared.syn_filter``) and ``Listener.close_to_new``, on real sockets.

What a stop relies on: what was queued before the filter is still accepted,
a handshake under way when it is attached completes, a new client is
refused once the listener closes instead of being reset, and every holder
of the socket can tell it is closing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import read_all
from dispatcher.listeners import Listener, open_listener, parse_bind
from shared import syn_filter

#: Longest wait for anything the kernel does here (a SYN sent again comes after 1 s).
TIMEOUT_S = 5.0
#: Classic BPF: keep only segments with SYN set. A handshake then stalls
#: half-way: the client has its SYN-ACK and counts itself connected, but its
#: ACK and data never reach the listener.
ONLY_SYN = ((0x30, 0, 0, 13), (0x45, 0, 1, 0x02), (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0))


def attach_program(sock: socket.socket, code: tuple[tuple[int, int, int, int], ...]) -> None:
    """Attach any classic BPF program (``SO_ATTACH_FILTER``: 26) to ``sock``."""
    instructions = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in code))
    program = struct.pack("HP", len(code), ctypes.addressof(instructions))
    sock.setsockopt(socket.SOL_SOCKET, 26, program)  # copied by the kernel: the buffer may go


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield sock
    sock.close()


def connect(sock: socket.socket) -> socket.socket:
    client = socket.create_connection(sock.getsockname(), timeout=TIMEOUT_S)
    client.sendall(b"hi\n")
    return client


def serve_one(sock: socket.socket) -> None:
    """Accept one connection within ``TIMEOUT_S``, read its line, answer, close."""
    assert select.select([sock], [], [], TIMEOUT_S)[0], "no connection to accept"
    conn, _ = sock.accept()
    with conn:
        conn.settimeout(TIMEOUT_S)
        assert conn.recv(100) == b"hi\n"
        conn.sendall(b"answer\n")


def test_what_was_queued_is_still_accepted_and_served(listener: socket.socket) -> None:
    with connect(listener) as client:
        syn_filter.attach(listener.fileno())
        serve_one(listener)
        assert read_all(client) == "answer\n"


def test_a_handshake_under_way_completes_and_is_served(listener: socket.socket) -> None:
    attach_program(listener, ONLY_SYN)
    with connect(listener) as client:  # connected as far as the client knows
        syn_filter.attach(listener.fileno())  # replaces the stall: the stop begins
        # The client sends its data again (its retransmission timer); that
        # segment has no SYN, passes, and completes the handshake.
        serve_one(listener)
        assert read_all(client) == "answer\n"


def test_a_new_client_is_refused_once_the_listener_closes_not_reset(listener: socket.socket) -> None:
    syn_filter.attach(listener.fileno())
    with socket.socket() as client:
        client.setblocking(False)
        assert client.connect_ex(listener.getsockname()) == errno.EINPROGRESS
        listener.close()  # had the SYN got in, this would reset the connection
        # Its SYN, sent again, finds nobody listening.
        assert select.select([], [client], [], TIMEOUT_S)[1], "the connect never ended"
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED


def test_only_the_stop_filter_counts_as_attached(listener: socket.socket) -> None:
    assert not syn_filter.attached(listener.fileno())
    attach_program(listener, ONLY_SYN)  # as long as the stop filter, not it
    assert not syn_filter.attached(listener.fileno())
    attach_program(listener, ((0x06, 0, 0, 0xFFFFFFFF),))
    assert not syn_filter.attached(listener.fileno())
    syn_filter.attach(listener.fileno())
    assert syn_filter.attached(listener.fileno())
    with listener.dup() as copy:  # as a worker holds it: the same socket, so the same filter
        assert syn_filter.attached(copy.fileno())


def test_not_a_socket_is_an_error() -> None:
    with open(os.devnull) as file, pytest.raises(OSError) as raised:
        syn_filter.attached(file.fileno())
    assert raised.value.errno == errno.ENOTSOCK


def test_a_tcp_listener_closed_to_new_connections_carries_the_filter() -> None:
    listener = open_listener(parse_bind("127.0.0.1:0"), 16)
    try:
        listener.close_to_new()
        listener.close_to_new()  # idempotent
        assert syn_filter.attached(listener.sock.fileno())
    finally:
        listener.close()


def test_a_unix_listener_closed_to_new_connections_loses_its_path_only(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    listener = open_listener(parse_bind(f"unix:{path}"), 16)
    try:
        queued = socket.socket(socket.AF_UNIX)
        queued.connect(path)
        queued.sendall(b"hi\n")
        listener.close_to_new()
        # New clients find no socket there; the one queued is still served.
        with socket.socket(socket.AF_UNIX) as late, pytest.raises(FileNotFoundError):
            late.connect(path)
        assert syn_filter.attached(listener.sock.fileno())  # the mark the workers read
        serve_one(listener.sock)
        assert read_all(queued) == "answer\n"
        queued.close()
        # A successor binds the path meanwhile: the old listener's close leaves it alone.
        successor = open_listener(parse_bind(f"unix:{path}"), 16)
    finally:
        listener.close()
    try:
        assert os.path.exists(path)
    finally:
        successor.close()
    assert not os.path.exists(path)


def test_an_inherited_listener_is_left_as_it_is(listener: socket.socket) -> None:
    # The process that passed it may keep it for its next instance (systemd does).
    adopted = open_listener(parse_bind(f"fd://{os.dup(listener.fileno())}"), 16)
    assert isinstance(adopted, Listener) and adopted.inherited
    try:
        adopted.close_to_new()
        assert not syn_filter.attached(listener.fileno())
    finally:
        adopted.close()
