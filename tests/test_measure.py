import csv
import math

import pytest

from harness.config import BenchConfig
from harness.errors import ConfigError, InferenceError
from harness.prompts import exact_prompt
from runners.benches.measure import StopRule, case_key, itl_s, repeat_until_stable, request_metrics, write_samples


def test_stop_rule_needs_min_runs_and_min_seconds():
    rule = StopRule(min_runs=3, max_runs=10, min_seconds=1.0, target_rel_ci=0.05)
    assert rule.reason_to_stop([1.0, 1.0], 5.0) is None  # too few runs
    assert rule.reason_to_stop([1.0, 1.0, 1.0], 0.5) is None  # too little time
    assert rule.reason_to_stop([1.0, 1.0, 1.0], 1.5) == "ci"
    assert rule.reason_to_stop([1.0, 2.0, 3.0], 1.5) is None  # CI far wider than 5%
    assert rule.reason_to_stop([1.0, 2.0] * 5, 1.5) == "max_runs"


def test_repeat_until_stable_stops_early_on_steady_values():
    rule = StopRule(min_runs=5, max_runs=100, min_seconds=0.0, target_rel_ci=0.02)
    values = iter([10.0, 10.1, 9.9, 10.0, 10.05, 9.95] + [10.0] * 100)
    got, how = repeat_until_stable(rule, lambda: next(values))
    assert how["stopped_by"] == "ci" and how["runs"] == len(got) == 5 and how["rel_ci95"] <= 0.02


def test_repeat_until_stable_caps_noisy_values():
    rule = StopRule(min_runs=2, max_runs=7, min_seconds=0.0, target_rel_ci=0.001)
    values = iter([1.0, 3.0] * 10)
    got, how = repeat_until_stable(rule, lambda: next(values))
    assert how["stopped_by"] == "max_runs" and len(got) == 7


def test_request_metrics_are_consistent():
    start = 5_000_000_000
    token_ns = [start + 80_000_000 + int(i * 12.5e6) for i in range(33)]
    m = request_metrics(start, token_ns, prompt_tokens=128)
    assert m["ttft_s"] + (m["output_tokens"] - 1) * m["tpot_s"] == pytest.approx(m["e2e_s"], rel=1e-9)
    assert m["decode_tok_s"] == pytest.approx(1 / m["tpot_s"])
    assert m["prefill_tok_s"] == pytest.approx(128 / 0.08)
    gaps = itl_s(token_ns)
    assert len(gaps) == 32 and math.fsum(gaps) == pytest.approx(m["e2e_s"] - m["ttft_s"])


def test_case_keys():
    assert case_key("ttft_ms") == "ttft_ms"
    assert case_key("output_tok_s", batch=8) == "output_tok_s[batch=8]"
    assert case_key("g", prompt=32, batch=4) == "g[prompt=32,batch=4]"


def test_exact_prompts_have_the_asked_length(load):
    loaded = load("tiny-qwen2")
    for n in (1, 32, 200):
        assert len(exact_prompt(loaded, n).ids) == n
    assert exact_prompt(loaded, 16, offset=1).ids != exact_prompt(loaded, 16).ids
    with pytest.raises(InferenceError, match="context window of 512"):
        exact_prompt(loaded, 600)


def test_samples_csv_round_trip(tmp_path):
    rows = [
        ("latency", "prompt=8", 0, "", "ttft_ms", 1.5, "ms"),
        ("latency", "prompt=8", 0, 3, "token_t_ms", 9.0, "ms"),
    ]
    write_samples(tmp_path / "samples.csv", rows)
    with (tmp_path / "samples.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["metric"] == "ttft_ms" and float(got[1]["value"]) == 9.0 and got[1]["token"] == "3"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_sizes": [0]}, "bench.batch_sizes"),
        ({"batch_sizes": []}, "bench.batch_sizes"),
        ({"prompt_lengths": [-4]}, "bench.prompt_lengths"),
        ({"concurrency": [0]}, "bench.concurrency"),
        ({"min_runs": 10, "max_runs": 5}, "bench.max_runs"),
        ({"target_rel_ci": 0}, "bench.target_rel_ci"),
        ({"primary_metric": "speed"}, "bench.primary_metric"),
        ({"warmup_runs": -1}, "bench.warmup_runs"),
    ],
)
def test_bench_config_checks(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        BenchConfig(**kwargs)
