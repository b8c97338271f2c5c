"""Typed schemas of the config groups, and their validation.

Each group (conf/<group>/*.yaml) has one dataclass here. Hydra composes a point, `validate()` turns it into
these objects once (`OmegaConf.to_object`), and each `__post_init__` checks values, so a bad value fails before
any model is touched, with a ConfigError that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from harness.errors import ConfigError

GROUPS = ("model", "quant", "attention", "engine", "workflow", "bench")
# Top-level fields that change how a point runs or is shown, not what it measures: kept out of the config digest,
# the sweep id, the folder name and a point's identity.
NOT_MEASURED = ("print_text", "isolation", "force", "report", "validation")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SOURCES = ("auto", "path", "hub", "gguf", "random")
CHAT_FORMATS = ("auto", "template", "chatml", "plain")
QUANT_METHODS = ("none", "bitsandbytes", "gptq", "gguf", "onnx")
_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def engine_choices() -> tuple[str, ...]:
    """The engines: conf/engine/'s options (harness.engines.ENGINES maps each to its module)."""
    return tuple(sorted(p.stem for p in (_CONF_DIR / "engine").glob("*.yaml")))


def engine_fields(name: str) -> frozenset[str]:
    """The engine.* fields an engine reads: the keys its conf/engine/<name>.yaml declares."""
    return frozenset(OmegaConf.load(_CONF_DIR / "engine" / f"{name}.yaml").keys()) - {"name"}


HTTP_ENGINES = ("openai", "vllm")  # engines that drive a server over HTTP (launched for the point, or running)
LAUNCHES = ("none", "harness", "llamacpp_server", "vllm")  # engine.launch also takes auto
SERVE_TARGETS = ("engine", "url", "harness", "llamacpp_server", "vllm")
# Which engines run each quantization method (checked before any point runs). engine=openai runs a quantization
# through the server it launches: harness serves `<entry>:<quant>`, llama.cpp's server a GGUF file.
# ("none": every engine)
QUANT_ENGINES: dict[str, tuple[str, ...]] = {
    "bitsandbytes": ("transformers", "openai"),
    "gptq": ("transformers", "openai"),
    "gguf": ("llamacpp", "openai"),
    "onnx": ("onnxruntime",),
}
# Which launched server runs each quantization method.
QUANT_LAUNCHES = {
    "none": LAUNCHES[1:],
    "bitsandbytes": ("harness",),
    "gptq": ("harness",),
    "gguf": ("llamacpp_server",),
}
# llama.cpp types the harness requantizes to (llama.cpp's own quantize, from an F32/F16/BF16 GGUF).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1", "Q3_K_M", "Q2_K")
ONNX_PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
_QUANT_HINT = {
    "transformers": "quant=none, 8bit, 4bit or gptq",
    "llamacpp": "quant=none or gguf for the file as shipped, q8_0 or q4_k_m to requantize an F16/F32 GGUF",
    "onnxruntime": "quant=none for model.dtype's precision, int4",
    "openai": "quant=none (what the server serves), or a quantization its launched server runs",
    "vllm": "quant=none (vLLM loads the checkpoint as it is)",
}
ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flash2")


def _one_of(field_name: str, value: Any, allowed: tuple[str, ...], fix: str = "") -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{field_name}={value!r} is not valid; allowed values: {', '.join(allowed)}.{hint}",
            fix or f"set {field_name} to one of: {', '.join(allowed)}.",
        )


