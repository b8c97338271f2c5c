"""The analysis package on a real (tiny) sweep: files written, numbers equal to the JSON, the page renders."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main as analysis_main
from analysis.compare import significant
from analysis.summary import fmt
from conftest import point
from runners import run_point

FAST = ["bench.min_runs=2", "bench.max_runs=3", "bench.min_seconds=0", "bench.max_new_tokens=4"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, compose):
    """Two models × two quantizations × three benches, and a failed point, as a sweep folder."""
    folder = tmp_path_factory.mktemp("sweep")
    for model in ("tiny-gpt2", "tiny-qwen2"):
        for quant in ("none", "4bit"):
            for bench, extra in (
                ("latency", ["bench.prompt_lengths=[8,16]"]),
                ("memory", ["bench.prompt_lengths=[8]", "bench.batch_sizes=[1,2]"]),
                (
                    "throughput",
                    [
                        "bench.prompt_lengths=[8]",
                        "bench.batch_sizes=[1,2]",
                        "bench.concurrency=[1,2]",
                        "bench.requests_per_client=2",
                    ],
                ),
            ):
                cfg = compose(f"model={model}", f"quant={quant}", f"bench={bench}", *FAST, *extra)
                choices = point(model=model, quant=quant, bench=bench)
                result = run_point(cfg, folder / f"bench={bench},model={model},quant={quant}", choices)
                assert result.status == "ok", result.error
    bad = compose("model.path=/does/not/exist")
    run_point(bad, folder / "model=smollm2,path=missing", point(model="smollm2"))
    (folder / "command.txt").write_text("python -m harness -m model=tiny-gpt2,tiny-qwen2 quant=none,4bit\n")
    assert analysis_main([str(folder)]) == 0
    return folder


def results_by_label(folder: Path) -> dict:
    found = {}
    for path in folder.rglob("result.json"):
        r = json.loads(path.read_text())
        label = f"{r['point']['model']} q={r['point']['quant']}"
        found[(label, r["point"]["bench"])] = r
    return found


def test_files_are_written(sweep):
    for name in ("summary.csv", "summary.md", "report.html"):
        assert (sweep / name).is_file()
    plots = {p.stem for p in (sweep / "plots").glob("*.png")}
    assert plots == {
        "latency_ttft_decode",
        "latency_percentiles",
        "memory",
        "throughput_batch",
        "throughput_concurrency",
        "itl",
        "pareto",
    }


def test_summary_csv_loads_back_with_the_json_values(sweep):
    frame = pd.read_csv(sweep / "summary.csv")
    results = results_by_label(sweep)
    checked = 0
    for row in frame.itertuples():
        r = results[(row.label, row.bench)]
        key = f"{row.metric}[{row.case}]" if isinstance(row.case, str) and row.case else row.metric
        stat = r["metrics"][key]
        assert row.mean == pytest.approx(stat["mean"], rel=1e-12) and row.unit == stat["unit"]
        assert row.n == stat["n"] and row.p99 == pytest.approx(stat["p99"], rel=1e-12)
        checked += 1
    assert checked == sum(len(r["metrics"]) for r in results.values())


def test_markdown_tables_show_the_json_numbers(sweep):
    text = (sweep / "summary.md").read_text()
    results = results_by_label(sweep)
    section = None
    header: list[str] = []
    checked = 0
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), []
            continue
        if not line.startswith("| ") or section not in ("latency", "memory", "throughput"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "point":
            header = cells
            continue
        if not header or "×" in "".join(header):
            continue
        result = results[(cells[0], section)]
        for column, cell in zip(header[1:], cells[1:], strict=True):
            if cell == "–":
                continue
            metric = re.sub(r" \([^)]*\)$", "", column)
            stat = result["metrics"][metric]
            mean, _, ci = cell.partition(" ± ")
            assert mean == fmt(stat["mean"]) and (not ci or ci == fmt(stat["ci95"]))
            checked += 1
    assert checked > 40


def test_ratios_against_quant_none(sweep):
    text = (sweep / "summary.md").read_text()
    results = results_by_label(sweep)
    a = results[("tiny-gpt2 q=4bit", "memory")]["metrics"]["weights_mib"]["mean"]
    b = results[("tiny-gpt2 q=none", "memory")]["metrics"]["weights_mib"]["mean"]
    assert f"| tiny-gpt2 q=4bit | {fmt(a / b)} |" in text


def test_failed_points_are_listed_with_their_messages(sweep):
    page = (sweep / "report.html").read_text()
    assert "ConfigError" in page and "does not exist" in page  # a missing model.path is refused before loading
    assert "python -m harness -m model=tiny-gpt2" in page and "Environment" in page
    assert page.count("data:image/png;base64,") == 7


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_report_renders_in_chromium_with_every_image_loaded(sweep, tmp_path):
    probe = tmp_path / "probe.html"
    page = (sweep / "report.html").read_text()
    script = (
        "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
        "[...document.images].map(i => i.complete && i.naturalWidth > 0 ? 'ok' : 'broken').join(',')); });"
        "</script></body>"
    )
    probe.write_text(page.replace("</body>", script))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'u'}",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    states = re.search(r'data-images="([^"]*)"', dom)
    assert states is not None, dom[:500]
    assert states.group(1).split(",") == ["ok"] * 7
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1400,5000", f"--screenshot={shot}", (sweep / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 50_000
    shutil.copyfile(shot, sweep / "report-screenshot.png")


def test_compare_marks_significance_by_interval_overlap(sweep, tmp_path):
    assert significant(10, 1, 13, 1) and not significant(10, 1, 11.5, 1) and not significant(10, None, 20, 1)
    other = tmp_path / "other"
    shutil.copytree(sweep, other, ignore=shutil.ignore_patterns("plots", "*.html", "*.md", "*.csv"))
    path = next(other.rglob("bench=latency,model=tiny-gpt2,quant=none/result.json"))
    data = json.loads(path.read_text())
    key = "decode_tok_s[prompt=8]"
    a = dict(data["metrics"][key])
    data["metrics"][key]["mean"] = a["mean"] + 2 * a["ci95"] + 1  # the intervals cannot overlap
    path.write_text(json.dumps(data))
    assert analysis_main([str(sweep), str(other), "--compare", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "compare.csv")
    row = frame[
        (frame.model == "tiny-gpt2")
        & (frame.quant == "none")
        & (frame.metric == "decode_tok_s")
        & (frame.case == "prompt=8")
    ].iloc[0]
    assert row.delta_pct == pytest.approx(100 * (2 * a["ci95"] + 1) / a["mean"]) and bool(row.significant)
    same = frame[(frame.model == "tiny-qwen2") & (frame.metric == "decode_tok_s")]
    assert not same.significant.any() and (same.delta_pct == 0).all()


def test_bad_input_messages(tmp_path, capsys):
    assert analysis_main([str(tmp_path / "missing")]) == 2
    assert "is not a folder of results" in capsys.readouterr().err
    assert analysis_main([str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "result.json").write_text(json.dumps({"schema": "harness.result/0"}))
    assert analysis_main([str(tmp_path)]) == 2
    assert "harness.result/0" in capsys.readouterr().err
    assert analysis_main([str(tmp_path), "--compare"]) == 2
    with pytest.raises(SystemExit):
        analysis_main([str(tmp_path), "--baseline", "colour=red"])


def test_module_entry_point(sweep, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.html").is_file()


def _e2e(model, quant, workflow, passed, n, decode=None, ppl=None, status="ok", bench="e2e"):
    metrics = {}
    if bench == "e2e" and n:
        from harness.stats import summarize_proportion

        metrics["pass_rate"] = summarize_proportion([True] * passed + [False] * (n - passed))
    if decode:
        metrics["decode_tok_s"] = {"unit": "tok/s", "mean": decode[0], "n": decode[1]}
    if ppl:
        metrics["perplexity"] = {"unit": "ppl", "mean": ppl}
        metrics["bits_per_byte"] = {"unit": "bits/byte", "mean": ppl / 10}
    return {
        "status": status,
        "point": {
            "model": model,
            "quant": quant,
            "attention": "auto",
            "engine": "transformers",
            "workflow": workflow,
            "bench": bench,
        },
        "config": {"bench": {"name": bench}},
        "metrics": metrics if status == "ok" else {},
        "resolved": {"dtype": "bfloat16", "quantization": {"name": quant}, "footprint_bytes": 3 * 2**20},
        "path": f"/s/{model}-{quant}-{workflow}-{bench}/result.json",
    }


def test_model_quality_table_pools_decode_and_keeps_one_row_per_model_and_quant():
    from analysis.quality import model_quality_table

    results = [
        _e2e("m", "none", "chat", 9, 10, decode=(10.0, 30), ppl=8.0),
        _e2e("m", "none", "search_qa", 0, 24, decode=(20.0, 10), ppl=8.0),
        _e2e("m", "4bit", "chat", 10, 10, decode=(5.0, 4)),
        _e2e("m", "4bit", "none", 0, 0, ppl=9.5, bench="quality"),  # perplexity from a quality point of the row
        _e2e("m", "4bit", "search_qa", 0, 0, status="failed"),  # a failed point leaves its cell empty
        _e2e("other", "none", "none", 0, 0, ppl=3.0, bench="quality"),  # no workflow ran: no row
    ]
    table = model_quality_table(results)
    assert list(table.index) == ["m q=none", "m q=4bit"]
    none, four = table.loc["m q=none"], table.loc["m q=4bit"]
    assert none["chat pass rate"] == "9/10 = 0.9 [0.5958, 0.9821]" and none["search_qa pass rate"].startswith(
        "0/24 = 0 [0,"
    )
    assert none["decode tok/s"] == "12.5" and none["perplexity"] == "8" and none["bits per byte"] == "0.8"
    assert four["chat pass rate"] == "10/10 = 1 [0.7225, 1]" and four["search_qa pass rate"] == "–"
    assert four["perplexity"] == "9.5" and four["dtype"] == "4bit (bfloat16 compute)" and four["weights MiB"] == "3"
    assert model_quality_table([_e2e("m", "none", "none", 0, 0, ppl=3.0, bench="quality")]).empty


def test_pareto_front_treats_equal_quality_as_a_tie():
    import pandas as pd

    from analysis.plots import _front

    both = pd.DataFrame(
        {"speed": [24.6, 60.6, 153.0, 50.0], "x": [13.08865, 13.08867, 13.134, 13.2]},
        index=["transformers", "onnxruntime", "llamacpp", "slow and worse"],
    )
    # the same perplexity (to 0.01%) and faster beats transformers; worse and slower than llamacpp is beaten
    assert _front(both, "lower") == ["onnxruntime", "llamacpp"]
    assert set(_front(both.assign(x=-both["x"]), "higher")) == {"onnxruntime", "llamacpp"}


def test_a_failing_plot_costs_only_itself(sweep, tmp_path, monkeypatch, capsys):
    import analysis.plots as plots

    def broken(frame, folder):
        raise AssertionError("a bug in one figure")

    broken.__name__ = "memory_by_quant"
    monkeypatch.setattr(plots, "FRAME_PLOTS", tuple(broken if p is plots.memory_by_quant else p
                                                     for p in plots.FRAME_PLOTS))  # fmt: skip
    assert analysis_main([str(sweep), "--out", str(tmp_path)]) == 0
    assert "the plot memory_by_quant failed (AssertionError: a bug in one figure)" in capsys.readouterr().err
    drawn = {p.stem for p in (tmp_path / "plots").glob("*.png")}
    assert "memory" not in drawn and {"pareto", "itl"} <= drawn and (tmp_path / "report.html").is_file()
