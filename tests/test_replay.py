"""Replaying real traffic against the scripted mock server (tests/mock_openai.py): a trace's schedule kept, its
lengths clipped to the model and counted, a dataset's prompts sent, the cache salt, and the figures a server's
usage gives: cached prompt tokens, reasoning apart from the answer, client and server token counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.config import load_config
from harness.errors import ConfigError
from harness.loadgen.client import Endpoint
from harness.loadgen.datasets import load_dataset
from harness.loadgen.load import run_level
from harness.loadgen.traces import load_trace
from runners import run_point
from runners.benches.workload import Workload, expected_cached_share
from tests.conftest import in_fresh_process, run_harness
from tests.mock_openai import FINISH, ROLE, MockServer, Script

AZURE = Path(__file__).parent / "fixtures" / "traces" / "azure_code_2023_12min.csv"
QUIET = ["bench.warmup_runs=1", "bench.calibrate=false", "bench.scrape_metrics=false"]


def delta(fields: dict, usage: dict | None = None) -> dict:
    event: dict = {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}
    if usage is not None:
        event["usage"] = usage
    return event


def answer(usage: dict, *deltas: dict, gap: float = 0.0) -> Script:
    """A stream of the given deltas, then the finish and a usage-only event."""
    events = [(0.0, ROLE), *((gap, delta(d)) for d in deltas)]
    return Script([*events, (0.0, FINISH), (0.0, {"choices": [], "usage": usage}), (0.0, "[DONE]")])


def usage(prompt: int, completion: int, cached: int | None = None, reasoning: int | None = None) -> dict:
    out: dict = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def serve_point(tmp_path: Path, server: MockServer, *overrides: str, model: str = "tiny-qwen2"):
    cfg = load_config([f"model={model}", "bench=serve", "bench.target=url", f"bench.base_url={server.base_url}",
                       "bench.served_model=m", *QUIET, *overrides])  # fmt: skip
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    return result


def test_a_trace_is_sent_on_its_own_schedule(tmp_path):
    """The first 12 requests of the Azure excerpt (1.4 s, bursts 25 us apart) through the whole point: the
    schedule is the trace's, the client keeps up (its self-check), and the figures are keyed with the replay. (The
    2 ms bound on each send is tested on the load loop alone below: here the model, the engine's loop and the mock
    server share one process.)"""
    with MockServer({"m": answer(usage(5, 1), {"content": "ok"})}) as server:
        result = serve_point(
            tmp_path / "point", server, "bench.workload=trace", f"bench.trace={AZURE}", "bench.trace_requests=12"
        )
    trace = load_trace(AZURE)
    level = result.details["levels"]["replay=1x"]
    assert level["schedule_s"] == pytest.approx([r.t for r in trace.requests[:12]], abs=1e-6)
    assert level["requests"] == 12 and level["client"]["lateness_p99_ms"] is not None
    assert result.details["workload"]["trace"]["format"] == "azure"
    assert "rate=1" not in json.dumps(list(result.metrics))  # bench.rates are not levels of a replay
    # The prompts have the trace's lengths (the server did not say its window, so nothing was clipped) and the
    # outputs are forced to the trace's.
    bodies = server.bodies[1:]  # after the warm-up
    assert [len(b["prompt"]) for b in bodies] == [r.input_tokens for r in trace.requests[:12]]
    assert [b["max_tokens"] for b in bodies] == [r.output_tokens for r in trace.requests[:12]]
    assert all(b["min_tokens"] == b["max_tokens"] for b in bodies)
    # Each answer (1 token from the mock) is short of its own forced length, not of bench.max_new_tokens.
    assert result.metrics["short_outputs[replay=1x]"]["mean"] == 12
    # The report draws the replay over time.
    from analysis.__main__ import main as analyze

    assert analyze([str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "serve_replay.png").is_file()
    summary = (tmp_path / "summary.md").read_text()
    assert "@ replay=1x" in summary and "cache hit rate" not in summary  # the mock reports no cached tokens


def test_replay_series_windows_the_load_and_its_latency():
    from analysis.plots import replay_series

    # Ten requests, one every 0.5 s, each 1 s long; the second half twice as slow to first token.
    requests = [{"t_sched_s": i * 0.5, "t_send_s": i * 0.5, "t_end_s": i * 0.5 + 1.0, "ok": 1.0,
                 "ttft_ms": 100.0 if i < 5 else 200.0, "tpot_ms": 10.0} for i in range(10)]  # fmt: skip
    s = replay_series(requests, windows=11)  # 5.5 s span: 0.5 s windows
    assert s["t_s"][:2] == [0.25, 0.75] and len(s["t_s"]) == 12
    assert s["offered_rps"][:10] == [2.0] * 10 and s["offered_rps"][10:] == [0.0, 0.0]
    assert s["achieved_rps"][:2] == [0.0, 0.0] and s["achieved_rps"][2] == 2.0  # the first ends at 1.0 s
    assert s["ttft_p50_ms"][0] == 100.0 and s["ttft_p90_ms"][9] == 200.0
    assert s["in_flight"][4] == 2  # at 2.25 s: the requests sent at 1.5 s and 2.0 s


def test_a_replay_sped_up_and_clipped_to_the_served_window(tmp_path):
    listing = {"m": {"max_model_len": 1024}}
    with MockServer({"m": answer(usage(5, 1), {"content": "ok"})}, listing=listing) as server:
        result = serve_point(tmp_path, server, "bench.workload=trace", f"bench.trace={AZURE}",
                             "bench.trace_requests=12", "bench.trace_speedup=4")  # fmt: skip
    trace = load_trace(AZURE).requests[:12]
    level = result.details["levels"]["replay=4x"]
    assert level["schedule_s"] == pytest.approx([r.t / 4 for r in trace], abs=1e-6)
    clipped = result.details["workload"]["clipped"]
    over = [r for r in trace if r.input_tokens + r.output_tokens > 1024]
    assert clipped["requests"] == len(over) > 0
    assert clipped["prompt_tokens_removed"] == sum(r.input_tokens + r.output_tokens - 1024 for r in over)
    assert all(len(b["prompt"]) + b["max_tokens"] <= 1024 for b in server.bodies)


def test_cached_tokens_give_a_hit_rate_and_a_level_above_its_own_sharing_is_flagged(tmp_path):
    script = answer(usage(32, 2, cached=24), {"content": "a"}, {"content": " b"})
    with MockServer({"m": script}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=4", "bench.max_new_tokens=2",
                             "bench.prompt_lengths=[32]", "bench.concurrency=[2]", "bench.rates=[]")  # fmt: skip
    cache = result.details["levels"]["concurrency=2"]["prefix_cache"]
    assert result.metrics["prefix_cache_hit_rate[concurrency=2]"]["mean"] == pytest.approx(0.75)
    assert result.metrics["cached_prompt_tokens[concurrency=2]"]["mean"] == 24
    assert cache["expected_max_share"] == 0.0 and "earlier level or point" in cache["flag"]
    assert result.details["flags"]["concurrency=2"]
    # A server that does not say: no hit rate, and the reason.
    with MockServer({"m": answer(usage(32, 2), {"content": "a"}, {"content": " b"})}) as server:
        quiet = serve_point(tmp_path / "quiet", server, "bench.num_requests=2", "bench.concurrency=[1]",
                            "bench.rates=[]")  # fmt: skip
    assert "prefix_cache_hit_rate[concurrency=1]" not in quiet.metrics
    assert "reports no" in quiet.details["levels"]["concurrency=1"]["prefix_cache"]["reason"]


def test_the_cache_salt_makes_each_level_its_own_and_none_repeats_the_prompts(tmp_path):
    with MockServer({"m": answer(usage(5, 1), {"content": "ok"})}) as server:
        serve_point(tmp_path / "a", server, "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]")
        serve_point(tmp_path / "b", server, "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]")
        salted = [b["prompt"] for b in server.bodies]
        server.bodies.clear()
        for run in ("c", "d"):
            serve_point(tmp_path / run, server, "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]",
                        "bench.cache_salt=none")  # fmt: skip
        plain = [b["prompt"] for b in server.bodies]
    # Two runs of the same point: salted, no prompt repeats; unsalted, the second run repeats the first.
    assert len({tuple(p) for p in salted}) == len(salted)
    assert plain[:3] == plain[3:] and all(len(p) == 128 for p in salted + plain)


def test_expected_sharing_follows_the_workload(compose, load):
    loaded = load("tiny-qwen2")
    endpoint = Endpoint("http://127.0.0.1:9/v1", "m", api="completions")

    def plans(*overrides: str):
        bench = compose("model=tiny-qwen2", "bench=serve", *overrides).bench
        return Workload(bench, loaded, endpoint, 0).plans(8, 1)

    assert expected_cached_share(plans(), None) == 0.0
    share = expected_cached_share(plans("bench.workload=shared_prefix", "bench.prefix_tokens=64",
                                        "bench.prompt_lengths=[64]"), None)  # fmt: skip
    assert share == pytest.approx(7 * 64 / (8 * 128))  # every prompt after the first reuses the 64-token prefix


def test_reasoning_is_told_apart_from_the_answer(tmp_path):
    script = answer(usage(5, 5, reasoning=3), {"reasoning_content": "let me"}, {"reasoning_content": " think"},
                    {"content": "Yes."}, gap=0.02)  # fmt: skip
    with MockServer({"m": script}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]",
                             "bench.slo.ttft_answer_ms=20")  # fmt: skip
    m = result.metrics
    assert m["ttft_answer_ms[concurrency=1]"]["mean"] >= m["ttft_ms[concurrency=1]"]["mean"] + 35  # two 20 ms gaps
    assert m["reasoning_tokens[concurrency=1]"]["mean"] == 3 and m["answer_tokens[concurrency=1]"]["mean"] == 2
    assert m["slo_attainment[concurrency=1]"]["mean"] == 0  # the answer came after the 20 ms objective
    assert result.details["levels"]["concurrency=1"]["reasoning"]["source"] == {"usage": 2}


def test_reasoning_without_usage_details_is_counted_by_the_tokenizer(tmp_path):
    script = answer(usage(5, 4), {"reasoning": "hmm hmm"}, {"content": "ok"})  # llama.cpp's field name
    with MockServer({"m": script}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=1", "bench.concurrency=[1]", "bench.rates=[]")
    reasoning = result.details["levels"]["concurrency=1"]["reasoning"]
    assert reasoning["source"] == {"tokenizer": 1} and result.metrics["reasoning_tokens[concurrency=1]"]["mean"] > 0


def test_client_and_server_counts_that_disagree_are_flagged_with_the_likely_cause(tmp_path):
    with MockServer({"m": answer(usage(5, 9), {"content": "one"}, {"content": " two"})}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=3", "bench.concurrency=[1]", "bench.rates=[]")
    accounting = result.details["levels"]["concurrency=1"]["token_accounting"]
    assert accounting["compared"] == 3 and accounting["share"] == 1.0 and accounting["mean_diff"] > 0
    assert "tokenizer" in accounting["flag"]
    assert result.metrics["token_count_mismatch_share[concurrency=1]"]["mean"] == 1.0
    with MockServer({"m": Script([(0.0, delta({"content": "one"})), (0.0, FINISH), (0.0, "[DONE]")])}) as server:
        bare = serve_point(tmp_path / "bare", server, "bench.num_requests=1", "bench.concurrency=[1]",
                           "bench.rates=[]")  # fmt: skip
    assert "reports no usage" in bare.details["levels"]["concurrency=1"]["token_accounting"]["flag"]


def test_a_dataset_is_replayed_as_chat_with_its_lengths(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]},
        {"prompt": "Name a colour.", "output_tokens": 3},
    ]) + "\n")  # fmt: skip
    with MockServer({"m": answer(usage(9, 1), {"content": "ok"})}) as server:
        result = serve_point(tmp_path / "out", server, "bench.workload=dataset", f"bench.dataset={data}",
                             "bench.api=chat", "bench.num_requests=4", "bench.concurrency=[1]", "bench.rates=[]",
                             "bench.dataset_output=forced")  # fmt: skip
    bodies = server.bodies[1:]
    asked = sorted(b["messages"][0]["content"].split("] ", 1)[1] for b in bodies)
    assert asked == ["Name a colour.", "Name a colour.", "What is 2+2?", "What is 2+2?"]
    assert all(b["messages"][0]["content"].startswith("[") for b in bodies)  # the level's salt leads
    lengths = {b["messages"][0]["content"].split("] ", 1)[1]: b["max_tokens"] for b in bodies}
    assert lengths["Name a colour."] == 3 and lengths["What is 2+2?"] >= 1
    assert all(b["min_tokens"] == b["max_tokens"] for b in bodies)
    assert result.details["workload"]["dataset"]["entries"] == 2


def test_natural_dataset_outputs_are_not_forced(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "Hi"}\n')
    with MockServer({"m": answer(usage(9, 1), {"content": "ok"})}) as server:
        result = serve_point(
            tmp_path / "out",
            server,
            "bench.workload=dataset",
            f"bench.dataset={data}",
            "bench.api=chat",
            "bench.num_requests=1",
            "bench.concurrency=[1]",
            "bench.rates=[]",
            "bench.cache_salt=none",
        )
    assert result.metrics["short_outputs[concurrency=1]"]["mean"] == 0  # a natural length is never short
    body = server.bodies[-1]
    assert "min_tokens" not in body and body["max_tokens"] == 32 and body["messages"][0]["content"] == "Hi"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["bench.workload=trace"], "bench.trace is not set"),
        (["bench.trace=/x.csv"], "would be ignored"),
        (["bench.workload=dataset"], "bench.dataset is not set"),
        (["bench.workload=trace", "bench.trace=/x.csv", "bench.trace_speedup=0"], "bench.trace_speedup"),
        (["bench.workload=trace", "bench.trace=/x.csv", "bench.search=max_rate", "bench.slo.ttft_ms=9"], "speedup"),
        (["bench.cache_salt=off"], "bench.cache_salt"),
        (["bench.dataset_output=long"], "bench.dataset_output"),
    ],
)
def test_bad_replay_options_are_refused(compose, overrides, says):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        compose("model=tiny-qwen2", "bench=serve", *overrides)


def test_a_bad_trace_exits_2_before_any_server_starts(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05.0,10,1\n2023-11-16 18:17:04.0,10,1\n")
    done = run_harness(tmp_path, "model=tiny-qwen2", "bench=serve", "bench.workload=trace", f"bench.trace={bad}")
    assert done.returncode == 2, done.stderr
    assert str(bad) in done.stderr and "row 3" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("server.log"))  # no server was launched


def test_a_schedule_is_kept_by_the_client_when_the_server_is_instant():
    in_fresh_process("tests.test_replay:check_schedule_is_kept")


def check_schedule_is_kept():
    """Sends at the trace's times, straight through run_level, to an instant server in a process of its own: the
    trace's first 12 requests (1.4 s, pairs 25 us apart) and its first 30 at 2x speed across a 14 s lull, every send
    within 2 ms of its time. The client keeps that on an idle machine (0.3-1.6 ms at worst over runs of this
    check); a machine busy with other work can take the CPU from it for milliseconds, which no client can undo, so
    the pair of levels is measured up to three times and must keep the schedule whole once."""
    import os
    import signal
    import subprocess

    from harness.loadgen.load import Planned

    trace = load_trace(AZURE)
    runs = {"start": [r.t for r in trace.window(0.0, None, 12)], "lull": [r.t / 2 for r in trace.window(0.0, None, 30)]}
    server = subprocess.Popen([sys.executable, str(Path(__file__).parent / "instant_server.py")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    attempts: list[dict[str, float]] = []
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        endpoint = Endpoint(f"http://127.0.0.1:{port}/v1", "m", api="completions")
        plan = Planned("/completions", {"model": "m", "prompt": [1, 2], "stream": True, "max_tokens": 1}, 1)
        while len(attempts) < 3 and not (attempts and max(attempts[-1].values()) < 2.0):
            worst: dict[str, float] = {}
            for name, offsets in runs.items():
                level = run_level(endpoint, [plan] * len(offsets), "open", 1.0, offsets, key=name)
                assert all(r.ok for r in level.records) and len(level.records) == len(offsets)
                worst[name] = max((r.t_send - r.t_sched) * 1e3 for r in level.records)
            attempts.append(worst)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    assert max(attempts[-1].values()) < 2.0, f"the latest send (ms) in each attempt: {attempts}"


def test_server_counters_become_named_figures_and_missing_ones_stay_absent():
    from harness.loadgen.server_metrics import server_figures

    before = {
        "vllm:request_queue_time_seconds_sum{model_name=m}": 1.0,
        "vllm:request_queue_time_seconds_count{model_name=m}": 10.0,
        "vllm:num_preemptions_total{model_name=m}": 2.0,
        "vllm:prefix_cache_hits_total{model_name=m}": 100.0,
        "vllm:prefix_cache_queries_total{model_name=m}": 400.0,
        "vllm:request_prefill_time_seconds_sum{model_name=m}": 5.0,
        "vllm:request_prefill_time_seconds_count{model_name=m}": 10.0,
    }
    after = {
        "vllm:request_queue_time_seconds_sum{model_name=m}": 1.6,
        "vllm:request_queue_time_seconds_count{model_name=m}": 14.0,
        "vllm:num_preemptions_total{model_name=m}": 5.0,
        "vllm:prefix_cache_hits_total{model_name=m}": 400.0,
        "vllm:prefix_cache_queries_total{model_name=m}": 1400.0,
        "vllm:request_prefill_time_seconds_sum{model_name=m}": 5.0,
        "vllm:request_prefill_time_seconds_count{model_name=m}": 10.0,  # no request finished its prefill
    }
    figures = server_figures(before, after)
    assert figures["queue_ms"] == (pytest.approx(150.0), "ms")  # 0.6 s over 4 requests
    assert figures["preemptions"] == (3.0, "count")
    assert figures["prefix_cache_hit_rate"] == (pytest.approx(0.3), "fraction")
    assert "prefill_ms" not in figures and "decode_ms" not in figures  # no event, or no series: absent, not zero
    assert server_figures(None, after) == {} and server_figures(before, {"other_metric": 1.0}) == {}


def test_real_replies_carry_the_servers_answers_on_one_connection_after_a_think_time(tmp_path):
    script = answer(usage(9, 2), {"reasoning_content": "hm"}, {"content": "Answer"}, {"content": " two"})
    with MockServer({"m": script}) as server:
        result = serve_point(tmp_path, server, "bench.workload=multi_turn", "bench.replies=real", "bench.turns=3",
                             "bench.think_time_s=0.05", "bench.api=chat", "bench.num_requests=6",
                             "bench.concurrency=[2]", "bench.rates=[]", "bench.warmup_runs=0")  # fmt: skip
    bodies = server.bodies
    assert len(bodies) == 6 and result.metrics["completed[concurrency=2]"]["mean"] == 6
    third = [b for b in bodies if len(b["messages"]) == 5]
    assert len(third) == 2  # two sessions reached their third turn
    # The server's real answer (without its reasoning) is in the conversation, not a canned reply.
    assert [m["content"] for m in third[0]["messages"] if m["role"] == "assistant"] == ["Answer two"] * 2
    # One connection per session: 2 sessions, 2 connections for their 6 requests.
    completions = [port for (_, path, _), port in zip(server.requests, server.client_ports, strict=True)
                   if path.endswith("/chat/completions")]  # fmt: skip
    assert len(completions) == 6 and len(set(completions)) == 2
    # Each later turn waits for its answer and the think time: its schedule is after the previous turn's end.
    level = result.details["levels"]["concurrency=2"]
    assert level["requests"] == 6 and level["client"]["lateness_p99_ms"] < 50


def test_real_replies_options_are_checked(compose):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="would be ignored"):
        compose("model=tiny-qwen2", "bench=serve", "bench.replies=real")
    with pytest.raises(ConfigError, match="bench.replies=real"):
        compose("model=tiny-qwen2", "bench=serve", "bench.workload=multi_turn", "bench.think_time_s=1")
    with pytest.raises(ConfigError, match="client_workers=1"):
        compose("model=tiny-qwen2", "bench=serve", "bench.workload=multi_turn", "bench.replies=real",
                "bench.client_workers=2")  # fmt: skip


def vllm_page(streaming: int) -> str:
    """vLLM's gauges as its /metrics shows them (two engines' series, one a longer name that must not count)."""
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {streaming}.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 0.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 7.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0\n'
    )


def test_a_known_servers_gauges_are_sampled_while_a_level_runs(tmp_path):
    """Read once after a level, running requests would be 0; sampled during it, they are what the server had open:
    2 clients holding 0.6 s streams keep the server at 2 (the mock counts its open streams)."""
    with MockServer({"m": answer(usage(5, 2), {"content": "a"}, {"content": "b"}, gap=0.3)}) as server:
        server.metrics = vllm_page
        result = serve_point(tmp_path, server, "bench.scrape_metrics=true", "bench.gauge_interval_s=0.05",
                             "bench.num_requests=4", "bench.concurrency=[2]", "bench.rates=[]")  # fmt: skip
    m = result.metrics
    running = m["server_running[concurrency=2]"]
    assert running["unit"] == "requests" and running["max"] == 2 and running["n"] >= 10
    assert running["p50"] == 2  # most samples fall while both streams are open
    assert m["server_waiting[concurrency=2]"]["mean"] == 1  # not 8: the longer name is another series
    assert m["server_kv_cache_usage[concurrency=2]"]["mean"] == 0.25
    series = result.details["levels"]["concurrency=2"]["server_gauges"]
    assert len(series["t_s"]) == running["n"] == len(series["running"]) and series["t_s"] == sorted(series["t_s"])
    assert series["t_s"][0] >= 0 and series["t_s"][-1] < 5  # seconds from the level's start, inside it


def test_gauges_are_absent_where_the_server_is_unknown_or_sampling_is_off(tmp_path):
    with MockServer({"m": answer(usage(5, 1), {"content": "a"})}) as server:
        server.metrics = lambda streaming: f"other_server_running {streaming}\n"
        unknown = serve_point(tmp_path / "a", server, "bench.scrape_metrics=true", "bench.gauge_interval_s=0.05",
                              "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]")  # fmt: skip
        server.metrics = vllm_page
        off = serve_point(tmp_path / "b", server, "bench.scrape_metrics=true", "bench.gauge_interval_s=0",
                          "bench.num_requests=2", "bench.concurrency=[1]", "bench.rates=[]")  # fmt: skip
    for result in (unknown, off):
        assert not any(k.startswith("server_running") for k in result.metrics)
        assert "server_gauges" not in result.details["levels"]["concurrency=1"]


def test_read_gauges_sums_labels_and_skips_longer_names_and_bad_lines():
    from harness.loadgen.server_metrics import read_gauges

    page = vllm_page(3) + 'vllm:num_requests_running{model_name="a} b"} 4\nvllm:kv_cache_usage_perc nan?\n'
    found = read_gauges(page, ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))
    assert found == {"vllm:num_requests_running": 7.0, "vllm:num_requests_waiting": 1.0,
                     "vllm:kv_cache_usage_perc": 0.25}  # fmt: skip


def test_a_server_with_a_salt_field_gets_the_salt_there_and_its_prompts_stay_the_same(compose, load):
    """vLLM isolates its prefix cache by a request's cache_salt: the salt goes there, so the prompts are the
    workload's own (no salt in their text); elsewhere the prompts carry it."""
    loaded = load("tiny-qwen2")
    bench = compose("model=tiny-qwen2", "bench=serve", "bench.workload=search_qa").bench
    field = Workload(bench, loaded, Endpoint("http://127.0.0.1:9/v1", "m", salt_field=True), 0)
    text = Workload(bench, loaded, Endpoint("http://127.0.0.1:9/v1", "m"), 0)
    first, second = field.plans(2, 1), field.plans(2, 2)
    assert first[0].body["cache_salt"] != second[0].body["cache_salt"]  # each level its own
    plain = compose("model=tiny-qwen2", "bench=serve", "bench.workload=search_qa", "bench.cache_salt=none").bench
    unsalted = Workload(plain, loaded, Endpoint("http://127.0.0.1:9/v1", "m"), 0).plans(2, 1)
    assert first[0].body["messages"] == unsalted[0].body["messages"]  # the prompt is the workload's own
    salted = text.plans(2, 1)[0].body
    assert "cache_salt" not in salted and salted["messages"][0]["content"].startswith("[")
    assert field.describe()["cache_salt_in"] == "the request's cache_salt field"
    assert text.describe()["cache_salt_in"] == "the prompt"


