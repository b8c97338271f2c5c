"""Inference engines. Heavy backends are imported only when their engine is created."""

from __future__ import annotations

from harness.engines.base import Engine, Generation, GenerationParams, TokenEvent, TokenStream
from harness.errors import ConfigError
from harness.models.loader import LoadedModel

ENGINES = ("transformers",)


def create_engine(name: str, loaded: LoadedModel) -> Engine:
    if name == "transformers":
        from harness.engines.transformers import TransformersEngine

        return TransformersEngine(loaded)
    raise ConfigError(f"engine={name!r} is not known; the engines are: {', '.join(ENGINES)}.", "pick one of those.")


__all__ = ["ENGINES", "Engine", "Generation", "GenerationParams", "TokenEvent", "TokenStream", "create_engine"]
