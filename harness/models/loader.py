"""The loader: resolve a model's source → materialize → quantize → choose attention → place on a device.

`load_model` returns a LoadedModel that says what was actually done (source, device, dtype, attention and
quantization in use, and why), so a result can never claim a configuration it did not run.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.config import AttentionConfig, ModelConfig, QuantConfig
from harness.device import Placement, resolve_dtype, resolve_placement
from harness.errors import ConfigError, HarnessError, ModelLoadError, is_out_of_memory, out_of_memory
from harness.models import quantization
from harness.models.attention import AttentionChoice, choose_attention, model_class_for
from harness.models.cache import COMPLETE, build_once, spec_digest
from harness.models.gguf import materialize_gguf
from harness.models.random_weights import build_random_checkpoint
from harness.models.sources import Source, context_window_of, hub_cache_dir, resolve_source, split_parts
from harness.models.split_gguf import join_parts
from harness.models.tensor_parallel import check_split, from_pretrained_args, placement_of_rank, split_summary

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for its engine: `model` is the engine's own object (a transformers module, a llama.cpp
    model, an ONNX Runtime GenAI model) and `tokenizer` a transformers tokenizer of the same vocabulary, which
    every engine shares so prompts of an exact length and chat formatting are the same on each."""

    name: str
    model: Any
    tokenizer: Any
    placement: Placement
    source: Source
    checkpoint: str  # what from_pretrained read: a folder or a hub id
    attention: AttentionChoice
    attention_used: str
    quant: dict[str, Any]
    chat_format: str
    trust_remote_code: bool
    context_window: int | None
    load_seconds: float
    footprint_bytes: int
    parameters: int = 0
    weights_bytes: int = 0  # bytes of the weights as stored for inference (what decoding reads per token)
    kv_bytes_per_position: int = 0  # K and V cache bytes per sequence position, all layers
    events: list[str] = field(default_factory=list)  # what happened on the way (built caches, fallbacks)
    provenance: dict[str, Any] = field(default_factory=dict)
    close: Any = None  # releases an engine's native model (llama.cpp frees its buffers explicitly)
    parallel: dict[str, Any] | None = None  # a model split over ranks: the plan, each rank's device and weights

    def resolved(self) -> dict[str, Any]:
        """The `resolved` block of result.json."""
        return {
            "model": self.name,
            "source": self.source.record(),
            "checkpoint": self.checkpoint,
            "device": self.placement.device,
            "dtype": self.placement.dtype,
            "dtype_reason": self.placement.reason,
            "attention": {
                "requested": self.attention.requested,
                "used": self.attention_used,
                "reason": self.attention.reason,
            },
            "quantization": self.quant,
            "chat_format": self.chat_format,
            "trust_remote_code": self.trust_remote_code,
            "context_window": self.context_window,
            "parameters": self.parameters,
            "footprint_bytes": self.footprint_bytes,
            "events": list(self.events),
            "provenance": self.provenance,
            **({"parallel": self.parallel} if self.parallel else {}),
        }

    def release(self) -> None:
        """Drop the weights and give their memory back (CUDA caches emptied)."""
        device = self.placement.device
        if self.close is not None:
            self.close()
            self.close = None
        self.model = None
        self.tokenizer = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        _return_freed_heap()


def _return_freed_heap() -> None:
    """glibc keeps freed heap pages for reuse; malloc_trim gives them back so an unload shows in the RSS."""
    import contextlib
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "libc" in name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            ctypes.CDLL(name).malloc_trim(0)


def gguf_file_for(source: Source, cfg: ModelConfig, cache_dir: Path, events: list[str]) -> tuple[Path, str | None]:
    """The GGUF file of a gguf or gguf_parts source (parts joined and verified once), and its SHA-256 when known."""
    if source.kind == "gguf_parts":
        assert cfg.gguf_sha256 is not None and cfg.gguf_size is not None
        path, joined = join_parts(cfg.name, split_parts(cfg), cfg.gguf_size, cfg.gguf_sha256, cache_dir)
        if joined["joined"]:
            events.append(f"joined and verified the GGUF parts once into {path} in {joined['join_s']:.1f} s")
        return path, cfg.gguf_sha256  # verified while joining: no need to hash the file again
    return Path(source.location), None


