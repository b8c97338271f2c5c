"""summary.csv and summary.md: one table per bench, points as rows, key metrics as columns, and ratios against
a baseline point (by default quant=none of the same model, attention and bench; engine=transformers where the
results compare engines)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from harness.result import write_text_atomic

# The metrics a person reads first, per bench; other benches show every metric.
KEY_METRICS = {
    "smoke": ("ttft_ms", "decode_tok_s", "e2e_ms", "output_tokens"),
    "latency": ("ttft_ms", "tpot_ms", "decode_tok_s", "e2e_ms", "mbu", "weights_mib", "load_rss_peak_mib"),
    "memory": (
        "weights_mib",
        "load_rss_peak_mib",
        "rss_after_first_request_mib",
        "load_cuda_peak_mib",
        "cuda_after_first_request_mib",
        "inference_growth_rss_mib",
        "inference_growth_cuda_mib",
    ),
    "throughput": (
        "single_output_tok_s",
        "output_tok_s",
        "concurrent_output_tok_s",
        "requests_s",
        "latency_ms",
        "queue_wait_ms",
        "mbu",
        "single_mbu",
    ),
    "e2e": (
        "pass_rate",
        "content_pass_rate",
        "format_pass_rate",
        "check_pass_rate",
        "keyword_recall",
        "citation_precision",
        "retrieval_hit_rate",
        "structure_score",
        "fact_recall",
        "truncated_conversations",
        "ttft_ms",
        "e2e_ms",
        "decode_tok_s",
    ),
    "quality": ("perplexity", "bits_per_byte", "nll_per_token", "scored_tokens"),
}
# bench=serve: one row per point and load level, these (metric, statistic) columns.
SERVE_COLUMNS = (
    ("offered_rate_rps", "mean", "offered req/s"),
    ("achieved_rate_rps", "mean", "sent req/s"),
    ("request_throughput_rps", "mean", "done req/s"),
    ("goodput_rps", "mean", "goodput req/s"),
    ("slo_attainment", "mean", "SLO met"),
    ("pass_rate", "mean", "pass rate"),
    ("content_pass_rate", "mean", "content pass"),
    ("format_pass_rate", "mean", "format pass"),
    ("correct_goodput_rps", "mean", "correct goodput req/s"),
    ("output_tok_s", "mean", "output tok/s"),
    ("ttft_ms", "p50", "TTFT p50 ms"),
    ("ttft_ms", "p99", "TTFT p99 ms"),
    ("ttft_sched_ms", "p99", "TTFT from schedule p99 ms"),
    ("tpot_ms", "p50", "TPOT p50 ms"),
    ("tpot_ms", "p99", "TPOT p99 ms"),
    ("itl_ms", "p50", "ITL p50 ms"),
    ("itl_ms", "p99", "ITL p99 ms"),
    ("chunk_itl_ms", "p99", "chunk ITL p99 ms"),
    ("e2e_ms", "p99", "E2E p99 ms"),
    ("lateness_ms", "p99", "send lateness p99 ms"),
    ("failed", "mean", "failed"),
    ("short_outputs", "mean", "short outputs"),
    ("token_count_mismatches", "mean", "count mismatches"),
    # Shown where a level has them: a thinking model's answer TTFT, the prefix cache, the token accounting, and
    # the server's own figures from its /metrics (docs/metrics.md).
    ("ttft_answer_ms", "p50", "answer TTFT p50 ms"),
    ("ttft_answer_ms", "p99", "answer TTFT p99 ms"),
    ("reasoning_tokens", "mean", "reasoning tokens"),
    ("prefix_cache_hit_rate", "mean", "cache hit rate"),
    ("token_count_mismatch_share", "mean", "count mismatch share"),
    ("server_queue_ms", "mean", "server queue ms"),
    ("server_prefill_ms", "mean", "server prefill ms"),
    ("server_decode_ms", "mean", "server decode ms"),
    ("server_preemptions", "mean", "server preemptions"),
    ("server_prefix_cache_hit_rate", "mean", "server cache hit rate"),
    ("server_running", "mean", "server running"),
    ("server_waiting", "max", "server waiting max"),
    ("server_kv_cache_usage", "max", "server KV cache max"),
    ("joules_per_token", "mean", "J/token"),
    ("joules_per_correct", "mean", "J/correct answer"),
    ("cost_per_mtok", "mean", "price/Mtok"),
)
MATCH = ("model", "attention", "engine", "workflow", "bench", "variant")


def fmt(value: float | None) -> str:
    """Four significant digits, the same in every table (tests read the numbers back)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}"


