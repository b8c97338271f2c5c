"""engine=transformers' faster paths: a static cache, compiled decoding, continuous batching. Each must give the
same greedy tokens as the default path, be recorded, and refuse or fall back clearly where it cannot run."""

import threading
import time

import pytest

from conftest import TOKEN, Http, needs_smollm2, serving
from harness.engines import create_engine
from harness.engines.base import GenerationParams, streamed
from harness.errors import ConfigError, InferenceError
from harness.prompts import TokenPrompt

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three prime numbers.",
    "Explain gravity in one sentence.",
    "Say hello in Spanish.",
    "What is 2+2?",
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]
GREEDY = GenerationParams(max_new_tokens=24)


def engine_for(compose, loaded, *overrides):
    cfg = compose(f"model={loaded.name}", *overrides)
    return create_engine("transformers", loaded, cfg)


def reference(compose, loaded, prompts, params=GREEDY):
    plain = engine_for(compose, loaded)
    return [plain.generate(p, params).token_ids for p in prompts]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("engine.compile=true",), "needs engine.cache=static"),
        (("engine.batching=continuous", "engine.cache=static"), "paged KV cache"),
        (("engine=llamacpp", "engine.batching=continuous"), "applies to engine=transformers"),
        (("engine.cache=paged",), "engine.cache"),
        (("engine.batching=dynamic",), "engine.batching"),
        (("engine.compile_mode=fastest",), "engine.compile_mode"),
        (("engine.kv_cache_tokens=10",), ">= 256"),
        (("engine.batch_sampling=true",), "add engine.batching=continuous"),
    ],
)
def test_bad_engine_options_are_refused_with_the_fix(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("model=tiny-llama", *overrides)


# -- continuous batching ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched(compose, load):
    engine = engine_for(compose, load("tiny-llama"), "engine.batching=continuous")
    yield engine
    engine.shutdown()


def test_continuous_batching_gives_the_one_at_a_time_greedy_tokens(compose, load, batched):
    loaded = load("tiny-llama")
    want = reference(compose, loaded, CHATS)
    assert len({tuple(w) for w in want}) > 1  # prompts whose answers differ: a mix-up would show
    assert [g.token_ids for g in batched.batch(CHATS, GREEDY)] == want
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = streamed(batched, CHATS[i], GREEDY).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CHATS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(CHATS))] == want
    described = batched.describe()
    assert described["batching"] == "continuous" and batched.concurrent
    assert (
        described["continuous"]["max_batch_requests"] == 16
        and "EOS ignored" in described["continuous"]["forced_length"]
    )


def test_continuous_streams_time_tokens_force_lengths_and_stop(batched):
    prompt = TokenPrompt(tuple(range(5, 40)))
    forced = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    stream = batched.stream(prompt, forced)
    events = list(stream)
    g = stream.generation
    assert len(events) == 12 and g.output_tokens == 12 and g.finish_reason == "length"
    times = [e.t_ns for e in events]
    assert stream.start_ns < times[0] and times == sorted(times) and g.end_ns == times[-1]
    # Closing a stream cancels the request in the batch; the engine goes on serving.
    stream = batched.stream(prompt, GenerationParams(max_new_tokens=64, min_new_tokens=64))
    for i, _ in enumerate(stream):
        if i == 2:
            stream.close()
    assert len(stream.generation.token_ids) == 3
    # A stop string ends the request where it appears, as on the one-at-a-time path.
    full = streamed(batched, prompt, GenerationParams(max_new_tokens=16)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full  # some text to stop on
    cut = streamed(batched, prompt, GenerationParams(max_new_tokens=16, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text and len(cut.token_ids) < 16


def test_continuous_refuses_what_the_manager_cannot_do(batched):
    prompt = TokenPrompt((5, 6, 7))
    for params, why in [
        (GenerationParams(temperature=0.7), "engine.batch_sampling=true"),
        (GenerationParams(repetition_penalty=1.2), "repetition_penalty"),
        (GenerationParams(max_new_tokens=8, min_new_tokens=4), "min_new_tokens"),
    ]:
        with pytest.raises(InferenceError, match=why):
            batched.stream(prompt, params)
        with pytest.raises(InferenceError, match="engine.batching=none"):
            batched.generate(prompt, params)


def test_one_manager_per_model_and_a_sampling_one_keeps_greedy_tokens(compose, load, batched):
    from harness.models import load_model

    with pytest.raises(ConfigError, match="already has a running continuous-batching manager"):
        engine_for(compose, load("tiny-llama"), "engine.batching=continuous")  # `batched` runs on it
    cfg = compose("model=tiny-llama")
    loaded = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)  # a model of its own
    want = reference(compose, loaded, CHATS[:3])
    engine = engine_for(compose, loaded, "engine.batching=continuous", "engine.batch_sampling=true")
    try:
        assert [g.token_ids for g in engine.batch(CHATS[:3], GREEDY)] == want  # greedy = top-k 1
        hot = GenerationParams(max_new_tokens=24, min_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0)
        sampled = [tuple(engine.generate(CHATS[0], hot).token_ids) for _ in range(3)]
        assert all(len(s) == 24 for s in sampled) and len(set(sampled) | {tuple(want[0])}) > 1
        assert "per request" in engine.describe()["continuous"]["sampling"]
    finally:
        engine.shutdown()
    again = engine_for(compose, loaded, "engine.batching=continuous")  # the model is free again after shutdown
    again.shutdown()


def test_continuous_refuses_an_attention_the_manager_does_not_run(compose, load):
    from harness.models import load_model

    cfg = compose("model=tiny-gpt2")
    loaded = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)  # a copy we may spoil
    loaded.model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ConfigError, match="attention=sdpa or attention=eager"):
        engine_for(compose, loaded, "engine.batching=continuous")


