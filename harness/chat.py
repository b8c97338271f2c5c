"""Turning chat messages into the prompt text a model expects.

Formats: `template` (the tokenizer's own chat template), `chatml` (Qwen, including the legacy remote-code
Qwen-Chat whose tokenizer has no template), and `plain` (a "User:/Assistant:" transcript for base models such
as GPT-2, whose stop sequence keeps the model from writing the next user turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.errors import InferenceError

ROLES = ("system", "user", "assistant")
PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)
CHATML_STOP = ("<|im_end|>",)


def _check(messages: Sequence[dict[str, str]]) -> None:
    if not messages:
        raise InferenceError("the chat has no messages.", "give at least one user message.")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise InferenceError(
                f"chat message {i} is {message!r}: each needs a role in {ROLES} and text content.", "fix that message."
            )


def chatml(messages: Sequence[dict[str, str]]) -> str:
    _check(messages)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def plain(messages: Sequence[dict[str, str]]) -> str:
    _check(messages)
    lines = []
    for m in messages:
        sep = "\n" if m["role"] == "system" else ""
        lines.append(f"{PLAIN_LABELS[m['role']]}: {m['content']}\n{sep}")
    return "".join(lines) + "Assistant:"


def format_chat(messages: Sequence[dict[str, str]], chat_format: str, tokenizer: Any) -> tuple[str, tuple[str, ...]]:
    """The prompt text and the stop sequences that end the assistant's turn."""
    if chat_format == "template":
        _check(messages)
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text, ()
    if chat_format == "chatml":
        return chatml(messages), CHATML_STOP
    if chat_format == "plain":
        return plain(messages), PLAIN_STOP
    raise InferenceError(f"chat format {chat_format!r} is unknown.", "use template, chatml or plain.")


def adds_special_tokens(chat_format: str) -> bool:
    """Whether the tokenizer should add its own special tokens to a formatted chat (a template writes its BOS)."""
    return chat_format != "template"


def count_chat_tokens(messages: Sequence[dict[str, str]], chat_format: str, tokenizer: Any) -> int:
    """Prompt tokens of a chat exactly as the engine will encode it."""
    text, _ = format_chat(messages, chat_format, tokenizer)
    return len(tokenizer(text, add_special_tokens=adds_special_tokens(chat_format))["input_ids"])
