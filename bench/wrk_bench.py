"""Load-test the policies end to end with wrk, one fresh server per run.

    .venv/bin/python bench/wrk_bench.py [--duration 5] [--repeats 3] [--profile]

For each repeat, each policy in turn (round-robin, shared, reuseport,
round-robin, ...) gets a fresh ``python -m dispatcher --app
examples.hello:handler`` on 127.0.0.1 (port 0), and wrk opens a new
connection per request (``Connection: close``), so the hand-off path is hit
once per request. The master's CPU time (utime + stime from /proc) is read
before and after wrk; divided by the requests wrk completed it gives the
master's cost per connection. The table of medians (min-max) is printed and
written, with the machine and the exact commands, to
``bench/results/wrk-<UTC timestamp>.md``; raw wrk output and server logs go
beside it as ``.raw`` (not committed).

``--profile`` adds one more round-robin run, not counted in the table, with
py-spy (``pip install py-spy``) sampling the master; the top functions by own
time are printed and appended to the report.

``--control-plane`` measures what the control plane costs the hot path: instead
of the policy matrix, two variants of round-robin run alternately (plain,
control, plain, control, ...) for the repeats. ``plain`` has pings and the
control socket off (``--ping-interval 0 --control none``, no metrics);
``control`` pings every second and serves metrics (``--ping-interval 1
--metrics 127.0.0.1:0``, default control socket), and a thread of this script
GETs ``/metrics`` once a second while wrk runs. The table has a row per
variant, and the throughput difference of the medians is checked against the
goal (control at most 2 % slower).

Only 127.0.0.1 is ever targeted, and every step has a time limit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import math
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
APP = "examples.hello:handler"
POLICIES = ("round-robin", "shared", "reuseport")

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
METRICS_AT = re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")
READY = re.compile(r"worker \d+ \(pid (\d+)\) ready")

#: How long a server may take to listen and have every worker ready.
START_TIMEOUT_S = 20.0
#: How long a SIGTERM'd server may take to exit before it is killed.
STOP_TIMEOUT_S = 15.0
#: Slack given to wrk and py-spy beyond the run's duration.
RUN_SLACK_S = 30.0
#: With --profile: py-spy starts this long after wrk and stops a second before it ends.
PROFILE_DELAY_S = 0.5
#: Bound on the small commands that describe the machine.
PROBE_TIMEOUT_S = 10.0
#: With --control-plane: seconds between scrapes of /metrics, and the bound on one scrape.
SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0

#: --control-plane variants of round-robin: name -> extra server arguments. Run in this order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": ("--ping-interval", "0", "--control", "none"),
    "control": ("--ping-interval", "1", "--metrics", f"{HOST}:0"),
}
#: The variant whose /metrics the bench scrapes while wrk runs.
SCRAPED_VARIANTS = frozenset({"control"})
#: Largest throughput loss of control vs plain (medians) the control plane may cost.
CONTROL_PLANE_GOAL_PCT = 2.0

CLK_TCK = os.sysconf("SC_CLK_TCK")


# Measuring


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is parenthesised and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def cpu_seconds_of(pids: Sequence[int]) -> float:
    """Summed CPU time of ``pids``; ones that have gone count as zero."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def parse_wrk(output: str) -> WrkResult:
    """Read the numbers out of ``wrk --latency`` output.

    Raises:
        ValueError: a number that is always printed is missing.
    """

    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if match:
        socket_errors = dict(zip(socket_errors, map(int, match.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(need(r"^\s*(\d+) requests in ").group(1)),
        requests_per_s=float(need(r"^Requests/sec:\s*([\d.]+)").group(1)),
        p50_ms=_duration_ms(need(r"^\s*50%\s+(\S+)").group(1)),
        p99_ms=_duration_ms(need(r"^\s*99%\s+(\S+)").group(1)),
        socket_errors=socket_errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


# The server


def server_command(workers: int, policy: str, extra: Sequence[str] = (), app: str = APP) -> list[str]:
    """The server's command line (``python`` is this interpreter when run)."""
    return [
        "python", "-m", "dispatcher", "--app", app, "--workers", str(workers),
        "--bind", f"{HOST}:0", "--policy", policy, *extra,
    ]


class Server:
    """A ``python -m dispatcher`` whose stderr is read by a thread, line by line."""

    def __init__(self, policy: str, workers: int, extra: Sequence[str] = (), app: str = APP) -> None:
        self.policy = policy
        self.workers = workers
        self.command = [sys.executable, *server_command(workers, policy, extra, app)[1:]]
        self.lines: list[str] = []
        self.port = 0
        #: The metrics port from the ``metrics at`` line, once started; 0 if none was logged.
        self.metrics_port = 0
        self.worker_pids: list[int] = []
        self._children: list[psutil.Process] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace",
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"stderr-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def _wait_line(self, regex: re.Pattern[str], deadline: float) -> re.Match[str]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no log line matching {regex.pattern!r} in time; log:\n{self.log}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"server exited before {regex.pattern!r}; log:\n{self.log}")
            match = regex.search(line)
            if match:
                return match

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait for the port and every worker's ready line."""
        deadline = time.monotonic() + timeout
        self.port = int(self._wait_line(LISTENING, deadline).group(1))
        for _ in range(self.workers):
            self.worker_pids.append(int(self._wait_line(READY, deadline).group(1)))
        # Logged before "listening on", so already read (the reader appends before it queues).
        for line in list(self.lines):
            match = METRICS_AT.search(line)
            if match:
                self.metrics_port = int(match.group(1))
        with contextlib.suppress(psutil.Error):
            self._children = psutil.Process(self.pid).children(recursive=True)

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL the master and any worker left; return the exit code."""
        with contextlib.suppress(psutil.Error):
            known = {c.pid for c in self._children}
            self._children += [
                c for c in psutil.Process(self.pid).children(recursive=True) if c.pid not in known
            ]
        code: int | None = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"  master {self.pid} still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: killing",
                  file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(5.0)
        for child in self._children:
            # psutil checks the creation time first, so a reused pid is left alone.
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    print(f"  worker {child.pid} outlived the master: killing", file=sys.stderr)
                    child.kill()
        self._reader.join(5.0)
        return code


class Scraper:
    """A thread that GETs ``url`` every ``interval_s`` until stopped, counting successes and failures.

    A scrape fails on any error, a status other than 200, a timeout (``timeout_s``), or a body
    lacking ``dispatcher_scrape_error 0`` (the master's loop did not answer in time).
    """

    def __init__(self, url: str, interval_s: float = SCRAPE_INTERVAL_S,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        # No proxy from the environment: the request must go straight to 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and join; a scrape under way ends on its own timeout."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(self.timeout_s + 5.0)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._scrape()
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _scrape(self) -> None:
        started = time.monotonic()
        try:
            with self._opener.open(self.url, timeout=self.timeout_s) as response:
                status = response.status
                body = response.read().decode("utf-8", "replace")
        except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if status != 200:
            self._fail(f"HTTP {status}")
        elif not re.search(r"^dispatcher_scrape_error 0(\.0)?$", body, re.MULTILINE):
            self._fail("dispatcher_scrape_error is not 0")
        else:
            self.ok += 1
            self.latencies_ms.append((time.monotonic() - started) * 1e3)

    def _fail(self, reason: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(reason)


# Running


@dataclass
class Run:
    policy: str
    repeat: int
    port: int
    wrk: WrkResult
    master_cpu_s: float
    workers_cpu_s: float
    wrk_output: str
    server_log: str
    exit_code: int | None
    #: The --control-plane variant, if any.
    variant: str | None = None
    #: Scrapes of /metrics during the wrk run: None when not scraped.
    scrapes_ok: int | None = None
    scrapes_failed: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    scrape_p50_ms: float = float("nan")

    @property
    def label(self) -> str:
        """The table row this run belongs to: its variant, else its policy."""
        return self.variant or self.policy

    @property
    def master_us_per_conn(self) -> float:
        return self.master_cpu_s * 1e6 / self.wrk.requests if self.wrk.requests else float("nan")

    @property
    def workers_us_per_conn(self) -> float:
        return self.workers_cpu_s * 1e6 / self.wrk.requests if self.wrk.requests else float("nan")


@dataclass
class Options:
    duration: int
    workers: int
    connections: int
    threads: int
    wrk: str
    py_spy: str | None = None
    py_spy_rate: int = 100
    py_spy_mode: str = "native"
    profile_raw: Path | None = None
    notes: list[str] = field(default_factory=list)


def wrk_command(opts: Options, port: int | str) -> list[str]:
    return [
        opts.wrk, f"-t{opts.threads}", f"-c{opts.connections}", f"-d{opts.duration}s",
        "-H", "Connection: close", "--latency", f"http://{HOST}:{port}/",
    ]


def py_spy_command(opts: Options, pid: int | str, out: Path | str) -> list[str]:
    assert opts.py_spy is not None
    mode = [] if opts.py_spy_mode == "python" else [f"--{opts.py_spy_mode}"]
    return [
        opts.py_spy, "record", "--format", "raw", "--rate", str(opts.py_spy_rate), *mode,
        "--duration", str(max(1, opts.duration - 1)), "--pid", str(pid), "--output", str(out),
    ]


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for ``proc`` up to ``timeout`` and return its output; kill it and raise if late."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5.0)
        raise
    return out or "", err or ""


def run_once(policy: str, repeat: int, opts: Options, variant: str | None = None) -> Run:
    """Start a server, load it with wrk (and py-spy it if ``opts.profile_raw``), stop it.

    With ``variant`` (a key of VARIANTS) the server gets that variant's arguments, and for a
    scraped variant /metrics is fetched every SCRAPE_INTERVAL_S while wrk runs.
    """
    extra = VARIANTS[variant] if variant is not None else ()
    server = Server(policy, opts.workers, extra)
    spy: subprocess.Popen[str] | None = None
    scraper: Scraper | None = None
    try:
        server.start()
        if variant in SCRAPED_VARIANTS:
            if not server.metrics_port:
                raise RuntimeError(f"no 'metrics at' line from the server; log:\n{server.log}")
            scraper = Scraper(f"http://{HOST}:{server.metrics_port}/metrics")
        workers = list(server.worker_pids)
        master_before = cpu_seconds(server.pid)
        workers_before = cpu_seconds_of(workers)
        wrk = subprocess.Popen(
            wrk_command(opts, server.port), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        if scraper is not None:
            scraper.start()
        try:
            if opts.profile_raw is not None:
                time.sleep(PROFILE_DELAY_S)  # sample the master under full load only
                spy = subprocess.Popen(
                    py_spy_command(opts, server.pid, opts.profile_raw), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
            wrk_out, wrk_err = _finish(wrk, opts.duration + RUN_SLACK_S)
        finally:
            if scraper is not None:
                scraper.stop()
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait(5.0)
        master_after = cpu_seconds(server.pid)
        workers_after = cpu_seconds_of(workers)
        if spy is not None:
            spy_out, _ = _finish(spy, opts.duration + RUN_SLACK_S)
            if spy.returncode != 0:
                opts.notes.append(f"py-spy exited with {spy.returncode}: {spy_out.strip()}")
        if wrk.returncode != 0:
            raise RuntimeError(f"wrk exited with {wrk.returncode}:\n{wrk_out}{wrk_err}")
        result = parse_wrk(wrk_out)
    finally:
        if scraper is not None:
            scraper.stop()  # idempotent; here for a failure before wrk's block
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(5.0)
        code = server.stop()
    run = Run(
        policy=policy, repeat=repeat, port=server.port, wrk=result,
        master_cpu_s=master_after - master_before, workers_cpu_s=workers_after - workers_before,
        wrk_output=wrk_out, server_log=server.log, exit_code=code, variant=variant,
    )
    if scraper is not None:
        run.scrapes_ok, run.scrapes_failed, run.scrape_errors = scraper.ok, scraper.failed, scraper.errors
        if scraper.latencies_ms:
            run.scrape_p50_ms = statistics.median(scraper.latencies_ms)
    return run


# Reporting


DASH = "\N{EN DASH}"


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN if there is none."""
    finite = _finite(values)
    return statistics.median(finite) if finite else float("nan")


def spread(values: Iterable[float], fmt: str) -> str:
    """``median (min-max)`` of the finite values, ``n/a`` if none; just the value if one."""
    finite = _finite(values)
    if not finite:
        return "n/a"
    mid = format(statistics.median(finite), fmt)
    if len(finite) == 1 or min(finite) == max(finite):
        return mid
    return f"{mid} ({format(min(finite), fmt)}{DASH}{format(max(finite), fmt)})"


def summary_table(runs: Sequence[Run], labels: Sequence[str], variants: bool = False) -> str:
    """One row per policy (or, with ``variants``, per --control-plane variant, plus scrape counts)."""
    head = "| variant " if variants else "| policy "
    extra_head, extra_rule = ("", "")
    if variants:
        extra_head, extra_rule = ("| workers µs/conn | scrapes ok/failed ", "| --- | --- ")
    rows = [
        f"{head}| req/s | p50 ms | p99 ms | master µs/conn {extra_head}| errors |",
        f"| --- | --- | --- | --- | --- {extra_rule}| --- |",
    ]
    for label in labels:
        mine = [r for r in runs if r.label == label]
        if not mine:
            continue
        extra = ""
        if variants:
            scraped = [r for r in mine if r.scrapes_ok is not None]
            scrapes = (
                f"{sum(r.scrapes_ok or 0 for r in scraped)}/{sum(r.scrapes_failed for r in scraped)}"
                if scraped else "-"
            )
            extra = f"| {spread([r.workers_us_per_conn for r in mine], '.1f')} | {scrapes} "
        rows.append(
            f"| {label} "
            f"| {spread([r.wrk.requests_per_s for r in mine], '.0f')} "
            f"| {spread([r.wrk.p50_ms for r in mine], '.2f')} "
            f"| {spread([r.wrk.p99_ms for r in mine], '.2f')} "
            f"| {spread([r.master_us_per_conn for r in mine], '.1f')} "
            f"{extra}"
            f"| {spread([float(r.wrk.errors) for r in mine], '.0f')} |"
        )
    return "\n".join(rows)


def throughput_ratio(runs: Sequence[Run]) -> str:
    rr = [r.wrk.requests_per_s for r in runs if r.policy == "round-robin"]
    shared = [r.wrk.requests_per_s for r in runs if r.policy == "shared"]
    if not rr or not shared:
        return "round-robin/shared throughput: n/a (both policies must run)"
    ratio = statistics.median(rr) / statistics.median(shared)
    return f"round-robin/shared throughput (ratio of medians): {ratio:.2f}"


def control_plane_cost(runs: Sequence[Run]) -> str:
    """Throughput of control vs plain, in percent: of the medians (checked against the goal),
    and the median of the per-repeat pairs (each control run against the plain run before it)."""
    plain = {r.repeat: r.wrk.requests_per_s for r in runs if r.variant == "plain"}
    control = {r.repeat: r.wrk.requests_per_s for r in runs if r.variant == "control"}
    if not plain or not control:
        return "control vs plain throughput: n/a (both variants must run)"
    diff = 100 * (statistics.median(control.values()) / statistics.median(plain.values()) - 1)
    pairs = [100 * (control[k] / plain[k] - 1) for k in sorted(plain.keys() & control.keys())]
    paired = f"; median of {len(pairs)} paired repeats {statistics.median(pairs):+.1f} %" if pairs else ""
    verdict = "met" if -diff < CONTROL_PLANE_GOAL_PCT else "NOT met"
    return (
        f"control vs plain throughput (medians): {diff:+.1f} %{paired} "
        f"(goal: < {CONTROL_PLANE_GOAL_PCT:g} % slower: {verdict})"
    )


def runs_table(runs: Sequence[Run]) -> str:
    what = "variant" if any(r.variant for r in runs) else "policy"
    rows = [
        f"| # | {what} | port | requests | req/s | p50 ms | p99 ms | master CPU s | master µs/conn "
        "| workers µs/conn | socket errors c/r/w/t | non-2xx | exit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in enumerate(runs, 1):
        errs = "/".join(str(v) for v in r.wrk.socket_errors.values())
        rows.append(
            f"| {n} | {r.label} | {r.port} | {r.wrk.requests} | {r.wrk.requests_per_s:.0f} "
            f"| {r.wrk.p50_ms:.2f} | {r.wrk.p99_ms:.2f} | {r.master_cpu_s:.2f} "
            f"| {r.master_us_per_conn:.1f} | {r.workers_us_per_conn:.1f} | {errs} | {r.wrk.non_2xx} "
            f"| {r.exit_code} |"
        )
    return "\n".join(rows)


def _probe(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"n/a ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "n/a"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_description(opts: Options) -> list[str]:
    return [
        f"- nproc: {_probe(['nproc'])} ({_cpu_model()})",
        f"- kernel (`uname -r`): {_probe(['uname', '-r'])}",
        f"- Python: {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        f"- wrk: {_probe([opts.wrk, '--version'])}",
    ]


#: The line number in py-spy's ``function (file:line)``: dropped, to add up per function.
_FRAME_LINE = re.compile(r"(\(.*?):\d+\)$")
#: Leaf frames that mean the event loop is waiting for events, per py-spy mode (with native
#: frames the wait is the libc call; without, the selector's Python frame stands for it).
_WAIT_FRAMES = {"native": ("epoll_wait ",), "python": ("EpollSelector.select ",), "gil": ()}


def top_functions(raw: str, limit: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """From py-spy's raw (collapsed) stacks, return (samples, [(frame, own, total)]) by own samples.

    ``limit`` 0 returns every frame.
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_FRAME_LINE.sub(r"\1)", frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    ranked = own.most_common(limit or None)
    return samples, [(frame, n, total[frame]) for frame, n in ranked]


def _is_wait(frame: str, mode: str) -> bool:
    return frame.startswith(_WAIT_FRAMES[mode])


def profile_section(raw_path: Path, limit: int, mode: str) -> str:
    try:
        raw = raw_path.read_text()
    except OSError as exc:
        return f"py-spy wrote no profile ({exc})."
    samples, top = top_functions(raw, limit)
    if not samples:
        return "py-spy recorded no samples."
    waiting = sum(n for frame, n, _ in top_functions(raw, limit=0)[1] if _is_wait(frame, mode))
    busy = samples - waiting
    if mode == "gil":
        about = (
            f"{samples} samples of the master holding the GIL (py-spy mode gil): Python work only, "
            "as the GIL is released around syscalls and the epoll wait."
        )
    else:
        about = (
            f"{samples} samples of the master (py-spy mode {mode}; idle excluded), "
            f"{waiting} of them ({100 * waiting / samples:.0f} %) in the event loop's epoll wait. "
            "py-spy counts a thread as active while it is runnable, so on a busy machine much of "
            "that is waiting for a CPU after a wake-up, not work: \"of busy\" leaves those "
            "samples out."
        )
    rows = [
        f"{about} Top {len(top)} by own time:",
        "",
        "| own % | own % of busy | total % | function (file) |",
        "| --- | --- | --- | --- |",
    ]
    for frame, n, tot in top:
        of_busy = "-" if _is_wait(frame, mode) or not busy else f"{100 * n / busy:.1f}"
        rows.append(f"| {100 * n / samples:.1f} | {of_busy} | {100 * tot / samples:.1f} | `{frame}` |")
    return "\n".join(rows)


# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per policy (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default %(default)s)")
    parser.add_argument(
        "--policies",
        help=f"comma-separated, run in this order each repeat (default {','.join(POLICIES)})",
    )
    parser.add_argument(
        "--control-plane", action="store_true",
        help="instead of the policies, round-robin with pings off and no metrics (plain) against "
        "pings every 1 s and /metrics scraped every second (control), alternately",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder for the report (default bench/results)")
    parser.add_argument(
        "--profile", action="store_true",
        help="after the measured runs, one extra round-robin run with py-spy sampling the master",
    )
    parser.add_argument(
        "--profile-rate", type=int, default=250, help="py-spy samples/s (default %(default)s)"
    )
    parser.add_argument(
        "--profile-mode", choices=("native", "python", "gil"), default="native",
        help="native: C frames and syscalls too; python: Python frames only; gil: only samples "
        "holding the GIL, i.e. Python work (default %(default)s)",
    )
    parser.add_argument("--profile-top", type=int, default=15, help="functions to list (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("duration", "repeats", "workers", "connections", "threads", "profile_rate", "profile_top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections (wrk needs a connection per thread)")
    if args.control_plane and args.policies is not None:
        parser.error("--control-plane runs round-robin only: drop --policies")
    policies = [p.strip() for p in (args.policies or ",".join(POLICIES)).split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        parser.error(f"--policies: unknown {unknown or 'empty'}; choose from {', '.join(POLICIES)}")
    args.policies = ["round-robin"] if args.control_plane else policies
    return args


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def find_wrk() -> str | None:
    """wrk's path, or None after saying on stderr why the benchmark cannot run here."""
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc, SCM_RIGHTS hand-off)", file=sys.stderr)
        return None
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found on PATH (apt-get install wrk)", file=sys.stderr)
    return wrk


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM (or HUP) unwinds like Ctrl-C, so the server of the current run is stopped too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    wrk = find_wrk()
    if wrk is None:
        return 2
    opts = Options(duration=args.duration, workers=args.workers, connections=args.connections,
                   threads=args.threads, wrk=wrk, py_spy_rate=args.profile_rate,
                   py_spy_mode=args.profile_mode)
    if args.profile:
        opts.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if opts.py_spy is None:
            print("--profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
            return 2

    stamp = _timestamp()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / f"wrk-{stamp}.md"
    raw_path = out_dir / f"wrk-{stamp}.raw"

    runs: list[Run] = []
    # (policy, variant) per step of a repeat: the policy matrix, or the control-plane variants.
    steps: list[tuple[str, str | None]] = (
        [("round-robin", v) for v in VARIANTS] if args.control_plane else [(p, None) for p in args.policies]
    )
    labels = [variant or policy for policy, variant in steps]
    total = args.repeats * len(steps)
    try:
        for repeat in range(args.repeats):
            for policy, variant in steps:
                print(f"[{len(runs) + 1}/{total}] {variant or policy} (repeat {repeat + 1}) ...",
                      end=" ", flush=True)
                run = run_once(policy, repeat, opts, variant)
                runs.append(run)
                scraped = ""
                if run.scrapes_ok is not None:
                    scraped = f", scrapes {run.scrapes_ok} ok/{run.scrapes_failed} failed"
                    if run.scrape_errors:
                        scraped += f" ({run.scrape_errors[0]})"
                print(f"{run.wrk.requests_per_s:.0f} req/s, p99 {run.wrk.p99_ms:.2f} ms, "
                      f"master {run.master_us_per_conn:.1f} µs/conn, errors {run.wrk.errors}{scraped}",
                      flush=True)
        if args.profile:
            spy_raw = out_dir / f"pyspy-master-round-robin-{stamp}.raw"
            opts.profile_raw = spy_raw
            print("[profile] round-robin with py-spy on the master ...", end=" ", flush=True)
            prof_run = run_once("round-robin", -1, opts)
            print(f"{prof_run.wrk.requests_per_s:.0f} req/s (not in the table)", flush=True)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        print(f"\nrun failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}); nothing written", file=sys.stderr)
        return 130

    profile_text = ""
    profile_cmd = ""
    if args.profile:
        profile_text = profile_section(spy_raw, args.profile_top, args.profile_mode)
        for note in opts.notes:
            profile_text += f"\n\nNote: {note}"
        profile_cmd = shlex.join(py_spy_command(opts, "MASTER_PID", spy_raw.name))
        runs_for_raw = [*runs, prof_run]
    else:
        runs_for_raw = runs

    table = summary_table(runs, labels, variants=args.control_plane)
    ratio = control_plane_cost(runs) if args.control_plane else throughput_ratio(runs)
    print()
    print(table)
    print()
    print(ratio)
    if profile_text:
        print()
        print(profile_text)

    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    cells = (
        "Cells: median (min\N{EN DASH}max). master µs/conn = master CPU (utime+stime) during the wrk "
        "run / requests wrk completed. errors = wrk socket errors + non-2xx/3xx responses."
    )
    if args.control_plane:
        server_cmds = [
            f"{shlex.join([str(python), *server_command(args.workers, 'round-robin', extra)[1:]])}"
            f"  # {name}"
            for name, extra in VARIANTS.items()
        ]
        about = [
            f"Control-plane cost: {args.repeats} repeat(s) x {len(steps)} variants of round-robin, "
            f"{args.duration} s each; each repeat runs {', '.join(labels)} in that order, a fresh "
            "server per run. plain: pings off, no control socket, no metrics. control: pings every "
            f"1 s, the default control socket (idle), and /metrics GET by the bench every "
            f"{SCRAPE_INTERVAL_S:g} s during the wrk run (urllib, {SCRAPE_TIMEOUT_S:g} s timeout; a "
            "scrape fails on an error, a non-200 or `dispatcher_scrape_error` not 0). "
            "workers µs/conn = the workers' CPU likewise. "
            f"{cells} The paired figure compares each repeat's control run with the plain run "
            "just before it.",
        ]
        commands_intro = (
            "From the repository root, per run (PORT is the one the server logs, `listening on "
            "127.0.0.1:PORT`; MPORT from `metrics at http://127.0.0.1:MPORT/metrics`, scraped as "
            "`http://127.0.0.1:MPORT/metrics` once a second):"
        )
    else:
        server_cmds = [shlex.join([str(python), *server_command(args.workers, "P")[1:]])]
        about = [
            f"{args.repeats} repeat(s) x {len(args.policies)} policies, {args.duration} s each; each "
            f"repeat runs {', '.join(args.policies)} in that order, a fresh server per run. {cells}",
        ]
        commands_intro = (
            "From the repository root, per run (PORT is the one the server logs, `listening on "
            "127.0.0.1:PORT`; P is the policy):"
        )
    scrape_notes = [
        f"- run {n} ({r.label}, repeat {r.repeat + 1}): {r.scrapes_failed} failed scrape(s): "
        + "; ".join(r.scrape_errors)
        for n, r in enumerate(runs, 1) if r.scrapes_failed
    ]
    scrape_ms = [r.scrape_p50_ms for r in runs if r.scrapes_ok]
    scrape_line = (
        [f"Scrape round trip (median per run, median of runs): {statistics.median(scrape_ms):.1f} ms", ""]
        if scrape_ms else []
    )
    lines = [
        f"# wrk benchmark, {stamp}",
        "",
        *about,
        "",
        table,
        "",
        ratio,
        "",
        *scrape_line,
        *([*scrape_notes, ""] if scrape_notes else []),
        "## Machine",
        "",
        *machine_description(opts),
        "",
        "## Commands",
        "",
        commands_intro,
        "",
        "```",
        *server_cmds,
        shlex.join(wrk_command(opts, "PORT")),
        "```",
        "",
        f"Script: `{shlex.join([sys.executable, *sys.argv])}`",
        "",
        "## Runs",
        "",
        runs_table(runs),
    ]
    if profile_text:
        lines += [
            "",
            "## Master profile (round-robin, extra run not in the table)",
            "",
            "```",
            profile_cmd,
            "```",
            "",
            profile_text,
        ]
    report_path.write_text("\n".join(lines) + "\n")
    with raw_path.open("w") as raw:
        for n, r in enumerate(runs_for_raw, 1):
            label = "profiled" if r.repeat < 0 else f"repeat {r.repeat + 1}"
            scraped = "" if r.scrapes_ok is None else f", scrapes {r.scrapes_ok} ok/{r.scrapes_failed} failed"
            raw.write(f"===== run {n}: {r.label}, {label}, port {r.port}{scraped} =====\n")
            raw.write(r.wrk_output)
            raw.write("----- server log -----\n")
            raw.write(r.server_log)
    print(f"\nwrote {report_path.relative_to(ROOT) if report_path.is_relative_to(ROOT) else report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
