"""The engine registry: every conf/engine option has a module with load and create, a toy engine added as
docs/engines.md says is swept beside transformers, and a field the chosen engine does not read is refused."""

import json
import re
import sys

import pytest

from harness.config import conf_dir, engine_choices
from harness.engines import ENGINES, engine_module
from harness.errors import ConfigError
from runners.sweep import precheck


def test_every_engine_option_has_a_registered_module_with_load_and_create():
    assert set(ENGINES) == set(engine_choices())
    for name in ENGINES:
        module = engine_module(name)
        assert callable(module.load) and callable(module.create), name
    with pytest.raises(ConfigError, match="Did you mean 'llamacpp'"):
        engine_module("llamacp")


def test_a_toy_engine_added_as_the_docs_say_is_swept_beside_transformers(tmp_path, monkeypatch, capsys):
    import harness.__main__ as entry

    option = conf_dir() / "engine" / "toy.yaml"
    option.write_text("# a test's toy engine (tests/toy_engine.py); removed when the test ends\nname: toy\n")
    try:
        monkeypatch.setitem(ENGINES, "toy", "toy_engine")  # the registry line
        monkeypatch.setattr(entry, "_outcomes", [])
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["harness", "-m", "model=tiny-gpt2", "engine=transformers,toy",
                                          "bench=smoke", "bench.max_new_tokens=4", "isolation=inline"])  # fmt: skip
        assert entry.main() == 0, capsys.readouterr()
    finally:
        option.unlink()
    results = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "multirun").rglob("result.json")]
    by_engine = {r["resolved"]["engine"]["name"]: r for r in results}
    assert set(by_engine) == {"transformers", "toy"} and all(r["status"] == "ok" for r in results)
    assert by_engine["toy"]["outputs"][0]["text"] == "a fixed reply from"
    assert by_engine["toy"]["metrics"]["output_tokens"]["mean"] == 4
    summary = next((tmp_path / "outputs" / "multirun").glob("*/summary.md")).read_text()
    assert "toy" in summary and "transformers" in summary


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["engine=transformers", "engine.n_ctx=512"], "engine.n_ctx is read by engine=llamacpp|openai|vllm, not by"),
        (["engine=llamacpp", "model=smollm2", "engine.provider=cpu"], "read by engine=onnxruntime, not by"),
        (["engine=onnxruntime", "model=tiny-qwen2", "engine.n_batch=8"], "read by engine=llamacpp"),
        (["bench=serve", "bench.base_url=http://127.0.0.1:9/v1"], "add bench.target=url"),
        (["bench=serve", "bench.served_model=m"], "add bench.target=url"),
    ],
)
def test_a_field_the_chosen_option_does_not_read_is_refused(args, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        precheck(args, multirun=False)


def test_a_launched_server_still_reads_its_launch_fields():
    precheck(["bench=serve", "bench.target=harness", "engine.launch_timeout_s=60", "engine.batching=continuous"],
             multirun=False)  # fmt: skip
