"""The comparison's workloads, and the runs on one server: a group of wrk workloads, or the W4 burst.

The workloads mean what the lab's W1-W4 mean (``bench.matrix``), on the
comparison's apps (``bench.asgi_app``, ``bench.wsgi_app``):

- W1: a new connection per request (``wrk -H 'Connection: close'``) on ``/``;
- W2: keep-alive (wrk's default) on ``/``;
- W3: ``/cpu`` (2 ms of CPU), a new connection per request;
- W4: a burst of connections opened at once (``bench.burst``) to ``/sleep``
  (1 s), one request each, over ``Settings.burst_workers`` workers.

W1-W3 run one after the other on one server (``run_group``: started, loaded
with each, measured idle, stopped), with ``Settings.workers`` workers, 16
connections from 2 wrk threads. The layout (``bench.layouts``) is ``pinned``
(the server under ``taskset -c 1``, wrk under ``taskset -c 0``: the server's
processes share one CPU and the client has the other to itself) or
``unpinned`` (the kernel places everything on both CPUs). Answers per worker come from the
``x-worker`` header, counted by wrk's Lua (``bench.worker_counts``) or by
the burst client; the worker pids from the server (``Running.worker_pids``).
"""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field

from bench import wrk
from bench.burst import run_burst
from bench.layouts import CLIENT_CPU, SERVER_CPU, taskset
from bench.load import ask, http_get
from bench.peer_servers import Kind, Running
from bench.proc import cpu_of
from bench.stats import percentile
from bench.worker_counts import Spread, header_worker, parse, spread

#: After a load, before the next: the closed connections' last packets settle.
GAP_S = 0.3
#: After the group's loads, before the idle RSS is read: late frees and the GC are done.
IDLE_SETTLE_S = 1.0
#: ``/nodelay`` requests per server (a new connection each, so that both workers are likely asked).
NODELAY_PROBES = 4


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    path: str
    close: bool = True
    burst: bool = False


WORKLOADS: dict[str, Workload] = {w.key: w for w in (
    Workload("W1", "new connection per request, /", "/"),
    Workload("W2", "keep-alive, /", "/", close=False),
    Workload("W3", "new connection per request, /cpu (2 ms CPU)", "/cpu"),
    Workload("W4", "burst, one request per connection, /sleep (1 s)", "/sleep", burst=True),
)}


@dataclass(frozen=True)
class Settings:
    wrk: str
    duration_s: float = 3.0
    connections: int = 16
    threads: int = 2
    workers: int = 2
    #: WSGI threads per worker (gunicorn ``--threads``, granian ``--blocking-threads``, ours ``--threads``).
    wsgi_threads: int = 4
    burst_connections: int = 400
    burst_workers: int = 8
    burst_timeout_s: float = 15.0
    #: wrk's Lua script counting the x-worker header (``bench.worker_counts.write_script``).
    script: str = ""


@dataclass
class PeerCell:
    """One workload on one server, once."""

    server: str
    workload: str
    layout: str
    repeat: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: str
    #: Answers per worker pid (every worker of the server, 0 for one that served none).
    per_worker: dict[int, int]
    #: Answers naming a pid that is not one of the workers.
    strangers: int = 0
    #: CPU seconds during the load: of the workers, and of the server's other processes (master, supervisor).
    workers_cpu_s: float = math.nan
    other_cpu_s: float = math.nan
    load_output: str = ""

    @property
    def spread(self) -> Spread:
        return Spread(self.per_worker, self.strangers)

    @property
    def jain(self) -> float:
        return self.spread.jain

    @property
    def busiest_share(self) -> float:
        return self.spread.busiest_share

    @property
    def counted(self) -> int:
        return self.spread.total + self.strangers

    def cpu_us_per_request(self, workers: bool) -> float:
        """The workers' (else the other processes') CPU time per request, in microseconds."""
        cpu = self.workers_cpu_s if workers else self.other_cpu_s
        return cpu * 1e6 / self.requests if self.requests else math.nan


@dataclass
class Idle:
    """A server's workers at rest after its group's loads."""

    server: str
    repeat: int
    rss_bytes: dict[int, int] = field(default_factory=dict)


@dataclass
class Nodelay:
    """What ``/nodelay`` answered on a server (one answer per probe connection)."""

    server: str
    answers: list[str] = field(default_factory=list)

    @property
    def values(self) -> list[str]:
        """Every socket's TCP_NODELAY, ``1`` or ``0``, over the answers."""
        found: list[str] = []
        for answer in self.answers:
            for word in answer.split():
                if word.startswith("nodelay="):
                    found += [v for v in word.partition("=")[2].split(",") if v in ("0", "1")]
        return found

    @property
    def verdict(self) -> str:
        values = self.values
        if not values:
            return "unknown"
        if all(v == "1" for v in values):
            return "on"
        return "off" if all(v == "0" for v in values) else "mixed"


