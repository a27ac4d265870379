"""The lab's workloads, and one cell of the matrix: a policy under a workload, on a fresh dispatcher.

A cell starts ``python -m dispatcher`` for the workload's app and worker
count (``bench.server``), in a CPU layout (``bench.layouts``: ``pinned``
starts it under ``taskset -c 1`` and wrk under ``taskset -c 0``), takes the
master's snapshot through its control socket, reads the CPU time, the
user/system split and the context switches of the master and of each worker
from ``/proc`` (``bench.proc.Reading``), runs the load (wrk, or the burst
client for W4), reads them again (and wrk's own rusage as it is reaped),
waits for the workers' counters to settle and takes the snapshot again.
The per-worker share is the difference of ``handled`` (connections each
worker finished, as the dispatcher counts them), so it is the same figure
for every policy, whoever accepted the connection.

The per-worker counters (``handled``, ``active``) reach the master in each
worker's pong, once per ping interval, so a snapshot taken just after a load
stops lags behind it; ``settled_status`` waits, bounded, for a snapshot that
is known to be fresh.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import wrk
from bench.apps import LOCALITY_DIR_ENV
from bench.burst import BurstResult, run_burst
from bench.layouts import client_cpu, server_cpu, taskset
from bench.proc import Reading, Usage, measured, readings
from bench.server import Server
from bench.stats import jain_index, percentile, ranked_shares
from dispatcher.ctl import CtlError
from dispatcher.snapshot import Snapshot

POLICIES = ("round-robin", "shared", "reuseport")
#: What a cell's figures are of, per process role: the master, the workers (summed), the load generator.
ROLES = ("master", "workers", "wrk")
#: What a run may raise and still let the lab go on to the next one (StartError is a RuntimeError).
RUN_ERRORS = (OSError, RuntimeError, ValueError, CtlError, subprocess.SubprocessError)
#: W2's handler with ``Settings.locality``: the trivial answer, counting same-CPU requests.
LOCALITY_APP = "bench.apps:locality"
#: Bound on waiting for the workers' locality counts to cover every request wrk counted.
LOCALITY_TIMEOUT_S = 3.0
#: The dispatcher's default ping interval: workers report their counters this often.
PING_INTERVAL_S = 1.0
#: A snapshot taken this long after the load stopped holds a pong sent after it.
SETTLE_AFTER_S = PING_INTERVAL_S + 0.25
#: Pause between two status requests while waiting for the counters to settle.
SETTLE_POLL_S = 0.25
#: Bound on waiting for settled counters.
SETTLE_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class Workload:
    """One column of the matrix.

    Parameters:
        key: ``W1`` ...
        title: a few words for tables and plots.
        app: the handler (``MODULE:ATTRIBUTE``).
        workers: worker processes.
        close: wrk sends ``Connection: close`` (a new connection per request).
        burst: the W4 burst client instead of wrk.
        path: the request target.
        connections: wrk's ``-c`` for this workload (None: ``Settings.connections``).
        warmup: ``Settings.warmup_s`` of the same load first, not measured (W0: Node's JIT warms up
            over seconds; every policy of the workload gets the same).
    """

    key: str
    title: str
    app: str
    workers: int
    close: bool = True
    burst: bool = False
    path: str = "/"
    connections: int | None = None
    warmup: bool = False


@dataclass(frozen=True)
class Settings:
    """How hard and how long to load each cell."""

    wrk: str
    duration_s: int = 5
    #: wrk -c for W1-W3.
    connections: int = 16
    #: wrk -c for W0.
    w0_connections: int = 50
    #: Seconds of unmeasured load before the measured run, for the workloads with ``warmup``.
    warmup_s: float = 5.0
    threads: int = 2
    burst_connections: int = 400
    burst_wait_ms: int = 1000
    burst_workers: int = 8
    burst_timeout_s: float = 15.0
    #: More dispatcher arguments for round-robin cells (``--window 1``, ``--master-sched normal``).
    round_robin_args: tuple[str, ...] = ()
    #: W2 serves with ``LOCALITY_APP``, and each W2 cell counts its same-CPU requests.
    locality: bool = False


WORKLOADS = ("W0", "W1", "W2", "W3", "W4")
#: The handler of W0: the lightest a custom server would have.
LIGHT_APP = "bench.apps:light"


def workloads(settings: Settings) -> dict[str, Workload]:
    """The five workloads, by key, in run order."""
    return {
        "W0": Workload("W0", "new connection per request, lightest handler",
                       LIGHT_APP, 2, connections=settings.w0_connections, warmup=True),
        "W1": Workload("W1", "new connection per request, trivial handler", "examples.hello:handler", 2),
        "W2": Workload("W2", "keep-alive, trivial handler counting same-CPU requests", LOCALITY_APP, 2,
                       close=False)
        if settings.locality else
        Workload("W2", "keep-alive, trivial handler", "examples.hello:handler", 2, close=False),
        "W3": Workload("W3", "new connection per request, 2 ms CPU per request", "bench.apps:cpu", 2,
                       path="/?ms=2"),
        "W4": Workload(
            "W4",
            f"burst of {settings.burst_connections} connections, "
            f"{settings.burst_wait_ms / 1000:g} s asyncio.sleep handler",
            "bench.apps:slow", settings.burst_workers, burst=True, path=f"/?ms={settings.burst_wait_ms}",
        ),
    }


def connections(settings: Settings, workload: Workload) -> int:
    """wrk's ``-c`` for ``workload``."""
    return workload.connections or settings.connections