def _check(condition: bool, field_name: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(
            f"{field_name}={value!r} is not valid: it must be {rule}.", f"set {field_name} to a value that is {rule}."
        )


_PART_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a name: part03.bin -> 3


@dataclass(frozen=True)
class GgufPart:
    """One part of a GGUF file split across installed packages (model.gguf_parts)."""

    package: str
    file: str  # the path of the part inside the distribution, as its RECORD lists it
    size: int | None = None
    sha256: str | None = None


def parse_gguf_parts(entry: str, parts: list[dict[str, Any]], size: Any, sha256: Any) -> list[GgufPart]:
    """The entry's parts, checked: each names a package and a file, the whole has a size and a SHA-256, and the
    parts are listed in order (their numbers rise). ConfigError otherwise."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"model '{entry}': {what}.", f"fix model.gguf_parts in conf/model/{entry}.yaml.")

    if not isinstance(size, int) or size <= 0:
        raise bad("model.gguf_parts needs model.gguf_size, the joined file's size in bytes")
    if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise bad("model.gguf_parts needs model.gguf_sha256, the joined file's SHA-256 in hex")
    out = []
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or not isinstance(p.get("package"), str) or not isinstance(p.get("file"), str):
            raise bad(f"part {i + 1} must give a package and a file")
        unknown = set(p) - {"package", "file", "size", "sha256"}
        if unknown:
            raise bad(f"part {i + 1} has unknown keys {sorted(unknown)}")
        out.append(GgufPart(p["package"], p["file"], p.get("size"), p.get("sha256")))
    if not out:
        raise bad("model.gguf_parts is empty")
    numbers = [_PART_NUMBER.search(Path(p.file).name) for p in out]
    if all(numbers):
        values = [int(m.group(1)) for m in numbers if m]
        for (a, pa), (b, pb) in itertools.pairwise(zip(values, out, strict=True)):
            if b <= a:
                raise bad(
                    f"the parts are listed out of order: {pa.file} ({pa.package}) comes before {pb.file} "
                    f"({pb.package}); list them in the order they are joined"
                )
    return out


def _device_ok(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


@dataclass
class ModelConfig:
    """Where a model's weights come from and how to place them."""

    name: str = MISSING
    source: str = "auto"  # auto tries: path, hub cache, GGUF package, hub download, random weights
    path: str | None = None  # a local checkpoint folder or a .gguf file
    hub_id: str | None = None
    revision: str | None = None
    gguf_package: str | None = None  # installed distribution that ships a GGUF file
    gguf_file: str | None = None  # that file's name inside the distribution
    # A GGUF file split across installed distributions, in join order: [{package, file, size?, sha256?}, …],
    # with the joined file's size (bytes) and SHA-256; joined once into the cache and verified before use.
    gguf_parts: list[dict[str, Any]] | None = None
    gguf_size: int | None = None
    gguf_sha256: str | None = None
    random_weights: bool = False  # build `architecture` with random weights (nothing to download)
    architecture: dict[str, Any] | None = None  # the real config (model_type + fields) for random weights
    tokenizer: dict[str, Any] | None = None  # locally built tokenizer spec for random weights
    trust_remote_code: bool = False
    device: str = "auto"  # auto picks cuda > mps > cpu
    dtype: str = "auto"  # auto: bf16 on CUDA that has it, else fp16 on CUDA, fp32 on CPU
    chat_format: str = "auto"  # auto: the tokenizer's chat template if it has one, else a plain transcript
    fallback_to_cpu: bool = False  # a CUDA out-of-memory during load retries on CPU (recorded)

    def __post_init__(self) -> None:
        _one_of("model.source", self.source, SOURCES)
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.chat_format", self.chat_format, CHAT_FORMATS)
        if not _device_ok(self.device):
            raise ConfigError(
                f"model.device={self.device!r} is not valid; allowed: auto, cpu, cuda, cuda:N, mps.",
                "set model.device=auto to let the harness pick, or name a device that exists.",
            )
        if self.path is not None:
            self.path = os.path.expanduser(self.path)
        if self.random_weights and not self.architecture:
            raise ConfigError(
                f"model.random_weights=true but model '{self.name}' has no built-in architecture to build.",
                "use an entry that has one (gpt2, qwen, smollm2, tiny-*), or give model.architecture.",
            )
        if self.gguf_parts is not None:
            parse_gguf_parts(self.name, list(self.gguf_parts), self.gguf_size, self.gguf_sha256)
        if self.source == "path" and not self.path:
            raise ConfigError("model.source=path but model.path is not set.", "add model.path=<folder or .gguf>.")


@dataclass
class QuantConfig:
    name: str = "none"
    method: str = "none"  # none | bitsandbytes | gptq
    bits: int = 16
    quant_type: str = "nf4"  # bitsandbytes 4-bit: nf4 | fp4
    double_quant: bool = False  # bitsandbytes 4-bit nested quantization of the scales
    compute_dtype: str = "auto"  # bitsandbytes 4-bit matmul dtype; auto = the model's dtype
    llm_int8_threshold: float = 6.0  # bitsandbytes 8-bit outlier threshold
    group_size: int = 128  # gptq
    desc_act: bool = False  # gptq activation-order quantization
    calibration: str | None = None  # gptq: a text file, one sample per blank-line-separated block
    calibration_samples: int = 64
    gguf_type: str | None = None  # gguf: the llama.cpp type to requantize to; None = the file as shipped
    onnx_precision: str = "int4"  # onnx: the precision onnxruntime-genai's model builder converts to

    def __post_init__(self) -> None:
        _one_of("quant.method", self.method, QUANT_METHODS)
        if self.gguf_type is not None:
            self.gguf_type = str(self.gguf_type).upper()
            _one_of("quant.gguf_type", self.gguf_type, GGUF_TYPES)
        _one_of("quant.onnx_precision", self.onnx_precision, ONNX_PRECISIONS)
        _one_of("quant.quant_type", self.quant_type, ("nf4", "fp4"))
        _one_of("quant.compute_dtype", self.compute_dtype, DTYPES)
        if self.method == "bitsandbytes":
            _one_of("quant.bits", str(self.bits), ("4", "8"))
        if self.method == "gptq":
            _one_of("quant.bits", str(self.bits), ("2", "3", "4", "8"))
            _check(
                self.group_size == -1 or self.group_size > 0,
                "quant.group_size",
                self.group_size,
                "-1 or a positive integer",
            )
            _check(self.calibration_samples >= 1, "quant.calibration_samples", self.calibration_samples, ">= 1")


@dataclass
class AttentionConfig:
    name: str = "auto"
    strict: bool = False  # fail instead of falling back when the choice cannot be honoured

    def __post_init__(self) -> None:
        _one_of("attention.name", self.name, ATTENTION_CHOICES)


@dataclass
class EngineConfig:
    """The inference engine and its own knobs; each engine reads its fields (see conf/engine/*.yaml)."""

    name: str = "transformers"
    threads: int | None = None  # CPU threads (torch's pool for transformers); None = the engine's default (recorded)
    # transformers: how the decode step runs (all recorded in resolved.engine; defaults keep earlier figures)
    cache: str = "dynamic"  # dynamic (grows per token) | static (preallocated, fixed shapes: what compile needs)
    compile: bool = False  # torch.compile of the decode step, compiled during warm-up (timings.compile_s)
    compile_mode: str = "auto"  # auto: reduce-overhead (CUDA graphs) on CUDA, default elsewhere | a torch mode
    batching: str = "none"  # none: one request at a time | continuous: transformers' ContinuousBatchingManager
    max_batch_requests: int = 16  # continuous: the most requests decoded in one step
    kv_cache_tokens: int = 16384  # continuous: paged KV cache size, in tokens over all running requests
    batch_sampling: bool = False  # continuous: also serve sampled requests (per-request temperature/top-k/top-p)
    strict: bool = False  # true: an option that cannot run (compile without a compiler) fails instead of falling back
    # llamacpp
    n_ctx: int = 0  # context (KV cache) length; 0 = the model's training context
    n_batch: int = 512  # prompt tokens per llama_decode call
    flash_attn: str = "auto"  # auto | on | off
    n_gpu_layers: int = 0  # layers offloaded to a GPU (-1 = all); needs a CUDA/Metal build of llama-cpp-python
    # onnxruntime
    provider: str = "auto"  # auto (cuda when the model is placed there, else cpu) | cpu | cuda
    # openai, vllm: an OpenAI-compatible server, launched for the point or already running at base_url
    launch: str = "auto"  # auto (none with base_url, else harness) | none | harness | llamacpp_server | vllm
    base_url: str | None = None  # http://host:port/v1 of a running server (launch=none)
    api_key_env: str | None = None  # the NAME of an environment variable holding the key (never the key)
    served_model: str | None = None  # the model name the server knows; None = the entry's (with :quant)
    api: str = "chat"  # chat | completions: the endpoint chat messages go to (token-id prompts use completions)
    python: str | None = None  # vllm: that environment's python (or HARNESS_VLLM_PYTHON)
    server_args: list[str] = field(default_factory=list)  # extra command-line arguments of a launched server
    launch_timeout_s: float = 300.0  # a launched server must list its model within this
    request_timeout_s: float = 300.0  # a request's whole answer must arrive within this
    send_min_tokens: bool = True  # send min_tokens/ignore_eos to force output lengths (vLLM-style servers)
    # Token-id prompts (exact lengths) to /completions; null = yes, but not to llama.cpp's server, which takes text
    # only (prompts then go as their text, and their length is the server's usage count).
    token_prompts: bool | None = None

    def __post_init__(self) -> None:
        _one_of("engine.name", self.name, engine_choices())
        _check(self.threads is None or self.threads >= 1, "engine.threads", self.threads, "null or an integer >= 1")
        _check(self.n_ctx >= 0, "engine.n_ctx", self.n_ctx, "0 (the model's context) or a positive integer")
        _check(self.n_batch >= 1, "engine.n_batch", self.n_batch, "an integer >= 1")
        _one_of("engine.flash_attn", str(self.flash_attn).lower(), ("auto", "on", "off"))
        self.flash_attn = str(self.flash_attn).lower()
        _check(self.n_gpu_layers >= -1, "engine.n_gpu_layers", self.n_gpu_layers, "-1 (all) or an integer >= 0")
        _one_of("engine.provider", self.provider, ("auto", "cpu", "cuda"))
        self._check_transformers_options()
        _one_of("engine.launch", self.launch, ("auto", *LAUNCHES))
        if self.launch == "auto":
            self.launch = {"vllm": "vllm"}.get(self.name, "none" if self.base_url else "harness")
        _one_of("engine.api", self.api, ("chat", "completions"))
        _check(self.launch_timeout_s > 0, "engine.launch_timeout_s", self.launch_timeout_s, "> 0")
        _check(self.request_timeout_s > 0, "engine.request_timeout_s", self.request_timeout_s, "> 0")
        self.server_args = [str(a) for a in self.server_args]
        if self.base_url is not None:
            check_base_url("engine.base_url", self.base_url)
        check_key_env("engine.api_key_env", self.api_key_env)
        if self.name == "vllm" and self.launch not in ("vllm", "none"):
            raise ConfigError(
                f"engine=vllm with engine.launch={self.launch}: vLLM is launched as launch=vllm, or reached at "
                "engine.base_url with launch=none.",
                "leave engine.launch=vllm, or use engine=openai for another server.",
            )
        if self.name in HTTP_ENGINES and self.launch == "none" and not self.base_url:
            raise ConfigError(
                f"engine={self.name} with engine.launch=none needs the server's address, and engine.base_url is "
                "not set.",
                "set engine.base_url=http://host:port/v1, or engine.launch=harness|llamacpp_server|vllm to start one.",
            )
        if self.launch == "vllm":
            check_vllm_python(self.python)

    def _check_transformers_options(self) -> None:
        _one_of("engine.cache", self.cache, ("dynamic", "static"))
        _one_of("engine.compile_mode", self.compile_mode, COMPILE_MODES)
        _one_of("engine.batching", self.batching, ("none", "continuous"))
        _check(self.max_batch_requests >= 1, "engine.max_batch_requests", self.max_batch_requests, "an integer >= 1")
        _check(self.kv_cache_tokens >= 256, "engine.kv_cache_tokens", self.kv_cache_tokens, "an integer >= 256")
        changed = [
            f"engine.{k}={getattr(self, k)}"
            for k, default in (("cache", "dynamic"), ("compile", False), ("batching", "none"))
            if getattr(self, k) != default
        ]
        if changed and self.name != "transformers":
            raise ConfigError(
                f"{', '.join(changed)} applies to engine=transformers, not engine={self.name}.",
                "drop the option, or use engine=transformers (a server's own batching is set by its server_args).",
            )
        if self.compile and self.cache != "static":
            raise ConfigError(
                "engine.compile=true needs engine.cache=static: transformers compiles the decode step over a "
                "preallocated cache of fixed shape; a dynamic cache grows every token and would recompile each step.",
                "add engine.cache=static.",
            )
        if self.batch_sampling and self.batching != "continuous":
            raise ConfigError(
                "engine.batch_sampling=true configures continuous batching's manager, and engine.batching is "
                f"{self.batching}.",
                "add engine.batching=continuous, or drop engine.batch_sampling (one request at a time samples anyway).",
            )
        if self.batching == "continuous" and (self.cache != "dynamic" or self.compile):
            raise ConfigError(
                "engine.batching=continuous runs on transformers' own paged KV cache and compiles nothing: "
                f"engine.cache={self.cache} and engine.compile={self.compile} do not apply to it.",
                "leave engine.cache=dynamic and engine.compile=false with batching=continuous, or use "
                "engine.batching=none for a static or compiled decode.",
            )


COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_base_url(field_name: str, url: str) -> None:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"{field_name}={url!r} is not an http(s) URL.",
            f"set {field_name}=http://host:port/v1 (the server's OpenAI API root).",
        )


