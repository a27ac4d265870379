"""The lab's rolling-reload run: ``reload`` through the control socket while clients keep coming.

A few client threads (``bench.load.Load``) each open a connection to
127.0.0.1, send one ``GET`` with ``Connection: close``, read the answer to
EOF and start again. Every outcome is timestamped, so the requests served
and failed *during* the reload are counted exactly: between sending
``reload`` and its answer (the master answers once every worker has been
replaced).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from bench.load import JOIN_TIMEOUT_S, Load
from bench.server import Server
from dispatcher.ctl import CtlError


@dataclass
class ReloadRun:
    """What one rolling reload under load showed."""

    app: str
    policy: str
    workers: int
    clients: int
    #: Seconds from sending ``reload`` to its answer.
    reload_s: float
    #: The master's answer, or the error if it failed.
    answer: str
    served_during: int
    failed_during: int
    served_total: int
    failed_total: int
    #: Requests per second in the second(s) before the reload, and during it.
    rate_before: float
    rate_during: float
    failures: dict[str, int] = field(default_factory=dict)
    pids_before: list[int] = field(default_factory=list)
    pids_after: list[int] = field(default_factory=list)
    server_log: str = ""
    exit_code: int | None = None

    @property
    def replaced(self) -> int:
        """Workers whose pid changed (every one, in a complete reload)."""
        return len(set(self.pids_before) - set(self.pids_after))


#: Seconds of load before the reload (the "before" rate) and after its answer.
LOAD_BEFORE_S = 1.5
LOAD_AFTER_S = 1.0
#: Bound on the reload itself.
RELOAD_TIMEOUT_S = 120.0


def run_reload(policy: str, workers: int, clients: int, app: str = "examples.hello:handler",
               path: str = "/") -> ReloadRun:
    """Start a dispatcher, load it, reload it through the control socket, stop it.

    The load runs ``LOAD_BEFORE_S`` before the reload and ``LOAD_AFTER_S``
    after its answer. A reload the master reports as failed (or that times
    out) is recorded in ``answer``, not raised.

    Raises:
        StartError: the server did not get ready.
        CtlError: the status request after the reload failed.
    """
    with Server("--app", app, "--policy", policy, workers=workers) as server:
        pids_before = [int(w["pid"]) for w in server.ready_snapshot["workers"] if w["pid"]]
        with Load(server.port, clients, path=path, max_seconds=RELOAD_TIMEOUT_S + 30.0) as load:
            started = time.monotonic()
            time.sleep(LOAD_BEFORE_S)
            reload_at = time.monotonic()
            try:
                answer = json.dumps(server.request("reload", timeout_s=RELOAD_TIMEOUT_S))
            except CtlError as exc:
                answer = f"failed: {exc}"
            reloaded_at = time.monotonic()
            time.sleep(LOAD_AFTER_S)
        ended = time.monotonic()
        pids_after = [int(w["pid"]) for w in server.status()["workers"] if w["pid"]]
    served_before, _, _ = load.between(started, reload_at)
    served, failed, _ = load.between(reload_at, reloaded_at)
    served_total, failed_total, failures_total = load.between(started, ended + JOIN_TIMEOUT_S)
    reload_s = reloaded_at - reload_at
    return ReloadRun(
        app=app, policy=policy, workers=workers, clients=clients, reload_s=reload_s, answer=answer,
        served_during=served, failed_during=failed, served_total=served_total, failed_total=failed_total,
        rate_before=served_before / (reload_at - started),
        rate_during=served / reload_s if reload_s > 0 else float("nan"),
        failures=dict(failures_total), pids_before=pids_before, pids_after=pids_after,
        server_log=server.log, exit_code=server.exit_code,
    )
