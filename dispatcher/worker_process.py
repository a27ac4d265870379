"""One worker process as the master sees it: spawning, its channel, its exit.

Theory of operation
-------------------
``spawn`` makes a socketpair, starts ``python -m worker`` with the worker's
end passed by ``pass_fds`` (a fresh interpreter: no inherited threads or
locks, and new code on disk is picked up), then closes the master's copy of
the worker's end, so EOF on the channel means the worker is gone.

The process's exit is watched through a pidfd on the event loop: readable
once the process has exited, so there is no SIGCHLD handler and no polling.
``reap`` collects the status and closes the pidfd; the channel is closed by
whoever handles the exit (``WorkerEvents.on_exit``), once it has read it to
the end.

Each part of the master keeps its own record of the process, one attribute
away, and is the only one to write it: ``life`` (``dispatcher.lifecycle``:
its state), ``lane`` (``dispatcher.scheduler``: the master's copies of the
connections it was handed, and their counts) and ``pulse``
(``dispatcher.health``: pings and what the worker reports of itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from dispatcher.health import Pulse
from dispatcher.lifecycle import Event, Life, WorkerState
from dispatcher.scheduler import Lane
from dispatcher.stats import ProcessSampler
from shared.channel import Channel, socketpair
from shared.exitcodes import describe
from shared.protocol import Message


class WorkerEvents(Protocol):
    """What the master hears about a worker, each with the worker it concerns."""

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None: ...
    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None: ...
    def on_exit(self, worker: WorkerProcess) -> None: ...
    def on_fault(self, worker: WorkerProcess, reason: str) -> None: ...
    def on_refusal(self, worker: WorkerProcess) -> None: ...
    def on_max_requests(self, worker: WorkerProcess) -> None: ...


#: Where a worker's acks go: the hot path, straight to the distribution.
OnAck = Callable[["WorkerProcess", tuple[int, ...], bool, int], None]
#: Told of an ack its channel settled itself: how many connections, and the load it reported.
OnAcked = Callable[["WorkerProcess", int, int], None]


class WorkerProcess:
    """A running worker process.

    Attributes:
        id: the worker's number as users see it (``worker 3``), its slot's.
        key: unique per process, how the distribution tells processes apart.
        max_requests: connections after which it is recycled (0: never).
    """

    def __init__(
        self,
        worker_id: int,
        key: int,
        proc: subprocess.Popen[bytes],
        pidfd: int,
        master_end: socket.socket,
        loop: asyncio.AbstractEventLoop,
        events: WorkerEvents,
        on_ack: OnAck,
        max_requests: int = 0,
        on_acked: OnAcked | None = None,
    ) -> None:
        self.id = worker_id
        self.key = key
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = pidfd
        self.max_requests = max_requests
        self.started = time.monotonic()
        self.returncode: int | None = None
        self.life = Life()
        self.lane = Lane()
        self.pulse = Pulse(last_heard=self.started)
        self.sampler = ProcessSampler(self.pid)
        self._events = events
        self.channel = Channel(
            master_end,
            loop,
            functools.partial(events.on_message, self),
            functools.partial(events.on_channel_closed, self),
            functools.partial(on_ack, self),
            # The hot path: accepted acks of what its lane holds in flight are settled by
            # the channel (it closes the master's copies) and only counted by ``on_acked``.
            in_flight=self.lane.in_flight if on_acked is not None else None,
            on_acked=functools.partial(on_acked, self) if on_acked is not None else None,
        )

    def __repr__(self) -> str:
        return f"worker {self.id} (pid {self.pid})"

    @property
    def state(self) -> WorkerState:
        return self.life.state

    def handle(self, event: Event) -> bool:
        """Move its state on ``event`` (see ``dispatcher.lifecycle``); return whether it changed."""
        return self.life.handle(event)

    # What the distribution learns about it, passed on to whoever started it.

    def faulted(self, reason: str) -> None:
        self._events.on_fault(self, reason)

    def refused_handoff(self) -> None:
        self._events.on_refusal(self)

    def reached_max_requests(self) -> None:
        self._events.on_max_requests(self)

    def counts(self) -> dict[str, int]:
        """Its counters, to add to its slot's totals when it exits."""
        lane, pulse = self.lane, self.pulse
        return {
            "handed_off": lane.handed_off, "acked": lane.acked, "refused": lane.refused,
            "handled": pulse.figure("handled"), "accepted": pulse.figure("accepted"),
        }

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def ready_for_s(self) -> float | None:
        """How long it has been ready (None if it never was): what tells a crash loop from a served life."""
        ready_at = self.life.ready_at
        return None if ready_at is None else time.monotonic() - ready_at

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` unless the process was already reaped."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def reap(self) -> int:
        """Collect the exit status (the pidfd said it exited) and return it."""
        if self.returncode is None:
            self.returncode = self.proc.wait()
            os.close(self.pidfd)
        return self.returncode

    @property
    def exit_reason(self) -> str:
        if self.returncode is None:
            return "running"
        return describe(self.returncode)


def spawn(
    worker_id: int,
    key: int,
    worker_args: Sequence[str],
    loop: asyncio.AbstractEventLoop,
    events: WorkerEvents,
    on_ack: OnAck,
    max_requests: int = 0,
    on_acked: OnAcked | None = None,
) -> WorkerProcess:
    """Start a worker process for slot ``worker_id`` and wire it to ``loop``.

    Parameters:
        worker_args: arguments after ``python -m worker --id N --channel-fd F``.
        events: told of the worker's messages, channel end and exit, and of
            what the distribution learns about it.
        on_ack: told of each ack it sends (but those its channel settles, with ``on_acked``).
        on_acked: if given, told of each accepted ack its channel settled itself.

    Raises:
        OSError: the process could not be started; nothing is left open.
    """
    master_end, worker_end = socketpair()
    try:
        command = [
            sys.executable, "-m", "worker",
            "--id", str(worker_id),
            "--channel-fd", str(worker_end.fileno()),
            "--master-pid", str(os.getpid()),
            *worker_args,
        ]
        proc = subprocess.Popen(command, pass_fds=(worker_end.fileno(),))
    except BaseException:
        master_end.close()
        raise
    finally:
        worker_end.close()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        # Out of fds: without a pidfd the exit cannot be watched; undo the start.
        proc.kill()
        proc.wait()
        master_end.close()
        raise
    worker = WorkerProcess(worker_id, key, proc, pidfd, master_end, loop, events, on_ack, max_requests,
                           on_acked)
    loop.add_reader(pidfd, _exited, loop, worker, events)
    return worker


def _exited(loop: asyncio.AbstractEventLoop, worker: WorkerProcess, events: WorkerEvents) -> None:
    loop.remove_reader(worker.pidfd)
    events.on_exit(worker)