def test_an_undecided_search_level_grows_until_its_verdict_is_decided(tmp_path):
    """8 requests all within the objective cannot claim 90% at 95% confidence (0.9^8 = 43%): the level is rerun
    with twice as many until 32 (0.9^32 = 3.4%), where it is decided; a level that clearly misses is decided at
    once."""
    with MockServer({"m": answer(usage(5, 1), {"content": "ok"})}) as server:
        search = ["bench.search=max_rate", "bench.rates=[20]", "bench.search_level_s=0.1", "bench.search_steps=2",
                  "bench.concurrency=[1]", "bench.num_requests=2", "bench.search_max_requests=40"]  # fmt: skip
        held = serve_point(tmp_path / "held", server, *search, "bench.slo.ttft_ms=5000")
        missed = serve_point(tmp_path / "missed", server, *search, "bench.slo.ttft_ms=0.01")
    walked = held.details["search"]["walked"]
    assert [(w["rate"], w["requests"], w["verdict"]) for w in walked] == [(20, 32, "met"), (40, 32, "met")]
    level = held.details["levels"]["rate=20"]
    # bench.rates' own level (2 requests) was the search's first look at 20 req/s; rate=40 started at 8.
    assert level["extended_from"] == [2, 4, 8, 16] and level["slo_verdict"]["needed"] == 29
    assert held.details["levels"]["rate=40"]["extended_from"] == [8, 16]
    assert held.metrics["ttft_ms[rate=20]"]["n"] == 32 and held.details["search"]["decided"]
    with open(tmp_path / "held" / "samples.csv") as fh:  # the shorter runs' samples gave way to the longer one's
        assert sum(1 for line in fh if ",rate=20," in line and ",t_sched_s," in line) == 32
    walked = missed.details["search"]["walked"]
    assert [(w["rate"], w["requests"], w["verdict"]) for w in walked] == [(20, 2, "missed"), (10, 8, "missed")]
    assert missed.details["search"]["max_rate_rps"] is None and missed.details["search"]["decided"]


