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

import importlib.metadata
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.config import EngineConfig, HarnessConfig
from harness.device import Placement
from harness.engines.base import GenerationParams, check_scoring_window
from harness.engines.pull import PullEngine, summed_nll
from harness.errors import ConfigError, ModelLoadError
from harness.models.attention import AttentionChoice
from harness.models.cache import file_digest
from harness.models.gguf import gguf_info, gguf_source, import_llama_cpp, requantize, tokenizer_folder
from harness.models.loader import LoadedModel, effective_chat_format, gguf_file_for, load_tokenizer


def _threads(engine: EngineConfig) -> int:
    if engine.threads is not None:
        return engine.threads
    # llama-cpp-python's own default is half the logical CPUs (1 on a 2-core machine); llama.cpp's tools use
    # every core the process may run on, which is what a user deploying llama.cpp gets.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_llamacpp_model(cfg: HarnessConfig) -> LoadedModel:
    t0 = time.perf_counter()
    llama_cpp = import_llama_cpp()
    events: list[str] = []
    source = gguf_source(cfg.model, "engine=llamacpp")
    path, digest = gguf_file_for(source, cfg.model, cfg.cache_path, events)
    digest = digest or file_digest(path)
    info = gguf_info(path, digest, cfg.cache_path)
    shipped = info["file_type"]
    if cfg.quant.gguf_type and cfg.quant.gguf_type != shipped:
        path = requantize(path, digest, cfg.quant.gguf_type, info, cfg.cache_path, events)
        info = gguf_info(path, f"{digest}-{cfg.quant.gguf_type}", cfg.cache_path)
    tokenizer = load_tokenizer(str(tokenizer_folder(path, digest, cfg.cache_path, events)), cfg.model, source)
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
    backend = "llama.cpp"
    memory_fix = "lower max_new_tokens, engine.n_ctx or the model size, or free memory held by other processes."
    failure_fix = "check the generation parameters against engine.n_ctx and n_batch; see error.log for the traceback."

    def __init__(self, loaded: LoadedModel, engine_cfg: EngineConfig) -> None:
        self.llama = loaded.model
        self.llama_cpp = import_llama_cpp()
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
            raise self.wrap_error(exc, f"scoring a window of {len(ids)} tokens") from exc
        finally:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.n_tokens = 0
        return summed_nll(np.concatenate(rows), ids[first + 1 :])


# -- the registry's entry points (harness.engines) ----------------------------------------------------------------
def load(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    return load_llamacpp_model(cfg)


def create(loaded: LoadedModel, cfg: HarnessConfig | None, name: str = "llamacpp") -> LlamaCppEngine:
    return LlamaCppEngine(loaded, cfg.engine if cfg else EngineConfig(name="llamacpp"))
