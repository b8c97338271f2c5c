"""Model loading: sources, GGUF and random-weight materialization, quantization, attention, the LRU manager.

The names below are imported on first use (harness.lazy): the sweep's parent process reads harness.models.cache
(digests) and must not pay for importing torch, which only the point's own process needs.
"""

from harness.lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        "LoadedModel": "harness.models.loader",
        "load_model": "harness.models.loader",
        "ModelManager": "harness.models.manager",
        "ModelSpec": "harness.models.manager",
    },
)

__all__ = ["LoadedModel", "ModelManager", "ModelSpec", "load_model"]
