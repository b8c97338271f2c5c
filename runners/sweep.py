"""Sweep-level pieces: the pre-check of a whole sweep command, the folder it writes to, and what it left there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from harness.config import NOT_MEASURED, check_group_choices, compose_config
from harness.errors import ConfigError
from harness.overrides import check_fields_apply, check_keys, compose_point, hydra_error, is_hydra_key, parse
from harness.result import Result

# Overrides that change how a sweep runs, not what it measures: the same sweep with or without them resumes
# in the same folder.
_NOT_PART_OF_SWEEP = (*NOT_MEASURED, "hydra/launcher", "hydra.launcher")

last_sweep_dir: list[Path] = []


def sweep_id(args: list[str]) -> str:
    """A stable folder name for a sweep command: its experiment (if any) and a hash of its overrides."""
    overrides = sorted(
        a
        for a in args
        if "=" in a and not a.startswith("-") and not a.lstrip("+~").split("=")[0].startswith(_NOT_PART_OF_SWEEP)
    )
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:10]
    experiment = next((a.split("=", 1)[1] for a in overrides if a.lstrip("+").startswith("experiment=")), "sweep")
    return f"{experiment}-{digest}"


class RememberSweepDir(Callback):
    """Keeps the resolved sweep folder, so the entry point can summarize points run by any launcher, and writes
    the command beside the points."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "command.txt").write_text(" ".join(["python -m harness -m", *config.hydra.overrides.task]) + "\n")
        last_sweep_dir[:] = [folder]

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Write the sweep's tables, plots and report.html beside its points (report=false skips it), and its line
        in the outputs folder's run index (`harness runs`)."""
        from analysis.history import record_run
        from harness import tracing, tracking

        if last_sweep_dir:
            record_run(last_sweep_dir[0])
        if config.get("report", True) and last_sweep_dir:
            write_report(last_sweep_dir[0])
        # The report joins the sweep's MLflow runs; a retry command where points were not logged or exported.
        for message in (tracking.finish_sweep(), tracing.finish_sweep(last_sweep_dir[0] if last_sweep_dir else None)):
            if message:
                print(message)


def write_report(folder: Path) -> int:
    """summary.csv/.md, plots and report.html of a sweep folder; a failure is reported, never raised (the
    points' results are already on disk, and `python -m analysis <folder>` redoes the report)."""
    from analysis.__main__ import main as analysis_main

    status = analysis_main([str(folder)])
    if status:
        print(f"the report was not written; once the cause is fixed: python -m analysis {folder}")
    return status


def output_folder(args: list[str]) -> Path:
    """Where a command line writes: its sweep folder (-m) or the folder of single runs."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = next((a.split("=", 1)[1] for a in args if a.startswith(key)), None)
    if given and "${" not in given:
        return Path(given)
    return Path("outputs") / ("multirun" if multirun else "runs")


def check_launcher(args: list[str]) -> None:
    """hydra/launcher=ray: the extra is installed, and a cluster address given answers (ray.init would wait for
    minutes on one that does not)."""
    if not any(a == "hydra/launcher=ray" for a in args):
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        raise ConfigError(
            "hydra/launcher=ray runs the points as Ray tasks, and Ray or hydra-ray-launcher is not installed here.",
            "pip install -e '.[ray]'.",
        )
    unknown = [a for a in args if a.startswith(("hydra.launcher.ray.init.", "hydra.launcher.ray.remote."))
               and not a.startswith("hydra.launcher.ray.init.address=")]  # fmt: skip
    if unknown:
        raise ConfigError(
            f"{unknown[0]} sets a Ray option the launcher's schema does not list, so Hydra would refuse it.",
            f"add a + in front: +{unknown[0]}.",
        )
    given = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.launcher.ray.init.address=")]
    address = given[-1] if given else None
    if not address or address in ("null", "auto", "local"):
        return
    import socket
    import urllib.parse

    parsed = urllib.parse.urlparse(address if "://" in address else f"ray://{address}")
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 10001), timeout=3):
            return
    except OSError as exc:
        raise ConfigError(
            f"hydra.launcher.ray.init.address={address}: nothing answers there ({exc}).",
            "start the cluster's head (ray start --head) or give its address (ray://head:10001, or host:6379 from "
            "a node of the cluster); leave the address out to start a local Ray instance.",
        ) from None


def check_output_folder(args: list[str]) -> None:
    """ConfigError before any point runs when the run's output folder cannot be written."""
    from harness.result import check_writable

    check_writable(
        output_folder(args),
        "the output folder",
        "run from a folder where outputs/ can be written, or give hydra.sweep.dir=<folder> "
        "(hydra.run.dir=<folder> for a single run)",
    )


def results_in(folder: Path) -> list[Result]:
    """The readable results under a sweep folder, in path order."""
    from runners.records import load_result

    found = []
    for path in sorted(folder.rglob("result.json")):
        result = load_result(path.parent)
        if result is not None:
            found.append(result)
    return found


# -- the pre-check: every point of the sweep valid before any runs -------------------------------------------
def expand(args: list[str]) -> list[list[str]]:
    """The points of a sweep as lists of plain overrides (Hydra's own basic-sweeper expansion), without
    Hydra's own settings."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = [o for o in map(parse, args) if not is_hydra_key(o.key_or_group)]
    if not any(o.is_sweep_override() for o in parsed):
        return [[o.input_line for o in parsed]]  # as given, repeated keys included (Hydra applies each)
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:  # a sweep Hydra cannot expand (e.g. an empty range)
        raise ConfigError(f"the sweep does not expand: {exc}", "check the sweep's values.") from None
    return batch


def _preset_sweep(overrides: list[str]) -> list[str]:
    """The sweep an experiment preset declares (hydra.sweeper.params), as overrides the command line's own
    values come after (and so win), as Hydra's basic sweeper does."""
    if not any(parse(o).key_or_group == "experiment" for o in overrides):
        return []
    first = expand(overrides)[0]
    try:
        params = compose_config(first, with_hydra=True).hydra.sweeper.get("params") or {}
    except Exception as exc:
        raise hydra_error(exc, first) from None
    return [f"{key}={value}" for key, value in params.items()]


def precheck(args: list[str], multirun: bool, counted: list[int] | None = None) -> set[str]:
    """Check a command line before Hydra runs anything: every override parses and names a group option or a known
    field, and every point of the sweep composes, validates and passes check_point. Returns the keys it sweeps
    (and puts the number of points in `counted`); raises ConfigError."""
    from runners.point import check_point  # imported here: the sweep's parent process stays free of torch

    overrides = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    check_group_choices(overrides)
    parsed = [parse(a) for a in overrides]
    check_keys(parsed)
    sweeps = [o for o in parsed if o.is_sweep_override() and not is_hydra_key(o.key_or_group)]
    if sweeps and not multirun:
        raise ConfigError(
            f"{sweeps[0].input_line!r} sweeps over several values, but the command runs a single point.",
            "add -m (python -m harness -m ...) to run a sweep, or give one value.",
        )
    if multirun:
        preset = _preset_sweep(overrides)
        sweeps += [o for o in map(parse, preset) if o.is_sweep_override()]
        overrides = preset + overrides
    points = expand(overrides)
    if counted is not None:
        counted[:] = [len(points)]
    for point in points:
        validated, _ = compose_point(point)
        check_fields_apply(point, validated)
        check_point(validated)
    return {o.key_or_group for o in sweeps}
