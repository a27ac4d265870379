"""Workers accept for themselves (policies ``shared`` and ``reuseport``).

Node's ``SharedHandle`` and gunicorn's model. Each ready worker is sent, in
a ``Listen`` message per listening socket, a socket of its own to accept
on, and the master takes no part in any connection. The two policies
differ only in what that socket is:

- ``SharedAccept``: a copy (``dup``) of the master's listening socket; the
  kernel's one accept queue decides who gets each connection, which favours
  whichever worker happens to be waiting in accept;
- ``ReusePortAccept``: a new SO_REUSEPORT socket bound to the same address;
  the kernel hashes each connection (by its addresses and ports) to one of
  them, so the spread is statistical, and connections waiting in a worker's
  own queue are lost when it dies (a worker that drains takes them first:
  its workers are started with ``--own-listeners``, see ``worker.acceptor``).
  The master binds each worker's socket for it
  (so privileged ports and port 0 work the same as in the other policies);
  its own socket only holds the port: bound with SO_REUSEPORT but never
  listening, so it is not in the kernel's group and receives nothing.

On a graceful stop the master closes its listeners to new connections
(``dispatcher.listeners``) before telling the workers to drain; under
shared, that is the socket the workers accept on, and each takes what is
queued before closing its copy.

fd ownership: the sockets made for a worker are the channel's once queued
(``Channel.send`` closes them once sent); if making one fails, those made
before it are closed here and the worker gets none.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

from dispatcher.listeners import BindError, BindSpec, Listener, open_listeners, reuseport_sibling
from dispatcher.stats import DistributionFigures
from dispatcher.worker_process import WorkerProcess
from shared.protocol import Listen


class WorkersAccept:
    """The workers-accept distribution (see ``dispatcher.distribution``), with shared sockets."""

    POLICIES = ("shared", "reuseport")
    name = "shared"

    def __init__(self) -> None:
        self._listeners: Sequence[Listener] = ()
        self._backlog = 0
        self._keys: set[int] = set()

    def __str__(self) -> str:
        return self.name

    def listen(self, specs: Sequence[BindSpec], backlog: int) -> list[Listener]:
        self._backlog = backlog
        return open_listeners(specs, backlog)

    def _socket_for_worker(self, listener: Listener) -> socket.socket:
        return listener.sock.dup()

    def start(self, loop: asyncio.AbstractEventLoop, listeners: Sequence[Listener]) -> tuple[str, ...]:
        self._listeners = listeners
        return ()

    #: Never told: the master accepts nothing.
    on_fd_limit: Callable[[], None] | None = None
    connections_held = 0

    def hold_at_most(self, connections: int, workers: int) -> int:
        return 0  # the workers accept: the master holds no connection

    def add(self, worker: WorkerProcess) -> None:
        socks: list[socket.socket] = []
        try:
            for listener in self._listeners:
                socks.append(self._socket_for_worker(listener))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        # Attached first: a send that fails closes the channel at once, and
        # that removes the worker again.
        self._keys.add(worker.key)
        for sock in socks:
            worker.channel.send(Listen(), sock.detach())

    def remove(self, worker: WorkerProcess) -> bool:
        # It stops accepting when it drains (it closes its sockets then).
        self._keys.discard(worker.key)
        return not self._keys

    def forget(self, worker: WorkerProcess) -> int:
        self.remove(worker)
        return 0  # the master held none of its connections

    def on_ack(self, worker: WorkerProcess, conn_ids: tuple[int, ...], accepted: bool, load: int) -> None:
        # Nothing was handed to it: an ack is a lie.
        self.remove(worker)
        worker.faulted(f"ack for connection {conn_ids[0]} it was not given")

    def on_acked(self, worker: WorkerProcess, count: int, load: int) -> None:
        # Its lane holds nothing in flight, so no ack is ever settled for it; one would be a lie.
        self.remove(worker)
        worker.faulted(f"ack of {count} connection(s) it was not given")

    def report_load(self, worker: WorkerProcess, load: int) -> None:
        """Nothing to do: the kernel, not the master, chooses who takes a connection."""

    def stop(self, sweep: bool) -> None:
        """Nothing to do: the master closes the listeners; each worker closes its own when it drains."""

    async def settle(self) -> None:
        """Nothing to wait for: the master holds no connection."""

    def close(self) -> int:
        return 0

    def figures(self) -> DistributionFigures:
        return {"accepted": 0, "accept_errors": 0, "accept_rate": 0.0, "pending": 0, "in_flight": 0,
                "handed_off": 0, "handoff_messages": 0, "redispatched": 0, "expired": 0}


class SharedAccept(WorkersAccept):
    """Every worker accepts on a copy of the master's listening socket."""


class ReusePortAccept(WorkersAccept):
    """Every worker accepts on a SO_REUSEPORT socket of its own, bound to the same address."""

    name = "reuseport"

    def listen(self, specs: Sequence[BindSpec], backlog: int) -> list[Listener]:
        for spec in specs:
            if spec.is_unix:
                raise BindError(f"bind {spec.text!r}: the reuseport policy needs TCP addresses")
        self._backlog = backlog
        return open_listeners(specs, backlog, listen=False, reuseport=True)

    def _socket_for_worker(self, listener: Listener) -> socket.socket:
        return reuseport_sibling(listener, self._backlog)

    def start(self, loop: asyncio.AbstractEventLoop, listeners: Sequence[Listener]) -> tuple[str, ...]:
        super().start(loop, listeners)
        # Closing a worker's socket loses its queue: the worker closes it to
        # new connections and takes what it holds first, whenever it drains.
        return ("--own-listeners",)
