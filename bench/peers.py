"""This project against uvicorn, gunicorn and granian, on the same apps, workers, loop and machine.

    .venv/bin/python -m bench.peers               # the full run of `make bench` (about 12 minutes)
    .venv/bin/python -m bench.peers --quick       # 1 s runs, 1 repeat: under 3 minutes
    .venv/bin/python -m bench.peers --servers round-robin,uvicorn --workloads W2 --layouts pinned --repeats 5

The servers (``bench.peer_servers``), each with 2 workers (8 for W4), uvloop
where a Python event loop runs, access logs off, bound to 127.0.0.1:

- ASGI (``bench.asgi_app:app``, a raw ASGI 3 callable): this project under
  round-robin, shared and reuseport (``--interface asgi``), ``uvicorn
  --workers``, gunicorn with ``uvicorn_worker.UvicornWorker``, granian;
- WSGI (``bench.wsgi_app:app``, Flask): this project's round-robin
  (``--interface wsgi --threads 4``), gunicorn ``gthread --threads 4``,
  granian ``--interface wsgi --blocking-threads 4``.

The workloads (``bench.peer_matrix``): W1 a new connection per request on
``/``, W2 keep-alive on ``/``, W3 ``/cpu`` (2 ms of CPU) with a new
connection per request, all three with wrk (16 connections, 2 threads) on
one server after the other; W4 a burst of 400 connections to ``/sleep``
(1 s) over 8 workers (ASGI servers only: a WSGI worker holds a thread per
sleeping request, so the burst would measure the thread count). The CPU
layouts: ``pinned`` (the server under ``taskset -c 1``, wrk under ``taskset
-c 0``) runs W1 and W2, the headline for them; ``unpinned`` runs W1-W3,
and W4 runs unpinned. For each repeat (default 3), each layout and each
server in turn, in an order rotated every repeat, a fresh server.

Figures per cell: requests/s, p50 and p99 (wrk ``--latency``; W4 the burst
client's, from the burst's start), answers per worker from the
``x-worker`` header (wrk's Lua, ``bench.worker_counts``; the burst client
reads it too), Jain's index over them and the busiest worker's share, errors
(socket errors and non-2xx; W4 failed connections). On each unpinned
server, before its loads, ``/nodelay`` says whether its accepted sockets
have TCP_NODELAY on (``bench.peer_probe.tcp_nodelay``: ``getsockopt`` on the
worker's own fd of the connection), and after them, at rest, each worker's
RSS. Then, per repeat, a rolling reload under load of every server
(``bench.peer_reload``): new-connection clients and keep-alive clients that
retry once, counted during the reload and over the run.

Output (``--out``, default bench/results): ``peers-<UTC stamp>.md`` (the
tables, the targets met or not, machine, exact commands, every run), its
``.json`` and ``.raw`` (wrk's output and the servers' logs, not committed),
and PNG plots beside it; unless ``--quick`` or ``--no-latest``, copies at
fixed names: ``peers-latest.md``, ``peers-throughput.png``,
``peers-latency.png``, ``peers-w4.png``, ``peers-rss.png``.

If this checkout's dispatcher cannot serve the ASGI app (a trial start
fails), its servers are left out and the report says so.
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
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from bench import cli, peer_plots, proc, report, wrk
from bench.layouts import LAYOUTS, pinning_possible
from bench.matrix import RUN_ERRORS
from bench.peer_matrix import (
    IDLE_SETTLE_S,
    WORKLOADS,
    Group,
    Idle,
    Nodelay,
    PeerCell,
    Settings,
    burst_call,
    probe_nodelay,
    run_group,
    run_w4,
    wrk_line,
)
from bench.peer_reload import LOAD_AFTER_S, LOAD_BEFORE_S, PeerReload, run_reload
from bench.peer_report import (
    label,
    nodelay_table,
    reload_table,
    rss_table,
    runs_table,
    targets,
    w4_runs,
    workload_table,
    workload_title,
)
from bench.peer_servers import KINDS, NODELAY_EXTRA, NOTES, Running, describe
from bench.report import target_lines
from bench.server import ROOT, StartError
from bench.stats import DASH
from bench.worker_counts import write_script

#: Workloads each layout runs (W4 is unpinned only, and ASGI servers only).
LAYOUT_WORKLOADS = {"pinned": ("W1", "W2"), "unpinned": ("W1", "W2", "W3")}
#: Bound on the trial start of this project's ASGI server.
TRIAL_TIMEOUT_S = 20.0

Result = TypeVar("Result")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 s runs, 1 repeat, a 200-connection burst, fixed-name copies left alone")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 3; --quick 1)")
    parser.add_argument("--repeats", type=int, help="runs per cell (default 3; --quick 1)")
    parser.add_argument("--reload-repeats", type=int, help="reloads per server (default: --repeats)")
    parser.add_argument("--servers", type=lambda t: cli.choices(t, list(KINDS), "--servers"),
                        default=list(KINDS), help=f"comma-separated (default {','.join(KINDS)})")
    parser.add_argument("--workloads", type=lambda t: cli.choices(t, list(WORKLOADS), "--workloads"),
                        default=list(WORKLOADS), help="comma-separated (default W1,W2,W3,W4)")
    parser.add_argument("--layouts", type=lambda t: cli.choices(t, LAYOUTS, "--layouts"),
                        default=list(LAYOUTS), help="comma-separated (default pinned,unpinned)")
    parser.add_argument("--workers", type=int, default=2, help="workers for W1-W3 and reloads (default 2)")
    parser.add_argument("--wsgi-threads", type=int, default=4, help="WSGI threads per worker (default 4)")
    parser.add_argument("--burst-connections", type=int, help="W4 (default 400; --quick 200)")
    parser.add_argument("--burst-workers", type=int, default=8, help="W4 workers (default 8)")
    parser.add_argument("--no-reload", dest="reload", action="store_false", help="skip the rolling reloads")
    parser.add_argument("--reload-clients", type=int, default=2,
                        help="clients of each kind during a reload (default 2)")
    parser.add_argument("--latest", action=argparse.BooleanOptionalAction, default=None,
                        help="copy the report and plots to the fixed names (default: yes, unless --quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder for the results (default bench/results)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.reload_repeats = args.repeats if args.reload_repeats is None else args.reload_repeats
    args.burst_connections = args.burst_connections or (200 if args.quick else 400)
    args.latest = (not args.quick) if args.latest is None else args.latest
    for name in ("repeats", "workers", "wsgi_threads", "burst_connections", "burst_workers",
                 "reload_clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.reload_repeats < 0:
        parser.error("--duration must be positive, --reload-repeats not negative")
    return args


@dataclasses.dataclass
class Results:
    cells: list[PeerCell] = dataclasses.field(default_factory=list)
    idles: list[Idle] = dataclasses.field(default_factory=list)
    nodelays: dict[str, Nodelay] = dataclasses.field(default_factory=dict)
    reloads: list[PeerReload] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    logs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    load_at_start: tuple[float, float, float] = dataclasses.field(default_factory=os.getloadavg)


def _attempt(results: Results, what: str, run: Callable[[], Result]) -> Result | None:
    """``run()``; a failure the comparison can go on after is printed, noted and gives None."""
    try:
        return run()
    except RUN_ERRORS as exc:
        print(f"FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
        results.failures.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return None


def trial_dispatcher(workers: int) -> str:
    """Why this checkout's dispatcher cannot serve the ASGI app; empty if it can."""
    server = Running(KINDS["round-robin"], workers)
    try:
        server.start(TRIAL_TIMEOUT_S)
    except StartError as exc:
        return str(exc).splitlines()[0]
    finally:
        server.stop()
    return ""


