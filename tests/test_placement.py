import sys

import pytest
import torch

from harness.config import AttentionConfig, QuantConfig
from harness.device import Placement, resolve_device, resolve_dtype, resolve_placement
from harness.errors import ConfigError, QuantizationError
from harness.models import quantization
from harness.models.attention import choose_attention

CPU = Placement("cpu", "float32", "test")
CUDA_BF16 = Placement("cuda", "bfloat16", "test")


class Both:
    _supports_sdpa = True
    _supports_flash_attn = True


class EagerOnly:
    _supports_sdpa = False
    _supports_flash_attn = False


def test_device_auto_and_cpu():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else resolve_device("auto"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")


def test_dtype_auto_rules(monkeypatch):
    assert resolve_dtype("auto", "cpu")[0] == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda")[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda")[0] == "float16"
    assert resolve_dtype("auto", "mps")[0] == "float16"
    assert resolve_dtype("bfloat16", "cpu") == ("bfloat16", "asked for")
    assert resolve_placement("cpu", "auto").torch_dtype == torch.float32


def test_attention_auto_on_cpu_is_sdpa_with_reason():
    choice = choose_attention(AttentionConfig("auto"), Both, CPU)
    assert choice.implementation == "sdpa" and "not CUDA" in choice.reason


def test_attention_auto_picks_flash_when_everything_allows(monkeypatch):
    monkeypatch.setattr("harness.models.attention.flash_attn_installed", lambda: True)
    assert choose_attention(AttentionConfig("auto"), Both, CUDA_BF16).implementation == "flash_attention_2"
    fp32 = Placement("cuda", "float32", "test")
    assert choose_attention(AttentionConfig("auto"), Both, fp32).implementation == "sdpa"


def test_attention_explicit_fallbacks_and_strict(monkeypatch):
    monkeypatch.setattr("harness.models.attention.flash_attn_installed", lambda: False)
    choice = choose_attention(AttentionConfig("flash2"), Both, CUDA_BF16)
    assert choice.implementation == "sdpa" and "flash-attn is not installed" in choice.reason
    with pytest.raises(ConfigError, match="attention.strict=false"):
        choose_attention(AttentionConfig("flash2", strict=True), Both, CUDA_BF16)
    sdpa = choose_attention(AttentionConfig("sdpa"), EagerOnly, CPU)
    assert sdpa.implementation == "eager" and "does not support sdpa" in sdpa.reason
    with pytest.raises(ConfigError):
        choose_attention(AttentionConfig("sdpa", strict=True), EagerOnly, CPU)
    assert choose_attention(AttentionConfig("auto"), EagerOnly, CPU).implementation == "eager"
    assert choose_attention(AttentionConfig("eager"), Both, CPU).implementation == "eager"
    assert choose_attention(AttentionConfig("auto"), None, CPU).implementation is None


def test_bitsandbytes_configs():
    eight = quantization.quantization_config(QuantConfig("8bit", "bitsandbytes", 8), CPU)
    assert eight.load_in_8bit
    four = quantization.quantization_config(
        QuantConfig("4bit", "bitsandbytes", 4, quant_type="fp4", double_quant=True), CPU
    )
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32
    assert quantization.quantization_config(QuantConfig(), CPU) is None


def test_bitsandbytes_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QuantizationError, match="bitsandbytes") as info:
        quantization.quantization_config(QuantConfig("8bit", "bitsandbytes", 8), CPU)
    assert "pip install" in str(info.value)


def test_bitsandbytes_on_mps_is_refused():
    with pytest.raises(QuantizationError, match="MPS"):
        quantization.quantization_config(QuantConfig("4bit", "bitsandbytes", 4), Placement("mps", "float16", "t"))


def test_gptq_without_gptqmodel(monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(QuantizationError, match="gptqmodel") as info:
        quantization.quantization_config(QuantConfig("gptq", "gptq", 4), CPU)
    assert "torch >= 2.14.1" in str(info.value)


def test_calibration_set(tmp_path):
    texts = quantization.load_calibration(None, 1000)
    assert len(texts) >= 20 and all(t.strip() for t in texts)
    assert len(quantization.load_calibration(None, 5)) == 5
    own = tmp_path / "cal.txt"
    own.write_text("one\n\ntwo\n\n\n")
    assert quantization.load_calibration(str(own), 10) == ["one", "two"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(QuantizationError, match="no text"):
        quantization.load_calibration(str(empty), 10)
    with pytest.raises(QuantizationError, match="not a readable file"):
        quantization.load_calibration(str(tmp_path / "nope.txt"), 10)


def test_describe_records_backend_and_options():
    d = quantization.describe(QuantConfig("4bit", "bitsandbytes", 4, quant_type="nf4"))
    assert d["backend"] == "bitsandbytes" and d["version"] and d["quant_type"] == "nf4"
    assert quantization.describe(QuantConfig("8bit", "bitsandbytes", 8))["llm_int8_threshold"] == 6.0
    g = quantization.describe(QuantConfig("gptq", "gptq", 4), prequantized=True)
    assert g["backend"] == "gptqmodel" and g["prequantized"]


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_bitsandbytes_really_quantizes_the_linear_layers(load, quant):
    loaded = load("tiny-llama", f"quant={quant}")
    names = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear8bitLt" if quant == "8bit" else "Linear4bit") in names
    assert loaded.quant["bits"] == int(quant[0])
    plain = load("tiny-llama")
    assert loaded.footprint_bytes < plain.footprint_bytes
