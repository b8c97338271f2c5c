"""A sweep's results as one tidy table: a row per point and metric, the statistic's fields as columns."""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import NOT_MEASURED, flatten

GROUP_COLUMNS = ("model", "quant", "attention", "engine", "workflow", "bench")
# ci95_low/ci95_high: the bounds of an asymmetric interval (the Wilson interval of a pass rate), else empty;
# p99_low/p99_high and the like: a percentile's order-statistic interval, empty on a side the sample cannot bound.
PERCENTILE_BOUNDS = tuple(f"p{q}_{side}" for q in (50, 90, 95, 99) for side in ("low", "high"))
STAT_COLUMNS = ("n", "mean", "stdev", "min", "p50", "p90", "p95", "p99", "max", "ci95", "ci95_low", "ci95_high",
                *PERCENTILE_BOUNDS)  # fmt: skip
_CASE = re.compile(r"^(?P<name>[^\[]+)(?:\[(?P<case>.*)\])?$")


def split_metric(key: str) -> tuple[str, str]:
    """'ttft_ms[prompt=128]' -> ('ttft_ms', 'prompt=128'); 'weights_mib' -> ('weights_mib', '')."""
    match = _CASE.match(key)
    assert match is not None
    return match.group("name"), match.group("case") or ""


def quant_used(result: dict[str, Any]) -> str | None:
    """What another engine's quant choice ran as: the GGUF file type (llama.cpp) or the ONNX precision."""
    q = (result.get("resolved") or {}).get("quantization") or {}
    used = q.get("file_type") or q.get("precision")
    return str(used) if used and str(used).lower() != str(result["point"].get("quant")).lower() else None


def _group_label(result: dict[str, Any]) -> str:
    p = result["point"]
    used = quant_used(result)
    parts = [p.get("model", "?"), f"q={p.get('quant', '?')}" + (f" ({used})" if used else "")]
    if p.get("engine") not in (None, "transformers"):
        parts.append(f"engine={p['engine']}")
    if p.get("attention") not in (None, "auto"):
        parts.append(f"attn={p['attention']}")
    if p.get("workflow") not in (None, "none"):
        parts.append(f"wf={p['workflow']}")
    return " ".join(parts)


def point_label(result: dict[str, Any]) -> str:
    """The group choices and any swept field (seed=2) of a point: what a person reads as its name."""
    p = result["point"]
    extra = [f"{k}={v}" for k, v in p.items() if k not in GROUP_COLUMNS]
    return " ".join([_group_label(result), *extra])


def bench_of(result: dict[str, Any]) -> str:
    return str((result.get("config") or {}).get("bench", {}).get("name", result["point"].get("bench")))


def point_labels(results: list[dict[str, Any]]) -> list[str]:
    """A label per result, unique within the list: the point's own label, then (where two points share it, as
    results written before swept fields were recorded do) the config values that tell them apart, then the
    folder."""
    extras = [{k: v for k, v in r["point"].items() if k not in GROUP_COLUMNS} for r in results]
    # a field swept in this set of results is named; one held at the same value everywhere is not
    varying = {k for e in extras for k in e if len({str(x.get(k)) for x in extras}) > 1}
    labels = [
        " ".join([_group_label(r), *(f"{k}={v}" for k, v in e.items() if k in varying)])
        for r, e in zip(results, extras, strict=True)
    ]
    # Labels need to be unique within a bench's table (the same label in two benches names two rows of two tables).
    groups: dict[tuple[str, str], list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault((label, bench_of(results[i])), []).append(i)
    for (label, _), idx in groups.items():
        if len(idx) < 2:
            continue
        flats = [{k: str(v) for k, v in flatten(results[i].get("config") or {}).items()} for i in idx]
        keys = sorted(
            k for k in set().union(*flats) if not k.startswith(NOT_MEASURED) and len({f.get(k) for f in flats}) > 1
        )
        for i, f in zip(idx, flats, strict=True):
            labels[i] = " ".join([label, *(f"{k}={f.get(k)}" for k in keys[:3])])
    seen = collections.Counter((label, bench_of(r)) for label, r in zip(labels, results, strict=True))
    for i, r in enumerate(results):
        if seen[labels[i], bench_of(r)] > 1:
            labels[i] += f" [{'/'.join(Path(r['path']).parts[-3:-1])}]"
    return labels


def point_id(result: dict[str, Any]) -> str:
    """The point's folder relative to its sweep: unique within a sweep, stable across reruns."""
    return Path(result["path"]).parent.name


def tidy(results: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r, label in zip(results, point_labels(results), strict=True):
        base = {
            "point": point_id(r),
            "label": label,
            # what tells the point apart beyond its group choices (seed=2): ratios compare like with like
            "variant": label[len(_group_label(r)) :].strip(),
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
        "variant",
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
    for r, label in zip(results, point_labels(results), strict=True):
        if r["status"] != "ok":
            err = r.get("error") or {}
            out.append(
                {
                    "point": point_id(r),
                    "label": label,
                    "status": r["status"],
                    "type": err.get("type", ""),
                    "message": err.get("message", ""),
                    "hint": err.get("hint", ""),
                }
            )
    return out
