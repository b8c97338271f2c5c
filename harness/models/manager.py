"""A thread-safe LRU of loaded models, for the API server and the workflow validator.

Capacity is a count and, optionally, a memory budget (the sum of the models' footprints). A model that alone
exceeds the budget is refused with OutOfMemoryError rather than evicting everything for nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.config import AttentionConfig, ModelConfig, QuantConfig
from harness.errors import ConfigError, OutOfMemoryError
from harness.models.cache import spec_digest
from harness.models.loader import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What to load: the three groups that decide the weights in memory."""

    model: ModelConfig
    quant: QuantConfig
    attention: AttentionConfig

    @property
    def key(self) -> str:
        return (
            f"{self.model.name}|{self.quant.name}|{self.attention.name}|"
            + spec_digest([vars(self.model), vars(self.quant), vars(self.attention)])[:12]
        )


@dataclass
class ManagerStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    unloads: int = 0


Loader = Callable[[ModelSpec], LoadedModel]


class ModelManager:
    def __init__(
        self,
        capacity: int = 2,
        memory_budget_bytes: int | None = None,
        cache_dir: Path | str = "~/.cache/harness",
        seed: int = 0,
        loader: Loader | None = None,
    ) -> None:
        if capacity < 1:
            raise ConfigError(
                f"model manager capacity={capacity} is not valid: it must be >= 1.",
                "set a capacity of at least one model.",
            )
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ConfigError(
                f"model manager memory budget={memory_budget_bytes} is not valid: it must be > 0.",
                "give a positive number of bytes, or none for no budget.",
            )
        self.capacity = capacity
        self.memory_budget_bytes = memory_budget_bytes
        self.cache_dir = Path(cache_dir).expanduser()
        self._loader: Loader = loader or (
            lambda spec: load_model(spec.model, spec.quant, spec.attention, cache_dir=cache_dir, seed=seed)
        )
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = ManagerStats()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    def loaded(self) -> list[str]:
        """Keys of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    def peek(self, key: str) -> LoadedModel | None:
        """The loaded model under key, without counting a use (the LRU order stays as it is)."""
        with self._lock:
            return self._models.get(key)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.footprint_bytes for m in self._models.values())

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model for `spec`, loading it (and evicting least recently used models) on a miss.

        Loads are serialized under the lock: two threads asking for the same model load it once.
        """
        key = spec.key
        with self._lock:
            if key in self._models:
                self.stats.hits += 1
                self._models.move_to_end(key)
                return self._models[key]
            self.stats.misses += 1
            while len(self._models) >= self.capacity:
                self._evict_oldest("capacity")
            loaded = self._loader(spec)
            self.stats.loads += 1
            if self.memory_budget_bytes is not None:
                if loaded.footprint_bytes > self.memory_budget_bytes:
                    loaded.release()
                    raise OutOfMemoryError(
                        f"model '{spec.model.name}' takes {loaded.footprint_bytes / 2**20:.0f} MiB, more than the "
                        f"manager's whole memory budget of {self.memory_budget_bytes / 2**20:.0f} MiB.",
                        "raise the memory budget, or load it quantized (quant=8bit or quant=4bit).",
                    )
                while self._models and self.used_bytes() + loaded.footprint_bytes > self.memory_budget_bytes:
                    self._evict_oldest("memory budget")
            self._models[key] = loaded
            return loaded

    def unload(self, key: str) -> bool:
        """Unload one model; False when it was not loaded."""
        with self._lock:
            loaded = self._models.pop(key, None)
            if loaded is None:
                return False
            self.stats.unloads += 1
        loaded.release()
        return True

    def unload_all(self) -> None:
        for key in self.loaded():
            self.unload(key)

    def _evict_oldest(self, why: str) -> None:
        key, loaded = self._models.popitem(last=False)
        self.stats.evictions += 1
        log.info("evicting %s (%s)", key, why)
        loaded.release()
