"""run_point: one sweep point from validated config to result.json, importable and testable without Hydra.

A failure of the point (a model that cannot load, a quantization the platform cannot do, out of memory, a
crash inside generation) is recorded in result.json with its cause and fix, and in error.log with the
traceback; it never escapes as an exception, so a sweep goes on to its next point.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import parallel
from harness.config import GROUPS, HTTP_ENGINES, PARALLEL_LAUNCHES, HarnessConfig
from harness.errors import (
    ConfigError,
    HarnessError,
    format_error,
    is_out_of_memory,
    is_storage_error,
    out_of_memory,
    storage_error,
)
from harness.progress import PointReporter, reporter_for_this_process
from harness.result import Result, check_writable, write_result
from harness.stats import summarize
from runners.benches import bench_check, exact_length_prompts, headline, resolve_bench
from runners.records import interrupted_result

if TYPE_CHECKING:
    from harness.workflows import Workflow


def _check_devices(cfg: HarnessConfig) -> None:
    """A point that splits its model over GPUs is refused here, before anything loads, on a machine with fewer."""
    from harness.device import check_parallel_devices
    from harness.loadgen.launch import is_vllm_cpu_build
    from harness.processes import usable_cpus

    engine = cfg.engine
    world = engine.tensor_parallel * engine.pipeline_parallel
    what = f"engine.tensor_parallel={engine.tensor_parallel} x engine.pipeline_parallel={engine.pipeline_parallel}"
    launch = cfg.server_launch()
    if world > 1 and launch == "vllm" and is_vllm_cpu_build(engine.python):
        cpus = usable_cpus(engine.cpus, "engine.cpus") or os.sched_getaffinity(0)
        if world > len(cpus):
            raise ConfigError(
                f"{what} on vLLM's CPU build runs a worker per rank on CPUs of its own, and {len(cpus)} CPU(s) "
                "are there to share out.",
                "lower the parallel sizes, or give the server more CPUs (engine.cpus).",
            )
    elif world > 1 and launch in PARALLEL_LAUNCHES:
        check_parallel_devices(world, f"{what} (a launched {launch} server)",
                               "run the point where that many GPUs are visible, or lower the parallel sizes "
                               "(1 x 1 runs on one).")  # fmt: skip
    if cfg.ranks() > 1:
        _check_rank_devices(cfg)
    if cfg.model.device_map is not None:
        if engine.name != "transformers":
            raise ConfigError(
                f"model.device_map={cfg.model.device_map} places a transformers model over GPUs, and "
                f"engine={engine.name} loads the model its own way.",
                "drop model.device_map, or use engine=transformers (vLLM: engine.tensor_parallel).",
            )
        check_parallel_devices(2, f"model.device_map={cfg.model.device_map} (the layers spread over GPUs)",
                               "run it where at least 2 GPUs are visible, or drop model.device_map.")  # fmt: skip


def _check_rank_devices(cfg: HarnessConfig) -> None:
    """A transformers model split over ranks takes one GPU per rank where the machine has GPUs (transformers binds
    the accelerator it finds); without any, the ranks are CPU processes over gloo."""
    from harness.device import check_parallel_devices, gpu_count

    size, device = cfg.ranks(), cfg.model.device
    if device.startswith("cuda") or (device == "auto" and gpu_count()[0] > 0):
        check_parallel_devices(
            size,
            f"engine.tensor_parallel={size} (a transformers model split over one GPU per rank)",
            "run the point where that many GPUs are visible, or lower engine.tensor_parallel (without any GPU, the "
            "ranks are CPU processes).",
        )


def check_point(cfg: HarnessConfig) -> None:
    """What is knowably wrong with a point before anything loads, for the pre-check of a whole sweep: the bench
    exists, an explicit model.path is a model, and the prompt lengths fit the model's declared context window.
    Raises ConfigError."""
    from harness.energy import check_energy
    from harness.models.sources import declared_context_window, source_of_path

    resolve_bench(cfg.bench.name)
    bench_check(cfg.bench.name, cfg)
    check_energy(cfg.energy)
    if cfg.tracking == "mlflow":
        from harness.tracking import require_mlflow

        require_mlflow(import_it=False)
    if cfg.telemetry.otlp_endpoint:
        from harness.tracing import require_otel

        require_otel()
    _check_devices(cfg)
    if cfg.bench.client_hosts > 1:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError(
                f"bench.client_hosts={cfg.bench.client_hosts} sends the load from Ray actors, and Ray is not "
                "installed here.",
                "pip install -e '.[ray]', or bench.client_hosts=1.",
            )
    if cfg.model.path:
        try:
            source_of_path(cfg.model.path)
        except HarnessError as exc:  # an explicit path is never replaced by another source
            raise ConfigError(exc.cause, exc.fix + " Or drop model.path to use the entry's own source.") from None
    if not exact_length_prompts(cfg.bench.name) or cfg.engine.name in HTTP_ENGINES:
        return  # a server's window is the server's to say
    window = declared_context_window(cfg.model)
    if cfg.engine.name == "llamacpp" and cfg.engine.n_ctx:
        window = cfg.engine.n_ctx
    longest = max(cfg.bench.prompt_lengths)
    if window is not None and longest + cfg.bench.max_new_tokens > window:
        raise ConfigError(
            f"bench.prompt_lengths has {longest} tokens, which with bench.max_new_tokens={cfg.bench.max_new_tokens} "
            f"exceeds model {cfg.model.name}'s context window of {window} tokens.",
            f"use prompt lengths of at most {max(window - cfg.bench.max_new_tokens, 1)} tokens"
            + (" (or a larger engine.n_ctx)." if cfg.engine.name == "llamacpp" else "."),
        )


def preflight(cfg: HarnessConfig) -> Workflow | None:
    """What can be checked without a model, checked before one loads: check_point, a writable cache, and for
    bench=e2e the workflow's case file and corpus (the workflow, ready to run, is returned). Raises ConfigError."""
    check_point(cfg)
    check_writable(cfg.cache_path, "cache_dir", "set cache_dir=<folder> (or HARNESS_CACHE_DIR) to a writable folder")
    if cfg.bench.name != "e2e":
        return None
    from harness.workflows import create_workflow

    return create_workflow(cfg.workflow)


def _as_error(exc: BaseException) -> HarnessError | None:
    if isinstance(exc, HarnessError):
        return exc
    if isinstance(exc, OSError) and is_storage_error(exc):
        return storage_error(
            exc, "a file the point needs", how_to_move="cache_dir=<folder> or hydra.sweep.dir=<folder>"
        )
    if is_out_of_memory(exc):
        return out_of_memory(
            exc, "the point", "use a smaller model, a quantized one (quant=8bit or 4bit), or free memory."
        )
    return None


def run_point(
    cfg: HarnessConfig,
    out_dir: Path,
    point: dict[str, str] | None = None,
    attempt: str = "",
    digest: str = "",
    progress: PointReporter | None = None,
) -> Result:
    from harness.energy import open_meter
    from harness.engines import create_engine, load_for_engine
    from harness.environment import capture_environment
    from harness.memory import MemoryMonitor
    from runners.benches.measure import BenchContext, write_samples

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    point = point or {g: getattr(cfg, g).name for g in GROUPS}
    result = Result(
        status="ok",
        point=point,
        config=asdict(cfg),
        environment=capture_environment(),
        attempt=attempt,
        config_digest=digest,
    )
    result.timings["environment_s"] = time.perf_counter() - t_start
    loaded = None
    engine = None
    ctx = None
    meter = None
    try:
        bench = resolve_bench(cfg.bench.name)
        workflow = preflight(cfg)
        meter = open_meter(cfg.energy, cfg.energy_idle_s)  # its idle baseline before anything loads
        mark = meter.mark if meter is not None else (lambda label: None)
        progress = progress or reporter_for_this_process()
        progress.phase("load")
        mark("phase=load:start")
        with MemoryMonitor() as load_memory:
            loaded = load_for_engine(cfg, out_dir)
        result.timings["load_s"] = loaded.load_seconds
        result.resolved = loaded.resolved()
        t_engine = time.perf_counter()
        engine = create_engine(cfg.engine.name, loaded, cfg)
        result.timings["engine_s"] = time.perf_counter() - t_engine
        if engine.compile_s is not None:
            result.timings["compile_s"] = engine.compile_s
        result.resolved["engine"] = engine.describe()
        mark("phase=load:end")
        t_measure = time.perf_counter()
        # The point's clock: perf_counter readings (in samples.csv, relative to this zero) become wall-clock times.
        clock_perf_s, clock_unix_s = time.perf_counter(), time.time()
        ctx = BenchContext(cfg, engine, loaded, load_memory.summary(), progress, out_dir, workflow, meter,
                           clock_perf_s)  # fmt: skip
        mark("phase=measure:start")
        progress.phase("measure")
        with MemoryMonitor(interval_s=None) as run_memory:  # no sampling thread while timing
            output = bench(ctx)
        mark("phase=measure:end")
        progress.done()
        result.timings["measure_s"] = time.perf_counter() - t_measure
        result.metrics, result.outputs, result.details = output.metrics, output.outputs, output.details
        result.details["clock"] = {"unix_s": clock_unix_s, "started_unix_s": clock_unix_s - (clock_perf_s - t_start)}
        _energy_and_cost(cfg, result, meter, out_dir, t_start)
        if engine.compiles_in_requests:
            result.details["compiles_in_requests"] = engine.compiles_in_requests
            warning = (
                f"{engine.compiles_in_requests} request(s) compiled a new shape during measurement: their times "
                "include compilation (raise bench.warmup_runs so warm-up covers every shape)"
            )
            earlier = result.details.get("warning")
            result.details["warning"] = f"{earlier}; {warning}" if earlier else warning
        if cfg.workflow.name != "none" and cfg.bench.name != "e2e":
            result.details["note"] = f"workflow={cfg.workflow.name} is run only by bench=e2e; this bench ignored it."
        result.memory = {"load": ctx.load_memory, "run": run_memory.summary()}
        if cfg.ranks() > 1:  # a model split over ranks: each rank's own process (and device), in rank order
            result.memory["ranks"] = parallel.gather(dict(result.memory))
        if output.samples:
            write_samples(out_dir / "samples.csv", output.samples)
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
        with contextlib.suppress(OSError):  # a full disk must not hide the point's own error
            (out_dir / "error.log").write_text(format_error(error or exc) + "\n\n" + traceback.format_exc())
    except KeyboardInterrupt as exc:
        how = getattr(exc, "signal_name", "SIGINT, Ctrl-C")
        result.status, result.error = "failed", interrupted_result(cfg, point, how).error
        raise
    finally:
        if meter is not None:
            meter.stop_sampling()
        if ctx is not None:  # a trial may have renewed the engine
            engine = ctx.engine
        if engine is not None:
            engine.shutdown()
        if loaded is not None:
            loaded.release()
        result.timings["total_s"] = time.perf_counter() - t_start
        write_result(out_dir, result)
    return result


