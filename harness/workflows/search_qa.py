"""SearchQA: retrieve passages with BM25, answer from numbered sources, and check the answer and its citations.

Gating checks (all must pass): the answer is not empty, the model finished it (not cut at the token limit),
it cites at least one source as [n], every citation points to a source it was given, and it contains the
expected keywords. Reported beside them: whether retrieval found the expected document in the top k, and
whether the answer cites a passage of that document.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

from harness.config import WorkflowConfig
from harness.engines.base import Engine, GenerationParams, streamed
from harness.errors import ConfigError
from harness.workflows import checks
from harness.workflows.base import CaseResult, Workflow, with_example
from harness.workflows.checks import Check
from harness.workflows.corpus import BM25Index, Passage, chunk, load_documents

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given with the question. After each fact, cite the "
    "source it comes from by its number in square brackets, like [1]. If the sources do not contain the answer, "
    "say so. Answer in two or three sentences."
)
_CITATION = re.compile(r"\[(\s*\d+\s*(?:[,;]\s*\d+\s*)*)\]")


def citations(text: str) -> list[int]:
    """The source numbers cited in text, in order: [1], [2, 3] and [1][2] forms."""
    found = []
    for group in _CITATION.findall(text):
        found.extend(int(n) for n in re.split(r"[,;]", group))
    return found


def build_prompt(question: str, sources: list[Passage]) -> str:
    numbered = "\n\n".join(f"[{i}] {p.title}\n{p.text}" for i, p in enumerate(sources, start=1))
    # The instruction is repeated last, next to where the answer starts: small models follow the end of the user
    # turn far more than the system prompt (docs/real_model_guide.md has the before/after figures).
    return (
        f"Sources:\n\n{numbered}\n\nQuestion: {question}\n\n"
        "Answer in two or three sentences, using only the sources above. End each sentence with the number of "
        "the source it comes from in square brackets, like this: [1]."
    )


# A worked exchange on a topic far from any case (tea, not Python), shown before the real question when
# workflow.example_turn is true: it shows the answer format without giving away any answer.
EXAMPLE_SOURCES = [
    Passage(
        id="example-tea#0",
        doc_id="example-tea",
        title="Green tea",
        text="Green tea is made from leaves that are steamed or pan-fired soon after picking. The heat stops the "
        "leaves from oxidizing, which keeps them green.",
    ),
    Passage(
        id="example-coffee#0",
        doc_id="example-coffee",
        title="Coffee roasting",
        text="Light roasts keep more of the bean's acidity, while dark roasts taste more bitter.",
    ),
]
EXAMPLE_QUESTION = "Why does green tea stay green?"
EXAMPLE_ANSWER = (
    "Green tea leaves are steamed or pan-fired soon after they are picked [1]. The heat stops them from "
    "oxidizing, so they stay green [1]."
)


def build_messages(question: str, sources: list[Passage], system: str, example_turn: bool) -> list[dict[str, str]]:
    example = (build_prompt(EXAMPLE_QUESTION, EXAMPLE_SOURCES), EXAMPLE_ANSWER) if example_turn else None
    return with_example(system, example, build_prompt(question, sources))


def judge(answer: str, finish_reason: str, case: dict[str, Any], sources: list[Passage]) -> list[Check]:
    """Every check of one answer (pure: testable on hand-written answers)."""
    cited = citations(answer)
    valid = [n for n in cited if 1 <= n <= len(sources)]
    invalid = sorted(set(cited) - set(valid))
    result = [checks.non_empty(answer), checks.complete(finish_reason)]
    if cited:
        result.append(Check("cited", True, f"cites {sorted(set(cited))}"))
    else:
        result.append(Check("cited", False, "no [n] citation of a source"))
    if not cited:
        result.append(Check("citations_valid", False, "no citations to check"))
    elif invalid:
        result.append(
            Check("citations_valid", False, f"{invalid} point to no source; only [1]..[{len(sources)}] were given")
        )
    else:
        result.append(Check("citations_valid", True, f"all {len(cited)} citation(s) name a given source"))
    result.append(checks.keywords(answer, case["expected_keywords"], min_found=case.get("min_keywords")))

    expected = case["expected_source"]
    positions = [i for i, p in enumerate(sources, start=1) if p.doc_id == expected]
    if positions:
        result.append(Check("retrieval_hit", True, f"'{expected}' is source {positions}", gates=False))
        cites_it = sorted(set(positions) & set(valid))
        why = f"cites {cites_it}" if cites_it else f"does not cite {positions}"
        result.append(Check("cites_expected_source", bool(cites_it), why, gates=False))
    else:
        got = ", ".join(p.doc_id for p in sources) or "nothing"
        result.append(Check("retrieval_hit", False, f"'{expected}' not in the top {len(sources)} ({got})", gates=False))
        result.append(Check("cites_expected_source", False, "the expected source was not retrieved", gates=False))
    return result


class SearchQA(Workflow):
    name = "search_qa"

    def __init__(self, cfg: WorkflowConfig) -> None:
        super().__init__(cfg)
        docs = load_documents(cfg.corpus)
        ids = {d.id for d in docs}
        for case in self.cases:
            if case["expected_source"] not in ids:
                close = difflib.get_close_matches(case["expected_source"], sorted(ids), n=3)
                raise ConfigError(
                    f"{self.cases_file}, case {case['id']!r}: expected_source {case['expected_source']!r} is not a "
                    f"document of the corpus ({cfg.corpus})." + (f" Close ids: {', '.join(close)}." if close else ""),
                    "name a document id of the corpus (a topic of pydoc_data.topics for the built-in one, or a file "
                    "path without suffix / a jsonl id for a folder).",
                )
        self.index = BM25Index(chunk(docs, cfg.chunk_words, cfg.chunk_overlap))

    def run_case(
        self, case: dict[str, Any], engine: Engine, loaded: LoadedModel, params: GenerationParams
    ) -> CaseResult:
        sources = [p for p, _ in self.index.search(case["question"], self.cfg.top_k)]
        system = self.cfg.system_prompt or SYSTEM_PROMPT
        messages = build_messages(case["question"], sources, system, self.cfg.example_turn)
        g = streamed(engine, messages, params)
        return CaseResult(
            id=case["id"],
            input={"question": case["question"], "expected_keywords": case["expected_keywords"]},
            output=g.text,
            checks=judge(g.text, g.finish_reason, case, sources),
            requests=[g],
            extra={"sources": [p.id for p in sources], "expected_source": case["expected_source"]},
        )

    def metrics(self, results: list[CaseResult]) -> dict[str, list[bool] | list[float]]:
        hits: list[bool] = []
        recall: list[float] = []
        precision: list[float] = []
        for r in results:
            by_name = {c.name: c for c in r.checks}
            hits.append(by_name["retrieval_hit"].passed)
            found, _ = checks.keyword_hits(r.output, r.input["expected_keywords"])
            recall.append(len(found) / len(r.input["expected_keywords"]))
            cited = citations(r.output)
            if cited:
                precision.append(sum(1 <= n <= len(r.extra["sources"]) for n in cited) / len(cited))
        out: dict[str, list[bool] | list[float]] = {
            f"retrieval_hit_rate[k={self.cfg.top_k}]": hits,
            "keyword_recall": recall,
        }
        if precision:
            out["citation_precision"] = precision
        return out
