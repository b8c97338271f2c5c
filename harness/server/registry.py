"""Which models a request may name: the registered entries (conf/model/), optionally with a quantization as
`<entry>:<quant>`, and the sub-folders of the operator's --model-dir folders. Nothing else: a name is never
a path, so a request cannot reach outside those folders, and trust_remote_code is the operator's decision."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

from harness.config import AttentionConfig, ModelConfig, QuantConfig, group_options, load_config
from harness.models.manager import ModelSpec
from harness.models.sources import Availability, availability, hub_offline

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is not served here; the models are: {', '.join(known)}.")


class ModelRegistry:
    def __init__(self, model_dirs: list[str], allow_remote_code: bool = False, allow_downloads: bool = False) -> None:
        self.model_dirs = [Path(d).expanduser().resolve() for d in model_dirs]
        self.allow_remote_code = allow_remote_code
        self.allow_downloads = allow_downloads
        self._specs: dict[str, ModelSpec] = {}
        self._lock = threading.Lock()  # one composition per name, however many requests ask at once

    def entries(self) -> list[str]:
        return group_options("model")

    def folder_models(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in self.model_dirs:
            for child in sorted(folder.iterdir()):
                if child.is_dir() and (child / "config.json").is_file() and _NAME.match(child.name):
                    found.setdefault(child.name, child)
                elif child.suffix == ".gguf" and child.is_file() and _NAME.match(child.stem):
                    found.setdefault(child.stem, child)
        return found

    def names(self) -> list[str]:
        return sorted({*self.entries(), *self.folder_models()})

    def spec(self, name: str) -> ModelSpec:
        """The spec to load for a request's model name; UnknownModel for anything not registered."""
        if not isinstance(name, str) or not name:
            raise UnknownModel(str(name), self.names())
        with self._lock:
            if name in self._specs:
                return self._specs[name]
            entry, _, quant = name.partition(":")
            if not _NAME.match(entry) or (quant and not _NAME.match(quant)):
                raise UnknownModel(name, self.names())
            if entry in self.entries():
                if quant and quant not in group_options("quant"):
                    raise UnknownModel(name, [f"{entry}:{q}" for q in group_options("quant")])
                spec = self._entry_spec(entry, quant or "none")
            elif entry in (folders := self.folder_models()) and not quant:
                spec = ModelSpec(
                    ModelConfig(name=entry, source="path", path=str(folders[entry])), QuantConfig(), AttentionConfig()
                )
            else:
                raise UnknownModel(name, self.names())
            if spec.model.trust_remote_code and not self.allow_remote_code:
                spec = replace(spec, model=replace(spec.model, trust_remote_code=False))
            self._specs[name] = spec
            return spec

    def servable(self, spec: ModelSpec) -> Availability:
        """Whether this server can load the spec now: its weights are on this machine, or the operator allows
        downloads (and the hub is not switched off)."""
        found = availability(spec.model)
        if not found.offline and self.allow_downloads and spec.model.hub_id and not hub_offline():
            return Availability(True, found.how)
        return found

    @staticmethod
    def _entry_spec(entry: str, quant: str) -> ModelSpec:
        cfg = load_config([f"model={entry}", f"quant={quant}"])
        return ModelSpec(cfg.model, cfg.quant, cfg.attention)
