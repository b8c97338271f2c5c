"""bench=latency: per prompt length, streamed requests with the output length forced.

The very first request of the point is kept apart as cold_start; warm-up requests follow and are excluded;
then requests repeat until the stop rule holds for the primary metric. Every request's metrics and every
token's timestamp go to samples.csv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.bandwidth import mbu, peak_bandwidth
from harness.energy import phase_figures
from harness.engines import GenerationParams
from harness.engines.base import streamed
from harness.prompts import TokenPrompt, exact_prompt
from harness.stats import summarize
from runners.benches.measure import (
    REQUEST_UNITS,
    BenchContext,
    BenchOutput,
    StopRule,
    case_key,
    generation_params,
    itl_s,
    repeat_until_stable,
    request_headline,
    request_metrics,
    trial_spread,
)

# Prompts of bench.prompt_lengths tokens followed by bench.max_new_tokens generated ones: the sweep checks before
# any model loads that they fit the model's context window.
EXACT_LENGTH_PROMPTS = True


@dataclass
class _Case:
    per_request: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in REQUEST_UNITS})
    itls: list[float] = field(default_factory=list)
    mismatches: int = 0


def _measure_case(
    ctx: BenchContext, out: BenchOutput, prompt: TokenPrompt, case: str, params: GenerationParams
) -> tuple[_Case, dict]:
    """Requests at one prompt length until the stop rule holds; raw values to out.samples."""
    bench = ctx.cfg.bench
    data = _Case()
    primary = {"e2e_ms": "e2e_s", "ttft_ms": "ttft_s", "tpot_ms": "tpot_s"}[bench.primary_metric]

    def one_request() -> float:
        request = len(data.per_request["e2e_s"])
        g = streamed(ctx.engine, prompt, params)
        m = request_metrics(g.start_ns, g.token_ns, g.prompt_tokens)
        if g.output_tokens != params.max_new_tokens:
            data.mismatches += 1
        for key, (name, unit, scale) in REQUEST_UNITS.items():
            if key in m:
                data.per_request[key].append(m[key])
                out.samples.append(("latency", case, request, "", name, m[key] * scale, unit))
        out.samples.append(("latency", case, request, "", "output_tokens", g.output_tokens, "tokens"))
        out.samples.append(("latency", case, request, "", "prompt_tokens", g.prompt_tokens, "tokens"))
        # When it started on the point's clock (result.details.clock): what a trace of the point is built from.
        out.samples.append(("latency", case, request, "", "t_start_s", g.start_ns / 1e9 - ctx.clock_perf_s, "s"))
        for i, t in enumerate(g.token_ns):
            out.samples.append(("latency", case, request, i, "token_t_ms", (t - g.start_ns) / 1e6, "ms"))
        data.itls.extend(itl_s(g.token_ns, g.first_chunk_tokens))
        return m.get(primary, m["e2e_s"])

    _, how = repeat_until_stable(StopRule.of(bench), one_request, ctx.progress, f"latency {case}: ")
    return data, how


def _case(
    ctx: BenchContext,
    out: BenchOutput,
    prompt: TokenPrompt,
    params: GenerationParams,
    peak: dict[str, Any],
    labels: dict[str, Any],
    point_warmup: bool,
) -> None:
    """One case (a prompt length, and its trial): warm-up, requests until the stop rule holds, its figures."""
    bench, loaded = ctx.cfg.bench, ctx.loaded
    p_len = labels["prompt"]
    case = ",".join(f"{k}={v}" for k, v in labels.items())
    warmup = "phase=warmup" if point_warmup else f"warmup[{case}]"  # the point's warm-up is the first case's
    ctx.mark(f"{warmup}:start")
    for _ in range(bench.warmup_runs):
        streamed(ctx.engine, prompt, params)
    ctx.mark(f"{warmup}:end")
    ctx.mark(f"{case}:start")
    data, how = _measure_case(ctx, out, prompt, case, params)
    ctx.mark(f"{case}:end")
    if ctx.energy is not None:  # every run produced the forced output length
        runs = len(data.per_request.get("e2e_s", []))
        out.metrics.update(phase_figures(ctx.energy, case, runs * params.max_new_tokens))
    for key, values in data.per_request.items():
        if values:
            name, unit, scale = REQUEST_UNITS[key]
            out.metrics[case_key(name, **labels)] = summarize([v * scale for v in values], unit)
    if data.itls:
        out.metrics[case_key("itl_ms", **labels)] = summarize([v * 1e3 for v in data.itls], "ms")
    decode = out.metrics.get(case_key("decode_tok_s", **labels))
    if decode:
        context = p_len + params.max_new_tokens / 2  # mean KV length read while decoding
        value = mbu(decode["mean"], loaded.footprint_bytes, loaded.kv_bytes_per_position, context, peak["bytes_per_s"])
        out.metrics[case_key("mbu", **labels)] = summarize([value], "fraction")
    out.details["cases"][case] = {
        **how,
        "primary_metric": bench.primary_metric,
        "prompt_tokens": p_len,
        "output_tokens": params.max_new_tokens,
    }
    out.details["length_mismatches"] += data.mismatches


TRIAL_FIGURES = (("ttft_ms", "p50"), ("tpot_ms", "p50"), ("e2e_ms", "p50"), ("decode_tok_s", "mean"))


def run(ctx: BenchContext) -> BenchOutput:
    bench, loaded = ctx.cfg.bench, ctx.loaded
    params = generation_params(bench, ctx.cfg.seed)
    out = BenchOutput()
    peak = peak_bandwidth(loaded.placement.device, ctx.cfg.cache_path)
    out.details = {"stop_rule": vars(StopRule.of(bench)), "peak_bandwidth": peak, "cases": {}, "length_mismatches": 0}
    for index, p_len in enumerate(bench.prompt_lengths):
        prompt = exact_prompt(loaded, p_len)
        if index == 0:  # the point's very first request: module loading, allocator growth, kernel choice
            cold = streamed(ctx.engine, prompt, params)
            cold_m = request_metrics(cold.start_ns, cold.token_ns, cold.prompt_tokens)
            for key in ("ttft_s", "e2e_s"):
                out.metrics[f"cold_start_{REQUEST_UNITS[key][0]}"] = summarize([cold_m[key] * 1e3], "ms")
        if bench.trials == 1:
            _case(ctx, out, prompt, params, peak, {"prompt": p_len}, point_warmup=index == 0)
            continue
        # bench.trials: the case from a fresh engine (and server) state each time, and the spread between trials
        keys, fresh = [], []
        for trial in range(1, bench.trials + 1):
            if trial > 1 or index > 0:
                fresh.append(ctx.renew_engine())
            case = {"prompt": p_len, "trial": trial}
            _case(ctx, out, prompt, params, peak, case, point_warmup=index == 0 and trial == 1)
            keys.append(",".join(f"{k}={v}" for k, v in case.items()))
        spread = trial_spread(out.metrics, keys, f"prompt={p_len}", TRIAL_FIGURES)
        out.details.setdefault("trials", {})[f"prompt={p_len}"] = {"trials": bench.trials, "cases": keys,
                                                                   "figures": spread, "fresh_state": fresh}  # fmt: skip
    # What the point holds beside how fast it runs, so a speed table compares engines and quantizations on
    # memory too (bench=memory measures growth per prompt and batch).
    out.metrics["weights_mib"] = summarize([loaded.weights_bytes / 2**20], "MiB")
    if ctx.load_memory.get("rss_peak_bytes"):
        out.metrics["load_rss_peak_mib"] = summarize([ctx.load_memory["rss_peak_bytes"] / 2**20], "MiB")
    if out.details["length_mismatches"]:
        out.details["warning"] = (
            f"{out.details['length_mismatches']} requests did not produce the forced output "
            f"length of {params.max_new_tokens} tokens"
        )
    return out


def headline(metrics: dict[str, Any]) -> str:
    return request_headline(metrics)
