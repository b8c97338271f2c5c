"""`harness serve` one request at a time against continuous batching, under the same closed-loop load.

    python benchmarks/serve_batching.py --model smollm2 --clients 16 --requests 32 --rounds 2

Each round runs bench=serve twice, once per engine.batching, alternating which goes first, with a launched
`harness serve` per run (`bench.target=harness`): C streaming clients, each sending its next request when the last
one ends, prompts of --prompt tokens and --tokens output tokens forced. Prints, per mode, the median over rounds of
the aggregate output tok/s and TTFT p50/p99, and the ratio of throughputs. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("none", "continuous")


def run(mode: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    level = f"concurrency={args.clients}"
    command = [
        sys.executable, "-m", "harness", f"model={args.model}", "bench=serve", "bench.target=harness",
        f"engine.batching={mode}", f"bench.concurrency=[{args.clients}]", "bench.rates=[]",
        f"bench.num_requests={args.requests}", f"bench.prompt_lengths=[{args.prompt}]",
        f"bench.max_new_tokens={args.tokens}", "print_text=false", f"hydra.run.dir={folder}",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((folder / "result.json").read_text())
    if result["status"] != "ok":
        raise SystemExit(f"{mode}: {result['error']}")
    m = result["metrics"]
    return {
        "tok_s": m[f"output_tok_s[{level}]"]["mean"],
        "ttft_p50": m[f"ttft_ms[{level}]"]["p50"],
        "ttft_p99": m[f"ttft_ms[{level}]"]["p99"],
        "tpot_p50": m[f"tpot_ms[{level}]"]["p50"],
        "completed": m[f"completed[{level}]"]["mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serve-batching-"))
    figures: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            figures[mode].append(run(mode, args, root / f"{mode}-{r}"))
            print(f"round {r} {mode}: {figures[mode][-1]}", flush=True)
    print(
        f"\n{args.model} on harness serve, {args.clients} closed-loop streaming clients, {args.requests} requests, "
        f"prompt {args.prompt}, {args.tokens} tokens forced; medians of {args.rounds} rounds"
    )
    print("| engine.batching | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | completed |")
    print("|---|---|---|---|---|---|")
    medians = {m: {k: statistics.median(f[k] for f in figures[m]) for k in figures[m][0]} for m in MODES}
    for mode, f in medians.items():
        print(
            f"| {mode} | {f['tok_s']:.1f} | {f['ttft_p50']:.0f} | {f['ttft_p99']:.0f} | {f['tpot_p50']:.0f} | "
            f"{f['completed']:.0f} |"
        )
    print(f"\ncontinuous / none throughput: {medians['continuous']['tok_s'] / medians['none']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
