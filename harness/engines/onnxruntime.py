"""ONNX Runtime GenAI in-process (`engine=onnxruntime`, extra `[onnx]`).

The checkpoint the transformers engine would load (a materialized GGUF, a random-weight build, a local folder, a
hub snapshot) is converted once by onnxruntime-genai's own model builder into cache_dir, keyed by the checkpoint's
files, the precision, the provider and the builder's version. Precision is the point's quantization: quant=int4
converts to int4 (MatMulNBits); quant=none converts at model.dtype's precision (fp32 on CPU; fp16 or bf16 on CUDA).
Tokens come from a pull loop over `og.Generator` (`generate_next_token`), one timestamp per token.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig
from harness.device import Placement, resolve_placement
from harness.engines.base import GenerationParams, check_scoring_window
from harness.engines.pull import PullEngine, out_of_memory, summed_nll
from harness.errors import ConfigError, InferenceError, ModelLoadError
from harness.models.attention import AttentionChoice
from harness.models.cache import COMPLETE, build_once, spec_digest
from harness.models.loader import LoadedModel, checkpoint_for, effective_chat_format, load_tokenizer
from harness.models.sources import Source, context_window_of, resolve_source

INSTALL = 'pip install -e ".[onnx]" (onnxruntime-genai, onnx, onnx-ir: about 1.5 minutes)'
# The files a converted model must hold; a cache folder missing one, or with one of another size, is rebuilt.
_REQUIRED = ("genai_config.json", "model.onnx")
_DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# The ONNX tensor types a KV cache (and so the activations) is held in: name and bytes per element.
_ONNX_ELEM = {1: ("float32", 4), 10: ("float16", 2), 16: ("bfloat16", 2)}


def _import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ConfigError(
            f"engine=onnxruntime needs onnxruntime-genai, which is not installed ({exc}).", f"install it: {INSTALL}."
        ) from exc
    return og


def supported_architectures() -> list[str]:
    """The architectures the installed model builder converts, read from its source (it keeps no list)."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return []
    text = Path(spec.origin).read_text(errors="replace")
    return sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', text)))


def _precision(cfg: HarnessConfig, placement: Placement) -> str:
    if cfg.quant.method == "onnx":
        return cfg.quant.onnx_precision
    return _DTYPE_PRECISION[placement.dtype]


def _provider(cfg: HarnessConfig, placement: Placement) -> str:
    if cfg.engine.provider != "auto":
        return cfg.engine.provider
    return "cuda" if placement.device.startswith("cuda") else "cpu"


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
    og = _import_genai()
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


def _activation_type(folder: Path, genai: dict[str, Any]) -> tuple[str, int]:
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


def load_onnx_model(cfg: HarnessConfig) -> LoadedModel:
    t0 = time.perf_counter()
    og = _import_genai()
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
    compute, kv_bytes = _activation_type(folder, genai)
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

    def __init__(self, loaded: LoadedModel, threads: int | None = None) -> None:
        genai = json.loads((Path(loaded.checkpoint) / "genai_config.json").read_text())
        eos = genai["model"].get("eos_token_id")
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        super().__init__(loaded, eos_ids)
        self.og = _import_genai()
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
            raise self._wrap_error(exc, f"scoring a window of {len(ids)} tokens") from exc
        finally:
            del generator
        if logits.shape[0] != len(ids):
            raise InferenceError(
                f"ONNX Runtime GenAI returned logits for {logits.shape[0]} positions of a {len(ids)}-token window.",
                "use engine=transformers for bench=quality with this model.",
            )
        return summed_nll(logits[-n_scored - 1 : -1], ids[-n_scored:])

    def _wrap_error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, InferenceError):
            return exc
        if isinstance(exc, MemoryError) or "bad_alloc" in str(exc) or "Failed to allocate" in str(exc):
            return out_of_memory(exc, what)
        return InferenceError(
            f"{what} failed in ONNX Runtime GenAI: {type(exc).__name__}: {exc}",
            "check the generation parameters and the converted model (delete its cache folder to convert again).",
        )


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
