"""Run history (`harness runs`): the index a finished sweep appends to, rebuilt from the folders when missing or
stale, and one figure followed across runs."""

from __future__ import annotations

import json
import shutil
import sys

from analysis.history import INDEX, list_runs, outputs_root
from harness.cli import main as cli_main


def sweep(monkeypatch, folder: str) -> None:
    import harness.__main__ as entry

    monkeypatch.setattr(entry, "_outcomes", [])
    monkeypatch.setattr(sys, "argv", ["harness", "-m", "model=tiny-gpt2", "bench=latency", "seed=0,1",
                                      "bench.prompt_lengths=[8]", "bench.max_new_tokens=4", "bench.min_runs=3",
                                      "bench.max_runs=3", "bench.min_seconds=0", "isolation=inline", "report=false",
                                      f"hydra.sweep.dir={folder}"])  # fmt: skip
    assert entry.main() == 0


def test_sweeps_are_indexed_listed_and_followed_across_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep(monkeypatch, "outputs/multirun/first")
    sweep(monkeypatch, "outputs/multirun/second")
    outputs = tmp_path / "outputs"
    assert outputs_root(outputs / "multirun" / "first") == outputs
    index = [json.loads(line) for line in (outputs / INDEX).read_text().splitlines()]
    assert [(r["folder"], r["points"], r["ok"], r["failed"]) for r in index] == [
        ("multirun/first", 2, 2, 0), ("multirun/second", 2, 2, 0)]  # fmt: skip
    assert index[0]["command"].startswith("python -m harness -m model=tiny-gpt2")
    capsys.readouterr()
    assert cli_main(["runs", "outputs"]) == 0
    listing = capsys.readouterr().out
    assert "multirun/first" in listing and "multirun/second" in listing and "points" in listing

    # The index is never the only copy: removed, it is rebuilt; a sweep deleted by hand leaves it.
    (outputs / INDEX).unlink()
    shutil.rmtree(outputs / "multirun" / "first")
    assert [r["folder"] for r in list_runs(outputs)] == ["multirun/second"]
    assert json.loads((outputs / INDEX).read_text())["folder"] == "multirun/second"
    sweep(monkeypatch, "outputs/multirun/third")
    assert [r["folder"] for r in list_runs(outputs)] == ["multirun/second", "multirun/third"]

    capsys.readouterr()
    assert cli_main(["runs", "outputs", "--metric", "decode_tok_s[prompt=8]", "--model", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "decode_tok_s[prompt=8]" in line]
    assert len(rows) == 4 and sum("seed=0" in r for r in rows) == 2  # two runs x two points, each named by its seed
    assert (outputs / "runs_decode_tok_s_prompt=8_.png").stat().st_size > 1000
    assert cli_main(["runs", "outputs", "--metric", "decode_tok_z"]) == 2
    assert "Did you mean decode_tok_s" in capsys.readouterr().err
    assert cli_main(["runs", "outputs", "--metric", "decode_tok_s", "--model", "gpt7"]) == 2
    assert cli_main(["runs", "nowhere"]) == 2
