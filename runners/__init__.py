"""Runners turn one validated sweep point into a loaded model, an engine and a measurement.

Imported on first use: the sweep's parent process needs only runners.execute (it starts each point's own
process), not the benches and engines that import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "execute_point": "runners.execute",
    "BENCHES": "runners.point",
    "run_point": "runners.point",
    "summary_line": "runners.point",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runners' has no attribute {name!r}")


__all__ = ["BENCHES", "execute_point", "run_point", "summary_line"]
