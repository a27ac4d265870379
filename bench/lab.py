"""The benchmark lab: every policy under every workload and CPU layout, each on a fresh dispatcher.

    .venv/bin/python -m bench.lab                  # the full run of `make bench`
    .venv/bin/python -m bench.lab --quick          # 2 s runs, 1 repeat
    .venv/bin/python -m bench.lab --workloads W0,W1 --policies round-robin,shared --repeats 5
    .venv/bin/python -m bench.lab --workloads W0 --layouts pinned --no-reload
    .venv/bin/python -m bench.lab --control-plane  # what pings and metrics cost the hand-off
    .venv/bin/python -m bench.lab --profile        # py-spy and perf on the master and workers under W0

The matrix is the policies (round-robin, shared, reuseport) times the
workloads:

- W0: a new connection per request (``wrk -t2 -c50 -H 'Connection: close'``:
  50 connections, ``--w0-connections``), the lightest handler
  (``bench.apps:light``: readuntil the request head, a fixed 200, close),
  2 workers: what is left of a connection's cost is the hand-off, the event
  loop and the kernel. Every W0 cell first runs ``--warmup`` seconds (default
  5: Node's cluster needs about 4 to reach its pace) of the same load, not
  measured. W0 also runs on Node's ``cluster``
  (``bench/node_cluster.js``, the same handler): ``node round-robin``
  (``cluster.SCHED_RR``: the primary accepts and hands each connection over
  IPC) and ``node shared`` (``cluster.SCHED_NONE``), when ``node`` is on
  PATH (``--no-node``: not);
- W1: a new connection per request (``wrk -H 'Connection: close'``), the
  trivial handler (``examples.hello:handler``), 2 workers;
- W2: keep-alive (wrk without the header), the trivial handler, 2 workers
  (``--locality``: ``bench.apps:locality``, the same answer, counting the
  requests a worker served on the CPU that received them);
- W3: 2 ms of CPU per request (``bench.apps:cpu``), a new connection per
  request, 16 clients, 2 workers;
- W4: a burst: 400 connections opened at once (``bench.burst``) to a handler
  that waits 1 s (``bench.apps:slow``), one request each, 8 workers.

W1-W3 use ``--connections`` (default 16) and ``--threads`` (default 2).

Two CPU layouts (``bench.layouts``), side by side: ``pinned``, the whole
server (master and workers) under ``taskset -c 1`` and wrk under ``taskset
-c 0`` (the server has one CPU, the client the other), the headline for
W0-W2; and ``unpinned``, the kernel places everything on both CPUs. By
default W0, W1 and W2 run in both, W3 and W4 unpinned only; ``--layouts``
sets the layouts of every workload. Without CPUs 0 and 1 in this process's
affinity the pinned layout is skipped, with a note.

Every cell runs on a fresh server bound to 127.0.0.1 port 0, in
alternating order (for each repeat, for each workload, for each layout:
each policy in turn, Node's last), ``--repeats`` times (default 3); tables
give the median and min-max. Figures per cell: requests/s and p50/p99
latency (wrk ``--latency``; for W4 the burst client's), each worker's share
of the connections from the dispatcher's own ``handled`` counters (control
socket ``status`` before and after), Jain's fairness index over those
counts ((sum x)^2 / (n sum x^2): 1 is even, 1/n is one worker taking all),
the busiest worker's share, the master's and the workers' CPU time per
connection (all threads, /proc schedstat, divided by the connections
handled), the RSS of the master and workers (from ``status``) and errors
(wrk socket errors and non-2xx; W4: failed connections).

What each side costs per connection, per layout: the master's, the workers'
(summed) and wrk's CPU time split into user and system, and their voluntary
and involuntary context switches. Master and workers: each thread's
``/proc/PID/task/TID/stat`` (utime, stime) and ``status`` (context
switches), before and after the load; the total is schedstat's, the split
stat's. wrk: its rusage as it is reaped (``os.wait4``). Connections: what
the workers handled (Node: wrk's requests, one per connection). And the
workers' extra CPU per handed-off connection against an accepted one:
their µs/conn under round-robin minus under shared (medians, same workload
and layout).

Then the rolling reload: for each policy, 4 workers of the trivial handler
(``examples.hello:handler``) under 4
client threads, each a new connection per request; ``reload`` through the
control socket; the report gives how long it took, the requests served
during it and the ones that failed (the goal is none).

Output: the table, the headline figures and the targets (each MET or NOT
MET) are printed; the report (tables, cost per connection, headline,
targets, W4 per worker, reload, machine, exact commands, every run) is
written to ``bench/results/lab-<UTC timestamp>.md`` with PNG plots beside
it (``-throughput``, ``-latency``, ``-w4-balance``), the figures as
``.json``, and wrk's output and the server logs as ``.raw`` (not
committed). Unless ``--quick`` or ``--no-latest``, copies go to fixed names
for the README: ``bench/results/latest.md``, ``throughput.png``,
``latency.png``, ``w4-balance.png``.

Two modes run instead of the matrix (``--duration``, ``--connections`` and
``--threads`` apply):

- ``--control-plane`` (``bench.controlplane``): W1 under round-robin,
  pings off and no control socket against pings every second and /metrics
  scraped every second, ``--repeats`` pairs; the goal is control at most
  2 % slower. Report: ``bench/results/control-<UTC timestamp>.md``.
- ``--profile`` (``bench.profile``): ``--profile-workload`` (default W0) in
  ``--profile-layout`` (default pinned), once under round-robin and once
  under shared, with py-spy sampling the master and each worker
  (``--profile-mode native|python|gil``) and, where ``perf`` works, ``perf
  record -e cpu-clock -g`` on the same processes for the kernel side: the
  top functions and symbols by own time per role, side by side. py-spy is
  not a dependency: ``.venv/bin/pip install py-spy``. Report:
  ``bench/results/profile-<UTC timestamp>.md``.

Every dispatcher is ``bench.server.Server``: port 0, readiness and the port
from its control socket (``ready``); the Node cluster prints its port.
Only 127.0.0.1 is ever targeted. Every wait has a time limit, and every
process started is stopped by PID when its run ends, on errors and on
Ctrl-C (or TERM) too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench import cli, controlplane, node_peer, plots, proc, profile, report, wrk
from bench.layouts import LAYOUTS, pinning_possible, server_cpu, taskset
from bench.matrix import (
    POLICIES,
    ROLES,
    RUN_ERRORS,
    SETTLE_AFTER_S,
    WORKLOADS,
    Cell,
    Settings,
    Workload,
    load_description,
    run_cell,
    workloads,
)
from bench.node_peer import NODE_POLICIES
from bench.rolling import LOAD_AFTER_S, LOAD_BEFORE_S, RELOAD_TIMEOUT_S, ReloadRun, run_reload
from bench.server import ROOT
from bench.stats import DASH

#: The apps of the rolling-reload run: the trivial handler the matrix uses, and the lab's own.
RELOAD_APPS = ("examples.hello:handler",)
#: The layouts of each workload when ``--layouts`` is not given: W3 and W4 are not pinned.
DEFAULT_LAYOUTS: dict[str, tuple[str, ...]] = {
    "W0": LAYOUTS, "W1": LAYOUTS, "W2": LAYOUTS, "W3": ("unpinned",), "W4": ("unpinned",),
}
#: The workload that also runs on Node's cluster.
NODE_WORKLOAD = "W0"
#: The workloads ``--profile`` can run (wrk's: not the W4 burst).
PROFILE_WORKLOADS = ("W0", "W1", "W2", "W3")
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
                        help=f"comma-separated, in this order (default {','.join(POLICIES)}); W0 adds "
                        "Node's (see --node)")
    parser.add_argument("--workloads", type=lambda t: cli.choices(t, WORKLOADS, "--workloads"),
                        default=list(WORKLOADS), help=f"comma-separated (default {','.join(WORKLOADS)})")
    parser.add_argument("--layouts", type=lambda t: cli.choices(t, LAYOUTS, "--layouts"), default=None,
                        help="comma-separated CPU layouts, of pinned (the server on CPU 1, wrk on CPU 0) and "
                        "unpinned (default: both for W0, W1 and W2, pinned first; W3 and W4 unpinned only; "
                        "given explicitly, every workload runs in these)")
    parser.add_argument("--node", action=argparse.BooleanOptionalAction, default=True,
                        help="W0 also on Node's cluster (bench/node_cluster.js: node round-robin, node "
                        "shared) when node is on PATH (default: yes)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c for W1-W3 (default %(default)s)")
    parser.add_argument("--w0-connections", type=int, default=50, help="wrk -c for W0 (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="W0: seconds of the same load before each measured run, not measured, for "
                        "every policy (Node's cluster reaches its pace after about 4 s; 0: none; "
                        "default %(default)s)")
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
                       help="instead of the matrix: --profile-workload in --profile-layout under round-robin "
                       "and under shared, py-spy sampling the master and each worker, and perf (cpu-clock) "
                       "on them where it works; report in bench/results/profile-STAMP.md (py-spy is not a "
                       "dependency: pip install py-spy)")
    parser.add_argument("--profile-workload", choices=PROFILE_WORKLOADS, default="W0",
                        help="--profile: the workload (default %(default)s)")
    parser.add_argument("--profile-layout", choices=LAYOUTS, default="pinned",
                        help="--profile: the CPU layout (default %(default)s)")
    parser.add_argument("--profile-rate", type=int, default=250,
                        help="--profile: py-spy samples/s (default %(default)s)")
    parser.add_argument("--profile-mode", choices=profile.MODES, default="native",
                        help="--profile: native: C frames and syscalls too; python: Python frames only; gil: "
                        "only samples holding the GIL, i.e. Python work (default %(default)s)")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="--profile: functions and symbols to list (default %(default)s)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.latest = (not args.quick) if args.latest is None else args.latest
    args.reload_policies = args.reload_policies or args.policies
    for name in ("duration", "repeats", "connections", "w0_connections", "threads", "burst_connections",
                 "burst_workers", "reload_workers", "reload_clients", "profile_rate", "profile_top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > min(args.connections, args.w0_connections):
        parser.error("--threads must not exceed --connections or --w0-connections (wrk needs a connection "
                     "per thread)")
    if args.burst_wait_ms < 0 or args.warmup < 0:
        parser.error("--burst-wait-ms and --warmup must not be negative")
    return args


@dataclasses.dataclass(frozen=True)
class Step:
    """One cell to run: which repeat, workload, layout and policy."""

    repeat: int
    workload: Workload
    layout: str
    policy: str


def layouts_for(workload: str, explicit: Sequence[str] | None, pinning: bool = True) -> list[str]:
    """The layouts ``workload`` runs in: ``explicit`` if given, else its default; pinned only if
    ``pinning``."""
    chosen = explicit if explicit is not None else DEFAULT_LAYOUTS[workload]
    return [la for la in chosen if la != "pinned" or pinning]


def plan(chosen: Sequence[Workload], policies: Sequence[str], repeats: int,
         layouts: Sequence[str] | None = None, node: bool = False, pinning: bool = True) -> list[Step]:
    """The cells in run order: for each repeat, for each workload, for each layout, each policy in turn.

    ``node``: W0 also runs Node's cluster under its two policies, after this project's.
    """
    steps = []
    for repeat in range(repeats):
        for workload in chosen:
            extra = list(NODE_POLICIES) if node and workload.key == NODE_WORKLOAD else []
            for layout in layouts_for(workload.key, layouts, pinning):
                steps += [Step(repeat, workload, layout, p) for p in [*policies, *extra]]
    return steps


def _cell_line(cell: Cell, elapsed_s: float) -> str:
    errors = f"{cell.errors} ({cell.error_detail})" if cell.error_detail else str(cell.errors)
    workers = cell.per_connection("workers")
    return (
        f"{cell.requests_per_s:.0f} req/s, p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms, "
        f"Jain {cell.jain:.3f}, master {cell.master_us_per_conn:.1f} µs/conn, workers "
        f"{cell.workers_us_per_conn:.1f} µs/conn (user {workers.user_us:.1f}, sys {workers.system_us:.1f}), "
        f"errors {errors}{'' if cell.settled else ', counters NOT settled'} ({elapsed_s:.1f} s)"
    )


@dataclasses.dataclass
class Results:
    cells: list[Cell] = dataclasses.field(default_factory=list)
    reloads: list[ReloadRun] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    #: What was left out, and why (the pinned layout, Node).
    notes: list[str] = dataclasses.field(default_factory=list)
    load_at_start: tuple[float, float, float] = dataclasses.field(default_factory=os.getloadavg)


def _attempt(results: Results, what: str, run: Callable[[], Result]) -> Result | None:
    """``run()``; a failure the lab can go on after is printed, noted in ``results`` and gives None."""
    try:
        return run()
    except RUN_ERRORS as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        results.failures.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None


def _step_s(step: Step, duration_s: float, warmup_s: float) -> float:
    if step.workload.burst:
        return BURST_CELL_S
    extra = warmup_s + SETTLE_AFTER_S if step.workload.warmup and warmup_s > 0 else 0.0
    return duration_s + CELL_OVERHEAD_S + extra


def note(results: Results, text: str) -> None:
    print(f"note: {text}", flush=True)
    results.notes.append(text)


def run_all(args: argparse.Namespace, settings: Settings, chosen: list[Workload], work_dir: Path,
            results: Results, node: str | None) -> None:
    """Run the matrix, then the reloads, appending to ``results`` as they finish."""
    pinning = pinning_possible()
    if not pinning and any("pinned" in layouts_for(w.key, args.layouts) for w in chosen):
        note(results, "pinned layout skipped: CPUs 0 and 1 are not both in this process's affinity "
             f"({sorted(os.sched_getaffinity(0))})")
    if args.node and node is None and any(w.key == NODE_WORKLOAD for w in chosen):
        note(results, f"node not found on PATH: {NODE_WORKLOAD} runs without the Node cluster")
    steps = plan(chosen, args.policies, args.repeats, args.layouts, node is not None, pinning)
    reloads = (
        [(r, a, p) for r in range(args.repeats) for a in RELOAD_APPS for p in args.reload_policies]
        if args.reload else []
    )
    estimate = sum(_step_s(step, args.duration, settings.warmup_s) for step in steps)
    estimate += RELOAD_RUN_S * len(reloads)
    print(f"{len(steps)} cells and {len(reloads)} reload runs; about {estimate / 60:.1f} min", flush=True)
    total = len(steps) + len(reloads)
    for n, step in enumerate(steps, 1):
        what = f"{step.workload.key} {step.layout} {step.policy} (repeat {step.repeat + 1})"
        print(f"[{n}/{total}] {what} ...", end=" ", flush=True)
        started = time.monotonic()
        if step.policy in NODE_POLICIES:
            assert node is not None
            run: Callable[[], Cell] = functools.partial(
                node_peer.run_cell, settings, step.workload, step.policy, step.repeat, step.layout, node)
        else:
            run = functools.partial(run_cell, settings, step.workload, step.policy, step.repeat, work_dir,
                                    step.layout)
        cell = _attempt(results, what, run)
        if cell is None:
            continue
        results.cells.append(cell)
        print(_cell_line(cell, time.monotonic() - started), flush=True)
    for n, (repeat, app, policy) in enumerate(reloads, len(steps) + 1):
        print(f"[{n}/{total}] reload {app} {policy} (repeat {repeat + 1}) ...", end=" ", flush=True)
        reload = _attempt(results, f"reload {app} {policy} repeat {repeat + 1}",
                          functools.partial(run_reload, policy, args.reload_workers, args.reload_clients,
                                            app=app))
        if reload is None:
            continue
        results.reloads.append(reload)
        failures = ", ".join(f"{k} x{v}" for k, v in reload.failures.items())
        print(f"{reload.reload_s:.2f} s, {reload.served_during} served during it, {reload.failed_during} "
              f"failed ({reload.failed_total} in the whole run{': ' + failures if failures else ''}), "
              f"{reload.replaced}/{reload.workers} replaced; {reload.answer}", flush=True)


def all_policies(args: argparse.Namespace) -> list[str]:
    """The policies of the tables, in order: this project's, then Node's."""
    return [*args.policies, *NODE_POLICIES]


def _about(args: argparse.Namespace, settings: Settings) -> str:
    return (
        f"{args.repeats} repeat(s); in each, for each workload, for each CPU layout, each policy in turn "
        f"({', '.join(args.policies)}; W0 then Node's cluster: {', '.join(NODE_POLICIES)}), a fresh server "
        f"per run; wrk runs {args.duration} s (W0: -t{settings.threads} -c{settings.w0_connections}, after "
        f"{settings.warmup_s:g} s of the same load not measured, for every policy; W1-W3: "
        f"-t{settings.threads} -c{settings.connections}). Layouts: pinned = the whole server (master and "
        "workers) under `taskset -c 1`, wrk under `taskset -c 0` (W4's burst client on CPU 0 too); unpinned "
        "= the kernel places everything on both CPUs. Cells: median (min" + DASH + "max) over the "
        "repeats. Per-worker share and Jain's index ((sum x)^2 / (n sum x^2)) are over the connections "
        "each worker handled, from the dispatcher's `handled` counters (control socket `status` before "
        "and after; on W2 that is the 16 keep-alive connections, not requests); Node's cluster has no such "
        "counters: its connections are wrk's requests (one per connection), and it has no share. master "
        "and workers µs/conn = their CPU time (user + system, all threads, /proc/PID/task/*/schedstat) "
        "during the load / connections; with shared and reuseport the master accepts nothing, so its "
        "figure is pings and stats, and on W2 those are spread over a few long connections (the master's "
        "total is in the runs table). RSS from `status` after the load. errors = wrk socket errors + "
        "non-2xx (W4: failed connections), summed over the runs."
        + (" same CPU % (W2, `--locality`): of the requests the workers served, those served on the CPU "
           "that received them (the connection's SO_INCOMING_CPU, on loopback the CPU of the wrk thread "
           "that sent the request, equal to the worker's sched_getcpu())." if settings.locality else "")
    )


COST_ABOUT = (
    "Per connection, medians over the repeats: CPU µs in user and in system mode of the master (Node: "
    "the cluster primary), of the workers (summed) and of the load generator (wrk), and each one's "
    "voluntary / involuntary context switches. Master and workers: each thread's /proc/PID/task/TID/stat "
    "(utime, stime) and status (voluntary_ctxt_switches, nonvoluntary_ctxt_switches), summed over the "
    "threads, before and after the load; the total is schedstat's (as above), split as stat splits it "
    "(clock ticks). wrk: its rusage as it is reaped (os.wait4: ru_utime, ru_stime, ru_nvcsw, ru_nivcsw), "
    "its whole run. W4 has no wrk (n/a). A user/system split is n/a where no clock tick (10 ms) fell in "
    "the role's time (the master under shared: pings and stats only). \"Extra per handed-off "
    "connection\": the workers' µs/conn under round-robin (the master hands each connection over) "
    "minus under shared (the workers accept it), medians, same workload and layout; for Node, node "
    "round-robin minus node shared."
)


def _commands(args: argparse.Namespace, settings: Settings, chosen: Sequence[Workload],
              node: str | None) -> list[str]:
    python = report.python()
    lines = ["```", "# the lab itself", shlex.join([python, "-m", "bench.lab", *sys.argv[1:]]), ""]
    for w in chosen:
        for layout in layouts_for(w.key, args.layouts, pinning_possible()):
            pin = shlex.join(taskset(server_cpu(layout)))
            server = report.server_command("--app", w.app, "--policy", "POLICY", workers=w.workers)
            lines += [f"# {w.key} {layout}: {w.title}", f"{pin} {server}" if pin else server]
            if settings.round_robin_args:
                lines.append(f"#   round-robin adds: {shlex.join(settings.round_robin_args)}")
            if node is not None and w.key == NODE_WORKLOAD:
                lines += [f"{node_peer.describe(mode, w.workers, layout)}  # {policy}"
                          for policy, mode in NODE_POLICIES.items()]
            if w.warmup and settings.warmup_s > 0:
                lines.append(f"#   first, not measured: the same wrk line with -d{settings.warmup_s:g}s")
            lines += [load_description(settings, w, layout=layout), ""]
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
                 stamp: str, elapsed_s: float, node: str | None = None) -> tuple[str, Path]:
    """Write the report, plots, JSON and raw logs; return (the summary table, the report path)."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"lab-{stamp}"
    cells = results.cells
    policies = all_policies(args)
    ran = [w for w in chosen if any(c.workload == w.key for c in cells)]
    panels = [(w, layout) for w in ran for layout in report.layouts_of(cells, w.key)]
    subtitle = f"{proc.cpu_model()}, {proc.probe(['nproc'])} cores; {args.repeats} repeat(s)"
    pngs: dict[str, Path] = {}
    if panels:
        pngs["throughput"] = Path(f"{base}-throughput.png")
        plots.throughput(cells, panels, policies, pngs["throughput"], subtitle)
        pngs["latency"] = Path(f"{base}-latency.png")
        plots.latency(cells, panels, policies, pngs["latency"], subtitle)
    w4 = next((w for w in ran if w.burst), None)
    w4_layout = report.layouts_of(cells, w4.key)[-1] if w4 is not None else None  # unpinned if it ran
    if w4 is not None:
        pngs["w4-balance"] = Path(f"{base}-w4-balance.png")
        plots.w4_balance(cells, w4, args.policies, pngs["w4-balance"], subtitle, w4_layout)

    table = report.summary_table(cells, ran, policies)
    found = report.targets(cells)
    layouts = [la for la in LAYOUTS if any(c.layout == la for c in cells)]

    def body(links: dict[str, str]) -> str:
        lines = [
            f"# Benchmark lab, {stamp}",
            "",
            _about(args, settings),
            "",
            *(f"- Note: {n}" for n in results.notes),
            *([""] if results.notes else []),
            table,
            "",
            *report.headline(cells, results.reloads),
            "",
            "## Targets",
            "",
            "Same run, side by side.",
            "",
            *report.target_lines(found),
            "",
        ]
        lines += [f"![{name}]({link})" for name, link in links.items() if name != "w4-balance"]
        for layout in layouts:
            lines += [
                "",
                f"## Cost per connection, {layout}",
                "",
                COST_ABOUT,
                "",
                report.cost_table(cells, ran, policies, layout),
                "",
                *(report.handoff_lines(cells, ran, layout) or ["- extra per handed-off connection: n/a "
                                                               "(round-robin and shared did not both run)"]),
            ]
        if w4 is not None:
            lines += [
                "",
                f"## {w4.key}: connections per worker ({w4_layout})",
                "",
                f"{w4.title}; {settings.burst_workers} workers; one request per connection; counts by worker "
                "id (slot). The client counts from the answers (each names its worker); both should agree.",
                "",
                report.w4_table(cells, args.policies, w4_layout),
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
            f"- node: {proc.probe([node, '--version']) if node else 'not run'}",
            f"- lab wall time: {elapsed_s / 60:.1f} min; load average (1, 5, 15 min) at the start "
            f"{proc.loadavg(results.load_at_start)}, at the end {proc.loadavg(os.getloadavg())} (other work "
            "on the machine shows here)",
            "",
            "## Commands",
            "",
            "From the repository root. DIR is a private temporary directory, PORT the one "
            f"`{report.python()} -m dispatcher ctl --control DIR/ctl.sock ready` reports (it answers once "
            "every worker is ready; the Node cluster prints it), POLICY each policy in turn.",
            "",
            *_commands(args, settings, chosen, node),
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
    Path(f"{base}.json").write_text(json.dumps(_json(args, results, ran, found), indent=1) + "\n")
    with Path(f"{base}.raw").open("w") as raw:
        for n, c in enumerate(cells, 1):
            raw.write(f"===== run {n}: {c.workload} {c.layout} {c.policy} repeat {c.repeat + 1}, "
                      f"port {c.port} =====\n")
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


def _json(args: argparse.Namespace, results: Results, ran: Sequence[Workload],
          found: Sequence[report.Target]) -> dict[str, Any]:
    cells = results.cells
    extra = {}
    for w in ran:
        for layout in report.layouts_of(cells, w.key):
            pairs = [("round-robin", "shared"), *([tuple(NODE_POLICIES)] if w.key == NODE_WORKLOAD else [])]
            for handed, accepted in pairs:
                value = report.handoff_extra_us(cells, w.key, layout, handed, accepted)
                if not math.isnan(value):
                    extra[f"{w.key} {layout} {handed} - {accepted}"] = value
    return {
        "argv": sys.argv,
        "policies": all_policies(args),
        "cells": [
            {**report.without_logs(c), "connections": c.connections,
             "master_us_per_conn": c.master_us_per_conn, "workers_us_per_conn": c.workers_us_per_conn,
             "per_connection": {role: dataclasses.asdict(c.per_connection(role)) for role in ROLES}}
            for c in cells
        ],
        "workers_extra_us_per_handed_off_connection": extra,
        "targets": [{"what": t.what, "met": t.met, "figures": t.figures} for t in found],
        "reloads": [report.without_logs(r) for r in results.reloads],
        "failures": results.failures,
        "notes": results.notes,
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
        wrk=wrk_path, duration_s=args.duration, connections=args.connections,
        w0_connections=args.w0_connections, warmup_s=args.warmup, threads=args.threads,
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
                return profile.run(settings, sampler, args.out, stamp, args.profile_workload,
                                   args.profile_layout)
            return run_lab(args, settings, stamp)
        except KeyboardInterrupt as exc:
            print(f"\ninterrupted ({exc or 'Ctrl-C'}); nothing written", file=sys.stderr)
            return 130


def run_lab(args: argparse.Namespace, settings: Settings, stamp: str) -> int:
    """The matrix and the reloads: run, write the report, print the table; return the exit status."""
    chosen = [w for key, w in workloads(settings).items() if key in args.workloads]
    node = node_peer.find_node() if args.node else None
    results = Results()
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="dispatcher-lab-"))  # 0700
    try:
        run_all(args, settings, chosen, work_dir, results, node)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if not results.cells and not results.reloads:
        print("every run failed; nothing written", file=sys.stderr)
        return 1
    table, path = write_report(args, settings, chosen, results, stamp, time.monotonic() - started, node)
    print()
    print(table)
    print()
    print("\n".join(report.headline(results.cells, results.reloads)))
    print("\nTargets:")
    print("\n".join(report.target_lines(report.targets(results.cells))))
    for layout in LAYOUTS:
        if any(c.layout == layout for c in results.cells):
            ran = [w for w in chosen if any(c.workload == w.key for c in results.cells)]
            print(f"\nCost per connection, {layout} (µs, context switches):")
            print(report.cost_table(results.cells, ran, all_policies(args), layout))
    print(f"\nwrote {report.relative(path)} (and .json, .raw, plots)"
          + (f"; latest copies in {report.relative(args.out)}/" if args.latest else ""))
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
