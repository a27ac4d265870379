"""Types of the compiled hand-off loops (shared/_hotpath.c); shared.hotpath is the module to import."""

import socket
from collections.abc import Sequence

MAX_FDS: int
HANDOFF_TYPE: int

def accept_fds(listener: socket.socket | int, limit: int, /) -> tuple[list[int], int]: ...
def send_handoff(sock: socket.socket | int, fds: Sequence[int], /) -> None: ...
