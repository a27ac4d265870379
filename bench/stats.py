"""Summaries of the lab's repeated figures: median, min-max spread, percentile, ranked shares, Jain's index.

NaN stands for a figure a run could not have (no connections, no samples)
and is left out of every summary.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

DASH = "\N{EN DASH}"


def finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def bounds(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) of the finite values; NaNs if there is none."""
    kept = finite(values)
    if not kept:
        return math.nan, math.nan, math.nan
    return statistics.median(kept), min(kept), max(kept)


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN if there is none."""
    return bounds(values)[0]


def spread(values: Iterable[float], fmt: str) -> str:
    """``median (min-max)`` of the finite values, ``n/a`` if none; just the value if one."""
    mid, low, high = bounds(values)
    if math.isnan(mid):
        return "n/a"
    if low == high:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(low, fmt)}{DASH}{format(high, fmt)})"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def ranked_shares(counts: Iterable[float]) -> list[float]:
    """Each count's share of their sum, largest first; empty if the sum is 0."""
    values = list(counts)
    total = sum(values)
    return sorted((n / total for n in values), reverse=True) if total else []


def jain_index(counts: Sequence[float]) -> float:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2): 1 when even, 1/n when one takes all.

    NaN for no workers or nothing counted.
    """
    squares = sum(x * x for x in counts)
    if not counts or squares == 0:
        return float("nan")
    return sum(counts) ** 2 / (len(counts) * squares)
