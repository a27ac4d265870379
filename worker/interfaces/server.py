"""``async def serve(worker)``: a custom server that iterates the worker's connections itself.

It is ready when it starts iterating ``worker.connections()`` (``worker.api``):
its set-up before that may still fail, and counts as a failed boot, not as a
worker that crashed while serving. A handed-off connection is acked when the
server takes it; one it never took is closed at exit, un-acked, and the
master gives it to another worker.

The connections are the app's to close. The socket it gets counts the
connection as handled when it lets go of its fd: ``close()`` (asyncio's
transports call it), or ``detach()`` (uvloop's transports detach the socket
and close the fd themselves).

With ``--proxy-protocol``, ``addr`` is the client the header names, and the
header is skipped as the server takes the connection, right after its ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from shared.exitcodes import ExitCode
from worker import proxy_header
from worker.app import App
from worker.interfaces.base import BootFailed, Context, Interface, client_of
from worker.proxy_header import AS_IS, Proxied
from worker.sockets import Socket

log = logging.getLogger(__name__)


class ServerInterface(Interface):
    name = "server"
    acks_per_handoff = False

    def __init__(self, app: App, context: Context) -> None:
        super().__init__(app, context)
        self._task: asyncio.Task[Any] | None = None
        self._handled = 0
        self._loop_thread = threading.get_ident()

    async def start(self) -> None:
        loop = self.context.loop
        serving: asyncio.Future[None] = loop.create_future()

        def on_serving() -> None:
            if not serving.done():
                serving.set_result(None)

        self.context.api._on_serving = on_serving
        task = self._task = loop.create_task(self.app.handler(self.context.api))
        await asyncio.wait((serving, task), return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            failure = task.exception() if not task.cancelled() else None
            why = f"raised {type(failure).__name__}: {failure}" if failure else "returned"
            log.debug("server %s %s before serving", self.app.spec, why, exc_info=failure)
            raise BootFailed(f"server {self.app.spec} {why} before serving")
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        failure = task.exception() if not task.cancelled() else None
        if failure is not None:
            log.error("server %s raised", self.app.spec, exc_info=failure)
            self.context.exit(ExitCode.ERROR)
        elif not self.context.api.draining:
            log.info("server returned; draining")
            self.context.drain()

    def serve(self, sock: socket.socket, conn_id: int | None, proxied: Proxied = AS_IS) -> None:
        conn = _AppConnection(sock.family, sock.type, sock.proto, sock.detach())
        conn._on_finished = self._finished
        conn.setblocking(False)
        taken = None if conn_id is None else functools.partial(self._take, conn_id, conn, proxied.length)
        self.context.api._deliver_connection(conn, client_of(conn, proxied), taken)

    def _take(self, conn_id: int, conn: socket.socket, header_length: int) -> None:
        self.context.ack((conn_id,))
        if header_length and not proxy_header.skip(conn, header_length):
            log.debug("connection %d went before its PROXY protocol header could be skipped", conn_id)

    def _finished(self) -> None:
        # The app may close a connection on one of its own threads; the
        # counter is the loop's.
        if threading.get_ident() == self._loop_thread:
            self._handled += 1
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
                self.context.loop.call_soon_threadsafe(self._finished)

    @property
    def load(self) -> int:
        return 0  # its connections are the app's: it reports none

    @property
    def handled(self) -> int:
        return self._handled

    def drain(self) -> None:
        pass  # the runtime ends ``connections()``; the server returns when it is done

    async def finish(self) -> None:
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._task)

    def close(self) -> None:
        self.context.api._close_untaken()


class _AppConnection(Socket):
    """A connection given to a custom server: letting go of it counts it as handled, once.

    The app owns the socket, so its end is seen only here: a ``close()``
    (directly, by a ``with`` block, or by asyncio's transport when streams
    wrapped around it close) or a ``detach()`` (uvloop's transport detaches
    the socket and closes the fd itself; so may an app that takes the fd).
    A socket dropped without either is never counted.
    """

    __slots__ = ("_on_finished",)

    _on_finished: Callable[[], None] | None

    # Counted once the socket has let go of its fd: a count the loop sees never
    # comes before the close.
    def close(self) -> None:
        try:
            super().close()
        finally:
            self._finished()

    def detach(self) -> int:
        try:
            return super().detach()
        finally:
            self._finished()

    def _finished(self) -> None:
        # Copies made by dup() have no callback: only the one given to the app counts.
        on_finished = getattr(self, "_on_finished", None)
        if on_finished is not None:
            self._on_finished = None
            on_finished()
