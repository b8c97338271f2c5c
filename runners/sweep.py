"""Sweep-level pieces: the folder a sweep command writes to, and what the sweep left there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from harness.config import NOT_MEASURED
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
        """Write the sweep's tables, plots and report.html beside its points (report=false skips it)."""
        if config.get("report", True) and last_sweep_dir:
            write_report(last_sweep_dir[0])


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
    from runners.execute import load_result

    found = []
    for path in sorted(folder.rglob("result.json")):
        result = load_result(path.parent)
        if result is not None:
            found.append(result)
    return found
