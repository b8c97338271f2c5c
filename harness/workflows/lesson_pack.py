"""LessonPack: topic (+ level, language) → a Markdown lesson, validated with a real Markdown parser.

Gating checks: not empty; finished (not cut at the token limit); the five sections (Objectives, Explanation,
Examples, Exercises, Summary) present as headings; at least N exercises; an answer for each exercise; every
code fence closed; length within bounds; and, where the case lists them, the topic's keywords. The structure
score is the fraction of the structural checks passed (sections, order, exercises, answers, fences, length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from markdown_it import MarkdownIt

from harness.engines.base import Engine, GenerationParams, streamed
from harness.workflows import checks
from harness.workflows.base import CaseResult, Workflow, with_example
from harness.workflows.checks import Check

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel

SECTIONS = ("Objectives", "Explanation", "Examples", "Exercises", "Summary")
STRUCTURAL = ("sections", "section_order", "exercises", "answers", "code_fences", "length")
SYSTEM_PROMPT = "You are a teacher who writes clear, correct lessons in Markdown."
# An answer is a line that starts with "Answer", or a line that carries an "Answer:" label after the exercise
# text ("1. Add 1/5 and 2/5: Answer: 3/5."); "write the answer down" (no label) is no answer.
_ANSWER_LINE = re.compile(r"^\W*answers?\b", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"\banswers?\W{0,2}:", re.IGNORECASE)


def _answer_count(body: str) -> int:
    return sum(bool(_ANSWER_LINE.match(line) or _ANSWER_LABEL.search(line)) for line in body.splitlines())


def build_prompt(topic: str, level: str, language: str, min_exercises: int, max_words: int) -> str:
    headings = ", ".join(f"## {s}" for s in SECTIONS)
    return (
        f"Write a {level} lesson in {language} about: {topic}.\n"
        f"Use Markdown with these level-2 headings, in this order: {headings}.\n"
        f"Under Exercises, write at least {min_exercises} numbered exercises; after each one, give its answer on "
        "a line that starts with 'Answer:'. Put any code in fenced code blocks; when an answer is code, write "
        "'Answer:' alone on its line and the fenced block under it (a fence must start its own line). "
        f"Keep the lesson under {max_words} words."
    )


# A worked exchange on a topic far from every case (boiling an egg), shown before the real request when
# workflow.example_turn is true: it shows the layout (headings, numbered exercises, an 'Answer:' line after
# each) and a length that fits the output budget, without writing any case's lesson.
EXAMPLE_TOPIC = "boiling an egg"
EXAMPLE_LESSON = """## Objectives
- Boil an egg to the firmness you want.
- Know how long soft and hard eggs take.

## Explanation
Heat sets the egg white first and the yolk later. The longer the egg stays in boiling water, the firmer the
yolk becomes. Starting from boiling water makes the timing repeatable.

## Examples
1. A soft-boiled egg: lower it into boiling water for 6 minutes; the yolk stays runny.
2. A hard-boiled egg: boil it for 10 minutes, then cool it in cold water so it peels easily.

## Exercises
1. How long do you boil an egg for a runny yolk?
Answer: About 6 minutes.
2. Why do you put a hard-boiled egg in cold water?
Answer: It stops the cooking and makes the egg easier to peel.
3. Which part of the egg sets first?
Answer: The white.

