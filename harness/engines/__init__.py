"""Inference engines, as plug-ins: a registry of names and the modules that implement them, imported only when
their engine is used (heavy backends stay out of processes that never run them).

Each engine module has `load(cfg, log_dir) -> LoadedModel` (the model in the form the engine runs) and
`create(loaded, cfg) -> Engine`. Adding an engine is one YAML file (conf/engine/<name>.yaml, which also declares the
engine.* fields it reads), one module, one line in ENGINES, its extra and its tests: docs/engines.md.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from harness.config import HTTP_ENGINES
from harness.engines.base import Engine, Generation, GenerationParams, TokenEvent, TokenStream
from harness.plugins import plugin_module

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.models.loader import LoadedModel

# engine name -> its module. The names are conf/engine/'s options (a test keeps the two equal).
ENGINES: dict[str, str] = {
    "transformers": "harness.engines.transformers",
    "llamacpp": "harness.engines.llamacpp",
    "onnxruntime": "harness.engines.onnxruntime",
    "openai": "harness.engines.openai",
    "vllm": "harness.engines.openai",  # vLLM is an OpenAI-compatible server, launched from its own environment
    "deepspeed": "harness.engines.openai",  # DeepSpeed-MII's OpenAI-compatible server, from its own environment
}


def engine_module(name: str) -> ModuleType:
    """The module of a registered engine; ConfigError with the closest name for any other."""
    return plugin_module("engine", name, ENGINES, "pick one of those, or add an engine (docs/engines.md).")


def _engine_of(cfg: HarnessConfig) -> str:
    """The engine a point runs: bench=serve with a target of its own drives that server over HTTP."""
    drives_server = cfg.server_launch() is not None and cfg.engine.name not in HTTP_ENGINES
    return "openai" if drives_server else cfg.engine.name


def load_for_engine(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    """Load the point's model in the form its engine runs (a transformers module, a GGUF file in llama.cpp, an ONNX
    model converted once, or a server, launched with its log in log_dir or running, with only the tokenizer here)."""
    return engine_module(_engine_of(cfg)).load(cfg, log_dir)


def create_engine(name: str, loaded: LoadedModel, cfg: HarnessConfig | None = None) -> Engine:
    """The engine `name` bound to a loaded model (cfg: the point's, for the engine's options)."""
    if cfg is not None:
        name = _engine_of(cfg) if name == cfg.engine.name else name
    return engine_module(name).create(loaded, cfg, name)


__all__ = [
    "ENGINES",
    "Engine",
    "Generation",
    "GenerationParams",
    "TokenEvent",
    "TokenStream",
    "create_engine",
    "engine_module",
    "load_for_engine",
]
