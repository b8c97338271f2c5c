"""Percentile intervals from order statistics and the share verdict: known ranks, the coverage a seeded simulation
shows for distributions of known percentiles, and the sample sizes a claim needs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.stats import order_statistic_ranks, percentile_interval, share_verdict, summarize


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(B <= k), summed exactly (small n only): the reference the fast table is checked against."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


@pytest.mark.parametrize(
    ("n", "q", "ranks"),
    [
        (10, 50, (2, 9)),  # the textbook median interval of 10 values (97.9% coverage)
        (100, 50, (40, 61)),
        (5, 50, (None, None)),  # P(all five above the median) = 1/32 > 2.5%: no bound on either side
        (6, 50, (1, 6)),
        (298, 99, (291, None)),  # a p99 has no upper bound below 368 values (two-sided)
        (368, 99, (360, 368)),
    ],
)
def test_order_statistic_ranks_of_known_cases(n, q, ranks):
    assert order_statistic_ranks(n, q) == ranks


@given(st.integers(min_value=1, max_value=400), st.sampled_from([50, 90, 95, 99]))
def test_ranks_are_the_tightest_that_keep_each_tail_under_2_5_percent(n, q):
    p = q / 100
    lower, upper = order_statistic_ranks(n, q)
    if lower is not None:  # P(B < l) within the tail, and one rank higher would not be
        assert binomial_cdf(lower - 1, n, p) <= 0.025 + 1e-12
        assert lower == n or binomial_cdf(lower, n, p) > 0.025 - 1e-12
    else:
        assert binomial_cdf(0, n, p) > 0.025 - 1e-12
    if upper is not None:
        assert 1 - binomial_cdf(upper - 1, n, p) <= 0.025 + 1e-12
        assert upper == 1 or 1 - binomial_cdf(upper - 2, n, p) > 0.025 - 1e-12
    else:
        assert 1 - binomial_cdf(n - 1, n, p) > 0.025 - 1e-12


@pytest.mark.parametrize(
    ("draw", "true_percentile"),
    [
        # Exponential with mean 100 ms (a queue's waiting time): its q-th percentile is -100 ln(1 - q).
        (lambda rng: rng.expovariate(1 / 100), lambda q: -100 * math.log(1 - q / 100)),
        # Log-normal (a heavy-tailed TTFT): exp(mu + sigma z_q).
        (lambda rng: rng.lognormvariate(5, 1), lambda q: math.exp(5 + {50: 0, 90: 1.2815515655, 99: 2.3263478740}[q])),
    ],
)
def test_the_intervals_cover_the_true_percentile_at_the_stated_rate(draw, true_percentile):
    """2,000 seeded samples per case: the 95% intervals hold the true percentile 95-98.5% of the time (order
    statistics give at least the stated rate, and a little more where ranks are whole numbers)."""
    rng = random.Random(20261130)
    for n, q in ((40, 50), (120, 90), (500, 99)):
        truth, covered, trials = true_percentile(q), 0, 2000
        for _ in range(trials):
            low, high = percentile_interval(sorted(draw(rng) for _ in range(n)), q)
            assert low is not None and high is not None
            covered += low <= truth <= high
        assert 0.94 <= covered / trials <= 0.985, (n, q, covered / trials)


def test_every_statistic_carries_its_percentile_intervals():
    stat = summarize([float(v) for v in range(1, 101)], "ms")
    assert (stat["p50_low"], stat["p50_high"]) == (40.0, 61.0)
    assert stat["p99_low"] is not None and stat["p99_high"] is None  # 100 values cannot bound a p99 from above
    assert summarize([3.0], "ms")["p50_low"] is None


@pytest.mark.parametrize(
    ("met", "n", "target", "verdict"),
    [
        (29, 29, 0.9, "met"),  # 0.9^29 = 4.7%: all 29 within the objective claims 90% at 95% confidence
        (28, 28, 0.9, "undecided"),  # 0.9^28 = 5.2%: not yet
        (299, 299, 0.99, "met"),  # the p99 rule: 299 requests, every one within the objective
        (298, 298, 0.99, "undecided"),
        (18, 20, 0.9, "undecided"),
        (5, 20, 0.9, "missed"),
        (80, 100, 0.9, "missed"),  # P(at most 80 of 100 | 90%) = 0.2%
        (0, 0, 0.9, "undecided"),
    ],
)
def test_share_verdict(met, n, target, verdict):
    found = share_verdict(met, n, target)
    assert found["verdict"] == verdict
    assert found["needed"] == math.ceil(math.log(0.05) / math.log(target))


def test_a_share_verdict_of_a_large_level_is_fast_and_right():
    assert share_verdict(900_000, 1_000_000, 0.9)["verdict"] == "undecided"  # exactly at the target
    assert share_verdict(901_000, 1_000_000, 0.9)["verdict"] == "met"
    assert share_verdict(899_000, 1_000_000, 0.9)["verdict"] == "missed"
