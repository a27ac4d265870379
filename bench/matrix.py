"""The lab's workloads, and one cell of the matrix: a policy under a workload, on a fresh dispatcher.

A cell starts ``python -m dispatcher`` for the workload's app and worker
count, takes the master's snapshot through its control socket, reads the
CPU time of the master and of each worker from ``/proc/PID/stat``, runs the
load (wrk, or the burst client for W4), reads the CPU times again, waits for
the workers' counters to settle and takes the snapshot again. The per-worker
share is the difference of ``handled`` (connections each worker finished,
as the dispatcher counts them), so it is the same figure for every policy,
whoever accepted the connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.apps import LOCALITY_DIR_ENV
from bench.burst import BurstResult, run_burst
from bench.harness import LabServer
from bench.wrk_bench import HOST, WrkResult, cpu_seconds, parse_wrk

#: Slack given to wrk beyond its duration before it is killed.
WRK_SLACK_S = 30.0
#: W2's handler with ``Settings.locality``: the trivial answer, counting same-CPU requests.
LOCALITY_APP = "bench.apps:locality"
#: Bound on waiting for the workers' locality counts to cover every request wrk counted.
LOCALITY_TIMEOUT_S = 3.0


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
    """

    key: str
    title: str
    app: str
    workers: int
    close: bool = True
    burst: bool = False
    path: str = "/"


@dataclass(frozen=True)
class Settings:
    """How hard and how long to load each cell."""

    wrk: str
    duration_s: int = 5
    connections: int = 16
    threads: int = 2
    burst_connections: int = 400
    burst_wait_ms: int = 1000
    burst_workers: int = 8
    burst_timeout_s: float = 15.0
    #: More dispatcher arguments for round-robin cells (``--window 1``, ``--master-sched normal``).
    round_robin_args: tuple[str, ...] = ()
    #: W2 serves with ``LOCALITY_APP``, and each W2 cell counts its same-CPU requests.
    locality: bool = False


