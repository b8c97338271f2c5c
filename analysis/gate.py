"""The regression gate: `--compare BASE NEW --fail-on EXPR` fails when a figure moved the wrong way by more than a
threshold and the move is significant by the figures' intervals.

An expression is `METRIC[CASE].STAT:±THRESHOLD[%]`:
- METRIC[CASE]: a metric as results name it (`ttft_ms[prompt=128]`); without a case it covers every case of the
  metric (`pass_rate` covers `pass_rate` and `pass_rate[concurrency=4]`).
- .STAT: mean (the default), p50, p90, p95 or p99.
- ±THRESHOLD: the sign is the bad direction (`+5%`: a rise of more than 5% fails, for latencies; `-0.05`: a fall of
  more than 0.05 fails, for pass rates and throughputs); `%` makes it relative to BASE, without it the threshold is
  in the metric's unit.

Significance: the two figures' 95% intervals do not overlap (a mean's ci95, or a proportion's Wilson bounds; a
percentile's order-statistic interval p50_low..p50_high). A figure without an interval on the needed side cannot
be shown to have moved, so it never fails the gate; the verdict says so. Points are matched by their group choices
and swept fields; a pair whose measured configuration differs (another prompt length, another output length) is
refused, as comparing it would gate on the change of config, not of code.
"""

from __future__ import annotations

import difflib
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.table import point_label, split_metric
from harness.config import NOT_MEASURED, flatten
from harness.result import write_text_atomic

GATE_FAILED = 4  # the exit status of `python -m analysis` when a --fail-on expression failed
STATS = ("mean", "p50", "p90", "p95", "p99")
_EXPR = re.compile(
    r"^(?P<metric>[A-Za-z_][\w]*(?:\[[^\]]*\])?)(?:\.(?P<stat>\w+))?:(?P<sign>[+-])(?P<value>\d+(?:\.\d*)?|\.\d+)"
    r"(?P<pct>%)?$"
)
# Config fields that say where or how a run was kept, not what was measured: they may differ between BASE and NEW.
_NOT_MEASURED = (*NOT_MEASURED, "cache_dir", "point_memory_limit_mb")


class GateError(ValueError):
    """A --fail-on the gate cannot judge (malformed, an unknown metric, points of different configs): exit 2."""


@dataclass(frozen=True)
class Rule:
    text: str
    name: str
    case: str | None  # None: every case of the metric
    stat: str
    sign: int  # +1: a rise is bad; -1: a fall is bad
    threshold: float
    relative: bool


@dataclass
class Verdict:
    rule: Rule
    point: str
    metric: str  # with its case
    base: float
    new: float
    change: float  # in the threshold's terms (a fraction when relative)
    beyond: bool
    significant: bool | None  # None: no interval to judge by
    why: str

    @property
    def failed(self) -> bool:
        return self.beyond and bool(self.significant)


def parse_rule(text: str) -> Rule:
    match = _EXPR.match(text.replace(" ", ""))
    if match is None:
        raise GateError(
            f"--fail-on {text!r} is not an expression of the form METRIC[CASE].STAT:±THRESHOLD[%]. Write, for "
            "example, --fail-on 'ttft_ms[prompt=128].p50:+5%' (a rise of more than 5% fails) or "
            "--fail-on 'pass_rate:-0.05' (a fall of more than 0.05 fails)."
        )
    name, case = split_metric(match["metric"])
    stat = match["stat"] or "mean"
    if stat not in STATS:
        raise GateError(f"--fail-on {text!r}: the statistic {stat!r} is not one of {', '.join(STATS)}.")
    return Rule(text, name, case if "[" in match["metric"] else None, stat, 1 if match["sign"] == "+" else -1,
                float(match["value"]) / (100 if match["pct"] else 1), bool(match["pct"]))  # fmt: skip


def _bounds(stat: dict[str, Any], which: str) -> tuple[float | None, float | None]:
    """The 95% interval of one statistic of a metric: (low, high), None on a side with no bound."""
    if which == "mean":
        if stat.get("ci95_low") is not None and stat.get("ci95_high") is not None:
            return stat["ci95_low"], stat["ci95_high"]
        ci = stat.get("ci95")
        if ci is None or (isinstance(ci, float) and math.isnan(ci)):
            return None, None
        return stat["mean"] - ci, stat["mean"] + ci
    return stat.get(f"{which}_low"), stat.get(f"{which}_high")


def _significant(rule: Rule, base: dict[str, Any], new: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether NEW moved past BASE in the rule's bad direction by more than both intervals allow."""
    b_low, b_high = _bounds(base, rule.stat)
    n_low, n_high = _bounds(new, rule.stat)
    if rule.sign > 0:  # a rise: NEW's lower bound above BASE's upper bound
        if b_high is None or n_low is None:
            return None, "no interval bounds BASE from above or NEW from below: the rise cannot be shown"
        return n_low > b_high, f"NEW's low bound {n_low:.4g} vs BASE's high bound {b_high:.4g}"
    if b_low is None or n_high is None:
        return None, "no interval bounds BASE from below or NEW from above: the fall cannot be shown"
    return n_high < b_low, f"NEW's high bound {n_high:.4g} vs BASE's low bound {b_low:.4g}"


def _point_key(result: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in result["point"].items()))


