import gc
import threading
import time

import psutil
import pytest
import torch

from harness.config import AttentionConfig, ModelConfig, QuantConfig
from harness.device import Placement
from harness.errors import ConfigError, OutOfMemoryError
from harness.models import ModelManager, ModelSpec, loader
from harness.models.loader import load_model


def spec(name: str, quant: str = "none") -> ModelSpec:
    return ModelSpec(ModelConfig(name=name), QuantConfig(name=quant), AttentionConfig())


class FakeLoaded:
    def __init__(self, name: str, footprint: int) -> None:
        self.name = name
        self.footprint_bytes = footprint
        self.released = False

    def release(self) -> None:
        self.released = True


def fake_loader(sizes=None, delay=0.0):
    calls = []

    def _load(s: ModelSpec):
        calls.append(s.model.name)
        time.sleep(delay)
        return FakeLoaded(s.model.name, (sizes or {}).get(s.model.name, 100))

    return _load, calls


def test_lru_eviction_by_count_and_stats():
    load, calls = fake_loader()
    mgr = ModelManager(capacity=2, loader=load)
    a = mgr.get(spec("a"))
    mgr.get(spec("b"))
    assert mgr.get(spec("a")) is a  # hit, and a becomes most recent
    mgr.get(spec("c"))  # evicts b, the least recently used
    assert [k.split("|")[0] for k in mgr.loaded()] == ["a", "c"]
    assert calls == ["a", "b", "c"]
    assert (mgr.stats.hits, mgr.stats.misses, mgr.stats.loads, mgr.stats.evictions) == (1, 3, 3, 1)


def test_keys_tell_quantizations_apart():
    assert spec("a").key != spec("a", "8bit").key
    assert spec("a").key == spec("a").key


def test_memory_budget_evicts_until_it_fits():
    load, _ = fake_loader({"a": 400, "b": 400, "c": 500})
    mgr = ModelManager(capacity=10, memory_budget_bytes=1000, loader=load)
    first = mgr.get(spec("a"))
    mgr.get(spec("b"))
    mgr.get(spec("c"))
    assert first.released and [k.split("|")[0] for k in mgr.loaded()] == ["b", "c"]
    assert mgr.used_bytes() == 900


def test_a_model_over_the_whole_budget_is_refused():
    load, _ = fake_loader({"big": 5000})
    mgr = ModelManager(memory_budget_bytes=1000, loader=load)
    with pytest.raises(OutOfMemoryError, match="memory budget"):
        mgr.get(spec("big"))
    assert mgr.loaded() == []


def test_bad_manager_settings():
    with pytest.raises(ConfigError):
        ModelManager(capacity=0)
    with pytest.raises(ConfigError):
        ModelManager(memory_budget_bytes=0)


def test_threads_asking_for_one_model_load_it_once():
    load, calls = fake_loader(delay=0.05)
    mgr = ModelManager(capacity=2, loader=load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(mgr.get(spec("a")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"] and len({id(g) for g in got}) == 1
    assert mgr.stats.hits == 7


def test_unload():
    load, _ = fake_loader()
    mgr = ModelManager(loader=load)
    m = mgr.get(spec("a"))
    assert mgr.unload(spec("a").key) and m.released
    assert not mgr.unload(spec("a").key)
    mgr.get(spec("b"))
    mgr.unload_all()
    assert mgr.loaded() == [] and mgr.stats.unloads == 2


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_unload_really_frees_memory(compose, tmp_path):
    # A random-weight Llama of about 60 MB in float32, loaded through the real loader.
    cfg = compose(
        "model=tiny-llama",
        "model.architecture.hidden_size=512",
        "model.architecture.intermediate_size=2048",
        "model.architecture.num_hidden_layers=4",
        "model.architecture.num_attention_heads=8",
    )
    mgr = ModelManager(capacity=1, cache_dir=cfg.cache_dir)
    s = ModelSpec(cfg.model, cfg.quant, cfg.attention)
    mgr.get(s)  # builds the checkpoint once
    mgr.unload(s.key)
    before = _rss()
    loaded = mgr.get(s)
    assert loaded.footprint_bytes > 40_000_000
    with torch.no_grad():  # safetensors weights are mapped lazily: a forward pass makes them resident
        loaded.model(torch.ones(1, 4, dtype=torch.long))
    in_use = _rss()
    assert in_use - before > 0.5 * loaded.footprint_bytes
    del loaded
    mgr.unload(s.key)
    after_unload = _rss()
    assert in_use - after_unload > 0.8 * (in_use - before), (before, in_use, after_unload)


def test_cuda_oom_during_load_retries_on_cpu_when_asked(monkeypatch, tmp_path):
    attempts = []
    real = loader._load_once

    def fake_once(cfg, quant, attention, cache, seed, placement, events, tensor_parallel=1):
        attempts.append(placement.device)
        if placement.device == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(cfg, quant, attention, cache, seed, placement, events, tensor_parallel)

    monkeypatch.setattr(loader, "_load_once", fake_once)
    monkeypatch.setattr(loader, "resolve_placement", lambda d, t: Placement("cuda", "bfloat16", "test"))
    tiny = ModelConfig(
        name="tiny-gpt2",
        random_weights=True,
        source="random",
        architecture={"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 300},
        tokenizer={"vocab_size": 300, "chat_template": "none"},
        fallback_to_cpu=True,
    )
    loaded = load_model(tiny, cache_dir=tmp_path)
    assert attempts == ["cuda", "cpu"] and loaded.placement.device == "cpu"
    assert any("retried on CPU" in e for e in loaded.events)
    assert "after CUDA out-of-memory" in loaded.placement.reason

    attempts.clear()
    no_fallback = ModelConfig(**{**vars(tiny), "fallback_to_cpu": False})
    with pytest.raises(OutOfMemoryError, match="fallback_to_cpu=true"):
        load_model(no_fallback, cache_dir=tmp_path)
    assert attempts == ["cuda"]
