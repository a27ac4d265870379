"""The master process: listeners, workers and the hand-off, wired together.

The loop is gunicorn's arbiter, split by concept: ``listeners`` bind,
``acceptor`` accepts, ``scheduler`` hands off and hears acks, ``lifecycle``
decides what a slot may do next, ``worker_process`` starts and reaps. This
module reacts to their events and to signals.

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
import contextlib
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
from dispatcher.lifecycle import Slot, WorkerState
from dispatcher.listeners import BindError, Listener
from dispatcher.scheduler import Scheduler
from dispatcher.stats import ProcessSampler, Rate
from dispatcher.worker_process import WorkerProcess, spawn
from shared import eventloop
from shared.channel import PEER_CLOSED, close_fds
from shared.exitcodes import ExitCode
from shared.protocol import Drain, Error, Hello, Listen, Message, Pong, Ready, UserMessage

log = logging.getLogger("master")

#: Worker exit codes that restarting cannot fix.
_FATAL_EXITS = frozenset({ExitCode.APP_LOAD_FAILED, ExitCode.WORKER_BOOT_FAILED})
#: Exit statuses of a worker that was asked to stop and did.
_STOP_CODES = frozenset({0, -signal.SIGTERM, -signal.SIGKILL})
#: How long killed workers get to be reaped before the master gives up on them.
_REAP_TIMEOUT_S = 5.0
#: A worker that closed its channel but lingers is killed after this.
_LINGER_S = 5.0
#: Messages queued for one worker beyond which more are dropped (it is not reading).
_MAX_BACKLOG = 1000
#: An unresponsive worker gets SIGTERM, then SIGKILL after this.
_KILL_GRACE_S = 1.0


def prctl_available() -> bool:
    try:
        import prctl  # noqa: F401
    except ImportError:
        return False
    return True


class Master:
    """Runs the whole server until stopped; ``run`` returns the exit code."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = policies.create(config.policy, config.window)
        self.scheduler = Scheduler(
            self.policy,
            config.max_pending,
            config.pending_timeout_s,
            on_fault=self._on_fault,
            on_refused=self._on_refused,
        )
        # Acks go straight to the scheduler: the hot path skips a call.
        self.on_ack = self.scheduler.on_ack
        self.slots = {n: Slot(n) for n in range(config.workers)}
        self.listeners: list[Listener] = []
        self.acceptor: Acceptor | None = None
        self.stopping = False
        self.started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_key = 0
        self._changed = asyncio.Event()
        self._stop: asyncio.Future[tuple[ExitCode, bool]] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self.ever_ready = False
        #: Called with (worker id, payload) for each message a worker sends.
        self.message_handlers: list[Callable[[int, Any], None]] = []
        self.health = Health(config.ping_interval_s, config.ping_timeout_s, self._on_unresponsive)
        self.sampler = ProcessSampler(os.getpid())
        self.accept_rate = Rate()
        self._ping_handle: asyncio.TimerHandle | None = None
        self._services: list[Any] = []

    # Running

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        return int(eventloop.run(self.serve(), self.config.loop))

    async def serve(self) -> ExitCode:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
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
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for listener in self.listeners:
                listener.close()
            for handle in (self._tick_handle, self._ping_handle):
                if handle is not None:
                    handle.cancel()
            for service in self._services:
                service.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> ExitCode:
        assert self._stop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if not prctl_available():
            log.warning(
                "python-prctl is not installed: workers cannot ask to die with the master "
                "(they still exit on channel EOF) nor set process titles; "
                "install rr-dispatcher[prctl]"
            )
        window = f" (window {self.config.window})" if self.policy.master_accepts else ""
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
        for slot in self.slots.values():
            self._spawn(slot)
        self._tick_handle = loop.call_later(1.0, self._tick)
        if self.health.interval_s > 0:
            self._ping_handle = loop.call_later(self.health.interval_s, self._ping)
        code, graceful = await self._stop
        await self._shutdown(graceful)
        log.info("stopped")
        return code

    def request_stop(self, code: ExitCode = ExitCode.OK, graceful: bool = True) -> None:
        """Begin stopping (idempotent: the first request wins)."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result((code, graceful))

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping or (self._stop is not None and self._stop.done()):
            log.info("%s again: already stopping", sig.name)
            return
        log.info("%s: stopping gracefully (up to %.0f s)", sig.name,
                 self.config.graceful_timeout_s)
        self.request_stop(ExitCode.OK, graceful=True)

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
        assert self._loop is not None
        self.health.tick(w for w in self._live() if w.returncode is None)
        self._ping_handle = self._loop.call_later(self.health.interval_s, self._ping)

    def _on_unresponsive(self, worker: WorkerProcess, silent_s: float) -> None:
        assert self._loop is not None
        log.error(
            "%r is unresponsive: no pong for %.1f s (ping timeout %g s); killing it",
            worker, silent_s, self.health.timeout_s,
        )
        self.scheduler.stop_sending(worker)
        slot = self.slots[worker.slot]
        if slot.worker is worker and slot.state is not WorkerState.STOPPING:
            slot.to(WorkerState.STOPPING)
        worker.kill(signal.SIGTERM)
        self._loop.call_later(_KILL_GRACE_S, worker.kill, signal.SIGKILL)

    def _tick(self) -> None:
        assert self._loop is not None
        self.accept_rate.update(self.acceptor.accepted if self.acceptor else 0)
        expired = self.scheduler.expire(time.monotonic())
        if expired:
            log.warning(
                "closed %d connection(s) that waited over %g s for a worker",
                expired, self.scheduler.pending_timeout_s,
            )
        self._tick_handle = self._loop.call_later(1.0, self._tick)

    # Workers

    def _worker_args(self) -> list[str]:
        args = ["--app", self.config.app, "--log-level", self.config.log_level,
                "--log-format", self.config.log_format, "--loop", self.config.loop]
        if self.config.threads is not None:
            args += ["--threads", str(self.config.threads)]
        return args

    def _spawn(self, slot: Slot) -> None:
        assert self._loop is not None
        slot.restart_timer = None
        if self.stopping:
            return
        self._next_key += 1
        try:
            worker = spawn(slot.id, self._next_key, self._worker_args(), self._loop, self)
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.id, exc)
            slot.last_exit = f"spawn failed: {exc}"
            self._schedule_restart(slot, uptime_s=0.0)
            return
        slot.worker = worker
        slot.to(WorkerState.STARTING)
        log.debug("%r started", worker)

    def _schedule_restart(self, slot: Slot, uptime_s: float) -> None:
        assert self._loop is not None
        delay = slot.backoff.next_delay(uptime_s)
        slot.to(WorkerState.BACKOFF)
        slot.restarts += 1
        slot.restart_timer = self._loop.call_later(delay, self._spawn, slot)
        log.info("worker %d restarts in %.1f s", slot.id, delay)

    def _replace(self, worker: WorkerProcess, reason: str) -> None:
        """Kill a misbehaving worker; its exit re-queues its connections and restarts it."""
        slot = self.slots[worker.slot]
        if slot.worker is not worker or worker.returncode is not None:
            return
        log.error("%r: %s; replacing it", worker, reason)
        self.scheduler.stop_sending(worker)
        if slot.state is not WorkerState.STOPPING:
            slot.to(WorkerState.STOPPING)
        worker.kill(signal.SIGKILL)

    def _on_fault(self, worker: WorkerProcess, reason: str) -> None:
        # Called from inside the scheduler: act once it has finished its step.
        assert self._loop is not None
        self._loop.call_soon(self._replace, worker, reason)

    def _on_refused(self, worker: WorkerProcess) -> None:
        slot = self.slots[worker.slot]
        if slot.worker is worker and slot.state in (WorkerState.STARTING, WorkerState.READY):
            slot.to(WorkerState.DRAINING)
            log.info("%r refused a hand-off (draining); sending it nothing more", worker)

    # WorkerEvents, called from the channel and the pidfd watcher

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None:
        match message:
            case Hello(worker_id, pid):
                if worker_id != worker.slot or pid != worker.pid:
                    self._replace(worker, f"hello from worker {worker_id} pid {pid}, wrong one")
            case Ready():
                self._on_ready(worker)
            case Error(code, text):
                worker.error = text
                if code == ExitCode.APP_LOAD_FAILED:
                    log.debug("%r: cannot load app: %s", worker, text)
                else:
                    log.error("%r: %s", worker, text)
            case Pong():
                self.health.on_pong(worker, message)
            case UserMessage(payload):
                for handler in list(self.message_handlers):
                    handler(worker.slot, payload)
            case _:
                close_fds(fds)
                self._replace(worker, f"sent {type(message).__name__}, which only the master sends")

    def _on_ready(self, worker: WorkerProcess) -> None:
        if worker.ready:
            self._replace(worker, "sent ready twice")
            return
        slot = self.slots[worker.slot]
        if slot.worker is not worker or slot.state is not WorkerState.STARTING:
            return  # already told to drain or stop
        worker.ready = True
        self.ever_ready = True
        slot.to(WorkerState.READY)
        log.info("%r ready", worker)
        if self.policy.master_accepts:
            self.scheduler.attach(worker)
            return
        try:
            socks = self.policy.sockets_for_worker(self.listeners, self.config.backlog)
        except BindError as exc:
            self._replace(worker, f"no listening socket for it: {exc}")
            return
        for sock in socks:
            worker.channel.send(Listen(), sock.detach())
        self.policy.attach(worker.key)

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        self.scheduler.stop_sending(worker)
        if reason == PEER_CLOSED:
            # The worker is exiting; its pidfd will say when. One that closed
            # its channel and lives on is of no use.
            assert self._loop is not None
            self._loop.call_later(_LINGER_S, worker.kill, signal.SIGKILL)
        else:
            self._replace(worker, reason)

    def on_exit(self, worker: WorkerProcess) -> None:
        worker.channel.drain_now()
        returncode = worker.reap()
        requeued = self.scheduler.forget(worker)
        if not self.policy.master_accepts:
            self.policy.detach(worker.key)
        worker.channel.close()
        slot = self.slots[worker.slot]
        expected = slot.state in (WorkerState.DRAINING, WorkerState.STOPPING) or self.stopping
        slot.to(WorkerState.EXITED)
        slot.worker = None
        slot.last_exit = worker.exit_reason
        slot.totals.add(
            handed_off=worker.handed_off, acked=worker.acked, refused=worker.refused,
            handled=int(worker.reported.get("handled", 0)),
            accepted=int(worker.reported.get("accepted", 0)),
        )
        detail = f"; {requeued} un-acked connection(s) re-dispatched" if requeued else ""
        level = logging.INFO if expected and returncode in _STOP_CODES else logging.WARNING
        log.log(level, "%r %s after %.1f s%s", worker, worker.exit_reason, worker.uptime_s, detail)
        self._changed.set()
        if self.stopping or (self._stop is not None and self._stop.done()):
            return
        if slot.retiring:
            del self.slots[slot.id]
            log.info("worker %d removed (scaled down)", slot.id)
            return
        if returncode in _FATAL_EXITS and not self._serving():
            code = ExitCode(returncode)
            if worker.error and code is ExitCode.APP_LOAD_FAILED:
                log.error("cannot load app: %s", worker.error)
            else:
                log.error("worker %d failed to boot: %s", slot.id, worker.error or worker.exit_reason)
            self.request_stop(code, graceful=False)
            return
        if self.scheduler.pending and not self.scheduler.attached:
            log.warning(
                "no worker is ready: %d connection(s) wait (up to %.0f s) for a restart",
                self.scheduler.pending, self.scheduler.pending_timeout_s,
            )
        self._schedule_restart(slot, worker.uptime_s)

    def _serving(self) -> bool:
        return any(slot.state is WorkerState.READY for slot in self.slots.values())

    # Stopping

    async def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()`` or ``deadline`` (monotonic); return ``done()``."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def _live(self) -> list[WorkerProcess]:
        return [s.worker for s in self.slots.values() if s.worker is not None]

    async def _shutdown(self, graceful: bool) -> None:
        self.stopping = True
        for slot in self.slots.values():
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
                slot.to(WorkerState.EXITED)
        if self.acceptor is not None:
            if graceful:
                swept = self.acceptor.sweep()
                if swept:
                    log.info("accepted %d connection(s) still in the backlog", swept)
            self.acceptor.stop()
        for listener in self.listeners:
            listener.close()
        timeout = self.config.graceful_timeout_s if graceful else 0.0
        deadline = time.monotonic() + timeout
        if graceful and self.policy.master_accepts:
            self.scheduler.on_settled = self._changed.set
            await self._wait_until(
                lambda: self.scheduler.settled or not self.scheduler.attached, deadline
            )
            self.scheduler.on_settled = None
        for worker in self._live():
            slot = self.slots[worker.slot]
            if graceful:
                if slot.state in (WorkerState.STARTING, WorkerState.READY):
                    slot.to(WorkerState.DRAINING)
                self.scheduler.stop_sending(worker)
                worker.channel.send(Drain())
            else:
                if slot.state is not WorkerState.STOPPING:
                    slot.to(WorkerState.STOPPING)
                worker.kill(signal.SIGTERM)
        if not await self._wait_until(lambda: not self._live(), deadline + (0 if graceful else 1)):
            for worker in self._live():
                log.warning("%r still running after the graceful timeout; killing it", worker)
                slot = self.slots[worker.slot]
                if slot.state is not WorkerState.STOPPING:
                    slot.to(WorkerState.STOPPING)
                worker.kill(signal.SIGKILL)
            await self._wait_until(lambda: not self._live(), time.monotonic() + _REAP_TIMEOUT_S)
        dropped = self.scheduler.close_pending()
        if dropped:
            log.warning("closed %d connection(s) that no worker could take", dropped)


    # Operating: what the control socket and the library offer

    def send(self, worker_id: int | None, payload: Any) -> int:
        """Send a JSON-serialisable message to worker ``worker_id``, or to all if None.

        Returns:
            How many workers it was sent to (live ones only).

        Raises:
            ValueError: ``payload`` is not JSON-serialisable or too large, or
                there is no worker ``worker_id``.
        """
        message = UserMessage(payload)
        if worker_id is not None and worker_id not in self.slots:
            raise ValueError(f"no worker {worker_id}")
        targets = [
            s.worker for s in self.slots.values()
            if s.worker is not None and (worker_id is None or s.id == worker_id)
        ]
        sent = 0
        for worker in targets:
            if worker.channel.closed:
                continue
            if worker.channel.backlog >= _MAX_BACKLOG:
                log.warning("%r has %d messages it has not read; dropping one more",
                            worker, worker.channel.backlog)
                continue
            worker.channel.send(message)
            sent += 1
        return sent

    def broadcast(self, payload: Any) -> int:
        """``send(None, payload)``."""
        return self.send(None, payload)

    def scale(self, workers: int) -> tuple[int, int]:
        """Run ``workers`` workers from now on; return (added, removed).

        New slots take the lowest free ids; the highest-numbered slots are
        removed, their workers drained first.

        Raises:
            ValueError: ``workers`` is below 1, or the master is stopping.
        """
        if workers < 1:
            raise ValueError("at least 1 worker")
        if self.stopping:
            raise ValueError("the master is stopping")
        active = sorted(s.id for s in self.slots.values() if not s.retiring)
        added = removed = 0
        if workers > len(active):
            new_id = 0
            for _ in range(workers - len(active)):
                while new_id in self.slots:
                    new_id += 1
                slot = self.slots[new_id] = Slot(new_id)
                self._spawn(slot)
                added += 1
        for slot_id in reversed(active[workers:]):
            self._retire(self.slots[slot_id])
            removed += 1
        self.config.workers = workers
        if added or removed:
            log.info("scaled to %d worker(s): %d added, %d removed", workers, added, removed)
        return added, removed

    def _retire(self, slot: Slot) -> None:
        slot.retiring = True
        if slot.restart_timer is not None:
            slot.restart_timer.cancel()
            slot.restart_timer = None
        worker = slot.worker
        if worker is None:
            del self.slots[slot.id]
            return
        self.scheduler.stop_sending(worker)
        if not self.policy.master_accepts:
            self.policy.detach(worker.key)
        if slot.state in (WorkerState.STARTING, WorkerState.READY):
            slot.to(WorkerState.DRAINING)
        worker.channel.send(Drain())

    def snapshot(self) -> dict[str, Any]:
        """Everything known about the master and each worker, JSON-serialisable."""
        now = time.monotonic()
        scheduler = self.scheduler
        workers = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            worker = slot.worker
            totals = slot.totals
            entry: dict[str, Any] = {
                "id": slot.id,
                "pid": worker.pid if worker else None,
                "state": slot.state.value,
                "uptime_s": round(now - worker.started, 3) if worker else 0.0,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "handed_off": totals.handed_off + (worker.handed_off if worker else 0),
                "acked": totals.acked + (worker.acked if worker else 0),
                "refused": totals.refused + (worker.refused if worker else 0),
                "handled": totals.handled + int(worker.reported.get("handled", 0) if worker else 0),
                "accepted": totals.accepted + int(worker.reported.get("accepted", 0) if worker else 0),
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
            "stopping": self.stopping,
            "accepted": self.acceptor.accepted if self.acceptor else 0,
            "accept_errors": self.acceptor.errors if self.acceptor else 0,
            "accept_rate": round(self.accept_rate.per_s, 3),
            "pending": scheduler.pending,
            "in_flight": scheduler.inflight,
            "handed_off": scheduler.handed_off,
            "redispatched": scheduler.redispatched,
            "expired": scheduler.expired,
            "rss_bytes": None,
            "cpu_percent": None,
            "open_fds": None,
        }
        master.update(self.sampler.sample())
        return {"master": master, "workers": workers}
