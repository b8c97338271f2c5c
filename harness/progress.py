"""Progress of long work: a sweep's points done of its total with the time left, and what the running point does
(its phase, runs and confidence against the target, the serve level's requests, the workflow's cases).

A point reports through a `PointReporter`. Run by the sweep's own process (isolation=inline) it updates the sweep's
display directly; run in a process of its own (a fork-server child, a fresh interpreter) it writes one marked line
per update to its stdout, which the sweep reads (runners.execute) and hands to the display: points never write
over each other, and their own output passes through unchanged. Updates are coalesced at the source (at most
REPORT_HZ a second, phase changes at once).

The display (`SweepProgress`) is a live `rich` progress bar where stdout and stderr are terminals; anywhere else (a
CI log, a file) it is plain lines on stderr: one per phase change and finished point, and at most one per
PLAIN_INTERVAL_S otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

MARK = "@@harness-progress@@ "  # a point process's progress line starts with this
REPORT_HZ = 4.0
PLAIN_INTERVAL_S = 15.0
ENV = "HARNESS_PROGRESS"  # set by the sweep for the points it starts: "lines" = report on stdout


class PointReporter:
    """What a point is doing, sent to `sink` (None: nowhere)."""

    def __init__(self, sink: Callable[[dict[str, str]], None] | None) -> None:
        self.sink = sink
        self.state = {"phase": "", "detail": ""}
        self._last = 0.0

    def phase(self, name: str) -> None:
        if name != self.state["phase"]:
            self.state = {"phase": name, "detail": ""}
            self._send(force=True)

    def __call__(self, detail: str) -> None:
        self.state["detail"] = detail
        self._send(force=False)

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        if self.sink is None or (not force and now - self._last < 1.0 / REPORT_HZ):
            return
        self._last = now
        self.sink(dict(self.state))

    def done(self) -> None:
        """Nothing more to say: the last state as it stands."""
        if self.sink is not None:
            self.sink(dict(self.state))


def line_sink(stream: TextIO) -> Callable[[dict[str, str]], None]:
    """A point process's sink: marked lines on its stdout, read by the sweep."""
    lock = threading.Lock()  # a serve level reports from a thread of its own

    def send(state: dict[str, str]) -> None:
        with lock:
            stream.write(MARK + json.dumps(state) + "\n")
            stream.flush()

    return send


def parse(line: str) -> dict[str, str] | None:
    """The state a marked line carries; None for any other line (the point's own output)."""
    if not line.startswith(MARK):
        return None
    try:
        state = json.loads(line[len(MARK) :])
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class SweepProgress:
    """The sweep's display: points done of `total` (skipped ones count as done and not in the time per point), the
    time left at the mean time of the points run so far, and the running point's state."""

    def __init__(self, total: int, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.total, self.done, self.ran_s, self.ran = total, 0, 0.0, 0
        self.stream = stream or sys.stderr
        if interactive is None:
            interactive = sys.stdout.isatty() and self.stream.isatty() and not os.environ.get("CI")
        self.interactive = interactive
        self.label, self.state = "", {"phase": "", "detail": ""}
        self._t_point = time.monotonic()
        self._last_plain = 0.0
        self._live: Any = None
        self._task: Any = None
        if interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._live = Progress(
                TextColumn("[bold]points"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[left]}"),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream),
                transient=True,
            )
            self._task = self._live.add_task("sweep", total=total, left="", status="")
            self._live.start()

    # -- what the sweep says ------------------------------------------------------------------------------------
    def start_point(self, label: str) -> None:
        self.label, self.state, self._t_point = label, {"phase": "starting", "detail": ""}, time.monotonic()
        if self._live is not None:  # plain lines: its first phase names it
            self._show(force=True)

    def update(self, state: dict[str, str]) -> None:
        changed = state.get("phase") != self.state.get("phase")
        self.state = {"phase": str(state.get("phase", "")), "detail": str(state.get("detail", ""))}
        self._show(force=changed)

    def finish_point(self, status: str, skipped: bool = False) -> None:
        self.done += 1
        if not skipped:
            self.ran += 1
            self.ran_s += time.monotonic() - self._t_point
        self.state = {"phase": status, "detail": ""}
        self._show(force=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- how it is shown ----------------------------------------------------------------------------------------
    def time_left(self) -> float | None:
        if not self.ran:
            return None
        return self.ran_s / self.ran * (self.total - self.done)

    def status_text(self) -> str:
        parts = [self.label, self.state["phase"], self.state["detail"]]
        return " · ".join(p for p in parts if p)

    def _show(self, force: bool) -> None:
        left = self.time_left()
        left_text = f"about {_minutes(left)} left" if left is not None and self.done < self.total else ""
        if self._live is not None:
            self._live.update(self._task, completed=self.done, left=left_text, status=self.status_text()[:160])
            return
        now = time.monotonic()
        if not force and now - self._last_plain < PLAIN_INTERVAL_S:
            return
        self._last_plain = now
        head = f"[progress {self.done}/{self.total} points" + (f", {left_text}" if left_text else "") + "]"
        self.stream.write(f"{head} {self.status_text()}\n")
        self.stream.flush()


# The display of the sweep running in this process (None outside a sweep), and the reporter of the point running
# in this process: set by the entry point and the point's process.
current: list[SweepProgress] = []


def reporter_for_this_process() -> PointReporter:
    """A point's reporter: to the sweep's display in this process, to stdout in a point process the sweep started
    (ENV=lines), else nowhere (a test, a server's job)."""
    if current:
        return PointReporter(current[0].update)
    if os.environ.get(ENV) == "lines":
        return PointReporter(line_sink(sys.stdout))
    return PointReporter(None)