def _rotated(items: Sequence[str], by: int) -> list[str]:
    by %= max(1, len(items))
    return [*items[by:], *items[:by]]


def run_all(args: argparse.Namespace, settings: Settings, servers: list[str], results: Results) -> None:
    """The groups, the bursts and the reloads, repeat by repeat; appended to ``results`` as they finish."""
    layouts = [la for la in args.layouts if la != "pinned" or pinning_possible()]
    if "pinned" in args.layouts and "pinned" not in layouts:
        results.notes.append("pinned layout skipped: CPUs 0 and 1 are not both available")
    for repeat in range(args.repeats):
        order = _rotated(servers, repeat)
        # The layouts alternate too: neither always runs first, on a machine warmed or not.
        for layout in layouts if repeat % 2 == 0 else layouts[::-1]:
            chosen = [WORKLOADS[w] for w in LAYOUT_WORKLOADS[layout] if w in args.workloads]
            if not chosen:
                continue
            for key in order:
                what = f"repeat {repeat + 1} {layout} {key} ({', '.join(w.key for w in chosen)})"
                print(f"[{what}] ...", end=" ", flush=True)
                started = time.monotonic()
                group: Group | None = _attempt(results, what, functools.partial(
                    run_group, settings, KINDS[key], chosen, layout, repeat, layout == "unpinned"))
                if group is None:
                    continue
                results.cells += group.cells
                results.logs.append((what, group.server_log))
                if group.idle is not None:
                    results.idles.append(group.idle)
                if group.nodelay is not None:
                    results.nodelays.setdefault(key, Nodelay(key)).answers.extend(group.nodelay.answers)
                print("; ".join(f"{c.workload} {c.requests_per_s:.0f} req/s p99 {c.p99_ms:.2f} ms "
                                f"Jain {c.jain:.3f} err {c.errors}" for c in group.cells)
                      + f" ({time.monotonic() - started:.1f} s)", flush=True)
        if "W4" in args.workloads:
            for key in (k for k in order if KINDS[k].interface == "asgi"):
                what = f"repeat {repeat + 1} W4 {key}"
                print(f"[{what}] ...", end=" ", flush=True)
                started = time.monotonic()
                done = _attempt(results, what, functools.partial(run_w4, settings, KINDS[key], repeat))
                if done is None:
                    continue
                cell, log = done
                results.cells.append(cell)
                results.logs.append((what, log))
                print(f"{cell.requests} ok, p99 {cell.p99_ms:.0f} ms, Jain {cell.jain:.3f}, "
                      f"failed {cell.errors} ({time.monotonic() - started:.1f} s)", flush=True)
        if args.reload and repeat < args.reload_repeats:
            for key in (k for k in order if KINDS[k].reload):
                what = f"repeat {repeat + 1} reload {key}"
                print(f"[{what}] ...", end=" ", flush=True)
                run = _attempt(results, what, functools.partial(
                    run_reload, KINDS[key], args.workers, args.reload_clients, args.reload_clients,
                    args.wsgi_threads))
                if run is None:
                    continue
                results.reloads.append(run)
                results.logs.append((what, run.server_log))
                print(f"{run.answer}, {run.reload_s:.2f} s; failed: new-connection {run.close_total.failed}, "
                      f"keep-alive {run.keepalive_total.failed} (retried {run.keepalive_total.retried})",
                      flush=True)
    if "unpinned" in layouts:
        extra = _attempt(results, "TCP_NODELAY check of uvicorn --loop asyncio",
                         functools.partial(probe_nodelay, NODELAY_EXTRA, args.workers, args.wsgi_threads))
        if extra is not None:
            results.nodelays[NODELAY_EXTRA.key] = extra


