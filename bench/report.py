"""The lab's Markdown: tables of medians (min-max), the headline figures; report names and paths.

Pure functions of the results (``Cell``, ``ReloadRun``): nothing here runs
or measures anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.matrix import POLICIES, Cell, Workload
from bench.rolling import ReloadRun
from bench.server import ROOT, command
from bench.stats import median, spread

MIB = 1024 * 1024


def timestamp() -> str:
    """Now in UTC, as report file names carry it (``20261122T074643Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def relative(path: Path) -> str:
    """``path`` from the repository root when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def python() -> str:
    """This interpreter, as the reports' commands name it (``.venv/bin/python``)."""
    return relative(Path(sys.executable))


def without_logs(record: Any) -> dict[str, Any]:
    """A run's dataclass as the report's JSON gives it: its fields but the logs (those go to ``.raw``)."""
    data = dataclasses.asdict(record)
    for key in ("server_log", "load_output"):
        data.pop(key, None)
    return data


def server_command(*args: str, workers: int) -> str:
    """The master's command line as a report gives it: the control socket is ``DIR/ctl.sock``."""
    control = () if "--control" in args else ("--control", "DIR/ctl.sock")
    return shlex.join([python(), *command(*args, *control, workers=workers)[1:]])


def rank_shares(cells: Sequence[Cell]) -> list[float]:
    """Median share of the busiest, second busiest, ... worker over ``cells``, in percent."""
    ranked = [c.shares for c in cells if c.shares]
    if not ranked:
        return []
    ranks = min(len(s) for s in ranked)
    return [100 * statistics.median(s[i] for s in ranked) for i in range(ranks)]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: ``header``, its rule, then one line per row."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def select(cells: Sequence[Cell], workload: str, policy: str) -> list[Cell]:
    return [c for c in cells if c.workload == workload and c.policy == policy]


def summary_table(cells: Sequence[Cell], workloads: Sequence[Workload], policies: Sequence[str]) -> str:
    """One row per workload and policy: medians (min-max) over the repeats."""
    # Only runs with bench.apps:locality count same-CPU requests.
    locality = any(c.locality for c in cells)
    header = ["workload", "policy", "req/s", "p50 ms", "p99 ms", "per-worker share %, busiest first", "Jain",
              "busiest %", "master µs/conn", "RSS MiB master / worker", "errors",
              *(["same CPU %"] if locality else [])]
    rows: list[list[str]] = []
    for workload in workloads:
        for policy in policies:
            mine = select(cells, workload.key, policy)
            if not mine:
                continue
            shares = "/".join(f"{s:.0f}" for s in rank_shares(mine)) or "n/a"
            master_rss = median(c.master_rss_bytes / MIB for c in mine if c.master_rss_bytes)
            worker_rss = median(r / MIB for c in mine for r in c.workers_rss_bytes)
            errors = sum(c.errors for c in mine)
            rows.append([
                workload.key, policy,
                spread((c.requests_per_s for c in mine), ".0f"),
                spread((c.p50_ms for c in mine), ".2f"),
                spread((c.p99_ms for c in mine), ".2f"),
                shares,
                spread((c.jain for c in mine), ".3f"),
                spread((100 * c.busiest_share for c in mine), ".0f"),
                spread((c.master_us_per_conn for c in mine), ".1f"),
                f"{master_rss:.1f} / {worker_rss:.1f}",
                f"{errors} in {len(mine)} run{'s' if len(mine) > 1 else ''}",
                *([spread((100 * c.same_cpu_share for c in mine), ".0f")] if locality else []),
            ])
    return table(header, rows)


def _ratio(cells: Sequence[Cell], workload: str, num: str, den: str,
           value: Callable[[Cell], float]) -> str:
    a = median(value(c) for c in select(cells, workload, num))
    b = median(value(c) for c in select(cells, workload, den))
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def headline(cells: Sequence[Cell], runs: Sequence[ReloadRun]) -> list[str]:
    """The figures the lab is for, one bullet each (those whose cells ran)."""
    lines: list[str] = []

    def rps(c: Cell) -> float:
        return c.requests_per_s

    def has(workload: str, *policies: str) -> bool:
        return all(select(cells, workload, p) for p in policies)

    for key, what in (("W1", "new connection per request"), ("W2", "keep-alive")):
        if has(key, "round-robin", "shared"):
            rr = median(rps(c) for c in select(cells, key, "round-robin"))
            sh = median(rps(c) for c in select(cells, key, "shared"))
            lines.append(
                f"- {key} ({what}): round-robin {rr:.0f} req/s vs shared {sh:.0f} req/s: "
                f"ratio {_ratio(cells, key, 'round-robin', 'shared', rps)}"
                + (f" (reuseport/shared {_ratio(cells, key, 'reuseport', 'shared', rps)})"
                   if has(key, "reuseport") else "")
            )
    counted = [p for p in POLICIES if any(c.locality for c in select(cells, "W2", p))]
    if counted:
        lines.append(
            "- W2 requests served on the CPU that received them (the client thread's, on loopback): "
            + ", ".join(f"{p} {spread((100 * c.same_cpu_share for c in select(cells, 'W2', p)), '.0f')} %"
                        for p in counted)
        )
    if has("W3", "round-robin", "shared"):
        rr = median(c.p99_ms for c in select(cells, "W3", "round-robin"))
        sh = median(c.p99_ms for c in select(cells, "W3", "shared"))
        line = f"- W3 (2 ms CPU per request) p99: round-robin {rr:.2f} ms vs shared {sh:.2f} ms"
        if has("W3", "reuseport"):
            line += f", reuseport {median(c.p99_ms for c in select(cells, 'W3', 'reuseport')):.2f} ms"
        ratio = _ratio(cells, "W3", "round-robin", "shared", rps)
        lines.append(f"{line}; throughput ratio round-robin/shared {ratio}")
    w4 = [p for p in POLICIES if has("W4", p)]
    if w4:
        lines.append(
            "- W4 (burst) Jain index: "
            + ", ".join(f"{p} {spread((c.jain for c in select(cells, 'W4', p)), '.3f')}" for p in w4)
            + "; busiest worker: "
            + ", ".join(
                f"{p} {spread((100 * c.busiest_share for c in select(cells, 'W4', p)), '.0f')} %" for p in w4
            )
        )
    master = [
        f"{key} {spread((c.master_us_per_conn for c in select(cells, key, 'round-robin')), '.1f')}"
        for key in ("W1", "W3", "W4") if has(key, "round-robin")
    ]
    if master:
        line = "- master CPU per connection, round-robin: " + ", ".join(master) + " µs"
        if has("W1", "shared"):
            shared = spread((c.master_us_per_conn for c in select(cells, "W1", "shared")), ".1f")
            line += f" (shared, W1: {shared} µs: pings and stats only)"
        lines.append(line)
    for app in dict.fromkeys(r.app for r in runs):
        for policy in dict.fromkeys(r.policy for r in runs if r.app == app):
            mine = [r for r in runs if r.app == app and r.policy == policy]
            lines.append(
                f"- rolling reload of {mine[0].workers} workers ({app}, {policy}): "
                f"{spread((r.reload_s for r in mine), '.2f')} s, "
                f"{spread((float(r.served_during) for r in mine), '.0f')} requests served during it, "
                f"{sum(r.failed_during for r in mine)} failed during it "
                f"({sum(r.failed_total for r in mine)} in the whole runs) over {len(mine)} run(s)"
            )
    return lines


def w4_table(cells: Sequence[Cell], policies: Sequence[str]) -> str:
    """Every W4 run: connections per worker id, from the dispatcher and from the client."""
    rows = []
    for policy in policies:
        for c in sorted(select(cells, "W4", policy), key=lambda c: c.repeat):
            counts = " ".join(str(c.handled[k]) for k in sorted(c.handled))
            client = {k: v for k, v in c.client_per_worker.items() if v}
            agrees = "yes" if client == {k: v for k, v in c.handled.items() if v} else f"no: {client}"
            wall = c.requests / c.requests_per_s if c.requests_per_s > 0 else float("nan")
            rows.append([policy, c.repeat + 1, counts, f"{c.jain:.3f}", agrees, c.errors, f"{wall:.2f}"])
    return table(["policy", "repeat", "connections per worker id (dispatcher's `handled`)", "Jain",
                  "client's count agrees", "failed", "wall s"], rows)


def reload_table(runs: Sequence[ReloadRun]) -> str:
    rows = []
    for app in dict.fromkeys(r.app for r in runs):
        for policy in dict.fromkeys(r.policy for r in runs if r.app == app):
            mine = [r for r in runs if r.app == app and r.policy == policy]
            failures: dict[str, int] = {}
            for r in mine:
                for kind, n in r.failures.items():
                    failures[kind] = failures.get(kind, 0) + n
            answers = {r.answer for r in mine if r.answer.startswith("failed")}
            rows.append([
                app, policy,
                spread((r.reload_s for r in mine), ".2f"),
                spread((float(r.served_during) for r in mine), ".0f"),
                spread((float(r.failed_during) for r in mine), ".0f"),
                spread((float(r.failed_total) for r in mine), ".0f"),
                spread((r.rate_before for r in mine), ".0f"),
                spread((r.rate_during for r in mine), ".0f"),
                f"{spread((float(r.replaced) for r in mine), '.0f')} of {mine[0].workers}",
                (", ".join(f"{k} x{n}" for k, n in failures.items()) or "-")
                + ("; " + "; ".join(sorted(answers)) if answers else ""),
            ])
    return table(["app", "policy", "reload s", "served during", "failed during", "failed, whole run",
                  "req/s before", "req/s during", "workers replaced", "failures"], rows)


def runs_table(cells: Sequence[Cell]) -> str:
    """Every cell, in the order it ran."""
    locality = any(c.locality for c in cells)
    rows = []
    for n, c in enumerate(cells, 1):
        counted = " ".join(
            f"{served} ({100 * same / served if served else 0:.0f})"
            for served, same in (c.locality[k] for k in sorted(c.locality))
        )
        handled = " ".join(str(c.handled[k]) for k in sorted(c.handled))
        workers_cpu = " ".join(f"{1e3 * c.workers_cpu_s[k]:.0f}" for k in sorted(c.workers_cpu_s))
        errors = f"{c.errors} ({c.error_detail})" if c.error_detail else str(c.errors)
        rows.append([
            n, c.workload, c.policy, c.repeat + 1, c.requests, f"{c.requests_per_s:.0f}", f"{c.p50_ms:.2f}",
            f"{c.p99_ms:.2f}", handled, f"{1e3 * c.master_cpu_s:.1f}", workers_cpu,
            "yes" if c.settled else "NO", errors, c.exit_code, *([counted or "-"] if locality else []),
        ])
    return table(["#", "workload", "policy", "repeat", "requests", "req/s", "p50 ms", "p99 ms",
                  "handled per worker id", "master CPU ms", "workers CPU ms", "settled", "errors", "exit",
                  *(["requests per worker id (same CPU %)"] if locality else [])], rows)
