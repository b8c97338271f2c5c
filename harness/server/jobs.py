"""Benchmark jobs over HTTP: one sweep point per job, chosen by overrides, run in a process group of its own.

The allow-list is structural, not textual. Each override is parsed by Hydra's own override parser and accepted
only as `group=option` (a known option name) or `field=value` for a field on the positive list
(harness.server.job_fields) with a scalar value (a list of scalars where the field is a list). Prefixes (`+`,
`++`, `~`), packages, sweeps, dicts, functions and `${…}` interpolations are refused. The composed point is then
compared with the point its group choices alone compose: every field a job may not change must be equal (model
paths and sources, trust_remote_code, bench.name, case files and corpus, cache_dir, isolation), so a way around
the parser would still be caught. A job loads another server only when it picks one of the operator's
`--job-targets`; its process gets a clean environment (no credential but that target's key), and a server it
launches dies with it.

A job has limits (wall time, runs, requests, tokens), can be cancelled (its process group is killed), is written
to `<jobs_dir>/<id>/job.json` at each change and read back when the server starts (a job the server was running
when it stopped says `interrupted`), and the server's shutdown stops the jobs it is running.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.types import OverrideType

from harness.config import GROUPS, HarnessConfig, check_group_choices, flatten, group_options
from harness.errors import ConfigError
from harness.overrides import check_fields_apply, parse, schema_fields
from harness.overrides import compose_point as compose_overrides
from harness.processes import job_environment
from harness.result import write_json_atomic
from harness.server.job_fields import ALLOWED, REFUSED, allowed_value
from harness.server.settings import JobTarget

JOB_STATES = ("queued", "running", "ok", "failed", "cancelled", "interrupted")
FINISHED = ("ok", "failed", "cancelled", "interrupted")
JOB_FILE = "job.json"
LOG_FILE = "job.log"


@dataclass(frozen=True)
class JobLimits:
    """What one job may ask of this machine; each bound is checked on the composed point before it runs."""

    max_seconds: float = 3600.0  # wall time of the job's process; past it the process group is killed
    max_runs: int = 200  # bench.max_runs, bench.warmup_runs, and requests per concurrency level
    max_parallel: int = 64  # bench.concurrency and bench.batch_sizes entries
    max_prompt_tokens: int = 32768  # bench.prompt_lengths entries
    max_new_tokens: int = 2048  # bench.max_new_tokens and workflow.max_new_tokens
    max_ppl_chars: int = 1_000_000  # bench.ppl_chars
    max_kv_cache_tokens: int = 1 << 20  # engine.kv_cache_tokens: the paged cache is allocated whole at start
    max_threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # engine.threads

    def check(self, cfg: HarnessConfig) -> None:
        b, w = cfg.bench, cfg.workflow
        checks = [
            ("bench.min_seconds", b.min_seconds, self.max_seconds),
            ("bench.max_runs", b.max_runs, self.max_runs),
            ("bench.warmup_runs", b.warmup_runs, self.max_runs),
            ("bench.requests_per_client × max(bench.concurrency)", b.requests_per_client * max(b.concurrency),
             self.max_runs),
            ("max(bench.concurrency)", max(b.concurrency), self.max_parallel),
            ("max(bench.batch_sizes)", max(b.batch_sizes), self.max_parallel),
            ("max(bench.prompt_lengths)", max(b.prompt_lengths), self.max_prompt_tokens),
            ("bench.max_new_tokens", b.max_new_tokens, self.max_new_tokens),
            ("workflow.max_new_tokens", w.max_new_tokens if b.name == "e2e" else 0, self.max_new_tokens),
            ("bench.ppl_chars", b.ppl_chars, self.max_ppl_chars),
            ("bench.num_requests", b.num_requests, self.max_runs),
            ("bench.num_requests × bench.trials", b.num_requests * b.trials, self.max_runs),
            ("bench.search_max_requests", b.search_max_requests if b.search == "max_rate" else 0, self.max_runs),
            ("bench.client_workers", b.client_workers, self.max_parallel),
            ("engine.max_batch_requests", cfg.engine.max_batch_requests, self.max_parallel),
            ("engine.kv_cache_tokens", cfg.engine.kv_cache_tokens, self.max_kv_cache_tokens),
            ("engine.n_ctx", cfg.engine.n_ctx, self.max_prompt_tokens + self.max_new_tokens),
            ("engine.threads", cfg.engine.threads or 0, self.max_threads),
            ("bench.prefix_tokens", b.prefix_tokens, self.max_prompt_tokens),
            ("bench.turns", b.turns, self.max_parallel),
        ]  # fmt: skip
        for name, value, limit in checks:
            if value > limit:
                raise ConfigError(
                    f"{name}={value:g} is above this server's limit for a job ({limit:g}).",
                    "ask for less, or run that point on the command line (python -m harness).",
                )


def _refuse(text: str, why: str, fix: str = "leave it out, or run that point on the command line.") -> ConfigError:
    return ConfigError(f"override {text!r} is not allowed over HTTP: {why}.", fix)


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(k) or _has_interpolation(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def check_overrides(overrides: Any) -> list[str]:
    """The overrides, if every one is allowed; ConfigError naming the first that is not."""
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError('overrides must be a list of strings such as "bench=latency".', "send a JSON list.")
    fields = schema_fields()
    for text in overrides:
        if "${" in text:  # an interpolation could read this server's environment (its token) into the result
            raise _refuse(text, "it holds an interpolation (${…})", "give a plain value.")
        o = parse(text)
        key, value = o.key_or_group, o.value()
        if o.type != OverrideType.CHANGE:
            raise _refuse(text, "a job sets existing values only (no +, ++ or ~ prefix)", "write it as key=value.")
        if o.package:
            raise _refuse(text, "a job cannot choose a package (@…)", f"write it as {key}=<option>.")
        if o.is_sweep_override():
            raise ConfigError(f"override {text!r} sweeps: a job is one point.", "submit one job per point.")
        if _has_interpolation(value):
            raise _refuse(text, "it holds an interpolation (${…})", "give a plain value.")
        if key in GROUPS:
            if not isinstance(value, str):
                raise _refuse(text, f"{key} takes an option's name ({', '.join(group_options(key))})")
            check_group_choices([f"{key}={value}"])
            continue
        if key not in ALLOWED:
            raise _refuse(
                text,
                REFUSED.get(key)
                or f"{key} is not on the list of fields a job may set (harness/server/job_fields.py: a job may "
                f"choose {', '.join(GROUPS)} and set the fields listed there, none that names a file, URL, program "
                "or environment variable)",
            )
        is_list = "list" in str(fields[key])
        if not (_scalar(value) or (is_list and isinstance(value, list) and all(_scalar(v) for v in value))):
            raise _refuse(text, f"{key} takes a {'list of plain values' if is_list else 'plain value'}")
        if not allowed_value(key, value):
            raise _refuse(
                text,
                f"over HTTP {key} takes only {', '.join(map(str, ALLOWED[key].values or ()))} ({ALLOWED[key].why})",
                "leave it at that, or pick one of the operator's job targets with the request's `target`.",
            )
    return overrides


def _changed_beyond_allowed(cfg: HarnessConfig, base: HarnessConfig) -> list[str]:
    """The fields outside the allow-list whose value differs from the group options' own."""
    ours, theirs = flatten(asdict(cfg)), flatten(asdict(base))
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k not in ALLOWED)


