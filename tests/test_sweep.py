"""Sweep behaviour: a fresh process per point, crashes recorded, resume, force, launchers."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import harness_env, run_harness
from harness.result import write_json_atomic
from runners.sweep import sweep_id


def results(cwd: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (cwd / "outputs" / "multirun").rglob("result.json")}


def test_crashing_points_are_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_harness(
        tmp_path,
        "-m",
        "model=tiny-gpt2",
        "bench.max_new_tokens=3",
        "bench.name=smoke,faults:segfault,faults:exit_now,faults:sigkill",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 of 4 points ok, 3 failed" in proc.stdout
    by_bench = {r["config"]["bench"]["name"]: r for r in results(tmp_path).values()}
    assert by_bench["smoke"]["status"] == "ok"
    assert "SIGSEGV" in by_bench["faults:segfault"]["error"]["message"]
    assert "exited with status 3" in by_bench["faults:exit_now"]["error"]["message"]
    assert "SIGKILL" in by_bench["faults:sigkill"]["error"]["message"]
    assert "OOM killer" in by_bench["faults:sigkill"]["error"]["hint"]
    for r in by_bench.values():
        if r["status"] == "failed":
            assert r["error"]["type"] == "PointCrashed"
    segv_log = next((tmp_path / "outputs" / "multirun").rglob("*segfault*/error.log")).read_text()
    assert "faults.py" in segv_log  # the Python stack at the crash


def test_rerun_computes_only_what_is_missing_and_force_redoes(tmp_path):
    args = ["-m", "model=tiny-gpt2", "bench.max_new_tokens=3", "bench.name=smoke,faults:sigkill"]
    first = run_harness(tmp_path, *args)
    assert first.returncode == 1
    before = {k: v["attempt"] for k, v in results(tmp_path).items()}
    again = run_harness(tmp_path, *args)
    assert again.returncode == 1 and "[skipped: already ok]" in again.stdout
    after = {k: v["attempt"] for k, v in results(tmp_path).items()}
    ok_key = next(k for k in before if "sigkill" not in k)
    bad_key = next(k for k in before if "sigkill" in k)
    assert after[ok_key] == before[ok_key] and after[bad_key] != before[bad_key]
    forced = run_harness(tmp_path, *args, "force=true")
    assert "[skipped" not in forced.stdout
    assert results(tmp_path)[ok_key]["attempt"] != before[ok_key]
    assert len(list((tmp_path / "outputs" / "multirun").iterdir())) == 1  # force does not change the folder


def test_a_changed_config_is_not_skipped(tmp_path):
    assert run_harness(tmp_path, "-m", "model=tiny-gpt2", "bench.max_new_tokens=3").returncode == 0
    from runners.execute import finished_ok

    folder = next((tmp_path / "outputs" / "multirun").rglob("result.json")).parent
    data = json.loads((folder / "result.json").read_text())
    assert finished_ok(folder, data["config_digest"])
    assert not finished_ok(folder, "another digest")


def test_point_over_its_memory_limit_fails_with_out_of_memory(tmp_path):
    proc = run_harness(tmp_path, "-m", "model=tiny-gpt2", "bench.name=faults:hog", "point_memory_limit_mb=300")
    assert proc.returncode == 1
    (result,) = results(tmp_path).values()
    assert result["error"]["type"] == "OutOfMemoryError" and "Traceback" not in proc.stdout


def test_a_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "ok"})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"status": "failed", "big": "x" * 10000})
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_sweep_folder_is_stable_for_the_same_command():
    a = sweep_id(["-m", "model=a,b", "quant=none,4bit"])
    assert a == sweep_id(["quant=none,4bit", "-m", "model=a,b", "force=true", "print_text=false"])
    assert a != sweep_id(["-m", "model=a,b", "quant=none"])
    assert sweep_id(["-m", "experiment=quant_sweep"]).startswith("quant_sweep-")


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_hydra_launchers(tmp_path, launcher):
    pytest.importorskip(
        "hydra_plugins.hydra_joblib_launcher" if launcher == "joblib" else "hydra_plugins.hydra_submitit_launcher"
    )
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    proc = run_harness(
        tmp_path, "-m", f"hydra/launcher={launcher}", "model=tiny-gpt2,tiny-qwen2", "bench.max_new_tokens=3", *extra
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = results(tmp_path)
    assert len(found) == 2 and all(r["status"] == "ok" for r in found.values())
    assert "2 of 2 points ok" in proc.stdout


def test_ctrl_c_leaves_a_complete_result_that_says_interrupted(tmp_path):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "-m", "model=tiny-gpt2", "bench.name=faults:sleepy"],
        cwd=tmp_path,
        env=harness_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while not list((tmp_path / "outputs").rglob("point.json")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # the point's process is inside its bench now
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    (result,) = results(tmp_path).values()  # parses: complete JSON
    assert result["status"] == "failed" and result["error"]["type"] == "Interrupted"
    assert not [p for p in (tmp_path / "outputs").rglob("*.tmp")]
