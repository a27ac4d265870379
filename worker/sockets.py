"""The worker's socket objects: ``socket.socket``, cheaper to make and to ask.

Why
---
A worker makes a socket object for every connection, handed off or accepted
itself, and the event loop asks each one its family and type as it wraps it
in a transport (uvloop's ``connect_accepted_socket`` asks three times). The
standard class answers both through an enum conversion (``AddressFamily(2)``
is a class call and a member lookup, near a microsecond each), makes a
socket from a bare fd with three system calls to learn what it is, and its
``accept`` asks the listener both again for every connection: 6.1 µs of
every connection against 1.9 with this class (``bench/test_micro.py``), on a
handler that costs a worker about 60.

``Socket`` answers ``family`` and ``type`` with the same enum members from a
dict, learns a handed-off fd's family with one system call (the master hands
off only connections accepted on stream listeners; a fd that is no socket
still fails here with ENOTSOCK; its ``proto`` is 0, as a connection accepted
on a listener made with the default protocol has), and accepts connections
as ``Socket`` with the listener's figures read once. It is a
``socket.socket`` in every other way.

This leans on how the standard library builds its answers: ``family`` and
``type`` are properties over the C type's (``_socket.socket``) plain-int
attributes. ``tests/test_worker_sockets.py`` checks that, and that every
answer is the standard one, so a change there fails loudly.

fd ownership: ``Socket.from_handoff`` and ``accept`` take the fd into the new
object, which closes it when closed, exactly as ``socket.socket(fileno=fd)``
and ``socket.accept`` do.
"""

from __future__ import annotations

import _socket
import socket
from collections.abc import Callable
from typing import Any, cast

# The C type's own attributes: plain ints, no conversion.
_raw_family: Callable[[socket.socket], int] = _socket.socket.family.__get__
_raw_type: Callable[[socket.socket], int] = _socket.socket.type.__get__

_FAMILIES: dict[int, socket.AddressFamily] = {member.value: member for member in socket.AddressFamily}
_KINDS: dict[int, socket.SocketKind] = {member.value: member for member in socket.SocketKind}


class Socket(socket.socket):
    """A ``socket.socket`` whose ``family``, ``type`` and ``accept`` skip the enum calls and system calls."""

    __slots__ = ()

    @classmethod
    def from_handoff(cls, fd: int) -> Socket:
        """The connection handed off as ``fd`` (a stream socket; its family is asked of the kernel).

        Raises:
            OSError: ``fd`` is not a socket (ENOTSOCK) or not open (EBADF); it is left open.
        """
        return cls(-1, socket.SOCK_STREAM, 0, fileno=fd)

    # As the standard ones, a value the enum does not know comes back as an int.
    @property
    def family(self) -> socket.AddressFamily:
        value = _raw_family(self)
        return _FAMILIES.get(value, cast(socket.AddressFamily, value))

    @property
    def type(self) -> socket.SocketKind:
        value = _raw_type(self)
        return _KINDS.get(value, cast(socket.SocketKind, value))

    def accept(self) -> tuple[Socket, Any]:
        """``socket.accept``, returning a ``Socket``."""
        fd, address = self._accept()  # type: ignore[attr-defined]
        sock = Socket(_raw_family(self), _raw_type(self), self.proto, fileno=fd)
        # As socket.accept: a blocking listener's connections are blocking
        # too, unless a default timeout says otherwise.
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, address
