"""`python -m harness [-m] group=option …`: a thin Hydra entry point around runners.execute_point.

Before Hydra runs anything, every override is parsed and every point of the sweep composed and validated
(runners.sweep.precheck), so a user mistake is one paragraph and exit status 2, and no point runs first.
SIGINT and SIGTERM stop the point that is running (its result says Interrupted), then the sweep's summary and
report are still written and the exit status is 130 or 143.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from harness import progress
from harness.config import GROUPS, NOT_MEASURED, conf_dir, register_schemas, validate
from harness.errors import ConfigError, HarnessError, Interrupted, StorageError, format_error

_outcomes: list[tuple[str, str]] = []  # (status, summary line) of each point run in this process
_LABEL = ("model", "quant", "engine", "bench")  # what the progress display names a point by, with swept fields
_total: list[int] = [1]  # the points of the command (the pre-check counts them)
_NO_PRECHECK = ("-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _point_status(result, gate: str | None) -> str:
    if gate:
        return "below_gate"
    if result.status != "ok" and (result.error or {}).get("type") == "Interrupted":
        return "interrupted"
    if result.status != "ok" and (result.error or {}).get("type") == "ConfigError":
        return "config_error"
    return result.status


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _point(cfg: DictConfig) -> None:
    from runners import execute_point, summary_line
    from runners.benches.e2e import below_gate
    from runners.point import preflight

    try:
        validated = validate(cfg)
        preflight(validated)
    except ConfigError as exc:  # a user mistake: stop the whole run before any model is touched
        print(format_error(exc), file=sys.stderr)
        raise SystemExit(2) from None

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    point = {g: str(hc.runtime.choices.get(g, getattr(validated, g).name)) for g in GROUPS}
    point.update(swept_fields(list(hc.overrides.task)))
    shown = progress.current[0] if progress.current else None
    if shown is not None:
        shown.start_point(" ".join(f"{k}={v}" for k, v in point.items() if k in _LABEL or k in _swept_keys))
    try:
        result, skipped = execute_point(validated, out_dir, point)
    except KeyboardInterrupt as stop:  # the point's result says Interrupted; the sweep stops here
        from runners.records import load_result

        stopped = load_result(out_dir)
        if stopped is not None:
            _outcomes.append(("interrupted", summary_line(stopped, out_dir, _swept_keys)))
        raise Interrupted(getattr(stop, "signum", signal.SIGINT)) from None
    except StorageError as exc:  # the disk refused a write: nothing more can be recorded
        print(format_error(exc), file=sys.stderr)
        _outcomes.append(("failed", f"[failed] {' '.join(f'{k}={v}' for k, v in point.items())}: {exc.cause}"))
        raise SystemExit(1) from None
    line = summary_line(result, out_dir, _swept_keys)
    if skipped:
        line = "[skipped: already ok] " + line.split("] ", 1)[1]
    elif result.status == "ok" and validated.print_text and result.outputs and validated.bench.name == "smoke":
        print(f"\n{point['model']}> {result.outputs[0]['text'].strip()}")
    gate = below_gate(result, validated.validation.min_pass_rate)
    if gate:
        line += "\n  " + gate
    _outcomes.append((_point_status(result, gate), line))
    if validated.tracking == "mlflow" or validated.telemetry.otlp_endpoint:
        _track(validated, result, out_dir, hc)
    if shown is not None:
        shown.finish_point(result.status, skipped)
    print(line, flush=True)


def _track(cfg, result, out_dir: Path, hc) -> None:
    """The finished point to MLflow and its trace over OTLP, from this (the sweep's) process, after the point (never
    beside a measurement); its result says whether each was sent, and why not."""
    from hydra.types import RunMode

    from analysis.history import outputs_root
    from harness.result import write_result

    sweep = Path(str(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else out_dir.parent
    if cfg.tracking == "mlflow":
        from harness.tracking import track_point

        record = track_point(out_dir, cfg.tracking_uri, sweep, outputs_root(sweep))
        result.details["tracking"] = record
        if not record["logged"]:
            print(f"  not logged to MLflow: {record['why']}", flush=True)
    if cfg.telemetry.otlp_endpoint:
        from harness.tracing import export_point

        write_result(out_dir, result)  # the trace is built from the files as they stand
        exported = export_point(out_dir, cfg.telemetry.otlp_endpoint, cfg.telemetry.service_name)
        result.details["telemetry"] = exported
        if not exported["exported"]:
            print(f"  trace not exported: {exported['why']}", flush=True)
    write_result(out_dir, result)


def swept_fields(task_overrides: list[str]) -> dict[str, str]:
    """The point's overrides of fields outside the groups (seed=2, bench.max_new_tokens=8): with the group
    choices they are the point's identity, so tables and plots show one row per point."""
    from harness.overrides import parse

    fields = {}
    for text in task_overrides:
        o = parse(text)
        key = o.key_or_group
        if key in GROUPS or key == "experiment" or key.startswith(("hydra", *NOT_MEASURED)):
            continue
        fields[key] = text.split("=", 1)[1] if "=" in text else "null"  # as typed
    return fields