@dataclass
class Group:
    """What one server's group of W1-W3 runs gave."""

    cells: list[PeerCell] = field(default_factory=list)
    idle: Idle | None = None
    nodelay: Nodelay | None = None
    server_log: str = ""


def wrk_line(settings: Settings, workload: Workload, port: int | str, pinned: bool) -> list[str]:
    return [*taskset(CLIENT_CPU if pinned else None),
            *wrk.command(settings.wrk, port, workload.path, settings.duration_s, settings.connections,
                         settings.threads, close=workload.close, script=settings.script or None)]


def burst_call(settings: Settings, workload: Workload, port: int | str = "PORT") -> str:
    return (f"python -c 'from bench.burst import run_burst; from bench.worker_counts import header_worker; "
            f"run_burst({port}, {settings.burst_connections}, \"{workload.path}\", "
            f"{settings.burst_timeout_s:g}, header_worker)'")


def _probe_nodelay(kind: Kind, port: int) -> Nodelay:
    found = Nodelay(kind.key)
    for _ in range(NODELAY_PROBES):
        answer = ask(port, http_get(port, "/nodelay"), timeout=5.0)
        found.answers.append(answer.split("\r\n\r\n", 1)[-1].strip())
    return found


def probe_nodelay(kind: Kind, workers: int, threads: int) -> Nodelay:
    """Start ``kind`` only to ask ``/nodelay`` (the check's extra servers)."""
    with Running(kind, workers, threads) as server:
        return _probe_nodelay(kind, server.port)


def run_group(settings: Settings, kind: Kind, workloads: list[Workload], layout: str, repeat: int,
              measure_idle: bool) -> Group:
    """Start ``kind`` in ``layout``, run each wrk workload on it in turn, stop it.

    ``measure_idle``: ask ``/nodelay`` first, and read the workers' RSS at
    rest after the loads.

    Raises:
        StartError: the server did not get ready.
        RuntimeError, subprocess.SubprocessError, ValueError: wrk failed.
    """
    pinned = layout == "pinned"
    group = Group()
    server = Running(kind, settings.workers, settings.wsgi_threads, cpu=SERVER_CPU if pinned else None)
    with server:
        if measure_idle:
            group.nodelay = _probe_nodelay(kind, server.port)
        for workload in workloads:
            line = wrk_line(settings, workload, server.port, pinned)
            processes = {pid: pid for pid in server.process_pids()}
            before = cpu_of(processes)
            result, output = wrk.run(line, settings.duration_s)
            used = {pid: max(0.0, t - before[pid]) for pid, t in cpu_of(processes).items()}
            workers = server.worker_pids()
            counts = spread(parse(output), workers)
            group.cells.append(PeerCell(
                server=kind.key, workload=workload.key, layout=layout, repeat=repeat,
                requests=result.requests, requests_per_s=result.requests_per_s, p50_ms=result.p50_ms,
                p99_ms=result.p99_ms, errors=result.errors, error_detail=result.error_detail,
                per_worker=counts.counts, strangers=counts.strangers,
                workers_cpu_s=sum(t for pid, t in used.items() if pid in workers),
                other_cpu_s=sum(t for pid, t in used.items() if pid not in workers),
                load_output=f"$ {shlex.join(line)}\n{output}",
            ))
            time.sleep(GAP_S)
        if measure_idle:
            time.sleep(IDLE_SETTLE_S)
            group.idle = Idle(kind.key, repeat, server.rss_bytes())
    group.server_log = server.log
    return group


def run_w4(settings: Settings, kind: Kind, repeat: int) -> tuple[PeerCell, str]:
    """The burst on a fresh ``kind`` with ``burst_workers`` workers (unpinned); the cell, the server's log."""
    workload = WORKLOADS["W4"]
    server = Running(kind, settings.burst_workers, settings.wsgi_threads)
    with server:
        pids = server.worker_pids()
        burst = run_burst(server.port, settings.burst_connections, workload.path, settings.burst_timeout_s,
                          identify=header_worker)
    latencies = burst.latencies_ms()
    counts = spread(burst.per_worker(), pids)
    errors = ", ".join(f"{k} x{v}" for k, v in burst.errors.most_common())
    summary = (f"burst: {burst.connections} connections, {len(burst.ok)} ok, {burst.failed} failed "
               f"({errors or 'none'}), wall {burst.wall_s:.3f} s; per pid {counts.counts}\n")
    cell = PeerCell(
        server=kind.key, workload="W4", layout="unpinned", repeat=repeat, requests=len(latencies),
        requests_per_s=len(latencies) / burst.wall_s if burst.wall_s > 0 else float("nan"),
        p50_ms=percentile(latencies, 0.50), p99_ms=percentile(latencies, 0.99), errors=burst.failed,
        error_detail=errors, per_worker=counts.counts, strangers=counts.strangers, load_output=summary,
    )
    return cell, server.log
