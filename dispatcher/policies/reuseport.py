"""SO_REUSEPORT: each worker has its own listening socket on the same port.

The kernel hashes each new connection (by its addresses and ports) to one of
the listening sockets, so the spread is statistical and ignores how busy a
worker is, and connections waiting in a dying worker's own queue are lost.
The master binds each worker's socket for it (so privileged ports and port
0 work the same as in the other policies); its own socket only holds the
port: bound with SO_REUSEPORT but never listening, so it is not in the
kernel's group and receives nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import ClassVar

from dispatcher.listeners import BindError, BindSpec, Listener, open_listener, reuseport_sibling
from dispatcher.policies.shared import SharedAccept


class ReusePort(SharedAccept):
    name: ClassVar[str] = "reuseport"

    def open_listener(self, spec: BindSpec, backlog: int) -> Listener:
        if spec.is_unix:
            raise BindError(f"bind {spec.text!r}: the reuseport policy needs TCP addresses")
        return open_listener(spec, backlog, listen=False, reuseport=True)

    def sockets_for_worker(self, listeners: Sequence[Listener], backlog: int) -> list[socket.socket]:
        socks: list[socket.socket] = []
        try:
            for listener in listeners:
                socks.append(reuseport_sibling(listener, backlog))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks
