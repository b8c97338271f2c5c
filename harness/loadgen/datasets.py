"""Datasets of real prompts to replay: what users asked, sent as chat messages.

One entry per line of a JSONL file (a file that is one JSON array is read too, as ShareGPT dumps often are), in
any of three shapes:
- OpenAI chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}`: the messages up to the
  last user message are the prompt; an assistant message after it is the reference answer.
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": "…"}, …]}`: the first human turn (with
  any system turn before it) is the prompt, the gpt turn after it the reference answer.
- a plain prompt: `{"prompt": "…"}`.
Any entry may give `output_tokens` (the answer's length to force); otherwise a forced length is the reference
answer's length in the model's tokens, or bench.max_new_tokens. An entry with `expected_keywords` (and optionally
`min_keywords`) is graded under load: its answer must contain them (runners.benches.grading).

A file that is missing, empty, or has a line the harness cannot use is a ConfigError naming the file, the line
and the fix, raised before any server starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.loadgen.traces import read_replay_file

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class DatasetEntry:
    messages: tuple[tuple[str, str], ...]  # (role, content), the prompt
    reference: str | None  # the answer the dataset holds, if any
    output_tokens: int | None  # the length the entry asks for
    row: int
    expected_keywords: tuple[str, ...] = ()  # graded load: terms a right answer contains ("a|b": either)
    min_keywords: int | None = None  # how many of them (default: all)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class Dataset:
    path: Path
    format: str  # messages | sharegpt | prompt (the first entry's shape; entries may mix)
    entries: list[DatasetEntry]

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "format": self.format, "entries": len(self.entries)}


def _bad(path: Path, row: int | None, what: str, fix: str = "fix or delete that line.") -> ConfigError:
    return ConfigError(f"bench.dataset={path}: " + (f"line {row}: " if row is not None else "") + what, fix)


def _text(path: Path, row: int, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, row, f"{what} must be non-empty text, not {value!r:.80}.")
    return value


def _from_messages(path: Path, row: int, messages: Any) -> tuple[list[tuple[str, str]], str | None]:
    if not isinstance(messages, list) or not messages:
        raise _bad(path, row, "messages must be a non-empty list of {role, content}.")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad(path, row, f"a message must have role system, user or assistant: {m!r:.80}.")
        turns.append((m["role"], _text(path, row, m.get("content"), f"a {m['role']} message's content")))
    return _split(path, row, turns)


def _from_sharegpt(path: Path, row: int, conversation: Any) -> tuple[list[tuple[str, str]], str | None]:
    if not isinstance(conversation, list) or not conversation:
        raise _bad(path, row, "conversations must be a non-empty list of {from, value}.")
    turns = []
    for m in conversation:
        role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
        if role is None:
            raise _bad(path, row, f"a turn must be from system, human or gpt: {m!r:.80}.")
        turns.append((role, _text(path, row, m.get("value"), f"a {m['from']} turn's value")))
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        raise _bad(path, row, "the conversation has no human turn to send.")
    prompt = turns[: first_user + 1]
    answer = (
        turns[first_user + 1][1] if first_user + 1 < len(turns) and turns[first_user + 1][0] == "assistant" else None
    )
    return prompt, answer


def _split(path: Path, row: int, turns: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """The messages up to the last user message, and the assistant message after it (the reference) if any."""
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last_user is None:
        raise _bad(path, row, "the messages have no user message to send.")
    after = turns[last_user + 1 :]
    return turns[: last_user + 1], (after[0][1] if after and after[0][0] == "assistant" else None)


def _entry(path: Path, row: int, item: Any) -> tuple[str, DatasetEntry]:
    if not isinstance(item, dict):
        raise _bad(path, row, "an entry must be a JSON object.")
    if "messages" in item:
        kind, (prompt, answer) = "messages", _from_messages(path, row, item["messages"])
    elif "conversations" in item:
        kind, (prompt, answer) = "sharegpt", _from_sharegpt(path, row, item["conversations"])
    elif "prompt" in item:
        kind, prompt, answer = "prompt", [("user", _text(path, row, item["prompt"], "prompt"))], None
    else:
        raise _bad(path, row, f"the entry has none of messages, conversations or prompt (keys: {sorted(item)[:8]}).")
    length = item.get("output_tokens")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise _bad(path, row, f"output_tokens={length!r} is not a token count (a whole number >= 1).")
    expected = item.get("expected_keywords", [])
    if not isinstance(expected, list) or not all(isinstance(k, str) and k.strip() for k in expected):
        raise _bad(path, row, f"expected_keywords must be a list of non-empty strings, not {expected!r:.80}.")
    least = item.get("min_keywords")
    if least is not None and (not isinstance(least, int) or isinstance(least, bool) or not 1 <= least <= len(expected)):
        raise _bad(path, row, f"min_keywords={least!r} must be a whole number from 1 to the {len(expected)} keywords.")
    return kind, DatasetEntry(tuple(prompt), answer, length, row, tuple(expected), least)


def load_dataset(path: str | Path) -> Dataset:
    """The dataset at path, every entry checked; ConfigError naming the file, the line and the fix otherwise."""
    path, text = read_replay_file(path, "bench.dataset", "/path/to/prompts.jsonl")
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise _bad(path, exc.lineno, f"the JSON array cannot be read ({exc.msg}).", "fix the file.") from None
    else:
        items = []
        for row, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((row, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _bad(path, row, f"not a JSON object ({exc.msg}).") from None
    parsed = [_entry(path, row, item) for row, item in items]
    if not parsed:
        raise _bad(path, None, "the file holds no entry.", "give a dataset with at least one entry.")
    return Dataset(path, parsed[0][0], [entry for _, entry in parsed])
