"""`harness serve`: an OpenAI-compatible HTTP server over the harness's engines, with model management through
the LRU model manager, benchmark jobs run in background processes, and Prometheus metrics."""

from harness.server.app import create_app
from harness.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
