"""bench=memory: what loading costs (before, after, peak; RSS and CUDA), what inference adds per prompt length
and batch size, and the weights' own footprint beside them. Comparing quantizations is a sweep over `quant`;
each result carries the figures analysis needs for ratios against quant=none."""

from __future__ import annotations

import gc
from typing import Any

from harness.engines import GenerationParams
from harness.memory import MemoryMonitor, snapshot
from harness.prompts import exact_prompt
from harness.stats import summarize
from runners.benches.measure import BenchContext, BenchOutput, case_key, first_case, generation_params

# Prompts of bench.prompt_lengths tokens followed by bench.max_new_tokens generated ones: the sweep checks before
# any model loads that they fit the model's context window.
EXACT_LENGTH_PROMPTS = True

MIB = 2**20


def _mib(value: int | None) -> dict | None:
    return None if value is None else summarize([value / MIB], "MiB")


def run(ctx: BenchContext) -> BenchOutput:
    bench, loaded, engine = ctx.cfg.bench, ctx.loaded, ctx.engine
    out = BenchOutput()
    load = ctx.load_memory
    weights = loaded.weights_bytes
    figures = {
        "weights_mib": weights,
        "footprint_mib": loaded.footprint_bytes,
        "load_rss_before_mib": load.get("rss_start_bytes"),
        "load_rss_after_mib": load.get("rss_end_bytes"),
        "load_rss_peak_mib": load.get("rss_peak_bytes"),
        "load_cuda_allocated_mib": load.get("cuda_allocated_bytes"),
        "load_cuda_peak_mib": load.get("cuda_max_allocated_bytes"),
        "load_nvml_process_mib": load.get("nvml_process_bytes"),
    }
    for name, value in figures.items():
        stat = _mib(value)
        if stat is not None:
            out.metrics[name] = stat
    # One small request first, so one-off allocations (thread pools, kernels) do not count as growth. It also
    # touches every weight: safetensors weights are mapped lazily, so RSS right after loading can be far below
    # the weights' size; the figure after this request is what the loaded model really holds.
    engine.generate(exact_prompt(loaded, 8), GenerationParams(max_new_tokens=2, min_new_tokens=2))
    gc.collect()
    resident = snapshot()
    out.metrics["rss_after_first_request_mib"] = _mib(resident["rss_bytes"])
    if "cuda_allocated_bytes" in resident:
        out.metrics["cuda_after_first_request_mib"] = _mib(resident["cuda_allocated_bytes"])
    params = generation_params(bench, ctx.cfg.seed)
    cases = {}
    for p_len in bench.prompt_lengths:
        for batch in bench.batch_sizes:
            if batch > 1 and not engine.batches:
                cases[f"prompt={p_len},batch={batch}"] = {"not_run": f"engine={engine.name} does not batch"}
                continue
            ctx.progress(f"memory prompt={p_len} batch={batch}")
            prompts = [exact_prompt(loaded, p_len, offset=i) for i in range(batch)]
            gc.collect()
            before = snapshot()
            with MemoryMonitor(interval_s=0.002) as monitor:
                engine.batch(prompts, params)
            s = monitor.summary()
            growth = {"rss": s["rss_peak_bytes"] - before["rss_bytes"]}
            if "cuda_max_allocated_bytes" in s:
                growth["cuda"] = s["cuda_max_allocated_bytes"] - before.get("cuda_allocated_bytes", 0)
            for kind, value in growth.items():
                out.metrics[case_key(f"inference_growth_{kind}_mib", prompt=p_len, batch=batch)] = _mib(value)
                out.samples.append(
                    ("memory", f"prompt={p_len},batch={batch}", 0, "", f"growth_{kind}_bytes", value, "bytes")
                )
            cases[f"prompt={p_len},batch={batch}"] = {"samples": s["samples"], "alerts": s["alerts"]}
    out.details = {
        "cases": cases,
        "weights_bytes": weights,
        "footprint_bytes": loaded.footprint_bytes,
        "note": "growth = peak during one forced-length batch minus the figure just before it",
    }
    return out


def headline(metrics: dict[str, Any]) -> str:
    peak, weights = first_case(metrics, "load_rss_peak_mib"), first_case(metrics, "weights_mib")
    return f"weights {weights['mean']:.0f} MiB, load peak RSS {peak['mean']:.0f} MiB" if peak and weights else ""
