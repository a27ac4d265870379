"""The worker's event loop: take connections from the master, give them to the app's interface.

Theory of operation
-------------------
The channel to the master is read from the asyncio loop itself, so a loop
blocked by the app stops acking hand-offs and answering pings, and the master
sees it.

fd ownership:
- A ``Handoff`` fd arrives owned by us (``shared.channel``). While running, we
  wrap it in a socket object (``worker.sockets``) and give it to the app's
  interface (``worker.interfaces``), whose it is from then on to close. It is
  acked as its handler starts, before the app reads a byte (as Node's worker
  acks after its 'connection' event): streams, ASGI and WSGI, one ack for the
  whole hand-off in a callback queued just before the connections' tasks
  (their first step runs no app code); blocking, when a pool thread picks
  it up (sent from the thread, which waits for it to be in the kernel
  before it calls the handler); a custom server, when it takes it from
  ``connections()``. So a handler that blocks the loop before they start (or
  a pool whose threads are all busy, or a server that stops taking) leaves
  the connections behind it un-acked, and the master, which closes its own
  copy only on the ack, gives them to another worker when this one is
  killed. Blocking handlers and custom servers cost a datagram per
  connection where a burst used to share one.
- While draining (or before we are ready: a web app's lifespan startup may
  still run) we refuse: ``Ack(accepted=False)`` and close our copy; the
  master still holds its own and gives the connection to another worker.
- A ``Listen`` fd (shared and reuseport policies) becomes a listening socket
  we accept on ourselves (``worker.acceptor``); it is closed when draining
  starts (after taking what its queue holds, if it is closing for good), or
  at once if it is not a listening stream socket. Connections it accepts are
  ours alone and are never acked.
- ``--proxy-protocol``: each connection, handed off or accepted here, first
  goes through ``worker.proxy_header``, which peeks at its header and gives
  it to the interface with the client it names. It only peeks: the
  interface consumes the header at its ack point (streams and the web
  interfaces are acked already when the peek starts, so it is consumed
  then; blocking and custom servers consume it when they ack). One closed
  for want of a header is acked then (it is ours: the master must let go).
  A drain waits for the headers being read.
- If the master goes away (EOF on the channel), the process exits at once;
  the kernel closes whatever it held. A protocol error on the channel (an
  empty datagram among them, which reads like EOF and is not) is logged as
  such and ends the process the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from shared import protocol
from shared.allow_ips import AllowIps
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
from shared.web_options import WebOptions
from worker import api, interfaces, proxy_header
from worker.acceptor import Acceptor
from worker.app import App
from worker.sockets import Socket

log = logging.getLogger(__name__)

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
        threads: thread pool size for blocking handlers and WSGI apps.
        own_listeners: the ``Listen`` sockets are this worker's alone (reuseport;
            see ``worker.acceptor``).
        web: the ASGI and WSGI interfaces' settings.
        graceful_timeout_s: how long a drain may take before the master kills us.
        proxy_protocol: trusted peers (``web.forwarded_allow_ips``) send a PROXY protocol header first.
    """

    def __init__(
        self,
        worker_id: int,
        chan_sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        threads: int | None,
        own_listeners: bool = False,
        web: WebOptions | None = None,
        graceful_timeout_s: float = 30.0,
        proxy_protocol: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self._loop = loop
        self._threads = threads
        self._web = web or WebOptions()
        self._graceful_timeout_s = graceful_timeout_s
        self._app: App | None = None
        self._interface: interfaces.Interface | None = None
        self._acks_per_handoff = True
        self._acceptor = Acceptor(loop, self._serve, own_listeners=own_listeners)
        self._headers = (proxy_header.HeaderReader(loop, AllowIps.parse(self._web.forwarded_allow_ips),
                                                   self._ack)
                         if proxy_protocol else None)
        self._done: asyncio.Future[ExitCode] = loop.create_future()
        self._starting: asyncio.Task[None] | None = None
        self._finishing: asyncio.Task[None] | None = None
        self.draining = False
        self.ready = False
        self.started = time.monotonic()
        self.handed_off = self.acked = self.refused = 0
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
        """Begin serving ``app``; the master hears we are ready once its interface has started."""
        self._app = app
        self._loop.add_signal_handler(signal.SIGTERM, self.drain)
        log.info("serving %s through the %s interface", app.spec, app.kind.value)
        self._starting = self._loop.create_task(self._start(app))

    async def _start(self, app: App) -> None:
        context = interfaces.Context(
            loop=self._loop, worker_id=self.worker_id, threads=self._threads, web=self._web,
            graceful_timeout_s=self._graceful_timeout_s, api=self.api, ack=self._ack,
            ack_from_thread=self._ack_from_thread, drain=self.drain, exit=self._exit,
        )
        try:
            interface = interfaces.create(app, context)
            self._interface = interface
            self._acks_per_handoff = interface.acks_per_handoff
            await interface.start()
        except Exception as exc:
            # A BootFailed is one line already; anything else is a bug or the app's, named as it is.
            why = str(exc) if isinstance(exc, interfaces.BootFailed) else (
                f"app {app.spec}: the {app.kind.value} interface failed to start: "
                f"{type(exc).__name__}: {exc}")
            log.debug("boot failed", exc_info=True)
            self.fail_boot(ExitCode.WORKER_BOOT_FAILED, why)
            self._exit(ExitCode.WORKER_BOOT_FAILED)
            return
        if self._done.done():
            return
        self.ready = True
        self.channel.send(Ready())
        if self.draining:  # told to drain while starting
            self._begin_finishing()

    def fail_boot(self, code: ExitCode, message: str) -> None:
        """Tell the master why we cannot serve; the caller exits with ``code``."""
        with contextlib.suppress(ValueError):
            self.channel.send(Error(int(code), message))

    def _exit(self, code: ExitCode) -> None:
        if not self._done.done():
            self._done.set_result(code)

    async def wait(self) -> ExitCode:
        """Run until drained or the master is gone; return the exit code."""
        return await self._done

    def drain(self) -> None:
        """Refuse new hand-offs, stop accepting, exit once open connections finish."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d connection(s) open", self.load)
        # Before the app hears of it: a custom server still gets what the
        # listeners' queues held.
        self._acceptor.drain()
        self.api._start_draining()
        if self.ready:
            self._begin_finishing()
        elif self._starting is None:
            self._exit(ExitCode.OK)  # nothing was ever started

    def _begin_finishing(self) -> None:
        interface = self._interface
        assert interface is not None
        interface.drain()
        self._finishing = self._loop.create_task(self._finish(interface))

    async def _finish(self, interface: interfaces.Interface) -> None:
        if self._headers is not None:
            await self._headers.wait_read()  # bounded by the header timeout
        await interface.finish()
        self._exit(ExitCode.OK)

    def shutdown(self) -> None:
        """Release what the runtime holds (after the loop stopped serving)."""
        if self._lag_handle is not None:
            self._lag_handle.cancel()
        for task in (self._starting, self._finishing):
            if task is not None:
                task.cancel()
        if self._headers is not None:
            self._headers.close()
        if self._interface is not None:
            self._interface.close()
        self._acceptor.close()
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
        self._exit(ExitCode.MASTER_GONE)

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
                self._exit(ExitCode.ERROR)

    def _on_handoff(self, conn_ids: tuple[int, ...], fds: list[int]) -> None:
        count = len(conn_ids)
        self.handed_off += count
        if -1 in fds:
            # The kernel dropped fds: we are out of descriptors. Refuse (the
            # master gives the connections to another worker) and make way
            # for a fresh process.
            log.error("out of file descriptors: refusing hand-offs and draining")
            self.drain()
        interface = self._interface
        if self.draining or not self.ready or interface is None:
            self.refused += count
            close_fds(fd for fd in fds if fd >= 0)
            self.channel.send_bytes(protocol.encode_ack(conn_ids, False))
            return
        per_handoff = self._acks_per_handoff
        if per_handoff:
            # One ack for the hand-off, sent just before its connections' tasks
            # take their first step (which runs no app code: it wraps the
            # socket in a transport). The loop runs callbacks in order, so it
            # goes out after whatever the loop had queued before (a handler
            # that blocks there leaves every one of them un-acked, and the
            # master's) and before any of them is read from.
            self._loop.call_soon(self._ack, conn_ids)
        for conn_id, fd in zip(conn_ids, fds, strict=True):
            try:
                sock = Socket.from_handoff(fd)
            except OSError as exc:  # not a socket after all: nothing to serve
                log.error("hand-off fd %d is unusable: %s", fd, exc)
                os.close(fd)
                if not per_handoff:
                    self._ack((conn_id,))
                continue
            self._give(interface, sock, None if per_handoff else conn_id)

    def _ack(self, conn_ids: tuple[int, ...]) -> None:
        """Tell the master connections ``conn_ids`` are ours (their handlers start now), with our load."""
        self.acked += len(conn_ids)
        self.channel.send_bytes(protocol.encode_ack(conn_ids, True, self.load))

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
            listener = Socket(fileno=fd)
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

    def _serve(self, sock: socket.socket) -> None:
        """Serve a connection this worker accepted itself (shared, reuseport): never acked."""
        if self._interface is None:
            sock.close()
            return
        self._give(self._interface, sock, None)

    def _give(self, interface: interfaces.Interface, sock: socket.socket, conn_id: int | None) -> None:
        """Give ``sock`` to the interface, after its PROXY protocol header if there is one to read."""
        if self._headers is None:
            interface.serve(sock, conn_id)
        else:
            self._headers.give(sock, conn_id, interface.serve)

    # Figures

    @property
    def load(self) -> int:
        """Connections open now, as the interface counts them (the master's least-loaded figure)."""
        reading = 0 if self._headers is None else self._headers.reading
        return reading + (0 if self._interface is None else self._interface.load)

    @property
    def handled(self) -> int:
        return 0 if self._interface is None else self._interface.handled

    def stats(self) -> dict[str, Any]:
        """The worker's own counters, as carried in ``Pong``."""
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "handed_off": self.handed_off,
            "acked": self.acked,
            "refused": self.refused,
            "accepted": self._acceptor.accepted,
            "active": self.load,
            "handled": self.handled,
            "draining": self.draining,
            "loop_lag_ms": round(self.loop_lag_s * 1000, 3),
        }
