"""How fast engine=transformers decodes one request under each of its options, interleaved in one process.

    python benchmarks/decode_options.py --model smollm2 --rounds 8 --prompt 128 --tokens 64

Options: model.dtype (float32, bfloat16) × engine.cache (dynamic, static) × engine.compile (false, true). compile
needs a static cache, so dynamic+compiled is not a configuration (the config refuses it). Every engine shares its
dtype's loaded weights; round r runs one streamed request per option, in an order that rotates each round, so
drift in the machine's speed falls on every option alike. Prints, per option, the median decode tok/s
((n-1) ÷ (E2E − TTFT)), TTFT, MBU (decode tok/s × (weights + KV at the mean context) ÷ the measured peak
bandwidth) and the compile time of its warm-up. Run it alone: a second busy process disturbs every figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

OPTIONS = [
    ("dynamic", False),
    ("static", False),
    ("static", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    from harness.bandwidth import mbu, peak_bandwidth
    from harness.config import load_config
    from harness.engines import create_engine, load_for_engine
    from harness.engines.base import GenerationParams, streamed
    from harness.prompts import exact_prompt
    from runners.benches.measure import request_metrics

    params = GenerationParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    engines, loads = {}, {}
    for dtype in args.dtypes.split(","):
        for cache, compiled in OPTIONS:
            cfg = load_config(
                [f"model={args.model}", f"model.dtype={dtype}", f"engine.cache={cache}", f"engine.compile={compiled}"]
            )
            if dtype not in loads:
                loads[dtype] = load_for_engine(cfg)
            t0 = time.perf_counter()
            engine = create_engine("transformers", loads[dtype], cfg)
            name = f"{dtype} {cache} {'compiled' if compiled else 'eager'}"
            engines[name] = engine
            fallback = engine.describe().get("compile_fallback", "")
            print(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s {fallback}")
    any_loaded = next(iter(loads.values()))
    peak = peak_bandwidth(any_loaded.placement.device, load_config([]).cache_path)["bytes_per_s"]
    figures: dict[str, dict[str, list[float]]] = {name: {"decode": [], "ttft": []} for name in engines}
    names = list(engines)
    for r in range(args.rounds + 1):  # round 0 warms every option at this shape
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            loaded = loads[name.split()[0]]
            g = streamed(engines[name], exact_prompt(loaded, args.prompt, offset=r), params)
            if r == 0:
                continue
            m = request_metrics(g.start_ns, g.token_ns, g.prompt_tokens)
            figures[name]["decode"].append(m["decode_tok_s"])
            figures[name]["ttft"].append(m["ttft_s"] * 1e3)
    context = args.prompt + args.tokens / 2
    print(
        f"\n{args.model}, batch 1, prompt {args.prompt}, {args.tokens} tokens forced, "
        f"{args.rounds} interleaved rounds; peak bandwidth {peak / 1e9:.1f} GB/s"
    )
    print("| option | decode tok/s (median) | TTFT ms | MBU | compile s | in-request compiles |")
    print("|---|---|---|---|---|---|")
    for name, engine in engines.items():
        loaded = loads[name.split()[0]]
        decode = statistics.median(figures[name]["decode"])
        ttft = statistics.median(figures[name]["ttft"])
        util = mbu(decode, loaded.footprint_bytes, loaded.kv_bytes_per_position, context, peak)
        compile_s = f"{engine.compile_s:.1f}" if engine.compile_s is not None else "-"
        print(f"| {name} | {decode:.1f} | {ttft:.0f} | {util:.1%} | {compile_s} | {engine.compiles_in_requests} |")


if __name__ == "__main__":
    main()
