"""Worker processes over their lives: start, restart, replace, retire.

Theory of operation
-------------------
Each numbered slot (``worker 3``) holds at most two processes:

- ``slot.worker``, the one serving;
- ``slot.successor``, a new process being started to take its place (a
  rolling reload or a recycle). It serves as soon as it is ready; only then
  is the old one told to drain, so capacity never drops. A successor that
  fails to boot is dropped and the old worker keeps serving.

A process that is draining for good (replaced, or its slot removed by a
scale-down) leaves its slot for ``retired``; its exit restarts nothing. A
serving process that exits is restarted after the slot's backoff.

fd ownership: each process's channel and pidfd are closed when it is reaped
(``on_exit``), after its channel was read to the end (acks it sent before
dying still count) and its un-acked connections were given back to the
scheduler for another worker.

Every process state change goes through ``WorkerProcess.to`` (see
``dispatcher.lifecycle``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.config import Config
from dispatcher.health import Health
from dispatcher.lifecycle import Slot, WorkerState
from dispatcher.listeners import BindError, Listener
from dispatcher.policies import Policy
from dispatcher.scheduler import Scheduler
from dispatcher.stats import Totals
from dispatcher.worker_process import WorkerProcess, spawn
from shared import protocol
from shared.channel import PEER_CLOSED, close_fds
from shared.exitcodes import ExitCode
from shared.protocol import Drain, Error, Hello, Listen, Message, Pong, Ready, UserMessage

log = logging.getLogger("master")

#: Worker exit codes that restarting cannot fix.
_FATAL_EXITS = frozenset({ExitCode.APP_LOAD_FAILED, ExitCode.WORKER_BOOT_FAILED})
#: Exit statuses of a worker that was asked to stop and did.
_STOP_CODES = frozenset({0, -signal.SIGTERM, -signal.SIGKILL})
#: A worker that closed its channel but lingers is killed after this.
_LINGER_S = 5.0
#: An unresponsive worker gets SIGTERM, then SIGKILL after this.
_KILL_GRACE_S = 1.0
#: After a recycle whose successor failed to boot, wait this long before trying again.
_RECYCLE_RETRY_S = 30.0

#: The outcome of replacing a slot's worker: None when done, else why not.
Outcome = asyncio.Future[str | None]


class Supervisor:
    """Owns the worker slots and every worker process.

    Parameters:
        config: the master's settings (worker count, app, limits).
        loop: the master's loop.
        policy, scheduler: where ready workers are attached.
        listeners: the master's listening sockets (for policies where workers accept).
        health: ping bookkeeping (pongs are reported to it).
        on_fatal: called once with an exit code when workers can never boot.
    """

    def __init__(
        self,
        config: Config,
        policy: Policy,
        scheduler: Scheduler,
        health: Health,
        on_fatal: Callable[[ExitCode], None],
    ) -> None:
        self.config = config
        self._loop_or_none: asyncio.AbstractEventLoop | None = None
        self.policy = policy
        self.scheduler = scheduler
        self.listeners: Sequence[Listener] = ()
        self.health = health
        self._on_fatal = on_fatal
        # Counters of exited processes, per worker id: they outlive slots, so
        # they never go back, even across a scale-down and up.
        self._totals: dict[int, Totals] = {}
        self.slots: dict[int, Slot] = {n: self._new_slot(n) for n in range(config.workers)}
        self.retired: dict[int, WorkerProcess] = {}
        self.stopping = False
        #: The CPU scheduling policy workers switch to at start (``--sched``), when
        #: the master changed its own after it was started (see ``shared.cpu_sched``).
        self.worker_sched: str | None = None
        #: Set whenever a process exits or the hand-off queue settles.
        self.changed: asyncio.Event = asyncio.Event()
        #: Called with (worker id, payload) for each message a worker sends.
        self.message_handlers: list[Callable[[int, Any], None]] = []
        self._next_key = 0
        self._reload: asyncio.Task[str | None] | None = None
        self._fatal = False
        # Acks go straight to the scheduler: the hot path skips a call.
        self.on_ack = scheduler.on_ack

    def _new_slot(self, slot_id: int) -> Slot:
        return Slot(slot_id, totals=self._totals.setdefault(slot_id, Totals()))

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop_or_none is not None, "Supervisor.start() first"
        return self._loop_or_none

    def start(self, loop: asyncio.AbstractEventLoop, listeners: Sequence[Listener]) -> None:
        """Start every slot's worker on ``loop``."""
        self._loop_or_none = loop
        self.listeners = listeners
        self.changed = asyncio.Event()
        for slot in self.slots.values():
            self._spawn(slot)

    @property
    def reloading(self) -> bool:
        return self._reload is not None and not self._reload.done()

    def counts(self, slot: Slot) -> dict[str, int]:
        """The slot's counters: exited processes' totals plus every live one's of that id.

        A replaced worker still draining counts with its slot, so nothing
        goes back when a successor takes over.
        """
        counts = dict(slot.totals.__dict__)
        processes = [w for w in (slot.worker, slot.successor) if w is not None]
        processes += [w for w in self.retired.values() if w.slot == slot.id]
        for worker in processes:
            for key, value in worker.counts().items():
                counts[key] += value
        return counts

    # Processes

    def live(self) -> list[WorkerProcess]:
        """Every process not yet reaped: serving, starting as successors, retired."""
        found = []
        for slot in self.slots.values():
            found += [w for w in (slot.worker, slot.successor) if w is not None]
        return found + list(self.retired.values())

    def _worker_args(self) -> list[str]:
        config = self.config
        args = ["--app", config.app, "--log-level", config.log_level,
                "--log-format", config.log_format, "--loop", config.loop,
                "--protocol", str(protocol.VERSION)]
        if config.threads is not None:
            args += ["--threads", str(config.threads)]
        if config.uid is not None:
            args += ["--uid", str(config.uid)]
        if config.gid is not None:
            args += ["--gid", str(config.gid)]
        if self.worker_sched is not None:
            args += ["--sched", self.worker_sched]
        return args

    def _spawn(self, slot: Slot, successor: bool = False) -> WorkerProcess | None:
        slot.restart_timer = None
        if self.stopping:
            return None
        self._next_key += 1
        try:
            worker = spawn(slot.id, self._next_key, self._worker_args(), self._loop, self)
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.id, exc)
            slot.last_exit = f"spawn failed: {exc}"
            if not successor:
                self._schedule_restart(slot, uptime_s=0.0)
            return None
        if self.config.max_requests:
            worker.max_requests = self.config.max_requests + random.randint(
                0, self.config.max_requests_jitter
            )
        if successor:
            slot.successor = worker
        else:
            slot.worker = worker
        log.debug("%r started", worker)
        return worker

    def _schedule_restart(self, slot: Slot, uptime_s: float) -> None:
        delay = slot.backoff.next_delay(uptime_s)
        slot.restarts += 1
        slot.restart_timer = self._loop.call_later(delay, self._spawn, slot)
        log.info("worker %d restarts in %.1f s", slot.id, delay)

    def kill(self, worker: WorkerProcess, reason: str) -> None:
        """Kill a misbehaving worker; its exit re-queues its connections (and restarts it)."""
        if worker.returncode is not None or worker.state is WorkerState.EXITED:
            return
        log.error("%r: %s; replacing it", worker, reason)
        self.scheduler.stop_sending(worker)
        if worker.state is not WorkerState.STOPPING:
            worker.to(WorkerState.STOPPING)
        worker.kill(signal.SIGKILL)

    def on_fault(self, worker: WorkerProcess, reason: str) -> None:
        # Called from inside the scheduler: act once it has finished its step.
        self._loop.call_soon(self.kill, worker, reason)

    def on_refused(self, worker: WorkerProcess) -> None:
        if worker.state in (WorkerState.STARTING, WorkerState.READY):
            worker.to(WorkerState.DRAINING)
            log.info("%r refused a hand-off (draining); sending it nothing more", worker)

    def check_boot(self, now: float) -> None:
        """Kill workers not ready within the boot timeout (a hung import, a deadlock)."""
        limit = self.config.boot_timeout_s
        for worker in self.live():
            if (worker.state is WorkerState.STARTING and not worker.boot_timed_out
                    and now - worker.started > limit):
                worker.boot_timed_out = True
                log.error("%r not ready after %.1f s (boot timeout %g s); killing it",
                          worker, now - worker.started, limit)
                worker.to(WorkerState.STOPPING)
                worker.kill(signal.SIGKILL)

    def on_unresponsive(self, worker: WorkerProcess, silent_s: float) -> None:
        log.error(
            "%r is unresponsive: no pong for %.1f s (ping timeout %g s); killing it",
            worker, silent_s, self.health.timeout_s,
        )
        self.scheduler.stop_sending(worker)
        if worker.state not in (WorkerState.STOPPING, WorkerState.EXITED):
            worker.to(WorkerState.STOPPING)
        worker.kill(signal.SIGTERM)
        self._loop.call_later(_KILL_GRACE_S, worker.kill, signal.SIGKILL)

    def drain(self, worker: WorkerProcess) -> None:
        """Tell ``worker`` to finish its connections and exit; send it nothing more."""
        self.scheduler.stop_sending(worker)
        if not self.policy.master_accepts:
            self.policy.detach(worker.key)
        if worker.state in (WorkerState.STARTING, WorkerState.READY):
            worker.to(WorkerState.DRAINING)
        if not worker.channel.closed:
            worker.channel.send(Drain())

    def _retire_process(self, worker: WorkerProcess) -> None:
        self.retired[worker.key] = worker
        self.drain(worker)
        # As on a graceful stop: open connections get the graceful timeout, no more.
        self._loop.call_later(self.config.graceful_timeout_s, self._overdue, worker)

    def _overdue(self, worker: WorkerProcess) -> None:
        if worker.returncode is None and worker.key in self.retired:
            log.warning("%r still draining after the graceful timeout (%g s); killing it",
                        worker, self.config.graceful_timeout_s)
            if worker.state is not WorkerState.STOPPING:
                worker.to(WorkerState.STOPPING)
            worker.kill(signal.SIGKILL)

    # WorkerEvents: from each worker's channel and pidfd

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None:
        match message:
            case Pong():
                self.health.on_pong(worker, message)
                # Keeps the policy's load figure fresh for a worker that is
                # sent nothing (acks carry it otherwise).
                self.scheduler.report_load(worker, int(worker.reported.get("active", 0)))
                self._check_limits_of(worker)
            case UserMessage(payload):
                for handler in list(self.message_handlers):
                    try:
                        handler(worker.slot, payload)
                    except Exception:
                        log.exception("message handler %r failed on a message from %r", handler, worker)
            case Hello(worker_id, pid):
                if worker_id != worker.slot or pid != worker.pid:
                    self.kill(worker, f"hello from worker {worker_id} pid {pid}, wrong one")
            case Ready():
                self._on_ready(worker)
            case Error(code, text):
                worker.error = text
                if code == ExitCode.APP_LOAD_FAILED:
                    log.debug("%r: cannot load app: %s", worker, text)
                else:
                    log.error("%r: %s", worker, text)
            case _:
                close_fds(fds)
                self.kill(worker, f"sent {type(message).__name__}, which only the master sends")

    def _on_ready(self, worker: WorkerProcess) -> None:
        if worker.ready:
            self.kill(worker, "sent ready twice")
            return
        if worker.state is not WorkerState.STARTING:
            return  # already told to drain or stop
        worker.ready = True
        worker.last_heard = time.monotonic()  # the ping timeout counts from here
        worker.to(WorkerState.READY)
        self.changed.set()
        if not self._attach(worker):
            return
        slot = self.slots.get(worker.slot)
        if slot is not None and slot.successor is worker:
            old, slot.worker, slot.successor = slot.worker, worker, None
            if old is not None:
                log.info("%r ready, replacing pid %d (%s)", worker, old.pid, slot.replacing)
                self._retire_process(old)
            else:
                log.info("%r ready", worker)
            if slot.outcome is not None and not slot.outcome.done():
                slot.outcome.set_result(None)
            slot.outcome = None
        else:
            log.info("%r ready", worker)

    def _attach(self, worker: WorkerProcess) -> bool:
        if self.policy.master_accepts:
            self.scheduler.attach(worker)
            return True
        try:
            socks = self.policy.sockets_for_worker(self.listeners, self.config.backlog)
        except (BindError, OSError) as exc:
            self.kill(worker, f"no listening socket for it: {exc}")
            return False
        for sock in socks:
            worker.channel.send(Listen(), sock.detach())
        self.policy.attach(worker.key)
        return True

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        self.scheduler.stop_sending(worker)
        if reason == PEER_CLOSED:
            # The worker is exiting; its pidfd will say when. One that closed
            # its channel and lives on is of no use.
            self._loop.call_later(_LINGER_S, worker.kill, signal.SIGKILL)
        else:
            self.kill(worker, reason)

    def on_exit(self, worker: WorkerProcess) -> None:
        try:
            worker.channel.read_acks_of_dead_peer()
        finally:
            # Whatever happened above, the process is reaped, its connections
            # go back to the queue and its fds are closed.
            returncode = worker.reap()
            requeued = self.scheduler.forget(worker)
            if not self.policy.master_accepts:
                self.policy.detach(worker.key)
            worker.channel.close()
        expected = worker.state in (WorkerState.DRAINING, WorkerState.STOPPING) or self.stopping
        worker.to(WorkerState.EXITED)
        detail = f"; {requeued} un-acked connection(s) re-dispatched" if requeued else ""
        level = logging.INFO if expected and returncode in _STOP_CODES else logging.WARNING
        log.log(level, "%r %s after %.1f s%s", worker, worker.exit_reason, worker.uptime_s, detail)
        self.changed.set()
        self._totals.setdefault(worker.slot, Totals()).add(**worker.counts())
        slot = self.slots.get(worker.slot)
        if self.retired.pop(worker.key, None) is not None or slot is None:
            return
        if slot.successor is worker:
            slot.successor = None
            why = worker.error or worker.exit_reason
            log.error("worker %d: its replacement failed to boot (%s); the old one keeps serving",
                      slot.id, why)
            if slot.outcome is not None and not slot.outcome.done():
                slot.outcome.set_result(f"worker {slot.id} failed to boot: {why}")
            slot.outcome = None
            if slot.worker is None and not self.stopping:
                self._schedule_restart(slot, worker.uptime_s)
            return
        if slot.worker is not worker:
            return
        slot.worker = None
        slot.last_exit = worker.exit_reason
        if self.stopping:
            return
        if self._fatal:
            return  # already stopping the master; one line said why
        if (returncode in _FATAL_EXITS or worker.boot_timed_out) and not self.serving():
            self._fatal = True
            code = ExitCode(returncode) if returncode in _FATAL_EXITS else ExitCode.WORKER_BOOT_FAILED
            if worker.error and code is ExitCode.APP_LOAD_FAILED:
                log.error("cannot load app: %s", worker.error)
            else:
                log.error("worker %d failed to boot: %s", slot.id, worker.error or worker.exit_reason)
            self._on_fatal(code)
            return
        if slot.successor is not None:
            return  # the replacement on its way takes over when ready
        if self.scheduler.pending and not self.scheduler.attached:
            log.warning(
                "no worker is ready: %d connection(s) wait (up to %.0f s) for a restart",
                self.scheduler.pending, self.scheduler.pending_timeout_s,
            )
        self._schedule_restart(slot, worker.uptime_s)

    def all_ready(self) -> bool:
        """True when every slot's serving process is ready (and the master is not stopping)."""
        return bool(self.slots) and not self.stopping and all(
            s.worker is not None and s.worker.state is WorkerState.READY for s in self.slots.values()
        )

    def serving(self) -> bool:
        return any(
            s.worker is not None and s.worker.state is WorkerState.READY for s in self.slots.values()
        )

    # Replacing, reloading, recycling, scaling

    def replace(self, slot: Slot, reason: str) -> Outcome:
        """Start a successor for ``slot``; it takes over once ready and the old one drains.

        Returns:
            A future: None once the successor serves, else why it failed (the
            old worker then keeps serving).
        """
        if slot.outcome is not None:
            return slot.outcome
        outcome: Outcome = self._loop.create_future()
        if self.stopping:
            outcome.set_result("the master is stopping")
            return outcome
        if slot.restart_timer is not None:
            slot.restart_timer.cancel()
            slot.restart_timer = None
        slot.replacing = reason
        slot.outcome = outcome
        if self._spawn(slot, successor=True) is None:
            slot.outcome = None
            outcome.set_result(f"worker {slot.id} could not be started: {slot.last_exit}")
        return outcome

    async def reload(self, batch: int = 1, boot_timeout_s: float = 60.0) -> str | None:
        """Replace every worker with a fresh process, ``batch`` at a time.

        Returns:
            None when all were replaced, else why the reload stopped (the
            workers not yet replaced keep serving the old code).
        """
        if self._reload is not None and not self._reload.done():
            return await asyncio.shield(self._reload)
        self._reload = self._loop.create_task(self._reload_all(batch, boot_timeout_s))
        return await asyncio.shield(self._reload)

    async def _reload_all(self, batch: int, boot_timeout_s: float) -> str | None:
        started = time.monotonic()
        ids = sorted(self.slots)
        log.info("reload: replacing %d worker(s), %d at a time", len(ids), batch)
        for first in range(0, len(ids), batch):
            group = [self.slots[i] for i in ids[first:first + batch] if i in self.slots]
            outcomes = [self.replace(slot, "reload") for slot in group]
            done, waiting = await asyncio.wait(outcomes, timeout=boot_timeout_s)
            errors = [o.result() for o in done if o.result() is not None]
            for slot, outcome in zip(group, outcomes, strict=True):
                if outcome in waiting and slot.successor is not None:
                    errors.append(f"worker {slot.id} not ready within {boot_timeout_s:g} s")
                    self.kill(slot.successor, "not ready in time for the reload")
            if errors:
                error = "; ".join(str(e) for e in errors)
                log.error("reload stopped after %d of %d worker(s): %s", first, len(ids), error)
                return error
        log.info("reload: %d worker(s) replaced in %.1f s", len(ids), time.monotonic() - started)
        return None

    def check_limits(self) -> None:
        """Recycle workers past ``--max-requests`` or ``--max-memory``."""
        for slot in list(self.slots.values()):
            if slot.worker is not None:
                self._check_limits_of(slot.worker)

    def _check_limits_of(self, worker: WorkerProcess) -> None:
        slot = self.slots.get(worker.slot)
        if (slot is None or slot.worker is not worker or slot.successor is not None
                or worker.state is not WorkerState.READY or self.stopping
                or time.monotonic() < slot.recycle_after):
            return
        reason = None
        served = worker.served()
        if worker.max_requests and served >= worker.max_requests:
            reason = f"served {served} connections (max-requests {worker.max_requests})"
        elif self.config.max_memory:
            rss = worker.sampler.sample().get("rss_bytes")
            if rss is not None and rss > self.config.max_memory:
                reason = f"uses {rss / 2**20:.1f} MiB (max-memory {self.config.max_memory / 2**20:.1f} MiB)"
        if reason is None:
            return
        log.info("%r %s; replacing it", worker, reason)
        outcome = self.replace(slot, reason)
        outcome.add_done_callback(lambda f: self._recycled(slot, f))

    def _recycled(self, slot: Slot, outcome: Outcome) -> None:
        if outcome.result() is not None:
            slot.recycle_after = time.monotonic() + _RECYCLE_RETRY_S

    def on_limit(self, worker: WorkerProcess) -> None:
        """The scheduler saw ``worker`` reach its max-requests (on its ack)."""
        self._loop.call_soon(self._check_limits_of, worker)

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
        ids = sorted(self.slots)
        added = removed = 0
        new_id = 0
        for _ in range(workers - len(ids)):
            while new_id in self.slots:
                new_id += 1
            slot = self.slots[new_id] = self._new_slot(new_id)
            self._spawn(slot)
            added += 1
        for slot_id in reversed(ids[workers:]):
            self._remove(self.slots[slot_id])
            removed += 1
        self.config.workers = workers
        if added or removed:
            log.info("scaled to %d worker(s): %d added, %d removed", workers, added, removed)
        return added, removed

    def _remove(self, slot: Slot) -> None:
        del self.slots[slot.id]
        if slot.restart_timer is not None:
            slot.restart_timer.cancel()
            slot.restart_timer = None
        if slot.successor is not None:
            self._retire_process(slot.successor)
        if slot.outcome is not None and not slot.outcome.done():
            slot.outcome.set_result(None)  # nothing left to replace: not a failure
        slot.successor = slot.outcome = None
        if slot.worker is not None:
            self._retire_process(slot.worker)
            slot.worker = None
        log.info("worker %d removed (scaled down)", slot.id)

    def send(self, worker_id: int | None, message: UserMessage, max_backlog: int) -> int:
        """Send ``message`` to the serving worker of slot ``worker_id``, or to all."""
        if worker_id is not None and worker_id not in self.slots:
            raise ValueError(f"no worker {worker_id}")
        sent = 0
        for slot in self.slots.values():
            worker = slot.worker
            if worker is None or worker.channel.closed or worker_id not in (None, slot.id):
                continue
            if worker.channel.backlog >= max_backlog:
                log.warning("%r has %d messages it has not read; dropping one more",
                            worker, worker.channel.backlog)
                continue
            worker.channel.send(message)
            sent += 1
        return sent

    # Stopping

    def stop_restarts(self) -> None:
        self.stopping = True
        for slot in self.slots.values():
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            if slot.outcome is not None and not slot.outcome.done():
                slot.outcome.set_result("the master is stopping")

    def drain_all(self) -> None:
        for worker in self.live():
            self.drain(worker)

    def signal_all(self, sig: signal.Signals) -> None:
        for worker in self.live():
            if worker.state not in (WorkerState.STOPPING, WorkerState.EXITED):
                worker.to(WorkerState.STOPPING)
            worker.kill(sig)
