"""bench=throughput: one request alone, batches of several sizes, and closed-loop concurrent clients.

Concurrent clients each send their next request as soon as their previous one returns. An engine that serves
one request at a time (see `engine.describe()["concurrency"]`) makes a request wait in a queue before it
starts; a batching engine (continuous batching, a server) runs them together, and what a request waits inside it
before its prefill is the engine's own queue. Both waits are reported apart from the service time and the
latency they add up to.

MBU per case: a decode step reads the weights once for every request in the step and each request's own KV
cache, so steps/s × (weights + requests × KV at the mean context) ÷ peak bandwidth.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from harness.bandwidth import mbu, peak_bandwidth
from harness.engines.base import streamed
from harness.prompts import exact_prompt
from harness.stats import summarize
from runners.benches.measure import (
    BenchContext,
    BenchOutput,
    StopRule,
    case_key,
    generation_params,
    repeat_until_stable,
)

# Prompts of bench.prompt_lengths tokens followed by bench.max_new_tokens generated ones: the sweep checks before
# any model loads that they fit the model's context window.
EXACT_LENGTH_PROMPTS = True


def run(ctx: BenchContext) -> BenchOutput:
    bench, loaded, engine = ctx.cfg.bench, ctx.loaded, ctx.engine
    params = generation_params(bench, ctx.cfg.seed)
    rule = StopRule.of(bench)
    p_len = bench.prompt_lengths[0]
    out = BenchOutput()
    n_out = params.max_new_tokens
    # MBU where the weights are here (a server's are not); over output tok/s, prefill included: a lower bound.
    in_process = loaded.footprint_bytes > 0
    peak = peak_bandwidth(loaded.placement.device, ctx.cfg.cache_path)["bytes_per_s"] if in_process else 0.0
    context = p_len + n_out / 2  # mean KV length read while decoding

    def add_mbu(key: str, tok_s_key: str, sequences: float) -> None:
        if in_process:
            tok_s = out.metrics[tok_s_key]["mean"]
            value = mbu(tok_s, loaded.footprint_bytes, loaded.kv_bytes_per_position, context, peak, sequences)
            out.metrics[key] = summarize([value], "fraction")

    for _ in range(max(bench.warmup_runs, 1)):
        streamed(engine, exact_prompt(loaded, p_len), params)

    # A single request, streamed.
    def single() -> float:
        g = streamed(engine, exact_prompt(loaded, p_len), params)
        seconds = g.latency()["e2e_s"]
        out.samples.append(("throughput", "single", len(out.samples), "", "e2e_ms", seconds * 1e3, "ms"))
        return g.output_tokens / seconds

    values, how_single = repeat_until_stable(rule, single, ctx.progress, "throughput single: ")
    out.metrics["single_output_tok_s"] = summarize(values, "tok/s")
    add_mbu("single_mbu", "single_output_tok_s", 1)

    # Batches: one generate() call over `batch` prompts of the same length.
    cases: dict[str, object] = {"single": how_single}
    for batch in bench.batch_sizes:
        if batch > 1 and not engine.batches:
            cases[f"batch={batch}"] = {"not_run": f"engine={engine.name} does not batch: {engine.describe()['batch']}"}
            continue
        prompts = [exact_prompt(loaded, p_len, offset=i) for i in range(batch)]
        engine.batch(prompts, params)  # warm-up at this shape
        latencies: list[float] = []

        def one_batch(prompts=prompts, batch=batch, latencies=latencies) -> float:
            results = engine.batch(prompts, params)
            seconds = (results[0].end_ns - results[0].start_ns) / 1e9
            latencies.append(seconds)
            out.samples.append(
                ("throughput", f"batch={batch}", len(latencies) - 1, "", "batch_latency_ms", seconds * 1e3, "ms")
            )
            return seconds

        _, how = repeat_until_stable(rule, one_batch, ctx.progress, f"throughput batch={batch}: ")
        tokens = batch * n_out
        out.metrics[case_key("batch_latency_ms", batch=batch)] = summarize([s * 1e3 for s in latencies], "ms")
        out.metrics[case_key("output_tok_s", batch=batch)] = summarize([tokens / s for s in latencies], "tok/s")
        add_mbu(case_key("mbu", batch=batch), case_key("output_tok_s", batch=batch), batch)
        cases[f"batch={batch}"] = how

    # Closed-loop clients sharing the engine: one request at a time in process, all at once to a server.
    served = contextlib.nullcontext() if engine.concurrent else threading.Lock()
    for clients in bench.concurrency:
        if clients > 1 and ctx.cfg.ranks() > 1:
            cases[f"clients={clients}"] = {
                "not_run": "a model split over ranks answers requests in one fixed order on "
                "every rank; concurrent clients would reach the ranks in different orders"
            }
            continue
        ctx.progress(f"throughput clients={clients}")
        records: list[tuple[float, float, float, int]] = []  # issue, start, end, tokens
        record_lock = threading.Lock()

        def client(index: int, records=records, record_lock=record_lock) -> None:
            for r in range(bench.requests_per_client):
                prompt = exact_prompt(loaded, p_len, offset=index * 100 + r)
                issued = time.perf_counter()
                with served:
                    started = time.perf_counter()
                    g = engine.generate(prompt, params)
                ended = time.perf_counter()
                started += g.wait_ns / 1e9  # the engine's own queue (continuous batching) is a wait too
                with record_lock:
                    records.append((issued, started, ended, g.output_tokens))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        case = {"clients": clients}
        out.metrics[case_key("requests_s", **case)] = summarize([len(records) / wall], "req/s")
        out.metrics[case_key("concurrent_output_tok_s", **case)] = summarize(
            [sum(r[3] for r in records) / wall], "tok/s"
        )
        # Requests in flight on average (Little's law over the level): how many a step decodes together.
        in_flight = min(clients, sum(e - s for _, s, e, _ in records) / wall)
        add_mbu(case_key("mbu", **case), case_key("concurrent_output_tok_s", **case), max(1.0, in_flight))
        out.metrics[case_key("latency_ms", **case)] = summarize([(e - i) * 1e3 for i, _, e, _ in records], "ms")
        out.metrics[case_key("queue_wait_ms", **case)] = summarize([(s - i) * 1e3 for i, s, _, _ in records], "ms")
        out.metrics[case_key("service_ms", **case)] = summarize([(e - s) * 1e3 for _, s, e, _ in records], "ms")
        for n, (i, s, e, _) in enumerate(records):
            out.samples.append(("throughput", f"clients={clients}", n, "", "queue_wait_ms", (s - i) * 1e3, "ms"))
            out.samples.append(("throughput", f"clients={clients}", n, "", "latency_ms", (e - i) * 1e3, "ms"))
        cases[f"clients={clients}"] = {"requests": len(records), "seconds": wall}
    out.details = {
        "cases": cases,
        "prompt_tokens": p_len,
        "output_tokens": n_out,
        "concurrency": engine.describe()["concurrency"],
    }
    return out


def headline(metrics: dict[str, Any]) -> str:
    """Output tok/s of each batch size."""
    rates = [(k, v["mean"]) for k, v in metrics.items() if k.startswith("output_tok_s[")]
    return ", ".join(f"{k.split('[')[1].rstrip(']')}: {v:.1f} tok/s" for k, v in rates)
