"""Choice of attention implementation, with the reason recorded."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from harness.config import AttentionConfig
from harness.device import Placement
from harness.errors import ConfigError

# attention option -> transformers attn_implementation
IMPLEMENTATIONS = {"eager": "eager", "sdpa": "sdpa", "flash2": "flash_attention_2"}


@dataclass(frozen=True)
class AttentionChoice:
    requested: str
    implementation: str | None  # None: leave it to the model's own code (remote code)
    reason: str


def model_class_for(config) -> type | None:
    """The transformers causal-LM class for a config, or None when its code is remote."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_blockers(model_class: type | None, placement: Placement) -> list[str]:
    blockers = []
    if not flash_attn_installed():
        blockers.append("flash-attn is not installed (pip install -e '.[flash]')")
    if not placement.device.startswith("cuda"):
        blockers.append(f"the device is {placement.device}, not CUDA")
    if placement.dtype not in ("float16", "bfloat16"):
        blockers.append(f"the dtype is {placement.dtype}, not float16/bfloat16")
    if model_class is not None and not getattr(model_class, "_supports_flash_attn", False):
        blockers.append(f"{model_class.__name__} does not support it")
    return blockers


def choose_attention(cfg: AttentionConfig, model_class: type | None, placement: Placement) -> AttentionChoice:
    """auto: flash2 where it can run, else sdpa, else eager. An explicit choice that cannot run falls back
    (reason recorded), or raises ConfigError with attention.strict=true."""
    if model_class is None:
        return AttentionChoice(cfg.name, None, "the model's code is remote: it picks its own attention")
    sdpa_ok = bool(getattr(model_class, "_supports_sdpa", False))
    flash_blockers = _flash_blockers(model_class, placement)
    best_fallback = ("sdpa", "sdpa") if sdpa_ok else ("eager", "eager")
    if cfg.name == "auto":
        if not flash_blockers:
            return AttentionChoice("auto", "flash_attention_2", "auto: flash-attn installed, CUDA, half precision")
        return AttentionChoice(
            "auto",
            best_fallback[1],
            f"auto: {best_fallback[0]} because flash2 cannot run ({'; '.join(flash_blockers)})",
        )
    if cfg.name == "eager":
        return AttentionChoice("eager", "eager", "asked for")
    if cfg.name == "sdpa":
        if sdpa_ok:
            return AttentionChoice("sdpa", "sdpa", "asked for")
        blockers = [f"{model_class.__name__} does not support sdpa"]
        fallback = ("eager", "eager")
    else:
        if not flash_blockers:
            return AttentionChoice("flash2", "flash_attention_2", "asked for")
        blockers = flash_blockers
        fallback = best_fallback
    if cfg.strict:
        raise ConfigError(
            f"attention={cfg.name} cannot be used here: {'; '.join(blockers)}.",
            "remove the blocker, or set attention.strict=false to fall back "
            f"(here to {fallback[0]}) with the reason recorded.",
        )
    return AttentionChoice(cfg.name, fallback[1], f"fell back from {cfg.name} to {fallback[0]}: {'; '.join(blockers)}")