@needs_smollm2
def test_continuous_batching_matches_on_a_real_model(compose, smollm2):
    want = reference(compose, smollm2, CHATS)
    engine = engine_for(compose, smollm2, "engine.batching=continuous")
    try:
        assert [g.token_ids for g in engine.batch(CHATS, GREEDY)] == want
    finally:
        engine.shutdown()


def test_throughput_bench_measures_the_batching_engine(compose, tmp_path):
    from runners.point import run_point

    cfg = compose(
        "model=tiny-llama",
        "bench=throughput",
        "engine.batching=continuous",
        "bench.prompt_lengths=[16]",
        "bench.max_new_tokens=8",
        "bench.batch_sizes=[1,4]",
        "bench.concurrency=[4]",
        "bench.requests_per_client=2",
        "bench.min_runs=2",
        "bench.max_runs=3",
        "bench.min_seconds=0",
    )
    result = run_point(cfg, tmp_path)
    assert result.status == "ok", result.error
    m = result.metrics
    assert m["requests_s[clients=4]"]["mean"] > 0 and m["queue_wait_ms[clients=4]"]["n"] == 8
    for key in ("single_mbu", "mbu[batch=4]", "mbu[clients=4]"):
        assert 0 < m[key]["mean"] < 1, key
    assert result.resolved["engine"]["batching"] == "continuous"
    assert "compile_s" not in result.timings and result.timings["engine_s"] >= 0


def test_the_server_batches_concurrent_streams_and_unload_waits_for_them(tmp_path):
    import openai

    from harness.config import EngineConfig
    from harness.server import ServerSettings, create_app

    settings = ServerSettings(
        token=TOKEN,
        capacity=1,
        max_tokens_limit=64,
        default_max_tokens=16,
        jobs_dir=str(tmp_path / "jobs"),
        engine=EngineConfig(batching="continuous"),
    )
    app = create_app(settings)
    with serving(app) as base:
        http = Http(base)
        client = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN)
        worker = app.state.server.worker
        texts: dict[int, str] = {}

        def one(i: int) -> None:
            stream = client.chat.completions.create(
                model="tiny-llama", messages=CHATS[i % len(CHATS)], max_tokens=24, temperature=0, stream=True
            )
            texts[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        alone = [client.chat.completions.create(model="tiny-llama", messages=c, max_tokens=24, temperature=0)
                 for c in CHATS]  # fmt: skip
        status, info = http.json("GET", "/models/tiny-llama")
        assert status == 200 and info["engine"]["batching"] == "continuous"
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        status, info = http.json("POST", "/models/tiny-llama/unload")  # queued behind the running streams
        for t in threads:
            t.join()
        assert status == 200 and info["unloaded"]
        assert [texts[i] for i in range(12)] == [alone[i % len(CHATS)].choices[0].message.content for i in range(12)]
        assert worker.queue_depth == 0 and not worker._running
        status, body = http.json(
            "POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 4, "temperature": 0.5}
        )
        assert status == 400 and "sampling" in body["error"]["message"]
        # A client that leaves mid-stream: its request is cancelled in the batch, and the server goes on.
        from test_server import metric

        before = metric(http("GET", "/metrics")[1], "harness_tokens_total", model="tiny-llama", kind="completion")
        stream = client.completions.create(
            model="tiny-llama", prompt="a", max_tokens=64, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        stream.close()
        deadline = time.time() + 10
        while worker._running and time.time() < deadline:
            time.sleep(0.05)
        assert not worker._running  # the reader saw the disconnect and ended the request
        client.completions.create(model="tiny-llama", prompt="a", max_tokens=1, temperature=0)
        after = metric(http("GET", "/metrics")[1], "harness_tokens_total", model="tiny-llama", kind="completion")
        assert after - before < 64


# -- static cache and compiled decoding -------------------------------------------------------------------------
def test_a_static_cache_gives_the_same_greedy_tokens(compose, load):
    loaded = load("tiny-llama")
    engine = engine_for(compose, loaded, "engine.cache=static")
    assert [engine.generate(c, GREEDY).token_ids for c in CHATS] == reference(compose, loaded, CHATS)
    assert engine.describe()["cache"] == "static" and engine.describe()["compile"] is False


def test_compiled_decoding_compiles_in_warm_up_and_matches(compose, load, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    loaded = load("tiny-llama")
    engine = engine_for(compose, loaded, "engine.cache=static", "engine.compile=true")
    described = engine.describe()
    assert described["compile"] is True, described.get("compile_fallback")
    assert described["compile_mode"] == "default" and engine.compile_s > 0
    prompts = CHATS[:3]
    assert [streamed(engine, c, GREEDY).token_ids for c in prompts] == reference(compose, loaded, prompts)
    assert engine.compiles_in_requests == 0  # the warm-up's two shapes made every later length reuse the graph
    assert any((tmp_path / "inductor").iterdir())  # kernels kept for the next run


def test_compile_that_cannot_run_falls_back_or_fails_under_strict(compose, load, monkeypatch):
    import harness.engines.transformers as module

    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    loaded = load("tiny-llama")
    engine = engine_for(compose, loaded, "engine.cache=static", "engine.compile=true")
    described = engine.describe()
    assert described["compile"] is False and "no C++ compiler" in described["compile_fallback"]
    assert engine.generate(CHATS[0], GREEDY).token_ids == reference(compose, loaded, CHATS[:1])[0]
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler.*drop engine.strict"):
        engine_for(compose, loaded, "engine.cache=static", "engine.compile=true", "engine.strict=true")
