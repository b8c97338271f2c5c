"""Quantization configs for the loader: bitsandbytes 8/4-bit and GPTQ through GPTQModel.

auto-gptq is abandoned and current transformers no longer use it; GPTQ goes through GPTQModel (the `gptq`
extra), which needs torch >= 2.14.1. Every case the platform cannot do raises QuantizationError naming the
missing package or device.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

from harness.config import QuantConfig
from harness.device import Placement
from harness.errors import QuantizationError

CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.txt"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(module: str, why: str, install: str) -> None:
    """Import `module` or raise QuantizationError naming the package and how to install it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise QuantizationError(
            f"{why} needs the Python package '{module}', which cannot be imported ({exc}).",
            f"install it with `{install}`, or choose quant=none.",
        ) from exc


def _bnb_config(cfg: QuantConfig, placement: Placement):
    if placement.device == "mps":
        raise QuantizationError(
            f"quant={cfg.name} (bitsandbytes) does not run on Apple MPS.",
            "use model.device=cpu or a CUDA machine, or quant=none.",
        )
    require("bitsandbytes", f"quant={cfg.name}", "pip install 'bitsandbytes>=0.46'")
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.llm_int8_threshold)
    compute = placement.dtype if cfg.compute_dtype == "auto" else cfg.compute_dtype
    import torch

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
    )


def load_calibration(path: str | None, limit: int) -> list[str]:
    """Calibration texts: blocks separated by blank lines; the repo's own set when `path` is None."""
    source = Path(path) if path else CALIBRATION_FILE
    if not source.is_file():
        raise QuantizationError(
            f"quant.calibration={str(source)!r} is not a readable file.",
            "give a text file whose calibration samples are separated by blank lines.",
        )
    blocks = [b.strip() for b in source.read_text(encoding="utf-8").split("\n\n")]
    texts = [b for b in blocks if b]
    if not texts:
        raise QuantizationError(f"the calibration file {source} holds no text.", "give a file with samples.")
    return texts[:limit]


def _gptq_config(cfg: QuantConfig, placement: Placement, tokenizer: Any, prequantized: bool):
    require("gptqmodel", "quant=gptq", "pip install -e '.[gptq]'  (GPTQModel; needs torch >= 2.14.1)")
    require("optimum", "quant=gptq", "pip install -e '.[gptq]'")
    from transformers import GPTQConfig

    if prequantized:
        return GPTQConfig(bits=cfg.bits)
    return GPTQConfig(
        bits=cfg.bits,
        group_size=cfg.group_size,
        desc_act=cfg.desc_act,
        tokenizer=tokenizer,
        dataset=load_calibration(cfg.calibration, cfg.calibration_samples),
    )


def quantization_config(cfg: QuantConfig, placement: Placement, tokenizer: Any = None, prequantized: bool = False):
    """The transformers quantization config for `cfg`, or None for quant=none."""
    if cfg.method == "none":
        return None
    if cfg.method == "bitsandbytes":
        return _bnb_config(cfg, placement)
    return _gptq_config(cfg, placement, tokenizer, prequantized)


def describe(cfg: QuantConfig, prequantized: bool = False) -> dict[str, Any]:
    """What the result records of the quantization actually applied."""
    record: dict[str, Any] = {"name": cfg.name, "method": cfg.method, "bits": cfg.bits}
    if cfg.method == "bitsandbytes":
        record["backend"] = "bitsandbytes"
        record["version"] = _version("bitsandbytes")
        if cfg.bits == 4:
            record.update(quant_type=cfg.quant_type, double_quant=cfg.double_quant, compute_dtype=cfg.compute_dtype)
        else:
            record["llm_int8_threshold"] = cfg.llm_int8_threshold
    elif cfg.method == "gptq":
        record.update(
            backend="gptqmodel",
            version=_version("gptqmodel"),
            group_size=cfg.group_size,
            desc_act=cfg.desc_act,
            prequantized=prequantized,
        )
    return record
