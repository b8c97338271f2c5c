"""What HTTP adds: the same model, prompt and greedy output through the in-process transformers engine and through
engine=openai against `harness serve` (which runs that same engine), interleaved request by request.

    python benchmarks/http_overhead.py --model smollm2 --rounds 12 --prompt 32 --tokens 32

Prints the median TTFT and TPOT of each path and their differences (the HTTP client, the server's event loop
and worker hand-off, SSE framing). Run it alone: a second heavy process on the machine disturbs both paths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    from harness.config import load_config
    from harness.engines import create_engine, load_for_engine
    from harness.engines.base import GenerationParams, streamed
    from harness.loadgen.launch import launch
    from harness.prompts import exact_prompt
    from runners.benches.measure import request_metrics

    server = launch("harness", args.model, Path(tempfile.mkdtemp(prefix="http-overhead-")), timeout_s=600)
    try:
        local_cfg = load_config([f"model={args.model}"])
        local_loaded = load_for_engine(local_cfg)
        local = create_engine("transformers", local_loaded, local_cfg)
        remote_cfg = load_config([f"model={args.model}", "engine=openai", f"engine.base_url={server.base_url}"])
        remote_loaded = load_for_engine(remote_cfg)
        remote = create_engine("openai", remote_loaded, remote_cfg)
        params = GenerationParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        figures: dict[str, dict[str, list[float]]] = {"in-process": {}, "http": {}}
        for r in range(args.rounds + 1):  # round 0 warms both paths up
            prompt = exact_prompt(local_loaded, args.prompt, offset=r)
            for name, engine in (
                (("in-process", local), ("http", remote)) if r % 2 else (("http", remote), ("in-process", local))
            ):
                g = streamed(engine, prompt, params)
                if r == 0:
                    continue
                assert g.output_tokens == args.tokens, (name, g.output_tokens)
                m = request_metrics(g.start_ns, g.token_ns, g.prompt_tokens)
                for key in ("ttft_s", "tpot_s"):
                    figures[name].setdefault(key, []).append(m[key] * 1e3)
        local_loaded.release()
        remote_loaded.release()
    finally:
        server.stop()
    print(f"{args.model}, prompt {args.prompt} tokens, {args.tokens} output tokens, {args.rounds} interleaved rounds")
    for key, label in (("ttft_s", "TTFT ms"), ("tpot_s", "TPOT ms")):
        a = statistics.median(figures["in-process"][key])
        b = statistics.median(figures["http"][key])
        print(f"  {label:8} in-process {a:8.2f}   http {b:8.2f}   difference {b - a:+7.2f} ({b / a:.3f}x)")


if __name__ == "__main__":
    main()
