"""ChatGenerate: multi-turn conversations through the conversation manager.

Each turn's reply joins the history the next turn sees. Gating checks: every reply is non-empty and finished
(not cut at the token limit), no reply writes the next user turn itself, and every turn that lists `expect`
keywords (a fact given earlier in the conversation) gets a reply containing them. When the history outgrows
the budget, the oldest exchanges are dropped whole and the record says how many messages each turn lost.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from harness.engines.base import Engine, GenerationParams, streamed
from harness.workflows import checks
from harness.workflows.base import CaseResult, Workflow
from harness.workflows.checks import Check
from harness.workflows.conversation import Conversation

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel

SYSTEM_PROMPT = "You are a helpful assistant. Keep your answers short, and remember what the user tells you."
# A reply that goes on to write the user's next turn (what a base model does without a stop sequence).
_ROLE_LEAK = re.compile(r"(^|\n)\s*(User|Human)\s*:|<\|im_start\|>", re.IGNORECASE)


def judge(replies: list[str], finish_reasons: list[str], turns: list[dict[str, Any]]) -> list[Check]:
    """Every check of one conversation (pure: testable on hand-written replies)."""
    empty = [n for n, r in enumerate(replies) if not checks.words(r)]
    cut = [n for n, f in enumerate(finish_reasons) if f == "length"]
    leaks = [n for n, r in enumerate(replies) if _ROLE_LEAK.search(r)]
    result = [
        Check("replies_non_empty", not empty, f"empty reply at turn(s) {empty}" if empty else "every reply has text"),
        Check("replies_complete", not cut, f"cut off at turn(s) {cut}" if cut else "every reply finished"),
        Check("no_role_leak", not leaks, f"writes the user's turn at turn(s) {leaks}" if leaks else "no role leak"),
    ]
    for n, (turn, reply) in enumerate(zip(turns, replies, strict=True)):
        if turn.get("expect"):
            result.append(checks.keywords(reply, turn["expect"], name=f"recall_turn{n}"))
    return result


def judge_turn(reply: str, finish_reason: str, expect: list[str] | None) -> list[Check]:
    """One turn's checks, as `judge` makes them for a whole conversation (graded load judges turn by turn)."""
    found = judge([reply], [finish_reason], [{}])
    if expect:
        found.append(checks.keywords(reply, expect, name="recall"))
    return found


class ChatGenerate(Workflow):
    name = "chat"

    def run_case(
        self, case: dict[str, Any], engine: Engine, loaded: LoadedModel, params: GenerationParams
    ) -> CaseResult:
        budget = self.cfg.context_budget
        if budget is None and loaded.context_window is not None:
            budget = loaded.context_window - params.max_new_tokens
        system = case.get("system", self.cfg.system_prompt or SYSTEM_PROMPT)
        conversation = Conversation(loaded.tokenizer, loaded.chat_format, system=system, budget=budget)
        replies, reasons, requests, truncation = [], [], [], []
        for turn in case["turns"]:
            conversation.add_user(turn["user"])
            planned = conversation.prompt()
            g = streamed(engine, planned.messages, params)
            conversation.add_assistant(g.text.strip())
            replies.append(g.text.strip())
            reasons.append(g.finish_reason)
            requests.append(g)
            truncation.append(planned.report())
        dropped = [t["dropped_messages"] for t in truncation]
        return CaseResult(
            id=case["id"],
            input={"system": system, "turns": case["turns"]},
            output=replies,
            checks=judge(replies, reasons, case["turns"]),
            requests=requests,
            extra={
                "truncation": truncation,
                "truncated": any(dropped),
                "note": f"history truncated to the budget of {budget} tokens: turn(s) "
                f"{[n for n, d in enumerate(dropped) if d]} lost their oldest messages"
                if any(dropped)
                else "",
            },
        )

    def metrics(self, results: list[CaseResult]) -> dict[str, list[bool] | list[float]]:
        recall = [c.passed for r in results for c in r.checks if c.name.startswith("recall_turn")]
        out: dict[str, list[bool] | list[float]] = {
            "truncated_conversations": [bool(r.extra["truncated"]) for r in results]
        }
        if recall:
            out["fact_recall"] = recall
        return out
