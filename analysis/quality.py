"""The model-quality table: one row per model × quantization, with every workflow's pass rate beside the
perplexity, bits per byte, decode rate and weights memory of the same point (docs/real_model_guide.md).

It is built from bench=e2e results (perplexity from their `bench.perplexity=true` scoring, or from a
bench=quality point of the same model and quantization) and is absent from a sweep that has no e2e point.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pandas as pd

from analysis.summary import fmt
from analysis.table import bench_of, point_labels


def _row_key(label: str) -> str:
    # A row is a point's label without its workflow: model, quantization, attention and any swept field, so
    # bf16 and fp32 of one model (model.dtype swept) stay two rows.
    return " ".join(part for part in label.split() if not part.startswith("wf="))


def _pass_cell(stat: dict[str, Any]) -> str:
    n = int(stat["n"])
    return f"{round(stat['mean'] * n)}/{n} = {fmt(stat['mean'])} [{fmt(stat['ci95_low'])}, {fmt(stat['ci95_high'])}]"


def _dtype(result: dict[str, Any]) -> str:
    resolved = result.get("resolved") or {}
    quant = (resolved.get("quantization") or {}).get("name", "none")
    return resolved.get("dtype", "?") if quant == "none" else f"{quant} ({resolved.get('dtype', '?')} compute)"


def model_quality_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows: model and quantization; columns: each workflow's pass rate (passed/n = rate [Wilson 95%]),
    perplexity and bits per byte, decode tok/s over every workflow request, and weights memory."""
    rows: dict[str, dict[str, Any]] = {}
    workflows: set[str] = set()
    for r, label in zip(results, point_labels(results), strict=True):
        if r.get("status") != "ok" or bench_of(r) not in ("e2e", "quality"):
            continue
        row = rows.setdefault(_row_key(label), {"decode": [], "ppl": [], "bpb": []})
        m = r.get("metrics") or {}
        if "perplexity" in m:
            row["ppl"].append(m["perplexity"]["mean"])
            row["bpb"].append(m["bits_per_byte"]["mean"])
        if bench_of(r) != "e2e":
            continue
        workflow = r["point"].get("workflow", "?")
        workflows.add(workflow)
        row[workflow] = _pass_cell(m["pass_rate"])
        if "content_pass_rate" in m and "format_pass_rate" in m:
            row[f"{workflow} split"] = f"{fmt(m['content_pass_rate']['mean'])}, {fmt(m['format_pass_rate']['mean'])}"
        if "decode_tok_s" in m:
            row["decode"].append((m["decode_tok_s"]["mean"], m["decode_tok_s"]["n"]))
        footprint = (r.get("resolved") or {}).get("footprint_bytes")
        if footprint:
            row["weights"] = footprint / 2**20
        row["dtype"] = _dtype(r)
    table: dict[str, dict[str, str]] = {}
    for key, row in rows.items():
        if not any(w in row for w in workflows):
            continue  # a quality point alone, with no workflow run beside it
        cells = {"dtype": row.get("dtype", "–")}
        cells.update({f"{w} pass rate": row.get(w, "–") for w in sorted(workflows)})
        # What the answers said and how: a rate of 0 with content 0.8 is a format problem, not a knowledge one.
        cells.update({f"{w} content, format": row.get(f"{w} split", "–") for w in sorted(workflows)})
        # The same text is scored at every e2e point of a row: the values agree, and the first is shown.
        cells["perplexity"] = fmt(row["ppl"][0]) if row["ppl"] else "–"
        cells["bits per byte"] = fmt(row["bpb"][0]) if row["bpb"] else "–"
        n = sum(count for _, count in row["decode"])
        cells["decode tok/s"] = fmt(sum(mean * count for mean, count in row["decode"]) / n) if n else "–"
        cells["weights MiB"] = fmt(row["weights"]) if "weights" in row else "–"
        table[key] = cells
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("point")


def _case_outcomes(result: dict[str, Any]) -> dict[str, bool]:
    """case id -> passed, from the cases.jsonl beside an e2e result (empty where it is missing or unreadable)."""
    import json
    from pathlib import Path

    path = Path(result.get("path", "")).parent / "cases.jsonl"
    out: dict[str, bool] = {}
    try:
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                out[str(record["id"])] = bool(record["passed"])
    except OSError:
        return {}
    return out


def case_agreement_table(results: list[dict[str, Any]], shown: int = 6) -> pd.DataFrame:
    """For each workflow, every pair of its e2e points over the cases both ran: how many both passed, both
    failed, and only one passed, with the cases that flipped; so a reader sees whether two points differ by a few
    cases (noise) or systematically."""
    by_workflow: dict[str, list[tuple[str, dict[str, bool]]]] = {}
    for r, label in zip(results, point_labels(results), strict=True):
        if r.get("status") == "ok" and bench_of(r) == "e2e":
            outcomes = _case_outcomes(r)
            if outcomes:
                by_workflow.setdefault(r["point"].get("workflow", "?"), []).append((label, outcomes))
    rows = []
    for workflow, points in sorted(by_workflow.items()):
        for i, (a, first) in enumerate(points):
            for b, second in points[i + 1 :]:
                common = sorted(set(first) & set(second))
                only_a = [c for c in common if first[c] and not second[c]]
                only_b = [c for c in common if second[c] and not first[c]]
                rows.append(
                    {
                        "workflow": workflow,
                        "points": f"A: {a} · B: {b}",
                        "cases": len(common),
                        "both pass": sum(first[c] and second[c] for c in common),
                        "both fail": sum(not first[c] and not second[c] for c in common),
                        "only A": len(only_a),
                        "only B": len(only_b),
                        "flipped": ", ".join((only_a + only_b)[:shown])
                        + (" …" if len(only_a) + len(only_b) > shown else ""),
                    }
                )
    return pd.DataFrame(rows)
