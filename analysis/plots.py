"""The report's plots (matplotlib, PNG). Each function draws one figure from the tidy table (and, for ITL, the
points' samples.csv) and returns its path, or None when the sweep has nothing for it."""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd

from analysis.summary import natural_key
from harness.result import write_text_atomic
from harness.stats import percentile

DPI = 110


def _case_value(case: str, key: str) -> int | None:
    for part in case.split(","):
        k, _, v = part.partition("=")
        if k == key and v.isdigit():
            return int(v)
    return None


def _log_if_wide(ax, values) -> None:
    """Log scale when the values span more than 30x (tiny and real models in one sweep), so both stay readable."""
    positive = [v for v in values if v is not None and not pd.isna(v) and v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")


def _colors(labels) -> dict[str, str]:
    """One color per point, the same in every panel of a figure."""
    cycle = plt.get_cmap("tab20").colors
    return {label: cycle[i % len(cycle)] for i, label in enumerate(dict.fromkeys(labels))}


def _save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    write_text_atomic(path, image.getvalue())
    return path


def _rows(frame: pd.DataFrame, bench: str, metric: str) -> pd.DataFrame:
    return frame[(frame["bench"] == bench) & (frame["metric"] == metric) & (frame["status"] == "ok")]


def _grouped_bars(ax, rows: pd.DataFrame, ylabel: str, title: str) -> None:
    """Bars per point, one bar per case, with 95% CI error bars."""
    labels = list(dict.fromkeys(rows["label"]))
    cases = list(dict.fromkeys(rows["case"]))
    width = 0.8 / max(len(cases), 1)
    for i, case in enumerate(cases):
        part = rows[rows["case"] == case].set_index("label").reindex(labels)
        xs = [x + (i - (len(cases) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, part["mean"], width, yerr=part["ci95"].fillna(0), capsize=3, label=case or "all")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _log_if_wide(ax, rows["mean"])
    if len(cases) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def latency_overview(frame: pd.DataFrame, folder: Path) -> Path | None:
    ttft, decode = _rows(frame, "latency", "ttft_ms"), _rows(frame, "latency", "decode_tok_s")
    if ttft.empty:
        return None
    n = ttft["label"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * n + 6), 4.5))
    _grouped_bars(axes[0], ttft, "TTFT (ms)", "Time to first token (mean, 95% CI)")
    _grouped_bars(axes[1], decode, "decode (tokens/s)", "Decode speed (mean, 95% CI)")
    return _save(fig, folder, "latency_ttft_decode")


def latency_percentiles(frame: pd.DataFrame, folder: Path) -> Path | None:
    rows = _rows(frame, "latency", "e2e_ms")
    if rows.empty:
        return None
    cases = sorted(dict.fromkeys(rows["case"]), key=natural_key)
    fig, axes = plt.subplots(
        1, len(cases), figsize=(max(6, 1.1 * rows["label"].nunique() + 4) * min(len(cases), 2), 4.5), squeeze=False
    )
    for ax, case in zip(axes[0], cases, strict=False):
        part = rows[rows["case"] == case]
        labels = list(part["label"])
        for i, q in enumerate(("p50", "p90", "p99")):
            ax.bar([x + (i - 1) * 0.25 for x in range(len(labels))], part[q], 0.25, label=q)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title(f"Latency percentiles, {case}")
        _log_if_wide(ax, part["p50"])
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "latency_percentiles")


def memory_by_quant(frame: pd.DataFrame, folder: Path) -> Path | None:
    wanted = (
        "weights_mib",
        "rss_after_first_request_mib",
        "load_rss_peak_mib",
        "load_cuda_peak_mib",
        "cuda_after_first_request_mib",
    )
    rows = frame[(frame["bench"] == "memory") & frame["metric"].isin(wanted) & (frame["status"] == "ok")]
    if rows.empty:
        return None
    labels = list(dict.fromkeys(rows["label"]))
    metrics = [m for m in wanted if m in set(rows["metric"])]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(labels) + 4), 4.5))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        part = rows[rows["metric"] == metric].set_index("label").reindex(labels)
        xs = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, part["mean"], width, label=metric.replace("_mib", "").replace("_", " "))
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("memory (MiB)")
    _log_if_wide(ax, rows["mean"])
    ax.set_title("Memory: weights, load and resident after the first request")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "memory")


