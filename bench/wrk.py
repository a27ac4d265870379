"""wrk, the HTTP load of W1-W3, the control-plane runs and the profile: its command, a run, its output.

``run`` starts wrk and waits for it, bounded by the run's duration plus
``SLACK_S``; something else can go on while it runs (``alongside``: the
metrics scraper, py-spy). ``run_measured`` also gives what wrk itself used
(its rusage from ``os.wait4``: user and system time, context switches). ``parse`` reads the figures out of
``wrk --latency`` output.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from bench.proc import Usage
from bench.server import HOST

#: Slack given to wrk beyond its duration before it is killed.
SLACK_S = 30.0
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


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

    @property
    def error_detail(self) -> str:
        """The errors by kind (``connect 3, non-2xx 1``); empty if none."""
        details = [f"{kind} {n}" for kind, n in self.socket_errors.items() if n]
        if self.non_2xx:
            details.append(f"non-2xx {self.non_2xx}")
        return ", ".join(details)


def find() -> str | None:
    """wrk's path, or None after saying on stderr why the lab cannot run here."""
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc, SCM_RIGHTS hand-off)", file=sys.stderr)
        return None
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found on PATH (apt-get install wrk)", file=sys.stderr)
    return wrk


def command(wrk: str, port: int | str, path: str, duration_s: float, connections: int, threads: int,
            close: bool = True, script: str | None = None) -> list[str]:
    """wrk against 127.0.0.1:``port``; ``close``: ``Connection: close`` (a new connection per request).

    ``script``: a Lua script for ``-s`` (``bench.worker_counts.LUA``).
    """
    return [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
        *(["-H", "Connection: close"] if close else []), *(["-s", script] if script else []), "--latency",
        f"http://{HOST}:{port}{path}",
    ]


def run(line: list[str], duration_s: float,
        alongside: contextlib.AbstractContextManager[object] | None = None) -> tuple[WrkResult, str]:
    """Run wrk (``line``) to its end, with ``alongside`` entered meanwhile; return its figures and output.

    Raises:
        RuntimeError: wrk failed.
        subprocess.TimeoutExpired: it ran ``SLACK_S`` past its duration (it is killed).
        ValueError: its output lacks a figure.
    """
    result, output, _ = run_measured(line, duration_s, alongside)
    return result, output


def run_measured(line: list[str], duration_s: float,
                 alongside: contextlib.AbstractContextManager[object] | None = None
                 ) -> tuple[WrkResult, str, Usage]:
    """``run``, and what wrk itself used: its ``rusage`` (user, system time, context switches).

    wrk is this process's child (``taskset`` execs it, so a pinned line is
    the same process): it is reaped with ``os.wait4``, which gives its
    rusage, once its pidfd says it has exited (bounded by the duration plus
    ``SLACK_S``). Its output goes to temporary files meanwhile.

    Raises:
        as ``run``.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(line, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            with alongside or contextlib.nullcontext():
                usage = _reap(proc, duration_s + SLACK_S)
        finally:
            if proc.returncode is None:  # late, or interrupted
                proc.kill()
                proc.wait(5.0)
        text = ""
        for file in (out, err):
            file.seek(0)
            text += file.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text}")
    return parse(text), text, usage


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> Usage:
    """Wait up to ``timeout`` for ``proc`` to exit, reap it with ``os.wait4``; its rusage.

    Sets ``proc.returncode``, as ``Popen.wait`` would.

    Raises:
        subprocess.TimeoutExpired: it is still running (it is left to the caller to kill).
    """
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Usage.from_rusage(rusage)


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse(output: str) -> WrkResult:
    """Read the figures out of ``wrk --latency`` output.

    Raises:
        ValueError: a figure that is always printed is missing.
    """

    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
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
