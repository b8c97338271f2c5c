import itertools
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis import SchemaError, load_results
from harness.environment import ENV_ALLOWED, capture_environment
from harness.errors import ConfigError, ModelLoadError, format_error
from harness.result import Result, write_json_atomic, write_result
from harness.stats import summarize, t95


def test_summary_of_known_values():
    s = summarize([1, 2, 3, 4, 5], "ms")
    assert s["unit"] == "ms" and s["n"] == 5 and s["mean"] == 3 and s["p50"] == 3
    assert s["min"] == 1 and s["max"] == 5
    assert math.isclose(s["stdev"], math.sqrt(2.5))
    assert math.isclose(s["ci95"], 2.776 * math.sqrt(2.5) / math.sqrt(5))
    for q in (90, 95, 99):
        assert math.isclose(s[f"p{q}"], float(np.percentile([1, 2, 3, 4, 5], q)))


def test_single_value_has_no_interval():
    s = summarize([7.0], "tok/s")
    assert s["ci95"] is None and s["stdev"] == 0 and s["p99"] == 7


def test_t_table():
    assert t95(1) == 12.706 and t95(35) == 2.042 and t95(1000) == 1.96
    with pytest.raises(ValueError):
        t95(0)
    with pytest.raises(ValueError):
        summarize([], "ms")


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50))
def test_statistic_is_ordered(values):
    s = summarize(values, "x")
    eps = 1e-6 * (1 + max(abs(v) for v in values))
    ordered = [s["min"], s["p50"], s["p90"], s["p95"], s["p99"], s["max"]]
    assert all(a <= b + eps for a, b in itertools.pairwise(ordered))
    assert s["min"] - eps <= s["mean"] <= s["max"] + eps


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})  # refused mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_result_schema_and_status():
    with pytest.raises(ValueError):
        Result(status="maybe", point={}, config={})
    data = Result(status="ok", point={"model": "m"}, config={}).to_dict()
    assert next(iter(data)) == "schema"
    for key in ("status", "point", "config", "resolved", "environment", "metrics", "timings", "error"):
        assert key in data


def test_errors_carry_cause_and_fix():
    e = ModelLoadError("the file is gone.", "put it back.")
    assert str(e) == "the file is gone. Fix: put it back."
    assert e.error_record() == {"type": "ModelLoadError", "message": "the file is gone.", "hint": "put it back."}
    assert format_error(ConfigError("bad.", "good.")).startswith("ConfigError: bad.")
    assert format_error(KeyError("k")) == "KeyError: 'k'"


def test_environment_has_versions_and_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = capture_environment()
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["cores_logical"] >= 1
    assert env["env"]["OMP_NUM_THREADS"] == "2" and set(env["env"]) <= set(ENV_ALLOWED)
    text = json.dumps(env)
    assert "secret" not in text


def test_analysis_reads_results_and_checks_schema(tmp_path):
    write_result(tmp_path / "a", Result(status="ok", point={"model": "m"}, config={}))
    write_result(tmp_path / "b", Result(status="failed", point={"model": "n"}, config={}))
    results = load_results(tmp_path)
    assert [r["status"] for r in results] == ["ok", "failed"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text(json.dumps({"schema": "harness.result/99"}))
    with pytest.raises(SchemaError, match="harness.result/99"):
        load_results(tmp_path)
    (tmp_path / "c" / "result.json").write_text("{half")
    with pytest.raises(SchemaError, match="not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing")
