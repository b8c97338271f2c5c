"""bench=smoke: one short chat generation, streamed, with its timings (after a short warm-up request).

Seconds long, so CI and a first-time user see the whole path work: load, format, generate, measure, record.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.config import HarnessConfig
from harness.engines import Engine, GenerationParams
from harness.stats import summarize


def generation_params(cfg: HarnessConfig) -> GenerationParams:
    b = cfg.bench
    return GenerationParams(
        max_new_tokens=b.max_new_tokens,
        temperature=b.temperature,
        top_p=b.top_p,
        top_k=b.top_k,
        repetition_penalty=b.repetition_penalty,
        seed=cfg.seed,
    )


def request_metrics(start_ns: int, token_ns: list[int], prompt_tokens: int) -> dict[str, float]:
    """TTFT, E2E, TPOT, decode and prefill tok/s of one streamed request (DESIGN.md definitions)."""
    if not token_ns:
        return {}
    ttft_s = (token_ns[0] - start_ns) / 1e9
    e2e_s = (token_ns[-1] - start_ns) / 1e9
    out: dict[str, float] = {"ttft_s": ttft_s, "e2e_s": e2e_s, "output_tokens": float(len(token_ns))}
    if ttft_s > 0:
        out["prefill_tok_s"] = prompt_tokens / ttft_s
    if len(token_ns) > 1 and e2e_s > ttft_s:
        out["tpot_s"] = (e2e_s - ttft_s) / (len(token_ns) - 1)
        out["decode_tok_s"] = (len(token_ns) - 1) / (e2e_s - ttft_s)
    return out


_UNITS = {
    "ttft_s": ("ttft_ms", "ms", 1e3),
    "e2e_s": ("e2e_ms", "ms", 1e3),
    "tpot_s": ("tpot_ms", "ms", 1e3),
    "decode_tok_s": ("decode_tok_s", "tok/s", 1.0),
    "prefill_tok_s": ("prefill_tok_s", "tok/s", 1.0),
    "output_tokens": ("output_tokens", "tokens", 1.0),
}


def _streamed(engine: Engine, messages: list[dict[str, str]], params: GenerationParams):
    stream = engine.stream(messages, params)
    for _ in stream:
        pass
    assert stream.generation is not None
    return stream.generation


def _statistics(raw: dict[str, float], prefix: str = "") -> dict[str, dict[str, Any]]:
    metrics = {}
    for key, value in raw.items():
        name, unit, scale = _UNITS[key]
        metrics[prefix + name] = summarize([value * scale], unit)
    return metrics


def run_smoke(engine: Engine, cfg: HarnessConfig) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """A short warm-up request first (its figures kept apart as cold_start_*), then the measured one.

    Without the warm-up a single request measures one-off costs (CUDA context and kernel loading: over a
    second of TTFT for a tiny model on an H200) instead of the model.
    """
    messages = []
    if cfg.bench.system_prompt:
        messages.append({"role": "system", "content": cfg.bench.system_prompt})
    messages.append({"role": "user", "content": cfg.bench.prompt})
    params = generation_params(cfg)
    cold = _streamed(engine, messages, replace(params, max_new_tokens=min(2, params.max_new_tokens)))
    generation = _streamed(engine, messages, params)
    metrics = _statistics(request_metrics(generation.start_ns, generation.token_ns, generation.prompt_tokens))
    cold_raw = request_metrics(cold.start_ns, cold.token_ns, cold.prompt_tokens)
    metrics.update(_statistics({k: cold_raw[k] for k in ("ttft_s", "e2e_s") if k in cold_raw}, "cold_start_"))
    metrics["tokenize_ms"] = summarize([generation.tokenize_ns / 1e6], "ms")
    outputs = [
        {
            "prompt": cfg.bench.prompt,
            "text": generation.text,
            "prompt_tokens": generation.prompt_tokens,
            "output_tokens": generation.output_tokens,
            "finish_reason": generation.finish_reason,
        }
    ]
    return metrics, outputs