def workloads(settings: Settings) -> dict[str, Workload]:
    """The four workloads, by key, in run order."""
    return {
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


def wrk_command(settings: Settings, workload: Workload, port: int | str) -> list[str]:
    close = ["-H", "Connection: close"] if workload.close else []
    return [
        settings.wrk, f"-t{settings.threads}", f"-c{settings.connections}", f"-d{settings.duration_s}s",
        *close, "--latency", f"http://{HOST}:{port}{workload.path}",
    ]


def load_description(settings: Settings, workload: Workload, port: int | str = "PORT") -> str:
    """The load of ``workload`` as a command line (the burst client as its Python call)."""
    if workload.burst:
        return (
            f"python -c 'from bench.burst import run_burst; run_burst({port}, "
            f"{settings.burst_connections}, \"{workload.path}\", {settings.burst_timeout_s:g})'"
        )
    return shlex.join(wrk_command(settings, workload, port))


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
    load_output: str = ""
    server_log: str = ""
    exit_code: int | None = None

    @property
    def connections(self) -> int:
        return sum(self.handled.values())

    @property
    def shares(self) -> list[float]:
        """Each worker's share of the connections, busiest first."""
        total = self.connections
        return sorted((n / total for n in self.handled.values()), reverse=True) if total else []

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


def jain_index(counts: Sequence[float]) -> float:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2): 1 when even, 1/n when one takes all.

    NaN for no workers or nothing counted.
    """
    squares = sum(x * x for x in counts)
    if not counts or squares == 0:
        return float("nan")
    return sum(counts) ** 2 / (len(counts) * squares)


#: Per-thread run time in ns (CONFIG_SCHED_INFO); else only /proc/PID/stat's clock ticks.
_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def process_cpu_s(pid: int) -> float:
    """CPU time of process ``pid`` so far (user + system, all its threads), in seconds.

    The sum of each thread's ``/proc/PID/task/TID/schedstat`` run time, in
    nanoseconds: the same time ``/proc/PID/stat`` gives as utime + stime, but
    not rounded to clock ticks (10 ms), which matters for short runs such as
    W4's burst. Falls back to ``/proc/PID/stat`` where schedstat is missing.
    Threads that exited are not counted: the master and the workers run
    their event loop in the main thread.

    Raises:
        OSError: the process is gone.
    """
    if not _SCHEDSTAT:
        return cpu_seconds(pid)
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread just exited
            total_ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total_ns / 1e9


def _cpu_or_zero(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return process_cpu_s(pid)
    return 0.0


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


def _run_wrk(settings: Settings, workload: Workload, port: int) -> tuple[WrkResult, str]:
    proc = subprocess.Popen(
        wrk_command(settings, workload, port), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=settings.duration_s + WRK_SLACK_S)
    finally:
        if proc.poll() is None:  # late, or interrupted
            proc.kill()
            proc.wait(5.0)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{out}{err}")
    return parse_wrk(out), out + err


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, leave alone) environment variable ``name`` for a process started inside."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def _burst_summary(result: BurstResult) -> str:
    counts = " ".join(f"{k}:{v}" for k, v in result.per_worker().items())
    errors = ", ".join(f"{k} x{v}" for k, v in result.errors.most_common()) or "none"
    return (
        f"burst: {result.connections} connections, {len(result.ok)} ok, {result.failed} failed "
        f"({errors}), wall {result.wall_s:.3f} s; per worker id {counts}\n"
    )


def run_cell(settings: Settings, workload: Workload, policy: str, repeat: int, control_dir: Path) -> Cell:
    """Run ``workload`` under ``policy`` once, on a fresh dispatcher that is stopped afterwards.

    Raises:
        RuntimeError, TimeoutError: the server did not start, or wrk failed.
        CtlError: the control socket did not answer.
    """
    extra = settings.round_robin_args if policy == "round-robin" else ()
    lab = LabServer(workload.app, policy, workload.workers, control_dir, extra)
    client: dict[int, int] = {}
    locality: dict[int, tuple[int, int]] = {}
    counts_dir = Path(tempfile.mkdtemp(dir=control_dir)) if workload.app == LOCALITY_APP else None
    with _environ(LOCALITY_DIR_ENV, str(counts_dir) if counts_dir else None), lab:
        before = lab.status()
        pids = {int(w["id"]): int(w["pid"]) for w in before["workers"] if w["pid"]}
        master_before = process_cpu_s(lab.pid)
        workers_before = {wid: _cpu_or_zero(pid) for wid, pid in pids.items()}
        burst: BurstResult | None = None
        if workload.burst:
            burst = run_burst(lab.port, settings.burst_connections, workload.path, settings.burst_timeout_s)
            output = _burst_summary(burst)
        else:
            wrk, output = _run_wrk(settings, workload, lab.port)
            if counts_dir is not None:
                locality = read_locality(counts_dir, wrk.requests)
        stopped = time.monotonic()
        master_after = process_cpu_s(lab.pid)
        workers_after = {wid: _cpu_or_zero(pid) for wid, pid in pids.items()}
        after, settled = lab.settled_status(stopped)
    handled_before = {int(w["id"]): int(w["handled"]) for w in before["workers"]}
    handled = {
        int(w["id"]): int(w["handled"]) - handled_before.get(int(w["id"]), 0) for w in after["workers"]
    }
    if burst is not None:
        latencies_ms = [o.latency_s * 1e3 for o in burst.ok]
        requests, errors = len(burst.ok), burst.failed
        rate = requests / burst.wall_s if burst.wall_s > 0 else float("nan")
        p50, p99 = _percentile(latencies_ms, 0.50), _percentile(latencies_ms, 0.99)
        detail = ", ".join(f"{k} x{v}" for k, v in burst.errors.most_common())
        client = burst.per_worker()
    else:
        requests, errors, rate = wrk.requests, wrk.errors, wrk.requests_per_s
        p50, p99 = wrk.p50_ms, wrk.p99_ms
        details = [f"{kind} {n}" for kind, n in wrk.socket_errors.items() if n]
        if wrk.non_2xx:
            details.append(f"non-2xx {wrk.non_2xx}")
        detail = ", ".join(details)
    return Cell(
        workload=workload.key, policy=policy, repeat=repeat, port=lab.port,
        requests=requests, requests_per_s=rate, p50_ms=p50, p99_ms=p99, errors=errors, error_detail=detail,
        handled=handled, master_cpu_s=master_after - master_before,
        workers_cpu_s={wid: workers_after[wid] - workers_before[wid] for wid in pids},
        master_rss_bytes=after["master"].get("rss_bytes"),
        workers_rss_bytes=[int(w["rss_bytes"]) for w in after["workers"] if w.get("rss_bytes")],
        client_per_worker=client, locality=locality, settled=settled, load_output=output, server_log=lab.log,
        exit_code=lab.exit_code,
    )
