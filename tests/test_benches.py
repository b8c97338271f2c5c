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


def test_latency_trials_run_each_case_from_a_fresh_engine_and_report_the_spread(compose, tmp_path, monkeypatch):
    import harness.engines

    made = []
    real = harness.engines.create_engine
    monkeypatch.setattr(harness.engines, "create_engine", lambda *a, **k: made.append(1) or real(*a, **k))
    cfg = compose("model=tiny-qwen2", "bench=latency", "bench.prompt_lengths=[8,12]", "bench.trials=2", *FAST)
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    for p in (8, 12):
        keys = [f"prompt={p},trial={t}" for t in (1, 2)]
        assert all(m[f"ttft_ms[{k}]"]["n"] >= 2 for k in keys)
        spread = m[f"ttft_ms_p50_by_trial[prompt={p}]"]
        assert spread["n"] == 2 and spread["mean"] == pytest.approx(sum(m[f"ttft_ms[{k}]"]["p50"] for k in keys) / 2)
        trials = result.details["trials"][f"prompt={p}"]
        assert trials["cases"] == keys and "decode_tok_s_by_trial" in trials["figures"]
    # The point's engine, then a new one for every trial but the very first: prompt=8's second, prompt=12's both.
    assert len(made) == 1 + 3 and result.details["trials"]["prompt=12"]["fresh_state"] == [{"engine": "new"}] * 2
    assert {r["case"] for r in read_samples(tmp_path)} >= {"prompt=8,trial=1", "prompt=12,trial=2"}


def test_trials_are_refused_where_a_bench_has_no_level_or_case_to_repeat(compose):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="bench=throughput has neither"):
        compose("model=tiny-qwen2", "bench=throughput", "bench.trials=2")
