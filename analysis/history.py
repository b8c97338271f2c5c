"""Run history: the sweeps and runs under an outputs folder, and one figure followed across them.

A finished sweep appends a line to `<outputs>/runs.jsonl` (the outputs folder is the sweep folder's parent, or the
folder above `multirun/`). The index is a convenience, never the only copy: every line is rebuilt from the result
files, so a missing or stale index is made again from the folders (`list_runs` adds sweeps it lacks and drops
those whose folder is gone). A sweep folder is one holding `command.txt`; a result.json outside any sweep folder is
a run of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any

from analysis.table import point_labels, split_metric

INDEX = "runs.jsonl"


def outputs_root(sweep_folder: Path) -> Path:
    """Where the index of a sweep folder is kept."""
    parent = sweep_folder.resolve().parent
    return parent.parent if parent.name == "multirun" else parent


def _results(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.rglob("result.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable result is the analysis's to report, not the index's
        if isinstance(data, dict) and "point" in data:
            data["path"] = str(path)
            found.append(data)
    return found


def _started(result: dict[str, Any]) -> str:
    """The point's start (results written before it was recorded: the file's time)."""
    started = (result.get("environment") or {}).get("started_utc")
    if started:
        return str(started)
    stamp = os.path.getmtime(result["path"])
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def describe_run(folder: Path, root: Path) -> dict[str, Any] | None:
    """The index line of a sweep (or single run) folder; None when it holds no result."""
    results = _results(folder)
    if not results:
        return None
    command_file = folder / "command.txt"
    command = command_file.read_text().strip() if command_file.is_file() else ""
    commits = sorted({str((r.get("environment") or {}).get("git_commit")) for r in results} - {"None"})
    times = sorted(_started(r) for r in results)
    try:
        where = str(folder.resolve().relative_to(root.resolve()))
    except ValueError:
        where = str(folder.resolve())
    return {
        "folder": where,
        "command": command,
        "started_utc": times[0],
        "last_point_utc": times[-1],
        "git_commits": commits,
        "points": len(results),
        "ok": sum(r.get("status") == "ok" for r in results),
        "failed": sum(r.get("status") != "ok" for r in results),
    }


def record_run(sweep_folder: Path) -> Path | None:
    """Append (or refresh) a finished sweep's line in its outputs folder's index; the index path, or None when
    there is nothing to record. An index that cannot be written is not an error: it is rebuilt when next read."""
    root = outputs_root(sweep_folder)
    line = describe_run(sweep_folder, root)
    if line is None:
        return None
    try:
        runs = [r for r in _read_index(root) if r["folder"] != line["folder"]]
        _write_index(root, [*runs, line])
    except OSError:
        return None
    return root / INDEX


def _read_index(root: Path) -> list[dict[str, Any]]:
    path = root / INDEX
    if not path.is_file():
        return []
    runs = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue  # a torn line is rebuilt from the folders
        if isinstance(entry, dict) and isinstance(entry.get("folder"), str):
            runs.append(entry)
    return runs


def _write_index(root: Path, runs: list[dict[str, Any]]) -> None:
    from harness.result import write_text_atomic

    runs = sorted(runs, key=lambda r: (r.get("started_utc", ""), r["folder"]))
    write_text_atomic(root / INDEX, "".join(json.dumps(r, sort_keys=True) + "\n" for r in runs))


def _run_folders(root: Path) -> list[Path]:
    """Sweep folders (holding command.txt) and the folders of results outside any sweep."""
    sweeps = {p.parent for p in root.rglob("command.txt")}
    singles = set()
    for result in root.rglob("result.json"):
        if not any(parent in sweeps for parent in result.parents):
            singles.add(result.parent)
    return sorted(sweeps | singles)


def _newest_result(folder: Path) -> float:
    times = [p.stat().st_mtime for p in folder.rglob("result.json")]
    return max(times, default=0.0)


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under `root`, oldest first: the index, with the sweeps it lacks added from the folders and the
    ones whose folder is gone dropped (the index is rewritten when that changed anything)."""
    indexed = {r["folder"]: r for r in _read_index(root)}
    index_time = (root / INDEX).stat().st_mtime if (root / INDEX).is_file() else 0.0
    present, stale = {}, False
    for folder in _run_folders(root):
        key = str(folder.resolve().relative_to(root.resolve()))
        line = indexed.get(key)
        if line is None or _newest_result(folder) > index_time:  # new, or a point finished since (a running sweep)
            line, stale = describe_run(folder, root), True
        present[key] = line
    runs = [r for r in present.values() if r is not None]
    if stale or set(indexed) != {r["folder"] for r in runs}:
        with contextlib.suppress(OSError):  # a read-only outputs folder is listed all the same
            _write_index(root, runs)
    return sorted(runs, key=lambda r: (r.get("started_utc", ""), r["folder"]))


