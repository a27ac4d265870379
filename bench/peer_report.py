"""The comparison's Markdown: a table per workload, W4 per worker, reloads, idle RSS, TCP_NODELAY, targets.

Pure functions of the results (``PeerCell``, ``PeerReload``, ``Idle``,
``Nodelay``): nothing here runs or measures anything. Cells are the median
(min-max) over the repeats (``bench.stats.spread``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from bench.keepalive import Tally
from bench.peer_matrix import WORKLOADS, Idle, Nodelay, PeerCell
from bench.peer_reload import PeerReload
from bench.peer_servers import KINDS, NODELAY_EXTRA
from bench.report import MIB, Target, table
from bench.stats import median, spread

#: The targets' thresholds.
W2_RATIO_MIN = 1.0
W3_P99_RATIO_MAX = 0.8
W4_JAIN_MIN = 0.99
RSS_SLACK_MIB = 5.0


def label(key: str) -> str:
    """A server's name in tables (the TCP_NODELAY check's extra server's too)."""
    known = {**KINDS, NODELAY_EXTRA.key: NODELAY_EXTRA}
    return known[key].label if key in known else key


def select(cells: Sequence[PeerCell], server: str, workload: str,
           layout: str | None = None) -> list[PeerCell]:
    return [c for c in cells if c.server == server and c.workload == workload
            and (layout is None or c.layout == layout)]


def _shares(cells: Sequence[PeerCell]) -> str:
    """Median share of the busiest, second busiest ... worker, in percent."""
    ranked = [c.spread.shares for c in cells if c.spread.shares]
    if not ranked:
        return "n/a"
    ranks = min(len(s) for s in ranked)
    return "/".join(f"{100 * median(s[i] for s in ranked):.0f}" for i in range(ranks))


def _errors(cells: Sequence[PeerCell]) -> str:
    total = sum(c.errors for c in cells)
    details = sorted({c.error_detail for c in cells if c.error_detail})
    return f"{total}" + (f" ({'; '.join(details)})" if details else "")


def workload_table(cells: Sequence[PeerCell], workload: str, servers: Sequence[str],
                   layouts: Sequence[str]) -> str:
    """One row per server and layout that ran ``workload``."""
    rows = []
    for server in servers:
        for layout in layouts:
            mine = select(cells, server, workload, layout)
            if not mine:
                continue
            rows.append([
                label(server), layout,
                spread((c.requests_per_s for c in mine), ".0f"),
                spread((c.p50_ms for c in mine), ".2f"),
                spread((c.p99_ms for c in mine), ".2f"),
                spread((c.jain for c in mine), ".3f"),
                spread((100 * c.busiest_share for c in mine), ".0f"),
                _shares(mine),
                _cpu(mine),
                f"{_errors(mine)} in {len(mine)}",
            ])
    return table(["server", "layout", "req/s", "p50 ms", "p99 ms", "Jain", "busiest %",
                  "share % per worker, busiest first", "CPU µs/req workers + rest", "errors in runs"], rows)


def _cpu(cells: Sequence[PeerCell]) -> str:
    workers = median(c.cpu_us_per_request(workers=True) for c in cells)
    rest = median(c.cpu_us_per_request(workers=False) for c in cells)
    return "n/a" if math.isnan(workers) else f"{workers:.1f} + {rest:.1f}"


def w4_runs(cells: Sequence[PeerCell], servers: Sequence[str]) -> str:
    """Every W4 run: answers per worker (busiest first)."""
    rows = []
    for server in servers:
        for c in sorted(select(cells, server, "W4"), key=lambda c: c.repeat):
            counts = " ".join(str(n) for n in sorted(c.per_worker.values(), reverse=True))
            rows.append([label(server), c.repeat + 1, counts, f"{c.jain:.3f}", c.errors,
                         f"{c.requests / c.requests_per_s:.2f}" if c.requests_per_s > 0 else "n/a"])
    return table(["server", "repeat", "answers per worker, busiest first", "Jain", "failed", "wall s"], rows)


def _tally_cell(tallies: Sequence[Tally], retries: bool) -> str:
    failed = sum(t.failed for t in tallies)
    kinds: dict[str, int] = {}
    for t in tallies:
        for kind, n in t.failures.items():
            kinds[kind] = kinds.get(kind, 0) + n
    text = f"{failed}" + (f" ({', '.join(f'{k} x{n}' for k, n in kinds.items())})" if kinds else "")
    if retries:
        retried, resets = sum(t.retried for t in tallies), sum(t.resets for t in tallies)
        text += f"; retried {retried} (of which reset {resets})"
    return text


def reload_table(runs: Sequence[PeerReload], servers: Sequence[str]) -> str:
    rows = []
    for server in servers:
        mine = [r for r in runs if r.server == server]
        if not mine:
            continue
        answers = sorted({r.answer for r in mine if r.answer != "ok"})
        rows.append([
            label(server), KINDS[server].reload if server in KINDS else "",
            spread((r.reload_s for r in mine), ".2f"),
            spread((float(r.close_during.served) for r in mine), ".0f"),
            _tally_cell([r.close_total for r in mine], retries=False),
            spread((float(r.keepalive_during.served) for r in mine), ".0f"),
            _tally_cell([r.keepalive_total for r in mine], retries=True),
            f"{len(mine)}" + (f"; {'; '.join(answers)}" if answers else ""),
        ])
    return table(["server", "reload by", "reload s", "new-conn: served during",
                  "new-conn: failed (whole run)", "keep-alive: served during",
                  "keep-alive: failed after one retry (whole run)", "runs"], rows)


