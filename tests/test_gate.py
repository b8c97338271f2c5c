"""The regression gate (`python -m analysis --compare BASE NEW --fail-on …`): expressions, significance by the
intervals, refusals, the JUnit file, and a deliberately slowed engine caught against an earlier sweep."""

from __future__ import annotations

import copy
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from analysis.gate import GATE_FAILED, GateError, judge, parse_rule


def result(metrics: dict, **config) -> dict:
    return {"status": "ok", "point": {"model": "m", "quant": "none", "bench": "latency"},
            "config": {"bench": {"name": "latency", "max_new_tokens": 8, **config}}, "metrics": metrics}  # fmt: skip


def stat(mean: float, ci: float | None = 1.0, **extra) -> dict:
    return {"n": 20, "mean": mean, "ci95": ci, "unit": "ms", **extra}


def test_expressions_are_parsed_and_malformed_ones_say_the_form():
    rule = parse_rule("ttft_ms[prompt=128].p50:+5%")
    assert (rule.name, rule.case, rule.stat, rule.sign, rule.threshold, rule.relative) == (
        "ttft_ms", "prompt=128", "p50", 1, 0.05, True)  # fmt: skip
    rule = parse_rule("pass_rate:-0.05")
    assert (rule.case, rule.stat, rule.sign, rule.threshold, rule.relative) == (None, "mean", -1, 0.05, False)
    for bad in ("ttft_ms", "ttft_ms:5%", "ttft_ms[prompt=1].p42:+5%", "ttft_ms:+abc", "rm -rf:+1"):
        with pytest.raises(GateError, match="METRIC|statistic"):
            parse_rule(bad)


def test_a_change_fails_only_beyond_the_threshold_and_outside_both_intervals():
    base = [result({"ttft_ms[prompt=8]": stat(100.0, 2.0), "pass_rate": {"mean": 0.9, "ci95_low": 0.8,
                                                                           "ci95_high": 0.95}})]  # fmt: skip
    slower = [result({"ttft_ms[prompt=8]": stat(110.0, 2.0), "pass_rate": {"mean": 0.5, "ci95_low": 0.4,
                                                                             "ci95_high": 0.6}})]  # fmt: skip
    noisy = [result({"ttft_ms[prompt=8]": stat(110.0, 20.0), "pass_rate": {"mean": 0.88, "ci95_low": 0.7,
                                                                             "ci95_high": 0.94}})]  # fmt: skip
    rules = [parse_rule("ttft_ms[prompt=8]:+5%"), parse_rule("pass_rate:-0.05")]
    assert [v.failed for v in judge(rules, base, slower)] == [True, True]
    verdicts = judge(rules, base, noisy)  # 10% slower, but within the noise; the pass rate fell 0.02 only
    assert [(v.beyond, v.significant, v.failed) for v in verdicts] == [(True, False, False), (False, False, False)]
    # A rise of 10% where 15% is allowed passes however clear it is; an improvement never fails.
    assert not judge([parse_rule("ttft_ms:+15%")], base, slower)[0].failed
    assert not judge([parse_rule("ttft_ms:-5%")], base, slower)[0].failed
    # No interval, no claim: a single value moved 10% is reported, not failed.
    flat = judge([parse_rule("ttft_ms:+5%")], [result({"ttft_ms": stat(100.0, None)})],
                 [result({"ttft_ms": stat(110.0, None)})])  # fmt: skip
    assert flat[0].beyond and flat[0].significant is None and not flat[0].failed


def test_a_percentile_is_judged_by_its_order_statistic_interval():
    base = [result({"ttft_ms[prompt=8]": stat(100.0, 1.0, p99=150.0, p99_low=140.0, p99_high=None)})]
    new = [result({"ttft_ms[prompt=8]": stat(100.0, 1.0, p99=200.0, p99_low=190.0, p99_high=None)})]
    (verdict,) = judge([parse_rule("ttft_ms[prompt=8].p99:+10%")], base, new)
    # BASE's p99 has no upper bound from 20 requests: a rise cannot be shown, however large.
    assert verdict.beyond and verdict.significant is None and "cannot be shown" in verdict.why


