import time

import pytest

from harness.engines import GenerationParams, create_engine
from harness.errors import ConfigError, InferenceError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OTHER = [{"role": "user", "content": "Name three colours of the rainbow, please."}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("min_new_tokens", -1),
        ("min_new_tokens", 99),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("seed", -3),
    ],
)
def test_generation_params_are_validated(field, value):
    params = (
        GenerationParams(max_new_tokens=8, **{field: value})
        if field != "max_new_tokens"
        else GenerationParams(max_new_tokens=value)
    )
    with pytest.raises(InferenceError, match=field):
        params.validate()


def test_context_window_is_enforced():
    with pytest.raises(InferenceError, match="context window of 100"):
        GenerationParams(max_new_tokens=50).validate(context_window=100, prompt_tokens=60)
    GenerationParams(max_new_tokens=40).validate(context_window=100, prompt_tokens=60)


@pytest.mark.parametrize(
    ("max_new", "prompt", "fix"),
    [
        (50, 60, "lower max_new_tokens to at most 40"),
        (50, 120, "shorten the prompt to at most 50 tokens"),  # the prompt alone fills the window
        (150, 120, "lower max_new_tokens below the context window (100)"),
    ],
)
def test_context_window_fix_is_always_one_that_works(max_new, prompt, fix):
    with pytest.raises(InferenceError) as caught:
        GenerationParams(max_new_tokens=max_new).validate(context_window=100, prompt_tokens=prompt)
    assert fix in caught.value.fix and "at most 0" not in caught.value.fix and "at most -" not in caught.value.fix


def test_unknown_engine(load):
    with pytest.raises(ConfigError, match="transformers"):
        create_engine("tgi", load("tiny-gpt2"))


def test_prompt_longer_than_context_fails_before_running(load):
    engine = create_engine("transformers", load("tiny-gpt2"))
    with pytest.raises(InferenceError, match="context window of 512"):
        engine.generate("word " * 600, GenerationParams(max_new_tokens=4))


def _three_ways(engine, prompts, params):
    single = [engine.generate(p, params) for p in prompts]
    streamed = []
    for p in prompts:
        stream = engine.stream(p, params)
        events = list(stream)
        assert [e.token_id for e in events] == stream.generation.token_ids
        streamed.append(stream.generation)
    batched = engine.batch(prompts, params)
    return single, streamed, batched


@pytest.mark.slow
def test_greedy_tokens_identical_across_generate_stream_batch_smollm2(smollm2):
    engine = create_engine("transformers", smollm2)
    params = GenerationParams(max_new_tokens=24)
    single, streamed, batched = _three_ways(engine, [QUESTION, OTHER], params)
    for a, b, c in zip(single, streamed, batched, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.text == b.text == c.text
    assert "Paris" in single[0].text
    assert single[0].finish_reason == "eos"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_greedy_tokens_identical_across_generate_stream_batch_tiny(load, model):
    engine = create_engine("transformers", load(model))
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    single, streamed, batched = _three_ways(engine, [QUESTION, QUESTION], params)
    assert single[0].token_ids == streamed[0].token_ids == batched[0].token_ids == batched[1].token_ids
    assert all(g.output_tokens == 12 for g in single + streamed + batched)


def test_stream_stamps_every_token_in_order(load):
    engine = create_engine("transformers", load("tiny-llama"))
    stream = engine.stream(QUESTION, GenerationParams(max_new_tokens=16, min_new_tokens=16))
    events = list(stream)
    g = stream.generation
    assert len(events) == 16 == g.output_tokens
    stamps = [e.t_ns for e in events]
    assert stamps == sorted(stamps) and stamps[0] > stream.start_ns
    assert g.end_ns == stamps[-1] and g.prompt_tokens > 0 and g.tokenize_ns > 0
    assert g.finish_reason == "length"


def test_stream_close_stops_generation_early(load):
    engine = create_engine("transformers", load("tiny-llama"))
    stream = engine.stream(QUESTION, GenerationParams(max_new_tokens=400, min_new_tokens=400))
    first = next(stream)
    assert first.token_id >= 0
    t0 = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t0 < 5
    assert stream.generation.output_tokens < 400


def test_batch_reports_per_sequence_lengths(load):
    engine = create_engine("transformers", load("tiny-qwen2"))
    out = engine.batch(["short", "a much longer prompt with many more words in it"], GenerationParams(max_new_tokens=5))
    assert out[0].prompt_tokens < out[1].prompt_tokens
    assert all(1 <= g.output_tokens <= 5 for g in out)


def test_batch_refuses_nothing_and_mixtures(load):
    engine = create_engine("transformers", load("tiny-qwen2"))
    with pytest.raises(InferenceError, match="no prompts"):
        engine.batch([], GenerationParams())
    with pytest.raises(InferenceError, match="mixes"):
        engine.batch(["raw", QUESTION], GenerationParams())


def test_sampling_is_reproducible_with_a_seed(load):
    engine = create_engine("transformers", load("tiny-llama"))
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert engine.generate(QUESTION, params).token_ids == engine.generate(QUESTION, params).token_ids


@pytest.mark.slow
def test_plain_format_stops_before_the_next_user_turn(smollm2):
    from dataclasses import replace

    engine = create_engine("transformers", replace(smollm2, chat_format="plain"))
    params = GenerationParams(max_new_tokens=60)
    g = engine.generate([{"role": "user", "content": "Say hello."}], params)
    assert "User:" not in g.text
    assert g.finish_reason in ("stop", "eos", "length")


def test_engine_describes_itself(load):
    info = create_engine("transformers", load("tiny-gpt2")).describe()
    assert info["name"] == "transformers" and "one request at a time" in info["concurrency"]


def test_stream_is_consumed_by_one_thread(load):
    import threading

    engine = create_engine("transformers", load("tiny-llama"))
    stream = engine.stream(QUESTION, GenerationParams(max_new_tokens=8, min_new_tokens=8))
    next(stream)
    errors = []

    def other_thread():
        try:
            next(stream)
        except InferenceError as exc:
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert "single thread" in str(errors[0])
    assert len([stream_event for stream_event in stream]) == 7


def test_closing_a_stream_that_never_started(load):
    engine = create_engine("transformers", load("tiny-llama"))
    stream = engine.stream(QUESTION, GenerationParams(max_new_tokens=8))
    stream.close()
    assert list(stream) == [] and stream.generation is None


def test_an_error_inside_streaming_generation_is_wrapped(load, monkeypatch):
    engine = create_engine("transformers", load("tiny-llama"))

    def broken(kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(engine, "_run_generate", broken)
    with pytest.raises(InferenceError, match="kernel failed"):
        list(engine.stream(QUESTION, GenerationParams(max_new_tokens=4)))
    with pytest.raises(InferenceError, match="kernel failed"):
        engine.generate(QUESTION, GenerationParams(max_new_tokens=4))
