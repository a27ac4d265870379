"""The hand-off's two system-call loops: accept a batch as bare fds, send one hand-off datagram.

Theory of operation
-------------------
The master spends most of a connection in two places: accepting it and
sending it to a worker. Both are a system call wrapped in interpreter work
that the hand-off does not need (socket methods, an address tuple for every
accepted connection, the datagram and its ancillary data built object by
object), so both come compiled from ``shared/_hotpath.c`` when it is built
(``pip install`` builds it; the Makefile installs the compiler and Python's
headers). Without it, or with ``DISPATCHER_PURE_PYTHON=1`` in the
environment (to measure the difference), the pure-Python versions below do
the same system calls and return and raise the same (``tests/test_hotpath.py``
holds both to that); ``COMPILED`` says which is in use, and the master's
start-up line names it.

fd ownership:
- ``accept_fds`` returns new fds, close-on-exec, owned by the caller.
- ``send_handoff`` takes none: the caller keeps its fds whatever happens
  (``shared.channel.Channel.send_handoff``); the receiver gets its own
  copies with the datagram.

Both work on non-blocking sockets only: neither waits, and the compiled one
keeps the GIL, which costs less than releasing it for a call that cannot
block.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Callable, Sequence

from shared import protocol

#: Set to ``1`` to use the pure-Python versions even when the compiled ones are built.
PURE_PYTHON_ENV = "DISPATCHER_PURE_PYTHON"

def py_accept_fds(listener: socket.socket, limit: int) -> tuple[list[int], int]:
    """Accept up to ``limit`` connections on ``listener``; return the fds and the errno that stopped it.

    The errno is EAGAIN once the backlog is empty, 0 if ``limit`` was
    reached, anything else as accept(2) reported it (the caller tells a
    client gone from an overload, ``shared.accept_errors``).
    """
    # socket._accept: accept4() returning the bare fd (and an address, dropped).
    accept = listener._accept  # type: ignore[attr-defined]
    fds: list[int] = []
    try:
        while len(fds) < limit:
            try:
                fd, _ = accept()  # EINTR is retried inside (PEP 475)
            except OSError as exc:
                return fds, exc.errno or errno.EIO
            fds.append(fd)
    except BaseException:
        # Interrupted (a signal handler's exception): nobody else knows these fds.
        for fd in fds:
            os.close(fd)
        raise
    return fds, 0


def py_send_handoff(sock: socket.socket, fds: Sequence[int]) -> None:
    """Send one hand-off datagram of ``fds`` on ``sock``; the caller keeps its fds.

    Raises:
        ValueError: no fds, more than ``protocol.MAX_FDS``, or one that is not
            an fd (not an int, negative, beyond a C int).
        OSError: not sent (BlockingIOError: the socket buffer is full; EBADF:
            ``sock`` is closed).
    """
    data = protocol.encode_handoff(fds)  # ValueError for a count or an id out of range
    try:
        ancillary = array.array("i", fds)
    except OverflowError as exc:  # a uint32 id, but beyond a C int: no fd
        raise ValueError(f"not an fd: {exc}") from None
    sock.sendmsg((data,), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, ancillary),), socket.MSG_NOSIGNAL)


#: Either takes the socket object (the compiled ones also take a bare fd).
AcceptFds = Callable[[socket.socket, int], tuple[list[int], int]]
SendHandoff = Callable[[socket.socket, Sequence[int]], None]

accept_fds: AcceptFds = py_accept_fds
send_handoff: SendHandoff = py_send_handoff
#: The compiled versions are in use.
COMPILED = False

if os.environ.get(PURE_PYTHON_ENV) != "1":
    try:
        from shared import _hotpath
    except ImportError:
        pass
    else:
        if (_hotpath.MAX_FDS, _hotpath.HANDOFF_TYPE) != (protocol.MAX_FDS, protocol.MessageType.HANDOFF):
            raise ImportError("shared._hotpath was built for another wire protocol: rebuild it "
                              "(pip install -e .)")
        accept_fds = _hotpath.accept_fds
        send_handoff = _hotpath.send_handoff
        COMPILED = True


def describe() -> str:
    """Which hot path is in use, for the master's start-up line."""
    if COMPILED:
        return "compiled hand-off"
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return f"pure-Python hand-off ({PURE_PYTHON_ENV}=1)"
    return "pure-Python hand-off (shared._hotpath not built)"