def wrk_command(settings: Settings, workload: Workload, port: int | str, layout: str = "unpinned",
                duration_s: float | None = None) -> list[str]:
    """wrk's line for ``workload`` (under ``taskset -c 0`` in the pinned layout), ``duration_s`` long
    (None: ``settings.duration_s``)."""
    return [*taskset(client_cpu(layout)),
            *wrk.command(settings.wrk, port, workload.path,
                         settings.duration_s if duration_s is None else duration_s,
                         connections(settings, workload), settings.threads, close=workload.close)]


def warm_up(settings: Settings, workload: Workload, port: int, layout: str) -> str:
    """The unmeasured load before a cell's run, if ``workload`` has one; its wrk output (or empty).

    Raises:
        as ``wrk.run``.
    """
    if not workload.warmup or settings.warmup_s <= 0 or workload.burst:
        return ""
    line = wrk_command(settings, workload, port, layout, settings.warmup_s)
    _, output = wrk.run(line, settings.warmup_s)
    return f"$ {shlex.join(line)}  # warm-up, not measured\n{output}"


def launcher(layout: str) -> tuple[str, ...]:
    """What runs the master in ``layout``: this interpreter's ``-m dispatcher``, under ``taskset -c 1`` if
    pinned (taskset execs it: the pid is the master's, and every worker inherits the CPU)."""
    return (*taskset(server_cpu(layout)), sys.executable, "-m", "dispatcher")


@contextlib.contextmanager
def client_affinity(layout: str) -> Iterator[None]:
    """Within: this thread on the load generator's CPU of ``layout`` (the W4 burst client runs here)."""
    cpu = client_cpu(layout)
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server_args(settings: Settings, workload: Workload, policy: str) -> list[str]:
    """The dispatcher's arguments for ``workload`` under ``policy`` (bar ``--workers`` and ``--bind``)."""
    extra = settings.round_robin_args if policy == "round-robin" else ()
    return ["--app", workload.app, "--policy", policy, *extra]


def load_description(settings: Settings, workload: Workload, port: int | str = "PORT",
                     layout: str = "unpinned") -> str:
    """The load of ``workload`` as a command line (the burst client as its Python call)."""
    if workload.burst:
        pin = f"{shlex.join(taskset(client_cpu(layout)))} " if client_cpu(layout) is not None else ""
        return (
            f"{pin}python -c 'from bench.burst import run_burst; run_burst({port}, "
            f"{settings.burst_connections}, \"{workload.path}\", {settings.burst_timeout_s:g})'"
        )
    return shlex.join(wrk_command(settings, workload, port, layout))


@dataclass(frozen=True)
class PerConnection:
    """A role's usage per connection: CPU microseconds in user and system mode, context switches."""

    user_us: float
    system_us: float
    voluntary: float
    involuntary: float

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.system_us


NO_FIGURE = PerConnection(math.nan, math.nan, math.nan, math.nan)


