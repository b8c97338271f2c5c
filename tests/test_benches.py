import csv
import json

import pytest

from harness.bandwidth import gpu_datasheet, kv_bytes_per_position, mbu, peak_bandwidth
from runners import run_point

FAST = ["bench.min_runs=2", "bench.max_runs=4", "bench.min_seconds=0", "bench.warmup_runs=1", "bench.max_new_tokens=6"]


def read_samples(folder):
    with (folder / "samples.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_latency_bench(compose, tmp_path):
    cfg = compose("model=tiny-qwen2", "bench=latency", "bench.prompt_lengths=[8,24]", *FAST)
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    for p in (8, 24):
        for name in ("ttft_ms", "e2e_ms", "tpot_ms", "itl_ms", "decode_tok_s", "prefill_tok_s", "mbu"):
            assert f"{name}[prompt={p}]" in m, name
        stat = m[f"e2e_ms[prompt={p}]"]
        assert stat["unit"] == "ms" and 2 <= stat["n"] <= 4 and stat["ci95"] is not None
        assert m[f"itl_ms[prompt={p}]"]["n"] == stat["n"] * 5  # 6 tokens: 5 gaps a request
        case = result.details["cases"][f"prompt={p}"]
        assert case["stopped_by"] in ("ci", "max_runs") and case["runs"] == stat["n"]
    assert m["cold_start_ttft_ms"]["n"] == 1
    assert result.details["length_mismatches"] == 0
    assert 0 < m["mbu[prompt=8]"]["mean"] < 1
    rows = read_samples(tmp_path)
    tokens = [r for r in rows if r["metric"] == "token_t_ms" and r["case"] == "prompt=8"]
    assert len(tokens) == m["e2e_ms[prompt=8]"]["n"] * 6
    # Every request: TTFT + (n-1)·TPOT equals its E2E.
    by_request = {}
    for r in rows:
        if r["case"] == "prompt=24" and r["token"] == "":
            by_request.setdefault(r["request"], {})[r["metric"]] = float(r["value"])
    for req in by_request.values():
        assert req["ttft_ms"] + (req["output_tokens"] - 1) * req["tpot_ms"] == pytest.approx(req["e2e_ms"], rel=0.02)


def test_memory_bench(compose, tmp_path):
    cfg = compose(
        "model=tiny-llama",
        "bench=memory",
        "bench.prompt_lengths=[8]",
        "bench.batch_sizes=[1,2]",
        "bench.max_new_tokens=4",
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    assert m["weights_mib"]["unit"] == "MiB" and m["weights_mib"]["mean"] > 0
    assert m["load_rss_peak_mib"]["mean"] >= m["load_rss_before_mib"]["mean"]
    assert m["rss_after_first_request_mib"]["mean"] > 0
    for b in (1, 2):
        assert f"inference_growth_rss_mib[prompt=8,batch={b}]" in m
    assert result.details["weights_bytes"] > 0


def test_throughput_bench(compose, tmp_path):
    cfg = compose(
        "model=tiny-gpt2",
        "bench=throughput",
        "bench.prompt_lengths=[8]",
        "bench.batch_sizes=[1,4]",
        "bench.concurrency=[1,3]",
        "bench.requests_per_client=2",
        *FAST,
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    assert m["single_output_tok_s"]["mean"] > 0
    assert m["output_tok_s[batch=4]"]["mean"] > m["output_tok_s[batch=1]"]["mean"]
    assert m["latency_ms[clients=3]"]["n"] == 6 and m["queue_wait_ms[clients=3]"]["n"] == 6
    assert m["queue_wait_ms[clients=1]"]["p99"] < m["queue_wait_ms[clients=3]"]["p99"]
    assert "one request at a time" in result.details["concurrency"]
    assert json.loads((tmp_path / "result.json").read_text())["details"]["cases"]["clients=3"]["requests"] == 6


def test_bandwidth_table_and_cache(tmp_path):
    assert gpu_datasheet("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert gpu_datasheet("NVIDIA H100 NVL")[0] == 3.9e12
    assert gpu_datasheet("NVIDIA H200")[0] == 4.8e12
    assert gpu_datasheet("Some Future GPU") is None
    first = peak_bandwidth("cpu", tmp_path)
    assert first["bytes_per_s"] > 1e8 and "measured copy" in first["source"]
    assert peak_bandwidth("cpu", tmp_path) == first  # cached, not measured again
    assert json.loads((tmp_path / "bandwidth.json").read_text())


def test_mbu_arithmetic(load):
    config = load("tiny-llama").model.config  # 2 layers, 2 KV heads of 16 dims
    assert kv_bytes_per_position(config, 4) == 2 * 2 * 2 * 16 * 4
    assert mbu(10, 1000, 10, 100, 40_000) == pytest.approx(10 * (1000 + 1000) / 40_000)
