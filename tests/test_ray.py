"""hydra/launcher=ray on a local Ray instance sized for this machine: a sweep's points as Ray tasks that report like
any sweep, each asking for what its point needs; a point no node can hold fails with the counts while the sweep
goes on; a cluster address where nothing answers is refused at once; no Ray process outlives the sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from harness.loadgen.launch import free_port
from tests.conftest import run_harness

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed")

from runners.ray_launcher import point_resources

SWEEP = ["-m", "hydra/launcher=ray", "bench=latency", "bench.prompt_lengths=[8]", "bench.max_new_tokens=4",
         "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0", "+hydra.launcher.ray.init.num_cpus=2",
         "+hydra.launcher.ray.init.include_dashboard=false"]  # fmt: skip


def ray_processes() -> int:
    listed = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return len(listed.split())


def test_a_sweep_runs_as_ray_tasks_and_reports_like_any_sweep(tmp_path):
    before = ray_processes()
    done = run_harness(tmp_path, *SWEEP, "model=tiny-qwen2,tiny-llama", "hydra.sweep.dir=outputs/multirun/ray")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    folder = tmp_path / "outputs" / "multirun" / "ray"
    results = [json.loads(p.read_text()) for p in folder.rglob("result.json")]
    assert sorted(r["point"]["model"] for r in results) == ["tiny-llama", "tiny-qwen2"]
    assert all(r["status"] == "ok" and r["metrics"]["ttft_ms[prompt=8]"]["n"] == 3 for r in results)
    assert (folder / "summary.md").is_file() and "2 of 2 points ok" in done.stdout
    # Each task asked for a whole node's CPUs (one point at a time: their timings stay their own).
    assert "'num_gpus': 0, 'num_cpus': 2.0" in done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while ray_processes() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes() <= before  # the local instance went with the sweep


def test_a_point_no_node_can_hold_fails_with_the_counts_and_the_sweep_goes_on(tmp_path):
    done = run_harness(tmp_path, *SWEEP, "model=tiny-qwen2", "+hydra.launcher.ray.remote.num_gpus=1",
                       "hydra.sweep.dir=outputs/multirun/nogpu")  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (tmp_path / "outputs" / "multirun" / "nogpu").rglob("result.json")
    error = json.loads(path.read_text())["error"]
    assert "needs 1 GPUs (the cluster has 0)" in error["message"] and "hydra.launcher.ray.remote" in error["hint"]


def test_a_cluster_address_where_nothing_answers_is_refused_at_once(tmp_path):
    t0 = time.monotonic()
    done = run_harness(
        tmp_path, *SWEEP, "model=tiny-qwen2", f"+hydra.launcher.ray.init.address=127.0.0.1:{free_port()}"
    )
    assert done.returncode == 2 and "nothing answers there" in done.stderr and "ray start --head" in done.stderr
    assert time.monotonic() - t0 < 60 and "Traceback" not in done.stderr


def test_a_ray_option_without_its_plus_is_refused_with_the_fix(tmp_path):
    done = run_harness(tmp_path, "-m", "hydra/launcher=ray", "model=tiny-qwen2", "hydra.launcher.ray.init.num_cpus=2")
    assert done.returncode == 2 and "+hydra.launcher.ray.init.num_cpus=2" in done.stderr
    assert "Traceback" not in done.stderr


def test_each_point_asks_for_the_gpus_and_cpus_it_needs(compose, monkeypatch):
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", sys.executable)

    def needs(*overrides: str, gpus: float = 4.0) -> dict:
        cfg = OmegaConf.structured(compose("model=smollm2", *overrides))
        return point_resources(cfg, gpus, 8.0)

    assert needs("engine=vllm", "engine.tensor_parallel=2", "engine.pipeline_parallel=2")["num_gpus"] == 4
    assert needs("engine=vllm", "engine.tensor_parallel=2", gpus=0)["num_gpus"] == 0  # the CPU build
    assert needs() == {"num_gpus": 1, "num_cpus": 8.0}  # device auto on a cluster with GPUs
    assert needs(gpus=0)["num_gpus"] == 0 and needs("model.device=cpu")["num_gpus"] == 0
    assert needs("engine=vllm", "engine.cpus=[0,1]")["num_cpus"] == 2.0
    assert needs("engine.tensor_parallel=2", "bench=latency")["num_gpus"] == 2  # transformers: a GPU per rank
    assert needs("engine.tensor_parallel=2", "bench=latency", gpus=0)["num_gpus"] == 0  # ranks on CPUs
    assert needs("point_memory_limit_mb=4096")["memory"] == 4096 * 2**20
