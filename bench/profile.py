"""Where the master and the workers spend their CPU (``python -m bench.lab --profile``).

One workload (``--profile-workload``, default W0: ``bench.apps:light``, a new
connection per request) in one CPU layout (``--profile-layout``, default
pinned: the server on CPU 1, wrk on CPU 0), run once under round-robin and
once under shared, each on a fresh dispatcher (after the workload's warm-up,
as in the lab). While wrk runs (from ``DELAY_S`` in to a second before its
end):

- py-spy (``pip install py-spy``; not a dependency of the project) samples
  the master and each worker, one py-spy each; native mode gives the C
  frames and syscalls too. py-spy counts a thread as active while it is
  runnable, so on a busy machine much of the event loop's epoll wait is
  waiting for a CPU after a wake-up, not work: the "of busy" figures leave
  those samples out. Modes: ``native`` (C frames and syscalls too),
  ``python`` (Python frames only), ``gil`` (only samples holding the GIL:
  Python work).
- where ``perf`` works, ``perf record -e cpu-clock -g -p MASTER,WORKERS``
  records the same processes for the kernel side; ``perf report --stdio
  --no-children --sort pid,dso,sym`` gives each symbol's self time, added
  up per role (master, workers). perf missing or refusing leaves one note,
  and py-spy's part still runs.

The report puts the two policies side by side per role: the top functions
(py-spy, own time as a share of the role's busy samples) and the top
symbols (perf, own time as a share of the role's samples and as CPU µs
per connection: that share of the role's CPU time during the run, divided
by the connections the workers handled). A second view of perf's samples
(``perf report --children``) gives each system call's whole time in the
kernel, what it calls included (``close`` with the socket it frees), next to
the interpreter's own time (libpython and the extension modules): what a
role's CPU per connection is made of, and how much of it no amount of
compiling would take away. Written to
``bench/results/profile-<UTC timestamp>.md``; py-spy's samples, perf's
report, wrk's output and the server logs go beside it as ``.raw`` (not
committed).
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import report, wrk
from bench.layouts import pinning_possible, server_cpu, taskset
from bench.matrix import (
    RUN_ERRORS,
    Settings,
    Workload,
    launcher,
    server_args,
    settled_status,
    warm_up,
    workloads,
    wrk_command,
)
from bench.matrix import (
    connections as wrk_connections,
)
from bench.proc import Reading, Usage, machine, measured, readings
from bench.proc import probe as proc_probe
from bench.server import Server

MODES = ("native", "python", "gil")
#: The policies profiled, side by side: the master hands each connection over, or the workers accept.
POLICIES = ("round-robin", "shared")
ROLES = ("master", "workers")
#: py-spy and perf start this long after wrk and stop a second before it ends.
DELAY_S = 0.5
#: Bound on perf's probe, and on ``perf report``.
PERF_TIMEOUT_S = 60.0
#: The line number in py-spy's ``function (file:line)``: dropped, to add up per function.
_FRAME_LINE = re.compile(r"(\(.*?):\d+\)$")
#: Leaf frames that mean the event loop is waiting for events, per py-spy mode (with native
#: frames the wait is the libc call; without, the selector's Python frame stands for it).
_WAIT_FRAMES = {"native": ("epoll_wait ", "epoll_pwait "), "python": ("EpollSelector.select ",), "gil": ()}


@dataclass
class Sampler:
    """How py-spy samples: its path, rate (samples/s), mode, and the functions the report lists."""

    py_spy: str
    rate: int = 250
    mode: str = "native"
    top: int = 15
    notes: list[str] = field(default_factory=list)

    def command(self, pid: int | str, duration_s: float, out: Path | str) -> list[str]:
        mode = [] if self.mode == "python" else [f"--{self.mode}"]
        return [
            self.py_spy, "record", "--format", "raw", "--rate", str(self.rate), *mode,
            "--duration", str(max(1, int(duration_s) - 1)), "--pid", str(pid), "--output", str(out),
        ]

    @contextlib.contextmanager
    def sampling(self, targets: dict[int, Path], duration_s: float) -> Iterator[None]:
        """py-spy on each pid of ``targets`` (writing to its path) while the block runs."""
        spies = {pid: subprocess.Popen(self.command(pid, duration_s, out), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for pid, out in targets.items()}
        try:
            yield
            for pid, spy in spies.items():
                output, _ = spy.communicate(timeout=duration_s + wrk.SLACK_S)
                if spy.returncode != 0:
                    self.notes.append(f"py-spy on {pid} exited with {spy.returncode}: {output.strip()}")
        finally:
            for spy in spies.values():
                if spy.poll() is None:
                    spy.kill()
                    spy.wait(5.0)


@dataclass
class Perf:
    """``perf record -e cpu-clock -g`` on the server's processes; None of it if perf does not work here."""

    perf: str
    notes: list[str] = field(default_factory=list)

    def command(self, pids: Sequence[int | str], duration_s: float, out: Path | str) -> list[str]:
        return [self.perf, "record", "-e", "cpu-clock", "-g", "-p", ",".join(map(str, pids)), "-o",
                str(out), "--", "sleep", f"{max(1.0, duration_s - 1):g}"]

    def report_command(self, data: Path | str) -> list[str]:
        return [self.perf, "report", "-i", str(data), "--stdio", "--no-children", "--sort", "pid,dso,sym",
                "-g", "none", "-t", "\t"]

    @contextlib.contextmanager
    def recording(self, pids: Sequence[int], duration_s: float, out: Path) -> Iterator[None]:
        """perf recording ``pids`` while the block runs; a failure is a note."""
        rec = subprocess.Popen(self.command(pids, duration_s, out), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            yield
            output, _ = rec.communicate(timeout=duration_s + wrk.SLACK_S)
            if rec.returncode != 0:
                self.notes.append(f"perf record exited with {rec.returncode}: {output.strip()[-500:]}")
        finally:
            if rec.poll() is None:
                rec.kill()
                rec.wait(5.0)

    def calls_report_command(self, data: Path | str) -> list[str]:
        """Each symbol's time with what it calls (children): a system call's whole kernel time."""
        return [self.perf, "report", "-i", str(data), "--stdio", "--children", "--sort", "pid,dso,sym",
                "-g", "none", "-t", "\t"]

    def report(self, data: Path, children: bool = False) -> str:
        """``perf report``'s text for ``data`` (empty, with a note, if it fails)."""
        command = self.calls_report_command(data) if children else self.report_command(data)
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=PERF_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.notes.append(f"perf report failed: {exc}")
            return ""
        if done.returncode != 0:
            self.notes.append(f"perf report exited with {done.returncode}: {done.stderr.strip()[-500:]}")
            return ""
        return done.stdout


def find_perf(work_dir: Path) -> tuple[Perf | None, str]:
    """perf, if it is on PATH and records ``cpu-clock`` here; else None and why (one note)."""
    found = shutil.which("perf")
    if found is None:
        return None, "perf not found on PATH: no kernel-side profile"
    probe = Perf(found)
    line = [found, "record", "-e", "cpu-clock", "-g", "-o", str(work_dir / "probe.data"), "--", "true"]
    try:
        done = subprocess.run(line, capture_output=True, text=True, timeout=PERF_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"perf does not work here ({exc}): no kernel-side profile"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"perf record refused (exit {done.returncode}: {why}): no kernel-side profile"
    return probe, ""


def find_py_spy() -> str | None:
    """py-spy's path (on PATH or beside this interpreter), or None after saying how to get it."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        print("--profile needs py-spy, which the project does not install: "
              f"{report.relative(Path(sys.executable).parent)}/pip install py-spy", file=sys.stderr)
    return found


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


def profile_section(raw: str, limit: int, mode: str, who: str = "the master") -> str:
    """The top ``limit`` functions of py-spy's ``raw`` samples (of ``who``), as Markdown."""
    samples, top = top_functions(raw, limit)
    if not samples:
        return "py-spy recorded no samples."
    waiting = sum(n for frame, n, _ in top_functions(raw, limit=0)[1] if _is_wait(frame, mode))
    busy = samples - waiting
    if mode == "gil":
        about = (
            f"{samples} samples of {who} holding the GIL (py-spy mode gil): Python work only, "
            "as the GIL is released around syscalls and the epoll wait."
        )
    else:
        about = (
            f"{samples} samples of {who} (py-spy mode {mode}; idle excluded), "
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




def busy_shares(raw: str, mode: str) -> tuple[int, int, dict[str, float]]:
    """(samples, of which in the epoll wait, {function: own share of the busy samples}) of py-spy's raw."""
    samples, every = top_functions(raw, limit=0)
    waiting = sum(n for frame, n, _ in every if _is_wait(frame, mode))
    busy = samples - waiting
    shares = {frame: n / busy for frame, n, _ in every if busy and not _is_wait(frame, mode)}
    return samples, waiting, shares


@dataclass(frozen=True)
class Symbol:
    """One line of ``perf report --sort pid,dso,sym``: a symbol's self time in one process."""

    share: float  # of every sample recorded, 0..1
    pid: int
    dso: str
    kernel: bool
    name: str

    @property
    def label(self) -> str:
        return f"{'[k]' if self.kernel else '[.]'} {self.name} ({self.dso})"


_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s*\t\s*(\d+):[^\t]*\t([^\t]*)\t\[(.)\]\s*(.*)$")


def parse_perf(text: str) -> list[Symbol]:
    """The symbols of ``perf report --stdio --sort pid,dso,sym -t '\\t'`` output (comments skipped)."""
    found = []
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if match:
            share, pid, dso, kind, name = match.groups()
            found.append(Symbol(float(share) / 100, int(pid), dso.strip(), kind == "k", name.strip()))
    return found


#: A ``--children`` line: children share, self share, pid, dso, kind, symbol.
_PERF_CHILDREN_LINE = re.compile(
    r"^\s*([\d.]+)%\s*\t\s*[\d.]+%\s*\t\s*(\d+):[^\t]*\t([^\t]*)\t\[(.)\]\s*(.*)$")
#: The kernel's entry points of a system call, by kernel version and inlining: ``__x64_sys_close``,
#: ``__sys_sendmsg``, ``ksys_write``, ``__do_sys_...``. The largest of them is the call's time (the
#: unwinder misses the outer ones of some calls: sendmsg's time shows under ``__sys_sendmsg``).
_SYSCALL = re.compile(r"^(?:__x64_sys_|__do_sys_|__sys_|__se_sys_|ksys_)(\w+?)(?:\.\w+)*$")
#: Objects whose own time is the interpreter's: libpython and every extension module (uvloop, _socket,
#: the project's compiled hand-off).
_INTERPRETER = re.compile(r"libpython|\.cpython-|^python3?(\.\d+)?$")


def parse_perf_calls(text: str) -> list[Symbol]:
    """The symbols of ``perf report --stdio --children --sort pid,dso,sym -t '\\t'``, each with its
    children share (its time with everything it calls)."""
    found = []
    for line in text.splitlines():
        match = _PERF_CHILDREN_LINE.match(line)
        if match:
            share, pid, dso, kind, name = match.groups()
            found.append(Symbol(float(share) / 100, int(pid), dso.strip(), kind == "k", name.strip()))
    return found


def role_calls(calls: Sequence[Symbol], symbols: Sequence[Symbol], pids: set[int]) -> dict[str, float]:
    """{system call or "interpreter": share of the samples of ``pids``}.

    A system call's share is its kernel entry point's children share
    (``calls``), the largest of its entry points per process, summed over
    ``pids``; "interpreter" is the self share of libpython and the extension
    modules (``symbols``). Shares are of the role's samples: the sum of its
    self shares.
    """
    total = sum(s.share for s in symbols if s.pid in pids)
    if not total:
        return {}
    per_process: dict[tuple[int, str], float] = {}
    for c in calls:
        match = _SYSCALL.match(c.name) if c.kernel and c.pid in pids else None
        if match:
            key = (c.pid, match.group(1))
            per_process[key] = max(per_process.get(key, 0.0), c.share)
    shares: dict[str, float] = {}
    for (_, name), share in per_process.items():
        shares[name] = shares.get(name, 0.0) + share / total
    interpreter = sum(s.share for s in symbols
                      if s.pid in pids and not s.kernel and _INTERPRETER.search(s.dso))
    shares["interpreter"] = interpreter / total
    return shares


def role_symbols(symbols: Sequence[Symbol], pids: set[int]) -> dict[str, float]:
    """{symbol label: share of the samples of ``pids``}, the same symbol added up over those processes."""
    mine = [s for s in symbols if s.pid in pids]
    total = sum(s.share for s in mine)
    shares: dict[str, float] = {}
    for s in mine:
        shares[s.label] = shares.get(s.label, 0.0) + (s.share / total if total else 0.0)
    return shares


def kernel_share(shares: dict[str, float]) -> float:
    """The share of a role's samples in kernel symbols."""
    return sum(v for k, v in shares.items() if k.startswith("[k]"))


@dataclass
class PolicyProfile:
    """One profiled run: the load's figures, each role's CPU, py-spy's samples and perf's symbols."""

    policy: str
    #: The profiler attached: ``py-spy`` or ``perf``.
    tool: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    connections: int
    #: CPU seconds during the load per role (schedstat), and the user/system split and context switches.
    cpu_s: dict[str, float]
    usage: dict[str, Usage]
    master_pid: int
    worker_pids: list[int]
    #: py-spy's raw samples per role (the workers' one after the other).
    py_spy: dict[str, str] = field(default_factory=dict)
    #: perf's symbols per role: label -> share of the role's samples (empty: no perf).
    perf: dict[str, dict[str, float]] = field(default_factory=dict)
    #: perf's system calls (and "interpreter") per role: name -> share of the role's samples.
    calls: dict[str, dict[str, float]] = field(default_factory=dict)
    raw: str = ""

    def us_per_conn(self, role: str) -> float:
        return self.cpu_s[role] * 1e6 / self.connections if self.connections else math.nan


@contextlib.contextmanager
def profiling(sampler: Sampler | None, perf: Perf | None, targets: dict[int, Path], perf_data: Path,
              duration_s: float) -> Iterator[None]:
    """From ``DELAY_S`` in: py-spy on each process of ``targets`` (``sampler``), or perf on all of them,
    while within."""
    time.sleep(DELAY_S)
    with contextlib.ExitStack() as stack:
        if sampler is not None:
            stack.enter_context(sampler.sampling(targets, duration_s))
        if perf is not None:
            stack.enter_context(perf.recording(list(targets), duration_s, perf_data))
        yield


def run_policy(settings: Settings, sampler: Sampler | None, perf: Perf | None, workload: Workload,
               policy: str, layout: str, work_dir: Path) -> PolicyProfile:
    """``workload`` under ``policy`` in ``layout`` with py-spy on each process (``sampler``) or perf on all
    of them (``perf``): one of the two, so that neither disturbs what the other sees.

    Raises:
        StartError, CtlError, RuntimeError, subprocess.SubprocessError, ValueError: as ``run_cell``.
    """
    server = Server(*server_args(settings, workload, policy), workers=workload.workers,
                    launcher=launcher(layout))
    with server:
        warmup = warm_up(settings, workload, server.port, layout)
        before, _ = settled_status(server, time.monotonic()) if warmup else (server.ready_snapshot, True)
        workers = {int(w["id"]): int(w["pid"]) for w in before["workers"] if w["pid"]}
        targets = {pid: work_dir / f"{policy}-{pid}.py-spy" for pid in [server.pid, *workers.values()]}
        tool = "py-spy" if sampler is not None else "perf"
        perf_data = work_dir / f"{policy}.perf.data"
        line = wrk_command(settings, workload, server.port, layout)
        master_before, workers_before = Reading.of(server.pid), readings(workers)
        result, output, _ = wrk.run_measured(
            line, settings.duration_s, profiling(sampler, perf, targets, perf_data, settings.duration_s))
        master_after, workers_after = Reading.of(server.pid), readings(workers)
        after, _ = settled_status(server, time.monotonic())
    handled_before = {int(w["id"]): int(w["handled"]) for w in before["workers"]}
    connections = sum(int(w["handled"]) - handled_before.get(int(w["id"]), 0) for w in after["workers"])
    found = PolicyProfile(
        policy=policy, tool=tool, requests_per_s=result.requests_per_s, p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors, connections=connections,
        cpu_s={"master": master_after.cpu_s - master_before.cpu_s,
               "workers": sum(workers_after[w].cpu_s - workers_before[w].cpu_s for w in workers)},
        usage={"master": measured(master_before, master_after),
               "workers": Usage.total(measured(workers_before[w], workers_after[w]) for w in workers)},
        master_pid=server.pid, worker_pids=list(workers.values()),
    )
    for role, pids in (("master", [server.pid]), ("workers", list(workers.values()))):
        texts = []
        for pid in pids if sampler is not None else []:
            with contextlib.suppress(OSError):
                texts.append(targets[pid].read_text())
        found.py_spy[role] = "".join(texts)
    perf_text = ""
    if perf is not None and perf_data.exists():
        perf_text = perf.report(perf_data)
        symbols = parse_perf(perf_text)
        calls = parse_perf_calls(perf.report(perf_data, children=True))
        roles = {"master": {server.pid}, "workers": set(workers.values())}
        found.perf = {role: role_symbols(symbols, pids) for role, pids in roles.items()}
        found.calls = {role: role_calls(calls, symbols, pids) for role, pids in roles.items()}
    found.raw = (f"{warmup}$ {shlex.join(line)}\n{output}----- server log -----\n{server.log}"
                 f"----- perf report -----\n{perf_text}")
    return found


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _top(ranked: dict[str, float], limit: int) -> list[str]:
    """The ``limit`` keys of ``ranked`` with the largest values (NaN last)."""
    return sorted(ranked, key=lambda k: -ranked[k] if not math.isnan(ranked[k]) else math.inf)[:limit]


def py_spy_table(runs: Sequence[PolicyProfile], role: str, limit: int, mode: str) -> str:
    """py-spy's top functions of ``role`` by own share of the busy samples, a column per policy."""
    found = {r.policy: busy_shares(r.py_spy.get(role, ""), mode) for r in runs}
    if not any(samples for samples, _, _ in found.values()):
        return "py-spy recorded no samples."
    about = "; ".join(
        f"{policy}: {samples} samples, {100 * waiting / samples if samples else 0:.0f} % in the epoll wait"
        for policy, (samples, waiting, _) in found.items()
    )
    # Ranked by own share of all the samples (a frame seen once in a mostly idle process stays low).
    ranked: dict[str, float] = {}
    for samples, waiting, shares in found.values():
        for frame, share in shares.items():
            ranked[frame] = max(ranked.get(frame, 0.0), share * (samples - waiting) / samples)
    rows = [f"| `{frame}` | " + " | ".join(_pct(found[r.policy][2].get(frame)) for r in runs) + " |"
            for frame in _top(ranked, limit)]
    header = "| function (file) | " + " | ".join(f"{r.policy}: own % of busy" for r in runs) + " |"
    return "\n".join([f"{about}.", "", header, "|" + " --- |" * (len(runs) + 1), *rows])


def perf_table(runs: Sequence[PolicyProfile], role: str, limit: int) -> str:
    """perf's top symbols of ``role`` by self time, a pair of columns (% of the role, µs/conn) per policy."""
    if not any(r.perf.get(role) for r in runs):
        return "perf recorded nothing for these processes."
    kernel = "; ".join(
        f"{r.policy}: kernel {_pct(kernel_share(r.perf.get(role, {})))} % of the samples "
        f"({kernel_share(r.perf.get(role, {})) * r.us_per_conn(role):.1f} µs/conn of "
        f"{r.us_per_conn(role):.1f})"
        for r in runs
    )
    ranked: dict[str, float] = {}
    for r in runs:
        for name, share in r.perf.get(role, {}).items():
            ranked[name] = max(ranked.get(name, 0.0), share * r.us_per_conn(role))
    rows = []
    for name in _top(ranked, limit):
        cells = []
        for r in runs:
            found = r.perf.get(role, {}).get(name)
            cells += [_pct(found), "-" if found is None else f"{found * r.us_per_conn(role):.2f}"]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    header = "| symbol (object) | " + " | ".join(f"{r.policy} % | {r.policy} µs/conn" for r in runs) + " |"
    return "\n".join([f"{kernel}.", "", header, "|" + " --- |" * (2 * len(runs) + 1), *rows])


def calls_table(runs: Sequence[PolicyProfile], role: str, limit: int) -> str:
    """``role``'s system calls (whole kernel time) and the interpreter, a pair of columns per policy."""
    if not any(r.calls.get(role) for r in runs):
        return "perf recorded nothing for these processes."
    ranked: dict[str, float] = {}
    for r in runs:
        for name, share in r.calls.get(role, {}).items():
            ranked[name] = max(ranked.get(name, 0.0), share * r.us_per_conn(role))
    names = [n for n in _top(ranked, limit) if n != "interpreter"]
    rows = []
    for name in [*names, "interpreter"]:
        cells = []
        for r in runs:
            found = r.calls.get(role, {}).get(name)
            cells += [_pct(found), "-" if found is None else f"{found * r.us_per_conn(role):.2f}"]
        label = ("the interpreter's own time (libpython and extension modules)" if name == "interpreter"
                 else f"`{name}`")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    header = "| where | " + " | ".join(f"{r.policy} % | {r.policy} µs/conn" for r in runs) + " |"
    return "\n".join([header, "|" + " --- |" * (2 * len(runs) + 1), *rows])


def figures_table(runs: Sequence[PolicyProfile]) -> str:
    rows = []
    for r in runs:
        row = [r.policy, r.tool, f"{r.requests_per_s:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
               str(r.connections)]
        for role in ROLES:
            u = r.usage[role]
            n = r.connections or 1
            row += [f"{r.us_per_conn(role):.1f} ({1e6 * u.user_s / n:.1f} / {1e6 * u.system_s / n:.1f})"
                    .replace("(nan / nan)", "(split n/a)"),
                    f"{u.voluntary / n:.3f} / {u.involuntary / n:.3f}"]
        rows.append(row)
    return report.table(["policy", "profiler", "req/s", "p50 ms", "p99 ms", "connections",
                         "master µs/conn (user / sys)", "master ctx/conn vol / invol",
                         "workers µs/conn (user / sys)", "workers ctx/conn vol / invol"],
                        [[c.replace("nan", "n/a") for c in row] for row in rows])


def run(settings: Settings, sampler: Sampler, out: Path, stamp: str, workload_key: str = "W0",
        layout: str = "pinned") -> int:
    """The profiled runs (round-robin, then shared): print the tables, write the report; the exit status."""
    workload = workloads(settings)[workload_key]
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if layout == "pinned" and not pinning_possible():
        notes.append("pinned layout not possible here (CPUs 0 and 1 not both ours): ran unpinned")
        layout = "unpinned"
    runs: list[PolicyProfile] = []
    with tempfile.TemporaryDirectory(prefix="dispatcher-profile-") as tmp:
        work_dir = Path(tmp)
        perf, why = find_perf(work_dir)
        if why:
            notes.append(why)
            print(f"note: {why}", file=sys.stderr)
        passes: list[tuple[str, Sampler | None, Perf | None]] = [("py-spy", sampler, None)]
        if perf is not None:
            passes.append(("perf", None, perf))
        for policy in POLICIES:
            for tool, spy, recorder in passes:
                what = f"{workload.key} {layout} {policy} with {tool} on the master and workers"
                print(f"{what} ...", end=" ", flush=True)
                try:
                    found = run_policy(settings, spy, recorder, workload, policy, layout, work_dir)
                except RUN_ERRORS as exc:
                    print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                    notes.append(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                    continue
                runs.append(found)
                print(f"{found.requests_per_s:.0f} req/s, master {found.us_per_conn('master'):.1f} µs/conn, "
                      f"workers {found.us_per_conn('workers'):.1f} µs/conn, errors {found.errors}",
                      flush=True)
        notes += sampler.notes + (perf.notes if perf else [])
    if not runs:
        print("every run failed; nothing written", file=sys.stderr)
        return 1
    spied = [r for r in runs if r.tool == "py-spy"]
    recorded = [r for r in runs if r.tool == "perf"]
    sections: list[str] = []
    for role in ROLES:
        if spied:
            sections += [f"## {role.capitalize()}: py-spy, own time", "",
                         py_spy_table(spied, role, sampler.top, sampler.mode), ""]
        if recorded:
            sections += [f"## {role.capitalize()}: perf, self time per symbol", "",
                         perf_table(recorded, role, sampler.top), "",
                         f"## {role.capitalize()}: perf, system calls (with what they call) and the "
                         "interpreter",
                         "", calls_table(recorded, role, sampler.top), ""]
    details = []
    for r in spied:
        for role in ROLES:
            who = "the master" if role == "master" else "the workers"
            details += [f"### {r.policy}, {role}", "",
                        profile_section(r.py_spy.get(role, ""), sampler.top, sampler.mode, who), ""]
    python = report.python()
    pids = "MASTER_PID,WORKER_PIDS"
    perf_lines = []
    if perf is not None:
        perf_lines = [shlex.join(perf.command([pids], settings.duration_s, "POLICY.perf.data")),
                      *(shlex.join(command("POLICY.perf.data")).replace("'\t'", "$'\\t'")
                        for command in (perf.report_command, perf.calls_report_command))]
    server = report.server_command(*server_args(settings, workload, "POLICY"), workers=workload.workers)
    pin = shlex.join(taskset(server_cpu(layout)))
    lines = [
        f"# Profile: round-robin and shared, {workload.key} {layout}, {stamp}",
        "",
        f"{workload.key} ({workload.title}), {workload.workers} workers, {layout} layout; per policy a fresh "
        f"dispatcher, {settings.warmup_s if workload.warmup else 0:g} s of warm-up, then "
        f"{settings.duration_s} s of wrk (-t{settings.threads} -c{wrk_connections(settings, workload)}) with "
        f"py-spy ({sampler.mode}, {sampler.rate}/s) on the master and on each worker"
        + (" and, on another fresh dispatcher, perf (`-e cpu-clock -g`, 4000 Hz) on all of them (apart, so "
           "that py-spy's pauses do not show in perf's kernel view)" if perf else "")
        + f", from {DELAY_S:g} s in. The figures are with the profiler attached (py-spy pauses each "
        "process to read its stacks, and it and perf take CPU from the two cores), so they are lower "
        "than the lab's. µs/conn: the role's CPU time (schedstat; user / system split by /proc stat) "
        "during the run over the connections the workers handled; a symbol's µs/conn is its share of "
        "the role's perf samples times that. perf's `cpu-clock` is a timer: in a virtual machine its "
        "samples cannot land where interrupts are off, so the time spent there shows at the point they "
        "are turned on again (`_raw_spin_unlock_irqrestore`, `finish_task_switch`, ...).",
        "",
        *(f"- Note: {n}" for n in notes),
        *([""] if notes else []),
        figures_table(runs),
        "",
        *sections,
        "## Each run's py-spy detail",
        "",
        *details,
        "## Machine",
        "",
        *machine(settings.wrk),
        f"- perf: {report_probe(perf)}",
        "",
        "## Commands",
        "",
        "From the repository root. PORT is the one `ctl ready` reports, MASTER_PID the master's, WORKER_PIDS "
        "the workers' (from `status`).",
        "",
        "```",
        f"{pin} {server}" if pin else server,
        shlex.join(wrk_command(settings, workload, "PORT", layout)),
        shlex.join(sampler.command("PID", settings.duration_s, "POLICY-PID.py-spy")) + "  # each process",
        *perf_lines,
        "```",
        "",
        f"Lab: `{shlex.join([python, '-m', 'bench.lab', *sys.argv[1:]])}`",
    ]
    path = out / f"profile-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    with path.with_suffix(".raw").open("w") as raw:
        for r in runs:
            raw.write(f"===== {r.policy} =====\n{r.raw}")
            for role in ROLES:
                raw.write(f"----- py-spy, {role} -----\n{r.py_spy.get(role, '')}")
    print()
    print(figures_table(runs))
    print()
    print("\n".join(sections))
    print(f"wrote {report.relative(path)} (and .raw)")
    return 0


def report_probe(perf: Perf | None) -> str:
    if perf is None:
        return "not used"
    return proc_probe([perf.perf, "--version"])
