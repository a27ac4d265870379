"""The lab's PNG plots (matplotlib, Agg backend: no display needed).

- ``throughput``: requests/s, one panel per workload and CPU layout, a bar
  per policy (median of the repeats, error bar from min to max).
- ``latency``: p50 and p99 per policy, one panel per workload and layout,
  likewise.
- ``w4_balance``: W4's connections per worker, one group per policy, workers
  ranked busiest first in each run (the busiest is a different worker id
  from run to run), median and min-max over the runs per rank, with the
  even share as a line.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.matrix import Cell, Workload
from bench.stats import bounds

COLORS = {"round-robin": "#1f77b4", "shared": "#ff7f0e", "reuseport": "#2ca02c",
          "node round-robin": "#9467bd", "node shared": "#8c564b"}
#: A panel: a workload in a CPU layout.
Panel = tuple[Workload, str]
DPI = 110


def bar_stats(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, median - min, max - median) of the finite values, for a bar and its error bar."""
    mid, low, high = bounds(values)
    if math.isnan(mid):
        return math.nan, 0.0, 0.0
    return mid, mid - low, high - mid


def rank_stats(runs: Sequence[Iterable[int]]) -> tuple[list[tuple[float, float, float]], float]:
    """Counts per worker over ``runs``, ranked busiest first in each run (the busiest is a different
    worker from run to run): ``bar_stats`` per rank, over as many ranks as the run with the fewest
    workers has; and the even share, the median total over the runs / those ranks."""
    ranked = [sorted(counts, reverse=True) for counts in runs]
    n = min(len(r) for r in ranked)
    even = statistics.median(sum(r) for r in ranked) / n
    return [bar_stats([float(r[i]) for r in ranked]) for i in range(n)], even


def bars(ax: Axes, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[Sequence[float]]]],
          fmt: str) -> None:
    """Grouped bars on ``ax``: for each (name, color, values per label), median bars with min-max."""
    width = 0.8 / len(series)
    for i, (name, color, per_label) in enumerate(series):
        stats = [bar_stats(v) for v in per_label]
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        mids = [s[0] for s in stats]
        ax.bar(xs, mids, width, color=color, label=name,
               yerr=[[s[1] for s in stats], [s[2] for s in stats]], capsize=3, ecolor="#333333")
        for x, (mid, _, up) in zip(xs, stats, strict=True):
            if not math.isnan(mid):  # above the error bar, not across it
                ax.annotate(format(mid, fmt), (x, mid + up), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def _panels(panels: Sequence[Panel]) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    return fig, list(axes[0])


def _values(cells: Sequence[Cell], workload: str, layout: str, policy: str,
            value: Callable[[Cell], float]) -> list[float]:
    return [value(c) for c in cells if c.workload == workload and c.policy == policy and c.layout == layout]


def _ran(cells: Sequence[Cell], panel: Panel, policies: Sequence[str]) -> list[str]:
    """The policies of ``policies`` that ran in ``panel``."""
    workload, layout = panel
    return [p for p in policies if _values(cells, workload.key, layout, p, lambda c: c.requests_per_s)]


def _title(panel: Panel) -> str:
    workload, layout = panel
    return f"{workload.key} {layout}\n" + textwrap.fill(workload.title, 40)


def _label(policy: str) -> str:
    return policy.replace(" ", "\n")


def throughput(cells: Sequence[Cell], panels: Sequence[Panel], policies: Sequence[str],
               path: Path, subtitle: str) -> None:
    fig, axes = _panels(panels)
    for ax, panel in zip(axes, panels, strict=True):
        workload, layout = panel
        ran = _ran(cells, panel, policies)
        per_policy = [_values(cells, workload.key, layout, p, lambda c: c.requests_per_s) for p in ran]
        bars(ax, [_label(p) for p in ran], [("req/s", "#888888", per_policy)], ".0f")
        for patch, policy in zip(ax.patches, ran, strict=True):
            patch.set_facecolor(COLORS.get(policy, "#888888"))
        ax.set_title(_title(panel), fontsize=8)
        ax.set_ylabel("requests/s" if ax is axes[0] else "")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Throughput per policy (median, min{chr(8211)}max)\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def latency(cells: Sequence[Cell], panels: Sequence[Panel], policies: Sequence[str],
            path: Path, subtitle: str) -> None:
    fig, axes = _panels(panels)
    for ax, panel in zip(axes, panels, strict=True):
        workload, layout = panel
        ran = _ran(cells, panel, policies)
        series = [
            ("p50", "#9ecae1", [_values(cells, workload.key, layout, p, lambda c: c.p50_ms) for p in ran]),
            ("p99", "#08519c", [_values(cells, workload.key, layout, p, lambda c: c.p99_ms) for p in ran]),
        ]
        bars(ax, [_label(p) for p in ran], series, ".0f" if workload.burst else ".2f")
        ax.set_title(_title(panel), fontsize=8)
        ax.set_ylabel("latency, ms" if ax is axes[0] else "")
        ax.tick_params(axis="x", labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(f"Latency percentiles per policy (median, min{chr(8211)}max)\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def w4_balance(cells: Sequence[Cell], workload: Workload, policies: Sequence[str], path: Path,
               subtitle: str, layout: str | None = None) -> None:
    """``layout``: only the cells in that layout (None: every cell of ``workload``)."""
    cells = [c for c in cells if layout is None or c.layout == layout]
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    even: float | None = None
    ticks: list[float] = []
    for g, policy in enumerate(policies):
        runs = [c for c in cells if c.workload == workload.key and c.policy == policy and c.handled]
        if not runs:
            continue
        stats, even = rank_stats([c.handled.values() for c in runs])
        n = len(stats)
        left = g * (n + 2)
        xs = [left + i for i in range(n)]
        ax.bar(xs, [s[0] for s in stats], 0.8, color=COLORS.get(policy, "#888888"), label=policy,
               yerr=[[s[1] for s in stats], [s[2] for s in stats]], capsize=2, ecolor="#333333")
        ticks.append(left + (n - 1) / 2)
    if even is not None:
        ax.axhline(even, color="#444444", linestyle="--", linewidth=1, label=f"even share ({even:.0f})")
    ax.set_xticks(ticks, [p for p in policies if any(c.workload == workload.key and c.policy == p
                                                       for c in cells)])
    ax.set_ylabel("connections served")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{workload.key}{' ' + layout if layout else ''}: connections per worker, busiest first "
        f"(median, min{chr(8211)}max over runs)\n"
        f"{workload.title}; {subtitle}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