def check_vllm_python(python: str | None) -> None:
    if not (python or os.environ.get("HARNESS_VLLM_PYTHON")):
        raise ConfigError(
            "vLLM runs in its own Python environment, and neither engine.python nor HARNESS_VLLM_PYTHON names that "
            "environment's python.",
            "set engine.python=<venv>/bin/python or export HARNESS_VLLM_PYTHON (docs/serving.md has the CPU "
            "build's install steps).",
        )


def check_key_env(field_name: str, name: str | None) -> None:
    """The variable must exist: a key that is missing would turn every request into a 401."""
    if name is None:
        return
    if not str(name).replace("_", "").isalnum():
        raise ConfigError(
            f"{field_name}={name!r} is not an environment variable's name (it holds the variable's NAME, never "
            "the key itself).",
            f"export the key as e.g. MY_API_KEY and set {field_name}=MY_API_KEY.",
        )
    if not os.environ.get(name):
        raise ConfigError(
            f"{field_name}={name}, but the environment variable {name} is not set (or is empty).",
            f"export {name}=<the server's API key> before the run, or drop {field_name} for a server without keys.",
        )


WORKFLOW_CHOICES = ("none", "search_qa", "lesson_pack", "chat")


@dataclass
class WorkflowConfig:
    """What bench=e2e runs: a workflow's cases, and the knobs of each workflow (see conf/workflow/*.yaml)."""

    name: str = "none"
    cases: str | None = None  # a JSON case file; None = the built-in harness/workflows/data/<name>_cases.json
    limit: int | None = None  # run only the first N cases
    max_new_tokens: int = 128
    system_prompt: str | None = None  # None = the workflow's own
    example_turn: bool = True  # search_qa, lesson_pack: one worked exchange (on an unrelated topic) first
    corpus: str = "builtin"  # search_qa: builtin (pydoc_data.topics) or a folder of .md/.txt/.jsonl
    top_k: int = 3  # search_qa: passages given to the model
    chunk_words: int = 120  # search_qa: passage length in words
    chunk_overlap: int = 20
    min_exercises: int = 3  # lesson_pack, unless a case sets its own
    min_words: int = 150  # lesson_pack length bounds
    max_words: int = 500
    context_budget: int | None = None  # chat: prompt tokens kept; None = context window - max_new_tokens

    def __post_init__(self) -> None:
        _one_of("workflow.name", self.name, WORKFLOW_CHOICES)
        if self.cases is not None:
            self.cases = os.path.expanduser(self.cases)
        _check(self.limit is None or self.limit >= 1, "workflow.limit", self.limit, "null or an integer >= 1")
        _check(self.max_new_tokens >= 1, "workflow.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.top_k >= 1, "workflow.top_k", self.top_k, "an integer >= 1")
        _check(self.chunk_words >= 10, "workflow.chunk_words", self.chunk_words, "an integer >= 10")
        _check(
            0 <= self.chunk_overlap < self.chunk_words,
            "workflow.chunk_overlap",
            self.chunk_overlap,
            f">= 0 and below workflow.chunk_words ({self.chunk_words})",
        )
        _check(self.min_exercises >= 1, "workflow.min_exercises", self.min_exercises, "an integer >= 1")
        _check(self.min_words >= 1, "workflow.min_words", self.min_words, "an integer >= 1")
        _check(self.max_words >= self.min_words, "workflow.max_words", self.max_words, ">= workflow.min_words")
        _check(
            self.context_budget is None or self.context_budget >= 16,
            "workflow.context_budget",
            self.context_budget,
            "null or an integer >= 16",
        )


@dataclass
class ValidationConfig:
    """A release gate: the run exits non-zero when a bench=e2e point's pass rate is below min_pass_rate."""

    min_pass_rate: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.min_pass_rate is None or 0 <= self.min_pass_rate <= 1,
            "validation.min_pass_rate",
            self.min_pass_rate,
            "null or a fraction in [0, 1]",
        )