STOP = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


def finished(text: str) -> Script:
    """An answer the model ended itself."""
    return Script([(0.0, ROLE), (0.0, delta({"content": text})), (0.0, STOP),
                   (0.0, {"choices": [], "usage": usage(5, 4)}), (0.0, "[DONE]")])  # fmt: skip


def test_a_graded_dataset_level_reports_pass_rates_and_correct_goodput(tmp_path):
    data = tmp_path / "asks.jsonl"
    data.write_text(
        json.dumps({"prompt": "Capital of France?", "expected_keywords": ["Paris"]}) + "\n"
        + json.dumps({"prompt": "Capital of Germany?", "expected_keywords": ["Berlin|Bonn", "capital"],
                      "min_keywords": 1}) + "\n"
        + json.dumps({"prompt": "Say hi."}) + "\n"  # no expectation: sent, not graded
    )  # fmt: skip
    with MockServer({"m": finished("The capital is Paris.")}) as server:
        result = serve_point(tmp_path / "p", server, "bench.workload=dataset", f"bench.dataset={data}",
                             "bench.num_requests=6", "bench.concurrency=[2]", "bench.rates=[]",
                             "bench.slo.ttft_ms=5000")  # fmt: skip
    m, level = result.metrics, result.details["levels"]["concurrency=2"]
    # France's answer names Paris; Germany's names "capital", which is enough with min_keywords=1: both pass.
    assert m["pass_rate[concurrency=2]"]["n"] == 4 and m["pass_rate[concurrency=2]"]["mean"] == 1.0
    assert level["grading"] == {"graded": 4, "passed": 4, "failed_checks": {}, "examples": {}}
    # Correct goodput counts the 4 graded answers that passed; goodput all 6 requests within the SLO.
    correct, good = m["correct_goodput_rps[concurrency=2]"]["mean"], m["goodput_rps[concurrency=2]"]["mean"]
    assert correct == pytest.approx(good * 4 / 6)
    with open(tmp_path / "p" / "samples.csv") as fh:
        assert sum(1 for line in fh if ",passed," in line) == 4


