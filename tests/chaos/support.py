"""What every scenario of the fault suite shares: its targets, its row in the table, the table itself.

A scenario checks its figures against targets (``Targets.require``). It
then records one row (``Row``: the scenario, what was done, the figure, the
verdict) and prints it as one line; a missed target fails the test, in the
full run (``-m chaos``) and in the short variant the normal suite runs alike.
"""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from bench.load import ask
from bench.proc import cpu_model, probe
from bench.server import ROOT, Server
from dispatcher.ctl import CtlError
from dispatcher.snapshot import Snapshot

#: Where ``make chaos`` writes the table (the README holds a copy).
TABLE = ROOT / "bench" / "results" / "chaos.md"

#: The lines of a worker that found itself at its fd limit (its pid the first group), and of a master
#: that could not start a worker.
WORKER_AT_LIMIT = re.compile(r"\[(\d+)\] \[worker \d+\] ERROR out of file descriptors")
SPAWN_FAILED = re.compile(r"\[master\] ERROR worker \d+ could not be started")


@dataclass
class Targets:
    """The targets of one scenario, each met or missed."""

    #: (target, met)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def require(self, met: bool, target: str) -> None:
        """A target the dispatcher must meet."""
        self.checks.append((target, bool(met)))

    @property
    def missed(self) -> list[str]:
        return [target for target, met in self.checks if not met]

    @property
    def verdict(self) -> str:
        missed = self.missed
        return "meets its targets" if not missed else "**misses**: " + "; ".join(missed)


@dataclass(frozen=True)
class Row:
    scenario: str
    done: str
    figure: str
    verdict: str
    full: bool


class Recorder:
    """``record(...)``: print the scenario's line, keep its row, then enforce its targets."""

    def __init__(self, rows: list[Row], full: bool) -> None:
        self._rows = rows
        self.full = full

    def __call__(self, scenario: str, done: str, figure: str, targets: Targets) -> None:
        row = Row(scenario, done, figure, targets.verdict, self.full)
        self._rows.append(row)
        variant = "full" if self.full else "short"
        print(f"\nCHAOS {scenario} ({variant}): {figure} -> {row.verdict}", flush=True)
        if targets.missed:
            pytest.fail(f"{scenario}: missed {'; '.join(targets.missed)}\nfigures: {figure}", pytrace=False)


def full_and_short(full: object, short: object, timeout_s: int, name: str = "size") -> pytest.MarkDecorator:
    """Run a scenario at two sizes: ``full`` in ``make chaos`` only (marker chaos, its own timeout), ``short``
    in every ``make test``, against the same targets."""
    return pytest.mark.parametrize(name, [
        pytest.param(full, id="full", marks=[pytest.mark.chaos, pytest.mark.timeout(timeout_s)]),
        pytest.param(short, id="short"),
    ])


def machine() -> list[str]:
    loop = "uvloop" if _has_uvloop() else "asyncio"
    return [
        f"- cores (`nproc`): {probe(['nproc'])}; CPU: {cpu_model()}",
        f"- kernel (`uname -r`): {probe(['uname', '-r'])}; Python {platform.python_version()}; "
        f"event loop {loop}",
    ]


def _has_uvloop() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Row]) -> str:
    lines = ["| scenario | what was done | figure | verdict |", "| --- | --- | --- | --- |"]
    for row in sorted(rows, key=lambda r: r.scenario):
        cells = (row.scenario, row.done, row.figure, row.verdict)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Row], took_s: float, path: Path = TABLE) -> None:
    """The report of a full run: when, where, how long, and the table."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    missed = sum(1 for r in rows if r.verdict.startswith("**misses"))
    text = "\n".join([
        "# Fault suite: the latest run",
        "",
        f"`make chaos` (`pytest -m chaos`), {when}, {took_s / 60:.1f} minutes in all; "
        f"{len(rows)} scenario(s), {missed} missing a target.",
        "",
        *machine(),
        "",
        render_table(rows),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# What the scenarios measure with


def ready_pids(server: Server) -> list[int] | None:
    """The pids of the workers ready now (``ctl status``), or None if the status did not answer."""
    try:
        status = server.status()
    except CtlError:
        return None
    return [w["pid"] for w in status["workers"] if w["state"] == "ready" and w["pid"]]


class StatusProbe:
    """``ctl status``, asked again and again: how often it was answered, and why not when it was not.

    Each ``probe()`` makes up to ``attempts`` tries (bounded retries: a
    connection the master could not accept at its fd limit is one failed try).
    """

    def __init__(self, server: Server, attempts: int = 3, timeout_s: float = 5.0) -> None:
        self.server = server
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.probes = self.answered = 0
        self.slowest_s = 0.0
        #: Failed tries by why (the first words of the error).
        self.failures: collections.Counter[str] = collections.Counter()

    def probe(self) -> Snapshot | None:
        """The status, or None if no try was answered."""
        self.probes += 1
        started = time.monotonic()
        for _ in range(self.attempts):
            try:
                snapshot: Snapshot = self.server.request("status", timeout_s=self.timeout_s)
            except CtlError as exc:
                self.failures[_why(str(exc))] += 1
                continue
            self.answered += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            return snapshot
        return None

    def describe(self) -> str:
        tries = f"; failed tries: {dict(self.failures)}" if self.failures else ""
        return f"ctl status answered {self.answered} of {self.probes} (slowest {self.slowest_s:.2f} s{tries})"


def _why(error: str) -> str:
    """The gist of a ``CtlError``: ``connection reset``, ``internal error: EMFILE``, ..."""
    if error.startswith("internal error"):
        return "internal error: EMFILE" if "Errno 24" in error else "internal error"
    gists = {"Connection reset": "connection reset", "without answering": "closed without an answer",
             "no answer": "no answer in time", "refused": "connection refused",
             "Too many open files": "EMFILE"}
    return next((gist for words, gist in gists.items() if words in error), error[:60])


def served_within(port: int, bound_s: float, timeout_s: float = 5.0) -> float | None:
    """How long until a request to ``port`` is answered (asked again until then); None: not in ``bound_s``."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        try:
            if ask(port, timeout=min(timeout_s, max(0.1, bound_s - (time.monotonic() - started)))):
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.05)  # a refused or reset attempt comes back at once: asked again, bounded
    return None


def count_lines(server: Server, pattern: re.Pattern[str], first: int = 0) -> int:
    """Lines of the server's log from line ``first`` on that match ``pattern`` (read to now first)."""
    server.sync_log()
    return sum(1 for line in server.lines[first:] if pattern.search(line))


def count_processes(server: Server, pattern: re.Pattern[str]) -> int:
    """How many processes (``pattern``'s first group: the pid) wrote a line of the log that matches it."""
    server.sync_log()
    return len({match.group(1) for line in server.lines if (match := pattern.search(line))})


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_random(pids: Sequence[int], rng: random.Random) -> int | None:
    """SIGKILL one of ``pids``, chosen at random; return it, or None if none was left to kill."""
    for pid in rng.sample(list(pids), len(pids)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


class Sampler:
    """A thread that calls ``sample()`` every ``interval_s`` and keeps (time, result); bounded in time."""

    def __init__(self, sample: Callable[[], object], interval_s: float, max_s: float) -> None:
        self.samples: list[tuple[float, object]] = []
        self._sample = sample
        self._interval_s = interval_s
        self._max_s = max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            self.samples.append((started, self._sample()))
            self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10.0)


def seconds(value: float | None, bound: float) -> str:
    """``1.23 s``, or ``over 30 s`` for None (it did not happen within ``bound``)."""
    return f"{value:.2f} s" if value is not None else f"over {bound:g} s"
