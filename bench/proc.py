"""What the lab reads about processes and the machine: a process's CPU time, and what the machine is.

CPU time comes from ``/proc``: each thread's ``schedstat`` run time in
nanoseconds where the kernel has it (CONFIG_SCHED_INFO), else the clock
ticks (10 ms) of ``/proc/PID/stat``. What a process costs (``Usage``): its
user and system time (each thread's ``/proc/PID/task/TID/stat`` utime and
stime, in clock ticks) and its voluntary and involuntary context switches
(each thread's ``status``), summed over its threads; ``measured`` scales
the user/system split of a difference to the precise total from
``schedstat``. A child's ``rusage`` (``os.wait4``) gives the same figures
(``from_rusage``). The machine's description is a few Markdown bullets for
the reports: cores, CPU model, kernel, Python, wrk, the event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

#: Bound on the small commands that describe the machine.
PROBE_TIMEOUT_S = 10.0
#: Per-thread run time in ns; else only /proc/PID/stat's clock ticks.
_SCHEDSTAT = os.path.exists("/proc/self/schedstat")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Key = TypeVar("Key")


def parse_stat(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from a ``/proc/PID/stat`` (or ``task/TID/stat``) line."""
    # The command name (field 2) is parenthesised and may hold spaces and parentheses: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


def parse_status_switches(text: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from a ``/proc/PID/status`` text.

    Raises:
        ValueError: either line is missing.
    """
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            found[key] = int(value)
    if len(found) != 2:
        raise ValueError("status has no voluntary_ctxt_switches/nonvoluntary_ctxt_switches lines")
    return found["voluntary_ctxt_switches"], found["nonvoluntary_ctxt_switches"]


def stat_cpu_s(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, from /proc/PID/stat (clock ticks)."""
    utime, stime = parse_stat(Path(f"/proc/{pid}/stat").read_text())
    return (utime + stime) / _CLOCK_TICKS


@dataclass(frozen=True)
class Usage:
    """What a process (or several) used: CPU seconds in user and system mode, and context switches."""

    user_s: float = 0.0
    system_s: float = 0.0
    voluntary: int = 0
    involuntary: int = 0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.user_s + other.user_s, self.system_s + other.system_s,
                     self.voluntary + other.voluntary, self.involuntary + other.involuntary)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user_s - other.user_s, self.system_s - other.system_s,
                     self.voluntary - other.voluntary, self.involuntary - other.involuntary)

    def scaled_to(self, cpu_s: float) -> Usage:
        """The same switches, and ``cpu_s`` split between user and system as this usage splits its time.

        Clock ticks are coarse (10 ms) where schedstat is exact: the total is
        taken from the latter, the split from the former. With no tick counted
        the split is unknown (NaN).
        """
        ticks = self.user_s + self.system_s
        if ticks <= 0:
            return Usage(math.nan, math.nan, self.voluntary, self.involuntary)
        return Usage(cpu_s * self.user_s / ticks, cpu_s * self.system_s / ticks, self.voluntary,
                     self.involuntary)

    @classmethod
    def from_rusage(cls, rusage: resource.struct_rusage) -> Usage:
        """A child's usage from ``os.wait4`` (or ``resource.getrusage``)."""
        return cls(rusage.ru_utime, rusage.ru_stime, rusage.ru_nvcsw, rusage.ru_nivcsw)

    @classmethod
    def total(cls, usages: Iterable[Usage]) -> Usage:
        found = cls()
        for usage in usages:
            found += usage
        return found


def process_usage(pid: int) -> Usage:
    """User and system time (clock ticks, as seconds) and context switches of ``pid``, over its threads.

    From each ``/proc/PID/task/TID/stat`` (utime, stime) and ``status``
    (``voluntary_ctxt_switches``, ``nonvoluntary_ctxt_switches``). Threads
    that exited are not counted (the master and the workers run their loop in
    the main thread).

    Raises:
        OSError: the process is gone.
    """
    found = Usage()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread just exited
            base = f"/proc/{pid}/task/{task}"
            utime, stime = parse_stat(Path(f"{base}/stat").read_text())
            voluntary, involuntary = parse_status_switches(Path(f"{base}/status").read_text())
            found += Usage(utime / _CLOCK_TICKS, stime / _CLOCK_TICKS, voluntary, involuntary)
    return found


@dataclass(frozen=True)
class Reading:
    """A process's CPU time (``process_cpu_s``) and usage (``process_usage``) at one moment."""

    cpu_s: float
    usage: Usage

    @classmethod
    def of(cls, pid: int) -> Reading:
        """Raises OSError if the process is gone."""
        return cls(process_cpu_s(pid), process_usage(pid))


def readings(pids: Mapping[Key, int]) -> dict[Key, Reading]:
    """``Reading.of`` each process, by key; one that has gone reads as zero."""
    found: dict[Key, Reading] = {}
    for key, pid in pids.items():
        found[key] = Reading(0.0, Usage())
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[key] = Reading.of(pid)
    return found


def measured(before: Reading, after: Reading) -> Usage:
    """The usage between two readings: the total from schedstat, split and switches from stat and status."""
    return (after.usage - before.usage).scaled_to(after.cpu_s - before.cpu_s)


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
        return stat_cpu_s(pid)
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the thread just exited
            total_ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total_ns / 1e9


def rss_of(pids: Iterable[int]) -> dict[int, int]:
    """Each process's resident set size, by pid; one that has gone is left out."""
    sizes: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            sizes[pid] = psutil.Process(pid).memory_info().rss
    return sizes


def cpu_of(pids: Mapping[Key, int]) -> dict[Key, float]:
    """``process_cpu_s`` of each process, by key; one that has gone counts as zero."""
    times: dict[Key, float] = {}
    for key, pid in pids.items():
        times[key] = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            times[key] = process_cpu_s(pid)
    return times


def probe(command: Sequence[str]) -> str:
    """The first line a small command prints, or ``n/a`` with why."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"n/a ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg(load: tuple[float, float, float]) -> str:
    """A load average (1, 5, 15 min, as ``os.getloadavg`` gives it) for a report: ``0.12 0.34 0.56``."""
    return " ".join(f"{x:.2f}" for x in load)


def machine(wrk: str) -> list[str]:
    """The machine, as Markdown bullets: cores, CPU model, kernel, Python, wrk, the loop."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return [
        f"- cores (`nproc`): {probe(['nproc'])}; CPU: {cpu_model()}",
        f"- kernel (`uname -r`): {probe(['uname', '-r'])}",
        f"- Python: {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        f"- wrk: {probe([wrk, '--version'])}",
        f"- event loop of the master and workers (`--loop auto`): {loop}",
    ]