def pick_target(targets: list[JobTarget], choice: str | int | None) -> JobTarget | None:
    """The operator's job target a job picked, by name or position; ConfigError for any other."""
    if choice is None:
        return None
    picked = next((t for t in targets if t.name == str(choice)), None)
    if picked is None and str(choice).isdigit() and int(choice) < len(targets):
        picked = targets[int(choice)]
    if picked is None:
        listed = ", ".join(f"{i} ({t.name})" for i, t in enumerate(targets)) or "none"
        raise ConfigError(
            f"target {choice!r} is not one of this server's job targets ({listed}).",
            "pick one of those by name or position; an operator adds servers with `harness serve --job-targets URL`.",
        )
    return picked


def _aim_at(cfg: HarnessConfig, target: JobTarget | None, served_model: str | None) -> HarnessConfig:
    """The point as it runs against the operator's target (bench=serve, target=url, the target's URL and key, and
    the job's name for the model there)."""
    if target is None:
        if served_model is not None:
            raise ConfigError(
                "bench.served_model names a model on another server, and the job picked no target.",
                "add the request's `target` (one of the operator's --job-targets), or drop bench.served_model.",
            )
        return cfg
    if cfg.bench.name != "serve":
        raise ConfigError(
            f"a job target is a server to load-test, which bench=serve does; this job runs bench={cfg.bench.name}.",
            "add bench=serve, or drop the request's `target`.",
        )
    bench = dataclasses.replace(
        cfg.bench, target="url", base_url=target.base_url, api_key_env=target.key_env, served_model=served_model
    )
    return dataclasses.replace(cfg, bench=bench)  # validated again: the quantization must suit a running server


