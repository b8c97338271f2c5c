"""The schemas of the small groups: model, quant, attention, workflow, and the validation gate."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from harness.config.checks import check, device_ok, one_of
from harness.config.options import (
    ATTENTION_CHOICES,
    CHAT_FORMATS,
    DTYPES,
    GGUF_TYPES,
    ONNX_PRECISIONS,
    QUANT_METHODS,
    SOURCES,
    WORKFLOW_CHOICES,
)
from harness.errors import ConfigError

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
    # transformers across GPUs: accelerate's placement of the layers over every visible GPU (auto, balanced,
    # balanced_low_0, sequential); null: the whole model on model.device. Needs at least 2 GPUs.
    device_map: str | None = None

    def __post_init__(self) -> None:
        one_of("model.source", self.source, SOURCES)
        one_of("model.dtype", self.dtype, DTYPES)
        one_of("model.chat_format", self.chat_format, CHAT_FORMATS)
        if not device_ok(self.device):
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
        if self.device_map is not None:
            one_of("model.device_map", self.device_map, ("auto", "balanced", "balanced_low_0", "sequential"))


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
        one_of("quant.method", self.method, QUANT_METHODS)
        if self.gguf_type is not None:
            self.gguf_type = str(self.gguf_type).upper()
            one_of("quant.gguf_type", self.gguf_type, GGUF_TYPES)
        one_of("quant.onnx_precision", self.onnx_precision, ONNX_PRECISIONS)
        one_of("quant.quant_type", self.quant_type, ("nf4", "fp4"))
        one_of("quant.compute_dtype", self.compute_dtype, DTYPES)
        if self.method == "bitsandbytes":
            one_of("quant.bits", str(self.bits), ("4", "8"))
        if self.method == "gptq":
            one_of("quant.bits", str(self.bits), ("2", "3", "4", "8"))
            check(
                self.group_size == -1 or self.group_size > 0,
                "quant.group_size",
                self.group_size,
                "-1 or a positive integer",
            )
            check(self.calibration_samples >= 1, "quant.calibration_samples", self.calibration_samples, ">= 1")


@dataclass
class AttentionConfig:
    name: str = "auto"
    strict: bool = False  # fail instead of falling back when the choice cannot be honoured

    def __post_init__(self) -> None:
        one_of("attention.name", self.name, ATTENTION_CHOICES)


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
        one_of("workflow.name", self.name, WORKFLOW_CHOICES)
        if self.cases is not None:
            self.cases = os.path.expanduser(self.cases)
        check(self.limit is None or self.limit >= 1, "workflow.limit", self.limit, "null or an integer >= 1")
        check(self.max_new_tokens >= 1, "workflow.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.top_k >= 1, "workflow.top_k", self.top_k, "an integer >= 1")
        check(self.chunk_words >= 10, "workflow.chunk_words", self.chunk_words, "an integer >= 10")
        check(
            0 <= self.chunk_overlap < self.chunk_words,
            "workflow.chunk_overlap",
            self.chunk_overlap,
            f">= 0 and below workflow.chunk_words ({self.chunk_words})",
        )
        check(self.min_exercises >= 1, "workflow.min_exercises", self.min_exercises, "an integer >= 1")
        check(self.min_words >= 1, "workflow.min_words", self.min_words, "an integer >= 1")
        check(self.max_words >= self.min_words, "workflow.max_words", self.max_words, ">= workflow.min_words")
        check(
            self.context_budget is None or self.context_budget >= 16,
            "workflow.context_budget",
            self.context_budget,
            "null or an integer >= 16",
        )


@dataclass
class TelemetryConfig:
    """OpenTelemetry: each point's trace (a span per serve level and per request) sent over OTLP/HTTP to
    otlp_endpoint after the point has finished (harness.tracing), so exporting never disturbs a measurement."""

    otlp_endpoint: str | None = None  # http(s)://host:port of an OTLP/HTTP receiver (traces go to /v1/traces)
    service_name: str = "harness"

    def __post_init__(self) -> None:
        if self.otlp_endpoint is not None:
            check(
                bool(re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.otlp_endpoint)),
                "telemetry.otlp_endpoint",
                self.otlp_endpoint,
                "an http(s)://host:port URL of an OTLP/HTTP receiver, or null",
            )


@dataclass
class ValidationConfig:
    """A release gate: the run exits non-zero when a bench=e2e point's pass rate is below min_pass_rate."""

    min_pass_rate: float | None = None

    def __post_init__(self) -> None:
        check(
            self.min_pass_rate is None or 0 <= self.min_pass_rate <= 1,
            "validation.min_pass_rate",
            self.min_pass_rate,
            "null or a fraction in [0, 1]",
        )


@dataclass
class CostConfig:
    """The price of what a point ran on, turned into a price per million tokens and per thousand correct
    answers (harness.cost): per hour, in a currency, for the machine or for each GPU it used."""

    per_hour: float | None = None
    currency: str | None = None  # ISO 4217: USD, EUR, ...
    per: str = "machine"  # machine | gpu

    def __post_init__(self) -> None:
        one_of("cost.per", self.per, ("machine", "gpu"))
        if self.per_hour is None:
            return
        check(self.per_hour > 0, "cost.per_hour", self.per_hour, "a price > 0 per hour")
        if not self.currency:
            raise ConfigError(
                f"cost.per_hour={self.per_hour:g} has no currency: a price without one cannot be compared.",
                "add cost.currency=USD (or another ISO 4217 code).",
            )
        check(
            len(self.currency) == 3 and self.currency.isalpha() and self.currency.isupper(),
            "cost.currency",
            self.currency,
            "a three-letter ISO 4217 code such as USD or EUR",
        )
