"""harness: benchmark-first experiment harness for real LLMs (speed, memory, quality in one run)."""

__version__ = "0.1.0"
