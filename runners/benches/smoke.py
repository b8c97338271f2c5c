"""bench=smoke: one short chat generation, streamed, with its timings (after a short warm-up request).

Seconds long, so CI and a first-time user see the whole path work: load, format, generate, measure, record.
Without the warm-up a single request measures one-off costs (CUDA context and kernel loading: over a second
of TTFT for a tiny model on an H200) instead of the model; the warm-up's figures are kept as cold_start_*.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.engines.base import streamed
from harness.stats import summarize
from runners.benches.measure import (
    REQUEST_UNITS,
    BenchContext,
    BenchOutput,
    generation_params,
    request_headline,
    request_metrics,
)


def run(ctx: BenchContext) -> BenchOutput:
    cfg = ctx.cfg
    messages = []
    if cfg.bench.system_prompt:
        messages.append({"role": "system", "content": cfg.bench.system_prompt})
    messages.append({"role": "user", "content": cfg.bench.prompt})
    params = generation_params(cfg.bench, cfg.seed, force_length=False)
    cold = streamed(ctx.engine, messages, replace(params, max_new_tokens=min(2, params.max_new_tokens)))
    g = streamed(ctx.engine, messages, params)
    out = BenchOutput()
    for key, value in request_metrics(g.start_ns, g.token_ns, g.prompt_tokens).items():
        if key in REQUEST_UNITS:
            name, unit, scale = REQUEST_UNITS[key]
            out.metrics[name] = summarize([value * scale], unit)
            out.samples.append(("smoke", "chat", 0, "", name, value * scale, unit))
    out.metrics["output_tokens"] = summarize([g.output_tokens], "tokens")
    cold_m = request_metrics(cold.start_ns, cold.token_ns, cold.prompt_tokens)
    for key in ("ttft_s", "e2e_s"):
        if key in cold_m:
            out.metrics[f"cold_start_{REQUEST_UNITS[key][0]}"] = summarize([cold_m[key] * 1e3], "ms")
    out.metrics["tokenize_ms"] = summarize([g.tokenize_ns / 1e6], "ms")
    for i, t in enumerate(g.token_ns):
        out.samples.append(("smoke", "chat", 0, i, "token_t_ms", (t - g.start_ns) / 1e6, "ms"))
    out.outputs = [
        {
            "prompt": cfg.bench.prompt,
            "text": g.text,
            "prompt_tokens": g.prompt_tokens,
            "output_tokens": g.output_tokens,
            "finish_reason": g.finish_reason,
        }
    ]
    return out


def headline(metrics: dict[str, Any]) -> str:
    return request_headline(metrics)
