"""bench=e2e: run a workflow's cases at this sweep point, judge each, and report pass rates beside latency.

Each case's record (input, output, every check with pass/fail and why, request timings) is appended to
cases.jsonl as soon as the case ends, so a crash keeps the cases already run. A case whose generation fails
(an error from the engine, not from the model's answer) is recorded as failed with that error and counted
against the pass rate; running out of memory stops the point.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from harness.errors import InferenceError, OutOfMemoryError
from harness.stats import summarize, summarize_proportion, wilson_interval
from harness.workflows import CaseResult, Workflow, create_workflow
from harness.workflows.checks import Check, passed_on
from runners.benches import quality
from runners.benches.measure import (
    REQUEST_UNITS,
    BenchContext,
    BenchOutput,
    case_key,
    generation_params,
    request_metrics,
)

CASES_FILE = "cases.jsonl"
_REQUEST_METRICS = {**REQUEST_UNITS, "output_tokens": ("output_tokens", "tokens", 1.0)}


def _failed_case(case: dict[str, Any], exc: InferenceError) -> CaseResult:
    return CaseResult(
        id=case["id"],
        input=case,
        output="",
        checks=[Check("generated", False, f"{exc.cause} Fix: {exc.fix}")],
    )


def run(ctx: BenchContext) -> BenchOutput:
    cfg = ctx.cfg
    workflow: Workflow = ctx.workflow or create_workflow(cfg.workflow)
    params = generation_params(cfg.bench, cfg.seed, force_length=False)
    params = replace(params, max_new_tokens=cfg.workflow.max_new_tokens)
    out = BenchOutput()
    results: list[CaseResult] = []
    records_path = ctx.out_dir / CASES_FILE if ctx.out_dir else None
    sink = records_path.open("w", encoding="utf-8") if records_path else None
    try:
        for n, case in enumerate(workflow.cases):
            passed = sum(r.passed for r in results)
            ctx.progress(f"{workflow.name} case {n + 1}/{len(workflow.cases)} ({case['id']}), {passed} of {n} passed")
            try:
                result = workflow.run_case(case, ctx.engine, ctx.loaded, params)
            except OutOfMemoryError:
                raise
            except InferenceError as exc:
                result = _failed_case(case, exc)
            results.append(result)
            if sink:
                sink.write(json.dumps(result.record(workflow.name), ensure_ascii=False) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()

    passed = sum(r.passed for r in results)
    out.metrics["pass_rate"] = summarize_proportion([r.passed for r in results])
    # What the answers said and how they said it, apart: a model can know the answer and miss the format (no
    # citation, cut at the token limit), or keep the format and miss the content.
    for kind in ("content", "format"):
        out.metrics[f"{kind}_pass_rate"] = summarize_proportion([passed_on(r.checks, kind) for r in results])
    names = list(dict.fromkeys(c.name for r in results for c in r.checks))
    for name in names:
        flags = [c.passed for r in results for c in r.checks if c.name == name]
        out.metrics[case_key("check_pass_rate", check=name)] = summarize_proportion(flags)
    for name, values in workflow.metrics([r for r in results if r.requests]).items():
        if values:
            out.metrics[name] = (
                summarize_proportion(values) if isinstance(values[0], bool) else summarize(values, "fraction")
            )
    per_request: dict[tuple[str, str], list[float]] = {}
    for r in results:
        for turn, g in enumerate(r.requests):  # one request per case, or one per turn of a conversation
            for key, value in request_metrics(g.start_ns, g.token_ns, g.prompt_tokens).items():
                if key in _REQUEST_METRICS:
                    name, unit, scale = _REQUEST_METRICS[key]
                    per_request.setdefault((name, unit), []).append(value * scale)
                    out.samples.append(("e2e", r.id, turn, "", name, value * scale, unit))
    for (name, unit), values in per_request.items():
        out.metrics[name] = summarize(values, unit)
    out.details = {
        "workflow": workflow.name,
        "cases_file": str(workflow.cases_file),
        "cases": len(results),
        "passed": passed,
        "failed_cases": [r.id for r in results if not r.passed],
        "records": CASES_FILE,
        "max_new_tokens": params.max_new_tokens,
    }
    if cfg.bench.perplexity:
        # The same scoring as bench=quality, so one sweep over models and quantizations gives the pass rates and
        # the perplexity of each point side by side (docs/real_model_guide.md's quality table).
        scored = quality.run(ctx)
        out.metrics.update(scored.metrics)
        out.samples.extend(scored.samples)
        out.details["perplexity"] = scored.details
    out.outputs = [
        {"id": r.id, "passed": r.passed, "text": r.output if isinstance(r.output, str) else "\n".join(r.output)}
        for r in results
    ]
    return out


def cases_needed(min_pass_rate: float) -> int | None:
    """The fewest cases whose 95% Wilson interval can clear the threshold at all (every one of them passing);
    None for a threshold of 1, which no finite sample clears."""
    if min_pass_rate >= 1:
        return None
    n = 1
    while wilson_interval(n, n)[0] < min_pass_rate:
        n += 1
    return n


def below_gate(result: Any, min_pass_rate: float | None) -> str | None:
    """Why an ok bench=e2e result falls below the release gate (validation.min_pass_rate), or None. The gate
    takes the lower end of the pass rate's 95% interval: a point passes when the cases show, not merely suggest,
    a rate at the threshold."""
    if min_pass_rate is None or result.status != "ok" or "pass_rate" not in result.metrics:
        return None
    rate = result.metrics["pass_rate"]
    low = rate.get("ci95_low", rate["mean"])
    if low >= min_pass_rate:
        return None
    workflow = result.details.get("workflow", "?")
    needed = cases_needed(min_pass_rate)
    size = (
        f" A verdict at this threshold needs at least {needed} cases (all passing); this point ran {rate['n']}."
        if needed and rate["n"] < needed
        else ""
    )
    return (
        f"release gate: {workflow} passed {rate['mean']:.1%} of {rate['n']} cases (95% interval from {low:.1%}), "
        f"below validation.min_pass_rate={min_pass_rate:g}.{size} The failed cases and the check that failed each "
        f"are in {CASES_FILE} beside result.json."
    )


def headline(metrics: dict[str, Any]) -> str:
    """The pass rate, and how many cases could not be generated at all."""
    if "pass_rate" not in metrics:
        return ""
    rate = metrics["pass_rate"]
    line = f"pass rate {rate['mean']:.0%} of {rate['n']} cases"
    errored = metrics.get("check_pass_rate[check=generated]")
    if errored:
        line += f" ({errored['n']} could not be generated: the reason is in cases.jsonl)"
    return line