def column_name(metric: str, case: str, unit: str) -> str:
    return f"{metric}[{case}] ({unit})" if case else f"{metric} ({unit})"


def natural_key(case: str) -> tuple:
    """prompt=32 before prompt=128: numbers compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case))


def _ordered(rows: pd.DataFrame, bench: str) -> pd.DataFrame:
    keys = KEY_METRICS.get(bench)
    if keys:
        rows = rows[rows["metric"].isin(keys)]
    order = {m: i for i, m in enumerate(keys or sorted(set(rows["metric"])))}
    return rows.assign(_order=rows["metric"].map(order), _case=rows["case"].map(natural_key)).sort_values(
        ["_order", "_case"], kind="stable"
    )


def bench_table(frame: pd.DataFrame, bench: str) -> pd.DataFrame:
    """Points × metric columns of 'mean ± ci95' (the mean alone when there is no interval)."""
    rows = _ordered(frame[(frame["bench"] == bench) & (frame["status"] == "ok")], bench)
    table: dict[str, dict[str, str]] = {}
    for _, r in rows.iterrows():
        if r["ci95_low"] is not None and not pd.isna(r["ci95_low"]):
            cell = f"{fmt(r['mean'])} [{fmt(r['ci95_low'])}, {fmt(r['ci95_high'])}]"
        elif r["ci95"] is None or pd.isna(r["ci95"]):
            cell = fmt(r["mean"])
        else:
            cell = f"{fmt(r['mean'])} ± {fmt(r['ci95'])}"
        table.setdefault(r["label"], {})[column_name(r["metric"], r["case"], r["unit"])] = cell
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("point")


def _with_bounds(row: pd.Series, stat: str) -> str:
    """A percentile with its 95% order-statistic interval ('412 [380, 460]'; '–' on a side the sample cannot
    bound: a p99 of fewer than 368 requests has no upper bound); other statistics alone."""
    low, high = row.get(f"{stat}_low"), row.get(f"{stat}_high")
    if pd.isna(low) and pd.isna(high):
        return fmt(row[stat])
    return f"{fmt(row[stat])} [{fmt(low)}, {fmt(high)}]"


def serve_table(frame: pd.DataFrame) -> pd.DataFrame:
    """bench=serve: a row per point and load level (closed-loop concurrency, then open-loop rates), with the
    percentiles that matter under load."""
    rows = frame[(frame["bench"] == "serve") & (frame["status"] == "ok")]
    table: dict[tuple[str, str], dict[str, str]] = {}
    for _, r in rows.iterrows():
        for metric, stat, title in SERVE_COLUMNS:
            if r["metric"] == metric and r["case"]:
                table.setdefault((r["label"], r["case"]), {})[title] = _with_bounds(r, stat)
    if not table:
        return pd.DataFrame()
    order = sorted(table, key=lambda k: (k[0], k[1].startswith("rate"), natural_key(k[1])))
    out = pd.DataFrame([{"point": f"{p} @ {lv}", **table[(p, lv)]} for p, lv in order])
    titles = [t for _, _, t in SERVE_COLUMNS if t in out.columns]
    return out.set_index("point")[titles]


def _match_columns(key: str) -> list[str]:
    # An engine baseline compares every engine and quantization with that engine's quant=none point: the other
    # engines' quantization and attention choices are their own, so they are not matched.
    drop = {"engine", "quant", "attention"} if key == "engine" else {key}
    return [c for c in MATCH if c not in drop]


def default_baseline(frame: pd.DataFrame) -> tuple[str, str]:
    """quant=none, unless the results compare engines: then engine=transformers (or the first engine by name)."""
    engines = sorted(frame["engine"].dropna().unique())
    if len(engines) > 1:
        return "engine", "transformers" if "transformers" in engines else engines[0]
    return "quant", "none"


def describe_baseline(baseline: tuple[str, str]) -> str:
    key, value = baseline
    if key == "engine":
        return f"engine={value} quant=none of the same model, workflow, bench and swept fields"
    return f"{key}={value} of the same " + ", ".join(
        c if c != "variant" else "swept fields" for c in _match_columns(key)
    )


def ratios(frame: pd.DataFrame, bench: str, baseline: tuple[str, str]) -> pd.DataFrame:
    """mean / baseline mean for each key metric, where the point's baseline (same MATCH groups) exists."""
    key, value = baseline
    rows = _ordered(frame[(frame["bench"] == bench) & (frame["status"] == "ok")], bench)
    base = rows[rows[key] == value]
    if key == "engine":
        base = base[base["quant"] == "none"]
    other = _match_columns(key)
    merged = rows.merge(base, on=[*other, "metric", "case"], suffixes=("", "_base"), sort=False)
    merged = merged[merged["point"] != merged["point_base"]]
    table: dict[str, dict[str, str]] = {}
    for _, r in merged.iterrows():
        if r["mean_base"]:
            table.setdefault(r["label"], {})[column_name(r["metric"], r["case"], "×")] = fmt(r["mean"] / r["mean_base"])
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("point")


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_none_\n"
    header = ["point", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.iterrows():
        lines.append("| " + " | ".join([str(label), *[("–" if pd.isna(v) else str(v)) for v in row]]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(
    frame: pd.DataFrame,
    failed: list[dict[str, str]],
    folder: Path,
    baseline: tuple[str, str],
    quality: pd.DataFrame | None = None,
    agreement: pd.DataFrame | None = None,
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """quality: the model-quality table (analysis.quality), shown first when the sweep ran workflows; agreement:
    which cases two points of one workflow decided differently."""
    write_text_atomic(folder / "summary.csv", frame.to_csv(index=False))
    tables = {}
    parts = [
        "# Sweep summary\n",
        f"Baseline for ratios: {describe_baseline(baseline)}. Cells are mean ± 95% CI half-width, "
        "or mean [95% Wilson interval] for pass rates.\n",
    ]
    if quality is not None and not quality.empty:
        tables["model quality"] = (quality, pd.DataFrame())
        parts.append(
            "\n## Model quality\n\nPass rates as passed/cases = rate [Wilson 95% interval]; perplexity and bits per "
            "byte of the built-in text; decode tok/s over every workflow request; weights as loaded.\n\n"
            + to_markdown(quality)
        )
    if agreement is not None and not agreement.empty:
        tables["case agreement"] = (agreement.set_index("points"), pd.DataFrame())
        parts.append(
            "\n## Case agreement\n\nPairs of points of one workflow, over the cases both ran: a difference of a "
            "few flipped cases is within noise; many in one direction is a real difference.\n\n"
            + to_markdown(agreement.set_index("points"))
        )
    for bench in sorted(frame["bench"].dropna().unique()):
        rows = frame[frame["bench"] == bench]
        # Workflows judge different things: one table each, so a column never mixes two workflows' checks.
        workflows = sorted(w for w in rows["workflow"].dropna().unique() if w != "none")
        for workflow in workflows or [None]:
            part = rows if workflow is None else rows[rows["workflow"] == workflow]
            title = bench if workflow is None else f"{bench}: {workflow}"
            if bench == "serve":  # load levels are rows: a level's percentiles side by side
                values, rel = serve_table(part), pd.DataFrame()
            else:
                values, rel = bench_table(part, bench), ratios(part, bench, baseline)
            tables[title] = (values, rel)
            parts.append(f"\n## {title}\n\n{to_markdown(values)}")
            if not rel.empty:
                parts.append(f"\nRatio to {baseline[0]}={baseline[1]}:\n\n{to_markdown(rel)}")
    if failed:
        parts.append(
            "\n## Points that did not finish\n\n| point | status | error | message | fix |\n|---|---|---|---|---|\n"
        )
        for f in failed:
            parts.append(f"| {f['label']} | {f['status']} | {f['type']} | {f['message']} | {f['hint']} |\n")
    write_text_atomic(folder / "summary.md", "".join(parts))
    return tables
