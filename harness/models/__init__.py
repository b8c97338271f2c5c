"""Model loading: sources, GGUF and random-weight materialization, quantization, attention, the LRU manager.

The names below are imported on first use: the sweep's parent process reads harness.models.cache (digests)
and must not pay for importing torch, which only the point's own process needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LoadedModel": "harness.models.loader",
    "load_model": "harness.models.loader",
    "ModelManager": "harness.models.manager",
    "ModelSpec": "harness.models.manager",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness.models' has no attribute {name!r}")


__all__ = ["LoadedModel", "ModelManager", "ModelSpec", "load_model"]
