"""What a prompt is, and the prompts the harness builds from its built-in text.

A prompt is raw text, chat messages the engine formats, or token ids used as they are. Benches, workflows and the
load client build exact-length prompts from the same text (Python's documentation topics, shipped with every
Python, in a fixed order), so every machine and every engine sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from harness.errors import InferenceError

Message = dict[str, str]


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids, used as they are (benches use it for prompts of an exact length)."""

    ids: tuple[int, ...]


Prompt = str | Sequence[Message] | TokenPrompt  # raw text, chat messages the engine formats, or token ids


class HasTokenizer(Protocol):
    """What exact_prompt needs of a loaded model: its tokenizer and its context window (None: unknown)."""

    tokenizer: Any
    context_window: int | None


def builtin_text() -> str:
    """Python's documentation topics in a fixed order: real text for prompts and for perplexity."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=8)
def _corpus_ids(tokenizer_key: int, tokenizer: Any) -> tuple[int, ...]:
    return tuple(tokenizer(builtin_text(), add_special_tokens=False)["input_ids"])


def exact_prompt(loaded: HasTokenizer, n_tokens: int, offset: int = 0) -> TokenPrompt:
    """A prompt of exactly n_tokens real text tokens, checked against the context window; each offset starts at
    another place in the text, so prompts of one length differ (no cache serves one from another)."""
    window = loaded.context_window
    if window is not None and n_tokens >= window:
        raise InferenceError(
            f"a prompt of {n_tokens} tokens does not fit the context window of {window} tokens.",
            f"use bench.prompt_lengths below {window} (minus the output length).",
        )
    ids = _corpus_ids(id(loaded.tokenizer), loaded.tokenizer)
    start = (offset * 997) % max(len(ids) - n_tokens, 1)
    chunk = ids[start : start + n_tokens]
    if len(chunk) < n_tokens:
        raise InferenceError(
            f"the built-in text has only {len(ids)} tokens for a {n_tokens}-token prompt.",
            "use shorter bench.prompt_lengths.",
        )
    return TokenPrompt(tuple(chunk))
