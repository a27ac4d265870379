"""One worker process as the master sees it: spawning, its channel, its exit.

Theory of operation
-------------------
``spawn`` makes a socketpair, starts ``python -m worker`` with the worker's
end passed by ``pass_fds`` (a fresh interpreter: no inherited threads or
locks, and new code on disk is picked up), then closes the master's copy of
the worker's end, so EOF on the channel means the worker is gone.

The process's exit is watched through a pidfd on the event loop: readable
once the process has exited, so there is no SIGCHLD handler and no polling.
``reap`` collects the status and closes the pidfd.

``inflight`` holds the hand-offs sent to this worker and not yet acked, and
``staged`` the ones dealt to it and about to be sent: the master's own
copies of those connections. The scheduler owns them; this class only keeps
the lists.
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
from collections.abc import Sequence
from typing import Any, Protocol

from dispatcher.lifecycle import WorkerState, transition
from dispatcher.stats import ProcessSampler
from shared.channel import Channel, socketpair
from shared.exitcodes import describe
from shared.protocol import Message


class WorkerEvents(Protocol):
    """What the master hears about a worker, each with the worker it concerns."""

    def on_message(self, worker: WorkerProcess, message: Message, fds: list[int]) -> None: ...
    def on_ack(self, worker: WorkerProcess, conn_ids: tuple[int, ...], accepted: bool, load: int) -> None: ...
    def on_channel_closed(self, worker: WorkerProcess, reason: str) -> None: ...
    def on_exit(self, worker: WorkerProcess) -> None: ...


class WorkerProcess:
    """A running worker process.

    Attributes:
        slot: the worker's number as users see it (``worker 3``).
        key: unique per process, how policies tell processes apart.
        inflight: conn ids (the master's fds) handed off and not yet acked, with
            the time each was accepted.
        staged: connections dealt to it and not yet sent (see scheduler).
    """

    def __init__(
        self,
        slot: int,
        key: int,
        proc: subprocess.Popen[bytes],
        pidfd: int,
        master_end: socket.socket,
        loop: asyncio.AbstractEventLoop,
        events: WorkerEvents,
    ) -> None:
        self.slot = slot
        self.key = key
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = pidfd
        self.channel = Channel(
            master_end,
            loop,
            functools.partial(events.on_message, self),
            functools.partial(events.on_channel_closed, self),
            functools.partial(events.on_ack, self),
        )
        self.started = time.monotonic()
        self.inflight: dict[int, float] = {}
        self.staged: list[tuple[int, float]] = []
        self.ready = False
        self.error: str | None = None
        self.returncode: int | None = None
        # The master's own counts of this process's hand-offs.
        self.handed_off = self.acked = self.refused = 0
        #: Window slots held by hand-offs that found the channel full (see scheduler).
        self.blocked_slots = 0
        # Health: the outstanding ping (if any) and what the last pong said.
        self.ping_seq = 0
        self.ping_sent_at: float | None = None
        self.last_heard = self.started
        self.rtt_last_s: float | None = None
        self.rtt_total_s = 0.0
        self.pongs = 0
        self.reported: dict[str, Any] = {}
        self.unresponsive = False
        self.boot_timed_out = False
        self.state = WorkerState.STARTING
        #: Connections after which it is recycled (0: never), drawn at spawn.
        self.max_requests = 0
        self.sampler = ProcessSampler(self.pid)

    def __repr__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    def to(self, new: WorkerState) -> None:
        """Move to ``new`` (see ``lifecycle.transition``)."""
        self.state = transition(self.state, new)

    def served(self) -> int:
        """Connections this process took: acked hand-offs, or its own accepts."""
        return max(self.acked, int(self.reported.get("accepted", 0)))

    def counts(self) -> dict[str, int]:
        """Its counters, to add to its slot's totals when it exits."""
        return {
            "handed_off": self.handed_off, "acked": self.acked, "refused": self.refused,
            "handled": int(self.reported.get("handled", 0)),
            "accepted": int(self.reported.get("accepted", 0)),
        }

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

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
    slot: int,
    key: int,
    worker_args: Sequence[str],
    loop: asyncio.AbstractEventLoop,
    events: WorkerEvents,
) -> WorkerProcess:
    """Start a worker process for ``slot`` and wire it to ``loop``.

    Parameters:
        worker_args: arguments after ``python -m worker --id N --channel-fd F``.
        events: told of the worker's messages, acks, channel end and exit.

    Raises:
        OSError: the process could not be started; nothing is left open.
    """
    master_end, worker_end = socketpair()
    try:
        command = [
            sys.executable, "-m", "worker",
            "--id", str(slot),
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
    worker = WorkerProcess(slot, key, proc, pidfd, master_end, loop, events)
    loop.add_reader(pidfd, _exited, loop, worker, events)
    return worker


def _exited(loop: asyncio.AbstractEventLoop, worker: WorkerProcess, events: WorkerEvents) -> None:
    loop.remove_reader(worker.pidfd)
    events.on_exit(worker)