@dataclass
class Cell:
    """One run of one policy under one workload."""

    workload: str
    policy: str
    repeat: int
    port: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: str
    #: Connections each worker finished during the run (``handled`` after - before), by worker id.
    handled: dict[int, int]
    master_cpu_s: float
    #: CPU seconds of each worker process during the load, by worker id.
    workers_cpu_s: dict[int, float]
    master_rss_bytes: int | None
    workers_rss_bytes: list[int]
    #: W4: connections answered per worker id, as the client saw them.
    client_per_worker: dict[int, int] = field(default_factory=dict)
    #: ``LOCALITY_APP`` only: (requests served, of which on the CPU that received them) by worker id.
    locality: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: The counters settled in time (else ``handled`` may miss the last second).
    settled: bool = True
    #: ``pinned`` or ``unpinned`` (``bench.layouts``).
    layout: str = "unpinned"
    #: During the load: the master's and the workers' (summed) user/system time (the total from
    #: schedstat, the split from stat) and context switches; wrk's rusage (None: no wrk, W4).
    master_usage: Usage = field(default_factory=Usage)
    workers_usage: Usage = field(default_factory=Usage)
    wrk_usage: Usage | None = None
    #: Connections counted by the client where the server has no ``handled`` counters (Node:
    #: wrk's requests, one per connection with ``Connection: close``).
    client_connections: int | None = None
    load_output: str = ""
    server_log: str = ""
    exit_code: int | None = None

    @property
    def connections(self) -> int:
        if self.client_connections is not None:
            return self.client_connections
        return sum(self.handled.values())

    @property
    def shares(self) -> list[float]:
        """Each worker's share of the connections, busiest first."""
        return ranked_shares(self.handled.values())

    @property
    def jain(self) -> float:
        return jain_index(list(self.handled.values()))

    @property
    def busiest_share(self) -> float:
        return self.shares[0] if self.shares else float("nan")

    @property
    def same_cpu_share(self) -> float:
        """Of the requests the workers counted, the share served on the CPU that received them (NaN: none)."""
        served = sum(n for n, _ in self.locality.values())
        return sum(same for _, same in self.locality.values()) / served if served else float("nan")

    @property
    def master_us_per_conn(self) -> float:
        return self.master_cpu_s * 1e6 / self.connections if self.connections else float("nan")

    @property
    def workers_us_per_conn(self) -> float:
        """The workers' CPU time (schedstat, summed) per connection, in microseconds."""
        total = sum(self.workers_cpu_s.values())
        return total * 1e6 / self.connections if self.connections and self.workers_cpu_s else math.nan

    def usage(self, role: str) -> Usage | None:
        """The usage of ``role`` (one of ``ROLES``) during the load; None if not measured."""
        return {"master": self.master_usage, "workers": self.workers_usage, "wrk": self.wrk_usage}[role]

    def per_connection(self, role: str) -> PerConnection:
        """``usage(role)`` per connection handled; NaNs if not measured or nothing was handled."""
        usage = self.usage(role)
        n = self.connections
        if usage is None or not n:
            return NO_FIGURE
        return PerConnection(usage.user_s * 1e6 / n, usage.system_s * 1e6 / n, usage.voluntary / n,
                             usage.involuntary / n)


def read_locality(directory: Path, requests: int, timeout_s: float = LOCALITY_TIMEOUT_S
                  ) -> dict[int, tuple[int, int]]:
    """The ``LOCALITY_APP`` counts the workers wrote to ``directory``, by worker id.

    Each worker rewrites its file every ``bench.apps.LOCALITY_FLUSH_S``, so
    the counts lag; this waits (bounded) until they cover ``requests`` (what
    wrk counted; the workers may have served a few more) and returns what
    there is then.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        counts: dict[int, tuple[int, int]] = {}
        for path in directory.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(path.read_text())
                counts[int(data["id"])] = (int(data["requests"]), int(data["same_cpu"]))
        if sum(n for n, _ in counts.values()) >= requests or time.monotonic() >= deadline:
            return counts
        time.sleep(0.05)


def _burst_summary(result: BurstResult) -> str:
    counts = " ".join(f"{k}:{v}" for k, v in result.per_worker().items())
    errors = ", ".join(f"{k} x{v}" for k, v in result.errors.most_common()) or "none"
    return (
        f"burst: {result.connections} connections, {len(result.ok)} ok, {result.failed} failed "
        f"({errors}), wall {result.wall_s:.3f} s; per worker id {counts}\n"
    )


def settled_status(server: Server, load_stopped_at: float) -> tuple[Snapshot, bool]:
    """A snapshot whose worker counters include everything up to ``load_stopped_at``.

    Waits until a pong sent after that moment must have arrived, then until
    no worker has a connection open and ``handled`` stopped moving between
    two snapshots (connections still in the kernel's queues when the load
    stopped get served too). The counters arrive with the pongs and there is
    nothing to wait on but the next snapshot, hence polling, bounded by
    ``SETTLE_TIMEOUT_S``.

    Returns:
        (snapshot, settled): settled is False when the bound was reached.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    time.sleep(max(0.0, load_stopped_at + SETTLE_AFTER_S - time.monotonic()))
    previous: list[tuple[int, int]] | None = None
    while True:
        snapshot = server.status()
        workers = snapshot["workers"]
        counts = [(int(w["id"]), int(w["handled"])) for w in workers]
        idle = all(int(w["active"]) == 0 for w in workers) and not snapshot.get("draining")
        if idle and counts == previous:
            return snapshot, True
        if time.monotonic() >= deadline:
            return snapshot, False
        previous = counts
        time.sleep(SETTLE_POLL_S)