def _about(args: argparse.Namespace, settings: Settings) -> str:
    return (
        f"{args.repeats} repeat(s); in each, for each CPU layout (alternating which goes first), each "
        "server in turn, in an order rotated every repeat, on a fresh server; then W4 on each ASGI server, "
        f"then a reload of each. wrk runs {settings.duration_s:g} s, -t{settings.threads} "
        f"-c{settings.connections}. "
        f"W1-W3: {settings.workers} workers; W4: {settings.burst_workers} workers, "
        f"{settings.burst_connections} connections at once. pinned: every process of the server on CPU 1 "
        "(`taskset -c 1` on its first process: all its processes and threads inherit it), wrk on CPU 0; "
        "unpinned: the kernel places both on both CPUs. Cells: median (min" + DASH + "max) over the repeats. "
        "Answers per worker are read from each answer's `x-worker: <pid>` header: for wrk by a Lua script "
        "that counts per thread in `response()` and prints in `done()` (exact at any rate, each answer "
        "counted; `bench/worker_counts.py`), for W4 by the burst client. Jain's index ((sum x)^2 / (n sum "
        "x^2)) is over every worker of the server, those that served nothing included; busiest % is the "
        "busiest worker's share. errors = wrk socket errors + non-2xx (W4: failed connections), summed."
    )


def _commands(args: argparse.Namespace, settings: Settings, servers: Sequence[str]) -> list[str]:
    python = report.python()
    lines = ["```", "# the comparison itself", shlex.join([python, "-m", "bench.peers", *sys.argv[1:]]), "",
             "# servers (W1-W3; W4 with --workers/-w 8 instead); pinned: the same under `taskset -c 1`"]
    lines += [f"# {label(k)}\n{describe(KINDS[k], settings.workers, settings.wsgi_threads)}"
              for k in servers]
    lines += ["", "# loads (PORT: the server's); pinned: under `taskset -c 0`; COUNTS.lua is "
              "bench.worker_counts.LUA, written to a temporary file"]
    shown = dataclasses.replace(settings, script="COUNTS.lua")
    for w in (WORKLOADS[k] for k in ("W1", "W2", "W3")):
        if w.key in args.workloads:
            lines.append(f"# {w.key}\n{shlex.join(wrk_line(shown, w, 'PORT', False))}")
    if "W4" in args.workloads:
        lines.append(f"# W4\n{burst_call(settings, WORKLOADS['W4'])}")
    if args.reload:
        lines += [
            "", f"# rolling reload: {args.workers} workers; {args.reload_clients} bench.load.Load threads "
            f"(GET / with Connection: close, a new connection each) and {args.reload_clients} "
            "bench.keepalive.KeepAliveLoad threads (one keep-alive connection each, a request sent again "
            f"once if its reused connection was closed); after {LOAD_BEFORE_S:g} s: the reload, then "
            f"{LOAD_AFTER_S:g} s more",
            f"#   this project: {python} -m dispatcher ctl --control DIR/ctl.sock reload (answers once every "
            "worker was replaced)",
            "#   uvicorn, gunicorn, granian: kill -HUP MASTER, done when every old worker is gone and as "
            "many new ones loaded the app",
        ]
    lines.append("```")
    return lines


