"""The statistic of docs/metrics.md: {unit, n, mean, stdev, min, p50, p90, p95, p99, max, ci95}, and the one
computation of a request's latency figures (TTFT, E2E, TPOT, decode and prefill rates) that every bench, the
load client, the workflows and the server use.

ci95 is the half-width of the 95% confidence interval of the mean (Student's t), None below two samples. Each
percentile also carries a distribution-free 95% interval from order statistics (p99_low, p99_high): None on a side
the sample is too small to bound (a p99 has no upper bound below 299 values where nothing is assumed of the tail).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

CONFIDENCE = 0.95
PERCENTILES = (50, 90, 95, 99)

# Two-sided 95% Student t critical values by degrees of freedom; between rows the next lower row is used
# (a slightly wider, conservative interval); past 120 the normal value.
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t95(df: int) -> float:
    if df < 1:
        raise ValueError("degrees of freedom must be >= 1")
    if df > 120:
        return 1.960
    return _T95[max(k for k in _T95 if k <= df)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float], unit: str) -> dict[str, Any]:
    if not values:
        raise ValueError("cannot summarize no values")
    data = sorted(float(v) for v in values)
    n = len(data)
    mean = math.fsum(data) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    return {
        "unit": unit,
        "n": n,
        "mean": mean,
        "stdev": stdev,
        "min": data[0],
        "p50": percentile(data, 50),
        "p90": percentile(data, 90),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": data[-1],
        "ci95": t95(n - 1) * stdev / math.sqrt(n) if n > 1 else None,
        **percentile_bounds(data),
    }


def percentile_bounds(data: Sequence[float]) -> dict[str, float | None]:
    """p50_low, p50_high, ... p99_high of sorted values: each percentile's two-sided 95% order-statistic
    interval."""
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        out[f"p{q}_low"], out[f"p{q}_high"] = percentile_interval(data, q)
    return out


def _binomial_cdf_table(n: int, p: float) -> tuple[int, list[float]]:
    """P(B <= k) for B ~ Binomial(n, p), for k from `start` on, where the mass below `start` is negligible
    (computed in logs: n may be a million inter-token latencies)."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    start, stop = max(0, math.floor(mean - 40 * sd) - 10), min(n, math.ceil(mean + 40 * sd) + 10)
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    total, table = 0.0, []
    for k in range(start, stop + 1):
        total += math.exp(log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        table.append(min(total, 1.0))
    return start, table


@lru_cache(maxsize=4096)
def order_statistic_ranks(n: int, q: float, confidence: float = CONFIDENCE) -> tuple[int | None, int | None]:
    """1-based ranks (l, u) with P(X_(l) <= the true q-th percentile <= X_(u)) >= confidence for any continuous
    distribution: B, the count of values at or below the true percentile, is Binomial(n, q/100), and the interval
    holds when l <= B < u. A side that no rank reaches is None (the interval is open there)."""
    if n < 1:
        return None, None
    tail = (1 - confidence) / 2
    start, cdf = _binomial_cdf_table(n, q / 100)

    def at(k: int) -> float:  # P(B <= k)
        return 0.0 if k < start else (cdf[k - start] if k - start < len(cdf) else 1.0)

    # P(B <= k - 1) rises with k: l is the last rank with P(B < l) <= tail, u the first with P(B >= u) <= tail.
    lower = _first(n, lambda k: at(k - 1) > tail) - 1
    upper = _first(n, lambda k: at(k - 1) >= 1 - tail)
    return (lower if lower >= 1 else None), (upper if upper <= n else None)


def _first(n: int, holds: Any) -> int:
    """The smallest k in 1..n for which a condition that stays true once true holds; n + 1 if none."""
    lo, hi = 1, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def percentile_interval(data: Sequence[float], q: float) -> tuple[float | None, float | None]:
    """The 95% interval of the q-th percentile of sorted values, from order statistics (nothing assumed of the
    distribution); None on a side the sample cannot bound."""
    lower, upper = order_statistic_ranks(len(data), q)
    return (data[lower - 1] if lower else None), (data[upper - 1] if upper else None)


def share_verdict(met: int, n: int, target: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Whether at least `target` of all requests would meet the objective, from `met` of `n` that did: "met" when
    the one-sided exact (Clopper-Pearson) bound says so at `confidence`, "missed" when it says the opposite,
    "undecided" when the sample allows neither. The same rule as a percentile's: "p90 within the limit" is "90% of
    requests meet it". `needed`: the fewest requests that could claim "met" at all (every one of them meeting it)."""
    alpha = 1 - confidence
    needed = math.ceil(math.log(alpha) / math.log(target)) if 0 < target < 1 else None
    if n == 0:
        return {"verdict": "undecided", "met": 0, "n": 0, "target": target, "needed": needed}
    # met: P(at least `met` successes | share = target) <= alpha; missed: P(at most `met` | target) <= alpha.
    start, cdf = _binomial_cdf_table(n, target) if 0 < target < 1 else (0, [])

    def at(k: int) -> float:  # P(B <= k) at share = target
        if not cdf:
            return 1.0 if (target == 0 or k >= n) else 0.0
        return 0.0 if k < start else (cdf[k - start] if k - start < len(cdf) else 1.0)

    if 1 - at(met - 1) <= alpha:
        verdict = "met"
    elif at(met) <= alpha:
        verdict = "missed"
    else:
        verdict = "undecided"
    return {"verdict": verdict, "met": met, "n": n, "target": target, "needed": needed}


def wilson_interval(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at small n and at 0 or 1, where mean ± t·se claims a
    width of zero."""
    if n == 0:
        return (0.0, 1.0)
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n passed the bound is exactly 0 or 1; the formula leaves rounding noise there (2.8e-17).
    low = 0.0 if passed == 0 else max(0.0, centre - half)
    high = 1.0 if passed == n else min(1.0, centre + half)
    return (low, high)


def summarize_proportion(flags: Sequence[bool]) -> dict[str, Any]:
    """The statistic of pass/fail outcomes (unit "fraction"): ci95 is the larger side of the Wilson interval,
    whose bounds are kept as ci95_low and ci95_high."""
    stat = summarize([float(f) for f in flags], "fraction")
    low, high = wilson_interval(sum(bool(f) for f in flags), len(flags))
    stat["ci95"] = max(stat["mean"] - low, high - stat["mean"]) if flags else None
    stat["ci95_low"], stat["ci95_high"] = low, high
    return stat


def request_latency(first_s: float, last_s: float, n_out: int, prompt_tokens: int | None = None) -> dict[str, float]:
    """One request's figures (docs/metrics.md), in seconds and tokens/s, from the arrival of its first and last
    output token counted from the request's start, and its output token count: ttft_s, e2e_s, output_tokens, and
    where defined tpot_s (two tokens or more), decode_tok_s (and time between them) and prefill_tok_s."""
    out = {"ttft_s": first_s, "e2e_s": last_s, "output_tokens": float(n_out)}
    if prompt_tokens is not None and first_s > 0:
        out["prefill_tok_s"] = prompt_tokens / first_s
    if n_out > 1 and last_s >= first_s:
        out["tpot_s"] = (last_s - first_s) / (n_out - 1)
        if last_s > first_s:
            out["decode_tok_s"] = (n_out - 1) / (last_s - first_s)
    return out
