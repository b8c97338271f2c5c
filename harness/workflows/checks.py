"""A check is one yes/no judgement on a workflow's output, with the reason written out.

Checks are strict on purpose: an empty, truncated or uncited answer never passes, whatever else it contains.
`gates` says whether the check decides the case's pass/fail (a retrieval miss, for instance, is the
retriever's fault and is reported beside the answer checks, not counted against the model).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    why: str
    gates: bool = True

    def record(self) -> dict[str, Any]:
        return asdict(self)


def case_passed(checks: list[Check]) -> bool:
    return all(c.passed for c in checks if c.gates)


# Checks of an answer's form, not of what it says: it exists, it finished, it cites in the asked format, it has the
# asked structure and length. Every other gating check is about content (expected terms, recalled facts).
FORMAT_CHECKS = frozenset(
    {
        "non_empty",
        "complete",
        "cited",
        "citations_valid",
        "replies_non_empty",
        "replies_complete",
        "no_role_leak",
        "sections",
        "section_order",
        "exercises",
        "answers",
        "code_fences",
        "length",
        "generated",
    }
)


def passed_on(checks: list[Check], kind: str) -> bool:
    """The case passed its gating checks of one kind: "format" (FORMAT_CHECKS) or "content" (the rest)."""
    return all(c.passed for c in checks if c.gates and (c.name in FORMAT_CHECKS) == (kind == "format"))


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def non_empty(text: str, min_words: int = 3) -> Check:
    n = len(words(text))
    if n >= min_words:
        return Check("non_empty", True, f"{n} words")
    return Check("non_empty", False, f"only {n} word(s); at least {min_words} are needed")


def complete(finish_reason: str) -> Check:
    """The model ended its answer itself (end of sequence or a stop sequence), not the token limit."""
    if finish_reason == "length":
        return Check("complete", False, "cut off at max_new_tokens before the model finished")
    return Check("complete", True, f"ended by {finish_reason}")


def _whole(keyword: str) -> str:
    # A boundary is asked for only on a side where the keyword has a word character: "%" must match in "25%",
    # and "<a" in "<a href", while "in" must still not match inside "loop".
    before = r"(?<!\w)" if re.match(r"\w", keyword) else ""
    after = r"(?!\w)" if re.search(r"\w$", keyword) else ""
    return before + re.escape(keyword) + after


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    # A keyword matches as a whole word (or phrase), case-insensitively; "a|b" accepts either alternative.
    alternatives = [_whole(k.strip()) for k in keyword.split("|") if k.strip()]
    return re.compile("|".join(alternatives), re.IGNORECASE)


def keyword_hits(text: str, keywords: list[str]) -> tuple[list[str], list[str]]:
    """(found, missing) expected keywords in text."""
    found = [k for k in keywords if _keyword_pattern(k).search(text)]
    return found, [k for k in keywords if k not in found]


def keywords(text: str, expected: list[str], name: str = "keywords", min_found: int | None = None) -> Check:
    """At least min_found (default: all) of the expected keywords appear in text."""
    found, missing = keyword_hits(text, expected)
    need = len(expected) if min_found is None else min_found
    why = f"found {len(found)}/{len(expected)}" + (f"; missing: {', '.join(missing)}" if missing else "")
    if len(found) < need:
        why += f" (at least {need} needed)"
    return Check(name, len(found) >= need, why)
