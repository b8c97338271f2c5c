"""`python -m analysis <sweep dir> [<sweep dir> …] [--compare [--fail-on EXPR …]] [--baseline quant=none]`

Reads result files only (never an engine), so reports can be made anywhere the folders are copied to.
Writes summary.csv, summary.md, plots/*.png and report.html into the first folder (or --out); with --compare,
compare.md and compare.csv of the per-metric deltas between the first folder and each other one; with
--fail-on (BASE NEW), gate.md and a JUnit XML file, and exit status 4 when a change is beyond its threshold and
significant. Exit statuses: 0 done (the gate passed), 1 a file could not be written, 2 bad input (a folder, a
--fail-on expression, a metric or a baseline of another config), 4 the regression gate failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.gate import GateError
from analysis.results import SchemaError, load_results

GROUP_KEYS = ("model", "quant", "attention", "engine", "workflow", "bench")


def _baseline(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in GROUP_KEYS or not value:
        raise argparse.ArgumentTypeError(
            f"--baseline takes group=option with a group among {', '.join(GROUP_KEYS)}"
            f" (for example quant=none), not {text!r}"
        )
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path, help="sweep (or run) folders holding result.json files")
    parser.add_argument("--compare", action="store_true", help="deltas of each folder against the first")
    parser.add_argument(
        "--baseline",
        type=_baseline,
        default=None,
        help="group=option (default quant=none; engine=transformers where the results compare engines)",
    )
    parser.add_argument("--out", type=Path, help="where to write (default: the first folder; NEW's with --fail-on)")
    parser.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="EXPR",
        help="with --compare BASE NEW: fail (exit 4) when METRIC[CASE].STAT moved the sign's way beyond the "
        "threshold and significantly, e.g. 'ttft_ms[prompt=128].p50:+5%%' or 'pass_rate:-0.05'",
    )
    parser.add_argument("--junit", type=Path, help="the gate's JUnit XML file (default: <out>/gate.junit.xml)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (SchemaError, FileNotFoundError, GateError) as exc:
        print(f"analysis: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the results are read; writing the tables, plots or report failed
        from harness.errors import format_error, storage_error

        where = str(args.out or args.folders[0])
        error = storage_error(exc, "the report", where, how_to_move="--out <folder>")
        print("analysis: " + format_error(error), file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from analysis.compare import compare
    from analysis.plots import all_plots
    from analysis.quality import case_agreement_table, model_quality_table
    from analysis.report import write_report
    from analysis.summary import default_baseline, write_summary
    from analysis.table import failures, tidy

    for folder in args.folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of results: give a run or sweep folder under outputs/.")
    if args.fail_on and not (args.compare and len(args.folders) == 2):
        print("analysis: --fail-on gates NEW against BASE: give --compare BASE NEW (two folders).", file=sys.stderr)
        return 2
    # A gate writes beside NEW: the stored baseline stays as it was.
    out = args.out or args.folders[1 if args.fail_on else 0]
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        if len(args.folders) < 2:
            print("analysis: --compare needs at least two folders.", file=sys.stderr)
            return 2
        sweeps = [load_results(f) for f in args.folders]
        if args.fail_on:
            return _gate(args, sweeps, out)
        text = compare(sweeps, [str(f) for f in args.folders], out)
        print(text)
        return 0
    results = load_results(*args.folders)
    if not results:
        print(
            f"analysis: no result.json under {', '.join(map(str, args.folders))}: give a folder of a run or a "
            "sweep under outputs/.",
            file=sys.stderr,
        )
        return 2
    frame = tidy(results)
    failed = failures(results)
    baseline = args.baseline or default_baseline(frame)
    tables = write_summary(frame, failed, out, baseline, model_quality_table(results), case_agreement_table(results))
    plots = all_plots(frame, results, out / "plots")
    commands = [p.read_text().strip() for f in args.folders if (p := f / "command.txt").is_file()]
    report = write_report(out, results, tables, plots, failed, baseline, commands)
    print(
        f"{len(results)} points ({len(failed)} not ok), {len(plots)} plots\n"
        f"  {out / 'summary.csv'}\n  {out / 'summary.md'}\n  {report}"
    )
    return 0


def _gate(args: argparse.Namespace, sweeps: list, out: Path) -> int:
    """--compare BASE NEW --fail-on …: compare.md as usual, then the gate's verdicts (gate.md, JUnit XML)."""
    from analysis.compare import compare
    from analysis.gate import GATE_FAILED, judge, parse_rule, write_gate

    rules = [parse_rule(text) for text in args.fail_on]  # every expression checked before anything is written
    verdicts = judge(rules, *sweeps)
    compare(sweeps, [str(f) for f in args.folders], out)
    junit = args.junit or out / "gate.junit.xml"
    print(write_gate(verdicts, out, junit))
    print(f"analysis: the gate's JUnit file: {junit}")
    return GATE_FAILED if any(v.failed for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
