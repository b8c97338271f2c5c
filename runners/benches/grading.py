"""Graded load: every answer a serve level gets back is judged as the workflow would judge it, so a level reports
how many answers were right beside how fast they came.

A request is graded against its expectation: a SearchQA case (the workflow's own judge: non-empty, finished, cited,
citations valid, expected terms; the retrieved sources it was sent with), a LessonPack case (its sections,
exercises, answers, closed code fences, length and topic words) or a dataset entry's `expected_keywords`. A
request that failed (an HTTP error, a timeout) fails its grade. Per level: `pass_rate`,
`content_pass_rate` and `format_pass_rate` (docs/metrics.md), each with its Wilson interval; `correct_goodput_rps`,
requests per second that met every SLO and passed; `correct_slo_attainment`, their share of the level's scheduled
requests, which `bench.search_target=correct_goodput` holds against `bench.goodput_target`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness.loadgen.figures import check_slo
from harness.stats import summarize, summarize_proportion
from harness.workflows import checks
from harness.workflows.checks import FORMAT_CHECKS, Check, case_passed, passed_on


@dataclass(frozen=True)
class Expectation:
    """What one request's answer is judged against."""

    case_id: str
    case: dict[str, Any]  # search_qa, lesson_pack: the workflow's case (a lesson's with its limits);
    # dataset: {"expected_keywords", "min_keywords"}
    sources: tuple[Any, ...] = ()  # search_qa: the passages the request carried, numbered from 1
    kind: str = "search_qa"  # search_qa | lesson_pack | chat_turn ({"expect", "turn", "turns"}) | keywords


def judge(expectation: Expectation, text: str, finish_reason: str | None) -> list[Check]:
    if expectation.kind == "search_qa":
        from harness.workflows.search_qa import judge as judge_search_qa

        return judge_search_qa(text, finish_reason or "", expectation.case, list(expectation.sources))
    case = expectation.case
    if expectation.kind == "chat_turn":
        from harness.workflows.chat import judge_turn

        return judge_turn(text, finish_reason or "", case.get("expect"))
    if expectation.kind == "lesson_pack":
        from harness.workflows.lesson_pack import judge as judge_lesson

        return judge_lesson(text, finish_reason or "", min_exercises=case["min_exercises"],
                            min_words=case["min_words"], max_words=case["max_words"],
                            expected_keywords=case.get("expected_keywords"))  # fmt: skip
    return [
        checks.non_empty(text),
        checks.complete(finish_reason or ""),
        checks.keywords(text, case["expected_keywords"], min_found=case.get("min_keywords")),
    ]


def _judges_content(expectation: Expectation) -> bool:
    """Whether the expectation has a gating check of content (one judged on an empty answer shows them all)."""
    return any(c.gates and c.name not in FORMAT_CHECKS for c in judge(expectation, "", "stop"))


def _conversations_passed(conversations: dict[int, list[tuple[dict[str, Any], bool]]]) -> list[bool]:
    """Per conversation that ended (its last turn answered, or a turn that failed ended it), whether every turn
    passed: the chat workflow's verdict on a whole conversation. One the level's deadline cut short is not judged."""
    out = []
    for turns in conversations.values():
        ended = any(not passed for _, passed in turns) or any(c["turn"] == c["turns"] - 1 for c, _ in turns)
        if ended:
            out.append(all(passed for _, passed in turns))
    return out


@dataclass
class Grades:
    """One level's grades: per request (by index) its checks, or the reason it could not be graded."""

    checks: dict[int, list[Check]] = field(default_factory=dict)

    def passed(self, index: int) -> bool:
        found = self.checks.get(index)
        return found is not None and case_passed(found)


def grade_level(
    rows: list[tuple[Any, Any, Any]],
    expectations: list[Expectation],
    cases: list[int | None],
    slo: dict[str, float],
    key: str,
    span_s: float,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Grades]:
    """The level's grade figures from its measured requests (rows of level_metrics: record, counts, figures) and
    the expectation index of each request (`cases`, by the record's index)."""
    grades = Grades()
    flags: dict[str, list[bool]] = {"pass_rate": [], "content_pass_rate": [], "format_pass_rate": []}
    failed_checks: Counter[str] = Counter()
    conversations: dict[int, list[tuple[dict[str, Any], bool]]] = {}
    examples: dict[str, str] = {}
    for record, _, _ in rows:
        index = cases[record.index] if record.index < len(cases) else None
        if index is None:
            continue
        if record.ok:
            found = judge(expectations[index], record.answer, record.finish_reason)
        else:  # a request that failed gave no answer: it fails every check of its grade
            found = [Check("generated", False, f"the request failed: {record.status}")]
        grades.checks[record.index] = found
        passed = case_passed(found)
        flags["pass_rate"].append(passed)
        if _judges_content(expectations[index]):  # a chat turn with nothing to recall has no content to judge
            flags["content_pass_rate"].append(passed_on(found, "content") and record.ok)
        flags["format_pass_rate"].append(passed_on(found, "format"))
        if record.session is not None:
            conversations.setdefault(record.session, []).append((expectations[index].case, passed))
        for c in found:
            if c.gates and not c.passed:
                failed_checks[c.name] += 1
                examples.setdefault(c.name, f"{expectations[index].case_id}: {c.why}"[:300])
    if not flags["pass_rate"]:
        return {}, {}, grades
    metrics = {f"{name}[{key}]": summarize_proportion(values) for name, values in flags.items() if values}
    whole = _conversations_passed(conversations)
    if whole:
        metrics[f"conversation_pass_rate[{key}]"] = summarize_proportion(whole)
    graded = [(r, f) for r, _, f in rows if r.index in grades.checks]
    fast_and_right = [grades.passed(r.index) and f is not None and (not slo or check_slo(slo, f)) for r, f in graded]
    metrics[f"correct_slo_attainment[{key}]"] = summarize_proportion(fast_and_right)
    if span_s > 0:
        metrics[f"correct_goodput_rps[{key}]"] = summarize([sum(fast_and_right) / span_s], "req/s")
    details = {
        "graded": len(flags["pass_rate"]),
        "passed": sum(flags["pass_rate"]),
        "failed_checks": dict(failed_checks.most_common()),
        "examples": examples,
    }
    return metrics, details, grades
