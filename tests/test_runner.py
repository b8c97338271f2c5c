import json

import pytest

from runners import run_point, summary_line
from runners.benches.measure import request_metrics


def test_request_metrics_arithmetic():
    start = 1_000_000_000
    tokens = [start + 100_000_000 + i * 20_000_000 for i in range(11)]  # TTFT 100 ms, then 20 ms a token
    m = request_metrics(start, tokens, prompt_tokens=50)
    assert m["ttft_s"] == pytest.approx(0.1) and m["e2e_s"] == pytest.approx(0.3)
    assert m["tpot_s"] == pytest.approx(0.02) and m["decode_tok_s"] == pytest.approx(50)
    assert m["prefill_tok_s"] == pytest.approx(500) and m["output_tokens"] == 11
    assert m["ttft_s"] + (m["output_tokens"] - 1) * m["tpot_s"] == pytest.approx(m["e2e_s"])
    assert request_metrics(start, [], 5) == {}
    assert "tpot_s" not in request_metrics(start, tokens[:1], 5)


def test_run_point_ok_writes_a_complete_result(compose, tmp_path):
    cfg = compose("model=tiny-qwen2", "bench.max_new_tokens=6")
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["schema"] == "harness.result/1" and data["status"] == "ok"
    assert data["point"]["model"] == "tiny-qwen2"
    r = data["resolved"]
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["attention"]["used"] == "sdpa"
    assert r["quantization"]["name"] == "none" and r["source"]["kind"] == "random"
    assert data["metrics"]["ttft_ms"]["unit"] == "ms" and data["metrics"]["decode_tok_s"]["mean"] > 0
    assert data["timings"]["load_s"] > 0 and data["environment"]["packages"]["torch"]
    assert data["memory"]["load"]["rss_peak_bytes"] > 0
    assert data["metrics"]["cold_start_ttft_ms"]["n"] == 1 and data["metrics"]["output_tokens"]["mean"] >= 1
    assert "tiny-qwen2" in summary_line(result, tmp_path)


def test_a_failing_point_records_cause_and_fix(compose, tmp_path):
    cfg = compose("model.path=/does/not/exist")
    result = run_point(cfg, tmp_path)  # known before loading, so a ConfigError (the command line exits 2 on it)
    assert result.status == "failed" and result.error["type"] == "ConfigError"
    assert "does not exist" in (tmp_path / "error.log").read_text()
    assert json.loads((tmp_path / "result.json").read_text())["error"]["hint"]
    assert "ConfigError" in summary_line(result, tmp_path)


def boom(ctx):
    raise RuntimeError("kaboom in the bench")


def oom(ctx):
    raise MemoryError("cannot allocate")


def test_an_unexpected_crash_is_recorded_with_its_traceback(compose, tmp_path):
    result = run_point(compose("model=tiny-gpt2", "bench.name=test_runner:boom"), tmp_path)
    assert result.status == "failed" and result.error["type"] == "RuntimeError"
    assert "Traceback" in (tmp_path / "error.log").read_text()


def test_out_of_memory_in_a_point_becomes_out_of_memory_error(compose, tmp_path):
    result = run_point(compose("model=tiny-gpt2", "bench.name=test_runner:oom"), tmp_path)
    assert result.error["type"] == "OutOfMemoryError" and "quant=8bit" in result.error["hint"]


def test_a_bench_without_a_runner(compose, tmp_path):
    result = run_point(compose("model=tiny-gpt2", "bench.name=nosuch"), tmp_path)
    assert result.status == "failed" and result.error["type"] == "ConfigError"
    assert "latency, memory, throughput" in result.error["message"]
    result = run_point(compose("model=tiny-gpt2", "bench.name=json:no_such_function"), tmp_path)
    assert result.error["type"] == "ConfigError" and "package.module:function" in result.error["hint"]
