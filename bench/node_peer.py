"""The Node.js cluster peer of the lab's W0: ``bench/node_cluster.js``, started, measured and stopped.

``NodeCluster`` starts ``node bench/node_cluster.js MODE WORKERS`` (under
``taskset -c CPU`` when pinned: the primary and every worker it forks
inherit the CPU), reads the one line the primary prints once every worker
listens (``listening 127.0.0.1:PORT pids PRIMARY,W1,W2``; bounded by
``START_TIMEOUT_S``), and stops every process by PID: SIGTERM to the
primary (which ends its workers), then SIGKILL to any of them left.

The lab's two "policies" for it (``NODE_POLICIES``): ``node round-robin``
(``cluster.SCHED_RR``: the primary accepts and hands each connection to a
worker over IPC) and ``node shared`` (``cluster.SCHED_NONE``: the workers
accept on the shared socket). ``run_cell`` measures one as the lab measures
the dispatcher (``bench.matrix.run_cell``): the same warm-up and wrk line,
the same user/system time and context switches of the primary, the workers
and wrk.
Node has no ``handled`` counters: connections are wrk's requests (one per
connection with ``Connection: close``), and there is no per-worker share.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

import psutil

from bench import wrk
from bench.layouts import server_cpu, taskset
from bench.matrix import Cell, Settings, Workload, warm_up, wrk_command
from bench.proc import Reading, Usage, measured, readings, rss_of
from bench.server import HOST, ROOT, StartedOnEnter, StartError, end_process

SCRIPT = ROOT / "bench" / "node_cluster.js"
#: The lab's policy name -> node_cluster.js's scheduling mode.
NODE_POLICIES = {"node round-robin": "rr", "node shared": "none"}
#: Bound on the start: node up, every worker forked and listening.
START_TIMEOUT_S = 20.0
#: How long the primary has after SIGTERM (it gives its workers 5 s) before everything is killed.
STOP_TIMEOUT_S = 8.0
_READY = re.compile(r"^listening (\S+):(\d+) pids ([\d,]+)$")


def find_node() -> str | None:
    """node's path, or None."""
    return shutil.which("node")


def parse_ready(line: str) -> tuple[int, list[int]]:
    """(port, [primary pid, worker pids...]) from the primary's ``listening`` line.

    Raises:
        ValueError: not that line.
    """
    match = _READY.match(line.strip())
    if not match or match.group(1) != HOST:
        raise ValueError(f"not node_cluster.js's listening line: {line!r}")
    return int(match.group(2)), [int(p) for p in match.group(3).split(",")]


def command(node: str, mode: str, workers: int, cpu: int | None = None) -> list[str]:
    return [*taskset(cpu), node, str(SCRIPT), mode, str(workers)]


class NodeCluster(StartedOnEnter):
    """``node bench/node_cluster.js`` with ``workers`` workers in scheduling ``mode`` (``rr`` or ``none``).

    Started at once; ``start()`` (or ``with``) waits for its listening line.
    """

    def __init__(self, mode: str, workers: int, cpu: int | None = None, node: str = "node") -> None:
        self.command = command(node, mode, workers, cpu)
        self.workers = workers
        self.port = 0
        self.worker_pids: list[int] = []
        self.exit_code: int | None = None
        self._seen: list[psutil.Process] = []
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._log_text = ""  # the log, once the file is closed
        try:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=self._log)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        with contextlib.suppress(psutil.Error):
            self._seen.append(psutil.Process(self.pid))

    @property
    def log(self) -> str:
        """What node wrote to stderr so far."""
        if self._log.closed:
            return self._log_text
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def start(self, timeout: float = START_TIMEOUT_S) -> NodeCluster:
        """Wait for the listening line; learn the port and the worker pids; return self.

        Raises:
            StartError: node exited first, printed something else, or took longer than ``timeout``.
        """
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StartError(f"node cluster {self.pid}: no listening line after {timeout:g} s; "
                                     f"log:\n{self.log}")
                if selector.select(remaining):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        code = self.proc.wait(5.0)
                        raise StartError(f"node cluster {self.pid} exited with {code} before it listened; "
                                         f"log:\n{self.log}")
                    data += chunk
        line = data.split(b"\n", 1)[0].decode(errors="replace")
        try:
            self.port, pids = parse_ready(line)
        except ValueError as exc:
            raise StartError(f"{exc}; log:\n{self.log}") from None
        if pids[0] != self.pid or len(pids) != self.workers + 1:
            raise StartError(f"node cluster {self.pid} named other processes: {line!r}")
        self.worker_pids = pids[1:]
        for pid in self.worker_pids:
            with contextlib.suppress(psutil.Error):
                self._seen.append(psutil.Process(pid))
        return self

    def pids(self) -> list[int]:
        """The primary's pid, then the workers'."""
        return [self.pid, *self.worker_pids]

    def rss_bytes(self) -> dict[int, int]:
        """Each process's resident set size, by pid."""
        return rss_of(self.pids())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the primary, wait up to ``timeout``, then SIGKILL it and any worker left, by PID.

        Idempotent. Returns the primary's exit code (None if even SIGKILL did not end it within 5 s).
        """
        self.exit_code = end_process(self.proc, signal.SIGTERM, timeout, "node cluster")
        for process in self._seen[1:]:
            # psutil checks the creation time first: a reused pid is left alone.
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    process.kill()
                    process.wait(5.0)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log_text = self.log
            self._log.close()
        return self.exit_code


def run_cell(settings: Settings, workload: Workload, policy: str, repeat: int, layout: str = "unpinned",
             node: str = "node") -> Cell:
    """Run ``workload`` (wrk's) on a fresh Node cluster under ``policy`` (one of ``NODE_POLICIES``).

    Raises:
        StartError: it did not listen.
        RuntimeError, subprocess.SubprocessError, ValueError: wrk failed.
    """
    cluster = NodeCluster(NODE_POLICIES[policy], workload.workers, server_cpu(layout), node)
    with cluster:
        warmup = warm_up(settings, workload, cluster.port, layout)
        workers = dict(enumerate(cluster.worker_pids, 1))
        primary_before, workers_before = Reading.of(cluster.pid), readings(workers)
        line = wrk_command(settings, workload, cluster.port, layout)
        result, output, wrk_usage = wrk.run_measured(line, settings.duration_s)
        primary_after, workers_after = Reading.of(cluster.pid), readings(workers)
        rss = cluster.rss_bytes()
    return Cell(
        workload=workload.key, policy=policy, repeat=repeat, port=cluster.port, requests=result.requests,
        requests_per_s=result.requests_per_s, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
        errors=result.errors, error_detail=result.error_detail, handled={},
        master_cpu_s=primary_after.cpu_s - primary_before.cpu_s,
        workers_cpu_s={n: workers_after[n].cpu_s - workers_before[n].cpu_s for n in workers},
        master_rss_bytes=rss.get(cluster.pid),
        workers_rss_bytes=[rss[p] for p in workers.values() if p in rss],
        load_output=f"{warmup}$ {shlex.join(line)}\n{output}", server_log=cluster.log,
        exit_code=cluster.exit_code,
        layout=layout, master_usage=measured(primary_before, primary_after),
        workers_usage=Usage.total(measured(workers_before[n], workers_after[n]) for n in workers),
        wrk_usage=wrk_usage, client_connections=result.requests,
    )


def describe(mode: str, workers: int, layout: str) -> str:
    """The cluster's command line as the report gives it."""
    return shlex.join(command("node", mode, workers, server_cpu(layout))).replace(str(ROOT) + "/", "")
