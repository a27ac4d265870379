"""Types of the compiled hand-off loops (shared/_hotpath.c); shared.hotpath is the module to import."""

import socket
from collections.abc import Sequence

MAX_FDS: int
HANDOFF_TYPE: int

def accept_fds(listener: socket.socket | int, limit: int, /) -> tuple[list[int], int]: ...
def send_handoff(sock: socket.socket | int, fds: Sequence[int], /) -> None: ...
ACK_TYPE: int
ACK_HEAD: int

def send_dealt(
    groups: list[tuple[int, list[int]]], accepted_at: float,
    targets: dict[int, tuple[socket.socket, dict[int, float]]], chunk: int, /,
) -> list[tuple[int, int, int]]: ...
def read_ack(
    sock: socket.socket | int, buffer: bytearray, ancsize: int, flags: int, in_flight: dict[int, float], /,
) -> tuple[int, int] | tuple[int, list[tuple[int, int, bytes]], int]: ...
