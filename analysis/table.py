"""A sweep's results as one tidy table: a row per point and metric, the statistic's fields as columns."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

GROUP_COLUMNS = ("model", "quant", "attention", "engine", "workflow", "bench")
# ci95_low/ci95_high: the bounds of an asymmetric interval (the Wilson interval of a pass rate), else empty.
STAT_COLUMNS = ("n", "mean", "stdev", "min", "p50", "p90", "p95", "p99", "max", "ci95", "ci95_low", "ci95_high")
_CASE = re.compile(r"^(?P<name>[^\[]+)(?:\[(?P<case>.*)\])?$")


def split_metric(key: str) -> tuple[str, str]:
    """'ttft_ms[prompt=128]' -> ('ttft_ms', 'prompt=128'); 'weights_mib' -> ('weights_mib', '')."""
    match = _CASE.match(key)
    assert match is not None
    return match.group("name"), match.group("case") or ""


def point_label(result: dict[str, Any]) -> str:
    p = result["point"]
    parts = [p.get("model", "?"), f"q={p.get('quant', '?')}"]
    if p.get("attention") not in (None, "auto"):
        parts.append(f"attn={p['attention']}")
    if p.get("workflow") not in (None, "none"):
        parts.append(f"wf={p['workflow']}")
    return " ".join(parts)


def point_id(result: dict[str, Any]) -> str:
    """The point's folder relative to its sweep: unique within a sweep, stable across reruns."""
    return Path(result["path"]).parent.name


def tidy(results: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in results:
        base = {
            "point": point_id(r),
            "label": point_label(r),
            "status": r["status"],
            "bench": r.get("config", {}).get("bench", {}).get("name", r["point"].get("bench")),
            **{g: r["point"].get(g) for g in GROUP_COLUMNS if g != "bench"},
        }
        for key, stat in (r.get("metrics") or {}).items():
            name, case = split_metric(key)
            rows.append(
                {
                    **base,
                    "metric": name,
                    "case": case,
                    "unit": stat.get("unit", ""),
                    **{c: stat.get(c) for c in STAT_COLUMNS},
                }
            )
    columns = [
        "point",
        "label",
        "status",
        *[g for g in GROUP_COLUMNS if g != "bench"],
        "bench",
        "metric",
        "case",
        "unit",
        *STAT_COLUMNS,
    ]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(
        ["bench", "model", "quant", "attention", "metric", "case"], kind="stable", ignore_index=True
    )


def failures(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for r in results:
        if r["status"] != "ok":
            err = r.get("error") or {}
            out.append(
                {
                    "point": point_id(r),
                    "label": point_label(r),
                    "status": r["status"],
                    "type": err.get("type", ""),
                    "message": err.get("message", ""),
                    "hint": err.get("hint", ""),
                }
            )
    return out