def _measured_config(result: dict[str, Any]) -> dict[str, str]:
    flat = flatten(result.get("config") or {})
    return {k: str(v) for k, v in flat.items() if k.split(".")[0] not in _NOT_MEASURED}


def _config_difference(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _measured_config(base), _measured_config(new)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def judge(rules: list[Rule], base: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Verdict]:
    """Every rule against every matched point and case; GateError where the gate cannot judge."""
    base_by = {_point_key(r): r for r in base if r.get("status") == "ok"}
    pairs = [(base_by[_point_key(r)], r) for r in new if r.get("status") == "ok" and _point_key(r) in base_by]
    if not pairs:
        raise GateError(
            "no point of NEW matches a point of BASE (the same model, quant, attention, engine, workflow, bench and "
            "swept fields, each ok in both): the baseline is of another sweep. Store a baseline run with the same "
            "command as NEW."
        )
    for a, b in pairs:
        diff = _config_difference(a, b)
        if diff:
            raise GateError(
                f"BASE and NEW ran point {dict(_point_key(b))} with different configs ({'; '.join(diff[:6])}): the "
                "gate would compare a change of config, not of code. Rerun the baseline with NEW's overrides."
            )
    known = sorted({split_metric(k)[0] for _, r in pairs for k in r.get("metrics", {})})
    verdicts = []
    for rule in rules:
        if rule.name not in known:
            close = difflib.get_close_matches(rule.name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else f" The metrics are: {', '.join(known[:40])}."
            raise GateError(f"--fail-on {rule.text!r}: no point of the two sweeps has a metric {rule.name!r}.{hint}")
        matched = 0
        for a, b in pairs:
            for key, stat_b in b.get("metrics", {}).items():
                name, case = split_metric(key)
                if name != rule.name or (rule.case is not None and case != rule.case):
                    continue
                stat_a = a.get("metrics", {}).get(key)
                if stat_a is None or stat_a.get(rule.stat) is None or stat_b.get(rule.stat) is None:
                    continue
                matched += 1
                verdicts.append(_verdict(rule, point_label(b), key, stat_a, stat_b))
        if not matched:
            raise GateError(
                f"--fail-on {rule.text!r}: the metric exists, but no case {rule.case!r} with a {rule.stat} in both "
                "sweeps' matching points. Name a case both have (python -m analysis <folder> lists them in "
                "summary.csv)."
            )
    return verdicts


def _verdict(rule: Rule, point: str, key: str, stat_a: dict[str, Any], stat_b: dict[str, Any]) -> Verdict:
    base, new = float(stat_a[rule.stat]), float(stat_b[rule.stat])
    delta = new - base
    change = delta / abs(base) if rule.relative and base else delta
    if rule.relative and not base:
        change = math.inf if delta else 0.0
    beyond = change * rule.sign > rule.threshold
    significant, why = _significant(rule, stat_a, stat_b)
    return Verdict(rule, point, key, base, new, change, beyond, significant, why)


def _change_text(v: Verdict) -> str:
    return f"{v.change:+.1%}" if v.rule.relative else f"{v.change:+.4g}"


def _state(v: Verdict) -> str:
    if v.failed:
        return "FAILED"
    if v.beyond and v.significant is None:
        return "beyond the threshold, no interval: not judged"
    if v.beyond:
        return "beyond the threshold, not significant"
    return "passed"


def write_gate(verdicts: list[Verdict], out: Path, junit: Path) -> str:
    """gate.md in `out`, the JUnit XML file at `junit`; the text of gate.md."""
    failed = [v for v in verdicts if v.failed]
    lines = [
        f"# Regression gate: {'FAILED' if failed else 'passed'} ({len(failed)} of {len(verdicts)} checks failed)\n",
        "A check fails when NEW moved the bad way beyond its threshold and the 95% intervals do not overlap.\n",
        "| rule | point | metric | BASE | NEW | change | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(f"| `{v.rule.text}` | {v.point} | {v.metric}.{v.rule.stat} | {v.base:.4g} | {v.new:.4g} | "
                     f"{_change_text(v)} | {_state(v)} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "gate.md", text)
    suite = ET.Element("testsuite", name="harness regression gate", tests=str(len(verdicts)),
                       failures=str(len(failed)), errors="0", skipped="0")  # fmt: skip
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname=v.point, name=f"{v.metric}.{v.rule.stat} {v.rule.text}")
        detail = f"BASE {v.base:.6g}, NEW {v.new:.6g}, change {_change_text(v)}; {v.why}"
        if v.failed:
            ET.SubElement(case, "failure", message=f"{v.metric}.{v.rule.stat} moved {_change_text(v)}").text = detail
        else:
            ET.SubElement(case, "system-out").text = f"{_state(v)}: {detail}"
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    junit.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(junit, ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")
    return text