def write_report(args: argparse.Namespace, settings: Settings, servers: list[str], results: Results,
                 stamp: str, elapsed_s: float) -> Path:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"peers-{stamp}"
    cells = results.cells
    ran = [w for w in WORKLOADS if any(c.workload == w for c in cells)]
    layouts = [la for la in LAYOUTS if any(c.layout == la for c in cells)]
    subtitle = f"{proc.cpu_model()}, {proc.probe(['nproc'])} cores; {args.repeats} repeat(s)"
    pngs: dict[str, Path] = {}
    wrk_ran = [w for w in ran if w != "W4"]
    if wrk_ran:
        pngs["throughput"] = Path(f"{base}-throughput.png")
        peer_plots.throughput(cells, wrk_ran, servers, layouts, pngs["throughput"], subtitle)
        pngs["latency"] = Path(f"{base}-latency.png")
        peer_plots.latency(cells, ran, servers, layouts, pngs["latency"], subtitle)
    if "W4" in ran:
        pngs["w4"] = Path(f"{base}-w4.png")
        peer_plots.w4_balance(cells, servers, pngs["w4"], subtitle)
    if results.idles:
        pngs["rss"] = Path(f"{base}-rss.png")
        peer_plots.rss(results.idles, servers, pngs["rss"], subtitle)
    found = targets(cells, results.reloads, results.idles)

    def body(links: dict[str, str]) -> str:
        lines = [f"# Servers compared, {stamp}", "", _about(args, settings), ""]
        lines += [f"- {note}" for note in results.notes]
        lines += ["", "Servers:", "", *(f"- {family}: {note}" for family, note in NOTES.items()
                                        if any(KINDS[k].family == family for k in servers))]
        lines += ["", "## Targets", "", "Same run, side by side.", "", *target_lines(found), ""]
        for w in ran:
            lines += [f"## {workload_title(w)}", "", workload_table(cells, w, servers, layouts), ""]
        if "w4" in links:
            lines += ["W4, every run:", "", w4_runs(cells, servers), "", f"![w4]({links['w4']})", ""]
        lines += [f"![{name}]({link})" for name, link in links.items() if name in ("throughput", "latency")]
        if results.reloads:
            lines += [
                "", "## Rolling reload under load", "",
                f"{args.workers} workers; {args.reload_clients} clients making a new connection per request "
                f"and {args.reload_clients} keep-alive clients that send a request again once when their "
                "reused connection was closed (as browsers do), together; the reload after "
                f"{LOAD_BEFORE_S:g} s of load, {LOAD_AFTER_S:g} s more after it. \"reload s\": from the "
                "command or signal to every worker replaced; \"served during\" in that time (median); "
                "failures summed over the runs and the whole of each run. retried: requests whose first try "
                "met a closed idle connection (reset: it was reset, not closed), served on the retry unless "
                "counted failed.", "",
                reload_table(results.reloads, servers),
            ]
        if results.idles:
            lines += ["", "## Idle worker RSS", "",
                      f"Each worker's RSS (psutil) {IDLE_SETTLE_S:g} s after the unpinned group's loads "
                      "(W1-W3 warmed it up); median (min" + DASH + "max) over the workers and repeats.", "",
                      rss_table(results.idles, servers), ""]
            if "rss" in links:
                lines.append(f"![rss]({links['rss']})")
        if results.nodelays:
            lines += [
                "", "## TCP_NODELAY", "",
                "Method: the app's `/nodelay` path, asked over a few new connections on each unpinned server "
                "before its loads, duplicates the worker's own fd of each accepted TCP socket (found in "
                "`/proc/self/fd`, matched by the client's address where the server gives the port: every "
                "ASGI server and gunicorn's WSGI; else every connected socket on the server's port, the "
                "probe's being the only one) and reads `getsockopt(IPPROTO_TCP, TCP_NODELAY)`: the option "
                "is the socket's, so the duplicate reads what the server set. Every server compared runs "
                "the app in the process holding the socket (granian's Rust I/O too), so the method is the "
                "same for all. `uvicorn --workers --loop asyncio` is checked as well (uvicorn issue #3149: "
                "the supervisor's listener has proto 0 and asyncio then leaves Nagle on).", "",
                nodelay_table(list(results.nodelays.values())),
            ]
        if results.failures:
            lines += ["", "## Runs that failed", "", *(f"- {f}" for f in results.failures)]
        lines += [
            "", "## Machine", "", *proc.machine(settings.wrk),
            f"- lab wall time: {elapsed_s / 60:.1f} min; load average (1, 5, 15 min) at the start "
            f"{proc.loadavg(results.load_at_start)}, at the end {proc.loadavg(os.getloadavg())}",
            f"- versions: {_versions()}",
            "", "## Commands", "", "From the repository root; PORT is a free port picked for each run, DIR a "
            "private temporary directory.", "", *_commands(args, settings, servers),
            "", "## Runs", "", runs_table(cells),
        ]
        return "\n".join(lines) + "\n"

    path = Path(f"{base}.md")
    path.write_text(body({name: p.name for name, p in pngs.items()}))
    Path(f"{base}.json").write_text(json.dumps(_json(args, results, found), indent=1) + "\n")
    with Path(f"{base}.raw").open("w") as raw:
        for n, c in enumerate(cells, 1):
            raw.write(f"===== run {n}: {c.workload} {c.server} {c.layout} repeat {c.repeat + 1} =====\n")
            raw.write(c.load_output)
        for what, log in results.logs:
            raw.write(f"===== server log: {what} =====\n{log}")
    if args.latest:
        for name, p in pngs.items():
            shutil.copyfile(p, out / f"peers-{name}.png")
        (out / "peers-latest.md").write_text(body({name: f"peers-{name}.png" for name in pngs}))
    return path


