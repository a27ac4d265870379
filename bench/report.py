"""The lab's Markdown: tables of medians (min-max), the cost per connection, the headline figures and
the targets met or not; report names and paths.

Pure functions of the results (``Cell``, ``ReloadRun``): nothing here runs
or measures anything. Cells are grouped by workload, CPU layout (pinned
first: the headline for W0-W2) and policy (this project's, then Node's
cluster for W0).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.layouts import LAYOUTS
from bench.matrix import POLICIES, ROLES, Cell, Workload
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


#: The targets of the headline.
W0_PINNED_RATIO_MIN = 0.80
W0_UNPINNED_RATIO_MIN = 0.75
W0_MASTER_US_MAX = 8.0
W0_HANDOFF_EXTRA_US_MAX = 15.0
W0_NODE_RATIO_MIN = 3.0
W1_RATIO_MIN = 0.9
W2_RATIO_MIN = 0.95
W4_JAIN_MIN = 0.99
#: Node's cluster under its two scheduling policies, as the lab names them (``bench.node_peer``).
NODE_ROUND_ROBIN = "node round-robin"
NODE_SHARED = "node shared"


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


def select(cells: Sequence[Cell], workload: str, policy: str, layout: str | None = None) -> list[Cell]:
    """The cells of ``workload`` under ``policy`` (in ``layout``; None: in any)."""
    return [c for c in cells if c.workload == workload and c.policy == policy
            and (layout is None or c.layout == layout)]


def layouts_of(cells: Sequence[Cell], workload: str) -> list[str]:
    """The layouts ``workload`` ran in, pinned first."""
    return [la for la in LAYOUTS if any(c.workload == workload and c.layout == la for c in cells)]


def _med(cells: Sequence[Cell], workload: str, policy: str, layout: str | None,
         value: Callable[[Cell], float]) -> float:
    return median(value(c) for c in select(cells, workload, policy, layout))


def _rps(c: Cell) -> float:
    return c.requests_per_s


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def summary_table(cells: Sequence[Cell], workloads: Sequence[Workload], policies: Sequence[str]) -> str:
    """One row per workload, layout and policy: medians (min-max) over the repeats."""
    # Only runs with bench.apps:locality count same-CPU requests.
    locality = any(c.locality for c in cells)
    header = ["workload", "layout", "policy", "req/s", "p50 ms", "p99 ms",
              "per-worker share %, busiest first", "Jain", "busiest %", "master µs/conn", "workers µs/conn",
              "RSS MiB master / worker", "errors",
              *(["same CPU %"] if locality else [])]
    rows: list[list[str]] = []
    for workload in workloads:
        for layout in layouts_of(cells, workload.key):
            for policy in policies:
                mine = select(cells, workload.key, policy, layout)
                if not mine:
                    continue
                shares = "/".join(f"{s:.0f}" for s in rank_shares(mine)) or "n/a"
                master_rss = median(c.master_rss_bytes / MIB for c in mine if c.master_rss_bytes)
                worker_rss = median(r / MIB for c in mine for r in c.workers_rss_bytes)
                errors = sum(c.errors for c in mine)
                rows.append([
                    workload.key, layout, policy,
                    spread((c.requests_per_s for c in mine), ".0f"),
                    spread((c.p50_ms for c in mine), ".2f"),
                    spread((c.p99_ms for c in mine), ".2f"),
                    shares,
                    spread((c.jain for c in mine), ".3f"),
                    spread((100 * c.busiest_share for c in mine), ".0f"),
                    spread((c.master_us_per_conn for c in mine), ".1f"),
                    spread((c.workers_us_per_conn for c in mine), ".1f"),
                    f"{master_rss:.1f} / {worker_rss:.1f}",
                    f"{errors} in {len(mine)} run{'s' if len(mine) > 1 else ''}",
                    *([spread((100 * c.same_cpu_share for c in mine), ".0f")] if locality else []),
                ])
    return table(header, rows)


def cost_table(cells: Sequence[Cell], workloads: Sequence[Workload], policies: Sequence[str],
               layout: str) -> str:
    """What each role costs per connection in ``layout``, one row per cell (workload, policy): medians."""
    header = ["workload", "policy", "connections", "master user µs", "master sys µs", "workers user µs",
              "workers sys µs", "wrk user µs", "wrk sys µs", "master ctx vol / invol",
              "workers ctx vol / invol", "wrk ctx vol / invol"]
    rows: list[list[str]] = []
    for workload in workloads:
        for policy in policies:
            mine = select(cells, workload.key, policy, layout)
            if not mine:
                continue
            row = [workload.key, policy, f"{median(float(c.connections) for c in mine):.0f}"]
            for role in ROLES:
                row += [f"{median(c.per_connection(role).user_us for c in mine):.1f}",
                        f"{median(c.per_connection(role).system_us for c in mine):.1f}"]
            for role in ROLES:
                row.append(f"{median(c.per_connection(role).voluntary for c in mine):.3f} / "
                           f"{median(c.per_connection(role).involuntary for c in mine):.3f}")
            rows.append([cell.replace("nan", "n/a") for cell in row])
    return table(header, rows)


def handoff_extra_us(cells: Sequence[Cell], workload: str, layout: str, handed: str = "round-robin",
                     accepted: str = "shared") -> float:
    """The workers' extra CPU per handed-off connection against an accepted one, in microseconds.

    The workers' µs per connection under ``handed`` (the master hands each
    connection over) minus under ``accepted`` (the workers accept it
    themselves), medians, same workload and layout; NaN unless both ran.
    """
    return (_med(cells, workload, handed, layout, lambda c: c.workers_us_per_conn)
            - _med(cells, workload, accepted, layout, lambda c: c.workers_us_per_conn))


def handoff_lines(cells: Sequence[Cell], workloads: Sequence[Workload], layout: str) -> list[str]:
    """The workers' extra CPU per handed-off connection, per workload in ``layout`` (and Node's on W0)."""
    lines = []
    for workload in workloads:
        for handed, accepted, who in (("round-robin", "shared", "this project"),
                                      (NODE_ROUND_ROBIN, NODE_SHARED, "Node cluster")):
            extra = handoff_extra_us(cells, workload.key, layout, handed, accepted)
            if math.isnan(extra):
                continue
            lines.append(
                f"- {workload.key} {layout}, {who}: the workers spend {extra:+.1f} µs more per handed-off "
                f"connection ({handed} {_med(cells, workload.key, handed, layout, _wpc):.1f} against "
                f"{accepted} {_med(cells, workload.key, accepted, layout, _wpc):.1f} µs/conn)"
            )
    return lines


def _wpc(c: Cell) -> float:
    return c.workers_us_per_conn


def _ratio(cells: Sequence[Cell], workload: str, num: str, den: str,
           value: Callable[[Cell], float], layout: str | None = None) -> str:
    ratio = _div(_med(cells, workload, num, layout, value), _med(cells, workload, den, layout, value))
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}"


def _prefer(cells: Sequence[Cell], workload: str, layout: str) -> str | None:
    """``layout`` if ``workload`` ran in it, else the other one it ran in (None: it did not run)."""
    ran = layouts_of(cells, workload)
    return layout if layout in ran else (ran[0] if ran else None)


def headline(cells: Sequence[Cell], runs: Sequence[ReloadRun]) -> list[str]:
    """The figures the lab is for, one bullet each (those whose cells ran); the targets are apart."""
    lines: list[str] = []

    def has(workload: str, *policies: str, layout: str | None = None) -> bool:
        return all(select(cells, workload, p, layout) for p in policies)

    for key, what in (("W0", "lightest handler"), ("W1", "new connection per request"),
                      ("W2", "keep-alive")):
        for layout in layouts_of(cells, key):
            if has(key, "round-robin", "shared", layout=layout):
                rr = _med(cells, key, "round-robin", layout, _rps)
                sh = _med(cells, key, "shared", layout, _rps)
                lines.append(
                    f"- {key} ({what}), {layout}: round-robin {rr:.0f} req/s vs shared {sh:.0f} req/s: "
                    f"ratio {_ratio(cells, key, 'round-robin', 'shared', _rps, layout)}"
                    + (f" (reuseport/shared {_ratio(cells, key, 'reuseport', 'shared', _rps, layout)})"
                       if has(key, "reuseport", layout=layout) else "")
                )
    for layout in layouts_of(cells, "W0"):
        node = [p for p in (NODE_ROUND_ROBIN, NODE_SHARED) if has("W0", p, layout=layout)]
        if node:
            line = f"- W0 {layout}, Node cluster: " + ", ".join(
                f"{p} {_med(cells, 'W0', p, layout, _rps):.0f} req/s" for p in node)
            if has("W0", "round-robin", NODE_ROUND_ROBIN, layout=layout):
                line += (f"; round-robin / node round-robin "
                         f"{_ratio(cells, 'W0', 'round-robin', NODE_ROUND_ROBIN, _rps, layout)}")
            if has("W0", "shared", NODE_SHARED, layout=layout):
                line += f"; shared / node shared {_ratio(cells, 'W0', 'shared', NODE_SHARED, _rps, layout)}"
            lines.append(line)
    for layout in layouts_of(cells, "W0"):
        extra = handoff_extra_us(cells, "W0", layout)
        if not math.isnan(extra):
            lines.append(f"- W0 {layout}: the workers' extra CPU per handed-off connection (round-robin - "
                         f"shared, workers' µs/conn, medians): {extra:.1f} µs")
    counted = [p for p in POLICIES if any(c.locality for c in select(cells, "W2", p))]
    if counted:
        lines.append(
            "- W2 requests served on the CPU that received them (the client thread's, on loopback): "
            + ", ".join(f"{p} {spread((100 * c.same_cpu_share for c in select(cells, 'W2', p)), '.0f')} %"
                        for p in counted)
        )
    w3 = _prefer(cells, "W3", "unpinned")
    if w3 is not None and has("W3", "round-robin", "shared", layout=w3):
        rr_p99 = _med(cells, "W3", "round-robin", w3, lambda c: c.p99_ms)
        sh_p99 = _med(cells, "W3", "shared", w3, lambda c: c.p99_ms)
        line = (f"- W3 (2 ms CPU per request), {w3}, p99: round-robin {rr_p99:.2f} ms vs shared "
                f"{sh_p99:.2f} ms")
        if has("W3", "reuseport", layout=w3):
            line += f", reuseport {_med(cells, 'W3', 'reuseport', w3, lambda c: c.p99_ms):.2f} ms"
        ratio = _ratio(cells, "W3", "round-robin", "shared", _rps, w3)
        lines.append(f"{line}; throughput ratio round-robin/shared {ratio}")
    w4l = _prefer(cells, "W4", "unpinned")
    w4 = [p for p in POLICIES if w4l is not None and has("W4", p, layout=w4l)]
    if w4:
        lines.append(
            f"- W4 (burst), {w4l}, Jain index: "
            + ", ".join(f"{p} {spread((c.jain for c in select(cells, 'W4', p, w4l)), '.3f')}" for p in w4)
            + "; busiest worker: "
            + ", ".join(
                f"{p} {spread((100 * c.busiest_share for c in select(cells, 'W4', p, w4l)), '.0f')} %"
                for p in w4
            )
        )
    master = [
        f"{key} {layout} "
        f"{spread((c.master_us_per_conn for c in select(cells, key, 'round-robin', layout)), '.1f')}"
        for key in ("W0", "W1", "W3", "W4") for layout in layouts_of(cells, key)
        if has(key, "round-robin", layout=layout)
    ]
    if master:
        line = "- master CPU per connection, round-robin: " + ", ".join(master) + " µs"
        shared_at = _prefer(cells, "W0", "pinned")
        if shared_at is not None and has("W0", "shared", layout=shared_at):
            shared = spread((c.master_us_per_conn for c in select(cells, "W0", "shared", shared_at)), ".1f")
            line += f" (shared, W0 {shared_at}: {shared} µs: pings and stats only)"
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


@dataclass(frozen=True)
class Target:
    """A goal, met or not, with the figures that decide it (same run, side by side)."""

    what: str
    met: bool | None  # None: not measured in this run
    figures: str

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("MET" if self.met else "NOT MET")


def target_lines(found: Sequence[Target]) -> list[str]:
    return [f"- **{t.verdict}**: {t.what}: {t.figures}" for t in found]


def _at_least(value: float, bound: float) -> bool | None:
    return None if math.isnan(value) else value >= bound


def _at_most(value: float, bound: float) -> bool | None:
    return None if math.isnan(value) else value <= bound


def _throughput_target(cells: Sequence[Cell], workload: str, layout: str, other: str, bound: float,
                       aside: str | None = None) -> Target:
    """round-robin's req/s at least ``bound`` times ``other``'s, ``workload`` in ``layout``."""
    rr = _med(cells, workload, "round-robin", layout, _rps)
    them = _med(cells, workload, other, layout, _rps)
    ratio = _div(rr, them)
    figures = (f"{ratio:.2f}x (round-robin {rr:.0f} against {other} {them:.0f} req/s)"
               if not math.isnan(ratio) else f"round-robin and {other} did not both run {layout}")
    if aside is not None:
        rr_aside, them_aside = (_med(cells, workload, p, aside, _rps) for p in ("round-robin", other))
        if not math.isnan(_div(rr_aside, them_aside)):
            figures += f"; {aside}: {_div(rr_aside, them_aside):.2f}x"
    return Target(f"{workload} {layout}: round-robin at least {bound:.2f}x {other}", _at_least(ratio, bound),
                  figures)


def targets(cells: Sequence[Cell]) -> list[Target]:
    """The lab's targets, each MET or NOT MET with its figures (or not measured)."""
    found = [_throughput_target(cells, "W0", "pinned", "shared", W0_PINNED_RATIO_MIN)]
    rr = select(cells, "W0", "round-robin", "pinned")
    master = median(c.master_us_per_conn for c in rr)
    user = median(c.per_connection("master").user_us for c in rr)
    system = median(c.per_connection("master").system_us for c in rr)
    found.append(Target(f"W0 pinned: master at most {W0_MASTER_US_MAX:g} µs CPU per connection (round-robin)",
                        _at_most(master, W0_MASTER_US_MAX),
                        f"{master:.1f} µs (user {user:.1f}, system {system:.1f})".replace("nan", "n/a")
                        if rr else "round-robin did not run pinned"))
    extra = handoff_extra_us(cells, "W0", "pinned")
    found.append(Target(
        f"W0 pinned: workers' extra CPU per handed-off connection at most {W0_HANDOFF_EXTRA_US_MAX:g} µs",
        _at_most(extra, W0_HANDOFF_EXTRA_US_MAX),
        f"{extra:.1f} µs (workers' round-robin {_med(cells, 'W0', 'round-robin', 'pinned', _wpc):.1f} "
        f"against shared {_med(cells, 'W0', 'shared', 'pinned', _wpc):.1f} µs/conn)" if not math.isnan(extra)
        else "round-robin and shared did not both run pinned",
    ))
    found.append(_throughput_target(cells, "W0", "unpinned", "shared", W0_UNPINNED_RATIO_MIN))
    found.append(_throughput_target(cells, "W0", "pinned", NODE_ROUND_ROBIN, W0_NODE_RATIO_MIN, "unpinned"))
    found.append(_throughput_target(cells, "W1", "pinned", "shared", W1_RATIO_MIN, "unpinned"))
    found.append(_throughput_target(cells, "W2", "pinned", "shared", W2_RATIO_MIN, "unpinned"))
    w3 = _prefer(cells, "W3", "unpinned") or "unpinned"
    rr_p99 = _med(cells, "W3", "round-robin", w3, lambda c: c.p99_ms)
    sh_p99 = _med(cells, "W3", "shared", w3, lambda c: c.p99_ms)
    w3_ran = not (math.isnan(rr_p99) or math.isnan(sh_p99))
    found.append(Target(f"W3 {w3}: round-robin p99 at most shared's",
                        rr_p99 <= sh_p99 if w3_ran else None,
                        f"round-robin {rr_p99:.2f} ms against shared {sh_p99:.2f} ms" if w3_ran
                        else f"round-robin and shared did not both run {w3}"))
    w4 = _prefer(cells, "W4", "unpinned") or "unpinned"
    jain = select(cells, "W4", "round-robin", w4)
    found.append(Target(f"W4 {w4}: Jain's index at least {W4_JAIN_MIN} (round-robin)",
                        _at_least(median(c.jain for c in jain), W4_JAIN_MIN),
                        spread((c.jain for c in jain), ".3f") if jain else f"round-robin did not run {w4}"))
    return found


