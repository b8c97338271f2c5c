"""Sweep behaviour: a fresh process per point, crashes recorded, resume, force, launchers."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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
    from runners.records import finished_ok

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


def _start_sweep(cwd, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "-m", *args],
        cwd=cwd,
        env=harness_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def point_processes(sweep: subprocess.Popen) -> list[psutil.Process]:
    """The sweep's point processes: its descendants that lead a session of their own (a point forked from the fork
    server, or spawned as `python -m runners`, calls setsid)."""
    found = []
    for p in psutil.Process(sweep.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == p.pid:
                found.append(p)
    return found


def _wait_for_point_process(cwd, sweep, count=1):
    """The process of the count-th point, once it is inside its bench."""
    deadline = time.time() + 120
    while time.time() < deadline:
        procs = point_processes(sweep)
        if len(list((cwd / "outputs").rglob("point.json"))) >= count and procs:
            time.sleep(4)  # model load done: the point is in its bench
            return procs[0]
        time.sleep(0.2)
    raise AssertionError("the point's process did not start")


@pytest.mark.parametrize(("how", "status"), [("SIGINT to the group", 130), ("SIGTERM to the parent", 143)])
def test_a_signal_stops_the_sweep_with_a_summary_and_no_orphan(tmp_path, how, status):
    proc = _start_sweep(tmp_path, "model=tiny-gpt2", "bench.max_new_tokens=3", "bench.name=smoke,faults:sleepy")
    child = _wait_for_point_process(tmp_path, proc, count=2)
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the fork server and the point
    if how.startswith("SIGINT"):
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    else:
        proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` does: the parent only
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == status, out + err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert "stopped by SIG" in out and "1 of 2 points ok, 1 interrupted" in out
    by_bench = {r["config"]["bench"]["name"]: r for r in results(tmp_path).values()}  # every file parses whole
    assert by_bench["smoke"]["status"] == "ok"
    interrupted = by_bench["faults:sleepy"]
    assert interrupted["status"] == "failed" and interrupted["error"]["type"] == "Interrupted"
    assert ("SIGTERM" if status == 143 else "SIG") in interrupted["error"]["message"]
    assert not [p for p in (tmp_path / "outputs").rglob("*.tmp")]
    summary = next((tmp_path / "outputs").rglob("summary.md")).read_text()
    assert "Points that did not finish" in summary and "Interrupted" in summary
    time.sleep(0.5)
    for p in [child, *helpers]:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, f"{p.cmdline()} outlived the sweep"


@pytest.mark.parametrize("content", ["[1]", "null", '{"status": 5}', '{"status": "ok"', '"ok"', ""])
def test_a_corrupt_result_is_set_aside_and_the_point_redone(tmp_path, content):
    args = ["-m", "model=tiny-gpt2", "bench.max_new_tokens=2", "report=false"]
    assert run_harness(tmp_path, *args).returncode == 0
    (path,) = (tmp_path / "outputs").rglob("result.json")
    path.write_text(content)
    again = run_harness(tmp_path, *args)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "set aside" in again.stdout and "[skipped" not in again.stdout
    assert json.loads(path.read_text())["status"] == "ok"
    (aside,) = path.parent.glob("result.json.unreadable-*")
    assert aside.read_text() == content  # kept for a person to look at


def test_a_sweep_over_a_field_reports_one_row_per_point(tmp_path):
    args = ["-m", "model=tiny-qwen2", "bench=latency", "seed=1,2,3", "bench.max_new_tokens=2",
            "bench.prompt_lengths=[8]", "bench.min_runs=2", "bench.min_seconds=0"]  # fmt: skip
    proc = run_harness(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = next((tmp_path / "outputs" / "multirun").iterdir())
    summary = (folder / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| tiny-qwen2")]
    assert [r.split(" | ")[0] for r in rows] == [f"| tiny-qwen2 q=none seed={s}" for s in (1, 2, 3)]
    assert (folder / "report.html").stat().st_size > 0 and list((folder / "plots").glob("*.png"))
    assert "seed=2" in proc.stdout  # the sweep's own summary lines name the swept field


def test_report_false_keeps_the_sweep_folder(tmp_path):
    args = ["-m", "model=tiny-gpt2", "bench.max_new_tokens=2"]
    assert run_harness(tmp_path, *args, "report=false").returncode == 0
    again = run_harness(tmp_path, *args)
    assert again.returncode == 0 and "[skipped: already ok]" in again.stdout
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 1 and (sweep / "report.html").is_file()


def test_a_redone_point_keeps_no_log_of_the_attempt_before(tmp_path):
    args = ["-m", "model=tiny-gpt2", "bench.max_new_tokens=2", "report=false"]
    assert run_harness(tmp_path, *args).returncode == 0
    (folder,) = [p.parent for p in (tmp_path / "outputs").rglob("result.json")]
    (folder / "error.log").write_text("PointCrashed: from an earlier attempt")
    assert run_harness(tmp_path, *args, "force=true").returncode == 0
    assert not (folder / "error.log").exists()


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False):
    """A small file system of its own at folder (root and mount(8) needed: else the test is skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) to make a full or read-only file system")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_output_folder_is_a_clear_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        proc = run_harness(folder, "-m", "model=tiny-gpt2", "bench.max_new_tokens=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "outputs/multirun cannot be written" in proc.stderr and "hydra.sweep.dir" in proc.stderr


