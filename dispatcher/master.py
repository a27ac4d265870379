"""The master process: listeners, workers and the hand-off, wired together.

The loop is gunicorn's arbiter, split by concept: ``listeners`` bind,
``acceptor`` accepts, ``scheduler`` hands off and hears acks, ``supervisor``
starts, restarts, replaces and retires workers, ``health`` pings them. This
module wires them together, starts the control socket and metrics, and
reacts to signals.

Theory of operation (fds)
-------------------------
- Listening sockets: owned here, closed on stop. Copies for workers (shared
  and reuseport policies) are sent with ``Listen`` and closed by the channel
  once sent.
- Accepted connections: owned by the scheduler until acked (see
  ``dispatcher.scheduler``). When a worker dies, its channel is drained first
  (acks it sent before dying still count), then its un-acked connections go
  back to the front of the queue for the next worker.
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
from collections.abc import Callable
from typing import Any

from dispatcher import __version__, policies
from dispatcher.acceptor import Acceptor
from dispatcher.config import Config
from dispatcher.health import Health
from dispatcher.lifecycle import Slot
from dispatcher.listeners import BindError, Listener
from dispatcher.scheduler import Scheduler
from dispatcher.stats import ProcessSampler, Rate
from dispatcher.supervisor import Supervisor
from shared import cpu_sched, eventloop
from shared.exitcodes import ExitCode
from shared.prctl_extra import prctl_available
from shared.protocol import UserMessage

log = logging.getLogger("master")

#: How long killed workers get to be reaped before the master gives up on them.
_REAP_TIMEOUT_S = 5.0
#: A fast stop (QUIT, a second INT) gives workers this long after SIGTERM.
_FAST_STOP_GRACE_S = 1.0
#: Messages queued for one worker beyond which more are dropped (it is not reading).
_MAX_BACKLOG = 1000


class Master:
    """Runs the whole server until stopped; ``run`` returns the exit code."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = policies.create(config.policy, config.window)
        self.scheduler = Scheduler(
            self.policy,
            config.max_pending,
            config.pending_timeout_s,
            on_fault=lambda worker, reason: self.supervisor.on_fault(worker, reason),
            on_refused=lambda worker: self.supervisor.on_refused(worker),
            on_limit=lambda worker: self.supervisor.on_limit(worker),
        )
        self.health = Health(
            config.ping_interval_s, config.ping_timeout_s,
            lambda worker, silent_s: self.supervisor.on_unresponsive(worker, silent_s),
        )
        self.supervisor = Supervisor(
            config, self.policy, self.scheduler, self.health,
            on_fatal=lambda code: self.request_stop(code, graceful=False),
        )
        self.listeners: list[Listener] = []
        self.acceptor: Acceptor | None = None
        self.started = time.monotonic()
        self.sampler = ProcessSampler(os.getpid())
        self.accept_rate = Rate()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[tuple[ExitCode, bool]] | None = None
        self._fast = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._services: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def stopping(self) -> bool:
        """True once the stop has begun (the supervisor restarts nothing from then on)."""
        return self.supervisor.stopping

    @property
    def slots(self) -> dict[int, Slot]:
        return self.supervisor.slots

    @property
    def message_handlers(self) -> list[Callable[[int, Any], None]]:
        """Called with (worker id, payload) for each message a worker sends."""
        return self.supervisor.message_handlers

    # Running

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        return int(eventloop.run(self.serve(), self.config.loop))

    async def serve(self) -> ExitCode:
        """Bind, start workers and serve on the running loop until stopped."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self._fast = asyncio.Event()
        try:
            self.listeners = self.policy.open_listeners(self.config.binds, self.config.backlog)
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
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
            for listener in self.listeners:
                listener.close()
            for handle in self._timers.values():
                handle.cancel()
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
        window = ""
        if self.policy.master_accepts:
            # Workers inherit it; they switch back to what we were started with.
            self.supervisor.worker_sched, failed = cpu_sched.switch(self.config.master_sched)
            if failed:
                log.warning("master scheduling policy not switched to %s: %s",
                            self.config.master_sched, failed)
            window = f" (window {self.config.window}, master sched {cpu_sched.current()})"
        log.info(
            "app %s, %d worker(s), policy %s%s, %s event loop",
            self.config.app, self.config.workers, self.policy.name, window,
            eventloop.resolve(self.config.loop),
        )
        for listener in self.listeners:
            log.info("listening on %s", listener.address)
        if self.policy.master_accepts:
            self.acceptor = Acceptor(loop, self.listeners, self.scheduler)
            self.acceptor.start()
        self.supervisor.start(loop, self.listeners)
        self._every("tick", 1.0, self._tick)
        if self.health.interval_s > 0:
            self._every("ping", self.health.interval_s, self._ping)
        code, graceful = await self._stop
        await self._shutdown(graceful)
        log.info("stopped")
        return code

    def _every(self, name: str, interval_s: float, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        loop = self._loop

        def fire() -> None:
            self._timers[name] = loop.call_later(interval_s, fire)
            callback()

        self._timers[name] = loop.call_later(interval_s, fire)

    def request_stop(self, code: ExitCode = ExitCode.OK, graceful: bool = True) -> None:
        """Begin stopping; a fast stop also cuts short a graceful one under way."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result((code, graceful))
        elif not graceful:
            self._fast.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        # asyncio's own handler only wrote to the loop's wake-up fd; this runs on the loop.
        stopping = self.stopping or (self._stop is not None and self._stop.done())
        if sig == signal.SIGHUP:
            self._spawn_task(self.reload(), "reload")
        elif sig == signal.SIGTTIN:
            if not stopping:
                self.supervisor.scale(len(self.slots) + 1)
        elif sig == signal.SIGTTOU:
            if not stopping and len(self.slots) > 1:
                self.supervisor.scale(len(self.slots) - 1)
        elif sig == signal.SIGQUIT:
            log.info("SIGQUIT: stopping fast")
            self.request_stop(ExitCode.OK, graceful=False)
        elif stopping and sig == signal.SIGINT:
            log.info("SIGINT again: stopping fast")
            self.request_stop(ExitCode.OK, graceful=False)
        elif stopping:
            log.info("%s again: already stopping", sig.name)
        else:
            log.info("%s: stopping gracefully (up to %g s; INT again to stop fast)", sig.name,
                     self.config.graceful_timeout_s)
            self.request_stop(ExitCode.OK, graceful=True)

    def _spawn_task(self, coro: Any, name: str) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_services(self) -> None:
        """Start the control socket and the metrics endpoint, as configured."""
        if self.config.control != "":
            from dispatcher.control import ControlServer, default_path

            control = ControlServer(self, self.config.control or default_path())
            await control.start()
            self._services.append(control)
            log.info("control socket at %s", control.path)
        if self.config.metrics:
            from dispatcher.metrics import MetricsServer

            metrics = MetricsServer(self, self.config.metrics)
            metrics.start()
            self._services.append(metrics)
            log.info("metrics at http://%s/metrics", metrics.address)

    def _ping(self) -> None:
        self.health.tick(w for w in self.supervisor.live() if w.returncode is None)
        if self.config.max_memory:
            self.supervisor.check_limits()

    def _tick(self) -> None:
        self.accept_rate.update(self.acceptor.accepted if self.acceptor else 0)
        self.supervisor.check_boot(time.monotonic())
        self.scheduler.age_loads()
        expired = self.scheduler.expire(time.monotonic())
        if expired:
            log.warning(
                "closed %d connection(s) that waited over %g s for a worker",
                expired, self.scheduler.pending_timeout_s,
            )
        if self.config.max_requests or (self.config.max_memory and self.health.interval_s <= 0):
            self.supervisor.check_limits()

    # Stopping

    async def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()``, ``deadline`` (monotonic) or a fast stop; return ``done()``."""
        changed = self.supervisor.changed
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._fast.is_set():
                return False
            changed.clear()
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self._fast.wait())]
            await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
        return True

    async def _shutdown(self, graceful: bool) -> None:
        supervisor = self.supervisor
        supervisor.stop_restarts()
        if self.acceptor is not None:
            if graceful:
                swept = self.acceptor.sweep()
                if swept:
                    log.info("accepted %d connection(s) still in the backlog", swept)
            self.acceptor.stop()
        for listener in self.listeners:
            listener.close()
        if not graceful:
            self._fast.set()
        deadline = time.monotonic() + (self.config.graceful_timeout_s if graceful else 0.0)
        if graceful and self.policy.master_accepts:
            self.scheduler.on_settled = supervisor.changed.set
            await self._wait_until(
                lambda: self.scheduler.settled or not self.scheduler.attached, deadline
            )
            self.scheduler.on_settled = None
        if not self._fast.is_set():
            supervisor.drain_all()
            await self._wait_until(lambda: not supervisor.live(), deadline)
        fast = not graceful or self._fast.is_set()
        if supervisor.live() and fast:
            # Fast: SIGTERM first (a worker drains on it), SIGKILL after a short grace.
            supervisor.signal_all(signal.SIGTERM)
            self._fast.clear()
            await self._wait_until(lambda: not supervisor.live(), time.monotonic() + _FAST_STOP_GRACE_S)
        if supervisor.live():
            why = "SIGTERM" if fast else "the graceful timeout"
            for worker in supervisor.live():
                log.warning("%r still running after %s; killing it", worker, why)
            supervisor.signal_all(signal.SIGKILL)
            self._fast.clear()
            await self._wait_until(lambda: not supervisor.live(), time.monotonic() + _REAP_TIMEOUT_S)
        dropped = self.scheduler.close_pending()
        if dropped:
            log.warning("closed %d connection(s) that no worker could take", dropped)

    # Operating: what the control socket, signals and the library offer

    async def reload(self) -> str | None:
        """Rolling reload: replace every worker with a fresh process running the code on disk.

        Returns:
            None when every worker was replaced, else why the reload stopped
            (the workers not replaced yet keep serving).
        """
        if self.stopping:
            return "the master is stopping"
        return await self.supervisor.reload(self.config.reload_batch, self.config.boot_timeout_s)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every worker is ready, up to ``timeout_s``; return whether they are."""
        return await self._wait_until(self.supervisor.all_ready, time.monotonic() + timeout_s)

    def scale(self, workers: int) -> tuple[int, int]:
        """Run ``workers`` workers from now on; return (added, removed). See ``Supervisor.scale``."""
        return self.supervisor.scale(workers)

    def send(self, worker_id: int | None, payload: Any) -> int:
        """Send a JSON-serialisable message to worker ``worker_id``, or to all if None.

        Returns:
            How many workers it was sent to (live ones only).

        Raises:
            ValueError: ``payload`` is not JSON-serialisable or too large, or
                there is no worker ``worker_id``.
        """
        return self.supervisor.send(worker_id, UserMessage(payload), _MAX_BACKLOG)

    def broadcast(self, payload: Any) -> int:
        """``send(None, payload)``."""
        return self.send(None, payload)

    def snapshot(self) -> dict[str, Any]:
        """Everything known about the master and each worker, JSON-serialisable."""
        now = time.monotonic()
        scheduler = self.scheduler
        workers = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            worker = slot.worker
            entry: dict[str, Any] = {
                "id": slot.id,
                "pid": worker.pid if worker else None,
                "state": slot.state.value,
                "uptime_s": round(now - worker.started, 3) if worker else 0.0,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                **self.supervisor.counts(slot),
                "active": int(worker.reported.get("active", 0)) if worker else 0,
                "ping_rtt_ms": None,
                "ping_rtt_avg_ms": None,
                "loop_lag_ms": None,
                "rss_bytes": None,
                "uss_bytes": None,
                "cpu_percent": None,
                "open_fds": None,
            }
            if worker is not None:
                if worker.rtt_last_s is not None:
                    entry["ping_rtt_ms"] = round(worker.rtt_last_s * 1000, 3)
                    entry["ping_rtt_avg_ms"] = round(worker.rtt_total_s / worker.pongs * 1000, 3)
                lag = worker.reported.get("loop_lag_ms")
                entry["loop_lag_ms"] = lag if isinstance(lag, (int, float)) else None
                entry.update(worker.sampler.sample())
            workers.append(entry)
        draining = [
            {"id": w.slot, "pid": w.pid, "state": w.state.value, "uptime_s": round(now - w.started, 3),
             "active": int(w.reported.get("active", 0))}
            for w in self.supervisor.retired.values()
        ]
        master: dict[str, Any] = {
            "pid": os.getpid(),
            "version": __version__,
            "app": self.config.app,
            "policy": self.policy.name,
            "window": self.config.window,
            "loop": eventloop.resolve(self.config.loop),
            "listening": [listener.address for listener in self.listeners],
            "uptime_s": round(now - self.started, 3),
            "workers_wanted": self.config.workers,
            "reloading": self.supervisor.reloading,
            "stopping": self.stopping,
            "accepted": self.acceptor.accepted if self.acceptor else 0,
            "accept_errors": self.acceptor.errors if self.acceptor else 0,
            "accept_rate": round(self.accept_rate.per_s, 3),
            "pending": scheduler.pending,
            "in_flight": scheduler.inflight,
            "handed_off": scheduler.handed_off,
            "handoff_messages": scheduler.handoff_messages,
            "redispatched": scheduler.redispatched,
            "expired": scheduler.expired,
            "rss_bytes": None,
            "cpu_percent": None,
            "open_fds": None,
        }
        master.update(self.sampler.sample())
        return {"master": master, "workers": workers, "draining": draining}


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