def compose_job(
    overrides: list[str], cache_dir: str, allow_remote_code: bool, limits: JobLimits, target: JobTarget | None = None
) -> tuple[HarnessConfig, dict[str, str]]:
    """The validated config of one job's point and its group choices; ConfigError for anything refused."""
    from runners.point import preflight

    # bench.served_model belongs with a target (bench.target=url), which only the server sets: applied with it
    parsed = [parse(o) for o in overrides]
    served = [p for p in parsed if p.key_or_group == "bench.served_model"]
    overrides = [o for o, p in zip(overrides, parsed, strict=True) if p.key_or_group != "bench.served_model"]
    cfg, composed = compose_overrides(overrides)
    check_fields_apply(overrides, cfg)
    choices = {g: str(composed.hydra.runtime.choices.get(g)) for g in GROUPS}
    base, _ = compose_overrides([f"{g}={choices[g]}" for g in GROUPS])
    changed = _changed_beyond_allowed(cfg, base)
    if changed:  # the parser let something through that it should not have: refuse, never run it
        raise ConfigError(
            f"the overrides change {', '.join(changed)}, which a job may not change.", "leave those fields alone."
        )
    cfg = _aim_at(cfg, target, str(served[-1].value()) if served and served[-1].value() is not None else None)
    for c in (cfg, base):
        c.cache_dir, c.isolation, c.force, c.print_text = cache_dir, "process", True, False
        c.model.trust_remote_code = c.model.trust_remote_code and allow_remote_code
    preflight(cfg)
    limits.check(cfg)
    return cfg, choices


@dataclass
class Job:
    id: str
    overrides: list[str]
    point: dict[str, str]
    folder: Path
    target: str | None = None  # the name of the operator's job target it loads, if any
    status: str = "queued"  # see JOB_STATES
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: dict[str, str] | None = None  # why a job that did not run to its end stopped
    result: dict[str, Any] | None = None

    def describe(self, with_result: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "overrides": self.overrides,
            "point": self.point,
            "target": self.target,
            "folder": str(self.folder),
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }
        if with_result:
            out["result"] = self.result
        return out

    def save(self) -> None:
        write_json_atomic(self.folder / JOB_FILE, self.describe(with_result=False))

    @classmethod
    def read(cls, path: Path) -> Job | None:
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)} - {"folder"}
            job = cls(**{k: v for k, v in data.items() if k in known}, folder=path.parent)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # unreadable, or not a job's record
            return None
        well_formed = isinstance(job.id, str) and isinstance(job.overrides, list) and isinstance(job.point, dict)
        return job if well_formed and job.status in JOB_STATES else None


