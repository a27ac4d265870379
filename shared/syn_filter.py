"""The stop filter: how a listening socket closes without resetting the connections it queued.

Theory of operation
-------------------
Closing a listening socket resets every connection in its accept queue
(handshake done, not accepted yet) and every handshake still in progress.
Accepting until EAGAIN just before the close does not prevent it on its
own: new connections keep joining the queue until the close itself. So a
listener that is about to close is first given a classic BPF socket filter
(``SO_ATTACH_FILTER``) that drops every segment with SYN set, and passes
everything else:

- a new connection's SYN is dropped and never starts a handshake. The client
  sends it again (Linux: after 1 s), finds the listener closed by then, and
  is refused (ECONNREFUSED): it never had a connection, and it or a balancer
  can retry;
- a handshake already in progress completes, because its final ACK has no
  SYN, and the connection joins the queue. Dropping every segment
  (``ret #0``) would strand those handshakes instead: the client already
  counts itself connected, and the close resets it;
- what the queue holds can still be accepted, and nothing new joins it, so
  accepting until EAGAIN ends, and then the close resets nothing, except a
  handshake whose final ACK arrives between that last accept and the close
  (on loopback, microseconds; across a network, up to one round trip's
  worth of handshakes begun just before the filter).

The kernel runs the filter on a TCP segment once the IP header has been
pulled off, so offset 13 is the TCP flags byte for IPv4 and IPv6 alike.
A connection created after the filter was attached inherits a copy (the
kernel copies a listener's filter into each new connection); an established
connection never needs a SYN, so that copy drops nothing it needs.

A Unix stream socket takes the filter but never runs it (a connect or a
stream write runs no socket filter): new connections there are stopped by
removing the socket's path (``dispatcher.listeners``), and the filter is
attached anyway, because it is how every process holding the socket can
tell that it is closing for good (``attached``).

The filter stays until the socket is closed; it is never detached.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Final


class _Instruction(ctypes.Structure):
    """``struct sock_filter``: one classic BPF instruction."""

    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    """``struct sock_fprog``: the instruction count and where they are."""

    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


# Python's socket module has no name for these: the asm-generic values
# (x86, arm and most others; parisc numbers them differently). SO_GET_FILTER
# is SO_ATTACH_FILTER's number read back.
_SO_ATTACH_FILTER: Final = 26
_SO_GET_FILTER: Final = _SO_ATTACH_FILTER

_LOAD_BYTE: Final = 0x30  # BPF_LD | BPF_B | BPF_ABS: A = packet[k]
_JUMP_IF_SET: Final = 0x45  # BPF_JMP | BPF_JSET | BPF_K: A & k ? jt : jf
_RETURN: Final = 0x06  # BPF_RET | BPF_K: keep k bytes, 0 drops
_TCP_FLAGS_OFFSET: Final = 13
_SYN: Final = 0x02

_CODE: Final = (
    (_LOAD_BYTE, 0, 0, _TCP_FLAGS_OFFSET),
    (_JUMP_IF_SET, 0, 1, _SYN),
    (_RETURN, 0, 0, 0),  # SYN set: drop
    (_RETURN, 0, 0, 0xFFFFFFFF),  # anything else: keep it whole
)
# The kernel copies the program when it is attached; kept for the process's
# life anyway, so the pointer in _PROGRAM never dangles.
_INSTRUCTIONS: Final = (_Instruction * len(_CODE))(*(_Instruction(*op) for op in _CODE))
_PROGRAM: Final = _Program(len(_CODE), ctypes.cast(_INSTRUCTIONS, ctypes.POINTER(_Instruction)))

_libc = ctypes.CDLL(None, use_errno=True)


def _raise_errno() -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def attach(fd: int) -> None:
    """Attach the stop filter to the socket ``fd``: no SYN reaches it from now on.

    Raises:
        OSError: the kernel refused (``fd`` is not a socket, or a filter is locked on it).
    """
    if _libc.setsockopt(fd, socket.SOL_SOCKET, _SO_ATTACH_FILTER, ctypes.byref(_PROGRAM),
                        ctypes.sizeof(_PROGRAM)) != 0:
        _raise_errno()


def attached(fd: int) -> bool:
    """Whether the socket ``fd`` carries the stop filter (this one: any other filter does not count).

    Read through libc, not ``socket.getsockopt``: for this option the kernel
    counts the buffer's length in instructions, not bytes, and would write
    past a buffer sized in bytes.

    Raises:
        OSError: ``fd`` is not a socket.
    """
    count = ctypes.c_uint32(0)  # socklen_t; 0 asks only how many instructions
    if _libc.getsockopt(fd, socket.SOL_SOCKET, _SO_GET_FILTER, None, ctypes.byref(count)) != 0:
        _raise_errno()
    if count.value != len(_CODE):
        return False
    program = (_Instruction * len(_CODE))()
    if _libc.getsockopt(fd, socket.SOL_SOCKET, _SO_GET_FILTER, program, ctypes.byref(count)) != 0:
        _raise_errno()  # EINVAL: replaced meanwhile by a longer program
    return bytes(program) == bytes(_INSTRUCTIONS)