def test_a_read_only_cache_folder_is_a_clear_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        proc = run_harness(tmp_path, "model=tiny-gpt2", env={"HARNESS_CACHE_DIR": str(folder / "cache")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cache_dir" in proc.stderr and "cannot be written" in proc.stderr


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


def test_a_full_disk_loses_nothing_and_names_the_path(tmp_path):
    args = ["-m", "model=tiny-gpt2", "bench.max_new_tokens=2", "report=false"]
    with tmpfs(tmp_path / "disk", "8m") as folder:
        assert run_harness(folder, *args).returncode == 0
        (result,) = (folder / "outputs").rglob("result.json")
        before = result.read_text()
        _fill(folder)
        report = subprocess.run([sys.executable, "-m", "analysis", str(result.parent.parent)], cwd=folder,
                                env=harness_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
        assert "No space left on device" in report.stderr and "--out" in report.stderr
        forced = run_harness(folder, *args, "force=true")
        assert forced.returncode != 0 and "Traceback" not in forced.stderr + forced.stdout, forced.stderr[-3000:]
        assert "No space left on device" in forced.stderr + forced.stdout and "could not write" in forced.stderr
        assert str(folder / "outputs") in forced.stderr  # the path is named
        assert json.loads(result.read_text()) == json.loads(before)  # the last good result is still whole
        written = [p for p in (folder / "outputs").rglob("*") if p.is_file() and p.name != "__main__.log"]
        assert not [p for p in written if p.suffix == ".tmp" or p.stat().st_size == 0], written  # (Hydra's log may be)


def test_a_path_in_the_overrides_names_one_flat_folder_per_point(tmp_path):
    # workflow.cases=dir/file.json used to nest folders, and both points were named "file.json,workflow=chat".
    cases = tmp_path / "mine" / "chat.json"
    cases.parent.mkdir()
    cases.write_text(json.dumps({"workflow": "chat", "cases": [{"id": "a", "turns": [{"user": "Hi"}]}]}))
    proc = run_harness(tmp_path, "-m", "model=tiny-gpt2,tiny-qwen2", "bench=e2e", "workflow=chat",
                       f"workflow.cases={cases}", "workflow.max_new_tokens=2")  # fmt: skip
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    points = sorted(p.parent for p in sweep.rglob("result.json"))
    assert [p.parent for p in points] == [sweep, sweep] and len({p.name for p in points}) == 2
    assert all(f"workflow.cases={str(cases).replace('/', '%2F')}" in p.name for p in points)


def test_points_fork_from_the_server_or_spawn_a_fresh_interpreter(tmp_path):
    args = ["model=tiny-gpt2", "bench.max_new_tokens=2", "report=false"]
    forked = run_harness(tmp_path, *args, "hydra.run.dir=forked")
    spawned = run_harness(tmp_path, *args, "isolation=spawn", "hydra.run.dir=spawned")
    assert forked.returncode == 0 and spawned.returncode == 0, forked.stderr + spawned.stderr
    timings = {d: json.loads((tmp_path / d / "result.json").read_text())["timings"] for d in ("forked", "spawned")}
    # A forked point starts with torch imported; a fresh interpreter imports it first.
    assert timings["forked"]["startup_s"] < timings["spawned"]["startup_s"]


def test_a_forked_point_in_process_and_a_crash_in_one(tmp_path, monkeypatch):
    from harness.config import load_config
    from runners.execute import execute_point
    from runners.forkserver import fork_server

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the child finds tests/faults.py
    ok = load_config(["model=tiny-gpt2", "bench.max_new_tokens=2"])
    result, skipped = execute_point(ok, tmp_path / "ok", {"model": "tiny-gpt2"})
    assert result.status == "ok" and not skipped, result.error
    server = fork_server()
    assert server is not None and server.alive()
    crash = load_config(["model=tiny-gpt2", "bench.name=faults:segfault"])
    result, _ = execute_point(crash, tmp_path / "crash", {"model": "tiny-gpt2"})
    assert result.status == "failed" and result.error["type"] == "PointCrashed"
    assert "SIGSEGV" in result.error["message"] and fork_server() is server  # the server outlives its point