@dataclass
class SloConfig:
    """Per-request service-level objectives of bench=serve (ms); goodput counts requests meeting every one set.
    TTFT and E2E count from the scheduled send time, so queueing in the client or server counts against them."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: float | None = None  # the request's largest token ITL

    def __post_init__(self) -> None:
        for name, limit in self.limits().items():
            _check(limit > 0, f"bench.slo.{name}", limit, "null or a limit > 0 (ms)")

    def limits(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class BenchConfig:
    """One schema for every bench; each bench reads the fields it needs (see conf/bench/*.yaml)."""

    name: str = "smoke"
    system_prompt: str | None = None
    prompt: str = "In one sentence, what is a large language model?"
    max_new_tokens: int = 32  # the output length; latency/memory/throughput force it (min_new_tokens = max)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    prompt_lengths: list[int] = field(default_factory=lambda: [128])  # prompt tokens, exact
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    concurrency: list[int] = field(default_factory=lambda: [1])  # closed-loop clients
    requests_per_client: int = 4
    warmup_runs: int = 1
    min_runs: int = 3
    max_runs: int = 30
    min_seconds: float = 1.0
    target_rel_ci: float = 0.02  # stop when the 95% CI half-width of the primary metric is within 2% of its mean
    primary_metric: str = "e2e_ms"
    perplexity: bool = False  # e2e: also score perplexity and bits per byte at this point, as bench=quality does
    ppl_chars: int = 16000  # quality: characters of the built-in corpus scored (the same text for every model)
    ppl_window: int = 512  # quality: tokens per forward pass (capped at the context window)
    ppl_stride: int = 256  # quality: new tokens scored per window; the rest is context
    # serve: a load test of an OpenAI-compatible server (docs/metrics.md, "A server under load")
    target: str = "harness"  # harness | llamacpp_server | vllm (launched) | url (base_url) | engine (engine=openai's)
    base_url: str | None = None  # target=url: http://host:port/v1
    api_key_env: str | None = None  # target=url: the NAME of the variable holding the key
    api: str = "completions"  # chat | completions
    served_model: str | None = None  # target=url: the server's model name; None = the entry's
    rates: list[float] = field(default_factory=list)  # open-loop levels, requests/s
    arrival: str = "poisson"  # constant | poisson | gamma
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular
    num_requests: int = 32  # per level (open loop: the schedule's length)
    duration_s: float | None = None  # per level: stop sending after this (with num_requests: whichever first)
    ramp_up_s: float = 0.0  # open: the rate rises linearly over it; closed: clients start spread over it
    max_concurrency: int | None = None  # open loop: at most this many in flight (a held send counts as lateness)
    request_timeout_s: float = 120.0
    slo: SloConfig = field(default_factory=lambda: SloConfig())  # bench.slo={ttft_ms:500,tpot_ms:50}
    search: str = "none"  # none | max_rate: bisect for the highest rate whose goodput >= goodput_target × rate
    goodput_target: float = 0.9  # max_rate: the share of scheduled requests that must meet every SLO
    search_steps: int = 6  # levels the max_rate search may run
    search_level_s: float = 20.0  # a search level offers at least this many seconds of load (short bursts are absorbed)
    saturation_backlog: int | None = 64  # open loop: a level stops when more are in flight (the server fell behind)
    client_workers: int = 1  # client processes sharing the load
    calibrate: bool = True  # measure the client's ceiling against a local null server (cached per machine)
    scrape_metrics: bool = True  # the server's Prometheus /metrics before and after each level, deltas kept
    workload: str = "synthetic"  # synthetic (exact token lengths) | shared_prefix | search_qa | multi_turn
    length_dist: str = "fixed"  # synthetic prompt lengths around prompt_lengths[0]: fixed | uniform | normal
    length_spread: float = 0.25  # uniform: ±spread × length; normal: sd = spread × length
    prefix_tokens: int = 256  # shared_prefix: tokens every prompt starts with
    turns: int = 3  # multi_turn: user turns per session (each turn carries the whole conversation)

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "bench.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature >= 0, "bench.temperature", self.temperature, ">= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, "bench.top_p", self.top_p, "in (0, 1]")
        _check(self.top_k >= 0, "bench.top_k", self.top_k, ">= 0 (0 disables top-k)")
        _check(self.repetition_penalty > 0, "bench.repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("prompt_lengths", "batch_sizes", "concurrency"):
            values = list(getattr(self, name))
            _check(
                bool(values) and all(isinstance(v, int) and v >= 1 for v in values),
                f"bench.{name}",
                values,
                "a non-empty list of integers >= 1",
            )
        _check(self.requests_per_client >= 1, "bench.requests_per_client", self.requests_per_client, ">= 1")
        _check(self.warmup_runs >= 0, "bench.warmup_runs", self.warmup_runs, ">= 0")
        _check(self.min_runs >= 1, "bench.min_runs", self.min_runs, ">= 1")
        _check(self.max_runs >= self.min_runs, "bench.max_runs", self.max_runs, f">= bench.min_runs ({self.min_runs})")
        _check(self.min_seconds >= 0, "bench.min_seconds", self.min_seconds, ">= 0")
        _check(0 < self.target_rel_ci < 1, "bench.target_rel_ci", self.target_rel_ci, "in (0, 1)")
        _one_of("bench.primary_metric", self.primary_metric, ("e2e_ms", "ttft_ms", "tpot_ms"))
        _check(self.ppl_chars >= 100, "bench.ppl_chars", self.ppl_chars, "an integer >= 100")
        _check(self.ppl_window >= 2, "bench.ppl_window", self.ppl_window, "an integer >= 2")
        self._check_serve()
        _check(
            1 <= self.ppl_stride <= self.ppl_window - 1,
            "bench.ppl_stride",
            self.ppl_stride,
            f"between 1 and bench.ppl_window - 1 ({self.ppl_window - 1})",
        )

    def _check_serve(self) -> None:
        _one_of("bench.target", self.target, SERVE_TARGETS)
        _one_of("bench.api", self.api, ("chat", "completions"))
        _one_of("bench.arrival", self.arrival, ("constant", "poisson", "gamma"))
        _one_of("bench.search", self.search, ("none", "max_rate"))
        _one_of("bench.workload", self.workload, ("synthetic", "shared_prefix", "search_qa", "multi_turn"))
        _one_of("bench.length_dist", self.length_dist, ("fixed", "uniform", "normal"))
        rates = list(self.rates)
        _check(
            all(isinstance(r, int | float) and r > 0 for r in rates),
            "bench.rates",
            rates,
            "a list of rates > 0 (req/s)",
        )
        self.rates = [float(r) for r in rates]
        _check(self.burstiness > 0, "bench.burstiness", self.burstiness, "> 0 (1 = Poisson)")
        _check(self.num_requests >= 1, "bench.num_requests", self.num_requests, "an integer >= 1")
        _check(self.duration_s is None or self.duration_s > 0, "bench.duration_s", self.duration_s, "null or > 0")
        _check(self.ramp_up_s >= 0, "bench.ramp_up_s", self.ramp_up_s, ">= 0")
        _check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            "bench.max_concurrency",
            self.max_concurrency,
            "null or an integer >= 1",
        )
        _check(self.request_timeout_s > 0, "bench.request_timeout_s", self.request_timeout_s, "> 0")
        _check(0 < self.goodput_target <= 1, "bench.goodput_target", self.goodput_target, "in (0, 1]")
        _check(self.search_steps >= 2, "bench.search_steps", self.search_steps, "an integer >= 2")
        _check(self.search_level_s > 0, "bench.search_level_s", self.search_level_s, "> 0")
        _check(
            self.saturation_backlog is None or self.saturation_backlog >= 1,
            "bench.saturation_backlog",
            self.saturation_backlog,
            "null or an integer >= 1",
        )
        _check(1 <= self.client_workers <= 64, "bench.client_workers", self.client_workers, "between 1 and 64")
        _check(self.length_spread >= 0, "bench.length_spread", self.length_spread, ">= 0")
        _check(self.prefix_tokens >= 1, "bench.prefix_tokens", self.prefix_tokens, "an integer >= 1")
        _check(self.turns >= 1, "bench.turns", self.turns, "an integer >= 1")
        if self.name != "serve":
            return
        if self.search == "max_rate" and not self.slo.limits():
            raise ConfigError(
                "bench.search=max_rate looks for the highest rate whose goodput meets the SLOs; bench.slo is empty.",
                "set bench.slo, e.g. bench.slo={ttft_ms:1000,tpot_ms:100}.",
            )
        if self.target == "url" and not self.base_url:
            raise ConfigError(
                "bench.target=url needs the server's address, and bench.base_url is not set.",
                "set bench.base_url=http://host:port/v1, or bench.target=harness|llamacpp_server|vllm to launch one.",
            )
        for name in ("base_url", "api_key_env", "served_model"):
            if getattr(self, name) is not None and self.target != "url":
                # the point would load-test another server (a launched one) and report it as this one
                raise ConfigError(
                    f"bench.{name} names a running server's {name.replace('_', ' ')}, and bench.target={self.target} "
                    "does not load a running server, so it would be ignored.",
                    f"add bench.target=url to load-test that server, or drop bench.{name}.",
                )
        if self.base_url is not None:
            check_base_url("bench.base_url", self.base_url)
        check_key_env("bench.api_key_env", self.api_key_env)


@dataclass
class HarnessConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0
    cache_dir: str = "~/.cache/harness"  # materialized GGUF and random-weight checkpoints, quantized models
    print_text: bool = True
    # process: each point in a process of its own (clean memory, crash isolation), forked from a server that has
    # imported torch once | spawn: a fresh interpreter per point | inline: in the sweep's process
    isolation: str = "process"
    force: bool = False  # redo points whose result.json already says ok
    point_memory_limit_mb: int | None = None  # address space a point's process may add after start-up (MiB)
    report: bool = True  # after a sweep, write summary.csv/.md, plots and report.html into its folder

    def __post_init__(self) -> None:
        self.cache_dir = os.path.expanduser(os.environ.get("HARNESS_CACHE_DIR") or self.cache_dir)
        _one_of("isolation", self.isolation, ("process", "spawn", "inline"))
        if self.point_memory_limit_mb is not None:
            _check(self.point_memory_limit_mb >= 64, "point_memory_limit_mb", self.point_memory_limit_mb, ">= 64")
        self._check_engine_fits()

    def _check_engine_fits(self) -> None:
        """Quantization, attention and dtype choices that only some engines run are refused before any work."""
        engine, method = self.engine.name, self.quant.method
        if method != "none" and engine not in QUANT_ENGINES[method]:
            runs_here = ["none", *sorted(m for m, engines in QUANT_ENGINES.items() if engine in engines)]
            raise ConfigError(
                f"quant={self.quant.name} (method {method}) runs only on engine={'|'.join(QUANT_ENGINES[method])}, "
                f"not on engine={engine}, which runs the quantization methods: {', '.join(runs_here)}.",
                f"pick a quantization engine={engine} runs ({_QUANT_HINT.get(engine, 'quant=none')}), or a matching "
                "engine; a sweep over both axes must be split into one command per engine.",
            )
        if engine != "transformers" and self.attention.name != "auto":
            raise ConfigError(
                f"attention={self.attention.name} picks a transformers attention kernel; engine={engine} has its own.",
                "leave attention=auto"
                + ("; llama.cpp's flash attention is engine.flash_attn=auto|on|off." if engine == "llamacpp" else "."),
            )
        self._check_server_fits()
        if engine == "llamacpp" and self.model.dtype != "auto":
            raise ConfigError(
                f"model.dtype={self.model.dtype} does not apply to engine=llamacpp: it computes in the GGUF's own "
                "tensor types.",
                "leave model.dtype=auto, and requantize with quant=q8_0 or q4_k_m (or quant.gguf_type=F16).",
            )

    def _check_server_fits(self) -> None:
        """bench=serve's target and the engine agree; a launched server runs the point's quantization."""
        engine, bench = self.engine.name, self.bench
        if bench.name == "serve":
            if bench.target == "engine" and engine not in HTTP_ENGINES:
                raise ConfigError(
                    f"bench=serve with bench.target=engine measures engine=openai|vllm's server, and engine={engine} "
                    "runs in this process.",
                    "set bench.target=harness|llamacpp_server|vllm|url, or engine=openai with its launch or base_url.",
                )
            if bench.target != "engine" and engine != "transformers":
                raise ConfigError(
                    f"bench=serve with bench.target={bench.target} names its own server, and engine={engine} "
                    "names another.",
                    f"drop engine={engine} (the target's server runs its own engine), or set bench.target=engine.",
                )
        launch = self.server_launch()
        if launch is None:
            return
        if bench.name in ("memory", "quality"):
            why = {
                "memory": "measures the memory of this process, and the model lives in the server's",
                "quality": "scores text with the model's logits, which an OpenAI-compatible stream does not give",
            }[bench.name]
            raise ConfigError(
                f"bench={bench.name} {why}; engine={engine} reaches the model over HTTP.",
                f"run bench={bench.name} on an in-process engine (transformers, llamacpp, onnxruntime); for a "
                "server, bench=serve reports its load behaviour and scrapes its /metrics.",
            )
        if launch == "vllm":
            check_vllm_python(self.engine.python)
        method = self.quant.method
        if launch == "none" and method != "none":
            raise ConfigError(
                f"quant={self.quant.name} cannot be applied to a server that is already running: it serves what it "
                "loaded.",
                "leave quant=none and name the quantized model in served_model, or launch the server for the point.",
            )
        if launch != "none" and launch not in QUANT_LAUNCHES.get(method, ()):
            raise ConfigError(
                f"quant={self.quant.name} (method {method}) is not run by a launched {launch} server.",
                f"use a launch that runs it ({', '.join(QUANT_LAUNCHES.get(method, ())) or 'none'}), or quant=none.",
            )

    def server_launch(self) -> str | None:
        """The server this point launches (none: it uses a running one); None when it runs no server."""
        if self.bench.name == "serve" and self.bench.target != "engine":
            return "none" if self.bench.target == "url" else self.bench.target
        if self.engine.name in HTTP_ENGINES:
            return self.engine.launch
        return None

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {'bench.max_new_tokens': 32, …}; lists and scalars are leaves."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def register_schemas() -> None:
    """Make the schema known to Hydra as `harness_schema` (conf/config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="harness_schema", node=HarnessConfig)
    # A point's folder is named by its overrides; a path among them (workflow.cases=tests/x.json) must not
    # become nested folders, where two points would share a folder name. "/" is written as "%2F".
    OmegaConf.register_new_resolver("folder_name", lambda text: str(text).replace("/", "%2F"), replace=True)


def validate(cfg: DictConfig | HarnessConfig) -> HarnessConfig:
    """Turn a composed config into typed objects, running every check; raises ConfigError."""
    if isinstance(cfg, HarnessConfig):
        return cfg
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    structured = OmegaConf.merge(OmegaConf.structured(HarnessConfig), cfg)
    obj = OmegaConf.to_object(structured)
    assert isinstance(obj, HarnessConfig)
    return obj


_COMPOSE_LOCK = threading.Lock()  # Hydra's compose API is process-global state: one composition at a time


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """conf/config.yaml with overrides, composed as `python -m harness` composes a point, outside a Hydra run
    (the CLI's info, the server, the tests); thread-safe."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with _COMPOSE_LOCK, initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", list(overrides), return_hydra_config=with_hydra)


def load_config(overrides: list[str]) -> HarnessConfig:
    """The validated config of one point given by overrides; ConfigError on a bad value."""
    return validate(compose_config(overrides))


def conf_dir() -> Path:
    """The conf/ folder beside the packages (the project is installed editable, or run from its root)."""
    return _CONF_DIR


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def check_group_choices(overrides: list[str]) -> None:
    """Check `group=option[,option…]` overrides against conf/ before Hydra composes anything.

    Hydra's own message lists the options but does not guess; ours names the closest one.
    """
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key not in (*GROUPS, "experiment") or any(c in value for c in "()[]{}*"):
            continue
        options = group_options(key)
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice not in options:
                close = difflib.get_close_matches(choice, options, n=1)
                guess = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"{key}={choice!r} is not a known {key} option; the options are: {', '.join(options)}.{guess}",
                    f"pick one of those, or add conf/{key}/{choice}.yaml.",
                )
