"""What the comparison's apps (``bench.asgi_app``, ``bench.wsgi_app``) share: who they are, readiness, probes.

Standard library only, so that importing it adds the same few kilobytes to
every server's workers (their idle RSS is one of the figures).

- ``WORKER_HEADER``: every answer names the process that served it
  (``x-worker: <pid>``); the load clients count answers per worker from it.
- ``mark_ready``: called when an app module is imported, i.e. in each worker
  that loads the app (none of the servers compared imports it in its
  supervisor, but ``bench.peer_servers`` leaves the supervisor out anyway).
  With ``BENCH_PEER_READY_DIR`` set it creates ``DIR/<pid>``: the lab learns
  the worker pids of any server from that directory, the same way for all.
- ``tcp_nodelay``: whether the accepted sockets of this process have
  ``TCP_NODELAY`` on, read with ``getsockopt`` on a duplicate of each fd
  (the option belongs to the socket, not the fd, so the duplicate reads the
  server's own setting). No server exposes its socket portably to the app,
  but every one compared runs the app in the process that holds the socket.
- ``burn_cpu``: the ``/cpu`` path's 2 ms of CPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

WORKER_HEADER = "x-worker"
READY_DIR_ENV = "BENCH_PEER_READY_DIR"
#: The ``/cpu`` path's work, and ``/sleep``'s wait.
CPU_BURN_S = 0.002
SLEEP_S = 1.0
PID = os.getpid()


async def answer_lifespan(receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                          send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
    """Answer an ASGI lifespan scope: nothing to start or stop, so no server logs that it is unsupported."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def mark_ready() -> None:
    """Create ``$BENCH_PEER_READY_DIR/<pid>`` if the variable is set (the worker has loaded the app)."""
    directory = os.environ.get(READY_DIR_ENV)
    if directory:
        with contextlib.suppress(OSError):  # the lab is gone: nobody reads it
            open(os.path.join(directory, str(os.getpid())), "x").close()


def burn_cpu(seconds: float = CPU_BURN_S) -> None:
    """Hold the CPU for ``seconds`` (a busy loop, as a CPU-bound handler would)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _accepted_sockets(local_port: int | None) -> list[socket.socket]:
    """Duplicates of this process's connected TCP sockets, those on ``local_port`` if given."""
    found: list[socket.socket] = []
    seen: set[str] = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            # uvloop, for one, keeps a second fd of a connection: one socket (inode) is read once.
            if not target.startswith("socket:") or target in seen:
                continue
            seen.add(target)
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile (the listing's own fd among them)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                sock.getpeername()  # raises on a listening socket
                if local_port is None or sock.getsockname()[1] == local_port:
                    found.append(sock)
                    continue
        except OSError:
            pass
        sock.close()
    return found


def tcp_nodelay(peer: tuple[str, int] | None, local_port: int | None) -> str:
    """``TCP_NODELAY`` of the connection from ``peer`` (else of every accepted one) as ``nodelay=...``.

    Returns ``nodelay=1 sockets=1`` for the one connection from ``peer``;
    without a peer port (WSGI servers other than gunicorn give none), the
    values of every connected socket on ``local_port``, e.g.
    ``nodelay=1,1 sockets=2``: call it on an otherwise idle server.
    """
    sockets = _accepted_sockets(local_port)
    try:
        if peer is not None:
            mine = [s for s in sockets if s.getpeername()[:2] == tuple(peer)]
            sockets = mine or sockets
        values = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return f"nodelay={','.join('1' if v else '0' for v in values) or 'none'} sockets={len(values)}"
