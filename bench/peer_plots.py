"""The comparison's PNG plots (matplotlib, Agg), drawn with ``bench.plots.bars``: median bars, min-max.

Constrained layout, so that the title of many stacked panels keeps clear of the first one.

- ``throughput``: requests/s, a panel per workload, a bar per server and layout;
- ``latency``: p50 and p99, a row of panels per layout, a panel per workload;
- ``w4_balance``: W4's answers per worker, busiest first, one group per server;
- ``rss``: each server's idle worker RSS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed

import matplotlib.pyplot as plt

from bench.peer_matrix import Idle, PeerCell
from bench.peer_report import label, rss_mib, select
from bench.plots import DPI, bars, rank_stats
from bench.stats import DASH

LAYOUT_COLORS = {"pinned": "#1f77b4", "unpinned": "#ff7f0e"}


def _short(server: str) -> str:
    """A server's label, broken onto lines for an x tick."""
    return label(server).replace(" (", "\n(").replace(" + ", "\n+ ").replace("dispatcher ", "dispatcher\n")


def throughput(cells: Sequence[PeerCell], workloads: Sequence[str], servers: Sequence[str],
               layouts: Sequence[str], path: Path, subtitle: str) -> None:
    fig, axes = plt.subplots(len(workloads), 1, figsize=(max(8.0, 1.2 * len(servers)), 3.2 * len(workloads)),
                             squeeze=False, layout="constrained")
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        shown = [s for s in servers if select(cells, s, workload)]
        series = [
            (layout, LAYOUT_COLORS.get(layout, "#888888"),
             [[c.requests_per_s for c in select(cells, s, workload, layout)] for s in shown])
            for layout in layouts if any(select(cells, s, workload, layout) for s in shown)
        ]
        if not shown or not series:
            ax.set_visible(False)
            continue
        bars(ax, [_short(s) for s in shown], series, ".0f")
        ax.set_title(workload, fontsize=9)
        ax.set_ylabel("requests/s")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput per server (median, min{DASH}max)\n{subtitle}", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def latency(cells: Sequence[PeerCell], workloads: Sequence[str], servers: Sequence[str],
            layouts: Sequence[str], path: Path, subtitle: str) -> None:
    pairs = [(layout, w) for layout in layouts for w in workloads
             if any(select(cells, s, w, layout) for s in servers)]
    fig, axes = plt.subplots(len(pairs), 1, figsize=(max(8.0, 1.2 * len(servers)), 3.0 * len(pairs)),
                             squeeze=False, layout="constrained")
    for ax, (layout, workload) in zip(axes[:, 0], pairs, strict=True):
        shown = [s for s in servers if select(cells, s, workload, layout)]
        series = [
            ("p50", "#9ecae1", [[c.p50_ms for c in select(cells, s, workload, layout)] for s in shown]),
            ("p99", "#08519c", [[c.p99_ms for c in select(cells, s, workload, layout)] for s in shown]),
        ]
        bars(ax, [_short(s) for s in shown], series, ".0f" if workload == "W4" else ".2f")
        ax.set_title(f"{workload}, {layout}", fontsize=9)
        ax.set_ylabel("latency, ms")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"Latency per server (median, min{DASH}max)\n{subtitle}", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def w4_balance(cells: Sequence[PeerCell], servers: Sequence[str], path: Path, subtitle: str) -> None:
    fig, ax = plt.subplots(figsize=(10.0, 4.2), layout="constrained")
    ticks: list[float] = []
    names: list[str] = []
    even: float | None = None
    left = 0
    for server in servers:
        runs = [c for c in select(cells, server, "W4") if c.per_worker]
        if not runs:
            continue
        stats, even = rank_stats([c.per_worker.values() for c in runs])
        n = len(stats)
        xs = [left + i for i in range(n)]
        ax.bar(xs, [s[0] for s in stats], 0.8, yerr=[[s[1] for s in stats], [s[2] for s in stats]],
               capsize=2, ecolor="#333333")
        ticks.append(left + (n - 1) / 2)
        names.append(_short(server))
        left += n + 2
    if even is not None:
        ax.axhline(even, color="#444444", linestyle="--", linewidth=1, label=f"even share ({even:.0f})")
        ax.legend(fontsize=8)
    ax.set_xticks(ticks, names, fontsize=7)
    ax.set_ylabel("answers")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"W4: answers per worker, busiest first (median, min{DASH}max over runs)\n{subtitle}",
                 fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def rss(idles: Sequence[Idle], servers: Sequence[str], path: Path, subtitle: str) -> None:
    shown = [s for s in servers if rss_mib(idles, s)]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(shown)), 3.6), layout="constrained")
    bars(ax, [_short(s) for s in shown], [("idle worker RSS", "#6a51a3", [rss_mib(idles, s) for s in shown])],
         ".1f")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"Idle worker RSS after the loads (median, min{DASH}max over workers and runs)\n{subtitle}",
                 fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