def test_search_qa_under_load_judges_content_and_format_apart(tmp_path):
    """One canned answer for every question: finished and citing [1], so its form is right, but it names none of
    the cases' expected terms: format passes, content fails, and so the case."""
    with MockServer({"m": finished("This is covered by the first source [1].")}) as server:
        result = serve_point(tmp_path, server, "bench.workload=search_qa", "bench.api=chat", "bench.num_requests=4",
                             "bench.concurrency=[1]", "bench.rates=[]", "bench.slo.ttft_ms=5000",
                             "bench.search=max_rate", "bench.search_target=correct_goodput",
                             "bench.search_steps=2", "bench.search_level_s=0.1")  # fmt: skip
    m = result.metrics
    assert m["format_pass_rate[concurrency=1]"]["mean"] == 1.0 and m["content_pass_rate[concurrency=1]"]["mean"] == 0
    assert m["pass_rate[concurrency=1]"]["mean"] == 0 and m["correct_goodput_rps[concurrency=1]"]["mean"] == 0
    assert result.details["levels"]["concurrency=1"]["grading"]["failed_checks"] == {"keywords": 4}
    assert all("min_tokens" not in b for b in server.bodies)  # graded answers end where the model ends them
    # Every level met its SLO, and none answered right: against correct goodput the search finds no rate.
    walked = result.details["search"]["walked"]
    assert [w["verdict"] for w in walked] == ["missed", "missed"] and result.details["search"]["max_rate_rps"] is None


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["bench.grade=on"], "has none"),
        (["bench.search_target=correct_goodput", "bench.search=max_rate", "bench.slo.ttft_ms=9"], "grades none"),
        (["bench.grade=sometimes"], "bench.grade"),
    ],
)
def test_grading_a_workload_without_expectations_is_refused(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        compose("model=tiny-qwen2", "bench=serve", *overrides)


def test_a_dataset_without_expectations_cannot_be_graded_and_bad_ones_name_the_line(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hi"}) + "\n")
    done = run_harness(tmp_path, "model=tiny-qwen2", "bench=serve", "bench.workload=dataset", f"bench.dataset={plain}",
                       "bench.grade=on")  # fmt: skip
    assert done.returncode == 2 and "expected_keywords" in done.stderr and "Traceback" not in done.stderr
    for bad, says in (({"prompt": "x", "expected_keywords": "Paris"}, "list of non-empty strings"),
                      ({"prompt": "x", "expected_keywords": ["a"], "min_keywords": 2}, "min_keywords=2")):  # fmt: skip
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match=f"line 2: .*{says}"):
            load_dataset(path)


def test_trials_repeat_a_level_with_fresh_salts_and_report_the_spread_between_them(tmp_path):
    with MockServer({"m": answer(usage(5, 2), {"content": "a"}, {"content": "b"}, gap=0.01)}) as server:
        result = serve_point(tmp_path, server, "bench.trials=3", "bench.num_requests=3", "bench.concurrency=[1]",
                             "bench.rates=[]")  # fmt: skip
        prompts = [tuple(b["prompt"]) for b in server.bodies[1:]]  # after the warm-up
    m = result.metrics
    keys = [f"concurrency=1,trial={t}" for t in (1, 2, 3)]
    assert all(m[f"ttft_ms[{k}]"]["n"] == 3 for k in keys)
    spread = m["ttft_ms_p50_by_trial[concurrency=1]"]
    assert spread["n"] == 3 and spread["mean"] == pytest.approx(sum(m[f"ttft_ms[{k}]"]["p50"] for k in keys) / 3)
    assert "output_tok_s_by_trial[concurrency=1]" in m
    trials = result.details["trials"]["concurrency=1"]
    assert trials["levels"] == keys and len(trials["figures"]["ttft_ms_p50_by_trial"]["within_trial_ci95"]) == 3
    assert len(set(prompts)) == 9  # a fresh cache salt for every trial: no prompt repeats


def test_zero_trials_are_refused(compose):
    with pytest.raises(ConfigError, match="bench.trials"):
        compose("model=tiny-qwen2", "bench=serve", "bench.trials=0")


def test_graded_levels_ask_the_same_cases_so_pass_rates_compare_across_load(compose, load):
    loaded = load("tiny-qwen2")
    endpoint = Endpoint("http://127.0.0.1:9/v1", "m")
    graded = Workload(compose("model=tiny-qwen2", "bench=serve", "bench.workload=search_qa").bench, loaded, endpoint, 0)
    first, second = graded.plans(5, 1), graded.plans(5, 2)
    assert [p.case for p in first] == [p.case for p in second] == [0, 1, 2, 3, 4]
    assert first[0].body["messages"] != second[0].body["messages"]  # each level's salt: no cache carries over
    ungraded = compose("model=tiny-qwen2", "bench=serve", "bench.workload=search_qa", "bench.grade=off").bench
    plain = Workload(ungraded, loaded, endpoint, 0)
    assert all(p.case is None and p.forced for p in plain.plans(3, 1))  # speed only: forced lengths, no grade


def test_lesson_pack_under_load_is_graded_by_the_lesson_checks(tmp_path):
    with MockServer({"m": finished("Lists hold items in order; append adds one.")}) as server:
        result = serve_point(tmp_path, server, "bench.workload=lesson_pack", "bench.api=chat", "bench.num_requests=3",
                             "bench.concurrency=[1]", "bench.rates=[]")  # fmt: skip
    grading = result.details["levels"]["concurrency=1"]["grading"]
    assert grading["graded"] == 3 and grading["passed"] == 0
    assert {"sections", "exercises", "length"} <= set(grading["failed_checks"])  # one sentence is no lesson
    m = result.metrics
    # The first case (python-lists) names its topic words: content passes, the lesson's form does not.
    assert m["format_pass_rate[concurrency=1]"]["mean"] == 0 and m["content_pass_rate[concurrency=1]"]["mean"] > 0
    assert "Python lists" in server.bodies[1]["messages"][-1]["content"]


def parrot(body: dict) -> Script:
    """Repeats every user message of the conversation: it recalls whatever the conversation said."""
    return finished("You said: " + " / ".join(m["content"] for m in body["messages"] if m["role"] == "user"))


def goldfish(body: dict) -> Script:
    """Repeats only the newest user message: it recalls nothing said before."""
    return finished("You said: " + body["messages"][-1]["content"])


def test_chat_under_load_runs_whole_conversations_with_real_replies_and_grades_each_turn(tmp_path):
    cases = json.loads((Path("harness/workflows/data/chat_cases.json")).read_text())["cases"]
    turns = [len(c["turns"]) for c in cases[:3]]
    recalls = sum(1 for c in cases[:3] for t in c["turns"] if t.get("expect"))
    args = ("bench.workload=chat", "bench.api=chat", f"bench.num_requests={sum(turns[:2]) + 1}",
            "bench.concurrency=[2]", "bench.rates=[]", "bench.warmup_runs=1")  # fmt: skip
    with MockServer({"m": parrot}) as server:
        good = serve_point(tmp_path / "parrot", server, *args)
        bodies = server.bodies[1:]  # after the warm-up
    with MockServer({"m": goldfish}) as server:
        bad = serve_point(tmp_path / "goldfish", server, *args)
    key = "concurrency=2"
    # Whole conversations: a level wanting one turn more than two conversations hold runs a third one whole.
    assert good.metrics[f"pass_rate[{key}]"]["n"] == sum(turns) == len(bodies)
    assert good.metrics[f"pass_rate[{key}]"]["mean"] == 1.0
    whole = good.metrics[f"conversation_pass_rate[{key}]"]
    assert (whole["n"], whole["mean"]) == (3, 1.0)
    # Content is judged on the turns that must recall something, format on every turn.
    assert good.metrics[f"content_pass_rate[{key}]"]["n"] == recalls
    assert bad.metrics[f"format_pass_rate[{key}]"]["mean"] == 1.0
    assert bad.metrics[f"content_pass_rate[{key}]"]["mean"] == 0.0
    assert bad.details["levels"][key]["grading"]["failed_checks"] == {"recall": recalls}
    assert bad.metrics[f"conversation_pass_rate[{key}]"]["mean"] < 1.0
    # Every turn carries the system prompt (with the level's salt) and the server's real earlier answers.
    later = [b["messages"] for b in bodies if len(b["messages"]) > 2]
    assert later and all(m[0]["role"] == "system" and m[0]["content"].startswith("[") for m in later)
    assert all(m[2]["role"] == "assistant" and m[2]["content"].startswith("You said: ") for m in later)


def test_chat_under_load_refuses_canned_client_processes(compose):
    with pytest.raises(ConfigError, match="real replies"):
        compose("model=tiny-qwen2", "bench=serve", "bench.workload=chat", "bench.client_workers=2")
