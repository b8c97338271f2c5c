"""llama.cpp in-process through llama-cpp-python (`engine=llamacpp`, extra `[llamacpp]`).

A GGUF file runs as it is, never dequantized: the model entry's GGUF (a package's file, or parts joined once) or
`model.path=<file>.gguf`. quant=none or gguf keeps the file's tensor types; quant=q8_0 / q4_k_m (any
`quant.gguf_type`) requantizes an F32/F16/BF16 file once with llama.cpp's own quantize, cached by the file's
SHA-256. The result records the tensor types actually run.

Each request clears the KV cache first, so no request reuses another's prompt (llama-cpp-python would otherwise
skip the shared prefix and report a prefill it never ran). Decoding is llama.cpp's eval + sampler chain, driven
token by token from Python, so every token has its own timestamp.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.metadata
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.config import EngineConfig, HarnessConfig
from harness.device import Placement
from harness.engines.base import GenerationParams, check_scoring_window
from harness.engines.pull import PullEngine, out_of_memory, summed_nll
from harness.errors import ConfigError, InferenceError, ModelLoadError
from harness.models.attention import AttentionChoice
from harness.models.cache import build_once, file_digest, is_complete
from harness.models.gguf import check_gguf
from harness.models.loader import LoadedModel, effective_chat_format, gguf_file_for, load_tokenizer
from harness.models.sources import Source, resolve_source

INSTALL = (
    'pip install -e ".[llamacpp]" (llama-cpp-python builds llama.cpp from source: about 4-8 minutes on 2 cores; '
    'CMAKE_ARGS="-DGGML_CUDA=on" for a CUDA build)'
)
# GGUF types a weight may be requantized from without stacking one quantization's error on another's.
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def _import_llama():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"engine=llamacpp needs llama-cpp-python, which is not installed ({exc}).", f"install it: {INSTALL}."
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


def _gguf_source(cfg: HarnessConfig) -> Source:
    model = cfg.model
    not_gguf = ConfigError(
        f"engine=llamacpp runs GGUF files, and model '{model.name}' "
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


def _tokenizer_folder(path: Path, digest: str, cache_dir: Path, events: list[str]) -> Path:
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
    llama_cpp = _import_llama()
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


def _threads(engine: EngineConfig) -> int:
    if engine.threads is not None:
        return engine.threads
    # llama-cpp-python's own default is half the logical CPUs (1 on a 2-core machine); llama.cpp's tools use
    # every core the process may run on, which is what a user deploying llama.cpp gets.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_llamacpp_model(cfg: HarnessConfig) -> LoadedModel:
    t0 = time.perf_counter()
    llama_cpp = _import_llama()
    events: list[str] = []
    source = _gguf_source(cfg)
    path, digest = gguf_file_for(source, cfg.model, cfg.cache_path, events)
    digest = digest or file_digest(path)
    info = gguf_info(path, digest, cfg.cache_path)
    shipped = info["file_type"]
    if cfg.quant.gguf_type and cfg.quant.gguf_type != shipped:
        path = requantize(path, digest, cfg.quant.gguf_type, info, cfg.cache_path, events)
        info = gguf_info(path, f"{digest}-{cfg.quant.gguf_type}", cfg.cache_path)
    tokenizer = load_tokenizer(str(_tokenizer_folder(path, digest, cfg.cache_path, events)), cfg.model, source)
    engine = cfg.engine
    flash = engine.flash_attn == "on" or (engine.flash_attn == "auto" and engine.n_gpu_layers != 0)
    if engine.n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        raise ConfigError(
            f"engine.n_gpu_layers={engine.n_gpu_layers}, but this llama-cpp-python build has no GPU offload.",
            'reinstall it with CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
            "llama-cpp-python, or set engine.n_gpu_layers=0.",
        )
    threads = _threads(engine)
    try:
        model = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=engine.n_ctx,
            n_batch=engine.n_batch,
            n_ubatch=engine.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=engine.n_gpu_layers,
            flash_attn=flash,
            seed=cfg.seed,
            verbose=False,
        )
    except ValueError as exc:  # llama-cpp-python raises ValueError for a model or context it cannot create
        raise ModelLoadError(
            f"llama.cpp could not load {path}: {exc}.",
            "check that the file is a complete GGUF of an architecture this llama.cpp build knows; a large n_ctx "
            "may not fit in memory (engine.n_ctx).",
        ) from exc
    kv_bytes = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * 2  # K and V, f16 (llama.cpp's default)
    placement = Placement(
        "cpu" if engine.n_gpu_layers == 0 else "cuda",
        info["file_type"] or "gguf",
        "the GGUF's own tensor types",
    )
    quant = {
        "name": cfg.quant.name,
        "method": "gguf",
        "backend": "llama.cpp",
        "version": importlib.metadata.version("llama-cpp-python"),
        "shipped_file_type": shipped,
        "file_type": info["file_type"],
        "requantized": bool(cfg.quant.gguf_type and cfg.quant.gguf_type != shipped),
        "tensor_types": info["tensor_types"],
        "weight_types": info["weight_types"],
        "bits": info["bits_per_weight"],
        "bits_per_weight": info["bits_per_weight"],
    }
    return LoadedModel(
        name=cfg.model.name,
        model=model,
        tokenizer=tokenizer,
        placement=placement,
        source=source,
        checkpoint=str(path),
        attention=AttentionChoice("auto", None, f"llama.cpp attention, flash attention {'on' if flash else 'off'}"),
        attention_used="llama.cpp flash" if flash else "llama.cpp",
        quant=quant,
        chat_format=effective_chat_format(cfg.model, tokenizer),
        trust_remote_code=False,
        context_window=model.n_ctx(),
        load_seconds=time.perf_counter() - t0,
        footprint_bytes=int(model._model.size()) if hasattr(model._model, "size") else info["tensor_bytes"],
        parameters=info["parameters"],
        weights_bytes=info["tensor_bytes"],
        kv_bytes_per_position=kv_bytes,
        events=events,
        provenance={"gguf_file": str(path), "sha256": digest},
        close=model.close,
    )


class LlamaCppEngine(PullEngine):
    name = "llamacpp"

    def __init__(self, loaded: LoadedModel, engine_cfg: EngineConfig) -> None:
        self.llama = loaded.model
        self.llama_cpp = _import_llama()
        eos = {int(self.llama.token_eos())}
        vocab = self.llama._model.vocab
        eot = self.llama_cpp.llama_vocab_eot(vocab)
        if eot >= 0:
            eos.add(int(eot))
        if loaded.tokenizer.eos_token_id is not None:
            eos.add(int(loaded.tokenizer.eos_token_id))
        super().__init__(loaded, eos)
        self.engine_cfg = engine_cfg
        self.threads = _threads(engine_cfg)
        self.n_vocab = int(self.llama.n_vocab())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": importlib.metadata.version("llama-cpp-python"),
            "threads": self.threads,
            "n_ctx": self.llama.n_ctx(),
            "n_batch": self.engine_cfg.n_batch,
            "n_gpu_layers": self.engine_cfg.n_gpu_layers,
            "flash_attn": self.loaded.attention_used.endswith("flash"),
            "kv_cache_type": "f16",
            "concurrency": "one request at a time (one llama.cpp context)",
            "timing": "host perf_counter_ns after llama.cpp's sampler returns each token id",
            "prompt_cache": "off: the KV cache is cleared before each request",
            "batch": "refused above 1 (one sequence per context through this engine)",
            "system_info": self.llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }

    def _sampler(self, params: GenerationParams, block_eos: bool):
        from llama_cpp import _internals

        sampler = _internals.LlamaSampler()
        if block_eos:
            sampler.add_logit_bias(self.n_vocab, {e: float("-inf") for e in self.eos_ids if 0 <= e < self.n_vocab})
        if params.repetition_penalty != 1.0:
            sampler.add_penalties(self.n_vocab, 64, params.repetition_penalty, 0.0, 0.0)
        if params.greedy:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k or self.n_vocab)
            sampler.add_top_p(params.top_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(params.seed if params.seed is not None else 0xFFFFFFFF)
        return sampler

    def _token_ids(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[int]:
        llm = self.llama
        # Until min_new_tokens, a second chain that cannot pick an end-of-sequence id (llama.cpp's logit bias,
        # in C: no per-token Python callback); both chains see every token so repetition penalties agree.
        free = self._sampler(params, block_eos=False)
        forced = self._sampler(params, block_eos=True) if params.min_new_tokens > 0 else None
        llm.reset()  # n_tokens = 0: eval() below drops the whole KV cache
        llm.eval(prompt_ids)  # the prefill
        n = 0
        while True:
            sampler = forced if forced is not None and n < params.min_new_tokens else free
            token = sampler.sample(llm._ctx, -1)
            for chain in (free, forced):
                if chain is not None:
                    chain.accept(token)
            n += 1
            yield token
            llm.eval([token])

    def token_nll(self, ids: Sequence[int], n_scored: int) -> float:
        import numpy as np

        llm = self.llama
        check_scoring_window(
            len(ids), n_scored, llm.n_ctx(), f"set bench.ppl_window to at most {llm.n_ctx()}, or raise engine.n_ctx."
        )
        ids = list(ids)
        first = len(ids) - n_scored - 1  # the position that predicts the first scored token
        rows: list[np.ndarray] = []
        try:
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            for begin in range(0, len(ids), llm.n_batch):
                chunk = ids[begin : begin + llm.n_batch]
                llm._batch.set_batch(batch=chunk, n_past=begin, logits_all=True)  # logits at every position
                llm._ctx.decode(llm._batch)
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), self.n_vocab))
                lo, hi = max(first, begin), min(len(ids) - 1, begin + len(chunk))
                if lo < hi:
                    rows.append(np.array(logits[lo - begin : hi - begin], dtype=np.float64))
        except Exception as exc:
            raise self._wrap_error(exc, f"scoring a window of {len(ids)} tokens") from exc
        finally:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.n_tokens = 0
        return summed_nll(np.concatenate(rows), ids[first + 1 :])

    def _wrap_error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, InferenceError):
            return exc
        if isinstance(exc, MemoryError):
            return out_of_memory(exc, what)
        return InferenceError(
            f"{what} failed in llama.cpp: {type(exc).__name__}: {exc}",
            "check the generation parameters against engine.n_ctx and n_batch; see error.log for the traceback.",
        )