def w4_table(cells: Sequence[Cell], policies: Sequence[str], layout: str | None = None) -> str:
    """Every W4 run (in ``layout``; None: any): connections per worker id, from the dispatcher and from
    the client."""
    rows = []
    for policy in policies:
        for c in sorted(select(cells, "W4", policy, layout), key=lambda c: c.repeat):
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
        handled = " ".join(str(c.handled[k]) for k in sorted(c.handled)) or f"- (wrk: {c.connections})"
        workers_cpu = " ".join(f"{1e3 * c.workers_cpu_s[k]:.0f}" for k in sorted(c.workers_cpu_s))
        errors = f"{c.errors} ({c.error_detail})" if c.error_detail else str(c.errors)
        rows.append([
            n, c.workload, c.layout, c.policy, c.repeat + 1, c.requests, f"{c.requests_per_s:.0f}",
            f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}", handled, f"{1e3 * c.master_cpu_s:.1f}", workers_cpu,
            "yes" if c.settled else "NO", errors, c.exit_code, *([counted or "-"] if locality else []),
        ])
    return table(["#", "workload", "layout", "policy", "repeat", "requests", "req/s", "p50 ms", "p99 ms",
                  "handled per worker id", "master CPU ms", "workers CPU ms", "settled", "errors", "exit",
                  *(["requests per worker id (same CPU %)"] if locality else [])], rows)
