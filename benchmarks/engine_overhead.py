"""What the harness adds on top of an engine's own Python API: its engine (tokenizer prompt, stop and EOS handling,
per-token stamps) against a bare loop over the same library, on the very same loaded model, interleaved.

    python benchmarks/engine_overhead.py --engine llamacpp
    python benchmarks/engine_overhead.py --engine onnxruntime --quant int4

Both sides get the same prompt ids (an exact-length prompt from the built-in text), force the same output
length, and compute decode tok/s = (n - 1) / (t_last - t_first) and TTFT = t_first - t_start as docs/metrics.md defines
them, a request's own set-up (KV cache reset, generator) inside TTFT on both. The bare loop drives the engine's
own llama.cpp context or ONNX Runtime GenAI model: a second model in the process, or a second process, adds
its own noise (two ORT sessions in one process slow each other by up to 8%, their thread pools spinning after
each run; separate processes on this machine differ by ±4% from one start to the next), which would swamp the
few microseconds per token being measured. Runs alternate which side goes first. Prints medians and the ratio
harness / bare; --json writes every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _rates(start_ns: int, stamps: list[int]) -> tuple[float, float]:
    ttft_ms = (stamps[0] - start_ns) / 1e6
    decode = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)
    return ttft_ms, decode


def bare_llamacpp(llm):
    """A plain llama-cpp-python loop: Llama.generate, greedy, the KV cache cleared before each request."""

    def run(ids: list[int], n_out: int) -> tuple[int, list[int]]:
        start = time.perf_counter_ns()
        llm.reset()
        stamps: list[int] = []
        for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter_ns())
            if len(stamps) == n_out:
                break
        return start, stamps

    return run


def bare_onnxruntime(model):
    """A plain onnxruntime-genai pull loop over og.Generator."""
    import numpy as np
    import onnxruntime_genai as og

    def run(ids: list[int], n_out: int) -> tuple[int, list[int]]:
        start = time.perf_counter_ns()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n_out, min_length=len(ids) + n_out, do_sample=False)
        generator = og.Generator(model, params)
        stamps: list[int] = []
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            stamps.append(time.perf_counter_ns())
        del generator
        return start, stamps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("llamacpp", "onnxruntime"), required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from harness.config import load_config
    from harness.engines import create_engine, load_for_engine
    from harness.engines.base import GenerationParams, streamed
    from harness.prompts import exact_prompt

    cfg = load_config([f"model={args.model}", f"engine={args.engine}", f"quant={args.quant}"])
    loaded = load_for_engine(cfg)
    engine = create_engine(cfg.engine.name, loaded, cfg)
    bare = bare_llamacpp(engine.llama) if args.engine == "llamacpp" else bare_onnxruntime(engine.model)
    prompt = exact_prompt(loaded, args.prompt)
    params = GenerationParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    def harness_run() -> tuple[float, float]:
        g = streamed(engine, prompt, params)
        assert g.output_tokens == args.tokens
        return _rates(g.start_ns, g.token_ns)

    def bare_run() -> tuple[float, float]:
        start, stamps = bare(list(prompt.ids), args.tokens)
        assert len(stamps) == args.tokens, len(stamps)
        return _rates(start, stamps)

    harness_run(), bare_run()  # warm-up, both
    runs: dict[str, list[tuple[float, float]]] = {"harness": [], "bare": []}
    for i in range(args.runs):
        order = (("harness", harness_run), ("bare", bare_run))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            runs[name].append(fn())
    med = {k: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v)) for k, v in runs.items()}
    label = f"{args.model} engine={args.engine} quant={args.quant} ({loaded.placement.dtype})"
    print(f"{label}, prompt {args.prompt}, {args.tokens} tokens, {args.runs} interleaved runs per side (medians)")
    print(f"  {'':8} {'TTFT ms':>9} {'decode tok/s':>13}")
    for name, (ttft, decode) in med.items():
        print(f"  {name:8} {ttft:9.1f} {decode:13.1f}")
    ratio = med["harness"][1] / med["bare"][1]
    print(f"  decode harness/bare = {ratio:.3f}; TTFT harness/bare = {med['harness'][0] / med['bare'][0]:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"label": label, "runs": runs, "medians": med, "decode_ratio": ratio}))
    loaded.release()


if __name__ == "__main__":
    main()
