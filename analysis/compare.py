"""Comparing sweeps: per-metric deltas between matching points (same groups, metric and case).

A change is marked significant only when the two 95% confidence intervals do not overlap; a metric without
an interval (a single value) is never marked significant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from analysis.summary import fmt
from analysis.table import tidy
from harness.result import write_text_atomic

KEYS = ["model", "quant", "attention", "engine", "workflow", "bench", "metric", "case"]


def significant(a_mean: float, a_ci: float | None, b_mean: float, b_ci: float | None) -> bool:
    if a_ci is None or b_ci is None or pd.isna(a_ci) or pd.isna(b_ci):
        return False
    return a_mean + a_ci < b_mean - b_ci or b_mean + b_ci < a_mean - a_ci


def compare_frame(sweeps: list[list[dict[str, Any]]], names: list[str]) -> pd.DataFrame:
    """Every metric of every point matched between the first sweep and each other one: both values, the change in
    percent and whether it is significant (empty when no point matches)."""
    base = tidy(sweeps[0])
    base = base[base["status"] == "ok"]
    frames = []
    for other, name in zip(sweeps[1:], names[1:], strict=True):
        rows = tidy(other)
        rows = rows[rows["status"] == "ok"]
        merged = base.merge(rows, on=KEYS, suffixes=("_a", "_b"))
        merged["against"] = name
        frames.append(merged)
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if merged.empty:
        return merged
    merged["delta_pct"] = 100 * (merged["mean_b"] - merged["mean_a"]) / merged["mean_a"].where(merged["mean_a"] != 0)
    merged["significant"] = [significant(r.mean_a, r.ci95_a, r.mean_b, r.ci95_b) for r in merged.itertuples()]
    return merged


def compare(sweeps: list[list[dict[str, Any]]], names: list[str], out: Path) -> str:
    merged = compare_frame(sweeps, names)
    if merged.empty:
        text = "No matching points (same model, quant, attention, engine, workflow, bench, metric and case).\n"
        write_text_atomic(out / "compare.md", text)
        return text
    columns = [*KEYS, "unit_a", "mean_a", "ci95_a", "mean_b", "ci95_b", "delta_pct", "significant", "against"]
    write_text_atomic(out / "compare.csv", merged[columns].to_csv(index=False))
    lines = [
        f"# Comparison against {names[0]}\n",
        "Significant: the 95% confidence intervals do not overlap.\n",
        "| point | metric | A | B | Δ % | significant |",
        "|---|---|---|---|---|---|",
    ]
    for r in merged.itertuples():
        ci_a = f" ± {fmt(r.ci95_a)}" if not pd.isna(r.ci95_a) else ""
        ci_b = f" ± {fmt(r.ci95_b)}" if not pd.isna(r.ci95_b) else ""
        metric = f"{r.metric}[{r.case}]" if r.case else r.metric
        lines.append(
            f"| {r.model} q={r.quant} {r.bench} | {metric} ({r.unit_a}) | {fmt(r.mean_a)}{ci_a} | "
            f"{fmt(r.mean_b)}{ci_b} | {fmt(r.delta_pct)} | {'yes' if r.significant else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "compare.md", text)
    return text
