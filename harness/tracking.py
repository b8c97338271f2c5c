"""Experiment tracking: every finished point of a sweep as an MLflow run, logged by the sweep's own process from
the point's files (so logging never runs beside a measurement).

A sweep is one experiment, named after its folder (`sweep-<hash>`, stable when the sweep resumes); a point is a
run named by its label, with the resolved config as params (flattened), every metric (a metric `ttft_ms[prompt=128]`
is logged as `ttft_ms/prompt_128` with its statistics as `ttft_ms/prompt_128.p50` and so on: MLflow keys cannot
hold brackets), tags for the point's groups, engine, device, status and git commit, and result.json, samples.csv
and the point's other files as artifacts; the sweep's report joins every run of the sweep when it is written.

Logging is idempotent: a run carries its point's attempt id (`harness.attempt`), and a point already logged is not
logged again (a resumed sweep, `harness track` run twice). A tracking server that cannot be reached does not fail
or slow the sweep: the first failure is kept, later points are not tried against the same server, each point's
result says why it was not logged, and `harness track <sweep folder>` sends them once the server is back.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness.config import flatten
from harness.errors import ConfigError

TIMEOUT_S = 5.0  # a tracking server slower than this to answer is treated as down for the rest of the sweep
STATS = ("p50", "p90", "p95", "p99", "ci95", "n")
ARTIFACTS = ("result.json", "samples.csv", "telemetry.csv", "cases.jsonl", "error.log", "server.log")
REPORT_FILES = ("report.html", "summary.md", "summary.csv")
_KEY_UNSAFE = re.compile(r"[^\w\-. /]")


def require_mlflow(import_it: bool = True) -> Any:
    """The mlflow package (or, import_it=False, only whether it is there), or a ConfigError naming the extra."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "tracking=mlflow logs each point to MLflow, and the mlflow package is not installed here.",
            "pip install -e '.[tracking]' (or pip install mlflow), or drop tracking=mlflow.",
        )
    if not import_it:
        return None
    import mlflow

    return mlflow


def metric_key(key: str) -> str:
    """A harness metric name as an MLflow metric key: `ttft_ms[prompt=128,trial=2]` -> `ttft_ms/prompt_128/trial_2`."""
    name, _, case = key.partition("[")
    case = case.rstrip("]")
    parts = [name, *(p.replace("=", "_") for p in case.split(",") if p)]
    return _KEY_UNSAFE.sub("_", "/".join(parts))[:250]


def default_uri(outputs: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (outputs / "mlruns").resolve().as_uri()


class MlflowTracker:
    """Logs points of one sweep to one MLflow experiment."""

    def __init__(self, uri: str | None, experiment: str, outputs: Path) -> None:
        self.uri = uri or default_uri(outputs)
        self.experiment = experiment
        self.down: str | None = None  # why the server was not reached (later points are not tried)
        self.folder: Path | None = None  # the sweep's folder
        self._client: Any = None
        self._experiment_id: str | None = None

    def _ready(self) -> Any:
        if self.down:
            raise TrackingError(f"not sent: {self.down}")
        if self._client is None:
            if self.uri.startswith(("http://", "https://")):
                try:  # a quick look first: mlflow's own client retries for minutes before it gives up
                    with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=TIMEOUT_S) as response:
                        response.read()
                except (urllib.error.URLError, OSError) as exc:
                    self.down = f"the MLflow server at {self.uri} did not answer ({exc})"
                    raise TrackingError(self.down) from None
            mlflow = require_mlflow()
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(TIMEOUT_S * 2)))
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            self._client = client
        return self._client

    def _existing(self, attempt: str) -> str | None:
        runs = self._client.search_runs(
            [self._experiment_id], filter_string=f"tags.`harness.attempt` = '{attempt}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def log_point(self, folder: Path) -> str:
        """Log the point in `folder` (its result.json); its run id. TrackingError when it could not be logged."""
        try:
            client = self._ready()
            return self._log(client, folder)
        except TrackingError:
            raise
        except Exception as exc:  # mlflow raises many kinds (REST errors, connection errors): one reason each
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if "Connection" in reason or "Max retries" in reason or "timed out" in reason:
                self.down = f"the MLflow server at {self.uri} stopped answering ({reason})"
            raise TrackingError(reason) from None

    def _log(self, client: Any, folder: Path) -> str:
        from mlflow.entities import Metric, Param

        result = json.loads((folder / "result.json").read_text())
        attempt = result.get("attempt") or folder.name
        existing = self._existing(attempt)
        if existing:
            return existing
        point = result.get("point", {})
        engine = (result.get("resolved") or {}).get("engine") or {}
        placement = (result.get("resolved") or {}).get("placement") or {}
        tags = {
            "mlflow.runName": " ".join(f"{k}={v}" for k, v in point.items())[:250],
            "harness.attempt": attempt,
            "harness.status": result.get("status", ""),
            "harness.folder": str(folder),
            "harness.engine": str(engine.get("name") or point.get("engine", "")),
            "harness.device": str(placement.get("device") or ""),
            "harness.git_commit": str((result.get("environment") or {}).get("git_commit") or ""),
            **{f"harness.point.{k}": str(v)[:500] for k, v in point.items()},
        }
        run = client.create_run(self._experiment_id, tags=tags)
        run_id = run.info.run_id
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(result.get("config") or {}).items()]
        metrics = []
        for key, stat in (result.get("metrics") or {}).items():
            if not isinstance(stat, dict) or not isinstance(stat.get("mean"), int | float):
                continue
            base = metric_key(key)
            metrics.append(Metric(base, float(stat["mean"]), 0, 0))
            for name in STATS:
                value = stat.get(name)
                if isinstance(value, int | float) and value == value:  # not NaN
                    metrics.append(Metric(f"{base}.{name}"[:250], float(value), 0, 0))
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for name in ARTIFACTS:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name))
        client.set_terminated(run_id, "FINISHED" if result.get("status") == "ok" else "FAILED")
        return run_id

    def log_report(self, sweep_folder: Path, run_ids: list[str]) -> None:
        """The sweep's report files (and plots) in every run of the sweep, under report/."""
        client = self._ready()
        for run_id in run_ids:
            for name in REPORT_FILES:
                if (sweep_folder / name).is_file():
                    client.log_artifact(run_id, str(sweep_folder / name), "report")
            if (sweep_folder / "plots").is_dir():
                client.log_artifacts(run_id, str(sweep_folder / "plots"), "report/plots")


