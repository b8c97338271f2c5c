"""report.html: one self-contained page (images embedded) with the command, the environment, the tables, the
plots and the points that failed, with their messages."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.summary import describe_baseline
from harness.result import write_text_atomic

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1300px;
       color: #1d232a; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
code, pre { background: #f3f5f7; padding: .15rem .35rem; border-radius: 4px; }
pre { padding: .7rem; overflow-x: auto; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .86rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
.failed td { background: #fff1f0 !important; text-align: left; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { color: #57606a; font-size: .85rem; }
.meta td { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; }
td:first-child { white-space: nowrap; }
"""


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["point", *frame.columns])
    body = []
    for label, row in frame.iterrows():
        cells = "".join(f"<td>{html.escape('–' if pd.isna(v) else str(v))}</td>" for v in row)
        body.append(f"<tr><td>{html.escape(str(label))}</td>{cells}</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _energy(results: list[dict[str, Any]]) -> str:
    """How the machine's energy was read, or why it was not: the result's own words, once each."""
    said = []
    for r in results:
        energy = (r.get("details") or {}).get("energy") or {}
        if energy.get("measured"):
            idle = energy.get("idle_w")
            line = (
                "measured from "
                + ", ".join(energy.get("sources", []))
                + (f" (idle {idle:.1f} W)" if isinstance(idle, (int, float)) else "")
            )
        elif energy:
            line = f"not measured: {energy.get('why', '?')}" + (
                " (" + "; ".join(energy.get("missing", [])) + ")" if energy.get("missing") else ""
            )
        else:
            continue
        if line not in said:
            said.append(line)
    return " · ".join(said) or "–"


def _environment(results: list[dict[str, Any]]) -> str:
    envs: dict[Any, dict[str, Any]] = {}
    members: dict[Any, list[dict[str, Any]]] = {}
    for r in results:
        env = r.get("environment") or {}
        if env:
            key = (env.get("hostname"), env.get("cpu"), tuple(g.get("name") for g in env.get("gpus", [])))
            envs.setdefault(key, env)
            members.setdefault(key, []).append(r)
    rows = []
    for key, env in envs.items():
        pk = env.get("packages", {})
        gpus = (
            ", ".join(
                f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB, driver {g.get('driver', '?')})"
                for g in env.get("gpus", [])
            )
            or "none"
        )
        facts = {
            "machine": f"{env.get('hostname')} · {env.get('platform')}",
            "CPU": f"{env.get('cpu')} · {env.get('cores_logical')} logical cores · torch threads "
            f"{env.get('torch_threads')}",
            "RAM": f"{env.get('ram_bytes', 0) / 2**30:.1f} GiB",
            "GPUs": gpus,
            "versions": " · ".join(f"{k} {v}" for k, v in pk.items() if v) + f" · python {env.get('python')}",
            "git commit": env.get("git_commit") or "unknown",
            "settings": " · ".join(f"{k}={v}" for k, v in (env.get("env") or {}).items()) or "–",
            "energy": _energy(members[key]),
        }
        rows.append("".join(f"<tr><td><b>{k}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()))
    return "".join(f"<table class='meta'>{r}</table>" for r in rows)


def write_report(
    folder: Path,
    results: list[dict[str, Any]],
    tables: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
    plots: list[Path],
    failed: list[dict[str, str]],
    baseline: tuple[str, str],
    commands: list[str],
) -> Path:
    n_ok = sum(r["status"] == "ok" for r in results)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>harness sweep report</title>"
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Sweep report</h1>",
        f"<p>{n_ok} of {len(results)} points ok. Cells are mean ± 95% CI half-width; ratios are against "
        f"{html.escape(describe_baseline(baseline))}.</p>",
    ]
    if commands:
        parts.append("<h2>Command</h2>" + "".join(f"<pre>{html.escape(c)}</pre>" for c in commands))
    parts.append("<h2>Environment</h2>" + _environment(results))
    for bench, (values, rel) in tables.items():
        parts.append(f"<h2>{html.escape(bench)}</h2>{_table(values)}")
        if not rel.empty:
            parts.append(f"<p>Ratio to {html.escape(baseline[0])}={html.escape(baseline[1])}:</p>{_table(rel)}")
    if plots:
        parts.append("<h2>Plots</h2>")
        for path in plots:
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
            )
    parts.append("<h2>Points that did not finish</h2>")
    if failed:
        rows = "".join(
            f"<tr><td>{html.escape(f['label'])}</td><td>{html.escape(f['type'])}</td>"
            f"<td>{html.escape(f['message'])}</td><td>{html.escape(f['hint'])}</td></tr>"
            for f in failed
        )
        parts.append(
            f"<table class='failed'><thead><tr><th>point</th><th>error</th><th>message</th><th>fix</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    else:
        parts.append("<p>none</p>")
    parts.append("</body></html>")
    path = folder / "report.html"
    write_text_atomic(path, "".join(parts))
    return path