def _energy_and_cost(cfg: HarnessConfig, result: Result, meter: Any, out_dir: Path, t_start: float) -> None:
    """The point's energy figures per phase (and why there are none), its telemetry.csv, and the price of its
    throughput figures where cost.per_hour is set."""
    from harness.cost import cost_figures
    from harness.energy import describe, phase_figures

    if meter is not None:
        for phase in ("phase=load", "phase=warmup", "phase=measure"):
            result.metrics.update(phase_figures(meter, phase))
        if meter.idle_w is not None:
            result.metrics["idle_power_w"] = summarize([meter.idle_w], "W")
        meter.stop_sampling()
        meter.write_telemetry(out_dir / "telemetry.csv", t_start)
    result.details["energy"] = describe(meter, cfg.energy)
    if cfg.cost.per_hour is not None:
        assert cfg.cost.currency is not None  # CostConfig refuses a price without one
        figures, how = cost_figures(result.metrics, cfg.cost.per_hour, cfg.cost.currency, cfg.cost.per,
                                    _gpus_used(result.resolved.get("device")))  # fmt: skip
        result.metrics.update(figures)
        result.details["cost"] = how


def _gpus_used(device: Any) -> int:
    """The GPUs a point's model sat on: one for cuda or cuda:N, every visible one for a device map across them."""
    if not isinstance(device, str):
        return 0
    if device.startswith("cuda"):
        return 1
    if device in ("auto", "balanced", "sequential"):
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return 0


def summary_line(result: Result, out_dir: Path, swept: set[str] | None = None) -> str:
    """One line for a person; beyond the groups it names the point's fields in `swept` (all when None)."""
    p = result.point
    bench = result.config.get("bench", {}).get("name", p.get("bench"))
    swept = "".join(f" {k}={v}" for k, v in p.items() if k not in GROUPS and (swept is None or k in swept))
    workflow = f" workflow={p['workflow']}" if p.get("workflow") not in (None, "none") else ""
    engine = f" engine={p['engine']}" if p.get("engine") not in (None, "transformers") else ""
    head = (
        f"[{result.status}] model={p.get('model')} quant={p.get('quant')} attention={p.get('attention')}"
        + engine
        + f" bench={bench}"
        + workflow
        + swept
    )
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
    parts.append(headline(bench, m))
    return f"{head}: " + " | ".join(parts) + f"\n  result: {out_dir / 'result.json'}"
