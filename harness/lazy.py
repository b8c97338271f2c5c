"""Package attributes imported on first use, so importing a package does not import what its names need.

The sweep's parent process imports `harness.models` (for digests) and `runners` (to start points) but must not
pay for torch, which only a point's own process uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ that imports `sources[name]` (a module path) when `name` is first read."""

    def __getattr__(name: str) -> Any:
        if name in sources:
            return getattr(importlib.import_module(sources[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
