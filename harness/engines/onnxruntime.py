"""ONNX Runtime GenAI in-process (`engine=onnxruntime`, extra `[onnx]`).

The checkpoint the transformers engine would load (a materialized GGUF, a random-weight build, a local folder, a
hub snapshot) is converted once by onnxruntime-genai's own model builder into cache_dir, keyed by the checkpoint's
files, the precision, the provider and the builder's version. Precision is the point's quantization: quant=int4
converts to int4 (MatMulNBits); quant=none converts at model.dtype's precision (fp32 on CPU; fp16 or bf16 on CUDA).
Tokens come from a pull loop over `og.Generator` (`generate_next_token`), one timestamp per token.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig
from harness.device import Placement, resolve_placement
from harness.engines.base import GenerationParams, check_scoring_window
from harness.engines.pull import PullEngine, summed_nll
from harness.errors import InferenceError, ModelLoadError
from harness.models.attention import AttentionChoice
from harness.models.cache import COMPLETE
from harness.models.loader import LoadedModel, checkpoint_for, effective_chat_format, load_tokenizer
from harness.models.onnx import activation_type, convert, import_genai
from harness.models.sources import Source, context_window_of, resolve_source

_DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _precision(cfg: HarnessConfig, placement: Placement) -> str:
    if cfg.quant.method == "onnx":
        return cfg.quant.onnx_precision
    return _DTYPE_PRECISION[placement.dtype]


def _provider(cfg: HarnessConfig, placement: Placement) -> str:
    if cfg.engine.provider != "auto":
        return cfg.engine.provider
    return "cuda" if placement.device.startswith("cuda") else "cpu"


def load_onnx_model(cfg: HarnessConfig) -> LoadedModel:
    t0 = time.perf_counter()
    og = import_genai()
    events: list[str] = []
    placement = resolve_placement(cfg.model.device, cfg.model.dtype)
    source = resolve_source(cfg.model)
    checkpoint, provenance = checkpoint_for(source, cfg.model, cfg.cache_path, cfg.seed, events)
    if source.kind == "hub":
        checkpoint = _hub_folder(checkpoint, cfg, source)
    precision, provider = _precision(cfg, placement), _provider(cfg, placement)
    folder = convert(checkpoint, precision, provider, cfg.cache_path, events)
    tokenizer = load_tokenizer(checkpoint, cfg.model, source)
    config = og.Config(str(folder))
    config.clear_providers()
    if provider != "cpu":
        config.append_provider(provider)
    if cfg.engine.threads is not None:
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {"intra_op_num_threads": cfg.engine.threads, "inter_op_num_threads": 1}
                        }
                    }
                }
            )
        )
    try:
        model = og.Model(config)
    except Exception as exc:
        raise ModelLoadError(
            f"ONNX Runtime GenAI could not load {folder}: {type(exc).__name__}: {exc}",
            f"delete {folder} to convert again; for provider={provider}, check that this onnxruntime-genai build "
            "has that execution provider.",
        ) from exc
    genai = json.loads((folder / "genai_config.json").read_text())
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=cfg.model.trust_remote_code)
    record = json.loads((folder / COMPLETE).read_text())
    compute, kv_bytes = activation_type(folder, genai)
    device = "cuda" if provider == "cuda" else "cpu"
    return LoadedModel(
        name=cfg.model.name,
        model=model,
        tokenizer=tokenizer,
        placement=Placement(device, compute, f"the ONNX graph's activations ({precision} weights for {provider})"),
        source=source,
        checkpoint=str(folder),
        attention=AttentionChoice("auto", None, "ONNX Runtime's own attention operators (GroupQueryAttention)"),
        attention_used="onnxruntime",
        quant={
            "name": cfg.quant.name,
            "method": "onnx",
            "precision": precision,
            "provider": provider,
            "backend": "onnxruntime-genai model builder",
            "version": og.__version__,
            "bits": {"int4": 4, "int8": 8}.get(precision, 16 if precision in ("fp16", "bf16") else 32),
        },
        chat_format=effective_chat_format(cfg.model, tokenizer),
        trust_remote_code=cfg.model.trust_remote_code,
        context_window=genai["model"].get("context_length") or context_window_of(hf_config),
        load_seconds=time.perf_counter() - t0,
        footprint_bytes=weights,
        parameters=_parameter_count(hf_config),
        weights_bytes=weights,
        kv_bytes_per_position=kv_bytes,
        events=events,
        provenance={
            **provenance,
            "onnx": {k: v for k, v in record.items() if k != "files"},
            "converted_from": checkpoint,
        },
    )


def _parameter_count(hf_config) -> int:
    """Parameters of the architecture (the ONNX graph holds packed int4 blocks, which do not count them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def _hub_folder(hub_id: str, cfg: HarnessConfig, source: Source) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_id, revision=cfg.model.revision, local_files_only=source.local_files_only)


