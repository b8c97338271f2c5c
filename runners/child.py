"""The body of a point's own process (`python -m runners <point dir>`, or a child of the fork server): rebuild the
validated config, apply the memory limit, run the point, exit 0 when it is ok."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import parallel
from harness.config import HarnessConfig
from harness.errors import Interrupted, format_error, is_storage_error, storage_error
from harness.processes import die_with_parent
from harness.progress import ENV as PROGRESS_ENV
from harness.progress import PointReporter, line_sink
from harness.result import write_json_atomic, write_result
from runners.records import FAULT_LOG, POINT_FILE, rank_file, rank_log


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted, which run_point records; a second signal while it does so is
    ignored, so the record is always written whole."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def set_memory_limit(limit_mb: int | None) -> None:
    """Let the point's process grow its address space by at most limit_mb beyond what start-up mapped
    (torch alone maps gigabytes it never touches, so an absolute limit would be a guess)."""
    if limit_mb is not None:
        import resource

        import psutil

        limit = psutil.Process().memory_info().vms + limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(out_dir: Path) -> int:
    """The point's own process: rebuild the validated config, apply the memory limit, run, exit 0 when ok."""
    import faulthandler

    import psutil
    from omegaconf import OmegaConf

    die_with_parent(signal.SIGTERM)  # the sweep (or server) that started it died: record Interrupted and stop
    _stop_on_signals()
    from runners.point import run_point

    fault_log = (out_dir / FAULT_LOG).open("w")
    faulthandler.enable(file=fault_log)
    spec: dict[str, Any] = json.loads((out_dir / POINT_FILE).read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HarnessConfig), spec["config"]))
    assert isinstance(cfg, HarnessConfig)
    set_memory_limit(cfg.point_memory_limit_mb)
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    # From the process's birth to here: interpreter start and the imports of torch, transformers and the harness.
    startup_s = time.time() - psutil.Process().create_time()
    # Started by a sweep that shows progress: report it on stdout, which the sweep reads (harness.progress).
    progress = PointReporter(line_sink(sys.stdout)) if os.environ.get(PROGRESS_ENV) == "lines" else None
    rank = parallel.rank()
    # A model split over ranks: each runs the whole point; rank 0 writes the point's files, the others theirs apart
    # (their result as rank-<n>.json, which names the cause when a rank fails first).
    own_dir = out_dir if rank == 0 else Path(tempfile.mkdtemp(prefix=f"harness-rank{rank}-"))
    try:
        result = run_point(cfg, own_dir, spec["point"], attempt=spec["attempt"], digest=spec["config_digest"],
                           progress=progress if rank == 0 else None)  # fmt: skip
        result.timings["startup_s"] = startup_s
        result.timings["process_s"] = time.perf_counter() - t0
        if rank == 0:
            write_result(out_dir, result)
        else:
            write_json_atomic(out_dir / rank_file(rank), result.to_dict())
        parallel.leave()
    except KeyboardInterrupt as exc:  # run_point has written the Interrupted result
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        error = storage_error(exc, "the point's result", str(out_dir), how_to_move="hydra.sweep.dir=<folder>")
        print(format_error(error))
        return 1
    finally:
        if own_dir != out_dir:  # another rank's traceback is kept beside its result
            if (own_dir / "error.log").is_file():
                shutil.copyfile(own_dir / "error.log", out_dir / rank_log(rank))
            shutil.rmtree(own_dir, ignore_errors=True)
    faulthandler.disable()
    fault_log.close()
    (out_dir / FAULT_LOG).unlink(missing_ok=True)
    return 0 if result.status == "ok" else 1