## Summary
Time decides how firm the egg is: about 6 minutes gives a soft egg and 10 minutes a hard one. Cooling it in
cold water stops the cooking."""


def build_messages(
    topic: str, level: str, language: str, min_exercises: int, max_words: int, system: str, example_turn: bool
) -> list[dict[str, str]]:
    # The word limit asked for is the one the length check applies, so the prompt and the judge agree.
    example = (
        (build_prompt(EXAMPLE_TOPIC, "beginner", "English", 3, max_words), EXAMPLE_LESSON) if example_turn else None
    )
    return with_example(system, example, build_prompt(topic, level, language, min_exercises, max_words))


@dataclass(frozen=True)
class Section:
    title: str
    level: int
    start: int  # first source line of the body
    end: int  # line after the body (the next heading of the same or a higher level, or the end)


def _sections(tokens: list[Any], n_lines: int) -> list[Section]:
    heads = []
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.map:
            heads.append((int(tok.tag[1]), tokens[i + 1].content.strip(), tok.map[0], tok.map[1]))
    sections = []
    for j, (level, title, _, body_start) in enumerate(heads):
        end = n_lines
        for later_level, _, later_first_line, _ in heads[j + 1 :]:
            if later_level <= level:
                end = later_first_line
                break
        sections.append(Section(title, level, body_start, end))
    return sections


def _find(sections: list[Section], name: str) -> Section | None:
    """The first heading that names the section ("Learning objectives" is Objectives; "Example" is Examples)."""
    stem = name.lower().rstrip("s")
    for s in sections:
        if re.search(rf"\b{stem}", s.title.lower()):
            return s
    return None


def _exercise_count(tokens: list[Any], section: Section) -> int:
    """Top-level list items, or sub-headings (### Exercise 1), inside the Exercises section."""
    items = subheads = 0
    depth = 0
    for tok in tokens:
        # Depth follows every list token: closing tokens carry no source lines, and skipping them left the depth
        # raised, so a second list (exercises split by a code block) was taken as nested and not counted.
        if tok.type in ("bullet_list_open", "ordered_list_open"):
            depth += 1
        elif tok.type in ("bullet_list_close", "ordered_list_close"):
            depth -= 1
        if not tok.map or not section.start <= tok.map[0] < section.end:
            continue
        if tok.type == "list_item_open" and depth == 1:
            items += 1
        elif tok.type == "heading_open" and int(tok.tag[1]) > section.level:
            subheads += 1
    return max(items, subheads)


def _unclosed_fences(tokens: list[Any], lines: list[str]) -> list[int]:
    """Source lines (1-based) of fences that are never closed (the parser lets such a fence run to the end)."""
    bad = []
    for tok in tokens:
        if tok.type != "fence" or not tok.map:
            continue
        start, end = tok.map
        last = lines[end - 1].strip() if end - 1 < len(lines) else ""
        closed = end - start >= 2 and last.startswith(tok.markup) and set(last) <= set(tok.markup[0])
        if not closed:
            bad.append(start + 1)
    return bad


def judge(
    text: str,
    finish_reason: str,
    *,
    min_exercises: int,
    min_words: int,
    max_words: int,
    expected_keywords: list[str] | None = None,
) -> list[Check]:
    """Every check of one lesson (pure: testable on hand-written lessons)."""
    tokens = MarkdownIt("commonmark").parse(text)
    lines = text.splitlines()
    sections = _sections(tokens, len(lines))
    found = {name: _find(sections, name) for name in SECTIONS}
    missing = [n for n, s in found.items() if s is None]
    result = [checks.non_empty(text, min_words=1), checks.complete(finish_reason)]
    result.append(
        Check("sections", not missing, f"missing: {', '.join(missing)}" if missing else "all five sections present")
    )
    starts = [s.start for s in found.values() if s is not None]
    in_order = not missing and starts == sorted(starts)
    result.append(
        Check("section_order", in_order, "in order" if in_order else "sections missing or out of order", gates=False)
    )
    exercises = found["Exercises"]
    n_ex = _exercise_count(tokens, exercises) if exercises else 0
    result.append(Check("exercises", n_ex >= min_exercises, f"{n_ex} exercise(s); at least {min_exercises} needed"))
    if exercises:
        body = "\n".join(lines[exercises.start : exercises.end])
        answers_section = _find(sections, "Answers")
        if answers_section and answers_section is not exercises:
            n_answers = max(_answer_count(body), _exercise_count(tokens, answers_section))
        else:
            n_answers = _answer_count(body)
    else:
        n_answers = 0
    need = max(n_ex, min_exercises)
    result.append(Check("answers", n_answers >= need and n_ex > 0, f"{n_answers} answer(s) for {n_ex} exercise(s)"))
    bad = _unclosed_fences(tokens, lines)
    result.append(
        Check("code_fences", not bad, f"unclosed fence at line(s) {bad}" if bad else "every code fence is closed")
    )
    n_words = len(checks.words(text))
    ok_length = min_words <= n_words <= max_words
    result.append(Check("length", ok_length, f"{n_words} words; allowed {min_words}..{max_words}"))
    if expected_keywords:
        result.append(checks.keywords(text, expected_keywords, name="on_topic", min_found=1))
    return result


def structure_score(result: list[Check]) -> float:
    structural = [c for c in result if c.name in STRUCTURAL]
    return sum(c.passed for c in structural) / len(structural)


class LessonPack(Workflow):
    name = "lesson_pack"

    def run_case(
        self, case: dict[str, Any], engine: Engine, loaded: LoadedModel, params: GenerationParams
    ) -> CaseResult:
        level, language = case.get("level", "beginner"), case.get("language", "English")
        n_ex = case.get("min_exercises", self.cfg.min_exercises)
        system = self.cfg.system_prompt or SYSTEM_PROMPT
        messages = build_messages(
            case["topic"], level, language, n_ex, self.cfg.max_words, system, self.cfg.example_turn
        )
        g = streamed(engine, messages, params)
        result = judge(
            g.text,
            g.finish_reason,
            min_exercises=n_ex,
            min_words=self.cfg.min_words,
            max_words=self.cfg.max_words,
            expected_keywords=case.get("expected_keywords"),
        )
        return CaseResult(
            id=case["id"],
            input={"topic": case["topic"], "level": level, "language": language, "min_exercises": n_ex},
            output=g.text,
            checks=result,
            requests=[g],
            extra={"structure_score": structure_score(result)},
        )

    def metrics(self, results: list[CaseResult]) -> dict[str, list[bool] | list[float]]:
        return {"structure_score": [r.extra["structure_score"] for r in results]}
