"""tracking=mlflow against a real MLflow tracking server started by the test on loopback: every point a run of
the sweep's experiment (params, metrics, tags, artifacts, the report), logged once however often the sweep
resumes, and a server that cannot be reached neither fails nor slows the sweep, which says how to retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from harness.errors import ConfigError
from harness.loadgen.launch import free_port
from harness.tracking import metric_key, require_mlflow
from tests.conftest import run_harness

mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed (pip install -e '.[tracking]')")

SWEEP = ["-m", "model=tiny-gpt2", "bench=latency", "seed=0,1", "bench.prompt_lengths=[8]", "bench.max_new_tokens=4",
         "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0", "tracking=mlflow"]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    with open(root / "server.log", "wb") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def runs_of(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_metric_names_become_mlflow_keys():
    assert metric_key("ttft_ms[prompt=128,trial=2]") == "ttft_ms/prompt_128/trial_2"
    assert metric_key("weights_mib") == "weights_mib"
    assert metric_key("server_kv[replay=5x]") == "server_kv/replay_5x"


def test_a_sweep_lands_in_mlflow_once_with_its_config_metrics_and_files(tmp_path, mlflow_server):
    folder = tmp_path / "outputs" / "multirun" / "tracked"
    args = [*SWEEP, f"tracking_uri={mlflow_server}", f"hydra.sweep.dir={folder}"]
    done = run_harness(tmp_path, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = runs_of(mlflow_server, "tracked")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    run = runs[0]
    assert run.data.params["bench.max_new_tokens"] == "4" and run.data.tags["harness.engine"] == "transformers"
    assert run.data.tags["harness.point.model"] == "tiny-gpt2" and run.data.tags["harness.git_commit"]
    assert run.data.metrics["ttft_ms/prompt_8"] > 0 and "ttft_ms/prompt_8.p50" in run.data.metrics
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "samples.csv", "report"} <= files
    assert "report/report.html" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    result = json.loads(next(folder.rglob("result.json")).read_text())
    assert result["details"]["tracking"]["logged"] and result["details"]["tracking"]["experiment"] == "tracked"
    # Resumed (every point skipped) and then sent again by hand: still one run per point.
    assert run_harness(tmp_path, *args).returncode == 0
    assert subprocess.run([sys.executable, "-m", "harness.cli", "track", str(folder), "--uri", mlflow_server],
                          capture_output=True, text=True).returncode == 0  # fmt: skip
    assert len(runs_of(mlflow_server, "tracked")) == 2


def test_an_unreachable_server_neither_fails_nor_slows_the_sweep_and_the_retry_sends_the_points(
    tmp_path, mlflow_server
):
    folder = tmp_path / "outputs" / "multirun" / "offline"
    nowhere = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    done = run_harness(tmp_path, *SWEEP, f"tracking_uri={nowhere}", f"hydra.sweep.dir={folder}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - t0 < 90
    assert "not logged to MLflow" in done.stdout and f"harness track {folder} --uri {nowhere}" in done.stdout
    results = [json.loads(p.read_text()) for p in folder.rglob("result.json")]
    assert all(not r["details"]["tracking"]["logged"] and nowhere in r["details"]["tracking"]["why"] for r in results)
    from harness.cli import main as cli_main

    assert cli_main(["track", str(folder), "--uri", nowhere]) == 1  # still down: said, not raised
    assert cli_main(["track", str(folder), "--uri", mlflow_server]) == 0
    assert len(runs_of(mlflow_server, "offline")) == 2


def test_tracking_without_mlflow_installed_is_refused_with_the_extra_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"\.\[tracking\]"):
        require_mlflow()