def run_cell(settings: Settings, workload: Workload, policy: str, repeat: int, work_dir: Path,
             layout: str = "unpinned") -> Cell:
    """Run ``workload`` under ``policy`` once, in ``layout``, on a fresh dispatcher stopped afterwards.

    Parameters:
        work_dir: a private directory for the locality counts.
        layout: ``pinned`` (master and workers on CPU 1, the load on CPU 0) or ``unpinned``.

    Raises:
        StartError: the server did not get ready.
        RuntimeError, subprocess.SubprocessError: wrk failed.
        CtlError: the control socket did not answer.
    """
    client: dict[int, int] = {}
    locality: dict[int, tuple[int, int]] = {}
    counts_dir = Path(tempfile.mkdtemp(dir=work_dir)) if workload.app == LOCALITY_APP else None
    env = {LOCALITY_DIR_ENV: str(counts_dir)} if counts_dir else {}
    server = Server(*server_args(settings, workload, policy), workers=workload.workers, env=env,
                    launcher=launcher(layout))
    wrk_usage: Usage | None = None
    with server:
        before = server.ready_snapshot
        warmup = warm_up(settings, workload, server.port, layout)
        if warmup:  # the counters from after it
            before, _ = settled_status(server, time.monotonic())
        pids = {int(w["id"]): int(w["pid"]) for w in before["workers"] if w["pid"]}
        master_before, workers_before = Reading.of(server.pid), readings(pids)
        burst: BurstResult | None = None
        if workload.burst:
            with client_affinity(layout):
                burst = run_burst(server.port, settings.burst_connections, workload.path,
                                  settings.burst_timeout_s)
            output = _burst_summary(burst)
        else:
            line = wrk_command(settings, workload, server.port, layout)
            result, output, wrk_usage = wrk.run_measured(line, settings.duration_s)
            output = f"{warmup}$ {shlex.join(line)}\n{output}"
            if counts_dir is not None:
                locality = read_locality(counts_dir, result.requests)
        stopped = time.monotonic()
        master_after, workers_after = Reading.of(server.pid), readings(pids)
        after, settled = settled_status(server, stopped)
    handled_before = {int(w["id"]): int(w["handled"]) for w in before["workers"]}
    handled = {
        int(w["id"]): int(w["handled"]) - handled_before.get(int(w["id"]), 0) for w in after["workers"]
    }
    if burst is not None:
        latencies_ms = burst.latencies_ms()
        requests, errors = len(latencies_ms), burst.failed
        rate = requests / burst.wall_s if burst.wall_s > 0 else float("nan")
        p50, p99 = percentile(latencies_ms, 0.50), percentile(latencies_ms, 0.99)
        detail = ", ".join(f"{k} x{v}" for k, v in burst.errors.most_common())
        client = burst.per_worker()
    else:
        requests, errors, rate = result.requests, result.errors, result.requests_per_s
        p50, p99, detail = result.p50_ms, result.p99_ms, result.error_detail
    return Cell(
        workload=workload.key, policy=policy, repeat=repeat, port=server.port,
        requests=requests, requests_per_s=rate, p50_ms=p50, p99_ms=p99, errors=errors, error_detail=detail,
        handled=handled, master_cpu_s=master_after.cpu_s - master_before.cpu_s,
        workers_cpu_s={wid: workers_after[wid].cpu_s - workers_before[wid].cpu_s for wid in pids},
        master_rss_bytes=after["master"].get("rss_bytes"),
        workers_rss_bytes=[rss for w in after["workers"] if (rss := w["rss_bytes"])],
        client_per_worker=client, locality=locality, settled=settled, load_output=output,
        server_log=server.log, exit_code=server.exit_code, layout=layout,
        master_usage=measured(master_before, master_after),
        workers_usage=Usage.total(measured(workers_before[wid], workers_after[wid]) for wid in pids),
        wrk_usage=wrk_usage,
    )
