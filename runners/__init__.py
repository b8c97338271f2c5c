"""Runners turn one validated sweep point into a loaded model, an engine and a measurement."""

from runners.execute import execute_point
from runners.point import BENCHES, run_point, summary_line

__all__ = ["BENCHES", "execute_point", "run_point", "summary_line"]
