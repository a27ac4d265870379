"""The master process: the parts wired together, signals, timers, and stopping.

The loop is gunicorn's arbiter, split by concept:

- ``distribution`` (chosen once from ``--policy``): how connections reach
  workers, the master accepting and handing them off (``master_accepts``) or the
  workers accepting for themselves (``workers_accept``); it binds the
  listeners;
- ``supervisor``: the worker slots, starting, restarting, replacing and
  retiring processes (``lifecycle`` holds the rules, ``recycling`` says when
  one is due, ``reload`` replaces them all in batches);
- ``health``: pings; ``messages``: user messages both ways;
- ``control`` and ``metrics`` (with ``probes``): the operator's interfaces,
  which see the master only as the operations they need, a ``snapshot`` and
  its ``readiness``.

This module builds them in that order (each part gets only what exists
already), then starts them, runs the timers (boot timeouts and recycling
once a second, pings every ``--ping-interval``), reacts to signals and
stops.

Theory of operation (fds)
-------------------------
- Listening sockets: bound by the distribution, owned here, closed on stop.
  Copies for workers that accept themselves are the channel's once queued.
  A graceful stop closes them to new connections first, so that what their
  queues hold is accepted, not reset (``dispatcher.listeners``).
- Accepted connections (hand-off): owned by the scheduler until acked (see
  ``dispatcher.scheduler``). When a worker dies, its channel is drained
  first (acks it sent before dying still count), then its un-acked
  connections go back to the front of the queue for the next worker.
- Channels and pidfds: one each per worker process, closed when it is reaped.

Signals are received by asyncio's handler, which only writes to the loop's
wake-up fd; the callbacks here run on the loop, never in signal context.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dispatcher import fd_budget
from dispatcher.config import Config
from dispatcher.distribution import Distribution, for_policy
from dispatcher.health import Health
from dispatcher.listeners import BindError, Listener
from dispatcher.messages import Mailbox, MessageHandler
from dispatcher.recycling import Recycling
from dispatcher.reload import Reload
from dispatcher.snapshot import About, Snapshot, take_snapshot
from dispatcher.stats import ProcessSampler
from dispatcher.supervisor import Supervisor
from dispatcher.version import __version__
from dispatcher.worker_process import WorkerEvents, WorkerProcess, spawn
from shared import eventloop, protocol
from shared.exitcodes import ExitCode
from shared.prctl_extra import prctl_available
from shared.web_options import WebOptions

log = logging.getLogger(__name__)

#: How long killed workers get to be reaped before the master gives up on them.
_REAP_TIMEOUT_S = 5.0
#: A fast stop (QUIT, a second INT) gives workers this long after SIGTERM.
_FAST_STOP_GRACE_S = 1.0
#: How often boot timeouts and recycling limits are checked.
_TICK_S = 1.0


class Master:
    """Runs the whole server until stopped; ``run`` returns the exit code."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.distribution: Distribution = for_policy(config)
        self.health = Health(config.ping_interval_s, config.ping_timeout_s)
        self.mailbox = Mailbox()
        self._recycling = Recycling(config.max_requests, config.max_requests_jitter, config.max_memory)
        self.supervisor = Supervisor(
            config, self.distribution, self.health, self._recycling, self.mailbox,
            spawn=self._spawn, on_fatal=self._on_fatal,
        )
        self._reload = Reload(self.supervisor, config.reload_batch, config.boot_timeout_s)
        self._about: About = {
            "version": __version__, "app": config.app, "policy": config.policy,
            "window": config.window, "loop": eventloop.resolve(config.loop),
        }
        self._worker_args = _worker_args(config)
        self.listeners: list[Listener] = []
        self.started = time.monotonic()
        self.sampler = ProcessSampler(os.getpid())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[tuple[ExitCode, bool]] | None = None
        #: While a drain delay runs: its timer, which begins the stop, and what /readyz says.
        self._drain: asyncio.TimerHandle | None = None
        self._drain_reason = ""
        self._fast = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._services: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fds = fd_budget.Keeper(
            self.distribution, lambda: len(self.supervisor.slots), lambda: len(self.supervisor.live()),
            config.max_pending, config.window,
        )

    @property
    def stopping(self) -> bool:
        """True once the stop has begun (the supervisor restarts nothing from then on)."""
        return self.supervisor.stopping

    @property
    def message_handlers(self) -> list[MessageHandler]:
        """Called with (worker id, payload) for each message a worker sends."""
        return self.mailbox.handlers

    # Running

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        return int(eventloop.run(self.serve(), self.config.loop))

    async def serve(self) -> ExitCode:
        """Bind, start workers and serve on the running loop until stopped."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self._fast = asyncio.Event()
        before, after = fd_budget.raise_soft_limit()
        if after != before:
            log.info("open-files limit raised from %d to %d (the hard limit)", before, after)
        try:
            self.listeners = self.distribution.listen(self.config.binds, self.config.backlog)
        except BindError as exc:
            log.error("%s", exc)
            return ExitCode.ERROR
        try:
            try:
                await self._start_services()
            except (BindError, OSError) as exc:
                log.error("%s", exc)
                return ExitCode.ERROR
            return await self._serve(loop)
        finally:
            # Also when serving was cut short (an error, a cancelled task): the
            # distribution stops accepting and its timer, before the listeners go.
            self.distribution.stop(sweep=False)
            self.distribution.close()
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
            for listener in self.listeners:
                listener.close()
            for handle in self._timers.values():
                handle.cancel()
            if self._drain is not None:
                self._drain.cancel()
                self._drain = None
            for service in self._services:
                service.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> ExitCode:
        assert self._stop is not None
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        if not prctl_available():
            log.warning(
                "python-prctl is not installed: workers cannot ask to die with the master "
                "(they still exit on channel EOF) nor set process titles; "
                "install rr-dispatcher[prctl]"
            )
        self._worker_args += self.distribution.start(loop, self.listeners)
        # Counted once everything the master keeps open is open.
        self._fds.start()
        self.distribution.on_fd_limit = self._fds.limit_met
        log.info(
            "app %s, %d worker(s), policy %s, %s event loop",
            self.config.app, self.config.workers, self.distribution, self._about["loop"],
        )
        for listener in self.listeners:
            log.info("listening on %s", listener.address)
        self.supervisor.start(loop)
        self._every("tick", _TICK_S, self._tick)
        if self.health.interval_s > 0:
            self._every("ping", self.health.interval_s, self._ping)
        code, graceful = await self._stop
        await self._shutdown(graceful)
        log.info("stopped")
        return code

    def _spawn(self, worker_id: int, key: int, events: WorkerEvents, max_requests: int) -> WorkerProcess:
        assert self._loop is not None
        return spawn(worker_id, key, self._worker_args, self._loop, events, self.distribution.on_ack,
                     max_requests, self.distribution.on_acked)

    def _every(self, name: str, interval_s: float, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        loop = self._loop

        def fire() -> None:
            self._timers[name] = loop.call_later(interval_s, fire)
            callback()

        self._timers[name] = loop.call_later(interval_s, fire)

    def _tick(self) -> None:
        self.supervisor.check_boot(time.monotonic())
        self._fds.tick()
        config = self.config
        if config.max_requests or (config.max_memory and self.health.interval_s <= 0):
            self.supervisor.recycle_all_due()

    def _ping(self) -> None:
        self.supervisor.ping()
        if self.config.max_memory:
            self.supervisor.recycle_all_due()

    def request_stop(self, code: ExitCode = ExitCode.OK, graceful: bool = True,
                     drain_delay_s: float = 0.0) -> None:
        """Begin stopping; a fast stop also cuts short a graceful one under way.

        Parameters:
            drain_delay_s: a graceful stop first keeps serving this long while
                ``readiness`` (``/readyz``) says it is draining, so a load
                balancer stops sending new connections before the listeners
                close. Another request while that delay runs (any kind, with
                or without a delay) ends it: the stop it asks for begins at once.
        """
        if self._stop is None or self._stop.done():
            if not graceful:
                self._fast.set()
            return
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        elif graceful and drain_delay_s > 0:
            assert self._loop is not None
            self._drain_reason = f"draining for {drain_delay_s:g} s before stopping"
            self._drain = self._loop.call_later(drain_delay_s, self._drain_over, code, drain_delay_s)
            return
        self._stop.set_result((code, graceful))

    def _drain_over(self, code: ExitCode, delay_s: float) -> None:
        self._drain = None
        log.info("drain delay of %g s over: stopping gracefully (up to %g s; INT to stop fast)",
                 delay_s, self.config.graceful_timeout_s)
        self.request_stop(code, graceful=True)

    @property
    def draining(self) -> bool:
        """True while a drain delay runs: serving as usual, but ``readiness`` says not ready."""
        return self._drain is not None

    def readiness(self) -> str | None:
        """None while the master would serve a new connection, else why not (what ``/readyz`` says).

        Ready: serving, not stopping nor in a drain delay, and at least one worker ready.
        """
        if self._drain is not None:
            return self._drain_reason
        if self._stop is None:
            return "not serving yet"
        if self._stop.done() or self.stopping:
            return "stopping"
        if not self.supervisor.slots.serving():
            return "no worker is ready"
        return None

    def _on_fatal(self, code: ExitCode) -> None:
        self.request_stop(code, graceful=False)

    def _on_signal(self, sig: signal.Signals) -> None:
        # asyncio's own handler only wrote to the loop's wake-up fd; this runs on the loop.
        stopping = self.stopping or (self._stop is not None and self._stop.done())
        workers = len(self.supervisor.slots)
        delay_s = self.config.drain_delay_s
        if sig == signal.SIGHUP:
            self._spawn_task(self.reload(), "reload")
        elif sig == signal.SIGTTIN:
            if not stopping:
                self.scale(workers + 1)
        elif sig == signal.SIGTTOU:
            if not stopping and workers > 1:
                self.scale(workers - 1)
        elif sig == signal.SIGQUIT:
            log.info("SIGQUIT: stopping fast%s", " (the drain delay cut short)" if self.draining else "")
            self.request_stop(ExitCode.OK, graceful=False)
        elif stopping and sig == signal.SIGINT:
            log.info("SIGINT again: stopping fast")
            self.request_stop(ExitCode.OK, graceful=False)
        elif stopping:
            log.info("%s again: already stopping", sig.name)
        elif self.draining:
            log.info("%s during the drain delay: stopping gracefully now (up to %g s; INT again to "
                     "stop fast)", sig.name, self.config.graceful_timeout_s)
            self.request_stop(ExitCode.OK, graceful=True)
        elif delay_s > 0:
            log.info("%s: draining for %g s before stopping (readyz says 503); %s again to stop now",
                     sig.name, delay_s, sig.name.removeprefix("SIG"))
            self.request_stop(ExitCode.OK, graceful=True, drain_delay_s=delay_s)
        else:
            log.info("%s: stopping gracefully (up to %g s; INT again to stop fast)", sig.name,
                     self.config.graceful_timeout_s)
            self.request_stop(ExitCode.OK, graceful=True)

    def _spawn_task(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_services(self) -> None:
        """Start the control socket and the metrics endpoint, as configured."""
        if self.config.control != "":
            from dispatcher.control import ControlServer
            from dispatcher.rundir import default_path

            control = ControlServer(self, self.config.control or default_path())
            await control.start()
            self._services.append(control)
            log.info("control socket at %s", control.path)
        if self.config.metrics:
            from dispatcher.metrics import MetricsServer

            metrics = MetricsServer(self.snapshot, self.config.metrics, readiness=self.readiness)
            metrics.start()
            self._services.append(metrics)
            log.info("metrics at http://%s/metrics (probes: /healthz, /readyz)", metrics.address)
        elif self.config.drain_delay_s:
            log.warning("--drain-delay without --metrics: no /readyz tells a load balancer to stop "
                        "sending connections during the delay")

    # Stopping

    async def _within(self, waiting: Awaitable[Any], deadline: float) -> bool:
        """Await ``waiting`` until ``deadline`` (monotonic) or a fast stop; return whether it finished."""
        task = asyncio.ensure_future(waiting)
        fast = asyncio.ensure_future(self._fast.wait())
        remaining = max(0.0, deadline - time.monotonic())
        await asyncio.wait((task, fast), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finished = task.done() and not task.cancelled()
        task.cancel()
        fast.cancel()
        return finished

    async def _until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()``, ``deadline`` or a fast stop; ``done`` is checked whenever a worker
        becomes ready or exits."""
        changed = self.supervisor.changed

        async def changes() -> None:
            while not done():
                changed.clear()
                await changed.wait()

        return done() or await self._within(changes(), deadline)

    async def _shutdown(self, graceful: bool) -> None:
        supervisor = self.supervisor
        supervisor.stop_restarts()
        if graceful:
            # Before the last accept: it then ends at EAGAIN, and the close that
            # follows (the master's here, or a worker's once it drains) finds the
            # queue empty.
            self._close_listeners_to_new()
        self.distribution.stop(sweep=graceful)
        if not graceful:
            self._close_listeners()
            self._fast.set()
        deadline = time.monotonic() + (self.config.graceful_timeout_s if graceful else 0.0)
        if graceful:
            # The listeners, closed to new connections, stay open while the
            # distribution settles: a backlog longer than the pending queue is
            # accepted as the queue makes room, not reset by the close.
            await self._within(self.distribution.settle(), deadline)
            self._close_listeners()
        if not self._fast.is_set():
            supervisor.drain_all()
            await self._until(lambda: not supervisor.live(), deadline)
        fast = not graceful or self._fast.is_set()
        if supervisor.live() and fast:
            # Fast: SIGTERM first (a worker drains on it), SIGKILL after a short grace.
            supervisor.signal_all(signal.SIGTERM)
            self._fast.clear()
            await self._until(lambda: not supervisor.live(), time.monotonic() + _FAST_STOP_GRACE_S)
        if supervisor.live():
            why = "SIGTERM" if fast else "the graceful timeout"
            for worker in supervisor.live():
                log.warning("%r still running after %s; killing it", worker, why)
            supervisor.signal_all(signal.SIGKILL)
            self._fast.clear()
            await self._until(lambda: not supervisor.live(), time.monotonic() + _REAP_TIMEOUT_S)
        dropped = self.distribution.close()
        if dropped:
            log.warning("closed %d connection(s) that no worker could take", dropped)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()

    def _close_listeners_to_new(self) -> None:
        for listener in self.listeners:
            try:
                listener.close_to_new()
            except OSError as exc:
                log.warning("%s: cannot stop new connections before closing (%s); "
                            "those arriving until it closes are reset", listener.address, exc.strerror)

    # Operating: what the control socket, signals and the library offer

    async def reload(self) -> str | None:
        """Rolling reload: replace every worker with a fresh process running the code on disk.

        Returns:
            None when every worker was replaced, else why the reload stopped
            (the workers not replaced yet keep serving).
        """
        return await self._reload.run()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every worker is ready, up to ``timeout_s``; return whether they are.

        A stop that begins meanwhile ends the wait at once (and they are not).
        """
        supervisor = self.supervisor
        await self._until(lambda: supervisor.stopping or supervisor.all_ready(), time.monotonic() + timeout_s)
        return supervisor.all_ready()

    def scale(self, workers: int) -> tuple[int, int]:
        """Run ``workers`` workers from now on; return (added, removed). See ``Supervisor.scale``."""
        changed = self.supervisor.scale(workers)
        self._fds.apply()
        return changed

    def send(self, worker_id: int | None, payload: Any) -> int:
        """Send a JSON-serialisable message to worker ``worker_id``, or to all if None.

        Returns:
            How many workers it was sent to (live ones only).

        Raises:
            ValueError: ``payload`` is not JSON-serialisable or too large, or
                there is no worker ``worker_id``.
        """
        return self.mailbox.send(self.supervisor.serving_workers(worker_id), payload)

    def broadcast(self, payload: Any) -> int:
        """``send(None, payload)``."""
        return self.send(None, payload)

    def snapshot(self) -> Snapshot:
        """Everything known about the master and each worker, JSON-serialisable."""
        return take_snapshot(
            self._about, self.started, self.listeners, self.supervisor.slots,
            self.distribution.figures(), self.stopping, self._reload.running, self.sampler,
        )


def _worker_args(config: Config) -> list[str]:
    """What every worker's command line carries, from the settings."""
    args = ["--app", config.app, "--interface", config.interface, "--log-level", config.log_level,
            "--log-format", config.log_format, "--loop", config.loop,
            "--protocol", str(protocol.VERSION), "--graceful-timeout", str(config.graceful_timeout_s)]
    if config.factory:
        args.append("--factory")
    if config.proxy_protocol:
        args.append("--proxy-protocol")
    if config.web != WebOptions():
        args += ["--web", config.web.to_json()]
    if config.threads is not None:
        args += ["--threads", str(config.threads)]
    if config.uid is not None:
        args += ["--uid", str(config.uid)]
    if config.gid is not None:
        args += ["--gid", str(config.gid)]
    return args


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
