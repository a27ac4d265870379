"""Worker processes over their lives: start, restart, replace, retire.

Theory of operation
-------------------
The supervisor keeps the slot table (``dispatcher.slots``) filled: every
slot's serving process is started, and restarted when it exits, after the
slot's backoff (``dispatcher.lifecycle.Backoff``). It hears each process's
messages and exit (``WorkerEvents``) and decides what follows; every state
change goes through the lifecycle's rules (``WorkerProcess.handle``), which
are idempotent, so no decision needs to guard against a repeated one.

- Ready: the process is given to the distribution (``add``). A successor
  (started by ``replace``: a reload, a recycle) then takes its slot and the
  old process is retired: told to drain, killed if it is not gone within the
  graceful timeout. So capacity never drops.
- Exit: the process's channel is read to the end (acks it sent before dying
  still count), the distribution takes back what it held un-acked
  (``forget``), its pidfd and channel are closed, its counts go to its slot's
  totals. A retired process restarts nothing; a successor that never got
  ready leaves the old worker serving; a serving process is restarted after
  the backoff, unless it could never boot while no other worker serves, which
  stops the master (``on_fatal``) instead of a crash loop.
- Kills (a protocol fault, a boot timeout, no pong within the ping timeout)
  stop the process; its exit then does the rest.

Processes are made by the ``spawn`` given to it, so its decisions can be
checked without starting any.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from dispatcher.config import Config
from dispatcher.distribution import Distribution
from dispatcher.health import Health
from dispatcher.lifecycle import Event, WorkerError, WorkerState
from dispatcher.listeners import BindError
from dispatcher.messages import Mailbox
from dispatcher.recycling import Recycling
from dispatcher.slots import Replaced, Slot, Slots
from dispatcher.worker_process import WorkerEvents, WorkerProcess
from shared.channel import PEER_CLOSED, close_fds
from shared.exitcodes import ExitCode
from shared.protocol import Drain, Error, Hello, Message, Pong, Ready, UserMessage

log = logging.getLogger(__name__)

#: Worker exit codes that restarting cannot fix.
_FATAL_EXITS = frozenset({ExitCode.APP_LOAD_FAILED, ExitCode.WORKER_BOOT_FAILED})
#: Exit statuses of a worker that was asked to stop and did.
_STOP_CODES = frozenset({0, -signal.SIGTERM, -signal.SIGKILL})
#: Deaths by these signals, when the master sent none, are a kill from outside, not a crash.
_OUTSIDE_KILLS = frozenset({-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGQUIT,
                            -signal.SIGHUP})
#: A worker that closed its channel but lingers is killed after this.
_LINGER_S = 5.0
#: An unresponsive worker gets SIGTERM, then SIGKILL after this.
_KILL_GRACE_S = 1.0


class Spawn(Protocol):
    """Start a worker process for slot ``worker_id`` (``dispatcher.worker_process.spawn``, bound).

    Raises:
        OSError: it could not be started.
    """

    def __call__(
        self, worker_id: int, key: int, events: WorkerEvents, max_requests: int
    ) -> WorkerProcess: ...


class Supervisor:
    """Owns the worker slots and every worker process.

    Parameters:
        config: the master's settings (worker count to begin with, timeouts).
        distribution: where ready workers go.
        health: told of pongs and of workers becoming ready.
        recycling: says when a worker is due for replacement.
        mailbox: where workers' user messages go.
        spawn: starts a process.
        on_fatal: called once with an exit code when workers can never boot.
    """

    def __init__(
        self,
        config: Config,
        distribution: Distribution,
        health: Health,
        recycling: Recycling,
        mailbox: Mailbox,
        spawn: Spawn,
        on_fatal: Callable[[ExitCode], None],
    ) -> None:
        self._graceful_timeout_s = config.graceful_timeout_s
        self._boot_timeout_s = config.boot_timeout_s
        self._pending_timeout_s = config.pending_timeout_s
        self.distribution = distribution
        self._health = health
        self._recycling = recycling
        self._mailbox = mailbox
        self._spawn = spawn
        self._on_fatal = on_fatal
        self.slots = Slots(config.workers)
        self.stopping = False
        #: Set whenever a process becomes ready or exits, the slots change, or the stop begins.
        self.changed = asyncio.Event()
        self._loop_or_none: asyncio.AbstractEventLoop | None = None
        self._next_key = 0
        self._fatal = False
        self._said_none_ready = False
        # The last boot failure logged: every worker fails the same way, and one line says it.
        self._boot_error_said: str | None = None

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop_or_none is not None, "Supervisor.start() first"
        return self._loop_or_none

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every slot's worker on ``loop``."""
        self._loop_or_none = loop
        for slot in self.slots:
            self._start(slot)

    def live(self) -> list[WorkerProcess]:
        """Every process not yet reaped."""
        return self.slots.live()

    def all_ready(self) -> bool:
        """True when every slot's serving process is ready and the master is not stopping."""
        return not self.stopping and self.slots.all_ready()

    # Starting and restarting

    def _start(self, slot: Slot, successor: bool = False) -> WorkerProcess | None:
        slot.restart_timer = None
        if self.stopping:
            return None
        self._next_key += 1
        try:
            worker = self._spawn(slot.id, self._next_key, self, self._recycling.draw_max_requests())
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.id, exc)
            slot.last_exit = f"spawn failed: {exc}"
            if not successor:
                self._restart(slot, ready_for_s=None)
            return None
        if successor:
            slot.successor = worker
        else:
            slot.worker = worker
        log.debug("%r started", worker)
        return worker

    def _restart(self, slot: Slot, ready_for_s: float | None, killed_from_outside: bool = False) -> None:
        """Restart ``slot``: at once if its process served or was killed from outside, else after the
        backoff (a crash loop)."""
        delay = slot.backoff.next_delay(ready_for_s, killed_from_outside)
        slot.restarts += 1
        if delay <= 0:
            why = "killed from outside" if killed_from_outside else f"it served {ready_for_s or 0.0:.1f} s"
            log.info("worker %d restarts at once (%s)", slot.id, why)
            self._start(slot)
            return
        slot.restart_timer = self._loop.call_later(delay, self._start, slot)
        log.info("worker %d restarts in %.1f s (crash %d in a row)", slot.id, delay, slot.backoff.crashes)

    # What the master hears from each worker (WorkerEvents)

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None:
        match message:
            case Pong():
                self._health.on_pong(worker, message)
                if worker.pulse.draining:
                    # Under shared and reuseport no refusal would ever say so.
                    self._drains_by_itself(worker, "its pong says it is draining")
                # Keeps the distribution's load figure fresh for a worker that is
                # sent nothing (acks carry it otherwise).
                self.distribution.report_load(worker, worker.pulse.figure("active"))
                self.recycle_if_due(worker)
            case UserMessage(payload):
                self._mailbox.deliver(worker, payload)
            case Hello(worker_id, pid):
                if worker_id != worker.id or pid != worker.pid:
                    self.kill(worker, f"hello from worker {worker_id} pid {pid}, wrong one")
            case Ready():
                self._on_ready(worker)
            case Error(code, text):
                worker.life.note_error(text)
                if code == ExitCode.APP_LOAD_FAILED:
                    log.debug("%r: cannot load app: %s", worker, text)
                elif code == ExitCode.WORKER_BOOT_FAILED and text == self._boot_error_said:
                    log.debug("%r: %s (again)", worker, text)
                else:
                    if code == ExitCode.WORKER_BOOT_FAILED:
                        self._boot_error_said = text
                    log.error("%r: %s", worker, text)
            case _:
                close_fds(fds)
                self.kill(worker, f"sent {type(message).__name__}, which only the master sends")

    def _on_ready(self, worker: WorkerProcess) -> None:
        try:
            if not worker.handle(Event.READY):
                return  # told to drain or stop before it was ready
        except WorkerError as exc:
            self.kill(worker, str(exc))
            return
        self._health.arm(worker)  # the ping timeout counts from here
        self._said_none_ready = False
        self._boot_error_said = None
        self.changed.set()
        try:
            self.distribution.add(worker)
        except (BindError, OSError) as exc:
            self.kill(worker, f"no listening socket for it: {exc}")
            return
        if worker.channel.closed:
            return  # it failed while being given its sockets: its exit restarts the slot
        slot = self.slots.get(worker.id)
        if slot is None or slot.successor is not worker:
            log.info("%r ready", worker)
            return
        old, slot.worker, slot.successor = slot.worker, worker, None
        if old is not None:
            log.info("%r ready, replacing pid %d (%s)", worker, old.pid, slot.replacing)
            self.retire(old)
        else:
            log.info("%r ready", worker)
        slot.settle_replacement(None)

    def on_fault(self, worker: WorkerProcess, reason: str) -> None:
        # Told from inside the distribution: act once it has finished its step.
        self._loop.call_soon(self.kill, worker, reason)

    def on_refusal(self, worker: WorkerProcess) -> None:
        self._drains_by_itself(worker, "it refused a hand-off")

    def _drains_by_itself(self, worker: WorkerProcess, how: str) -> None:
        """``worker`` began draining without being told (its own SIGTERM, a custom server that
        returned, out of fds): its slot must not go idle for as long as its connections live.

        It is retired (killed after the graceful timeout) and its slot restarted
        as if it had exited: at once if it served, after the backoff if it
        drains as soon as it is ready (a loop, like a crash loop).
        """
        if not worker.handle(Event.DRAIN):
            return  # the master told it to drain (or stop), or it said so already
        slot = self.slots.get(worker.id)
        if slot is None or slot.worker is not worker or self.stopping:
            log.info("%r is draining (%s); sending it nothing more", worker, how)
            return
        log.warning("%r drains by itself (%s); starting worker %d afresh, the old one has %g s "
                    "to finish", worker, how, slot.id, self._graceful_timeout_s)
        slot.worker = None
        self.retire(worker)
        if slot.successor is None:
            slot.cancel_restart()
            self._restart(slot, worker.ready_for_s)
        # else: the successor on its way takes the slot once ready.

    def on_max_requests(self, worker: WorkerProcess) -> None:
        """Its acks reached its ``max_requests`` (told from inside the distribution)."""
        self._loop.call_soon(self.recycle_if_due, worker)

    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None:
        self.distribution.remove(worker)
        if reason == PEER_CLOSED:
            # The worker is exiting; its pidfd will say when. One that closed
            # its channel and lives on is of no use.
            self._loop.call_later(_LINGER_S, self._linger_over, worker)
        else:
            self.kill(worker, reason)

    def _linger_over(self, worker: WorkerProcess) -> None:
        if worker.returncode is None:
            worker.handle(Event.STOP)  # the master's kill: its exit is no kill from outside
            worker.kill(signal.SIGKILL)

    def on_exit(self, worker: WorkerProcess) -> None:
        try:
            worker.channel.read_acks_of_dead_peer()
        finally:
            # Whatever happened above, the process is reaped, its connections
            # go back to the queue and its fds are closed.
            returncode = worker.reap()
            alone = self.distribution.remove(worker)
            requeued = self.distribution.forget(worker)
            worker.channel.close()
        expected = worker.life.leaving or self.stopping
        worker.handle(Event.EXIT)
        detail = f"; {requeued} un-acked connection(s) re-dispatched" if requeued else ""
        level = logging.INFO if expected and returncode in _STOP_CODES else logging.WARNING
        log.log(level, "%r %s after %.1f s%s", worker, worker.exit_reason, worker.uptime_s, detail)
        self.changed.set()
        self.slots.exited(worker)
        slot = self.slots.get(worker.id)
        if self.slots.retired.pop(worker.key, None) is not None or slot is None:
            return
        if slot.successor is worker:
            self._successor_failed(slot, worker)
        elif slot.worker is worker:
            self._serving_exited(slot, worker, alone, killed_by_master=expected)

    def _successor_failed(self, slot: Slot, worker: WorkerProcess) -> None:
        slot.successor = None
        why = worker.life.error or worker.exit_reason
        log.error("worker %d: its replacement failed to boot (%s); the old one keeps serving", slot.id, why)
        slot.settle_replacement(f"worker {slot.id} failed to boot: {why}")
        if slot.worker is None and not self.stopping:
            self._restart(slot, worker.ready_for_s)

    def _serving_exited(self, slot: Slot, worker: WorkerProcess, alone: bool, killed_by_master: bool) -> None:
        slot.worker = None
        slot.last_exit = worker.exit_reason
        if self.stopping or self._fatal:
            return  # stopping anyway (if fatal: one line already said why)
        returncode = worker.returncode
        if (returncode in _FATAL_EXITS or worker.life.boot_timed_out) and not self.slots.serving():
            self._fatal = True
            code = ExitCode(returncode) if returncode in _FATAL_EXITS else ExitCode.WORKER_BOOT_FAILED
            if worker.life.error and code is ExitCode.APP_LOAD_FAILED:
                log.error("cannot load app: %s", worker.life.error)
            elif worker.life.error and worker.life.error == self._boot_error_said:
                log.error("worker %d failed to boot (the error above): stopping", slot.id)
            else:
                log.error("worker %d failed to boot: %s", slot.id, worker.life.error or worker.exit_reason)
            self._on_fatal(code)
            return
        if slot.successor is not None:
            return  # the replacement on its way takes over when ready
        waiting = self.distribution.figures()["pending"] if alone else 0
        if waiting and not self._said_none_ready:
            # Once until a worker is ready again: the next exits concern the same connections.
            self._said_none_ready = True
            log.warning("no worker is ready: %d connection(s) wait (up to %.0f s) for a restart",
                        waiting, self._pending_timeout_s)
        # The master's own kills (a fault, a boot timeout, no pong) leave it
        # STOPPING: those are the code's failures and count as crashes.
        outside = returncode in _OUTSIDE_KILLS and not killed_by_master
        self._restart(slot, worker.ready_for_s, killed_from_outside=outside)

    # Decisions of the master's own

    def kill(self, worker: WorkerProcess, reason: str) -> None:
        """Kill a misbehaving worker; its exit re-queues its connections (and restarts it)."""
        if worker.returncode is not None or worker.life.exited:
            return
        log.error("%r: %s; replacing it", worker, reason)
        self.distribution.remove(worker)
        worker.handle(Event.STOP)
        worker.kill(signal.SIGKILL)

    def drain(self, worker: WorkerProcess) -> None:
        """Tell ``worker`` to finish its connections and exit; send it nothing more."""
        self.distribution.remove(worker)
        worker.handle(Event.DRAIN)
        if not worker.channel.closed:
            worker.channel.send(Drain())

    def retire(self, worker: WorkerProcess) -> None:
        """Drain ``worker`` for good: its exit restarts nothing; killed after the graceful timeout."""
        self.slots.retired[worker.key] = worker
        self.drain(worker)
        self._loop.call_later(self._graceful_timeout_s, self._overdue, worker)

    def _overdue(self, worker: WorkerProcess) -> None:
        if worker.returncode is None and worker.key in self.slots.retired:
            log.warning("%r still draining after the graceful timeout (%g s); killing it",
                        worker, self._graceful_timeout_s)
            worker.handle(Event.STOP)
            worker.kill(signal.SIGKILL)

    def check_boot(self, now: float) -> None:
        """Kill workers not ready within the boot timeout (a hung import, a deadlock)."""
        limit = self._boot_timeout_s
        for worker in self.live():
            if (worker.state is WorkerState.STARTING and not worker.life.boot_timed_out
                    and now - worker.started > limit):
                log.error("%r not ready after %.1f s (boot timeout %g s); killing it",
                          worker, now - worker.started, limit)
                worker.handle(Event.BOOT_TIMEOUT)
                worker.kill(signal.SIGKILL)

    def ping(self) -> None:
        """Ping every live worker; stop those silent longer than the ping timeout."""
        for worker, silent_s in self._health.tick(self.live()):
            log.error(
                "%r is unresponsive: no pong for %.1f s (ping timeout %g s); killing it",
                worker, silent_s, self._health.timeout_s,
            )
            self.distribution.remove(worker)
            worker.handle(Event.STOP)
            worker.kill(signal.SIGTERM)
            self._loop.call_later(_KILL_GRACE_S, worker.kill, signal.SIGKILL)

    # Replacing and recycling

    def replace(self, slot: Slot, reason: str) -> Replaced:
        """Start a successor for ``slot``; it takes over once ready and the old one drains.

        Returns:
            A future: None once the successor serves, else why it failed (the
            old worker then keeps serving).
        """
        if slot.replaced is not None:
            return slot.replaced
        replaced: Replaced = self._loop.create_future()
        if self.stopping:
            replaced.set_result("the master is stopping")
            return replaced
        slot.cancel_restart()
        slot.replacing = reason
        slot.replaced = replaced
        if self._start(slot, successor=True) is None:
            slot.replaced = None
            replaced.set_result(f"worker {slot.id} could not be started: {slot.last_exit}")
        return replaced

    def recycle_if_due(self, worker: WorkerProcess) -> None:
        """Replace ``worker`` if it serves its slot and recycling says it is due."""
        slot = self.slots.get(worker.id)
        if slot is not None and slot.worker is worker and not self.stopping:
            self._recycling.recycle_if_due(slot, self.replace)

    def recycle_all_due(self) -> None:
        if not self.stopping:
            for slot in self.slots:
                self._recycling.recycle_if_due(slot, self.replace)

    # Scaling

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
        ids = [slot.id for slot in self.slots]
        added = removed = 0
        for _ in range(workers - len(ids)):
            self._start(self.slots.add())
            added += 1
        for slot_id in reversed(ids[workers:]):
            self._remove(self.slots.remove(slot_id))
            removed += 1
        if added or removed:
            log.info("scaled to %d worker(s): %d added, %d removed", workers, added, removed)
            self.changed.set()
        return added, removed

    def _remove(self, slot: Slot) -> None:
        slot.cancel_restart()
        slot.settle_replacement(None)  # nothing left to replace: not a failure
        for worker in (slot.successor, slot.worker):
            if worker is not None:
                self.retire(worker)
        slot.successor = slot.worker = None
        log.info("worker %d removed (scaled down)", slot.id)

    def serving_workers(self, worker_id: int | None) -> list[WorkerProcess]:
        """The serving process of slot ``worker_id``, or of every slot, that can be sent to.

        Raises:
            ValueError: there is no slot ``worker_id``.
        """
        if worker_id is not None and worker_id not in self.slots:
            raise ValueError(f"no worker {worker_id}")
        return [
            slot.worker for slot in self.slots
            if slot.worker is not None and not slot.worker.channel.closed and worker_id in (None, slot.id)
        ]

    # Stopping

    def stop_restarts(self) -> None:
        self.stopping = True
        self.changed.set()
        for slot in self.slots:
            slot.cancel_restart()
            slot.settle_replacement("the master is stopping")

    def drain_all(self) -> None:
        for worker in self.live():
            self.drain(worker)

    def signal_all(self, sig: signal.Signals) -> None:
        for worker in self.live():
            worker.handle(Event.STOP)
            worker.kill(sig)
