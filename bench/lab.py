"""The benchmark lab: every policy under every workload, each on a fresh dispatcher.

    .venv/bin/python -m bench.lab                  # the full run of `make bench` (about 6 minutes)
    .venv/bin/python -m bench.lab --quick          # 2 s runs, 1 repeat: about a minute
    .venv/bin/python -m bench.lab --workloads W1,W4 --policies round-robin,shared --repeats 5
    .venv/bin/python -m bench.lab --control-plane  # what pings and metrics cost the hand-off
    .venv/bin/python -m bench.lab --profile        # py-spy on the master under W1

The matrix is the policies (round-robin, shared, reuseport) times the
workloads:

- W1: a new connection per request (``wrk -H 'Connection: close'``), the
  trivial handler (``examples.hello:handler``), 2 workers;
- W2: keep-alive (wrk without the header), the trivial handler, 2 workers
  (``--locality``: ``bench.apps:locality``, the same answer, counting the
  requests a worker served on the CPU that received them);
- W3: 2 ms of CPU per request (``bench.apps:cpu``), a new connection per
  request, 16 clients, 2 workers;
- W4: a burst: 400 connections opened at once (``bench.burst``) to a handler
  that waits 1 s (``bench.apps:slow``), one request each, 8 workers.

Every cell runs on a fresh ``python -m dispatcher`` bound to 127.0.0.1
port 0, in alternating order (for each repeat, for each workload: each
policy in turn), ``--repeats`` times (default 3); tables give the median and
min-max. Figures per cell: requests/s and p50/p99 latency (wrk
``--latency``; for W4 the burst client's), each worker's share of the
connections from the dispatcher's own ``handled`` counters (control socket
``status`` before and after), Jain's fairness index over those counts
((sum x)^2 / (n sum x^2): 1 is even, 1/n is one worker taking all), the
busiest worker's share, the master's CPU time per connection (its
user + system time during the load, all threads, from /proc, divided by the
connections handled), the RSS of the master and workers (from ``status``)
and errors (wrk socket errors and non-2xx; W4: failed connections).

Then the rolling reload: for each policy, 4 workers of the trivial handler
(``examples.hello:handler``) under 4
client threads, each a new connection per request; ``reload`` through the
control socket; the report gives how long it took, the requests served
during it and the ones that failed (the goal is none).

Output: the table is printed; the report (table, headline figures, W4 per
worker, reload, machine, exact commands, every run) is written to
``bench/results/lab-<UTC timestamp>.md`` with PNG plots beside it
(``-throughput``, ``-latency``, ``-w4-balance``), the figures as ``.json``,
and wrk's output and the server logs as ``.raw`` (not committed). Unless
``--quick`` or ``--no-latest``, copies go to fixed names for the README:
``bench/results/latest.md``, ``throughput.png``, ``latency.png``,
``w4-balance.png``.

Two modes run instead of the matrix (``--duration``, ``--connections`` and
``--threads`` apply):

- ``--control-plane`` (``bench.controlplane``): W1 under round-robin,
  pings off and no control socket against pings every second and /metrics
  scraped every second, ``--repeats`` pairs; the goal is control at most
  2 % slower. Report: ``bench/results/control-<UTC timestamp>.md``.
- ``--profile`` (``bench.profile``): one W1 round-robin run with py-spy
  sampling the master (``--profile-mode native|python|gil``); the top
  functions by own time, and their share of the time not spent waiting.
  py-spy is not a dependency: ``.venv/bin/pip install py-spy``. Report:
  ``bench/results/profile-<UTC timestamp>.md``.

Every server is ``bench.server.Server``: port 0, readiness and the port
from its control socket (``ready``). Only 127.0.0.1 is ever targeted.
Every wait has a time limit, and every process started is stopped by PID
when its run ends, on errors and on Ctrl-C (or TERM) too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench import cli, controlplane, plots, proc, profile, report, wrk
from bench.matrix import (
    POLICIES,
    RUN_ERRORS,
    WORKLOADS,
    Cell,
    Settings,
    Workload,
    load_description,
    run_cell,
    workloads,
)
from bench.rolling import LOAD_AFTER_S, LOAD_BEFORE_S, RELOAD_TIMEOUT_S, ReloadRun, run_reload
from bench.server import ROOT
from bench.stats import DASH

#: The apps of the rolling-reload run: the trivial handler the matrix uses, and the lab's own.
RELOAD_APPS = ("examples.hello:handler",)
#: What a cell costs beyond its load, for the time estimate: start, settle the counters, stop.
CELL_OVERHEAD_S = 2.5
BURST_CELL_S = 4.5
RELOAD_RUN_S = 4.0
MICRO_COMMAND = (
    ".venv/bin/python -m pytest -q -p no:cacheprovider bench -m 'bench or not bench' "
    "--benchmark-only --benchmark-autosave"
)
#: A 1-minute load average above this per core before the start earns a warning.
BUSY_LOAD_PER_CORE = 0.5

Result = TypeVar("Result")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="2 s runs, 1 repeat, fixed-name copies left alone (unless given otherwise)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; --quick 2)")
    parser.add_argument("--repeats", type=int, help="runs per cell and per reload (default 3; --quick 1)")
    parser.add_argument("--policies", type=lambda t: cli.choices(t, POLICIES, "--policies"),
                        default=list(POLICIES),
                        help=f"comma-separated, in this order (default {','.join(POLICIES)})")
    parser.add_argument("--workloads", type=lambda t: cli.choices(t, WORKLOADS, "--workloads"),
                        default=list(WORKLOADS), help=f"comma-separated (default {','.join(WORKLOADS)})")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c for W1-W3 (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default %(default)s)")
    parser.add_argument("--burst-connections", type=int, default=400,
                        help="W4: connections opened at once (default %(default)s)")
    parser.add_argument("--burst-wait-ms", type=int, default=1000,
                        help="W4: how long the handler waits (default %(default)s)")
    parser.add_argument("--burst-workers", type=int, default=8, help="W4: workers (default %(default)s)")
    parser.add_argument("--round-robin-args", type=shlex.split, default=[], metavar="ARGS",
                        help="more dispatcher arguments for the round-robin cells, one quoted string "
                        "(e.g. '--window 1 --master-sched normal' for Node's behaviour)")
    parser.add_argument("--locality", action="store_true",
                        help="W2 serves with bench.apps:locality, which also counts the requests served on "
                        "the CPU that received them (on loopback, the wrk thread's); adds a 'same CPU %%' "
                        "column")
    parser.add_argument("--no-reload", dest="reload", action="store_false", help="skip the rolling reload")
    parser.add_argument("--reload-policies", type=lambda t: cli.choices(t, POLICIES, "--reload-policies"),
                        help="policies of the rolling reload (default: --policies)")
    parser.add_argument("--reload-workers", type=int, default=4, help="default %(default)s")
    parser.add_argument("--reload-clients", type=int, default=4, help="default %(default)s")
    parser.add_argument("--latest", action=argparse.BooleanOptionalAction, default=None,
                        help="copy the report and plots to the fixed names (default: yes, unless --quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder for the results (default bench/results)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--control-plane", action="store_true",
                       help="instead of the matrix: W1 under round-robin with pings off and no control "
                       "socket (plain) against pings every 1 s and /metrics scraped every second (control), "
                       "alternately, --repeats times; report in bench/results/control-STAMP.md")
    modes.add_argument("--profile", action="store_true",
                       help="instead of the matrix: one W1 round-robin run with py-spy sampling the master "
                       "(py-spy is not a dependency: pip install py-spy); report in "
                       "bench/results/profile-STAMP.md")
    parser.add_argument("--profile-rate", type=int, default=250,
                        help="--profile: py-spy samples/s (default %(default)s)")
    parser.add_argument("--profile-mode", choices=profile.MODES, default="native",
                        help="--profile: native: C frames and syscalls too; python: Python frames only; gil: "
                        "only samples holding the GIL, i.e. Python work (default %(default)s)")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="--profile: functions to list (default %(default)s)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.latest = (not args.quick) if args.latest is None else args.latest
    args.reload_policies = args.reload_policies or args.policies
    for name in ("duration", "repeats", "connections", "threads", "burst_connections", "burst_workers",
                 "reload_workers", "reload_clients", "profile_rate", "profile_top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections (wrk needs a connection per thread)")
    if args.burst_wait_ms < 0:
        parser.error("--burst-wait-ms must not be negative")
    return args


def _cell_line(cell: Cell, elapsed_s: float) -> str:
    errors = f"{cell.errors} ({cell.error_detail})" if cell.error_detail else str(cell.errors)
    return (
        f"{cell.requests_per_s:.0f} req/s, p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, "
        f"Jain {cell.jain:.3f}, master {cell.master_us_per_conn:.1f} µs/conn, errors {errors}"
        f"{'' if cell.settled else ', counters NOT settled'} ({elapsed_s:.1f} s)"
    )


@dataclasses.dataclass
class Results:
    cells: list[Cell] = dataclasses.field(default_factory=list)
    reloads: list[ReloadRun] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    load_at_start: tuple[float, float, float] = dataclasses.field(default_factory=os.getloadavg)


def _attempt(results: Results, what: str, run: Callable[[], Result]) -> Result | None:
    """``run()``; a failure the lab can go on after is printed, noted in ``results`` and gives None."""
    try:
        return run()
    except RUN_ERRORS as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        results.failures.append(f"{what}: {type(exc).__name__}: {exc}")
        return None


def run_all(args: argparse.Namespace, settings: Settings, chosen: list[Workload], work_dir: Path,
            results: Results) -> None:
    """Run the matrix, then the reloads, appending to ``results`` as they finish."""
    steps = [(r, w, p) for r in range(args.repeats) for w in chosen for p in args.policies]
    reloads = (
        [(r, a, p) for r in range(args.repeats) for a in RELOAD_APPS for p in args.reload_policies]
        if args.reload else []
    )
    estimate = sum(BURST_CELL_S if w.burst else args.duration + CELL_OVERHEAD_S for _, w, _ in steps)
    estimate += RELOAD_RUN_S * len(reloads)
    print(f"{len(steps)} cells and {len(reloads)} reload runs; about {estimate / 60:.1f} min", flush=True)
    total = len(steps) + len(reloads)
    for n, (repeat, workload, policy) in enumerate(steps, 1):
        print(f"[{n}/{total}] {workload.key} {policy} (repeat {repeat + 1}) ...", end=" ", flush=True)
        started = time.monotonic()
        cell = _attempt(results, f"{workload.key} {policy} repeat {repeat + 1}",
                        functools.partial(run_cell, settings, workload, policy, repeat, work_dir))
        if cell is None:
            continue
        results.cells.append(cell)
        print(_cell_line(cell, time.monotonic() - started), flush=True)
    for n, (repeat, app, policy) in enumerate(reloads, len(steps) + 1):
        print(f"[{n}/{total}] reload {app} {policy} (repeat {repeat + 1}) ...", end=" ", flush=True)
        run = _attempt(results, f"reload {app} {policy} repeat {repeat + 1}",
                       functools.partial(run_reload, policy, args.reload_workers, args.reload_clients,
                                         app=app))
        if run is None:
            continue
        results.reloads.append(run)
        failures = ", ".join(f"{k} x{v}" for k, v in run.failures.items())
        print(f"{run.reload_s:.2f} s, {run.served_during} served during it, {run.failed_during} failed "
              f"({run.failed_total} in the whole run{': ' + failures if failures else ''}), "
              f"{run.replaced}/{run.workers} replaced; {run.answer}", flush=True)


def _about(args: argparse.Namespace, settings: Settings) -> str:
    return (
        f"{args.repeats} repeat(s); in each, for each workload, each policy in turn "
        f"({', '.join(args.policies)}), a fresh dispatcher per run; wrk runs {args.duration} s "
        f"(-t{settings.threads} -c{settings.connections}). Cells: median (min{DASH}max) over the "
        "repeats. Per-worker share and Jain's index ((sum x)^2 / (n sum x^2)) are over the connections "
        "each worker handled, from the dispatcher's `handled` counters (control socket `status` before "
        "and after; on W2 that is the 16 keep-alive connections, not requests). master µs/conn = the "
        "master's CPU time (user + system, /proc/PID/task/*/schedstat) during the load / connections "
        "handled; with shared and reuseport the master accepts nothing, so its figure is pings and "
        "stats, and on W2 those are spread over a few long connections (the master's total is in the "
        "runs table). RSS from `status` after the load. errors = wrk socket errors + non-2xx (W4: failed "
        "connections), summed over the runs."
        + (" same CPU % (W2, `--locality`): of the requests the workers served, those served on the CPU "
           "that received them (the connection's SO_INCOMING_CPU, on loopback the CPU of the wrk thread "
           "that sent the request, equal to the worker's sched_getcpu())." if settings.locality else "")
    )


def _commands(args: argparse.Namespace, settings: Settings, chosen: Sequence[Workload]) -> list[str]:
    python = report.python()
    lines = ["```", "# the lab itself", shlex.join([python, "-m", "bench.lab", *sys.argv[1:]]), ""]
    for w in chosen:
        server = report.server_command("--app", w.app, "--policy", "POLICY", workers=w.workers)
        lines += [f"# {w.key}: {w.title}", server]
        if settings.round_robin_args:
            lines.append(f"#   round-robin adds: {shlex.join(settings.round_robin_args)}")
        lines += [load_description(settings, w), ""]
    if args.reload:
        for app in RELOAD_APPS:
            server = report.server_command("--app", app, "--policy", "POLICY", workers=args.reload_workers)
            lines += [f"# rolling reload ({app})", server]
        lines += [
            f"#   load: bench.load.Load(PORT, clients={args.reload_clients}, path='/'): threads, each a new "
            "connection per request (GET / with Connection: close, read to EOF, 200 expected)",
            f"#   after {LOAD_BEFORE_S:g} s of load: dispatcher.ctl.request('DIR/N.sock', 'reload', "
            f"timeout_s={RELOAD_TIMEOUT_S:g}), i.e. `{python} -m dispatcher ctl --control DIR/ctl.sock "
            f"reload`; then {LOAD_AFTER_S:g} s more",
            "",
        ]
    lines += ["# micro-benchmarks (make bench runs them after the lab)", MICRO_COMMAND, "```"]
    return lines


def write_report(args: argparse.Namespace, settings: Settings, chosen: list[Workload], results: Results,
                 stamp: str, elapsed_s: float) -> tuple[str, Path]:
    """Write the report, plots, JSON and raw logs; return (the summary table, the report path)."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"lab-{stamp}"
    cells = results.cells
    ran = [w for w in chosen if any(c.workload == w.key for c in cells)]
    subtitle = f"{proc.cpu_model()}, {proc.probe(['nproc'])} cores; {args.repeats} repeat(s)"
    pngs: dict[str, Path] = {}
    if ran:
        pngs["throughput"] = Path(f"{base}-throughput.png")
        plots.throughput(cells, ran, args.policies, pngs["throughput"], subtitle)
        pngs["latency"] = Path(f"{base}-latency.png")
        plots.latency(cells, ran, args.policies, pngs["latency"], subtitle)
    w4 = next((w for w in ran if w.burst), None)
    if w4 is not None:
        pngs["w4-balance"] = Path(f"{base}-w4-balance.png")
        plots.w4_balance(cells, w4, args.policies, pngs["w4-balance"], subtitle)

    table = report.summary_table(cells, ran, args.policies)

    def body(links: dict[str, str]) -> str:
        lines = [
            f"# Benchmark lab, {stamp}",
            "",
            _about(args, settings),
            "",
            table,
            "",
            *report.headline(cells, results.reloads),
            "",
        ]
        lines += [f"![{name}]({link})" for name, link in links.items() if name != "w4-balance"]
        if w4 is not None:
            lines += [
                "",
                f"## {w4.key}: connections per worker",
                "",
                f"{w4.title}; {settings.burst_workers} workers; one request per connection; counts by worker "
                "id (slot). The client counts from the answers (each names its worker); both should agree.",
                "",
                report.w4_table(cells, args.policies),
                "",
            ]
            if "w4-balance" in links:
                lines.append(f"![w4-balance]({links['w4-balance']})")
        if results.reloads:
            lines += [
                "",
                "## Rolling reload",
                "",
                f"{args.reload_workers} workers, {args.reload_clients} client threads (a new connection per "
                f"request); `reload` is sent after {LOAD_BEFORE_S:g} s of load and the load goes on "
                f"{LOAD_AFTER_S:g} s after the answer. \"during\" is between sending `reload` and its answer "
                f"(the master answers once every worker was replaced). Medians (min{DASH}max) over the "
                "repeats; failures summed.",
                "",
                report.reload_table(results.reloads),
            ]
        if results.failures:
            lines += ["", "## Runs that failed", "", *(f"- {f}" for f in results.failures)]
        lines += [
            "",
            "## Machine",
            "",
            *proc.machine(settings.wrk),
            f"- lab wall time: {elapsed_s / 60:.1f} min; load average (1, 5, 15 min) at the start "
            f"{proc.loadavg(results.load_at_start)}, at the end {proc.loadavg(os.getloadavg())} (other work "
            "on the machine shows here)",
            "",
            "## Commands",
            "",
            "From the repository root. DIR is a private temporary directory, PORT the one "
            f"`{report.python()} -m dispatcher ctl --control DIR/ctl.sock ready` reports (it answers once "
            "every worker is ready), POLICY each policy in turn.",
            "",
            *_commands(args, settings, chosen),
            "",
            "Micro-benchmarks compared with the previous saved run: `.venv/bin/python -m pytest -q -p "
            "no:cacheprovider bench -m 'bench or not bench' --benchmark-only --benchmark-compare` "
            "(saved runs are in `.benchmarks/`; `--benchmark-compare=0001` picks one, "
            "`--benchmark-compare-fail=mean:10%` fails on a regression).",
            "",
            "## Runs",
            "",
            report.runs_table(cells),
        ]
        return "\n".join(lines) + "\n"

    report_path = Path(f"{base}.md")
    report_path.write_text(body({name: path.name for name, path in pngs.items()}))
    Path(f"{base}.json").write_text(json.dumps(_json(args, results), indent=1) + "\n")
    with Path(f"{base}.raw").open("w") as raw:
        for n, c in enumerate(cells, 1):
            raw.write(f"===== run {n}: {c.workload} {c.policy} repeat {c.repeat + 1}, port {c.port} =====\n")
            raw.write(c.load_output)
            raw.write("----- server log -----\n")
            raw.write(c.server_log)
        for r in results.reloads:
            raw.write(f"===== reload {r.app} {r.policy}: {r.answer} =====\n")
            raw.write(r.server_log)
    if args.latest:
        for name, path in pngs.items():
            shutil.copyfile(path, out / f"{name}.png")
        (out / "latest.md").write_text(body({name: f"{name}.png" for name in pngs}))
    return table, report_path