def _versions() -> str:
    found = []
    for name in ("uvicorn", "gunicorn", "uvicorn-worker", "granian", "uvloop", "httptools", "flask"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def _json(args: argparse.Namespace, results: Results, found: Sequence[Any]) -> dict[str, Any]:
    return {
        "argv": sys.argv,
        "cells": [{**report.without_logs(c), "jain": c.jain, "busiest_share": c.busiest_share}
                  for c in results.cells],
        "idle": [report.without_logs(i) for i in results.idles],
        "nodelay": {k: {"verdict": n.verdict, "answers": n.answers} for k, n in results.nodelays.items()},
        "reloads": [report.without_logs(r) for r in results.reloads],
        "targets": [{"what": t.what, "met": t.met, "figures": t.figures} for t in found],
        "failures": results.failures,
        "notes": results.notes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_path = wrk.find()
    if wrk_path is None:
        return 2
    settings = Settings(wrk=wrk_path, duration_s=args.duration, workers=args.workers,
                        wsgi_threads=args.wsgi_threads, burst_connections=args.burst_connections,
                        burst_workers=args.burst_workers)
    stamp = report.timestamp()
    with cli.interrupting_signals():
        results = Results()
        started = time.monotonic()
        script = Path(write_script())
        try:
            settings = dataclasses.replace(settings, script=str(script))
            servers = list(args.servers)
            if any(KINDS[k].dispatcher for k in servers):
                why = trial_dispatcher(args.workers)
                if why:
                    servers = [k for k in servers if not KINDS[k].dispatcher]
                    results.notes.append(
                        f"this project's servers left out: its ASGI server did not start ({why})")
                    print(f"this project's servers left out: {why}", file=sys.stderr)
            if not servers:
                print("no server to run", file=sys.stderr)
                return 1
            run_all(args, settings, servers, results)
        except KeyboardInterrupt as exc:
            print(f"\ninterrupted ({exc or 'Ctrl-C'}); nothing written", file=sys.stderr)
            return 130
        finally:
            script.unlink(missing_ok=True)
    if not results.cells and not results.reloads:
        print("every run failed; nothing written", file=sys.stderr)
        return 1
    path = write_report(args, settings, servers, results, stamp, time.monotonic() - started)
    print()
    print("\n".join(target_lines(targets(results.cells, results.reloads, results.idles))))
    print(f"\nwrote {report.relative(path)} (and .json, .raw, plots)"
          + (f"; latest copies in {report.relative(args.out)}/peers-*" if args.latest else ""))
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
