"""Verdicts on the benchmarks' targets: was a target met, missed, or do the rounds not tell?

Owns: `median_interval` (a confidence interval for the median of a figure's per-round values,
from order statistics: the interval between the k-th smallest and the k-th largest value
holds the true median with probability 1 - 2 * P(B < k), B ~ Binomial(n, 1/2), whatever
the shape of the noise; under QEMU's TCG single rounds of one ratio ranged from 0.36 to 1.77,
far from any normal distribution), `verdict` (the median, that interval, its coverage and
"met", "missed" or "undecided" against a target) and `verdict_line` (one line of it for people).
Used by `xentools bench` (the software Xen) and tests/xen/bench_blk.py (real Xen), so both
benchmarks judge their targets the same way.
Must not: measure anything or assert anything (a benchmark reports; nothing fails on a miss).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["CONFIDENCE", "median_interval", "verdict", "verdict_line"]

CONFIDENCE = 0.95  # the coverage asked of an interval (reached from 6 rounds on)


def _below(n: int, k: int) -> float:
    """P(B < k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the narrowest interval of order statistics [x(k), x(n+1-k)]
    whose coverage of the median is at least `confidence`; with too few values for that, the
    widest one (smallest to largest value) and its lower coverage (3 values: 0.75; 1: 0).
    ValueError for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        raise ValueError("no values: a median needs at least one round")
    best = (ordered[0], ordered[-1], 1 - 2 * _below(n, 1))
    for k in range(2, (n + 1) // 2 + 1):
        coverage = 1 - 2 * _below(n, k)
        if coverage < confidence:
            break
        best = (ordered[k - 1], ordered[n - k], coverage)
    return best


def verdict(values: Sequence[float], target: float, *, higher_is_better: bool = True,
            confidence: float = CONFIDENCE) -> dict:
    """The target judged on the rounds' values: "met" when the whole interval is on the
    target's good side (the target itself counts as met), "missed" when it is all on the
    other side, else "undecided" (the rounds' spread covers the target: more rounds, or a
    quieter machine, can tell). An interval of less than `confidence` coverage decides
    nothing: with it the verdict is "undecided" too, and `coverage` says why."""
    low, high, coverage = median_interval(values, confidence)
    if coverage < confidence:
        outcome = "undecided"
    elif higher_is_better:
        outcome = "met" if low >= target else "missed" if high < target else "undecided"
    else:
        outcome = "met" if high <= target else "missed" if low > target else "undecided"
    return {
        "median": round(statistics.median(values), 3),
        "interval": [round(low, 3), round(high, 3)],
        "coverage": round(coverage, 3),
        "rounds": len(values),
        "target": target,
        "better": "higher" if higher_is_better else "lower",
        "verdict": outcome,
    }


def verdict_line(name: str, judged: dict) -> str:
    """One line for people: `name: met (median 0.93, 95% interval 0.91-0.97 over 9 rounds;
    target >= 0.9)`."""
    sign = ">=" if judged["better"] == "higher" else "<="
    low, high = judged["interval"]
    return (f"{name}: {judged['verdict']} (median {judged['median']:g}, {judged['coverage']:.0%} interval "
            f"{low:g}-{high:g} over {judged['rounds']} rounds; target {sign} {judged['target']:g})")
