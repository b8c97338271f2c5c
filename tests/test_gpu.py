"""CUDA paths (marker `gpu`): skipped where torch sees no CUDA device; scripts/gpu_check.sh runs them."""

import pytest
import torch

from harness.engines import GenerationParams, create_engine
from harness.memory import MemoryMonitor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_dtype_auto_on_cuda(load):
    loaded = load("tiny-llama")
    assert loaded.placement.device == "cuda"
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert loaded.placement.dtype == expected
    assert next(loaded.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_bitsandbytes_on_cuda(load, quant):
    loaded = load("tiny-llama", f"quant={quant}")
    names = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear8bitLt" if quant == "8bit" else "Linear4bit") in names
    g = create_engine("transformers", loaded).generate(QUESTION, GenerationParams(max_new_tokens=8, min_new_tokens=8))
    assert g.output_tokens == 8


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_honoured_on_cuda(load, attention):
    loaded = load("tiny-llama", f"attention={attention}")
    assert loaded.attention_used == attention


def test_flash2_used_or_fallback_recorded(load):
    loaded = load("tiny-llama", "attention=flash2")
    from harness.models.attention import flash_attn_installed

    if flash_attn_installed():
        assert loaded.attention_used == "flash_attention_2"
    else:
        assert loaded.attention_used == "sdpa" and "flash-attn is not installed" in loaded.attention.reason


def test_greedy_identical_on_cuda_in_float32(load):
    engine = create_engine("transformers", load("tiny-llama", "model.dtype=float32"))
    params = GenerationParams(max_new_tokens=16, min_new_tokens=16)
    single = engine.generate(QUESTION, params).token_ids
    stream = engine.stream(QUESTION, params)
    streamed = [e.token_id for e in stream]
    assert single == streamed == engine.batch([QUESTION, QUESTION], params)[0].token_ids


def test_cuda_memory_is_monitored(load):
    loaded = load("tiny-llama")
    with MemoryMonitor(interval_s=0.005) as mon:
        create_engine("transformers", loaded).generate(QUESTION, GenerationParams(max_new_tokens=8))
    s = mon.summary()
    assert s["cuda_max_allocated_bytes"] > 0 and s["cuda_reserved_bytes"] >= s["cuda_allocated_bytes"]
