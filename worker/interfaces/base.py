"""The one shape every interface has, and what the runtime gives it.

An interface is how the worker serves the connections it gets: the app's
own asyncio streams handler, a blocking handler on threads, a custom server,
or a web app (ASGI, WSGI). The runtime (``worker.runtime``) owns the channel
to the master: it takes each hand-off, acks it, and refuses it while
draining. An interface owns what happens to a socket once the runtime gives
it one, and nothing else:

- ``start()`` gets it ready (a web app's lifespan startup, a custom server's
  own set-up); the runtime tells the master it is ready only once it returns,
  and a ``BootFailed`` is a failed boot;
- ``serve(sock, conn_id, proxied)`` takes a connection: the socket is the
  interface's from then on, to close. ``conn_id`` is None when the runtime
  acked it already (``acks_per_handoff``: one ack for a whole hand-off,
  queued before the connections' first step) or the worker accepted it
  itself; otherwise the interface acks it as its handler takes it
  (``Context.ack`` on the loop, ``Context.ack_from_thread`` on a pool
  thread). ``proxied`` (``--proxy-protocol``, ``worker.proxy_header``): the
  client the app is to see instead of the socket's peer (``client_of``),
  and the header bytes the interface skips right after its ack (only ever
  with a ``conn_id``: otherwise the runtime skipped them);
- ``load`` and ``handled``: the connections open now (the master's figure
  for least-loaded dealing) and finished so far;
- ``drain()`` asks it to finish what it has and take nothing more;
  ``finish()`` returns once it has (bounded by the graceful timeout where
  the interface can tell when a connection is done with);
- ``close()`` lets go of what is left, at exit.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.exitcodes import ExitCode
from shared.web_options import WebOptions
from worker import api
from worker.app import App
from worker.proxy_header import AS_IS, Proxied
from worker.tasks import Tasks

log = logging.getLogger(__name__)


class BootFailed(Exception):
    """The interface cannot start serving; the message is one line naming the app and why."""


@dataclass
class Context:
    """What the runtime gives an interface."""

    loop: asyncio.AbstractEventLoop
    worker_id: int
    #: Thread pool size for blocking handlers and WSGI apps (None: Python's default).
    threads: int | None
    web: WebOptions
    #: How long a drain may take before the master kills the worker.
    graceful_timeout_s: float
    api: api.Worker
    #: Ack connections, on the loop.
    ack: Callable[[tuple[int, ...]], None]
    #: Ack one connection from a pool thread with the given load; False if it could not be sent.
    ack_from_thread: Callable[[int, int], bool]
    #: The interface is done serving by itself (a custom server returned): drain the worker.
    drain: Callable[[], None]
    #: The interface failed while serving: end the worker with this code.
    exit: Callable[[ExitCode], None]


class Interface(abc.ABC):
    """How a worker serves its connections (see the module docstring for the shape)."""

    #: The name ``--interface`` and the start-up log line use.
    name: ClassVar[str]
    #: The runtime acks a whole hand-off before its connections take their first step.
    acks_per_handoff: ClassVar[bool] = True

    def __init__(self, app: App, context: Context) -> None:
        self.app = app
        self.context = context

    async def start(self) -> None:  # noqa: B027 - most interfaces have nothing to set up
        """Get ready to serve; raise ``BootFailed`` if the app cannot."""

    @abc.abstractmethod
    def serve(self, sock: Any, conn_id: int | None, proxied: Proxied = AS_IS) -> None:
        """Take connection ``sock`` (a ``socket.socket``; the interface closes it)."""

    @property
    @abc.abstractmethod
    def load(self) -> int:
        """Connections open now."""

    @property
    @abc.abstractmethod
    def handled(self) -> int:
        """Connections finished so far."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Take nothing more; finish what is open."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """Return once everything open at ``drain()`` is finished."""

    def close(self) -> None:  # noqa: B027 - most interfaces hold nothing beyond their connections
        """Let go of what is left (the worker is exiting)."""


class TaskInterface(Interface):
    """An interface that runs each connection's handler as a future of its own (streams, blocking).

    The handlers are the app's: draining asks nothing of them (they can see
    ``worker.current().draining``), and the drain is over when the last returns.
    """

    def __init__(self, app: App, context: Context) -> None:
        super().__init__(app, context)
        self._tasks = Tasks(context.loop, self._raised)

    def _raised(self, exc: BaseException) -> None:
        log.error("handler %s raised", self.app.spec, exc_info=exc)

    @property
    def load(self) -> int:
        return len(self._tasks)

    @property
    def handled(self) -> int:
        return self._tasks.finished

    def drain(self) -> None:
        pass

    async def finish(self) -> None:
        await self._tasks.wait_empty()


def peer(sock: Any) -> Any:
    """The socket's peer address, or None if it has none any more."""
    try:
        return sock.getpeername()
    except OSError:
        return None


def client_of(sock: Any, proxied: Proxied) -> Any:
    """The client the app sees: the PROXY protocol header's, else the socket's peer (``peer``)."""
    return proxied.client if proxied.client is not None else peer(sock)
