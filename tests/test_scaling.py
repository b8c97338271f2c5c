"""Points that split a model over GPUs: vLLM's tensor and pipeline parallel sizes and DeepSpeed-MII's tensor
parallel degree as engine fields (in the launched server's command and in `resolved`), transformers across GPUs by
model.device_map; on a machine with fewer GPUs than a point needs, it is refused before anything runs, with the
count. (This machine has none: the real runs are scripts/gpu_check.sh's, on a GPU machine.)"""

from __future__ import annotations

import sys

import pytest

from harness.errors import ConfigError
from harness.loadgen.launch import _command
from harness.loadgen.target import harness_engine_args
from runners.point import check_point
from tests.conftest import run_harness


@pytest.fixture(autouse=True)
def environments(monkeypatch):
    monkeypatch.setenv("HARNESS_VLLM_PYTHON", sys.executable)  # composing engine=vllm|deepspeed asks for its python
    monkeypatch.setenv("HARNESS_MII_PYTHON", sys.executable)


def test_parallel_sizes_reach_the_launched_servers_command(compose):
    def args(engine: str, launch: str, *overrides: str) -> list[str]:
        return harness_engine_args(compose("model=smollm2", f"engine={engine}", *overrides).engine, launch)

    both = args("vllm", "vllm", "engine.tensor_parallel=2", "engine.pipeline_parallel=2")
    assert both[-4:] == ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]
    assert "--enforce-eager" in both  # the launch's defaults stay beside them
    given = args("vllm", "vllm", "engine.tensor_parallel=4", "engine.server_args=[--tensor-parallel-size,8]")
    assert given == []  # server_args win
    assert args("deepspeed", "mii", "engine.tensor_parallel=2") == ["--tensor-parallel", "2"]
    command = _command("mii", 9000, "/ckpt", "/ckpt", sys.executable, ["--tensor-parallel", "2"])
    assert command[1:4] == ["-m", "mii.entrypoints.openai_api_server", "--model"]
    assert command[-6:] == ["--host", "127.0.0.1", "--port", "9000", "--tensor-parallel", "2"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["engine=vllm", "engine.tensor_parallel=2"], "needs 2 GPUs, and this machine has 0"),
        (["engine=vllm", "engine.tensor_parallel=2", "engine.pipeline_parallel=2"], "needs 4 GPUs"),
        (["engine=deepspeed", "engine.tensor_parallel=8"], "needs 8 GPUs"),
        (["model.device_map=auto"], "model.device_map=auto .* needs 2 GPUs"),
    ],
)
def test_a_point_needing_more_gpus_than_the_machine_has_is_refused_with_the_count(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        check_point(compose("model=smollm2", *overrides))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["engine=deepspeed", "engine.pipeline_parallel=2"], "tensor parallelism only"),
        (["engine.tensor_parallel=2"], "engine=transformers with launch=harness has none to split"),
        (["engine=llamacpp", "engine.tensor_parallel=2"], "has none to split|not read by"),
        (["engine=vllm", "engine.tensor_parallel=0"], "engine.tensor_parallel"),
        (["model.device_map=everywhere"], "model.device_map"),
        (["engine=vllm", "model.device_map=auto"], "engine=vllm loads the model its own way"),
    ],
)
def test_impossible_parallel_plans_are_refused(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        check_point(compose("model=smollm2", *overrides))


def test_the_refusal_is_one_paragraph_and_exit_2_before_any_point_runs(tmp_path):
    done = run_harness(tmp_path, "-m", "model=smollm2", "engine=vllm", "engine.tensor_parallel=1,2",
                       env={"HARNESS_VLLM_PYTHON": sys.executable})  # fmt: skip
    assert done.returncode == 2 and "needs 2 GPUs" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("result.json"))
