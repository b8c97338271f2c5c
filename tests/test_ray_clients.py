"""bench.client_hosts: a level's load from Ray actors (a local Ray instance here), each on its share of one
absolute schedule from one start time, its clock measured against the driver's and its records brought back onto
the driver's clock; the figures agree with the single-process client's on the same server and load."""

from __future__ import annotations

import json

import pytest

from harness.loadgen.load import Planned, arrival_offsets, run_level
from harness.loadgen.null_server import running_null_server

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def null_server(tmp_path_factory):
    with running_null_server(tmp_path_factory.mktemp("null") / "null-server.log") as endpoint:
        yield endpoint


def test_two_ray_actors_send_one_schedule_on_the_drivers_clock_and_agree_with_one_process(null_server):
    body = {"model": "null", "prompt": "x", "max_tokens": 16, "stream": True}
    plans = [Planned("/completions", body, 16)] * 60
    offsets = arrival_offsets(len(plans), 30.0, "poisson", seed=3)
    one = run_level(null_server, plans, "open", 30.0, offsets)
    two = run_level(null_server, plans, "open", 30.0, offsets, hosts=2)
    for level in (one, two):
        assert [r.index for r in level.records] == list(range(60)) and all(r.ok for r in level.records)
        # Each request went at its own place in the one schedule, on the driver's clock.
        assert all(abs(r.t_sched - level.t0 - o) < 1e-6 for r, o in zip(level.records, offsets, strict=True))
        assert all(r.t_send >= r.t_sched - 1e-3 and r.t_end > r.t_send for r in level.records)
    actors = two.actors["actors"]
    assert [a["requests"] for a in actors] == [30, 30] and two.actors["behind"] == []
    # One host: every actor's perf_counter reads the same monotonic clock, so the offsets are zero within the
    # uncertainty the measurement gives itself.
    assert all(abs(a["clock_offset_ms"]) <= a["clock_uncertainty_ms"] + 0.5 for a in actors)
    late = sorted((r.t_send - r.t_sched) * 1e3 for r in two.records)
    assert late[int(0.99 * len(late))] < 10.0
    span = [max(r.t_end for r in lv.records) - lv.t0 for lv in (one, two)]
    assert span[1] == pytest.approx(span[0], rel=0.15)  # the same schedule served: the same span within noise


def test_serve_with_two_ray_client_actors_against_harness_serve_agrees_with_one_client(tmp_path):
    from harness.config import load_config
    from runners import run_point

    def point(folder: str, *extra: str):
        cfg = load_config(["model=tiny-qwen2", "bench=serve", "bench.target=harness", "bench.concurrency=[2]",
                           "bench.rates=[]", "bench.num_requests=8", "bench.max_new_tokens=8",
                           "bench.calibrate=false", *extra])  # fmt: skip
        result = run_point(cfg, tmp_path / folder)
        assert result.status == "ok", result.error
        return result

    one, two = point("one"), point("two", "bench.client_hosts=2")
    client = two.details["levels"]["concurrency=2"]["client"]
    assert len(client["actors"]) == 2 and sum(a["requests"] for a in client["actors"]) == 8
    assert two.metrics["ttft_ms[concurrency=2]"]["n"] == one.metrics["ttft_ms[concurrency=2]"]["n"] == 8
    ratio = two.metrics["tpot_ms[concurrency=2]"]["p50"] / one.metrics["tpot_ms[concurrency=2]"]["p50"]
    assert 0.5 < ratio < 2.0, ratio  # the same server and load: per-token pace within this VM's noise
    with open(tmp_path / "two" / "samples.csv") as fh:
        assert sum(1 for line in fh if ",t_sched_s," in line) == 8
    assert json.loads((tmp_path / "two" / "result.json").read_text())["config"]["bench"]["client_hosts"] == 2


def test_client_hosts_are_refused_with_real_replies_with_client_workers_and_an_unused_address(compose):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="real replies"):
        compose("model=tiny-qwen2", "bench=serve", "bench.workload=chat", "bench.client_hosts=2")
    with pytest.raises(ConfigError, match="the actors are the workers"):
        compose("model=tiny-qwen2", "bench=serve", "bench.client_hosts=2", "bench.client_workers=2")
    with pytest.raises(ConfigError, match="bench.ray_address"):
        compose("model=tiny-qwen2", "bench=serve", "bench.ray_address=ray://head:10001")


def test_an_actor_lost_mid_level_fails_the_level_with_the_cause_and_stops_ray(null_server, monkeypatch):
    import ray

    from harness.errors import InferenceError

    real_get, lists = ray.get, []

    def get(refs, *args, **kwargs):  # the level's outcomes (the second list fetched) never come: an actor died
        if isinstance(refs, list):
            lists.append(refs)
            if len(lists) == 2:
                raise ray.exceptions.RayActorError()
        return real_get(refs, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get)
    body = {"model": "null", "prompt": "x", "max_tokens": 4, "stream": True}
    with pytest.raises(InferenceError, match="a client actor of this level died"):
        run_level(null_server, [Planned("/completions", body, 4)] * 4, "closed", 2, hosts=2)
    assert not ray.is_initialized()  # the local instance started for the level is gone
