"""The master accepts every connection and hands it to a worker (policy ``round-robin``).

Node's ``RoundRobinHandle``, done properly. Three parts, wired here:
``Acceptor`` accepts in batches, ``Scheduler`` owns every accepted fd until
a worker acks it (its theory of operation says where each fd is at every
moment), and the policy (``RoundRobin``) chooses the worker. A ready worker
is attached to the scheduler; one told to drain or killed is detached
(``remove``), one that refuses a hand-off detaches itself (in the
scheduler); one that exited gives its un-acked connections back
(``forget``), which go to the next worker first.

Once a second it closes connections that waited longer than
``--pending-timeout``, forgets load figures gone stale and updates the
accept rate.

The master runs under ``--master-sched`` (``shared.cpu_sched``) while it
hands off: its wake-ups then do not preempt a busy worker. Its workers are
started with the policy the master began with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from dispatcher.acceptor import Acceptor
from dispatcher.config import Config
from dispatcher.listeners import BindSpec, Listener, open_listeners
from dispatcher.policies import RoundRobin
from dispatcher.scheduler import Receiver, Scheduler
from dispatcher.stats import DistributionFigures, Rate
from shared import cpu_sched, hotpath

log = logging.getLogger(__name__)

#: How often pending connections are expired and load figures aged, in seconds.
_TICK_S = 1.0


class MasterAccepts:
    """The master-accepts distribution (see ``dispatcher.distribution``)."""

    POLICIES = ("round-robin",)

    def __init__(self, config: Config) -> None:
        self._window = config.window
        self._master_sched = config.master_sched
        self.policy = RoundRobin(config.window)
        self.scheduler = Scheduler(self.policy, config.max_pending, config.pending_timeout_s)
        # The hot path: the channel calls the scheduler directly.
        self.on_ack = self.scheduler.on_ack
        self.on_acked = self.scheduler.on_acked
        #: Told when accepting met EMFILE: the master's fd budget needs measuring again.
        self.on_fd_limit: Callable[[], None] | None = None
        self.acceptor: Acceptor | None = None
        self._rate = Rate()
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # While stopping: connections accepted from the backlog, and whether it may hold more.
        self._swept = 0
        self._backlog_left = False

    def __str__(self) -> str:
        return (f"round-robin (window {self._window}, master sched {cpu_sched.current()}, "
                f"{hotpath.describe()})")

    def listen(self, specs: Sequence[BindSpec], backlog: int) -> list[Listener]:
        return open_listeners(specs, backlog)

    def start(self, loop: asyncio.AbstractEventLoop, listeners: Sequence[Listener]) -> tuple[str, ...]:
        # Workers inherit the master's policy; they switch back to what it was started with.
        worker_sched, failed = cpu_sched.switch(self._master_sched)
        if failed:
            log.warning("master scheduling policy not switched to %s: %s", self._master_sched, failed)
        self._loop = loop
        self.acceptor = Acceptor(loop, listeners, self.scheduler)
        self.acceptor.on_fd_limit = self._fd_limit_met
        self.acceptor.start()
        self._tick = loop.call_later(_TICK_S, self._every_second)
        return () if worker_sched is None else ("--sched", worker_sched)

    def _every_second(self) -> None:
        assert self._loop is not None
        self._tick = self._loop.call_later(_TICK_S, self._every_second)
        self._rate.update(self.acceptor.accepted if self.acceptor else 0)
        self.scheduler.age_loads()
        expired = self.scheduler.expire(time.monotonic())
        if expired:
            log.warning(
                "closed %d connection(s) that waited over %g s for a worker",
                expired, self.scheduler.pending_timeout_s,
            )

    def _fd_limit_met(self) -> None:
        if self.on_fd_limit is not None:
            self.on_fd_limit()

    @property
    def connections_held(self) -> int:
        return self.scheduler.pending + self.scheduler.in_flight

    def hold_at_most(self, connections: int, workers: int) -> int:
        self.scheduler.limit_held(connections)
        # Without the bound: a full queue, and every worker's window in flight.
        return max(0, self.scheduler.max_pending + self._window * workers - connections)

    def add(self, worker: Receiver) -> None:
        self.scheduler.attach(worker)

    def remove(self, worker: Receiver) -> bool:
        self.scheduler.stop_sending(worker)
        return not self.scheduler.attached

    def forget(self, worker: Receiver) -> int:
        self.remove(worker)
        return self.scheduler.forget(worker)

    def report_load(self, worker: Receiver, load: int) -> None:
        self.scheduler.report_load(worker, load)

    def stop(self, sweep: bool) -> None:
        if self.acceptor is None:
            return
        if sweep:
            self._sweep(first=True)
        self.acceptor.stop()
        if self._backlog_left:
            # The queue was full: the backlog holds more, and a listener closed
            # to new connections can be emptied as the queue makes room, rather
            # than reset at its close. ``settle`` waits for that too.
            self.scheduler.on_room = self._sweep_later
        elif self._swept:
            log.info("accepted %d connection(s) still in the backlog", self._swept)

    def _sweep(self, first: bool = False) -> None:
        assert self.acceptor is not None
        swept, self._backlog_left = self.acceptor.sweep(closed_to_new_only=not first)
        self._swept += swept

    def _sweep_later(self) -> None:
        # Told from inside the scheduler: sweep once its step is over.
        self.scheduler.on_room = None
        assert self._loop is not None
        self._loop.call_soon(self._sweep_more)

    def _sweep_more(self) -> None:
        if not self._backlog_left:
            return  # the stop went on without it (a fast stop, the graceful timeout)
        self._sweep()
        if self._backlog_left and self.scheduler.attached:
            self.scheduler.on_room = self._sweep_later
            return
        self._backlog_left = False
        log.info("accepted %d connection(s) still in the backlog", self._swept)
        if self.scheduler.on_settled is not None:
            self.scheduler.on_settled()

    async def settle(self) -> None:
        scheduler = self.scheduler
        changed = asyncio.Event()
        scheduler.on_settled = changed.set
        try:
            while scheduler.attached and (self._backlog_left or not scheduler.settled):
                changed.clear()
                await changed.wait()
        finally:
            scheduler.on_settled = None
            # Settled, cut short or timed out: the listeners close next, and
            # nothing may sweep them after that.
            self._backlog_left = False
            if scheduler.on_room == self._sweep_later:
                scheduler.on_room = None

    def close(self) -> int:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        return self.scheduler.close_pending()

    def figures(self) -> DistributionFigures:
        scheduler, acceptor = self.scheduler, self.acceptor
        return {
            "accepted": acceptor.accepted if acceptor else 0,
            "accept_errors": acceptor.errors if acceptor else 0,
            "accept_rate": round(self._rate.per_s, 3),
            "pending": scheduler.pending,
            "in_flight": scheduler.in_flight,
            "handed_off": scheduler.handed_off,
            "handoff_messages": scheduler.handoff_messages,
            "redispatched": scheduler.redispatched,
            "expired": scheduler.expired,
        }