def checkpoint_for(
    source: Source, cfg: ModelConfig, cache_dir: Path, seed: int, events: list[str]
) -> tuple[str, dict[str, Any]]:
    """Turn a source into something from_pretrained reads, building cached folders where needed."""
    if source.kind in ("gguf", "gguf_parts"):
        path, digest = gguf_file_for(source, cfg, cache_dir, events)
        t0 = time.perf_counter()
        folder, built = materialize_gguf(path, cache_dir, digest)
        if built:
            events.append(f"dequantized the GGUF file once into {folder} in {time.perf_counter() - t0:.1f} s")
        return str(folder), {**_provenance(folder), **({"gguf_file": str(path)} if digest else {})}
    if source.kind == "random":
        assert cfg.architecture is not None
        t0 = time.perf_counter()
        folder, built = build_random_checkpoint(
            cfg.name, dict(cfg.architecture), cfg.tokenizer and dict(cfg.tokenizer), cfg.hub_id, seed, cache_dir
        )
        if built:
            events.append(f"built the random-weight checkpoint {folder} in {time.perf_counter() - t0:.1f} s")
        return str(folder), _provenance(folder)
    return source.location, {}


def _provenance(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def _read_config(checkpoint: str, cfg: ModelConfig, source: Source):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            checkpoint,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            local_files_only=source.local_files_only,
        )
    except Exception as exc:
        if source.kind == "hub":
            raise ModelLoadError(
                f"the config of {checkpoint} could not be read from the hub or its cache ({hub_cache_dir()}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                f"with no network, set HF_HUB_OFFLINE=1 and pre-download on a connected machine with "
                f"`hf download {checkpoint}`; or set model.path=<local folder>.",
            ) from exc
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{checkpoint} holds custom modelling code and trust_remote_code is off.",
                "read that code, then set model.trust_remote_code=true if you trust it.",
            ) from exc
        raise ModelLoadError(
            f"the config of {checkpoint} could not be read: {type(exc).__name__}: {exc}",
            "check that the folder is a complete transformers checkpoint.",
        ) from exc


def _is_gptq_checkpoint(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gptq"


def device_map_summary(model: Any) -> dict[str, Any]:
    """Where model.device_map put the model: its modules and parameter bytes per device."""
    placed = getattr(model, "hf_device_map", None) or {}
    modules: dict[str, int] = {}
    for device in placed.values():
        modules[str(device)] = modules.get(str(device), 0) + 1
    weights: dict[str, int] = {}
    for p in model.parameters():
        weights[str(p.device)] = weights.get(str(p.device), 0) + p.numel() * p.element_size()
    return {"devices": sorted(modules), "modules_per_device": modules, "weight_bytes_per_device": weights,
            "world_size": len(modules)}  # fmt: skip


def _from_pretrained(
    checkpoint: str,
    cfg: ModelConfig,
    source: Source,
    placement: Placement,
    attention: AttentionChoice,
    quant_config,
    tensor_parallel: int = 1,
):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": placement.torch_dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
        "local_files_only": source.local_files_only,
    }
    if tensor_parallel > 1:  # each rank loads its shards where transformers binds it
        kwargs.update(from_pretrained_args(tensor_parallel))
    else:  # device_map: accelerate spreads it over the GPUs
        kwargs["device_map"] = cfg.device_map or {"": placement.device}
    if attention.implementation is not None:
        kwargs["attn_implementation"] = attention.implementation
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    try:
        return AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except HarnessError:
        raise
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise torch.OutOfMemoryError(str(exc)) from exc
        raise ModelLoadError(
            f"the weights of {checkpoint} could not be loaded: {type(exc).__name__}: {exc}",
            "check the checkpoint files: a partial download or a mismatched config.",
        ) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(
            f"the weights of {checkpoint} could not be loaded: {type(exc).__name__}: {exc}",
            "check the checkpoint files and the quantization/attention options.",
        ) from exc


