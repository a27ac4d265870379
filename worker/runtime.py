"""The worker's event loop: take connections from the master, run the app on them.

Theory of operation
-------------------
The channel to the master is read from the asyncio loop itself, so a loop
blocked by the app stops acking hand-offs and answering pings, and the master
sees it.

fd ownership:
- A ``Handoff`` fd arrives owned by us (``shared.channel``). While running, we
  wrap it in a socket object that the connection's task closes when the
  handler returns, and ack it as its handler starts, before the app reads a
  byte (as Node's worker acks after its 'connection' event): streams, one
  ack for the whole hand-off in a callback queued just before the
  connections' tasks (their first step runs no app code); blocking, when a
  pool thread picks it up (sent from the thread, which waits for it to be
  in the kernel before it calls the handler); a custom server, when it takes it from
  ``connections()``. So a handler that blocks the loop before they start (or
  a pool whose threads are all busy, or a server that stops taking) leaves
  the connections behind it un-acked, and the master, which closes its own
  copy only on the ack, gives them to another worker when this one is
  killed. Blocking handlers and custom servers cost a datagram per
  connection where a burst used to share one.
- A custom server's connections (handed off or accepted) are the app's to
  close. The socket it gets counts the connection as handled when it lets go
  of its fd: ``close()`` (asyncio's transports call it), or ``detach()``
  (uvloop's transports detach the socket and close the fd themselves).
- While draining we refuse: ``Ack(accepted=False)`` and close our copy; the
  master still holds its own and gives the connection to another worker.
- A ``Listen`` fd (shared and reuseport policies) becomes a listening socket
  we accept on ourselves (``worker.acceptor``); it is closed when draining
  starts (after taking what its queue holds, if it is closing for good), or
  at once if it is not a listening stream socket. Connections it accepts are
  ours alone and are never acked.
- If the master goes away (EOF on the channel), the process exits at once;
  the kernel closes whatever it held. A protocol error on the channel (an
  empty datagram among them, which reads like EOF and is not) is logged as
  such and ends the process the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared import protocol
from shared.channel import PEER_CLOSED, Channel, close_fds
from shared.exitcodes import ExitCode
from shared.protocol import (
    Drain,
    Error,
    Hello,
    Listen,
    Message,
    Ping,
    Pong,
    Ready,
    UserMessage,
)
from worker import api
from worker.acceptor import Acceptor
from worker.app import App, HandlerKind

log = logging.getLogger(__name__)

_STREAM_LIMIT = 64 * 1024
# How long an exiting worker may block sending what it still has queued.
_FLUSH_AT_EXIT_S = 1.0
# How often the event-loop lag is measured.
_LAG_PROBE_S = 0.5


class Runtime:
    """One worker's loop-side state.

    Parameters:
        worker_id: the slot number the master gave this worker.
        chan_sock: this worker's end of the channel.
        loop: the running loop.
        threads: thread pool size for blocking handlers.
        own_listeners: the ``Listen`` sockets are this worker's alone (reuseport;
            see ``worker.acceptor``).
    """

    def __init__(
        self,
        worker_id: int,
        chan_sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        threads: int | None,
        own_listeners: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._threads = threads
        self._app: App | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._acceptor = Acceptor(loop, self._serve, own_listeners=own_listeners)
        self._done: asyncio.Future[ExitCode] = loop.create_future()
        self._server_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.draining = False
        self.ready = False
        self.started = time.monotonic()
        self.handed_off = self.acked = self.refused = self.handled = 0
        self.loop_lag_s = 0.0
        self._lag_due = 0.0
        self._lag_handle: asyncio.TimerHandle | None = None
        self._schedule_lag_probe()
        self.channel = Channel(
            chan_sock, loop, self._on_message, self._on_channel_closed, on_handoff=self._on_handoff
        )
        self.api = api.Worker(worker_id, self.channel.send)
        api._set_current(self.api)
        self.channel.send(Hello(worker_id, os.getpid()))

    # Event-loop lag: how late a timer fires says how long callbacks hold the loop.

    def _schedule_lag_probe(self) -> None:
        self._lag_due = self._loop.time() + _LAG_PROBE_S
        self._lag_handle = self._loop.call_at(self._lag_due, self._lag_probe)

    def _lag_probe(self) -> None:
        self.loop_lag_s = max(0.0, self._loop.time() - self._lag_due)
        self._schedule_lag_probe()

    # Start and stop

    def start(self, app: App) -> None:
        """Begin serving ``app`` and tell the master we are ready."""
        self._app = app
        if app.kind is HandlerKind.BLOCKING:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="handler")
        self._loop.add_signal_handler(signal.SIGTERM, self.drain)
        if app.kind is HandlerKind.SERVER:
            # A custom server is ready when it starts iterating connections:
            # its set-up before that may still fail, and must count as a
            # failed boot, not as a worker that crashed while serving.
            self.api._on_serving = self._ready
            self._server_task = self._loop.create_task(app.handler(self.api))
            self._server_task.add_done_callback(self._on_server_done)
        else:
            self._ready()

    def _ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.channel.send(Ready())

    def fail_boot(self, code: ExitCode, message: str) -> None:
        """Tell the master why we cannot serve; the caller exits with ``code``."""
        with contextlib.suppress(ValueError):
            self.channel.send(Error(int(code), message))

    async def wait(self) -> ExitCode:
        """Run until drained or the master is gone; return the exit code."""
        return await self._done

    def drain(self) -> None:
        """Refuse new hand-offs, stop accepting, exit once open connections finish."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d connection(s) open", len(self._tasks))
        # Before the app hears of it: a custom server still gets what the
        # listeners' queues held.
        self._acceptor.drain()
        self.api._start_draining()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.draining or self._done.done() or self._tasks:
            return
        if self._server_task is not None and not self._server_task.done():
            return
        self._done.set_result(ExitCode.OK)

    def shutdown(self) -> None:
        """Release what the runtime holds (after the loop stopped serving)."""
        if self._lag_handle is not None:
            self._lag_handle.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._acceptor.close()
        self.api._close_untaken()
        # An ack still queued must reach the master, or it would hand the
        # connection to someone else after this worker began reading it.
        self.channel.flush_before_exit(_FLUSH_AT_EXIT_S)
        self.channel.close()

    # Channel

    def _on_channel_closed(self, reason: str) -> None:
        if reason == PEER_CLOSED:
            log.warning("master is gone (channel closed); exiting")
        else:
            log.error("channel to master failed: %s; exiting", reason)
        if not self._done.done():
            self._done.set_result(ExitCode.MASTER_GONE)

    def _on_message(self, message: Message, fds: list[int]) -> None:
        # No Handoff case: the channel gives every hand-off to on_handoff, and
        # one whose fds do not match its ids is a protocol error there.
        match message:
            case Listen():
                self._on_listen(fds[0])
            case Ping(seq):
                self.channel.send(Pong(seq, self.stats()))
            case Drain():
                self.drain()
            case UserMessage(payload):
                self.api._deliver_message(payload)
            case Error(code, text):
                log.error("master reports error %d: %s", code, text)
            case _:
                close_fds(fds)
                log.error("unexpected %s from master; exiting", type(message).__name__)
                if not self._done.done():
                    self._done.set_result(ExitCode.ERROR)

    def _on_handoff(self, conn_ids: tuple[int, ...], fds: list[int]) -> None:
        count = len(conn_ids)
        self.handed_off += count
        if -1 in fds:
            # The kernel dropped fds: we are out of descriptors. Refuse (the
            # master gives the connections to another worker) and make way
            # for a fresh process.
            log.error("out of file descriptors: refusing hand-offs and draining")
            self.drain()
        if self.draining or self._app is None:
            self.refused += count
            close_fds(fd for fd in fds if fd >= 0)
            self.channel.send_bytes(protocol.encode_ack(conn_ids, False))
            return
        streams = self._app.kind is HandlerKind.STREAMS
        if streams:
            # One ack for the hand-off, sent just before its connections' tasks
            # take their first step (which runs no app code: it wraps the
            # socket in a transport and waits). The loop runs callbacks in
            # order, so it goes out after whatever the loop had queued before
            # (a handler that blocks there leaves every one of them un-acked,
            # and the master's) and before any of them is read from.
            self._loop.call_soon(self._ack, conn_ids)
        for conn_id, fd in zip(conn_ids, fds, strict=True):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:  # not a socket after all: nothing to serve
                log.error("hand-off fd %d is unusable: %s", fd, exc)
                os.close(fd)
                if not streams:
                    self._ack((conn_id,))
                continue
            self._serve(sock, None if streams else conn_id)

    def _ack(self, conn_ids: tuple[int, ...]) -> None:
        """Tell the master connections ``conn_ids`` are ours (their handlers start now), with our load.

        The load is the master's figure for least-loaded dealing; a custom
        server's connections are the app's, so it reports none.
        """
        self.acked += len(conn_ids)
        app = self._app
        load = 0 if app is None or app.kind is HandlerKind.SERVER else len(self._tasks)
        self.channel.send_bytes(protocol.encode_ack(conn_ids, True, load))

    def _ack_from_thread(self, conn_id: int, load: int) -> bool:
        """``_ack`` for a pool thread, sent from the thread: in the kernel before the handler runs.

        Returns:
            False if it could not be sent (the channel closed): the handler must not run.
        """
        if not self.channel.send_from_thread(protocol.encode_ack((conn_id,), True, load)):
            return False
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
            self._loop.call_soon_threadsafe(self._count_ack)
        return True

    def _count_ack(self) -> None:
        self.acked += 1

    def _on_listen(self, fd: int) -> None:
        try:
            listener = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)  # a failed socket() leaves the fd to us
            log.error("the master sent a Listen fd that is not a socket (%s); ignoring it", exc.strerror)
            return
        # accept() on anything else fails at once every time the loop wakes.
        if listener.type != socket.SOCK_STREAM or not listener.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            listener.close()
            log.error("the master sent a Listen fd that is not a listening stream socket; ignoring it")
            return
        listener.setblocking(False)
        self._acceptor.add(listener)

    # Connections

    def _serve(self, sock: socket.socket, conn_id: int | None = None) -> None:
        """Run the app on ``sock``; a hand-off's ``conn_id`` is acked as its handler starts."""
        app = self._app
        assert app is not None
        if app.kind is HandlerKind.SERVER:
            conn = _AppConnection(sock.family, sock.type, sock.proto, sock.detach())
            conn._on_finished = self._on_app_connection_finished
            conn.setblocking(False)
            taken = None if conn_id is None else functools.partial(self._ack, (conn_id,))
            self.api._deliver_connection(conn, _peer(conn), taken)
            return
        future: asyncio.Future[Any]
        if app.kind is HandlerKind.STREAMS:
            future = self._loop.create_task(self._run_streams(app, sock))
        else:
            sock.setblocking(True)
            assert self._pool is not None
            # Its load figure as of now, counting itself: the thread may start
            # before the future below is counted.
            started = (None if conn_id is None
                       else functools.partial(self._ack_from_thread, conn_id, len(self._tasks) + 1))
            future = self._loop.run_in_executor(self._pool, _run_blocking, app, sock, started)
        self._tasks.add(future)
        future.add_done_callback(self._on_connection_done)

    def _on_app_connection_finished(self) -> None:
        # The app may close a connection on one of its own threads; the
        # counters are the loop's.
        if threading.get_ident() == self._loop_thread:
            self.handled += 1
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
                self._loop.call_soon_threadsafe(self._on_app_connection_finished)

    def _on_connection_done(self, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        self.handled += 1
        if not future.cancelled() and future.exception() is not None:
            exc = future.exception()
            log.error("handler %s raised", self._app.spec if self._app else "?", exc_info=exc)
        self._maybe_finish()

    async def _run_streams(self, app: App, sock: socket.socket) -> None:
        loop = self._loop
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: stream_protocol, sock=sock)
        writer = _EndingWriter(transport, stream_protocol, reader, loop)
        try:
            await app.handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _on_server_done(self, task: asyncio.Task[Any]) -> None:
        if not self.ready:
            failure = task.exception() if not task.cancelled() else None
            why = f"raised {type(failure).__name__}: {failure}" if failure else "returned"
            message = f"server {self._app.spec if self._app else '?'} {why} before serving"
            log.debug("%s", message, exc_info=failure)
            self.fail_boot(ExitCode.WORKER_BOOT_FAILED, message)
            if not self._done.done():
                self._done.set_result(ExitCode.WORKER_BOOT_FAILED)
            return
        if not task.cancelled() and task.exception() is not None:
            log.error("server %s raised", self._app.spec if self._app else "?",
                      exc_info=task.exception())
            if not self._done.done():
                self._done.set_result(ExitCode.ERROR)
            return
        if not self.draining:
            log.info("server returned; draining")
            self.drain()
        self._maybe_finish()

    def stats(self) -> dict[str, Any]:
        """The worker's own counters, as carried in ``Pong``."""
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "handed_off": self.handed_off,
            "acked": self.acked,
            "refused": self.refused,
            "accepted": self._acceptor.accepted,
            "active": len(self._tasks),
            "handled": self.handled,
            "draining": self.draining,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 3),
        }


class _AppConnection(socket.socket):
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


class _EndingWriter(asyncio.StreamWriter):
    """A StreamWriter whose ``close`` sends the FIN itself, once what is buffered is written.

    A close alone ends a TCP connection only when every copy of the socket is
    closed, and the master holds one until it reads this worker's ack; under
    load that can be a scheduling slice after a short handler has finished.
    Covers the handler's own ``writer.close()`` and ours after it returns.
    """

    def close(self) -> None:
        if not self.transport.is_closing() and self.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.write_eof()
        super().close()


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _run_blocking(app: App, sock: socket.socket, started: Callable[[], bool] | None) -> None:
    # A plain close, no shutdown: a blocking handler may have given the socket
    # to a child process that still writes to it. So the FIN goes out once the
    # master has closed its copy too (when it reads the ack).
    with sock:
        if started is not None and not started():
            return  # not acked: the connection is still the master's to give to another worker
        app.handler(sock, _peer(sock))
