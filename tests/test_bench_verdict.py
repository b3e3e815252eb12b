"""The benchmarks' verdicts on their targets (xentools.tools.bench_verdict).

Owns: proof that the median's interval is the order-statistics one with its exact binomial
coverage (computed here independently, by counting the outcomes of n fair coin flips), that
a verdict is "met" or "missed" only when that interval lies wholly on one side of the target
with the coverage asked, and "undecided" otherwise (a spread over the target, or too few
rounds to reach the coverage), for floors and for ceilings; and that `xentools bench` judges
its three targets from its rounds' values.
"""

from __future__ import annotations

import itertools
import random

import pytest

from xentools.tools.bench import TARGETS, _verdicts
from xentools.tools.bench_verdict import median_interval, verdict, verdict_line


def _coverage_by_counting(n: int, k: int) -> float:
    """P(x(k) <= median <= x(n+1-k)): the share of the 2**n sign patterns (each value above or
    below the true median, equally likely) with at least k values on each side."""
    hits = sum(1 for signs in itertools.product((0, 1), repeat=n) if k <= sum(signs) <= n - k)
    return hits / 2**n


@pytest.mark.parametrize("n", range(1, 13))
def test_the_interval_is_the_narrowest_order_statistics_one_with_the_coverage(n):
    values = random.Random(n).sample(range(1000), n)
    ordered = sorted(values)
    low, high, coverage = median_interval(values)
    k = ordered.index(low) + 1
    assert ordered[n - k] == high  # symmetric: the k-th smallest and the k-th largest
    assert coverage == pytest.approx(_coverage_by_counting(n, k))
    narrower = _coverage_by_counting(n, k + 1) if k + 1 <= (n + 1) // 2 else 0.0
    if coverage >= 0.95:
        assert narrower < 0.95  # the next one in would fall short
    else:
        assert k == 1  # too few values: the widest interval, and what it covers


def test_known_intervals():
    nine = [0.845, 0.409, 0.595, 0.509, 0.522, 0.849, 0.75, 1.195, 1.183]  # a 9-round run, as measured
    assert median_interval(nine) == (0.509, 1.183, pytest.approx(1 - 20 / 512))
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    assert median_interval([5.0]) == (5.0, 5.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_verdicts_for_a_floor():
    assert verdict([0.91, 0.95, 0.97, 0.93, 0.92, 0.99, 0.94, 0.96, 0.98], 0.9)["verdict"] == "met"
    assert verdict([0.5, 0.6, 0.7, 0.55, 0.65, 0.62, 0.58, 0.61, 0.59], 0.9)["verdict"] == "missed"
    spread = verdict([0.845, 0.409, 0.595, 0.509, 0.522, 0.849, 0.75, 1.195, 1.183], 0.9)
    assert spread["verdict"] == "undecided"
    assert spread["median"] == 0.75 and spread["interval"] == [0.509, 1.183] and spread["rounds"] == 9
    # The target itself counts as met (a floor is ">=").
    assert verdict([0.9] * 6, 0.9)["verdict"] == "met"


def test_verdicts_for_a_ceiling():
    assert verdict([2.2, 2.3, 2.4, 2.3, 2.28, 2.31, 2.29], 3.0, higher_is_better=False)["verdict"] == "met"
    assert verdict([3.2, 3.3, 3.4, 3.3, 3.28, 3.31, 3.29], 3.0, higher_is_better=False)["verdict"] == "missed"
    assert verdict([2.0, 4.0, 2.5, 3.5, 2.9, 3.1], 3.0, higher_is_better=False)["verdict"] == "undecided"


def test_too_few_rounds_decide_nothing():
    """Three rounds all far above the floor still cover the median only 75% of the time."""
    judged = verdict([10.0, 11.0, 12.0], 0.35)
    assert judged["verdict"] == "undecided" and judged["coverage"] == 0.75
    assert verdict([1.0], 0.35)["verdict"] == "undecided"


def test_the_line_says_the_verdict_the_interval_and_the_target():
    line = verdict_line("rand", verdict([0.5, 0.6, 0.7, 0.55, 0.65, 0.62, 0.58, 0.61, 0.59], 0.9))
    assert line == "rand: missed (median 0.6, 96% interval 0.55-0.65 over 9 rounds; target >= 0.9)"
    line = verdict_line("cpu", verdict([2.2, 2.3, 2.4, 2.3, 2.28, 2.31, 2.29], 3.0, higher_is_better=False))
    assert line == "cpu: met (median 2.3, 98% interval 2.2-2.4 over 7 rounds; target <= 3)"


def test_the_software_bench_judges_its_targets_from_its_rounds():
    rng = random.Random(1)
    rounds = [
        {"seq_read_1m_ratio": 0.8 + rng.random() / 10, "rand_read_4k_qd32_ratio": 0.2 + rng.random() / 10,
         "rand_read_4k_cpu_us_per_request": {"frontend": 1.0, "backend": 1.2, "total": 2.2 + rng.random() / 2}}
        for _ in range(7)
    ]
    judged = _verdicts(rounds)
    assert set(judged) == set(TARGETS)
    assert judged["seq_read_1m_ratio"]["verdict"] == "met"  # 0.8-0.9 against 0.7
    assert judged["rand_read_4k_qd32_ratio"]["verdict"] == "missed"  # 0.2-0.3 against 0.35
    cpu = judged["rand_read_4k_cpu_us_per_request_total"]
    assert cpu["better"] == "lower" and cpu["target"] == 3.0
    totals = sorted(one["rand_read_4k_cpu_us_per_request"]["total"] for one in rounds)
    assert cpu["interval"] == [round(totals[0], 3), round(totals[-1], 3)]  # 7 rounds: min to max, 98%
    assert cpu["verdict"] == "met"  # 2.2-2.7 against at most 3