def _scaling(frame: pd.DataFrame, metric: str, key: str, ax, ylabel: str, title: str) -> bool:
    rows = _rows(frame, "throughput", metric)
    if rows.empty:
        return False
    colors = _colors(rows["label"])
    for label, part in rows.groupby("label", sort=False):
        xs = [_case_value(c, key) for c in part["case"]]
        pairs = sorted(
            (x, m, c) for x, m, c in zip(xs, part["mean"], part["ci95"].fillna(0), strict=True) if x is not None
        )
        ax.errorbar(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            yerr=[p[2] for p in pairs],
            marker="o",
            capsize=3,
            label=label,
            color=colors[label],
        )
    ax.set_xlabel(key.replace("clients", "concurrent clients").replace("batch", "batch size"))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _log_if_wide(ax, rows["mean"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return True


def throughput_batch(frame: pd.DataFrame, folder: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not _scaling(frame, "output_tok_s", "batch", ax, "output tokens/s", "Throughput against batch size"):
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    sizes = sorted({v for c in _rows(frame, "throughput", "output_tok_s")["case"] if (v := _case_value(c, "batch"))})
    ax.set_xticks(sizes, [str(v) for v in sizes])
    return _save(fig, folder, "throughput_batch")


def throughput_concurrency(frame: pd.DataFrame, folder: Path) -> Path | None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if not _scaling(frame, "requests_s", "clients", axes[0], "requests/s", "Requests/s against concurrency"):
        plt.close(fig)
        return None
    rows = _rows(frame, "throughput", "latency_ms")
    colors = _colors(rows["label"])
    for label, part in rows.groupby("label", sort=False):
        pairs = sorted(
            (_case_value(c, "clients"), p99, p50)
            for c, p99, p50 in zip(part["case"], part["p99"], part["p50"], strict=True)
        )
        xs = [p[0] for p in pairs]
        axes[1].plot(xs, [p[1] for p in pairs], marker="o", color=colors[label], label=label)
        axes[1].plot(xs, [p[2] for p in pairs], marker=".", linestyle="--", color=colors[label])
    _log_if_wide(axes[1], rows["p50"])
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("request latency incl. queue wait (ms)")
    axes[1].set_title("Latency against concurrency (solid p99, dashed p50)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _save(fig, folder, "throughput_concurrency")


def _itl_samples(result_path: Path) -> dict[str, list[float]]:
    """ITL in ms per case, from a point's samples.csv token timestamps."""
    path = result_path.parent / "samples.csv"
    if not path.is_file():
        return {}
    stamps: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            if row["metric"] == "token_t_ms" and row["bench"] == "latency":
                stamps.setdefault((row["case"], row["request"]), []).append((int(row["token"]), float(row["value"])))
    gaps: dict[str, list[float]] = {}
    for (case, _), tokens in stamps.items():
        times = [t for _, t in sorted(tokens)]
        gaps.setdefault(case, []).extend(b - a for a, b in itertools.pairwise(times))
    return gaps


def itl_distributions(results: list[dict], folder: Path) -> Path | None:
    from analysis.table import point_labels

    data, labels = [], []
    for r, label in zip(results, point_labels(results), strict=True):
        if r["status"] != "ok" or r.get("config", {}).get("bench", {}).get("name") != "latency":
            continue
        for case, gaps in sorted(_itl_samples(Path(r["path"])).items()):
            if gaps:
                data.append(gaps)
                labels.append(f"{label}\n{case}")
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(data) + 3), 4.8))
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("inter-token latency (ms)")
    _log_if_wide(ax, [min(d) for d in data] + [max(d) for d in data])
    ax.set_title("Inter-token latency distributions (every token of every measured request)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "itl")


def pass_rates(frame: pd.DataFrame, folder: Path) -> Path | None:
    """bench=e2e: the pass rate of each workflow at each point, with its 95% Wilson interval."""
    rows = frame[(frame["bench"] == "e2e") & (frame["metric"] == "pass_rate") & (frame["status"] == "ok")]
    if rows.empty:
        return None
    rows = rows.assign(point_label=rows["model"] + " q=" + rows["quant"].astype(str))
    labels = list(dict.fromkeys(rows["point_label"]))
    workflows = list(dict.fromkeys(rows["workflow"]))
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(labels) + 4), 4.5))
    width = 0.8 / len(workflows)
    for i, workflow in enumerate(workflows):
        part = rows[rows["workflow"] == workflow].set_index("point_label").reindex(labels)
        xs = [x + (i - (len(workflows) - 1) / 2) * width for x in range(len(labels))]
        low = (part["mean"] - part["ci95_low"].astype(float)).fillna(0).clip(lower=0)
        high = (part["ci95_high"].astype(float) - part["mean"]).fillna(0).clip(lower=0)
        ax.bar(xs, part["mean"], width, yerr=[low, high], capsize=3, label=workflow)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("cases passed (fraction)")
    ax.set_title("Workflow pass rates (whiskers: 95% Wilson interval)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "pass_rates")


def perplexity(frame: pd.DataFrame, folder: Path) -> Path | None:
    """bench=quality: perplexity per point, bits per byte written on each bar (comparable across tokenizers)."""
    rows = _rows(frame, "quality", "perplexity")
    if rows.empty:
        return None
    bpb = _rows(frame, "quality", "bits_per_byte").set_index("label")["mean"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 3), 4.5))
    bars = ax.bar(range(len(rows)), rows["mean"], color="C2")
    for bar, label in zip(bars, rows["label"], strict=True):
        if label in bpb:
            ax.annotate(f"{bpb[label]:.3f} bits/B", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(rows)), rows["label"], rotation=30, ha="right")
    ax.set_ylabel("perplexity (lower is better)")
    _log_if_wide(ax, rows["mean"])
    ax.set_title("Perplexity on the built-in text (labels: bits per byte)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "perplexity")


QUALITY = (("pass_rate", "higher"), ("perplexity", "lower"))


def _front(both: pd.DataFrame, better: str) -> list:
    """Points no other point beats: at least as fast and at least as good on x, better on one. x values within
    0.01% of each other count as equal (two engines' perplexities of the same weights differ in the 6th digit)."""
    sign = 1 if better == "lower" else -1

    def no_worse(a: float, b: float) -> bool:  # a is at least as good as b on x
        return sign * (a - b) <= 1e-4 * max(abs(a), abs(b))

    front = []
    for key, row in both.iterrows():
        beaten = any(
            other_key != key
            and no_worse(other["x"], row["x"])
            and other["speed"] >= row["speed"]
            and (other["speed"] > row["speed"] or not no_worse(row["x"], other["x"]))
            for other_key, other in both.iterrows()
        )
        if not beaten:
            front.append(key)
    return sorted(front, key=lambda k: both.loc[k, "x"])


def pareto(frame: pd.DataFrame, folder: Path) -> Path | None:
    """Speed against quality where the sweep has quality metrics, else speed against memory; Pareto front marked.
    A point is a label (model, quantization as run, engine, attention, swept fields), so engines and
    quantizations of one model are separate points."""
    ok = frame[frame["status"] == "ok"]
    speed = ok[(ok["metric"] == "decode_tok_s")].groupby("label")["mean"].max()
    other, better, xlabel = None, "lower", ""
    for metric, direction in QUALITY:
        found = ok[ok["metric"] == metric].groupby("label")["mean"].mean()
        if not found.empty:
            other, better, xlabel = found, direction, metric.replace("_", " ")
            break
    if other is None:
        other = ok[ok["metric"] == "weights_mib"].groupby("label")["mean"].mean()
        xlabel = "weights (MiB)"
    both = pd.concat([speed.rename("speed"), other.rename("x")], axis=1).dropna()
    if len(both) < 2:
        return None
    front = _front(both, better)
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    # Points are numbered on the chart and named in the legend: names written beside close points collide.
    for i, (key, row) in enumerate(both.sort_values("x").iterrows(), start=1):
        on = key in front
        ax.scatter(
            row["x"],
            row["speed"],
            s=70 if on else 35,
            color="C3" if on else "C0",
            zorder=3,
            label=f"{i}: {key}" + (" (front)" if on else ""),
        )
        ax.annotate(str(i), (row["x"], row["speed"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    fx = [both.loc[k, "x"] for k in front]
    fy = [both.loc[k, "speed"] for k in front]
    ax.plot(fx, fy, color="C3", linestyle="--", label="Pareto front")
    _log_if_wide(ax, both["speed"])
    positive = both["x"][both["x"] > 0]
    if len(positive) and positive.max() / positive.min() > 30:
        ax.set_xscale("log")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel(f"{xlabel} ({better} is better)")
    ax.set_ylabel("decode speed (tokens/s, higher is better)")
    ax.set_title("Speed against " + ("quality" if xlabel != "weights (MiB)" else "memory"))
    ax.grid(alpha=0.3)
    return _save(fig, folder, "pareto")


def _scatter_front(ax, both: pd.DataFrame, better: str) -> None:
    """Numbered points (named in the legend), the Pareto front in red and joined."""
    front = _front(both, better)
    for i, (key, row) in enumerate(both.sort_values("x").iterrows(), start=1):
        on = key in front
        ax.scatter(row["x"], row["speed"], s=70 if on else 35, color="C3" if on else "C0", zorder=3,
                   label=f"{i}: {key}" + (" (front)" if on else ""))  # fmt: skip
        ax.annotate(str(i), (row["x"], row["speed"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.plot([both.loc[k, "x"] for k in front], [both.loc[k, "speed"] for k in front], color="C3", linestyle="--",
            label="Pareto front")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.15), ncol=2)
    ax.grid(alpha=0.3)


def serve_pareto(frame: pd.DataFrame, folder: Path) -> Path | None:
    """bench=serve across a sweep's points and their levels: output tokens/s of the whole machine against tokens/s
    one user sees (1000 / TPOT p50), the front marked: what each point trades between serving many and serving
    each one fast. Beside it, where the sweep priced its points and graded their answers: pass rate against the
    price per million tokens at each point's cheapest level."""
    machine = _levels(frame, "output_tok_s")
    tpot = _levels(frame, "tpot_ms", "p50")
    pairs = {f"{label} @ {lv}": (tok_s, 1000.0 / tpot[label][lv])
             for label, by_level in machine.items() for lv, tok_s in by_level.items()
             if tpot.get(label, {}).get(lv)}  # fmt: skip
    cost = _levels(frame, "cost_per_mtok")
    ok = frame[frame["status"] == "ok"]
    passed = ok[ok["metric"] == "pass_rate"].groupby("label")["mean"].mean()
    priced = {label: min(by_level.values()) for label, by_level in cost.items() if by_level}
    quality = pd.DataFrame({"x": pd.Series(priced), "speed": passed}).dropna()
    panels = (["speed"] if len(pairs) >= 2 else []) + (["quality"] if len(quality) >= 2 else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "speed":
            _scatter_front(ax, pd.DataFrame.from_dict(pairs, orient="index", columns=["x", "speed"]), "higher")
            ax.set_xlabel("output tokens/s of the machine (higher is better)")
            ax.set_ylabel("tokens/s per user: 1000 / TPOT p50 (higher is better)")
            ax.set_title("Serving many against serving each fast")
        else:
            _scatter_front(ax, quality, "lower")
            unit = _rows(frame, "serve", "cost_per_mtok")["unit"].iloc[0]
            ax.set_xlabel(f"price per million output tokens ({unit}; lower is better)")
            ax.set_ylabel("pass rate (higher is better)")
            ax.set_title("Quality against cost")
    return _save(fig, folder, "serve_pareto")


def serve_pass_rate(frame: pd.DataFrame, folder: Path) -> Path | None:
    """Graded load: the pass rate of each level with its Wilson interval, against the offered rate (open loop) or
    the clients (closed loop), with content and format apart: does the model answer worse under load (answers cut
    by timeouts or limits, queues that change what is sent)?"""
    rate = _levels(frame, "pass_rate")
    if not rate:
        return None
    low, high = _levels(frame, "pass_rate", "ci95_low"), _levels(frame, "pass_rate", "ci95_high")
    content, form = _levels(frame, "content_pass_rate"), _levels(frame, "format_pass_rate")
    loops = [loop for loop in ("concurrency", "rate") if any(lv.startswith(loop) for d in rate.values() for lv in d)]
    fig, axes = plt.subplots(1, len(loops), figsize=(6.5 * len(loops), 4.5), squeeze=False)
    colors = _colors(rate)
    for ax, loop in zip(axes[0], loops, strict=True):
        for label, by_level in rate.items():
            levels = sorted(
                (lv for lv in by_level if lv.startswith(loop + "=")), key=lambda lv: float(lv[len(loop) + 1 :])
            )
            if not levels:
                continue
            xs = [float(lv.split("=")[1]) for lv in levels]
            ys = [by_level[lv] for lv in levels]
            err = [[y - low[label].get(lv, y) for y, lv in zip(ys, levels, strict=True)],
                   [high[label].get(lv, y) - y for y, lv in zip(ys, levels, strict=True)]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[label], label=f"{label} pass")
            for series, style, name in ((content, ":", "content"), (form, "--", "format")):
                values = [series.get(label, {}).get(lv, float("nan")) for lv in levels]
                ax.plot(xs, values, linestyle=style, color=colors[label], alpha=0.6, label=f"{label} {name}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("offered rate (requests/s)" if loop == "rate" else "clients (closed loop)")
        ax.set_ylabel("share of answers that passed (95% interval)")
        ax.set_title("Pass rate under load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, folder, "serve_pass_rate")


def _levels(frame: pd.DataFrame, metric: str, stat: str = "mean") -> dict[str, dict[str, float]]:
    """bench=serve: label -> level -> the statistic of one metric."""
    rows = _rows(frame, "serve", metric)
    found: dict[str, dict[str, list[float]]] = {}
    for label, case, value in zip(rows["label"], rows["case"], rows[stat], strict=True):
        if case and value is not None and not pd.isna(value):
            # A level's repeats (rate=2,trial=1, ...) are one point of a curve: their mean (the table has each).
            found.setdefault(label, {}).setdefault(case.split(",trial=")[0], []).append(float(value))
    return {label: {case: sum(v) / len(v) for case, v in by.items()} for label, by in found.items()}


def serve_curves(frame: pd.DataFrame, folder: Path) -> Path | None:
    """Latency against throughput, one curve per point through its load levels (closed-loop circles, open-loop
    squares): where TTFT and TPOT start to climb is where the server saturates."""
    # Load levels only: a trace replay is its own figure (serve_replay), not a point on a load curve.
    by_label = _levels(frame, "output_tok_s")
    throughput = {label: {lv: v for lv, v in d.items() if lv.startswith(("concurrency=", "rate="))}
                  for label, d in by_label.items()}  # fmt: skip
    throughput = {label: d for label, d in throughput.items() if d}
    if not throughput:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors(throughput)
    for ax, metric, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        p50, p99 = _levels(frame, metric, "p50"), _levels(frame, metric, "p99")
        for label, by_level in throughput.items():
            for loop, marker in (("concurrency", "o"), ("rate", "s")):
                levels = sorted((lv for lv in by_level if lv.startswith(loop) and lv in p50.get(label, {})),
                                key=lambda lv: by_level[lv])  # fmt: skip
                if not levels:
                    continue
                xs = [by_level[lv] for lv in levels]
                tag = f"{label} ({'closed' if loop == 'concurrency' else 'open'} loop)"
                ax.plot(xs, [p50[label][lv] for lv in levels], marker=marker, color=colors[label], label=tag)
                ax.plot(xs, [p99[label][lv] for lv in levels], marker=marker, linestyle="--", color=colors[label],
                        alpha=0.6)  # fmt: skip
                for x, lv in zip(xs, levels, strict=True):
                    ax.annotate(lv.split("=")[1], (x, p50[label][lv]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
        xs_all = [v for d in throughput.values() for v in d.values() if v > 0]
        if xs_all and max(xs_all) / min(xs_all) > 30:
            ax.set_xscale("log")
        ax.set_xlabel("output tokens/s (all requests of the level)")
        ax.set_ylabel(f"{name} ms (solid p50, dashed p99)")
        ax.set_title(f"{name} against throughput; labels: clients or req/s")
        _log_if_wide(ax, [v for d in p99.values() for v in d.values()])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, folder, "serve_latency_throughput")


def serve_goodput(frame: pd.DataFrame, folder: Path) -> Path | None:
    """Goodput and completed requests/s against the offered rate; the diagonal is every request served in its
    SLOs. The max_rate search's answer is marked where it ran."""
    goodput = _levels(frame, "goodput_rps")
    done = _levels(frame, "request_throughput_rps")
    rated = {label: {lv: v for lv, v in d.items() if lv.startswith("rate=")} for label, d in goodput.items()}
    rated = {label: d for label, d in rated.items() if d}
    if not rated:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(rated)
    top = 0.0
    for label, by_level in rated.items():
        levels = sorted(by_level, key=lambda lv: float(lv.split("=")[1]))
        xs = [float(lv.split("=")[1]) for lv in levels]
        top = max(top, *xs)
        ax.plot(xs, [by_level[lv] for lv in levels], marker="s", color=colors[label], label=f"{label} goodput")
        ax.plot(xs, [done.get(label, {}).get(lv, float("nan")) for lv in levels], marker=".", linestyle=":",
                color=colors[label], label=f"{label} completed")  # fmt: skip
    best = _rows(frame, "serve", "max_rate_rps")
    for label, value in zip(best["label"], best["mean"], strict=True):
        if label in colors:
            ax.axvline(value, color=colors[label], linestyle="--", alpha=0.5)
            ax.annotate(f"max rate {value:.3g}", (value, 0), fontsize=7, rotation=90, xytext=(3, 5),
                        textcoords="offset points", color=colors[label])  # fmt: skip
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered = served")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.set_title("Goodput (requests meeting every SLO) against offered rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, folder, "serve_goodput")


def _replay_requests(result_path: Path) -> dict[str, list[dict[str, float]]]:
    """bench=serve replay levels: per level, each request's schedule, send and end (s from the level's start),
    whether it succeeded, its TTFT and TPOT (ms), from a point's samples.csv."""
    path = result_path.parent / "samples.csv"
    if not path.is_file():
        return {}
    requests: dict[tuple[str, str], dict[str, float]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            if row["bench"] == "serve" and row["case"].startswith("replay=") and row["token"] == "":
                requests.setdefault((row["case"], row["request"]), {})[row["metric"]] = float(row["value"])
    out: dict[str, list[dict[str, float]]] = {}
    for (case, _), fields in requests.items():
        out.setdefault(case, []).append(fields)
    return out


def replay_series(requests: list[dict[str, float]], windows: int = 40) -> dict[str, list[float]]:
    """Over time windows of a replay: the offered rate (requests scheduled), the achieved rate (requests that
    finished ok), TTFT and TPOT p50 and p90 of the requests sent in the window, and the requests in flight at the
    window's middle. Windows are the replay's span over `windows`, at least 0.5 s."""
    ends = [r.get("t_end_s", r["t_sched_s"]) for r in requests]
    span = max([r["t_sched_s"] for r in requests] + ends)
    width = max(span / windows, 0.5)
    n = max(1, int(span // width) + 1)
    names = ("t_s", "offered_rps", "achieved_rps", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms",
             "in_flight")  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        lo, hi = i * width, (i + 1) * width
        sent = [r for r in requests if lo <= r.get("t_send_s", r["t_sched_s"]) < hi]
        ttft = [r["ttft_ms"] for r in sent if "ttft_ms" in r]
        tpot = [r["tpot_ms"] for r in sent if "tpot_ms" in r]
        middle = (lo + hi) / 2
        out["t_s"].append(middle)
        out["offered_rps"].append(sum(lo <= r["t_sched_s"] < hi for r in requests) / width)
        out["achieved_rps"].append(sum(r.get("ok") == 1.0 and lo <= r.get("t_end_s", -1) < hi for r in requests)
                                   / width)  # fmt: skip
        for name, values in (("ttft", ttft), ("tpot", tpot)):
            for q in (50, 90):
                out[f"{name}_p{q}_ms"].append(percentile(sorted(values), q) if values else float("nan"))
        out["in_flight"].append(sum(r.get("t_send_s", 1e18) <= middle < r.get("t_end_s", 1e18) for r in requests))
    return out


def replay_over_time(results: list[dict], folder: Path) -> Path | None:
    """bench=serve with bench.workload=trace: offered and achieved request rate, TTFT and TPOT percentiles and the
    requests in flight over the replay, one color per point (and replay speed)."""
    from analysis.table import point_labels

    series = []
    for r, label in zip(results, point_labels(results), strict=True):
        if r["status"] != "ok" or r.get("config", {}).get("bench", {}).get("name") != "serve":
            continue
        for case, requests in sorted(_replay_requests(Path(r["path"])).items()):
            if requests:
                series.append((f"{label} {case}", replay_series(requests)))
    if not series:
        return None
    colors = _colors(name for name, _ in series)
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    for name, s in series:
        c = colors[name]
        axes[0].plot(s["t_s"], s["offered_rps"], color=c, linestyle=":", label=f"{name} offered")
        axes[0].plot(s["t_s"], s["achieved_rps"], color=c, label=f"{name} completed")
        axes[1].plot(s["t_s"], s["ttft_p50_ms"], color=c, label=f"{name} p50")
        axes[1].plot(s["t_s"], s["ttft_p90_ms"], color=c, linestyle="--", label=f"{name} p90")
        axes[2].plot(s["t_s"], s["tpot_p50_ms"], color=c, label=f"{name} p50")
        axes[2].plot(s["t_s"], s["tpot_p90_ms"], color=c, linestyle="--", label=f"{name} p90")
        axes[3].plot(s["t_s"], s["in_flight"], color=c, label=name)
    for ax, ylabel in zip(axes, ("requests/s", "TTFT (ms)", "TPOT (ms)", "in flight"), strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[3].set_xlabel("replay time (s)")
    axes[0].set_title("Trace replay over time: the load offered and served, and what each window's requests waited")
    return _save(fig, folder, "serve_replay")


FRAME_PLOTS: tuple[Callable[[pd.DataFrame, Path], Path | None], ...] = (
    latency_overview,
    latency_percentiles,
    memory_by_quant,
    throughput_batch,
    throughput_concurrency,
    pass_rates,
    perplexity,
    pareto,
    serve_curves,
    serve_goodput,
    serve_pareto,
    serve_pass_rate,
)


def metric_over_runs(rows: list[dict], path: Path) -> Path:
    """One figure followed across runs (analysis.history rows): a line per point and case, 95% CI error bars."""
    import datetime

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row["point"], row["metric"]), []).append(row)
    for (point, metric), points in series.items():
        times = [datetime.datetime.fromisoformat(p["started_utc"]) for p in points]
        errors = [p["ci95"] if p["ci95"] is not None and not pd.isna(p["ci95"]) else 0.0 for p in points]
        ax.errorbar(times, [p["mean"] for p in points], yerr=errors, marker="o", capsize=3, label=f"{point} {metric}")
    if rows:
        ax.set_ylabel(f"{rows[0]['metric'].split('[')[0]} ({rows[0]['unit']})")
        ax.set_title(f"{rows[0]['metric'].split('[')[0]} across runs (mean, 95% CI)")
    ax.set_xlabel("run started (UTC)")
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _save(fig, path.parent, path.stem)


def all_plots(frame: pd.DataFrame, results: list[dict], folder: Path) -> list[Path]:
    """Every plot the results allow. A plot that fails is left out with its cause on stderr: one figure's bug
    must not cost the tables and the other plots of a sweep."""
    import sys

    drawn = [(plot.__name__, lambda plot=plot: plot(frame, folder)) for plot in FRAME_PLOTS]
    drawn += [(p.__name__, lambda p=p: p(results, folder)) for p in (itl_distributions, replay_over_time)]
    paths = []
    for name, draw in drawn:
        try:
            paths.append(draw())
        except Exception as exc:
            plt.close("all")
            print(f"analysis: the plot {name} failed ({type(exc).__name__}: {exc}); the report is written without "
                  "it. Please report it with the sweep's summary.csv.", file=sys.stderr)  # fmt: skip
    return [p for p in paths if p is not None]
