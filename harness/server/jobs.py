"""Benchmark jobs over HTTP: a sweep point's overrides, checked like the command line, run by
runners.execute_point in a background process (one fresh process per point, as in a sweep).

Only overrides that choose what to measure are accepted: the group options, and fields of bench, quant,
attention and workflow. Anything that names a path, imports code, enables remote code, changes where files go
or interpolates (model.path, model.trust_remote_code, bench.name, workflow.cases, quant.calibration,
cache_dir, hydra.*, ${oc.env:…}) is refused: a client chooses what to measure, not what this machine reads or
runs.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import GROUPS, HarnessConfig, check_group_choices, compose_config, validate
from harness.errors import ConfigError

_ALLOWED_FIELDS = ("bench.", "quant.", "attention.", "workflow.", "validation.")
# Paths this machine would read, and bench.name, which imports and calls any `module:function`.
_REFUSED_FIELDS = ("workflow.cases", "workflow.corpus", "quant.calibration", "bench.name")
_ALLOWED_KEYS = (*GROUPS, "seed", "model.device", "model.dtype")


def check_overrides(overrides: Any) -> list[str]:
    """The overrides, if every one is allowed; ConfigError naming the first that is not."""
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError('overrides must be a list of strings such as "bench=latency".', "send a JSON list.")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith(("+", "~", "-")):
            raise ConfigError(
                f"override {item!r} is not of the form key=value.", "write it as group=option or a.b=value."
            )
        if "${" in value:  # an interpolation could read this server's environment (its token) into the result
            raise ConfigError(
                f"override {item!r} holds an interpolation (${{…}}), which jobs may not use.", "give a plain value."
            )
        allowed = key in _ALLOWED_KEYS or (
            key.startswith(_ALLOWED_FIELDS) and key not in _REFUSED_FIELDS and not key.endswith(".name")
        )
        if not allowed:
            raise ConfigError(
                f"override {item!r} is not allowed over HTTP: a job may choose {', '.join(GROUPS)}, seed, "
                "model.device, model.dtype and fields of bench, quant, attention, workflow and validation.",
                "leave it out, or run that point on the command line.",
            )
        if "," in value and key in GROUPS:
            raise ConfigError(f"override {item!r} sweeps: a job is one point.", "submit one job per point.")
    return overrides


def compose_point(overrides: list[str]) -> tuple[HarnessConfig, dict[str, str]]:
    """The validated config of one point and its group choices, as `python -m harness` composes it."""
    from runners.point import preflight

    check_group_choices(overrides)
    try:
        cfg = compose_config(overrides, with_hydra=True)
        choices = {g: str(cfg.hydra.runtime.choices.get(g)) for g in GROUPS}
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's own parse and composition errors
        raise ConfigError(f"the overrides do not compose: {exc}", "fix the override it names.") from None
    validated = validate(cfg)
    preflight(validated)
    return validated, choices


@dataclass
class Job:
    id: str
    overrides: list[str]
    point: dict[str, str]
    folder: Path
    status: str = "queued"  # queued | running | ok | failed
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None

    def describe(self, with_result: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "overrides": self.overrides,
            "point": self.point,
            "folder": str(self.folder),
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
        }
        if with_result:
            out["result"] = self.result
        return out


class JobRunner:
    def __init__(self, jobs_dir: str | Path, max_parallel: int = 1) -> None:
        self.jobs_dir = Path(jobs_dir)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="harness-job")

    def submit(self, overrides: Any) -> Job:
        cfg, point = compose_point(check_overrides(overrides))
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        job = Job(job_id, list(overrides), point, self.jobs_dir / job_id)
        with self._lock:
            self._jobs[job_id] = job
        self._pool.submit(self._run, job, cfg)
        return job

    def _run(self, job: Job, cfg: HarnessConfig) -> None:
        from runners import execute_point

        job.status, job.started = "running", time.time()
        try:
            cfg.force = True  # a job measures; it never answers from an earlier result
            result, _ = execute_point(cfg, job.folder, job.point)
            job.result = result.to_dict()
            job.status = result.status
        except Exception as exc:  # the point's own failures are in its result; this is the runner failing
            job.result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
            job.status = "failed"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.submitted)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.all():
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
