"""A dispatcher under test, with its control socket, for the benchmark lab.

``LabServer`` starts ``python -m dispatcher`` (``bench.wrk_bench.Server``:
port 0, read back from the log, every worker's ready line awaited) with
``--control`` in a private directory, and reads the master's own figures
through it (``dispatcher.ctl.request``). On leaving the ``with`` block, by
error or Ctrl-C too, the master is sent SIGTERM and waited for, then killed
with any worker left, by PID.

The per-worker counters (``handled``, ``active``) reach the master in each
worker's pong, once per ping interval, so a snapshot taken just after a load
stops lags behind it; ``settled_status`` waits, bounded, for a snapshot that
is known to be fresh.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.wrk_bench import Server
from dispatcher.ctl import CtlError, request

#: The dispatcher's default ping interval: workers report their counters this often.
PING_INTERVAL_S = 1.0
#: A snapshot taken this long after the load stopped holds a pong sent after it.
SETTLE_AFTER_S = PING_INTERVAL_S + 0.25
#: Pause between two status requests while waiting for the counters to settle.
SETTLE_POLL_S = 0.25
#: Bound on waiting for settled counters.
SETTLE_TIMEOUT_S = 8.0
#: Bound on one status request.
STATUS_TIMEOUT_S = 10.0

_serial = itertools.count(1)

Snapshot = dict[str, Any]


class LabServer:
    """A fresh dispatcher serving ``app`` on 127.0.0.1 with a control socket in ``control_dir``.

    Parameters:
        app: ``MODULE:ATTRIBUTE``, imported by the workers from the repository root.
        policy: ``round-robin``, ``shared`` or ``reuseport``.
        workers: worker processes.
        control_dir: a private (0700) directory for the control socket.
        extra: more server arguments.
    """

    def __init__(self, app: str, policy: str, workers: int, control_dir: Path,
                 extra: Sequence[str] = ()) -> None:
        self.app = app
        self.policy = policy
        self.workers = workers
        self.control_path = str(control_dir / f"{next(_serial)}.sock")
        self.extra = ("--control", self.control_path, *extra)
        self.exit_code: int | None = None
        self._server: Server | None = None

    def __enter__(self) -> LabServer:
        self._server = Server(self.policy, self.workers, self.extra, app=self.app)
        try:
            self._server.start()
        except BaseException:
            self.exit_code = self._server.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self.exit_code = self._server.stop()

    @property
    def server(self) -> Server:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def command(self) -> list[str]:
        return self.server.command

    @property
    def log(self) -> str:
        return self._server.log if self._server is not None else ""

    def status(self) -> Snapshot:
        """The master's snapshot (``ctl status``).

        Raises:
            CtlError: the master did not answer in time or refused.
        """
        snapshot: Snapshot = request(self.control_path, "status", timeout_s=STATUS_TIMEOUT_S)
        return snapshot

    def reload(self, timeout_s: float = 120.0) -> Any:
        """Rolling reload (``ctl reload``); returns once every worker was replaced.

        Raises:
            CtlError: it failed or took longer than ``timeout_s``.
        """
        return request(self.control_path, "reload", timeout_s=timeout_s)

    def settled_status(self, load_stopped_at: float) -> tuple[Snapshot, bool]:
        """A snapshot whose worker counters include everything up to ``load_stopped_at``.

        Waits until a pong sent after that moment must have arrived, then
        until no worker has a connection open and ``handled`` stopped moving
        between two snapshots (connections still in the kernel's queues when
        the load stopped get served too). The counters arrive with the pongs
        and there is nothing to wait on but the next snapshot, hence polling,
        bounded by ``SETTLE_TIMEOUT_S``.

        Returns:
            (snapshot, settled): settled is False when the bound was reached.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        first = load_stopped_at + SETTLE_AFTER_S
        time.sleep(max(0.0, first - time.monotonic()))
        previous: list[tuple[int, int]] | None = None
        while True:
            snapshot = self.status()
            workers = snapshot["workers"]
            counts = [(int(w["id"]), int(w["handled"])) for w in workers]
            idle = all(int(w["active"]) == 0 for w in workers) and not snapshot.get("draining")
            if idle and counts == previous:
                return snapshot, True
            if time.monotonic() >= deadline:
                return snapshot, False
            previous = counts
            time.sleep(SETTLE_POLL_S)


__all__ = ["CtlError", "LabServer", "Snapshot"]
