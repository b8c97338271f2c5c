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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import parallel
from harness.config import BenchConfig, HarnessConfig
from harness.engines import Engine, GenerationParams
from harness.progress import PointReporter
from harness.stats import request_latency, summarize
from harness.workflows import Workflow

if TYPE_CHECKING:
    from harness.energy import EnergyMeter
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
    progress: PointReporter = field(default_factory=lambda: PointReporter(None))  # what the point is doing
    out_dir: Path | None = None  # the point's folder, for benches that write files of their own (cases.jsonl)
    workflow: Workflow | None = None  # bench=e2e: the workflow, its cases checked before the model loaded
    energy: EnergyMeter | None = None  # marks `<key>:start` / `<key>:end` spans (phase=warmup, a serve level)
    clock_perf_s: float = 0.0  # the perf_counter reading of the point's clock zero (result.details.clock)

    def mark(self, label: str) -> None:
        """A span's start or end (`phase=warmup:start`): for the energy meter, and the progress display's phase."""
        if self.energy is not None:
            self.energy.mark(label)
        if label == "phase=warmup:start":
            self.progress.phase("warm-up")
        elif label in ("phase=warmup:end", "phase=measure:start"):
            self.progress.phase("measure")

    def renew_engine(self) -> dict[str, Any]:
        """A fresh state for a trial (bench.trials): the point's launched server restarted, and a new engine over
        the loaded weights (the old one's caches, batching manager and compiled state go with it). What was
        renewed, for the result."""
        from harness.engines import create_engine

        self.engine.shutdown()
        restart = getattr(self.loaded.model, "restart", None)
        renewed: dict[str, Any] = {"engine": "new"}
        if restart is not None:
            started = restart()
            renewed["server"] = (
                f"restarted in {started:.1f} s" if started is not None else "not restarted: the point did not launch it"
            )
        self.engine = create_engine(self.cfg.engine.name, self.loaded, self.cfg)
        return renewed


@dataclass
class BenchOutput:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[Any, ...]] = field(default_factory=list)  # rows of SAMPLE_COLUMNS
    details: dict[str, Any] = field(default_factory=dict)


def trial_spread(
    metrics: dict[str, dict[str, Any]], keys: list[str], base: str, figures: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """bench.trials: per figure (metric, statistic), the trials' values summarised as `<metric>_<stat>_by_trial[base]`
    (`<metric>_by_trial` for a mean) in `metrics`, whose stdev is the run-to-run noise; returned beside each trial's
    own ci95 (the request-to-request noise)."""
    spread: dict[str, Any] = {}
    for metric, stat in figures:
        values = [metrics.get(f"{metric}[{k}]", {}).get(stat) for k in keys]
        if all(v is not None for v in values):
            name = f"{metric}_{stat}_by_trial" if stat != "mean" else f"{metric}_by_trial"
            metrics[f"{name}[{base}]"] = summarize(values, metrics[f"{metric}[{keys[0]}]"]["unit"])
            spread[name] = {"between_trials_stdev": metrics[f"{name}[{base}]"]["stdev"],
                            "within_trial_ci95": [metrics[f"{metric}[{k}]"].get("ci95") for k in keys]}  # fmt: skip
    return spread


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


def repeat_until_stable(
    rule: StopRule, run: Callable[[], float], progress: Callable[[str], None] | None = None, what: str = ""
) -> tuple[list[float], dict[str, Any]]:
    """Call run() (returns the primary metric) until the rule says stop; report how and why it stopped. `progress`
    hears, after each run, the runs done and the interval's half-width against its target."""
    values: list[float] = []
    t0 = time.perf_counter()
    while True:
        values.append(run())
        if progress is not None:
            rel = rule.relative_ci(values)
            now = f"±{rel:.1%}" if rel is not None else "±?"
            progress(f"{what}{len(values)} runs (at most {rule.max_runs}), CI {now} of the mean, target "
                     f"±{rule.target_rel_ci:.0%}")  # fmt: skip
        # A model split over ranks: rank 0's clock decides for all, so every rank runs the same number of requests.
        reason = parallel.rank0_decides(rule.reason_to_stop(values, time.perf_counter() - t0))
        if reason:
            rel = rule.relative_ci(values)
            return values, {
                "runs": len(values),
                "seconds": time.perf_counter() - t0,
                "stopped_by": reason,
                "rel_ci95": rel,
            }


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
    first, last = (token_ns[0] - start_ns) / 1e9, (token_ns[-1] - start_ns) / 1e9
    return request_latency(first, last, len(token_ns), prompt_tokens)


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


def first_case(metrics: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The metric `name`, or its first case (ttft_ms[prompt=128] for ttft_ms)."""
    for key, stat in metrics.items():
        if key == name or key.startswith(name + "["):
            return stat
    return None


def request_headline(metrics: dict[str, Any]) -> str:
    """Output length, TTFT and decode rate of the first case: the summary line of the request benches (and of a
    user's bench that reports those metrics)."""
    ttft, decode, tokens = (first_case(metrics, k) for k in ("ttft_ms", "decode_tok_s", "output_tokens"))
    if not (ttft and decode):
        return ""
    lead = f"{tokens['mean']:.0f} tokens, " if tokens else ""
    ci = f" ±{decode['ci95']:.1f}" if decode.get("ci95") else ""
    return f"{lead}TTFT {ttft['mean']:.0f} ms, decode {decode['mean']:.1f}{ci} tok/s"
