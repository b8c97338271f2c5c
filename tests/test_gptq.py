"""GPTQ through GPTQModel (the `gptq` extra, torch >= 2.14.1): runs only where gptqmodel is installed."""

import pytest

from harness.engines import GenerationParams, create_engine

pytest.importorskip("gptqmodel", reason="the gptq extra is not installed (pip install -e '.[gptq]')")
pytestmark = pytest.mark.gptq


def test_gptq_quantizes_once_and_reuses_the_cache(compose, harness_cache):
    from harness.models import load_model

    cfg = compose("model=tiny-llama", "quant=gptq", "quant.group_size=32", "quant.calibration_samples=16")
    first = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
    assert first.quant["backend"] == "gptqmodel" and first.quant["prequantized"]
    assert any("quantized with GPTQ once" in e for e in first.events)
    assert (harness_cache / "gptq").is_dir()
    g = create_engine("transformers", first).generate("hello", GenerationParams(max_new_tokens=4, min_new_tokens=4))
    assert g.output_tokens == 4
    first.release()
    again = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
    assert not any("quantized with GPTQ once" in e for e in again.events)
    assert again.checkpoint == first.checkpoint