def metric_history(root: Path, runs: list[dict[str, Any]], metric: str, model: str | None) -> list[dict[str, Any]]:
    """One row per run and point having `metric` (a name with its case, or a name for every case): when, which
    commit, which point, the figure."""
    name, case = split_metric(metric)
    rows = []
    for run in runs:
        folder = Path(run["folder"])
        ok = [r for r in _results(folder if folder.is_absolute() else root / folder) if r.get("status") == "ok"]
        # A point's name within its run (the fields swept in it), so one point is followed from run to run.
        for result, label in zip(ok, point_labels(ok) if ok else [], strict=True):
            if model and result["point"].get("model") != model:
                continue
            for key, stat in (result.get("metrics") or {}).items():
                k_name, k_case = split_metric(key)
                if k_name != name or ("[" in metric and k_case != case) or not isinstance(stat, dict):
                    continue
                rows.append({
                    "started_utc": _started(result),
                    "run": run["folder"],
                    "git_commit": str((result.get("environment") or {}).get("git_commit") or "")[:10],
                    "point": label,
                    "metric": key,
                    "mean": stat.get("mean"),
                    "ci95": stat.get("ci95"),
                    "unit": stat.get("unit", ""),
                })  # fmt: skip
    return sorted(rows, key=lambda r: (r["point"], r["metric"], r["started_utc"]))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    """`harness runs [FOLDER] [--metric M [--model X] [--plot FILE]]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="harness runs", description="The sweeps under an outputs folder, and a "
                                     "figure followed across them.")  # fmt: skip
    parser.add_argument("folder", nargs="?", type=Path, default=Path("outputs"), help="default: outputs")
    parser.add_argument("--metric", help="a metric with its case, e.g. 'decode_tok_s[prompt=128]' (no case: all)")
    parser.add_argument("--model", help="only points of this model entry")
    parser.add_argument("--plot", type=Path, help="where the metric's plot goes (default: <folder>/runs_<metric>.png)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"harness runs: {args.folder} is not a folder; give the outputs folder sweeps write to.", file=sys.stderr)
        return 2
    runs = list_runs(args.folder)
    if not runs:
        print(f"no runs under {args.folder} (a run or sweep folder holds result.json files)")
        return 0
    if args.metric is None:
        header = ["started (UTC)", "points", "ok", "failed", "commit", "folder", "command"]
        lines = [
            [r["started_utc"], str(r["points"]), str(r["ok"]), str(r["failed"]),
             ",".join(c[:10] for c in r["git_commits"]) or "-", r["folder"], r["command"]]
            for r in runs
        ]  # fmt: skip
        print(_table([header, *lines]))
        return 0
    rows = metric_history(args.folder, runs, args.metric, args.model)
    if not rows:
        known = sorted({split_metric(k)[0] for r in runs for res in _results(args.folder / r["folder"])
                        for k in res.get("metrics", {})})  # fmt: skip
        import difflib

        close = difflib.get_close_matches(split_metric(args.metric)[0], known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        which = f" of model {args.model}" if args.model else ""
        print(f"harness runs: no ok point{which} has the metric {args.metric!r}.{hint}", file=sys.stderr)
        return 2
    header = ["started (UTC)", "commit", "point", "metric", "mean", "ci95", "unit"]
    lines = [[r["started_utc"], r["git_commit"] or "-", r["point"], r["metric"], f"{r['mean']:.4g}",
              f"±{r['ci95']:.2g}" if r["ci95"] is not None else "", r["unit"]] for r in rows]  # fmt: skip
    print(_table([header, *lines]))
    from analysis.plots import metric_over_runs

    safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in args.metric)
    path = metric_over_runs(rows, args.plot or args.folder / f"runs_{safe}.png")
    print(f"plot: {path}")
    return 0
