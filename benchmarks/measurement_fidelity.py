"""Figures for the measurement notes (not a timed test), on one model in one process:

1. the adaptive stop rule against a fixed rule of at least 10 runs and 10 s, on batch-1 latency: the wall time
   each takes and the relative 95% CI each reaches;
2. output tok/s of batch 8 against batch 1;
3. for every request, how far TTFT + (n_out - 1)·TPOT is from the measured E2E.

    python benchmarks/measurement_fidelity.py [--model smollm2] [--prompt 128] [--tokens 32] [overrides…]
"""

from __future__ import annotations

import argparse
import json
import time

from harness.engines.base import streamed
from harness.prompts import exact_prompt
from runners.benches.measure import StopRule, generation_params, repeat_until_stable, request_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from harness.config import load_config
    from harness.engines import create_engine
    from harness.models import load_model

    cfg = load_config([f"model={args.model}", "bench=latency", f"bench.max_new_tokens={args.tokens}", *args.overrides])
    loaded = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
    engine = create_engine("transformers", loaded)
    params = generation_params(cfg.bench, cfg.seed)
    prompt = exact_prompt(loaded, args.prompt)
    for _ in range(2):
        streamed(engine, prompt, params)

    gaps: list[float] = []

    def request() -> float:
        g = streamed(engine, prompt, params)
        m = request_metrics(g.start_ns, g.token_ns, g.prompt_tokens)
        gaps.append(abs(m["ttft_s"] + (m["output_tokens"] - 1) * m["tpot_s"] - m["e2e_s"]) / m["e2e_s"])
        return m["e2e_s"]

    report = {
        "model": args.model,
        "device": loaded.placement.device,
        "prompt_tokens": args.prompt,
        "output_tokens": args.tokens,
    }
    adaptive = StopRule(min_runs=5, max_runs=200, min_seconds=2.0, target_rel_ci=args.target)
    fixed = StopRule(min_runs=10, max_runs=10**6, min_seconds=10.0, target_rel_ci=1e-12)  # never by CI
    for name, rule in (("adaptive", adaptive), ("fixed_10_runs_10_s", fixed)):
        t0 = time.perf_counter()
        if name == "fixed_10_runs_10_s":
            values: list[float] = []
            while len(values) < 10 or time.perf_counter() - t0 < 10.0:
                values.append(request())
            how = {"runs": len(values), "rel_ci95": rule.relative_ci(values)}
        else:
            values, how = repeat_until_stable(rule, request)
        report[name] = {
            "wall_s": time.perf_counter() - t0,
            "runs": how["runs"],
            "rel_ci95": how["rel_ci95"],
            "mean_e2e_ms": 1e3 * sum(values) / len(values),
        }
    report["max_rel_gap_ttft_plus_tpot_vs_e2e"] = max(gaps)

    rates = {}
    for batch in (1, 8):
        prompts = [exact_prompt(loaded, args.prompt, offset=i) for i in range(batch)]
        engine.batch(prompts, params)
        seconds = []
        for _ in range(3):
            out = engine.batch(prompts, params)
            seconds.append((out[0].end_ns - out[0].start_ns) / 1e9)
        rates[batch] = batch * args.tokens / sorted(seconds)[1]
    report["batch_output_tok_s"] = rates
    report["batch8_over_batch1"] = rates[8] / rates[1]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
