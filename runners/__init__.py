"""Runners turn one validated sweep point into a loaded model, an engine and a measurement.

Imported on first use (harness.lazy): the sweep's parent process needs only runners.execute (it starts each
point's own process), not the benches and engines that import torch.
"""

from harness.lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        "execute_point": "runners.execute",
        "BENCHES": "runners.benches",
        "run_point": "runners.point",
        "summary_line": "runners.point",
    },
)

__all__ = ["BENCHES", "execute_point", "run_point", "summary_line"]
