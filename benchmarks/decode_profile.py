"""Where a decode step's time goes, and how fast this machine's kernels read weights on their own.

    python benchmarks/decode_profile.py model.dtype=bfloat16 engine.cache=static engine.compile=true

Any harness overrides choose the point (default: smollm2 as configured). It runs two warm-up requests, then
profiles one streamed request (prompt 128, 64 tokens forced) with the torch profiler and prints the ops that took
the most time, and the milliseconds per decoded token. Then it times, alone, a matrix-vector product of a
smollm2-sized weight (2304×9216) in float32 and bfloat16 on 1 and 2 threads, and a plain 1 GB read: when the
product reads far below the plain read, the kernel, not memory, bounds MBU. Run it alone.
"""

from __future__ import annotations

import sys
import time


def kernel_rates() -> None:
    import torch

    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(2304, 9216, dtype=dtype)
        vector = torch.randn(1, 2304, dtype=dtype)
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for _ in range(3):
                vector @ weight
            t0 = time.perf_counter()
            for _ in range(50):
                vector @ weight
            seconds = (time.perf_counter() - t0) / 50
            rate = weight.numel() * weight.element_size() / seconds / 1e9
            print(f"matrix-vector {dtype}, {n} thread(s): reads weights at {rate:.1f} GB/s")
    torch.set_num_threads(threads)
    block = torch.ones(2**28)  # 1 GiB of float32
    block.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        block.sum()
    print(f"plain read of 1 GiB: {5 * block.numel() * 4 / (time.perf_counter() - t0) / 1e9:.1f} GB/s")


def main(overrides: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    from harness.config import load_config
    from harness.engines import create_engine, load_for_engine
    from harness.engines.base import GenerationParams, streamed
    from harness.prompts import exact_prompt

    cfg = load_config(overrides)
    loaded = load_for_engine(cfg)
    engine = create_engine(cfg.engine.name, loaded, cfg)
    params = GenerationParams(max_new_tokens=64, min_new_tokens=64)
    for i in range(2):
        streamed(engine, exact_prompt(loaded, 128, offset=i), params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        g = streamed(engine, exact_prompt(loaded, 128, offset=5), params)
    per_token = (g.token_ns[-1] - g.token_ns[0]) / 1e6 / (len(g.token_ns) - 1)
    print(f"{' '.join(overrides) or 'defaults'}: {per_token:.2f} ms per decoded token under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    engine.shutdown()
    kernel_rates()


if __name__ == "__main__":
    main(sys.argv[1:])
