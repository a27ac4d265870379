"""Where the master's time goes (``python -m bench.lab --profile``): py-spy sampling it under W1.

One round-robin run of W1 (``examples.hello:handler``, 2 workers, a new
connection per request) with py-spy (``pip install py-spy``; not a
dependency of the project) sampling the master from shortly after wrk
starts to a second before it ends. The report lists the top functions by
own time; py-spy counts a thread as active while it is runnable, so on a
busy machine much of the event loop's epoll wait is waiting for a CPU after
a wake-up, not work, and the "of busy" column leaves those samples out.
Modes: ``native`` (C frames and syscalls too), ``python`` (Python frames
only), ``gil`` (only samples holding the GIL: Python work).

Written to ``bench/results/profile-<UTC timestamp>.md``; py-spy's samples,
wrk's output and the server log go beside it as ``.raw`` (not committed).
"""

from __future__ import annotations

import collections
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import report, wrk
from bench.matrix import RUN_ERRORS, Settings, server_args, workloads, wrk_command
from bench.proc import machine, process_cpu_s
from bench.server import Server

MODES = ("native", "python", "gil")
#: py-spy starts this long after wrk and stops a second before it ends.
DELAY_S = 0.5
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

    def command(self, pid: int | str, duration_s: int, out: Path | str) -> list[str]:
        mode = [] if self.mode == "python" else [f"--{self.mode}"]
        return [
            self.py_spy, "record", "--format", "raw", "--rate", str(self.rate), *mode,
            "--duration", str(max(1, duration_s - 1)), "--pid", str(pid), "--output", str(out),
        ]

    @contextlib.contextmanager
    def sampling(self, pid: int, duration_s: int, out: Path) -> Iterator[None]:
        """py-spy on ``pid`` while the block runs (from ``DELAY_S`` in: under full load only)."""
        time.sleep(DELAY_S)
        spy = subprocess.Popen(self.command(pid, duration_s, out), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            yield
            output, _ = spy.communicate(timeout=duration_s + wrk.SLACK_S)
            if spy.returncode != 0:
                self.notes.append(f"py-spy exited with {spy.returncode}: {output.strip()}")
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5.0)


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


def profile_section(raw: str, limit: int, mode: str) -> str:
    """The top ``limit`` functions of py-spy's ``raw`` samples, as Markdown."""
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


def run(settings: Settings, sampler: Sampler, out: Path, stamp: str) -> int:
    """The profiled run: print the top functions, write the report; return the exit status."""
    w1 = workloads(settings)["W1"]
    out.mkdir(parents=True, exist_ok=True)
    samples = out / f"profile-{stamp}-py-spy.raw"
    print(f"round-robin W1 with py-spy ({sampler.mode}) on the master ...", end=" ", flush=True)
    try:
        with Server(*server_args(settings, w1, "round-robin"), workers=w1.workers) as server:
            before = process_cpu_s(server.pid)
            result, output = wrk.run(wrk_command(settings, w1, server.port), settings.duration_s,
                                     sampler.sampling(server.pid, settings.duration_s, samples))
            master_s = process_cpu_s(server.pid) - before
    except RUN_ERRORS as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    master_us = master_s * 1e6 / result.requests if result.requests else float("nan")
    print(f"{result.requests_per_s:.0f} req/s, master {master_us:.1f} µs/conn, errors {result.errors}")
    try:
        section = profile_section(samples.read_text(), sampler.top, sampler.mode)
    except OSError as exc:
        section = f"py-spy wrote no profile ({exc})."
    section += "".join(f"\n\nNote: {note}" for note in sampler.notes)
    python = report.python()
    lines = [
        f"# Master profile, {stamp}",
        "",
        f"Round-robin on W1 ({w1.title}), {settings.duration_s} s of wrk (-t{settings.threads} "
        f"-c{settings.connections}), py-spy sampling the master at {sampler.rate}/s from {DELAY_S:g} s in. "
        f"{result.requests_per_s:.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
        f"master {master_us:.1f} µs/conn (with py-spy attached), errors {result.errors}.",
        "",
        section,
        "",
        "## Machine",
        "",
        *machine(settings.wrk),
        "",
        "## Commands",
        "",
        "From the repository root. PORT is the one `ctl ready` reports, MASTER_PID the master's.",
        "",
        "```",
        report.server_command(*server_args(settings, w1, "round-robin"), workers=w1.workers),
        shlex.join(wrk_command(settings, w1, "PORT")),
        shlex.join(sampler.command("MASTER_PID", settings.duration_s, samples.name)),
        "```",
        "",
        f"Lab: `{shlex.join([python, '-m', 'bench.lab', *sys.argv[1:]])}`",
    ]
    path = out / f"profile-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".raw").write_text(f"{output}----- server log -----\n{server.log}")
    print(f"\n{section}\n\nwrote {report.relative(path)} (and .raw files)")
    return 0
