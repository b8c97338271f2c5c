"""The conversation manager: a system prompt, alternating user/assistant turns, and a history that fits a
token budget.

When the whole history does not fit, the oldest exchanges (a user message and the reply to it) are dropped
whole, never cut inside a turn; the system prompt and the newest user message are always kept. What was
dropped is reported with the prompt, so a workflow can say that a conversation was truncated. Formatting
(the tokenizer's template, ChatML, or a plain transcript with its stop sequence) is `harness.chat`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.chat import count_chat_tokens, format_chat
from harness.errors import InferenceError
from harness.prompts import Message


@dataclass
class PlannedPrompt:
    """The messages to send now, with what the budget made us leave out."""

    messages: list[Message]
    text: str
    stop: tuple[str, ...]
    tokens: int
    budget: int | None
    dropped_messages: int = 0
    dropped_tokens: int = 0

    @property
    def truncated(self) -> bool:
        return self.dropped_messages > 0

    def report(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.tokens,
            "budget": self.budget,
            "dropped_messages": self.dropped_messages,
            "dropped_tokens": self.dropped_tokens,
        }


@dataclass
class Conversation:
    tokenizer: Any
    chat_format: str
    system: str | None = None
    budget: int | None = None  # prompt tokens allowed; None = no limit
    history: list[Message] = field(default_factory=list)

    def add_user(self, content: str) -> None:
        if self.history and self.history[-1]["role"] == "user":
            raise InferenceError(
                "two user messages in a row: the previous one has no reply.", "add the assistant's reply first."
            )
        self.history.append({"role": "user", "content": content})

    def add_assistant(self, content: str) -> None:
        if not self.history or self.history[-1]["role"] != "user":
            raise InferenceError("an assistant reply with no user message before it.", "add the user message first.")
        self.history.append({"role": "assistant", "content": content})

    def _with_system(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _tokens(self, turns: list[Message]) -> int:
        return count_chat_tokens(self._with_system(turns), self.chat_format, self.tokenizer)

    def prompt(self) -> PlannedPrompt:
        """The newest history that fits the budget, as whole exchanges, ending with the pending user message."""
        if not self.history or self.history[-1]["role"] != "user":
            raise InferenceError("the conversation has no pending user message.", "add a user message first.")
        turns = list(self.history)
        tokens = self._tokens(turns)
        dropped = 0
        if self.budget is not None:
            full = tokens
            # Exchanges start at each user message; drop the oldest whole exchange until the rest fits.
            while tokens > self.budget and len(turns) > 1:
                cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
                turns = turns[cut:]
                dropped += cut
                tokens = self._tokens(turns)
            if tokens > self.budget:
                raise InferenceError(
                    f"the system prompt and the newest user message alone take {tokens} tokens, over the budget of "
                    f"{self.budget} prompt tokens.",
                    "shorten that message or the system prompt, or raise the budget (workflow.context_budget, or a "
                    "model with a longer context window).",
                )
            dropped_tokens = full - tokens
        else:
            dropped_tokens = 0
        messages = self._with_system(turns)
        text, stop = format_chat(messages, self.chat_format, self.tokenizer)
        return PlannedPrompt(messages, text, stop, tokens, self.budget, dropped, dropped_tokens)