def test_unknown_metrics_cases_and_baselines_of_another_config_are_refused():
    base, new = [result({"ttft_ms[prompt=8]": stat(1.0)})], [result({"ttft_ms[prompt=8]": stat(1.0)})]
    with pytest.raises(GateError, match="Did you mean ttft_ms"):
        judge([parse_rule("ttft_m:+5%")], base, new)
    with pytest.raises(GateError, match="no case 'prompt=9'"):
        judge([parse_rule("ttft_ms[prompt=9]:+5%")], base, new)
    other = [result({"ttft_ms[prompt=8]": stat(1.0)}, max_new_tokens=64)]
    with pytest.raises(GateError, match="bench.max_new_tokens: 8 -> 64"):
        judge([parse_rule("ttft_ms:+5%")], base, other)
    elsewhere = copy.deepcopy(new)
    elsewhere[0]["point"]["model"] = "another"
    with pytest.raises(GateError, match="no point of NEW matches"):
        judge([parse_rule("ttft_ms:+5%")], base, elsewhere)


def sweep(tmp_path: Path, monkeypatch, name: str, engine_module: str) -> Path:
    """A 2-point latency sweep of tiny-gpt2 (two seeds) with engine=transformers run by `engine_module`."""
    import harness.__main__ as entry
    from harness.engines import ENGINES

    monkeypatch.setitem(ENGINES, "transformers", engine_module)
    monkeypatch.setattr(entry, "_outcomes", [])
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / name
    monkeypatch.setattr(sys, "argv", ["harness", "-m", "model=tiny-gpt2", "bench=latency", "seed=0,1",
                                      "bench.prompt_lengths=[8]", "bench.max_new_tokens=6", "bench.min_runs=8",
                                      "bench.max_runs=10", "bench.min_seconds=0", "isolation=inline", "report=false",
                                      f"hydra.sweep.dir={folder}"])  # fmt: skip
    assert entry.main() == 0
    return folder


def test_a_deliberately_slowed_engine_fails_the_gate_against_the_earlier_sweep(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    base = sweep(tmp_path, monkeypatch, "base", "harness.engines.transformers")
    slowed = sweep(tmp_path, monkeypatch, "slowed", "slow_engine")
    gate = ["--fail-on", "tpot_ms[prompt=8].p50:+20%", "--fail-on", "decode_tok_s:-10%"]
    assert analysis_main(["--compare", str(base), str(slowed), *gate]) == GATE_FAILED
    junit = ET.parse(slowed / "gate.junit.xml").getroot()
    suite = junit.find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "4"  # 2 rules x 2 seeds
    assert "moved +" in suite.find("testcase/failure").get("message")
    assert "FAILED" in (slowed / "gate.md").read_text() and (slowed / "compare.md").is_file()
    assert not (base / "gate.md").exists()  # the stored baseline is left as it was
    # The same sweep against itself passes: nothing moved.
    assert analysis_main(["--compare", str(base), str(base), *gate, "--out", str(tmp_path / "same")]) == 0
    same = ET.parse(tmp_path / "same" / "gate.junit.xml").getroot().find("testsuite")
    assert same is not None and same.get("failures") == "0"
    # Bad input exits 2 with the fix, before any gate file is written.
    capsys.readouterr()
    assert analysis_main(["--compare", str(base), str(slowed), "--fail-on", "tpot_ms:5%", "--out",
                          str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "METRIC[CASE].STAT" in capsys.readouterr().err and not (tmp_path / "bad" / "gate.md").exists()
    assert analysis_main([str(base), "--fail-on", "tpot_ms:+5%"]) == 2
    edited = tmp_path / "edited"
    for path in base.rglob("result.json"):
        data = json.loads(path.read_text())
        data["config"]["bench"]["max_new_tokens"] = 12
        target = edited / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data))
    assert analysis_main(["--compare", str(edited), str(slowed), *gate]) == 2
    assert "Rerun the baseline with NEW's overrides" in capsys.readouterr().err
