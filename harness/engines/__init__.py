"""Inference engines. Heavy backends are imported only when their engine is created."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import ENGINE_CHOICES, HTTP_ENGINES
from harness.engines.base import Engine, Generation, GenerationParams, TokenEvent, TokenStream
from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.models.loader import LoadedModel

ENGINES = ENGINE_CHOICES


def load_for_engine(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    """Load the point's model in the form its engine runs: a transformers module, a GGUF file in llama.cpp,
    an ONNX model converted once from the checkpoint, or a server (launched, its log in log_dir, or running)
    with only the tokenizer here."""
    if cfg.server_launch() is not None:
        from harness.engines.openai import load_remote_model

        return load_remote_model(cfg, log_dir or cfg.cache_path / "server-logs")
    if cfg.engine.name == "llamacpp":
        from harness.engines.llamacpp import load_llamacpp_model

        return load_llamacpp_model(cfg)
    if cfg.engine.name == "onnxruntime":
        from harness.engines.onnxruntime import load_onnx_model

        return load_onnx_model(cfg)
    from harness.models import load_model

    return load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)


def create_engine(name: str, loaded: LoadedModel, cfg: HarnessConfig | None = None) -> Engine:
    if name in HTTP_ENGINES or (cfg is not None and cfg.server_launch() is not None):
        from harness.engines.openai import OpenAIEngine

        return OpenAIEngine(loaded, name if name in HTTP_ENGINES else "openai")
    if name == "transformers":
        from harness.engines.transformers import TransformersEngine

        return TransformersEngine(loaded, cfg.engine if cfg else None, cfg.cache_path if cfg else None)
    if name == "llamacpp":
        from harness.config import EngineConfig
        from harness.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(loaded, cfg.engine if cfg else EngineConfig(name="llamacpp"))
    if name == "onnxruntime":
        from harness.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(loaded, cfg.engine.threads if cfg else None)
    raise ConfigError(f"engine={name!r} is not known; the engines are: {', '.join(ENGINES)}.", "pick one of those.")


__all__ = [
    "ENGINES",
    "Engine",
    "Generation",
    "GenerationParams",
    "TokenEvent",
    "TokenStream",
    "create_engine",
    "load_for_engine",
]
