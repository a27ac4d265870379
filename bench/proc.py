"""What the lab reads about processes and the machine: a process's CPU time, and what the machine is.

CPU time comes from ``/proc``: each thread's ``schedstat`` run time in
nanoseconds where the kernel has it (CONFIG_SCHED_INFO), else the clock
ticks (10 ms) of ``/proc/PID/stat``. The machine's description is a few
Markdown bullets for the reports: cores, CPU model, kernel, Python, wrk,
the event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

#: Bound on the small commands that describe the machine.
PROBE_TIMEOUT_S = 10.0
#: Per-thread run time in ns; else only /proc/PID/stat's clock ticks.
_SCHEDSTAT = os.path.exists("/proc/self/schedstat")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Key = TypeVar("Key")


def stat_cpu_s(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, from /proc/PID/stat (clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is parenthesised and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS


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
