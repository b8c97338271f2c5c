"""Plug-in registries: a name a user types, mapped to the module that implements it, imported only when used (a
heavy backend stays out of every process that never runs it). Engines and benches are registered this way."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

from harness.errors import ConfigError, did_you_mean


def plugin_module(kind: str, name: str, registry: Mapping[str, str], fix: str, plural: str = "") -> ModuleType:
    """The module registered as `name`; for any other name a ConfigError listing the names, with the closest."""
    if name not in registry:
        raise ConfigError(
            f"{kind}={name!r} is not known; the {plural or kind + 's'} are: {', '.join(registry)}."
            + did_you_mean(name, registry),
            fix,
        )
    return importlib.import_module(registry[name])
