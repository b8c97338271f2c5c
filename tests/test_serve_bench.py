"""bench=serve and engine=openai against real servers: `harness serve` launched for the point (tiny-qwen2, and
smollm2 where installed), the same server reached by URL, and the failures a user can cause."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from harness.config import load_config
from harness.engines import create_engine, load_for_engine
from harness.engines.base import GenerationParams
from harness.errors import ConfigError, InferenceError
from harness.loadgen.launch import launch
from harness.prompts import TokenPrompt
from runners import run_point
from tests.conftest import needs_smollm2, run_harness
from tests.mock_openai import MockServer, Script

CPUS = sorted(os.sched_getaffinity(0))
FAST_SERVE = [
    "bench=serve",
    "bench.num_requests=6",
    "bench.warmup_runs=1",
    "bench.max_new_tokens=8",
    "bench.prompt_lengths=[32]",
]


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def harness_server(tmp_path_factory):
    """One `harness serve` with tiny-qwen2 for the module; its process group is gone after."""
    server = launch("harness", "tiny-qwen2", tmp_path_factory.mktemp("server"), timeout_s=120)
    yield server
    server.stop()
    assert _gone(server.process.pid)


def test_serve_bench_launches_harness_runs_every_level_and_stops_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_API_TOKEN", "a-server-elsewhere")  # the point's own server must not demand it
    cfg = load_config(
        [
            "model=tiny-qwen2",
            *FAST_SERVE,
            "bench.concurrency=[1,2,4]",
            "bench.rates=[5,10]",
            "bench.slo={ttft_ms:2000,tpot_ms:200}",
            "bench.search=max_rate",
            "bench.search_steps=3",
            "bench.gauge_interval_s=0.05",
            f"engine.cpus=[{CPUS[-1]}]",  # the server and the client on CPUs of their own (on 1 CPU: the same)
            f"bench.client_cpus=[{CPUS[0]}]",
        ]
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    for level in ("concurrency=1", "concurrency=2", "concurrency=4", "rate=5", "rate=10"):
        for name in ("ttft_ms", "itl_ms", "chunk_itl_ms", "tpot_ms", "e2e_ms", "goodput_rps", "output_tok_s"):
            assert f"{name}[{level}]" in m, (name, level)
        assert m[f"short_outputs[{level}]"]["mean"] == 0  # min_tokens/ignore_eos forced every length
        assert m[f"failed[{level}]"]["mean"] == 0
    # bench.rates' 6 requests at 5 req/s could not decide the SLO verdict (29 all within it are needed for 90%): the
    # search grew that level (12, 24, 48 requests) until it was decided, and the longest run is the level's.
    search = result.details["search"]
    assert search["walked"] and search["walked"][0]["rate"] == 5
    levels = result.details["levels"]
    grown = levels["rate=5"]["requests"]
    assert levels["rate=5"]["extended_from"][0] == 6 and levels["rate=5"]["slo_verdict"]["verdict"] != "undecided"
    assert m["ttft_ms[rate=5]"]["n"] == grown and {"p50", "p90", "p95", "p99", "ci95"} <= set(m["ttft_ms[rate=5]"])
    assert levels["rate=5"]["n_out_source"] == {"usage": grown}
    assert levels["rate=5"]["server_metrics_delta"]  # harness serve's /metrics moved
    # ... and its changes are named figures beside the client's: the server's own TTFT of the level's requests
    # cannot exceed the client's (the client's includes the network and the HTTP layers).
    assert 0 < m["server_ttft_ms[rate=5]"]["mean"] <= m["ttft_ms[rate=5]"]["max"]
    assert m["server_e2e_ms[rate=5]"]["mean"] > 0
    # Its gauges, sampled during each level: never more generations open than the level's clients.
    sampled = [k for k in m if k.startswith("server_running[")]
    assert sampled and all(0 <= m[k]["max"] <= 4 for k in sampled) and m["server_running[concurrency=4]"]["max"] >= 1
    assert levels["concurrency=4"]["server_gauges"]["waiting"]
    assert "client_ceiling" in result.details and result.details["client_ceiling"]["chunks_s"] > 0
    server = result.resolved["engine"]["server"]
    assert server["launch"] == "harness" and server["startup_s"] > 0
    assert server["cpus"] == [CPUS[-1]] and result.details["client_cpus"] == [CPUS[0]]
    assert (tmp_path / "server.log").is_file()
    port = server["base_url"].split(":")[2].split("/")[0]
    left = subprocess.run(["pgrep", "-f", "--", f"harness.cli serve .*--port {port}"], capture_output=True)
    assert left.returncode == 1  # no server left behind
    with open(tmp_path / "samples.csv") as fh:
        rows = list(csv.DictReader(fh))
    chunk_rows = [r for r in rows if r["metric"] == "chunk_s" and r["case"] == "rate=5"]
    assert len(chunk_rows) >= 6 * 1 and {r["metric"] for r in rows} >= {"t_sched_s", "t_send_s", "ok", "ttft_ms"}


def test_the_same_bench_reaches_a_running_server_by_url(harness_server, tmp_path):
    cfg = load_config(
        [
            "model=tiny-qwen2",
            *FAST_SERVE,
            "bench.target=url",
            f"bench.base_url={harness_server.base_url}",
            "bench.api=chat",
            "bench.concurrency=[2]",
            "bench.rates=[]",
            "bench.calibrate=false",
            "bench.workload=multi_turn",
            "bench.turns=2",
        ]
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    assert result.metrics["completed[concurrency=2]"]["mean"] == 6
    assert result.details["workload"]["workload"] == "multi_turn"
    assert harness_server.alive()  # a server the point did not launch is left running


def _pair(compose, base_url: str, model: str):
    local_cfg = compose(f"model={model}")
    local_loaded = load_for_engine(local_cfg)
    local = create_engine("transformers", local_loaded, local_cfg)
    remote_cfg = compose(f"model={model}", "engine=openai", f"engine.base_url={base_url}")
    remote_loaded = load_for_engine(remote_cfg)
    remote = create_engine("openai", remote_loaded, remote_cfg)
    return local, local_loaded, remote, remote_loaded


def test_engine_openai_gives_the_in_process_greedy_output(compose, harness_server):
    local, local_loaded, remote, remote_loaded = _pair(compose, harness_server.base_url, "tiny-qwen2")
    try:
        params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
        prompts = [TokenPrompt(tuple(range(40, 72))), "The capital of France is",
                   [{"role": "user", "content": "Say something."}]]  # fmt: skip
        for prompt in prompts:
            mine, theirs = local.generate(prompt, params), remote.generate(prompt, params)
            assert theirs.text == mine.text
            assert theirs.reported_tokens == mine.output_tokens == 12
            assert theirs.finish_reason == "length"
            assert len(theirs.token_ns) == theirs.output_tokens and theirs.token_ns == sorted(theirs.token_ns)
        assert remote_loaded.context_window == local_loaded.context_window
        with pytest.raises(InferenceError, match="batches concurrent requests itself"):
            remote.batch([prompts[0], prompts[0]], params)
        assert remote.describe()["served_model"] == "tiny-qwen2"
    finally:
        local_loaded.release()
        remote_loaded.release()


@needs_smollm2
def test_engine_openai_and_transformers_give_identical_greedy_tokens_on_smollm2(compose, tmp_path):
    server = launch("harness", "smollm2", tmp_path, timeout_s=300)
    try:
        local, local_loaded, remote, remote_loaded = _pair(compose, server.base_url, "smollm2")
        params = GenerationParams(max_new_tokens=16)
        for prompt in ([{"role": "user", "content": "What is a list in Python?"}], "def fibonacci(n):"):
            mine, theirs = local.generate(prompt, params), remote.generate(prompt, params)
            assert theirs.token_ids == mine.token_ids[: len(theirs.token_ids)]
            assert theirs.text == mine.text
        local_loaded.release()
        remote_loaded.release()
    finally:
        server.stop()


def test_engine_openai_runs_the_e2e_workflows_over_http(tmp_path):
    cfg = load_config(["model=tiny-qwen2", "engine=openai", "engine.launch=harness", "bench=e2e", "workflow=chat",
                       "workflow.limit=2", "workflow.max_new_tokens=8"])  # fmt: skip
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 2 and all(c["requests"] for c in cases)
    assert result.resolved["engine"]["name"] == "openai"


def test_a_launched_server_that_fails_to_start_fails_the_point_with_its_log(tmp_path):
    cfg = load_config(["model=tiny-qwen2", "engine=openai", "engine.launch=harness",
                       "engine.server_args=[--no-such-flag]"])  # fmt: skip
    result = run_point(cfg, tmp_path)
    assert result.status == "failed"
    assert "exited with status 2" in result.error["message"] and "--no-such-flag" in result.error["message"]


def test_a_server_that_dies_mid_point_fails_it_with_its_log(tmp_path):
    cfg = load_config(["model=tiny-qwen2", "engine=openai", "engine.launch=harness", "bench.name=faults:kill_server"])
    import sys

    sys.path.insert(0, str(os.path.dirname(__file__)))
    result = run_point(cfg, tmp_path)
    assert result.status == "failed"
    assert "exited (status -9) during the point" in result.error["message"]
    assert "serving on" in result.error["message"]  # the log's tail


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: None, "cannot reach the server"),
        (lambda: MockServer({"m": Script()}, models_status=404), "not an OpenAI-compatible API root"),
        (lambda: MockServer({"m": Script()}, api_key="right"), "the API key is missing or wrong"),
        (lambda: MockServer({"other": Script()}), "does not serve a model named 'm'"),
    ],
)
def test_a_server_that_cannot_be_used_fails_the_point_with_the_cause(tmp_path, monkeypatch, make, says):
    monkeypatch.setenv("SERVE_TEST_KEY", "wrong")
    server = make()
    if server is None:
        url = "http://127.0.0.1:9/v1"
    else:
        server.__enter__()
        url = server.base_url
    try:
        cfg = load_config(["model=tiny-qwen2", *FAST_SERVE, "bench.target=url", f"bench.base_url={url}",
                           "bench.served_model=m", "bench.api_key_env=SERVE_TEST_KEY"])  # fmt: skip
        result = run_point(cfg, tmp_path)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    assert result.status == "failed"
    assert says in result.error["message"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["bench.rates=[0]"], "bench.rates"),
        (["bench.rates=[-2]"], "bench.rates"),
        (["bench.slo.ttft_ms=-1"], "bench.slo.ttft_ms"),
        (["bench.target=url", "bench.base_url=http://x/v1", "bench.api_key_env=NO_SUCH_VAR_HERE"], "NO_SUCH_VAR_HERE"),
        (["bench.target=url"], "bench.base_url is not set"),
        (["bench.search=max_rate"], "bench.slo is empty"),
        (["engine=llamacpp"], "names another"),
    ],
)
def test_bad_serve_config_is_refused_before_anything_runs(compose, overrides, says):
    with pytest.raises(ConfigError) as err:
        compose("model=tiny-qwen2", "bench=serve", *overrides)
    assert says in str(err.value)


def test_bad_serve_input_exits_2_with_one_paragraph(tmp_path):
    done = run_harness(tmp_path, "model=tiny-qwen2", "bench=serve", "+bench.slo.latency_ms=3")
    assert done.returncode == 2
    assert "latency_ms" in done.stderr and "Traceback" not in done.stderr


def test_serve_report_has_a_level_table_and_curves(tmp_path):
    from analysis.__main__ import main as analyze

    cfg = load_config(["model=tiny-qwen2", *FAST_SERVE, "bench.concurrency=[1,2]", "bench.rates=[4]",
                       "bench.calibrate=false", "bench.search=max_rate", "bench.slo.ttft_ms=5000",
                       "bench.search_steps=2"])  # fmt: skip
    point_dir = tmp_path / "point"
    assert run_point(cfg, point_dir).status == "ok"
    assert analyze([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "tiny-qwen2 q=none @ concurrency=2" in summary and "TTFT p99 ms" in summary
    # A percentile beside its order-statistic interval: 6 requests bound a median on both sides, never a p99 above.
    assert re.search(r"\| [\d.]+ \[[\d.]+, [\d.]+\] \|", summary) and re.search(r"\[[\d.]+, –\]", summary)
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert plots >= {"serve_latency_throughput.png", "serve_goodput.png", "serve_pareto.png"}


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_llama_server = pytest.mark.skipif(
    not _has("llama_cpp.server") or not _has("sse_starlette"),
    reason='llama.cpp\'s server is not installed (pip install -e ".[llamacpp-server]")',
)


@needs_smollm2
@needs_llama_server
def test_serve_bench_and_workflows_against_llamacpp_server(tmp_path):
    # Queued, not interrupted: llama-cpp-python's server cuts a running stream short when another request
    # arrives unless told otherwise, which the bench would (rightly) count as short outputs.
    queued = "engine.server_args=[--interrupt_requests,False]"
    # This server ignores min_tokens, so an answer may end early at EOS: fixed prompts (no cache salt), whose
    # answers run the whole 8 tokens, keep short outputs a measure of interruption alone.
    cfg = load_config(["model=smollm2", *FAST_SERVE, "bench.target=llamacpp_server", "bench.concurrency=[2]",
                       "bench.rates=[2]", "bench.num_requests=4", "bench.calibrate=false", queued,
                       "bench.cache_salt=none"])  # fmt: skip
    result = run_point(cfg, tmp_path / "serve")
    assert result.status == "ok", result.error
    for level in ("concurrency=2", "rate=2"):
        assert result.metrics[f"completed[{level}]"]["mean"] == 4
        assert result.metrics[f"short_outputs[{level}]"]["mean"] == 0
        assert result.details["levels"][level]["n_out_source"] == {"tokenizer": 4}  # it streams no usage
    assert result.resolved["engine"]["server"]["launch"] == "llamacpp_server"
    e2e = load_config(["model=smollm2", "engine=openai", "engine.launch=llamacpp_server", "bench=e2e",
                       "workflow=chat", "workflow.limit=1", "workflow.max_new_tokens=16"])  # fmt: skip
    result = run_point(e2e, tmp_path / "e2e")
    assert result.status == "ok", result.error
    assert result.metrics["pass_rate"]["n"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HARNESS_VLLM_PYTHON"), reason="HARNESS_VLLM_PYTHON names no vLLM environment")
def test_vllm_launched_from_its_own_environment(tmp_path):
    cfg = load_config(
        [
            "model=smollm2",
            "engine=vllm",
            "bench=latency",
            "bench.prompt_lengths=[32]",
            "bench.max_new_tokens=16",
            "bench.min_runs=3",
            "bench.max_runs=3",
            "bench.min_seconds=0",
        ]
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    assert result.details["length_mismatches"] == 0  # min_tokens/ignore_eos forced all 16 tokens
    assert result.metrics["tpot_ms[prompt=32]"]["n"] == 3
    assert result.resolved["engine"]["server"]["launch"] == "vllm"
    assert "--enforce-eager" in result.resolved["engine"]["server"]["command"]


@pytest.mark.parametrize("bench", ["memory", "quality"])
def test_benches_that_need_the_model_in_process_are_refused_over_http(compose, bench):
    with pytest.raises(ConfigError, match=f"bench={bench}"):
        compose("model=tiny-qwen2", "engine=openai", f"bench={bench}")


def test_engine_n_ctx_sets_a_launched_vllms_window_and_server_args_win(compose, monkeypatch):
    from harness.loadgen.target import harness_engine_args

    monkeypatch.setenv("HARNESS_VLLM_PYTHON", sys.executable)  # composing engine=vllm asks for its environment

    def args(*overrides: str) -> list[str]:
        return harness_engine_args(compose("model=smollm2", "engine=vllm", *overrides).engine, "vllm")

    assert args() == []  # the launch's own defaults (a 2,048-token window)
    window = args("engine.n_ctx=8192")
    assert window[-2:] == ["--max-model-len", "8192"] and window.count("--max-model-len") == 1
    assert "--enforce-eager" in window  # the other defaults stay
    assert args("engine.n_ctx=8192", "engine.server_args=[--dtype,float32]") == ["--max-model-len", "8192"]
    assert args("engine.n_ctx=8192", "engine.server_args=[--max-model-len,4096]") == []


def test_serve_trials_restart_the_launched_server_and_warm_it_up_again(tmp_path):
    cfg = load_config(["model=tiny-qwen2", "bench=serve", "bench.target=harness", "bench.trials=2",
                       "bench.concurrency=[1]", "bench.rates=[]", "bench.num_requests=2", "bench.max_new_tokens=4",
                       "bench.calibrate=false", "bench.warmup_runs=1"])  # fmt: skip
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    (fresh,) = result.details["trials"]["concurrency=1"]["fresh_state"]
    assert fresh["server"].startswith("restarted in ") and fresh["warmup"] == {"requests": 1, "failed": 0}
    assert all(result.metrics[f"ttft_ms[concurrency=1,trial={t}]"]["n"] == 2 for t in (1, 2))
    launches = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(launches) == 2  # the log is appended to: both starts are in it
