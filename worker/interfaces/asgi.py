"""ASGI 3 apps (Starlette, FastAPI, ...): uvicorn's HTTP/1.1 and WebSocket protocols, in the worker's loop.

Each connection gets a task that hands its socket to uvicorn's protocol
(``worker.uvicorn_adapter``, the one module that touches uvicorn); the
socket is the transport's from then on. The runtime acks a hand-off before
those tasks take their first step, and nothing is read before it: the
transport starts reading only once the task has made it.

Draining: from ``drain()`` every response not yet started carries
``Connection: close``, idle keep-alive connections close, a connection whose
first request has not come yet gets ``FIRST_REQUEST_GRACE_S`` to send it and
is answered, and WebSockets are closed with 1012 (service restart). What is
still open a little before the master's graceful timeout runs out is
aborted, so the lifespan shutdown gets its turn before the master's kill.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, ClassVar

from worker.app import App
from worker.interfaces.base import BootFailed, Context, Interface
from worker.proxy_header import AS_IS, Proxied
from worker.uvicorn_adapter import EmbeddedServer, LifespanFailed, check_version

log = logging.getLogger(__name__)

#: How long a connection handed over before the drain may take to send its first request.
FIRST_REQUEST_GRACE_S = 1.0
#: Of the graceful timeout, what is kept back for the lifespan shutdown (at most).
SHUTDOWN_RESERVE_S = 5.0


class AsgiInterface(Interface):
    name = "asgi"
    #: The app is WSGI, served through a2wsgi (no WebSockets, no lifespan).
    wsgi: ClassVar[bool] = False

    def __init__(self, app: App, context: Context) -> None:
        super().__init__(app, context)
        warning = check_version()
        if warning:
            log.warning("%s", warning)
        try:
            self._server = EmbeddedServer(
                self._asgi_app(), context.web, worker_id=context.worker_id, wsgi=self.wsgi)
        except ValueError as exc:
            raise BootFailed(f"app {app.spec}: {exc}") from exc
        self._served = 0
        self._deadline = 0.0

    def _asgi_app(self) -> Any:
        return self.app.handler

    async def start(self) -> None:
        try:
            await self._server.startup()
        except LifespanFailed as exc:
            raise BootFailed(f"app {self.app.spec}: lifespan startup failed: {exc}") from exc

    def serve(self, sock: socket.socket, conn_id: int | None, proxied: Proxied = AS_IS) -> None:
        self._served += 1
        # Counted from now on, so the ack that goes out before its first step carries it.
        self._server.serve(sock, client=proxied.client)

    @property
    def load(self) -> int:
        return self._server.open_connections

    @property
    def handled(self) -> int:
        return self._served - self.load

    def drain(self) -> None:
        # A connection still being made (a TLS handshake) is drained once it is, by the adapter.
        self._deadline = self.context.loop.time() + self.context.graceful_timeout_s
        self._server.drain(FIRST_REQUEST_GRACE_S)

    async def finish(self) -> None:
        reserve = min(SHUTDOWN_RESERVE_S, self.context.graceful_timeout_s / 4)
        loop = self.context.loop
        await self._server.wait_closed(max(0.0, self._deadline - reserve - loop.time()))
        await self._server.shutdown(max(0.1, self._deadline - loop.time()))

    def close(self) -> None:
        self._server.close()