def rss_mib(idles: Sequence[Idle], server: str) -> list[float]:
    return [rss / MIB for i in idles if i.server == server for rss in i.rss_bytes.values()]


def rss_table(idles: Sequence[Idle], servers: Sequence[str]) -> str:
    rows = []
    for server in servers:
        values = rss_mib(idles, server)
        if values:
            rows.append([label(server), spread(values, ".1f"), len(values)])
    return table(["server", "idle worker RSS MiB", "workers measured"], rows)


def nodelay_table(found: Sequence[Nodelay]) -> str:
    rows = []
    for n in found:
        rows.append([label(n.server), n.verdict,
                     "; ".join(dict.fromkeys(n.answers))])
    return table(["server", "TCP_NODELAY", "answers of /nodelay"], rows)


def _med(cells: Sequence[PeerCell], server: str, workload: str, layout: str | None,
         value: Callable[[PeerCell], float]) -> float:
    return median(value(c) for c in select(cells, server, workload, layout))


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def targets(cells: Sequence[PeerCell], runs: Sequence[PeerReload], idles: Sequence[Idle]) -> list[Target]:
    """The comparison's targets, each met or not with its figures (same run, side by side)."""

    def rps(c: PeerCell) -> float:
        return c.requests_per_s

    found: list[Target] = []
    ratios = {layout: _ratio(_med(cells, "round-robin", "W2", layout, rps),
                             _med(cells, "uvicorn", "W2", layout, rps))
              for layout in ("pinned", "unpinned")}
    pinned = ratios["pinned"]
    found.append(Target(
        f"W2 keep-alive, pinned: round-robin at least {W2_RATIO_MIN:.1f}x `uvicorn --workers` req/s",
        None if math.isnan(pinned) else pinned >= W2_RATIO_MIN,
        f"round-robin {_med(cells, 'round-robin', 'W2', 'pinned', rps):.0f} vs uvicorn "
        f"{_med(cells, 'uvicorn', 'W2', 'pinned', rps):.0f} req/s: {pinned:.2f}x (unpinned: "
        f"{_med(cells, 'round-robin', 'W2', 'unpinned', rps):.0f} vs "
        f"{_med(cells, 'uvicorn', 'W2', 'unpinned', rps):.0f}: {ratios['unpinned']:.2f}x)",
    ))
    rr_p99 = _med(cells, "round-robin", "W3", "unpinned", lambda c: c.p99_ms)
    uv_p99 = _med(cells, "uvicorn", "W3", "unpinned", lambda c: c.p99_ms)
    w3 = _ratio(rr_p99, uv_p99)
    found.append(Target(
        f"W3 /cpu, unpinned: round-robin p99 at most {W3_P99_RATIO_MAX:.1f}x uvicorn's",
        None if math.isnan(w3) else w3 <= W3_P99_RATIO_MAX,
        f"round-robin {rr_p99:.2f} ms vs uvicorn {uv_p99:.2f} ms: {w3:.2f}x",
    ))
    jains = {s: [c.jain for c in select(cells, s, "W4")] for s in ("round-robin", "uvicorn", "gunicorn")}
    rr_jain = median(jains["round-robin"])
    found.append(Target(
        f"W4 burst: Jain's index at least {W4_JAIN_MIN} for round-robin",
        None if math.isnan(rr_jain) else rr_jain >= W4_JAIN_MIN,
        ", ".join(f"{label(s)} {spread(v, '.3f')}" for s, v in jains.items() if v),
    ))
    mine = [r for r in runs if r.server == "round-robin"]
    found.append(Target(
        "rolling reload under load: 0 failed requests (round-robin, both kinds of client)",
        None if not mine else sum(r.failed for r in mine) == 0,
        ", ".join(f"{label(s)} {sum(r.failed for r in runs if r.server == s)} in "
                  f"{sum(1 for r in runs if r.server == s)} run(s)"
                  for s in dict.fromkeys(r.server for r in runs)),
    ))
    rr_rss, uv_rss = median(rss_mib(idles, "round-robin")), median(rss_mib(idles, "uvicorn"))
    found.append(Target(
        f"idle worker RSS: round-robin at most uvicorn's + {RSS_SLACK_MIB:g} MiB",
        None if math.isnan(rr_rss) or math.isnan(uv_rss) else rr_rss <= uv_rss + RSS_SLACK_MIB,
        f"round-robin {rr_rss:.1f} MiB vs uvicorn {uv_rss:.1f} MiB ({rr_rss - uv_rss:+.1f} MiB)",
    ))
    return found


def runs_table(cells: Sequence[PeerCell]) -> str:
    """Every cell, in the order it ran."""
    rows = []
    for n, c in enumerate(cells, 1):
        rows.append([
            n, c.workload, label(c.server), c.layout, c.repeat + 1, c.requests, f"{c.requests_per_s:.0f}",
            f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}", " ".join(str(v) for v in c.per_worker.values()),
            c.counted, c.strangers, f"{c.errors}" + (f" ({c.error_detail})" if c.error_detail else ""),
        ])
    return table(["#", "workload", "server", "layout", "repeat", "requests", "req/s", "p50 ms", "p99 ms",
                  "answers per worker", "answers counted", "other pids", "errors"], rows)


def workload_title(key: str) -> str:
    return f"{key}: {WORKLOADS[key].title}"