def _json(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    return {
        "argv": sys.argv,
        "policies": args.policies,
        "cells": [report.without_logs(c) for c in results.cells],
        "reloads": [report.without_logs(r) for r in results.reloads],
        "failures": results.failures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_path = wrk.find()
    if wrk_path is None:
        return 2
    sampler = None
    if args.profile:
        py_spy = profile.find_py_spy()
        if py_spy is None:
            return 2
        sampler = profile.Sampler(py_spy, args.profile_rate, args.profile_mode, args.profile_top)
    settings = Settings(
        wrk=wrk_path, duration_s=args.duration, connections=args.connections, threads=args.threads,
        burst_connections=args.burst_connections, burst_wait_ms=args.burst_wait_ms,
        burst_workers=args.burst_workers, round_robin_args=tuple(args.round_robin_args),
        locality=args.locality,
    )
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > BUSY_LOAD_PER_CORE * cores:
        print(f"warning: the machine is busy (load average {proc.loadavg(os.getloadavg())} on {cores} "
              "cores): the figures will be noisy", file=sys.stderr)
    stamp = report.timestamp()
    # TERM and HUP unwind like Ctrl-C, so the current run's server is stopped too.
    with cli.interrupting_signals():
        try:
            if args.control_plane:
                return controlplane.run(settings, args.repeats, args.out, stamp)
            if sampler is not None:
                return profile.run(settings, sampler, args.out, stamp)
            return run_lab(args, settings, stamp)
        except KeyboardInterrupt as exc:
            print(f"\ninterrupted ({exc or 'Ctrl-C'}); nothing written", file=sys.stderr)
            return 130


def run_lab(args: argparse.Namespace, settings: Settings, stamp: str) -> int:
    """The matrix and the reloads: run, write the report, print the table; return the exit status."""
    chosen = [w for key, w in workloads(settings).items() if key in args.workloads]
    results = Results()
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="dispatcher-lab-"))  # 0700
    try:
        run_all(args, settings, chosen, work_dir, results)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if not results.cells and not results.reloads:
        print("every run failed; nothing written", file=sys.stderr)
        return 1
    table, path = write_report(args, settings, chosen, results, stamp, time.monotonic() - started)
    print()
    print(table)
    print()
    print("\n".join(report.headline(results.cells, results.reloads)))
    print(f"\nwrote {report.relative(path)} (and .json, .raw, plots)"
          + (f"; latest copies in {report.relative(args.out)}/" if args.latest else ""))
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
