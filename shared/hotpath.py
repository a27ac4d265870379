"""The hand-off's system-call loops: accept a batch as bare fds, send hand-offs, settle acks.

Theory of operation
-------------------
The master spends most of a connection in four places: accepting it,
sending it to a worker, reading the worker's ack and closing its own copy.
Each is a system call wrapped in interpreter work that the hand-off does
not need (socket methods, an address tuple for every accepted connection,
the datagram and its ancillary data built object by object, an ack decoded
into objects and checked id by id), so all come compiled from
``shared/_hotpath.c`` when it is built
(``pip install`` builds it; the Makefile installs the compiler and Python's
headers). Without it, or with ``DISPATCHER_PURE_PYTHON=1`` in the
environment (to measure the difference), the pure-Python versions below do
the same system calls and return and raise the same (``tests/test_hotpath.py``
holds both to that); ``COMPILED`` says which is in use, and the master's
start-up line names it.

- ``send_dealt`` sends a whole deal (each worker's connections, in
  datagrams of up to a chunk) and enters each connection sent in that
  worker's in-flight dict, stopping a worker's sending at its first
  datagram that does not go;
- ``read_ack`` reads one datagram from a worker's channel and, when it is
  an accepted ack naming only connections in flight, each once, settles it
  (the ids leave the in-flight dict, the master's copies are closed);
  anything else comes back as ``recvmsg_into`` would give it.

fd ownership:
- ``accept_fds`` returns new fds, close-on-exec, owned by the caller.
- ``send_handoff`` and ``send_dealt`` take none: the caller keeps its fds
  whatever happens (``shared.channel.Channel.send_handoff``); the receiver
  gets its own copies with the datagram.
- ``read_ack`` closes the fds an ack it settles names: the caller owned
  them (they were in its in-flight dict), and the ack says the worker holds
  its own copies. Anything it does not settle it leaves as it was, and fds
  that arrived with that datagram are the caller's (as from
  ``recvmsg_into``).

Both work on non-blocking sockets only: neither waits, and the compiled one
keeps the GIL, which costs less than releasing it for a call that cannot
block.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
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


#: Where ``send_dealt`` sends each worker's group: its channel socket and its in-flight dict.
Targets = dict[int, tuple[socket.socket, dict[int, float]]]
#: Per group: connections sent, datagrams sent, and the errno that stopped it (0: all went).
Sent = tuple[int, int, int]


def py_send_dealt(groups: list[tuple[int, list[int]]], accepted_at: float, targets: Targets,
                  chunk: int) -> list[Sent]:
    """Send each ``(key, fds)`` of a deal to ``targets[key]``; what went, per group.

    Each worker's fds go in order, in datagrams of at most ``chunk``; each
    one sent is in its in-flight dict with ``accepted_at`` (an fd is there
    if and only if its datagram went). A worker's sending stops at the first
    datagram that does not go, with its errno; the rest of its group is the
    caller's (to send again or re-queue). The caller keeps its fds.

    Raises:
        ValueError: a group of no target, or an fd that is not one (before
            anything is sent).
    """
    if not 1 <= chunk <= protocol.MAX_FDS:
        raise ValueError(f"chunk {chunk}: 1 to {protocol.MAX_FDS}")
    for key, fds in groups:
        if key not in targets:
            raise ValueError(f"send_dealt: no target for {key!r}")
        for fd in fds:
            if not isinstance(fd, int) or not 0 <= fd <= 0x7FFFFFFF:
                raise ValueError(f"not an fd: {fd!r}")
    results: list[Sent] = []
    for key, fds in groups:
        sock, in_flight = targets[key]
        sent = datagrams = error = 0
        while sent < len(fds):
            part = fds[sent:sent + chunk]
            try:
                send_handoff(sock, part)
            except OSError as exc:
                error = exc.errno or errno.EIO
                break
            # Sent: the worker may ack them from now on, so they are in flight.
            in_flight.update(zip(part, itertools.repeat(accepted_at)))
            sent += len(part)
            datagrams += 1
        results.append((sent, datagrams, error))
    return results


#: What ``read_ack`` gives back: (count, load) for an ack it settled, else (nbytes, ancdata, flags).
ReadAck = tuple[int, int] | tuple[int, list[tuple[int, int, bytes]], int]

_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def py_read_ack(sock: socket.socket, buffer: bytearray, ancsize: int, flags: int,
                in_flight: dict[int, float]) -> ReadAck:
    """Read one datagram from ``sock`` into ``buffer``; settle it if it is an accepted ack of ``in_flight``.

    Settled (an accepted ack, no fds, nothing truncated, every id a key of
    ``in_flight``, each once): the ids leave ``in_flight``, the fds they
    name are closed, and ``(count, load)`` is returned. Otherwise nothing
    changes and ``(nbytes, ancdata, msg_flags)`` is returned, as
    ``recvmsg_into`` gives them.

    Raises:
        OSError: as ``sock.recvmsg_into``.
    """
    n, ancdata, msg_flags, _ = sock.recvmsg_into((buffer,), ancsize, flags)
    if not ancdata and not msg_flags & _TRUNCATED:
        ack = protocol.decode_ack(buffer, n)
        if ack is not None:
            conn_ids, accepted, load = ack
            if accepted and len(set(conn_ids)) == len(conn_ids) and all(i in in_flight for i in conn_ids):
                for conn_id in conn_ids:
                    del in_flight[conn_id]
                for conn_id in conn_ids:
                    # Ours, and out of in_flight now: a close that fails (a bug elsewhere)
                    # must not lose the ack, as the compiled one ignores it too.
                    with contextlib.suppress(OSError):
                        os.close(conn_id)
                return len(conn_ids), load
    return n, ancdata, msg_flags


#: Either takes the socket object (the compiled ones also take a bare fd).
AcceptFds = Callable[[socket.socket, int], tuple[list[int], int]]
SendHandoff = Callable[[socket.socket, Sequence[int]], None]
SendDealt = Callable[[list[tuple[int, list[int]]], float, Targets, int], list[Sent]]
ReadAckFunction = Callable[[socket.socket, bytearray, int, int, dict[int, float]], ReadAck]

accept_fds: AcceptFds = py_accept_fds
send_handoff: SendHandoff = py_send_handoff
send_dealt: SendDealt = py_send_dealt
read_ack: ReadAckFunction = py_read_ack
#: The compiled versions are in use.
COMPILED = False

if os.environ.get(PURE_PYTHON_ENV) != "1":
    try:
        from shared import _hotpath
    except ImportError:
        pass
    else:
        built_for = (_hotpath.MAX_FDS, _hotpath.HANDOFF_TYPE, _hotpath.ACK_TYPE, _hotpath.ACK_HEAD)
        if built_for != (protocol.MAX_FDS, protocol.MessageType.HANDOFF, protocol.MessageType.ACK,
                         protocol.ACK_HEAD):
            raise ImportError("shared._hotpath was built for another wire protocol: rebuild it "
                              "(pip install -e .)")
        accept_fds = _hotpath.accept_fds
        send_handoff = _hotpath.send_handoff
        send_dealt = _hotpath.send_dealt
        read_ack = _hotpath.read_ack
        COMPILED = True


def describe() -> str:
    """Which hot path is in use, for the master's start-up line."""
    if COMPILED:
        return "compiled hand-off"
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return f"pure-Python hand-off ({PURE_PYTHON_ENV}=1)"
    return "pure-Python hand-off (shared._hotpath not built)"
