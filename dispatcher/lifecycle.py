"""A worker process's life: its states, the events that move it, and the restart backoff.

Theory of operation
-------------------
Every rule of the state machine is in this module, as in h11's ``_state.py``:
``_TRANSITIONS`` maps a (state, event) pair to the next state, and a pair
that is not there is refused. The supervisor decides *when* an event
happens; it never sets a state itself.

::

    STARTING                  --ready-->         READY
    STARTING, READY           --drain-->         DRAINING
    STARTING                  --boot timeout-->  STOPPING
    STARTING, READY, DRAINING --stop-->          STOPPING
    every state but EXITED    --exit-->          EXITED

Events come from two sides, and so do errors (h11's two kinds):

- the worker's: ``READY`` (it loaded the app). Said again once it was
  ready, it is the worker's fault: ``WorkerError``, and the worker is
  replaced. Said after the master told it to drain or stop before it was
  ready, it changes nothing (however often).
- the master's: ``DRAIN`` (told to drain, or it began draining by itself),
  ``STOP`` (signalled to stop), ``BOOT_TIMEOUT`` (stopped because it was
  not ready in time: its exit is a failed boot), ``EXIT`` (its exit was
  reaped). These are idempotent, as in Supervisor's ``change_state``:
  draining a draining or stopping process, or stopping a stopping or exited
  one, changes nothing and says so. Only what cannot happen without a bug in the master (a
  process reaped twice) raises ``TransitionError``.

A slot (``dispatcher.slots``) outlives its processes; BACKOFF is the slot's
state while its restart waits, never a process's. How long it waits is
``Backoff``'s rule: a delay only for a crash loop (a process that died
before it was ready, or soon after), growing with each crash in a row; a
process that served for a while is restarted at once.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Final


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    EXITED = "exited"
    #: A slot's state while its restart waits (no process is in it).
    BACKOFF = "backoff"


class Event(enum.Enum):
    #: The worker said it is ready (the app is loaded).
    READY = "ready"
    #: The master told it to drain, or it began draining by itself (it refused a hand-off).
    DRAIN = "drain"
    #: The master signalled it to stop.
    STOP = "stop"
    #: The master stopped it because it was not ready within the boot timeout.
    BOOT_TIMEOUT = "boot timeout"
    #: Its exit was reaped.
    EXIT = "exit"


S = WorkerState
E = Event

_TRANSITIONS: Final[dict[tuple[WorkerState, Event], WorkerState]] = {
    (S.STARTING, E.READY): S.READY,
    # Told to drain or stop before it said ready: it stays as told.
    (S.DRAINING, E.READY): S.DRAINING,
    (S.STOPPING, E.READY): S.STOPPING,
    (S.STARTING, E.DRAIN): S.DRAINING,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
    (S.STOPPING, E.DRAIN): S.STOPPING,
    (S.EXITED, E.DRAIN): S.EXITED,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.READY, E.STOP): S.STOPPING,
    (S.DRAINING, E.STOP): S.STOPPING,
    (S.STOPPING, E.STOP): S.STOPPING,
    (S.EXITED, E.STOP): S.EXITED,
    (S.STARTING, E.BOOT_TIMEOUT): S.STOPPING,
    (S.STARTING, E.EXIT): S.EXITED,
    (S.READY, E.EXIT): S.EXITED,
    (S.DRAINING, E.EXIT): S.EXITED,
    (S.STOPPING, E.EXIT): S.EXITED,
}


class TransitionError(Exception):
    """A state change the lifecycle does not allow, asked for by the master: a bug in it."""


class WorkerError(Exception):
    """The worker broke a rule of its life (it said ready twice); it is to be replaced."""


@dataclass
class Life:
    """One process's place in the state machine: the lifecycle's own per-worker state.

    Written only through ``handle`` and ``note_error`` (by the supervisor, which
    decides when each event happens).

    Attributes:
        state: where it is now.
        said_ready: it became ready (saying so again is a ``WorkerError``).
        boot_timed_out: it was stopped because it was not ready in time (its
            exit counts as a failed boot).
        error: the last error the worker reported about itself, if any.
        ready_at: when it became ready (monotonic), None until it did.
    """

    state: WorkerState = WorkerState.STARTING
    said_ready: bool = False
    ready_at: float | None = None
    boot_timed_out: bool = False
    error: str | None = None

    def handle(self, event: Event) -> bool:
        """Take ``event``; return whether the state changed.

        Raises:
            WorkerError: a second ``READY``; nothing changes.
            TransitionError: the master asked for what cannot happen; nothing changes.
        """
        if event is Event.READY and self.said_ready:
            raise WorkerError("sent ready twice")
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise TransitionError(f"a worker cannot take {event.value} while {self.state.value}")
        changed = new is not self.state
        self.state = new
        if new is WorkerState.READY and not self.said_ready:
            self.said_ready = True
            self.ready_at = time.monotonic()
        elif event is Event.BOOT_TIMEOUT:
            self.boot_timed_out = True
        return changed

    def note_error(self, text: str) -> None:
        """The worker reported ``text`` as what went wrong (the exit line and a failed boot name it)."""
        self.error = text

    @property
    def exited(self) -> bool:
        return self.state is WorkerState.EXITED

    @property
    def leaving(self) -> bool:
        """Told to drain or stop: its exit is expected."""
        return self.state in (WorkerState.DRAINING, WorkerState.STOPPING)


@dataclass
class Backoff:
    """A slot's restart delay: none for a process that served, a growing one for a crash loop.

    A process that died before it was ready, or within ``served_after_s`` of
    becoming ready, is a crash: the first in a row waits ``initial_s``, each
    next one ``factor`` times longer, up to ``max_s`` (PM2's
    ``exp_backoff_restart_delay``). One that was ready longer served: it is
    restarted at once and the count starts over. So is one killed from
    outside (SIGKILL, SIGTERM and the like, not sent by the master): its
    code did not fail, however early it died. So a worker killed by an
    operator or a chaos test, however often, is back as fast as a process
    can start, and only code that cannot stay up is held back.
    ``served_after_s`` is shorter than Supervisor's ``startsecs`` and PM2's
    ``min_uptime`` (1 s): a crash on the first request lands within
    milliseconds of ready, while a worker that died after serving half a
    second is no loop.
    """

    initial_s: float = 0.1
    factor: float = 1.5
    max_s: float = 15.0
    served_after_s: float = 0.5
    #: Crashes in a row (reset by a process that served).
    crashes: int = field(default=0, init=False)

    def next_delay(self, ready_for_s: float | None, killed_from_outside: bool = False) -> float:
        """How long to wait before restarting a process that was ready for ``ready_for_s`` (None: never)."""
        if killed_from_outside or (ready_for_s is not None and ready_for_s >= self.served_after_s):
            self.crashes = 0
            return 0.0
        self.crashes += 1
        return min(self.initial_s * self.factor ** (self.crashes - 1), self.max_s)
