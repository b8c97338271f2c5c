"""Model loading: sources, GGUF and random-weight materialization, quantization, attention, the LRU manager."""

from harness.models.loader import LoadedModel, load_model
from harness.models.manager import ModelManager, ModelSpec

__all__ = ["LoadedModel", "ModelManager", "ModelSpec", "load_model"]
