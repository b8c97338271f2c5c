"""Sweep-level pieces: the folder a sweep command writes to, and what the sweep left there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from harness.result import Result

# Overrides that change how a sweep runs, not what it measures: the same sweep with or without them resumes
# in the same folder.
_NOT_PART_OF_SWEEP = ("force", "print_text", "isolation", "report", "validation", "hydra/launcher", "hydra.launcher")

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
        if not config.get("report", True) or not last_sweep_dir:
            return
        from analysis.__main__ import main as analysis_main

        analysis_main([str(last_sweep_dir[0])])


def results_in(folder: Path) -> list[Result]:
    """The readable results under a sweep folder, in path order."""
    from runners.execute import load_result

    found = []
    for path in sorted(folder.rglob("result.json")):
        result = load_result(path.parent)
        if result is not None:
            found.append(result)
    return found