class OnnxRuntimeEngine(PullEngine):
    name = "onnxruntime"
    backend = "ONNX Runtime GenAI"
    memory_fix = "lower max_new_tokens or the model size, or free memory held by other processes."
    failure_fix = "check the generation parameters and the converted model (delete its cache folder to convert again)."

    def __init__(self, loaded: LoadedModel, threads: int | None = None) -> None:
        genai = json.loads((Path(loaded.checkpoint) / "genai_config.json").read_text())
        eos = genai["model"].get("eos_token_id")
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        super().__init__(loaded, eos_ids)
        self.og = import_genai()
        self.model = loaded.model
        self.threads = threads
        self.vocab_size = int(genai["model"].get("vocab_size") or len(loaded.tokenizer))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.og.__version__,
            "onnxruntime_version": _version("onnxruntime"),
            "provider": self.loaded.quant["provider"],
            "precision": self.loaded.quant["precision"],
            "threads": self.threads or f"onnxruntime default ({os.cpu_count()} logical CPUs here)",
            "concurrency": "one request at a time (one og.Generator)",
            "timing": "host perf_counter_ns after each generate_next_token() returns its id",
            "batch": "refused above 1 (one generator per request through this engine)",
        }

    def _search_options(self, params: GenerationParams, n_prompt: int) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_length": n_prompt + params.max_new_tokens,
            "min_length": n_prompt + params.min_new_tokens,
            "do_sample": not params.greedy,
            "repetition_penalty": params.repetition_penalty,
        }
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or self.vocab_size)
            if params.seed is not None:
                options["random_seed"] = params.seed
        return options

    def _token_ids(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[int]:
        import numpy as np

        og = self.og
        gp = og.GeneratorParams(self.model)
        gp.set_search_options(**self._search_options(params, len(prompt_ids)))
        generator = og.Generator(self.model, gp)
        try:
            generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))  # the prefill
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])
        finally:
            del generator

    def token_nll(self, ids, n_scored: int) -> float:
        import numpy as np

        check_scoring_window(len(ids), n_scored, self.loaded.context_window)
        og = self.og
        gp = og.GeneratorParams(self.model)
        gp.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(self.model, gp)
        try:
            generator.append_tokens(np.asarray([list(ids)], dtype=np.int32))
            logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0]
        except Exception as exc:
            raise self.wrap_error(exc, f"scoring a window of {len(ids)} tokens") from exc
        finally:
            del generator
        if logits.shape[0] != len(ids):
            raise InferenceError(
                f"ONNX Runtime GenAI returned logits for {logits.shape[0]} positions of a {len(ids)}-token window.",
                "use engine=transformers for bench=quality with this model.",
            )
        return summed_nll(logits[-n_scored - 1 : -1], ids[-n_scored:])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the registry's entry points (harness.engines) ----------------------------------------------------------------
def load(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    return load_onnx_model(cfg)


def create(loaded: LoadedModel, cfg: HarnessConfig | None, name: str = "onnxruntime") -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(loaded, cfg.engine.threads if cfg else None)
