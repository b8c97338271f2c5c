"""What every bench shares: its context and output, the adaptive stop rule, exact-length prompts, per-request
metrics from token timestamps (the definitions of docs/metrics.md), and raw samples."""

from __future__ import annotations

import csv
import io
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import BenchConfig, HarnessConfig
from harness.engines import Engine, GenerationParams
from harness.engines.base import TokenPrompt
from harness.errors import InferenceError
from harness.stats import summarize
from harness.workflows import Workflow

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel

# request metric (seconds or tok/s) -> (reported name, unit, scale)
REQUEST_UNITS = {
    "ttft_s": ("ttft_ms", "ms", 1e3),
    "e2e_s": ("e2e_ms", "ms", 1e3),
    "tpot_s": ("tpot_ms", "ms", 1e3),
    "decode_tok_s": ("decode_tok_s", "tok/s", 1.0),
    "prefill_tok_s": ("prefill_tok_s", "tok/s", 1.0),
}

SAMPLE_COLUMNS = ("bench", "case", "request", "token", "metric", "value", "unit")


@dataclass
class BenchContext:
    cfg: HarnessConfig
    engine: Engine
    loaded: LoadedModel
    load_memory: dict[str, Any]
    progress: Callable[[str], None] = lambda message: None
    out_dir: Path | None = None  # the point's folder, for benches that write files of their own (cases.jsonl)
    workflow: Workflow | None = None  # bench=e2e: the workflow, its cases checked before the model loaded


@dataclass
class BenchOutput:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[Any, ...]] = field(default_factory=list)  # rows of SAMPLE_COLUMNS
    details: dict[str, Any] = field(default_factory=dict)


def case_key(metric: str, **case: Any) -> str:
    """Metric name with its case: ttft_ms[prompt=128], output_tok_s[batch=8]."""
    if not case:
        return metric
    return metric + "[" + ",".join(f"{k}={v}" for k, v in case.items()) + "]"


@dataclass(frozen=True)
class StopRule:
    """At least min_runs and min_seconds; then stop once the 95% CI half-width of the primary metric is within
    target_rel_ci of its mean; never more than max_runs."""

    min_runs: int
    max_runs: int
    min_seconds: float
    target_rel_ci: float

    @classmethod
    def of(cls, bench: BenchConfig) -> StopRule:
        return cls(bench.min_runs, bench.max_runs, bench.min_seconds, bench.target_rel_ci)

    def relative_ci(self, values: list[float]) -> float | None:
        if len(values) < 2:
            return None
        s = summarize(values, "")
        return s["ci95"] / abs(s["mean"]) if s["mean"] else None

    def reason_to_stop(self, values: list[float], elapsed_s: float) -> str | None:
        if len(values) >= self.max_runs:
            return "max_runs"
        if len(values) < self.min_runs or elapsed_s < self.min_seconds:
            return None
        rel = self.relative_ci(values)
        if rel is not None and rel <= self.target_rel_ci:
            return "ci"
        return None


def repeat_until_stable(rule: StopRule, run: Callable[[], float]) -> tuple[list[float], dict[str, Any]]:
    """Call run() (returns the primary metric) until the rule says stop; report how and why it stopped."""
    values: list[float] = []
    t0 = time.perf_counter()
    while True:
        values.append(run())
        reason = rule.reason_to_stop(values, time.perf_counter() - t0)
        if reason:
            rel = rule.relative_ci(values)
            return values, {
                "runs": len(values),
                "seconds": time.perf_counter() - t0,
                "stopped_by": reason,
                "rel_ci95": rel,
            }


def builtin_text() -> str:
    """Python's documentation topics (shipped with every Python), in a fixed order: real text for prompts and
    for perplexity, the same on every machine."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=8)
def _corpus_ids(tokenizer_key: int, tokenizer: Any) -> tuple[int, ...]:
    return tuple(tokenizer(builtin_text(), add_special_tokens=False)["input_ids"])


def exact_prompt(loaded: LoadedModel, n_tokens: int, offset: int = 0) -> TokenPrompt:
    """A prompt of exactly n_tokens real text tokens (Python's documentation), checked against the context."""
    window = loaded.context_window
    if window is not None and n_tokens >= window:
        raise InferenceError(
            f"a prompt of {n_tokens} tokens does not fit the context window of {window} tokens.",
            f"use bench.prompt_lengths below {window} (minus the output length).",
        )
    ids = _corpus_ids(id(loaded.tokenizer), loaded.tokenizer)
    start = (offset * 997) % max(len(ids) - n_tokens, 1)
    chunk = ids[start : start + n_tokens]
    if len(chunk) < n_tokens:
        raise InferenceError(
            f"the built-in text has only {len(ids)} tokens for a {n_tokens}-token prompt.",
            "use shorter bench.prompt_lengths.",
        )
    return TokenPrompt(tuple(chunk))


def generation_params(bench: BenchConfig, seed: int, force_length: bool = True) -> GenerationParams:
    """The bench's sampling settings (greedy by default); force_length sets min_new_tokens = max_new_tokens."""
    return GenerationParams(
        max_new_tokens=bench.max_new_tokens,
        min_new_tokens=bench.max_new_tokens if force_length else 0,
        temperature=bench.temperature,
        top_p=bench.top_p,
        top_k=bench.top_k,
        repetition_penalty=bench.repetition_penalty,
        seed=seed,
    )


def request_metrics(start_ns: int, token_ns: list[int], prompt_tokens: int) -> dict[str, float]:
    """TTFT, E2E, TPOT, decode and prefill tok/s of one streamed request, in seconds and tokens/s."""
    if not token_ns:
        return {}
    ttft_s = (token_ns[0] - start_ns) / 1e9
    e2e_s = (token_ns[-1] - start_ns) / 1e9
    out: dict[str, float] = {"ttft_s": ttft_s, "e2e_s": e2e_s, "output_tokens": float(len(token_ns))}
    if ttft_s > 0:
        out["prefill_tok_s"] = prompt_tokens / ttft_s
    if len(token_ns) > 1 and e2e_s > ttft_s:
        out["tpot_s"] = (e2e_s - ttft_s) / (len(token_ns) - 1)
        out["decode_tok_s"] = (len(token_ns) - 1) / (e2e_s - ttft_s)
    return out


def itl_s(token_ns: list[int], first_chunk_tokens: int = 1) -> list[float]:
    """Inter-token latencies of one request: the gap before each token after the first chunk's (a streamed chunk
    of several tokens gives its first-chunk extras no gap; docs/metrics.md, "A server under load")."""
    return [(b - a) / 1e9 for a, b in itertools.pairwise(token_ns[max(first_chunk_tokens, 1) - 1 :])]


def write_samples(path: Path, rows: list[tuple[Any, ...]]) -> None:
    """samples.csv, long format (one row per request metric or token), written whole or not at all."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SAMPLE_COLUMNS)
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=".samples.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
