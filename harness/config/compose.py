"""From overrides to a validated HarnessConfig: Hydra's composition of conf/, outside a Hydra run too, and the
check of group choices that names the closest option."""

from __future__ import annotations

import threading
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config.options import GROUPS, conf_dir, group_options
from harness.config.point import HarnessConfig
from harness.errors import ConfigError, did_you_mean


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {'bench.max_new_tokens': 32, …}; lists and scalars are leaves."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def register_schemas() -> None:
    """Make the schema known to Hydra as `harness_schema` (conf/config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="harness_schema", node=HarnessConfig)
    # A point's folder is named by its overrides; a path among them (workflow.cases=tests/x.json) must not
    # become nested folders, where two points would share a folder name. "/" is written as "%2F".
    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


FOLDER_NAME_BYTES = 200  # file systems allow 255 bytes a name; the rest is for the files a point writes beside


def folder_name(overrides: object) -> str:
    """A point's folder name from its overrides: "/" written as "%2F"; a name too long for a file system (a trace
    path and server arguments) keeps its start and ends with a digest of the whole, so it stays unique."""
    import hashlib

    name = str(overrides).replace("/", "%2F")
    if len(name.encode()) <= FOLDER_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[: FOLDER_NAME_BYTES - 13].decode(errors="ignore")
    return f"{head}~{digest}"


def validate(cfg: DictConfig | HarnessConfig) -> HarnessConfig:
    """Turn a composed config into typed objects, running every check; raises ConfigError."""
    if isinstance(cfg, HarnessConfig):
        return cfg
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    structured = OmegaConf.merge(OmegaConf.structured(HarnessConfig), cfg)
    obj = OmegaConf.to_object(structured)
    assert isinstance(obj, HarnessConfig)
    return obj


_COMPOSE_LOCK = threading.Lock()  # Hydra's compose API is process-global state: one composition at a time


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """conf/config.yaml with overrides, composed as `python -m harness` composes a point, outside a Hydra run
    (the CLI's info, the server, the tests); thread-safe."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with _COMPOSE_LOCK, initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", list(overrides), return_hydra_config=with_hydra)


def load_config(overrides: list[str]) -> HarnessConfig:
    """The validated config of one point given by overrides; ConfigError on a bad value."""
    return validate(compose_config(overrides))


def check_group_choices(overrides: list[str]) -> None:
    """Check `group=option[,option…]` overrides against conf/ before Hydra composes anything.

    Hydra's own message lists the options but does not guess; ours names the closest one.
    """
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key not in (*GROUPS, "experiment") or any(c in value for c in "()[]{}*"):
            continue
        options = group_options(key)
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice not in options:
                raise ConfigError(
                    f"{key}={choice!r} is not a known {key} option; the options are: {', '.join(options)}."
                    + did_you_mean(choice, options),
                    f"pick one of those, or add conf/{key}/{choice}.yaml.",
                )