class TrackingError(RuntimeError):
    """A point that could not be logged, with why."""


# The sweep running in this process: its tracker, the runs it logged and the points it could not log.
current: list[MlflowTracker] = []
logged: list[str] = []
not_logged: list[str] = []


def track_point(folder: Path, uri: str | None, sweep_folder: Path, outputs: Path) -> dict[str, Any]:
    """Log one finished point of the sweep (or single run) running in this process; what to record in its
    result."""
    if not current:
        current.append(MlflowTracker(uri, sweep_folder.resolve().name, outputs))
        current[0].folder = sweep_folder
    tracker = current[0]
    try:
        run_id = tracker.log_point(folder)
    except TrackingError as exc:
        not_logged.append(str(folder))
        return {"backend": "mlflow", "uri": tracker.uri, "logged": False, "why": str(exc)}
    logged.append(run_id)
    return {"backend": "mlflow", "uri": tracker.uri, "experiment": tracker.experiment, "run_id": run_id,
            "logged": True}  # fmt: skip


def finish_sweep() -> str | None:
    """After the sweep's report: the report joins the sweep's runs; the retry command when points were not logged."""
    if not current:
        return None
    tracker = current[0]
    sweep_folder = tracker.folder
    message = None
    if logged and not tracker.down and sweep_folder is not None:
        try:
            tracker.log_report(sweep_folder, list(dict.fromkeys(logged)))
        except Exception as exc:  # the runs are there; the report is said to be missing, never raised
            message = f"the report was not added to the MLflow runs ({type(exc).__name__}: {exc})"
    if not_logged:
        why = tracker.down or "see details.tracking in their result.json"
        message = (
            f"{len(not_logged)} point(s) were not logged to MLflow ({why}). Once the server answers: "
            f"harness track {sweep_folder} --uri {tracker.uri}"
        )
    current.clear()
    logged.clear()
    not_logged.clear()
    return message


def track_folder(folder: Path, uri: str | None, outputs: Path | None = None) -> tuple[list[str], list[str]]:
    """Log every point under a sweep folder (those already logged are found, not logged again) and its report:
    (run ids, failures as `point folder: why`). The retry command's work."""
    tracker = MlflowTracker(uri, folder.resolve().name, outputs or folder.resolve().parent)
    runs, failures = [], []
    for result in sorted(folder.rglob("result.json")):
        try:
            runs.append(tracker.log_point(result.parent))
        except TrackingError as exc:
            failures.append(f"{result.parent}: {exc}")
    if runs and not tracker.down:
        try:
            tracker.log_report(folder, runs)
        except Exception as exc:  # the points are logged; a report that could not join them is said, not raised
            failures.append(f"{folder} (report): {type(exc).__name__}: {exc}")
    return runs, failures


def main(argv: list[str] | None = None) -> int:
    """`harness track <sweep folder> [--uri URI]`: log a sweep's points (those not logged yet) and its report."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="harness track", description="Log a sweep's points to MLflow (again).")
    parser.add_argument("folder", type=Path, help="a sweep (or run) folder holding result.json files")
    parser.add_argument("--uri", help="the MLflow server or folder (default: MLFLOW_TRACKING_URI, else "
                        "<outputs>/mlruns)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"harness track: {args.folder} is not a folder of results.", file=sys.stderr)
        return 2
    try:
        require_mlflow(import_it=False)
    except ConfigError as exc:
        from harness.errors import format_error

        print(format_error(exc), file=sys.stderr)
        return 2
    parent = args.folder.resolve().parent
    outputs = parent.parent if parent.name == "multirun" else parent
    runs, failures = track_folder(args.folder, args.uri, outputs)
    print(f"{len(set(runs))} point(s) in MLflow experiment {args.folder.resolve().name!r}")
    for failure in failures:
        print(f"  not logged: {failure}", file=sys.stderr)
    return 1 if failures else 0