def effective_chat_format(cfg: ModelConfig, tokenizer) -> str:
    """model.chat_format with auto resolved; template without a template is refused."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_format == "template" and not has_template:
        raise ConfigError(
            f"model.chat_format=template, but the tokenizer of model '{cfg.name}' has no chat template.",
            "use model.chat_format=auto (the template where there is one, else a plain transcript), chatml or plain.",
        )
    if cfg.chat_format == "auto":
        return "template" if has_template else "plain"
    return cfg.chat_format


def load_tokenizer(checkpoint: str, cfg: ModelConfig, source: Source):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            local_files_only=source.local_files_only,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"the tokenizer of {checkpoint} could not be loaded: {type(exc).__name__}: {exc}",
            "the checkpoint folder must hold the tokenizer files (tokenizer.json or the "
            "vocabulary files) next to config.json.",
        ) from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gptq_cache_folder(checkpoint: str, quant: QuantConfig, cache_dir: Path) -> Path:
    calibration = quantization.load_calibration(quant.calibration, quant.calibration_samples)
    key = spec_digest(
        {
            "checkpoint": checkpoint,
            "bits": quant.bits,
            "group_size": quant.group_size,
            "desc_act": quant.desc_act,
            "calibration": calibration,
        }
    )
    return cache_dir / "gptq" / f"{Path(checkpoint).name}-{key[:16]}"


def _load_once(
    cfg: ModelConfig,
    quant: QuantConfig,
    attention_cfg: AttentionConfig,
    cache_dir: Path,
    seed: int,
    placement: Placement,
    events: list[str],
    tensor_parallel: int = 1,
) -> LoadedModel:
    t0 = time.perf_counter()
    source = resolve_source(cfg)
    checkpoint, provenance = checkpoint_for(source, cfg, cache_dir, seed, events)
    config = _read_config(checkpoint, cfg, source)
    if tensor_parallel > 1:
        check_split(config, tensor_parallel, cfg.name)
        placement = placement_of_rank(placement)
    attention = choose_attention(attention_cfg, model_class_for(config), placement)
    tokenizer = load_tokenizer(checkpoint, cfg, source)
    effective_chat_format(cfg, tokenizer)  # refuses template without one before the weights load
    prequantized = quant.method == "gptq" and _is_gptq_checkpoint(config)
    quant_config = quantization.quantization_config(quant, placement, tokenizer, prequantized)
    if quant.method == "gptq" and not prequantized:
        folder = _gptq_cache_folder(checkpoint, quant, cache_dir)

        def quantize(tmp: Path) -> dict[str, Any]:
            model = _from_pretrained(checkpoint, cfg, source, placement, attention, quant_config)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return {"gptq_of": checkpoint}

        folder, built = build_once(folder, quantize)
        if built:
            events.append(f"quantized with GPTQ once into {folder}")
        checkpoint = str(folder)
        source = replace(source, local_files_only=True)
        quant_config = quantization.quantization_config(quant, placement, tokenizer, prequantized=True)
        prequantized = True
    model = _from_pretrained(checkpoint, cfg, source, placement, attention, quant_config, tensor_parallel)
    model.eval()
    if cfg.device_map:
        provenance["device_map"] = device_map_summary(model)
    split = split_summary(model, tensor_parallel) if tensor_parallel > 1 else None
    try:
        footprint = int(model.get_memory_footprint())
    except Exception:
        footprint = sum(p.numel() * p.element_size() for p in model.parameters())
    from harness.bandwidth import kv_bytes_per_position

    return LoadedModel(
        name=cfg.name,
        model=model,
        tokenizer=tokenizer,
        placement=placement,
        source=source,
        checkpoint=checkpoint,
        attention=attention,
        attention_used=str(getattr(model.config, "_attn_implementation", None) or attention.implementation),
        quant=quantization.describe(quant, prequantized),
        chat_format=effective_chat_format(cfg, tokenizer),
        trust_remote_code=cfg.trust_remote_code,
        context_window=context_window_of(model.config),
        load_seconds=time.perf_counter() - t0,
        footprint_bytes=footprint,
        parameters=sum(p.numel() for p in model.parameters()),
        weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        kv_bytes_per_position=kv_bytes_per_position(model.config, model.dtype.itemsize),
        events=events,
        provenance=provenance,
        parallel=split,
    )


def load_model(
    cfg: ModelConfig,
    quant: QuantConfig | None = None,
    attention: AttentionConfig | None = None,
    cache_dir: Path | str = "~/.cache/harness",
    seed: int = 0,
    tensor_parallel: int = 1,
) -> LoadedModel:
    """Load a model as asked; a CUDA out-of-memory retries on CPU when cfg.fallback_to_cpu (recorded), unless the
    model is split over ranks (tensor_parallel > 1: this process holds its rank's shards)."""
    import torch

    quant = quant or QuantConfig()
    attention = attention or AttentionConfig()
    cache = Path(cache_dir).expanduser()
    placement = resolve_placement(cfg.device, cfg.dtype)
    events: list[str] = []
    try:
        return _load_once(cfg, quant, attention, cache, seed, placement, events, tensor_parallel)
    except torch.OutOfMemoryError as exc:
        gc.collect()
        if placement.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if placement.device.startswith("cuda") and cfg.fallback_to_cpu and tensor_parallel == 1:
            dtype, why = resolve_dtype(cfg.dtype, "cpu")
            cpu = Placement("cpu", dtype, f"{why} (after CUDA out-of-memory)")
            events.append(
                f"CUDA ran out of memory while loading ({str(exc).splitlines()[0]}); retried on CPU "
                "because model.fallback_to_cpu=true"
            )
            log.warning(events[-1])
            return _load_once(cfg, quant, attention, cache, seed, cpu, events)
        raise out_of_memory(
            exc,
            f"loading model '{cfg.name}' on {placement.device} in {placement.dtype}",
            "free memory (other processes, other loaded models), use quant=8bit or quant=4bit, a smaller "
            "dtype (model.dtype=bfloat16), or set model.fallback_to_cpu=true.",
        ) from exc
