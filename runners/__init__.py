"""Runners turn one validated sweep point into a loaded model, an engine and a measurement."""

from runners.point import BENCHES, run_point, summary_line

__all__ = ["BENCHES", "run_point", "summary_line"]