# The fields a sweep command varies (seed=1,2,3), as the pre-check found them: the summary lines name them.
_swept_keys: set[str] = set()
_received: list[int] = []


def _on_signal(signum: int, frame) -> None:
    if _received:  # a second signal while stopping: leave the stopping to what is already under way
        return
    _received.append(signum)
    raise Interrupted(signum)


def _precheck(args: list[str]) -> int | None:
    """Exit status 2 when the command line holds a mistake, None when it may run."""
    if any(a in _NO_PRECHECK for a in args):
        return None
    from runners.sweep import check_launcher, check_output_folder, precheck

    try:
        _swept_keys.update(precheck(args, multirun=any(a in ("-m", "--multirun") for a in args), counted=_total))
        check_output_folder(args)
        check_launcher(args)
    except ConfigError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    return None


def _forks_points(args: list[str]) -> bool:
    """Points will be forked from this process's fork server: isolation=process (the default) and Hydra's own
    launcher (joblib runs points in worker processes, each of which starts its own server)."""
    isolation = [a.split("=", 1)[1] for a in args if a.lstrip("+~").startswith("isolation=")]
    return (not isolation or isolation[-1] == "process") and not any(a.startswith("hydra/launcher=") for a in args)


def _summarize() -> int:
    counts = {s: sum(status == s for status, _ in _outcomes) for s in ("failed", "config_error", "below_gate")}
    interrupted = sum(status == "interrupted" for status, _ in _outcomes)
    if len(_outcomes) > 1 or interrupted:
        print(f"\nsweep summary ({len(_outcomes)} points):")
        for _, line in _outcomes:
            print("  " + line.splitlines()[0])
        ok = sum(status == "ok" for status, _ in _outcomes)
        tail = "".join(
            f", {n} {what}"
            for n, what in (
                (counts["failed"], "failed"),
                (counts["config_error"], "failed on a configuration error"),
                (counts["below_gate"], "below the release gate"),
                (interrupted, "interrupted"),
            )
            if n
        )
        print(f"{ok} of {len(_outcomes)} points ok" + tail)
    if counts["config_error"]:
        return 2
    if counts["failed"] or interrupted:
        return 1
    return 3 if counts["below_gate"] else 0


def _report_after_stop() -> None:
    """The sweep's tables and report, from the points that finished, after a signal stopped it."""
    from runners.sweep import last_sweep_dir, write_report

    if last_sweep_dir:
        write_report(last_sweep_dir[0])


def main() -> int:
    args = sys.argv[1:]
    status = _precheck(args)
    if status is not None:
        return status
    from runners.sweep import last_sweep_dir, results_in, sweep_id

    if any(a.startswith("hydra/launcher=joblib") for a in args):
        print(
            "warning: hydra/launcher=joblib runs points in parallel; they share the cores and memory bandwidth, "
            "so their timings disturb each other. Use it for quality or smoke sweeps, not for latency figures.",
            file=sys.stderr,
        )

    os.environ[progress.ENV] = "lines"  # the points' processes (forked or fresh) report their progress on stdout
    progress.current[:] = [progress.SweepProgress(_total[0])]
    if _forks_points(args):
        from runners.forkserver import prestart

        prestart()
    # The same sweep command writes to the same folder, so running it again resumes it.
    os.environ["HARNESS_SWEEP_ID"] = sweep_id(args)
    register_schemas()
    previous = {s: signal.signal(s, _on_signal) for s in EXIT_INTERRUPTED}
    try:
        _point()
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        for s, handler in previous.items():  # a second Ctrl-C while the report is written ends the process
            signal.signal(s, handler)
        print(f"\nstopped by {signal.Signals(signum).name}: the running point was recorded as Interrupted.")
        _summarize()
        if "report=false" not in args:
            _report_after_stop()
        return EXIT_INTERRUPTED[signal.Signals(signum)]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        progress.current[0].close()
        progress.current.clear()
    from harness import tracing, tracking

    for message in (tracking.finish_sweep(), tracing.finish_sweep(None)):  # a single run's (a sweep's were said)
        if message:
            print(message)

    if not _outcomes and last_sweep_dir:  # a launcher ran the points in other processes: read what they left
        from runners.benches.e2e import below_gate

        for r in results_in(last_sweep_dir[0]):
            point = " ".join(f"{k}={v}" for k, v in r.point.items())
            gate = below_gate(r, r.config.get("validation", {}).get("min_pass_rate"))
            line = f"[{r.status}] {point}" + (f" ({gate})" if gate else "")
            _outcomes.append((_point_status(r, gate), line))
    return _summarize()


def _main_guarded() -> int:
    try:
        return main()
    except HarnessError as exc:  # raised outside any point (e.g. writing the report on a full disk)
        print(format_error(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main_guarded())
