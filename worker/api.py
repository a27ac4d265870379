"""The worker as seen by application code: its id, its connections, its master.

A custom server is an ``async def serve(worker)`` given as ``--app``; it
iterates the connections the master hands to this worker::

    async def serve(worker: Worker) -> None:
        async for sock, addr in worker.connections():
            asyncio.create_task(handle(sock, addr))

Ordinary handlers can reach the same object through ``worker.current()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from shared.protocol import UserMessage

log = logging.getLogger(__name__)

Address = Any
MessageHandler = Callable[[Any], None]

_current: Worker | None = None


class Worker:
    """This worker process: who it is and what it receives.

    Created by the worker runtime; applications do not construct it.
    """

    def __init__(self, worker_id: int, send: Callable[[UserMessage], None]) -> None:
        self.id = worker_id
        self.pid = os.getpid()
        self._send = send
        # Each with what to call once the app takes it (the hand-off's ack), if anything.
        self._incoming: asyncio.Queue[tuple[socket.socket, Address, Callable[[], None] | None] | None] = (
            asyncio.Queue()
        )
        self._message_handlers: list[MessageHandler] = []
        self._draining = asyncio.Event()
        self._drain_future: asyncio.Task[bool] | None = None
        #: Set by the runtime: called when a custom server starts iterating.
        self._on_serving: Callable[[], None] | None = None

    @property
    def draining(self) -> bool:
        """True once the worker was told to stop taking connections."""
        return self._draining.is_set()

    async def wait_draining(self) -> None:
        """Return when the worker starts draining (for closing idle keep-alives)."""
        await self._draining.wait()

    async def read_unless_draining(self, reader: asyncio.StreamReader, n: int) -> bytes | None:
        """``await reader.read(n)``, or None if the worker starts draining first.

        For keep-alive servers waiting on an idle connection: returning None
        tells them to close it, so a graceful stop or reload need not wait for
        the client to go away.
        """
        if self.draining:
            return None
        read = asyncio.ensure_future(reader.read(n))
        await asyncio.wait((read, self._drain_waiter()), return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        read.cancel()
        return None

    def _drain_waiter(self) -> asyncio.Task[bool]:
        # One task for the whole worker, shared by every idle connection.
        if self._drain_future is None:
            self._drain_future = asyncio.ensure_future(self._draining.wait())
        return self._drain_future

    async def connections(self) -> AsyncIterator[tuple[socket.socket, Address]]:
        """Yield ``(sock, addr)`` for each accepted connection, until draining.

        Each socket is non-blocking and acknowledged to the master as it is yielded; the
        caller owns it and must close it. Its close (``close()``, a ``with``
        block, or the close of asyncio streams opened on it) is when the
        worker counts it as handled; a socket dropped unclosed never is.
        """
        if self._on_serving is not None:
            self._on_serving()
        while True:
            item = await self._incoming.get()
            if item is None:
                return
            sock, addr, taken = item
            if taken is not None:
                # Acked only now: one the app never takes goes to another
                # worker if this one dies.
                taken()
            yield sock, addr

    def send(self, payload: Any) -> None:
        """Send a JSON-serialisable message to the master.

        Raises:
            ValueError: ``payload`` is not JSON-serialisable or too large.
        """
        self._send(UserMessage(payload))

    def on_message(self, handler: MessageHandler) -> None:
        """Call ``handler(payload)`` for each message the master sends this worker.

        Handlers run on the event loop, in the order they were added. One that
        raises is logged with its traceback and the others still run.
        """
        self._message_handlers.append(handler)

    # Used by the runtime.

    def _deliver_connection(
        self, sock: socket.socket, addr: Address, taken: Callable[[], None] | None = None
    ) -> None:
        self._incoming.put_nowait((sock, addr, taken))

    def _deliver_message(self, payload: Any) -> None:
        # One handler's bug must not cost the others their message, nor
        # surface in the channel's reader as if the channel had failed.
        for handler in list(self._message_handlers):
            try:
                handler(payload)
            except Exception:
                log.exception("message handler %s raised", _describe(handler))

    def _close_untaken(self) -> None:
        """Close the connections the app never took (un-acked: the master still has its copies)."""
        while not self._incoming.empty():
            item = self._incoming.get_nowait()
            if item is not None:
                item[0].close()

    def _start_draining(self) -> None:
        self._draining.set()
        self._incoming.put_nowait(None)


def _describe(handler: MessageHandler) -> str:
    name = getattr(handler, "__qualname__", None)
    module = getattr(handler, "__module__", None)
    if name is None:
        return repr(handler)
    return f"{module}.{name}" if module else str(name)


def current() -> Worker:
    """Return the worker this process runs as.

    Raises:
        RuntimeError: not inside a dispatcher worker.
    """
    if _current is None:
        raise RuntimeError("not running inside a dispatcher worker")
    return _current


def _set_current(worker: Worker) -> None:
    global _current
    _current = worker