class JobRunner:
    """Runs jobs from a queue on `max_parallel` threads, each job in its own process group."""

    def __init__(
        self,
        jobs_dir: str | Path,
        max_parallel: int = 1,
        cache_dir: str = "~/.cache/harness",
        allow_remote_code: bool = False,
        limits: JobLimits | None = None,
        targets: list[JobTarget] | None = None,
    ) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.targets = list(targets or [])
        self.cache_dir, self.allow_remote_code = cache_dir, allow_remote_code
        self.limits = limits or JobLimits()
        self._jobs: dict[str, Job] = {}
        self._configs: dict[str, HarnessConfig] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._reload()
        self._threads = [
            threading.Thread(target=self._loop, name=f"harness-job-{i}", daemon=True) for i in range(max_parallel)
        ]
        for t in self._threads:
            t.start()

    def _reload(self) -> None:
        """Jobs of earlier runs of the server, from their job.json; one it was running when it stopped says so."""
        if not self.jobs_dir.is_dir():
            return
        for path in sorted(self.jobs_dir.glob(f"*/{JOB_FILE}")):
            job = Job.read(path)
            if job is None:
                continue
            if job.status not in FINISHED:
                job.status, job.finished = "interrupted", job.finished or time.time()
                job.error = {
                    "type": "Interrupted",
                    "message": "the server stopped before this job finished.",
                    "hint": "submit the job again.",
                }
                with contextlib.suppress(OSError):
                    job.save()
            job.result = _read_result_file(job.folder)
            self._jobs[job.id] = job

    def submit(self, overrides: Any, target: str | int | None = None) -> Job:
        if self._stopping.is_set():
            raise ConfigError("the server is shutting down.", "submit the job to the server once it is back.")
        picked = pick_target(self.targets, target)
        cfg, point = compose_job(
            check_overrides(overrides), self.cache_dir, self.allow_remote_code, self.limits, picked
        )
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        job = Job(job_id, list(overrides), point, self.jobs_dir / job_id, picked.name if picked else None)
        job.save()
        with self._lock:
            self._jobs[job_id] = job
            self._configs[job_id] = cfg
        self._queue.put(job_id)
        return job

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                job, cfg = self._jobs[job_id], self._configs.pop(job_id, None)
            if job.status != "queued" or cfg is None:  # cancelled while it waited
                continue
            try:
                self._run(job, cfg)
            except Exception as exc:  # the point's own failures are in its result; this is the runner failing
                job.status, job.error = "failed", {"type": type(exc).__name__, "message": str(exc), "hint": ""}
            finally:
                job.finished = time.time()
                with contextlib.suppress(OSError):
                    job.save()

    def _run(self, job: Job, cfg: HarnessConfig) -> None:
        from harness.result import write_result
        from runners.execute import start_point, stop_point_process
        from runners.records import attempt_result, config_digest, crash_result, interrupted_result

        attempt, digest = uuid.uuid4().hex, config_digest(cfg)
        with self._lock:
            if job.status != "queued":
                return
            job.status, job.started = "running", time.time()
            job.save()
            with (job.folder / LOG_FILE).open("w") as log:
                proc = start_point(cfg, job.folder, job.point, attempt, digest, stdout=log, env=_environment_of(cfg))
            self._procs[job.id] = proc
        try:
            returncode = proc.wait(timeout=self.limits.max_seconds)
        except subprocess.TimeoutExpired:
            stop_point_process(proc, signal.SIGTERM, grace_s=10)
            job.status = "failed"
            job.error = {
                "type": "JobTimeout",
                "message": f"the job ran past this server's limit of {self.limits.max_seconds:g} s and was stopped.",
                "hint": "ask for fewer runs or tokens, or run the point on the command line.",
            }
            returncode = proc.returncode
        finally:
            with self._lock:
                self._procs.pop(job.id, None)
        result = attempt_result(job.folder, attempt)
        if job.status in ("cancelled", "interrupted") or job.error:
            if result is None:
                result = interrupted_result(cfg, job.point, job.status if job.error is None else "time limit")
                result.attempt, result.config_digest = attempt, digest
                write_result(job.folder, result)
        elif result is None:
            tail = collections.deque((job.folder / LOG_FILE).read_text(errors="replace").splitlines(True), maxlen=60)
            result = crash_result(cfg, job.point, job.folder, returncode, list(tail), attempt, digest)
            write_result(job.folder, result)
        job.result = result.to_dict()
        if job.status == "running":
            job.status = result.status if result.status in JOB_STATES else "failed"

    def cancel(self, job_id: str) -> Job | None:
        """Stop a queued or running job (its whole process group); None when there is no such job."""
        from runners.execute import stop_point_process

        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return job
            proc = self._procs.get(job_id)
            job.status = "cancelled"
            job.error = {"type": "Cancelled", "message": "the job was cancelled by a client.", "hint": ""}
            if proc is None:  # still queued: it never starts
                job.finished = time.time()
                self._configs.pop(job_id, None)
            with contextlib.suppress(OSError):
                job.save()
        if proc is not None:
            stop_point_process(proc, signal.SIGTERM, grace_s=10)
        return job

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

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every running job's process group and mark it (and every queued job) interrupted."""
        from runners.execute import stop_point_process

        self._stopping.set()
        with self._lock:
            running = list(self._procs.items())
            for job in self._jobs.values():
                if job.status in ("queued", "running"):
                    job.status = "interrupted"
                    job.error = {
                        "type": "Interrupted",
                        "message": "the server shut down before this job finished.",
                        "hint": "submit the job again.",
                    }
                    if job.id not in self._procs:
                        job.finished = time.time()
                        with contextlib.suppress(OSError):
                            job.save()
        for _, proc in running:
            stop_point_process(proc, signal.SIGTERM, grace_s=grace_s)
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=grace_s + 5)


def _environment_of(cfg: HarnessConfig) -> dict[str, str]:
    """A job's process environment: the clean one, plus the key of the operator's target it loads (a job cannot set
    bench.api_key_env, so a name there is the operator's)."""
    key_env = cfg.bench.api_key_env if cfg.bench.target == "url" else None
    return job_environment(extra={key_env: os.environ[key_env]} if key_env else None)


def _read_result_file(folder: Path) -> dict[str, Any] | None:
    from runners.records import load_result

    result = load_result(folder)
    return result.to_dict() if result is not None else None
