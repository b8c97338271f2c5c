"""bench=e2e and bench=quality at a sweep point: per-case records, pass rates, the release gate's exit status,
and perplexity checked against the model's own loss."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis.__main__ import main as analysis_main
from conftest import needs_smollm2, point, run_harness
from harness.engines import create_engine
from harness.engines.base import Generation
from runners import run_point, summary_line
from runners.benches.quality import windows

ROOT = Path(__file__).resolve().parent.parent


def records(folder):
    return [json.loads(line) for line in (folder / "cases.jsonl").read_text().splitlines()]


def test_chat_e2e_writes_a_record_per_case_and_pass_rates(compose, tmp_path):
    cfg = compose("model=tiny-gpt2", "bench=e2e", "workflow=chat", "workflow.limit=2", "workflow.max_new_tokens=8")
    result = run_point(cfg, tmp_path, point(workflow="chat", bench="e2e"))
    assert result.status == "ok", result.error
    rows = records(tmp_path)
    assert [r["id"] for r in rows] == ["name-recall", "city-recall"]
    for r in rows:
        assert r["workflow"] == "chat" and len(r["output"]) == len(r["requests"]) == 3
        assert all({"name", "passed", "why", "gates"} <= set(c) for c in r["checks"])
        assert r["passed"] == all(c["passed"] for c in r["checks"] if c["gates"])
    m = result.metrics
    rate = m["pass_rate"]
    assert rate["n"] == 2 and rate["mean"] == sum(r["passed"] for r in rows) / 2
    assert 0 <= rate["ci95_low"] <= rate["mean"] <= rate["ci95_high"] <= 1 and rate["ci95"] > 0
    assert m["check_pass_rate[check=recall_turn2]"]["n"] == 2
    assert m["ttft_ms"]["n"] == 6 and m["e2e_ms"]["unit"] == "ms"  # one request per turn
    assert result.details["cases"] == 2 and result.details["records"] == "cases.jsonl"
    with (tmp_path / "samples.csv").open() as fh:
        assert sum(1 for r in csv.DictReader(fh) if r["metric"] == "e2e_ms") == 6


def test_a_conversation_over_its_budget_is_truncated_and_says_so(compose, tmp_path):
    cfg = compose(
        "model=tiny-gpt2", "bench=e2e", "workflow=chat", "workflow.limit=1", "workflow.max_new_tokens=24",
        "workflow.context_budget=110",
    )  # fmt: skip
    result = run_point(cfg, tmp_path, point(workflow="chat", bench="e2e"))
    assert result.status == "ok", result.error
    (row,) = records(tmp_path)
    assert row["truncated"] and "truncated to the budget of 110 tokens" in row["note"]
    assert all(t["prompt_tokens"] <= 110 for t in row["truncation"])
    assert any(t["dropped_messages"] > 0 for t in row["truncation"])
    assert result.metrics["truncated_conversations"]["mean"] == 1.0


def test_a_search_prompt_too_long_for_the_model_fails_its_case_with_the_reason(compose, tmp_path):
    cfg = compose("model=tiny-gpt2", "bench=e2e", "workflow=search_qa", "workflow.limit=1", "workflow.top_k=5")
    result = run_point(cfg, tmp_path, point(workflow="search_qa", bench="e2e"))
    assert result.status == "ok", result.error
    (row,) = records(tmp_path)
    assert not row["passed"] and row["checks"][0]["name"] == "generated"
    assert "context window of 512 tokens" in row["checks"][0]["why"]
    assert result.metrics["pass_rate"]["mean"] == 0
    line = summary_line(result, tmp_path)
    assert "(1 could not be generated: the reason is in cases.jsonl)" in line and "workflow=search_qa" in line


def test_other_benches_say_they_ignored_the_workflow(compose, tmp_path):
    cfg = compose("model=tiny-gpt2", "bench=smoke", "workflow=chat", "bench.max_new_tokens=2")
    result = run_point(cfg, tmp_path, point(workflow="chat"))
    assert result.status == "ok" and "run only by bench=e2e" in result.details["note"]


def test_search_qa_counts_a_good_answer_as_passed(compose, tmp_path, monkeypatch):
    """The runner's pass counting, with the model's answers replaced by correct cited ones (the checks
    themselves are tested on hand-written answers in test_workflows)."""
    import harness.workflows.search_qa as search_qa

    answers = {
        "Which loop does the break statement terminate?": "It terminates the nearest enclosing loop [1].",
        "What does the continue statement do in a loop?": "It continues with the next cycle of the loop [1].",
    }

    def scripted(engine, messages, params):
        question = messages[-1]["content"].split("Question: ")[1].split("\n")[0]
        text = answers.get(question, "I do not know.")
        return Generation(text, [1, 2], 10, "eos", 0, 2_000_000, 0, [1_000_000, 2_000_000])

    monkeypatch.setattr(search_qa, "streamed", scripted)
    cases = tmp_path / "cases.json"
    source = json.loads((ROOT / "harness" / "workflows" / "data" / "search_qa_cases.json").read_text())
    keep = [c for c in source["cases"] if c["id"] in ("break-loop", "continue-next", "pass-null")]
    cases.write_text(json.dumps({"workflow": "search_qa", "cases": keep}))
    cfg = compose("model=tiny-gpt2", "bench=e2e", "workflow=search_qa", f"workflow.cases={cases}")
    result = run_point(cfg, tmp_path / "point", point(workflow="search_qa", bench="e2e"))
    assert result.status == "ok", result.error
    assert result.metrics["pass_rate"]["mean"] == pytest.approx(2 / 3)
    assert result.details["failed_cases"] == ["pass-null"]
    assert result.metrics["retrieval_hit_rate[k=3]"]["mean"] == 1.0
    assert result.metrics["citation_precision"]["mean"] == 1.0


def test_lesson_pack_e2e_records_structure_scores(compose, tmp_path):
    # workflow.example_turn=false: the worked lesson alone overflows the tiny model's 512-token window
    cfg = compose("model=tiny-qwen2", "bench=e2e", "workflow=lesson_pack", "workflow.limit=1",
                  "workflow.max_new_tokens=16", "workflow.example_turn=false")  # fmt: skip
    result = run_point(cfg, tmp_path, point(workflow="lesson_pack", bench="e2e", model="tiny-qwen2"))
    assert result.status == "ok", result.error
    (row,) = records(tmp_path)
    assert 0 <= row["structure_score"] <= 1 and not row["passed"]  # 16 tokens of noise is no lesson
    assert "structure_score" in result.metrics


def test_summary_has_a_table_per_workflow_and_the_model_quality_table(compose, tmp_path):
    for workflow in ("chat", "lesson_pack"):
        cfg = compose("model=tiny-gpt2", "bench=e2e", f"workflow={workflow}", "workflow.limit=1",
                      "workflow.max_new_tokens=4", "bench.perplexity=true", "bench.ppl_chars=1000")  # fmt: skip
        assert run_point(cfg, tmp_path / f"workflow={workflow}", point(workflow=workflow, bench="e2e")).status == "ok"
    assert analysis_main([str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## e2e: chat" in summary and "## e2e: lesson_pack" in summary
    assert "tiny-gpt2 q=none wf=chat" in summary
    quality = summary[summary.index("## Model quality") : summary.index("## e2e: chat")]
    (row,) = [line for line in quality.splitlines() if line.startswith("| tiny-gpt2 q=none |")]
    ppl = json.loads((tmp_path / "workflow=chat" / "result.json").read_text())["metrics"]["perplexity"]["mean"]
    assert "| 0/1 = 0 [0, 0.7935] | 0/1 = 0 [0, 0.7935] |" in row and f"| {ppl:.4g} |" in row
    assert "<h2>model quality</h2>" in (tmp_path / "report.html").read_text()


def test_release_gate_exit_status(tmp_path):
    args = ["model=tiny-gpt2", "bench=e2e", "workflow=chat", "workflow.limit=1", "workflow.max_new_tokens=4"]
    below = run_harness(tmp_path, *args, "validation.min_pass_rate=0.5", "hydra.run.dir=gate")
    assert below.returncode == 3, below.stderr
    assert (
        "release gate: chat passed 0.0% of 1 cases (95% interval from 0.0%), below validation.min_pass_rate=0.5"
        in below.stdout
    )
    assert "needs at least 4 cases (all passing); this point ran 1" in below.stdout
    # The same point is not measured again for another threshold: the gate reads the result.
    passing = run_harness(tmp_path, *args, "validation.min_pass_rate=0", "hydra.run.dir=gate")
    assert passing.returncode == 0, passing.stderr
    assert "[skipped: already ok]" in passing.stdout


def test_a_malformed_case_file_stops_the_run_before_any_model_loads(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"cases": [{"id": "x", "topic": 3}]}))
    proc = run_harness(tmp_path, "model=tiny-gpt2", "bench=e2e", "workflow=lesson_pack", "workflow.cases=bad.json")
    assert proc.returncode == 2
    assert "bad.json, case 0 ('x'): field 'topic' must be non-empty text" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_release_gate_experiment_composes(compose):
    cfg = compose("experiment=release_gate")
    assert cfg.bench.name == "e2e" and cfg.validation.min_pass_rate == 0.8


# -- quality -------------------------------------------------------------------------------------------------
@given(n=st.integers(2, 3000), window=st.integers(2, 600), data=st.data())
def test_windows_score_every_token_after_the_first_once(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    spans = windows(n, window, stride)
    scored = []
    for begin, end, n_scored in spans:
        assert 0 <= begin < end <= n and end - begin <= window and 0 < n_scored < end - begin + 1
        assert n_scored <= end - begin - 1 or begin == 0
        scored.extend(range(end - n_scored, end))
    assert scored == list(range(1, n))


def test_token_nll_equals_the_models_own_loss(load):
    loaded = load("tiny-llama")
    engine = create_engine("transformers", loaded)
    ids = list(range(5, 45))
    device = loaded.placement.device
    with torch.inference_mode():
        labels = torch.tensor([ids], device=device)
        labels[0, :30] = -100  # score the last 10 tokens only
        loss = loaded.model(input_ids=torch.tensor([ids], device=device), labels=labels).loss.item()
    assert engine.token_nll(ids, 10) == pytest.approx(loss * 10, rel=1e-4)


def test_quality_bench_on_a_random_model_is_near_its_vocabulary_size(compose, tmp_path):
    cfg = compose("model=tiny-gpt2", "bench=quality", "bench.ppl_chars=3000", "bench.ppl_window=128",
                  "bench.ppl_stride=64")  # fmt: skip
    result = run_point(cfg, tmp_path, point(bench="quality"))
    assert result.status == "ok", result.error
    m, d = result.metrics, result.details
    # Random weights predict a nearly uniform distribution over the 1024 tokens.
    assert 500 < m["perplexity"]["mean"] < 2048
    assert m["scored_tokens"]["mean"] == d["tokens"] - 1 and d["window"] == 128 and d["stride"] == 64
    assert m["bits_per_byte"]["mean"] == pytest.approx(
        math.log(m["perplexity"]["mean"], 2) * m["scored_tokens"]["mean"] / d["text_bytes"], rel=1e-6
    )


def test_e2e_with_perplexity_scores_the_same_text_as_the_quality_bench(compose, tmp_path):
    common = ("model=tiny-gpt2", "bench.ppl_chars=2000", "bench.ppl_window=128", "bench.ppl_stride=64")
    alone = run_point(compose(*common, "bench=quality"), tmp_path / "quality", point(bench="quality"))
    cfg = compose(*common, "bench=e2e", "bench.perplexity=true", "workflow=chat", "workflow.limit=1",
                  "workflow.max_new_tokens=4")  # fmt: skip
    both = run_point(cfg, tmp_path / "e2e", point(bench="e2e", workflow="chat"))
    assert both.status == "ok", both.error
    assert "pass_rate" in both.metrics and both.details["perplexity"]["tokens"] == alone.details["tokens"]
    for name in ("perplexity", "bits_per_byte"):
        assert both.metrics[name]["mean"] == pytest.approx(alone.metrics[name]["mean"], rel=1e-5)
    off = run_point(compose(*common, "bench=e2e", "workflow=chat", "workflow.limit=1", "workflow.max_new_tokens=4"),
                    tmp_path / "off", point(bench="e2e", workflow="chat"))  # fmt: skip
    assert "perplexity" not in off.metrics


def test_quality_window_is_capped_at_the_context_window(compose, tmp_path):
    cfg = compose("model=tiny-gpt2", "bench=quality", "bench.ppl_chars=4000", "bench.ppl_window=2048")
    result = run_point(cfg, tmp_path, point(bench="quality"))
    assert result.status == "ok", result.error and result.details["window"] == 512


@needs_smollm2
@pytest.mark.slow
def test_smollm2_perplexity_is_that_of_a_trained_model(compose, tmp_path):
    cfg = compose("model=smollm2", "bench=quality", "bench.ppl_chars=3000")
    result = run_point(cfg, tmp_path, point(bench="quality", model="smollm2"))
    assert result.status == "ok", result.error
    assert 3 < result.metrics["perplexity"]["mean"] < 40  # 13.1 on the default 16000 characters


def test_the_gate_takes_the_interval_not_the_point_estimate():
    from harness.result import Result
    from harness.stats import summarize_proportion
    from runners.benches.e2e import below_gate, cases_needed

    def result(passed: int, n: int) -> Result:
        rate = summarize_proportion([True] * passed + [False] * (n - passed))
        return Result("ok", {}, {}, metrics={"pass_rate": rate}, details={"workflow": "search_qa"})

    assert cases_needed(0.8) == 16 and cases_needed(0.9) == 35 and cases_needed(1.0) is None
    # 9 of 10 is 90%, but its interval reaches down to 60%: not shown to clear 0.8; 58 of 60 is.
    why = below_gate(result(9, 10), 0.8)
    assert why is not None and "needs at least 16 cases" in why and "interval from 59.6%" in why
    assert below_gate(result(58, 60), 0.8) is None
    assert "needs at least" not in below_gate(result(40, 60), 0.8)  # enough cases: the rate itself is short


def test_content_and_format_are_judged_apart():
    from harness.workflows.checks import Check, passed_on

    cut_but_right = [Check("complete", False, "cut"), Check("keywords", True, "3/3"), Check("retrieval_hit", False, "",
                                                                                            gates=False)]  # fmt: skip
    assert passed_on(cut_but_right, "content") and not passed_on(cut_but_right, "format")
    wrong_but_tidy = [Check("cited", True, ""), Check("keywords", False, "1/3")]
    assert passed_on(wrong_but_tidy, "format") and not passed_on(wrong_but_tidy, "content")


def test_case_agreement_names_the_cases_two_points_decided_differently(tmp_path):
    from analysis.quality import case_agreement_table

    results = []
    for model, outcomes in (("a", [True, True, False, False]), ("b", [True, False, True, False])):
        folder = tmp_path / model
        folder.mkdir()
        lines = [json.dumps({"id": f"q{i}", "passed": p}) for i, p in enumerate(outcomes)]
        (folder / "cases.jsonl").write_text("\n".join([*lines, "not json"]) + "\n")
        point = {"model": model, "quant": "none", "workflow": "search_qa", "bench": "e2e"}
        results.append({"status": "ok", "path": str(folder / "result.json"), "config": {"bench": {"name": "e2e"}},
                        "point": point})  # fmt: skip
    (row,) = case_agreement_table(results).to_dict("records")
    assert (row["cases"], row["both pass"], row["both fail"], row["only A"], row["only B"]) == (4, 1, 1, 1, 1)
    assert row["flipped"] == "q1, q2" and row["workflow"] == "search_qa"
