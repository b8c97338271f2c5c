"""ONNX models for onnxruntime-genai: a checkpoint converted once by its model builder (cached by the checkpoint's
files, the precision, the provider and the builder's version; a damaged cache folder is rebuilt), and what the
converted graph computes in."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, ModelLoadError
from harness.models.cache import COMPLETE, build_once, spec_digest

ONNX_INSTALL = 'pip install -e ".[onnx]" (onnxruntime-genai, onnx, onnx-ir: about 1.5 minutes)'
# The files a converted model must hold; a cache folder missing one, or with one of another size, is rebuilt.
_REQUIRED = ("genai_config.json", "model.onnx")
# The ONNX tensor types a KV cache (and so the activations) is held in: name and bytes per element.
_ONNX_ELEM = {1: ("float32", 4), 10: ("float16", 2), 16: ("bfloat16", 2)}


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ConfigError(
            f"engine=onnxruntime needs onnxruntime-genai, which is not installed ({exc}).",
            f"install it: {ONNX_INSTALL}.",
        ) from exc
    return og


def supported_architectures() -> list[str]:
    """The architectures the installed model builder converts, read from its source (it keeps no list)."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return []
    text = Path(spec.origin).read_text(errors="replace")
    return sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', text)))


def _checkpoint_identity(checkpoint: str) -> list[tuple[str, int, int]]:
    folder = Path(checkpoint)
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())


def _file_sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != COMPLETE}


def _intact(folder: Path) -> str | None:
    """None when a converted folder holds every file it was built with, at its size; else what is wrong."""
    try:
        built = json.loads((folder / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError):
        return "its completion record is missing or unreadable"
    for name in _REQUIRED:
        if name not in built:
            return f"{name} was not written"
    for name, size in built.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not the {size} it was written with"
    return None


def convert(checkpoint: str, precision: str, provider: str, cache_dir: Path, events: list[str]) -> Path:
    """The ONNX folder of a checkpoint at a precision for a provider, built once by the model builder."""
    og = import_genai()
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    supported = supported_architectures()
    if supported and architecture not in supported:
        raise ConfigError(
            f"onnxruntime-genai {og.__version__}'s model builder cannot convert {architecture}; it converts: "
            f"{', '.join(supported)}.",
            "run this model on engine=transformers (or llamacpp with a GGUF file), or pick a supported model.",
        )
    key = spec_digest(
        {
            "checkpoint": _checkpoint_identity(checkpoint),
            "precision": precision,
            "provider": provider,
            "builder": og.__version__,
        }
    )
    target = cache_dir / "onnx" / f"{Path(checkpoint).name}-{precision}-{provider}-{key[:16]}"
    problem = _intact(target) if target.exists() else None
    if problem is not None:
        events.append(f"the cached ONNX model {target} was damaged ({problem}); rebuilt it")
        shutil.rmtree(target, ignore_errors=True)

    def build(tmp: Path) -> dict[str, Any]:
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            checkpoint,
            "-o",
            str(tmp),
            "-p",
            precision,
            "-e",
            provider,
            "-c",
            str(tmp / ".builder-cache"),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
        log = done.stdout + done.stderr
        (tmp / "builder.log").write_text(log)
        if done.returncode != 0 or not all((tmp / name).is_file() for name in _REQUIRED):
            tail = "\n".join(line for line in log.splitlines() if line.strip())[-1500:]
            raise ModelLoadError(
                f"onnxruntime-genai's model builder could not convert {checkpoint} to {precision} for {provider} "
                f"(exit status {done.returncode}); its last lines:\n{tail}",
                "check that the checkpoint is complete and its architecture supported; the command was: "
                + " ".join(command),
            )
        return {
            "checkpoint": checkpoint,
            "precision": precision,
            "provider": provider,
            "builder_version": og.__version__,
            "convert_s": round(time.perf_counter() - t0, 2),
            "files": _file_sizes(tmp),
        }

    folder, built = build_once(target, build)
    if built:
        record = json.loads((folder / COMPLETE).read_text())
        events.append(f"converted to ONNX ({precision}, {provider}) once into {folder} in {record['convert_s']} s")
    return folder


def activation_type(folder: Path, genai: dict[str, Any]) -> tuple[str, int]:
    """The dtype the converted graph computes in (its KV cache inputs' type; int4 weights run with fp32
    activations on CPU) and the KV cache bytes per sequence position."""
    import onnx

    decoder = genai["model"]["decoder"]
    name, size = "float32", 4
    with contextlib.suppress(Exception):  # the graph without its weights: a few kB to read
        graph = onnx.load(str(folder / decoder["filename"]), load_external_data=False).graph
        for value in graph.input:
            if value.name.startswith("past_key_values"):
                name, size = _ONNX_ELEM.get(value.type.tensor_type.elem_type, (name, size))
                break
    return name, 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * size
