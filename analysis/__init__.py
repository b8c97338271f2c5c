"""Analysis reads the result files of a sweep (never an engine) and merges them for comparison."""

from analysis.results import SchemaError, load_results

__all__ = ["SchemaError", "load_results"]
