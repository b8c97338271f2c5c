"""run_point: one sweep point from validated config to result.json, importable and testable without Hydra.

A failure of the point (a model that cannot load, a quantization the platform cannot do, out of memory, a
crash inside generation) is recorded in result.json with its cause and fix, and in error.log with the
traceback; it never escapes as an exception, so a sweep goes on to its next point.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harness.config import GROUPS, HarnessConfig
from harness.engines import create_engine
from harness.environment import capture_environment
from harness.errors import ConfigError, HarnessError, OutOfMemoryError, format_error
from harness.memory import MemoryMonitor
from harness.models import load_model
from harness.result import Result, write_result
from runners.smoke import run_smoke

BENCHES = {"smoke": run_smoke}


def _as_error(exc: BaseException) -> HarnessError | None:
    if isinstance(exc, HarnessError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return OutOfMemoryError(
            f"the point ran out of memory ({type(exc).__name__}: {exc}).",
            "use a smaller model, a quantized one (quant=8bit or 4bit), or free memory.",
        )
    return None


def run_point(cfg: HarnessConfig, out_dir: Path, point: dict[str, str] | None = None) -> Result:
    out_dir.mkdir(parents=True, exist_ok=True)
    point = point or {g: getattr(cfg, g).name for g in GROUPS}
    result = Result(status="ok", point=point, config=asdict(cfg), environment=capture_environment())
    t_start = time.perf_counter()
    loaded = None
    try:
        bench = BENCHES.get(cfg.bench.name)
        if bench is None:
            raise ConfigError(
                f"bench={cfg.bench.name!r} has no runner yet; runners exist for: {', '.join(BENCHES)}.",
                "pick one of those.",
            )
        with MemoryMonitor() as load_memory:
            loaded = load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed)
        result.timings["load_s"] = loaded.load_seconds
        result.resolved = loaded.resolved()
        engine = create_engine(cfg.engine.name, loaded)
        result.resolved["engine"] = engine.describe()
        t_measure = time.perf_counter()
        with MemoryMonitor() as run_memory:
            result.metrics, result.outputs = bench(engine, cfg)
        result.timings["measure_s"] = time.perf_counter() - t_measure
        result.memory = {"load": load_memory.summary(), "run": run_memory.summary()}
    except Exception as exc:
        error = _as_error(exc)
        result.status = "failed"
        if error is not None:
            result.error = error.error_record()
        else:
            result.error = {
                "type": type(exc).__name__,
                "message": str(exc),
                "hint": "an unexpected error: the traceback is in error.log beside result.json; "
                "please report it with that file.",
            }
        (out_dir / "error.log").write_text(format_error(error or exc) + "\n\n" + traceback.format_exc())
    finally:
        if loaded is not None:
            loaded.release()
        result.timings["total_s"] = time.perf_counter() - t_start
        write_result(out_dir, result)
    return result


def summary_line(result: Result, out_dir: Path) -> str:
    p = result.point
    head = f"[{result.status}] model={p.get('model')} quant={p.get('quant')} attention={p.get('attention')}"
    if result.status != "ok":
        err = result.error or {}
        return f"{head}\n  {err.get('type')}: {err.get('message')} Fix: {err.get('hint')}\n  see {out_dir}"
    r: dict[str, Any] = result.resolved
    m = result.metrics
    parts = [
        f"{r['device']} {r['dtype']}",
        f"attention {r['attention']['used']}",
        f"quant {r['quantization']['name']}",
        f"load {result.timings['load_s']:.2f} s",
    ]
    if "decode_tok_s" in m:
        parts.append(
            f"{m['output_tokens']['mean']:.0f} tokens, TTFT {m['ttft_ms']['mean']:.0f} ms, "
            f"decode {m['decode_tok_s']['mean']:.1f} tok/s"
        )
    return f"{head}: " + " | ".join(parts) + f"\n  result: {out_dir / 'result.json'}"
