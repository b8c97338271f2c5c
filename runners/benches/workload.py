"""The prompts of a load test, built before a level starts (seeded, so a rerun sends the same requests).

- synthetic: prompts of exact token lengths from the built-in text, the length fixed or drawn (uniform or normal
  around bench.prompt_lengths[0]); sent as token ids to /completions, or as text in a user message to chat.
- shared_prefix: one prefix of bench.prefix_tokens shared by every prompt, then a distinct suffix (prefix caches).
- search_qa: the workflow's questions with their retrieved passages, as the workflow sends them (chat messages).
- multi_turn: sessions of bench.turns turns; turn t carries the t-1 earlier exchanges (assistant replies are fixed
  text of the output length, so a session needs no earlier answer), so the context grows turn by turn.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from harness.config import BenchConfig, WorkflowConfig
from harness.errors import ConfigError
from harness.loadgen.client import Endpoint, request_body
from harness.loadgen.load import Planned
from harness.prompts import exact_prompt

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel


def _need_tokenizer(loaded: LoadedModel, workload: str) -> Any:
    if loaded.tokenizer is None:
        raise ConfigError(
            f"bench.workload={workload} builds prompts of exact token lengths with the model's tokenizer, and model "
            f"'{loaded.name}' has none on this machine.",
            "pick the model entry the server serves, or bench.workload=search_qa (text prompts).",
        )
    return loaded.tokenizer


class Workload:
    def __init__(self, bench: BenchConfig, loaded: LoadedModel, endpoint: Endpoint, seed: int) -> None:
        self.bench, self.loaded, self.endpoint, self.seed = bench, loaded, endpoint, seed
        self._questions: list[list[dict[str, str]]] | None = None

    def describe(self) -> dict[str, Any]:
        b = self.bench
        out: dict[str, Any] = {"workload": b.workload, "api": self.endpoint.api, "max_tokens": b.max_new_tokens}
        if b.workload in ("synthetic", "shared_prefix", "multi_turn"):
            out.update(prompt_tokens=b.prompt_lengths[0], length_dist=b.length_dist, length_spread=b.length_spread)
        if b.workload == "shared_prefix":
            out["prefix_tokens"] = b.prefix_tokens
        if b.workload == "multi_turn":
            out["turns"] = b.turns
        return out

    def _length(self, rng: random.Random) -> int:
        b, mean = self.bench, self.bench.prompt_lengths[0]
        if b.length_dist == "uniform":
            spread = int(mean * b.length_spread)
            return max(1, rng.randint(mean - spread, mean + spread))
        if b.length_dist == "normal":
            return max(1, round(rng.gauss(mean, mean * b.length_spread)))
        return mean

    def _ids(self, n: int, offset: int) -> list[int]:
        return list(exact_prompt(self.loaded, n, offset).ids)

    def _plan(self, prompt: Any, prompt_tokens: int | None) -> Planned:
        b = self.bench
        sampling = {"temperature": b.temperature, "top_p": b.top_p, "seed": self.seed}
        path, body = request_body(self.endpoint, prompt, b.max_new_tokens, b.max_new_tokens, **sampling)
        return Planned(path, body, b.max_new_tokens, prompt_tokens)

    def _as_prompt(self, ids: list[int]) -> tuple[Any, int | None]:
        """Token ids for /completions (exact length); a user message of their text for chat (the server's template
        adds its own tokens: the prompt length then comes from usage)."""
        if self.endpoint.api == "completions":
            if self.endpoint.token_prompts:
                return ids, len(ids)
            return self.loaded.tokenizer.decode(ids), None  # a text-only server: its usage gives the length
        text = self.loaded.tokenizer.decode(ids)
        return [{"role": "user", "content": text}], None

    def plans(self, n: int, level_index: int) -> list[Planned]:
        """n requests for one level; each level draws its own (offset) prompts, the same on every run."""
        b = self.bench
        rng = random.Random(self.seed * 1_000_003 + level_index)
        base = level_index * 10_007
        if b.workload == "search_qa":
            questions = self._search_qa()
            return [self._plan(*self._chat_prompt(questions[(base + i) % len(questions)])) for i in range(n)]
        _need_tokenizer(self.loaded, b.workload)
        if b.workload == "shared_prefix":
            prefix = self._ids(b.prefix_tokens, 0)
            return [self._plan(*self._as_prompt(prefix + self._ids(self._length(rng), base + i + 1))) for i in range(n)]
        if b.workload == "multi_turn":
            return self._multi_turn(n, base, rng)
        return [self._plan(*self._as_prompt(self._ids(self._length(rng), base + i))) for i in range(n)]

    def _multi_turn(self, n: int, base: int, rng: random.Random) -> list[Planned]:
        tokenizer = self.loaded.tokenizer
        out: list[Planned] = []
        session = 0
        while len(out) < n:
            history: list[dict[str, str]] = []
            for turn in range(self.bench.turns):
                if len(out) == n:
                    break
                offset = base + session * 100 + turn * 2
                user = tokenizer.decode(self._ids(self._length(rng), offset))
                history.append({"role": "user", "content": user})
                out.append(self._plan(*self._chat_prompt([dict(m) for m in history])))
                reply = tokenizer.decode(self._ids(self.bench.max_new_tokens, offset + 1))
                history.append({"role": "assistant", "content": reply})
            session += 1
        return out

    def _search_qa(self) -> list[list[dict[str, str]]]:
        if self._questions is None:
            from harness.workflows.search_qa import SYSTEM_PROMPT, SearchQA, build_messages

            flow = SearchQA(WorkflowConfig(name="search_qa"))
            self._questions = []
            for case in flow.cases:
                sources = [p for p, _ in flow.index.search(case["question"], flow.cfg.top_k)]
                messages = build_messages(case["question"], sources, SYSTEM_PROMPT, flow.cfg.example_turn)
                self._questions.append(messages)
        return self._questions

    def _chat_prompt(self, messages: list[dict[str, str]]) -> tuple[Any, int | None]:
        """Messages for chat; for /completions the same conversation through the model's chat format, as token ids
        (what the in-process engines send), so its length is known."""
        if self.endpoint.api == "chat":
            return messages, None
        from harness.chat import adds_special_tokens, format_chat

        tokenizer = _need_tokenizer(self.loaded, f"{self.bench.workload} with bench.api=completions")
        text, _ = format_chat(messages, self.loaded.chat_format, tokenizer)
        if not self.endpoint.token_prompts:
            return text, None
        ids = tokenizer(text, add_special_tokens=adds_special_tokens(self.loaded.chat_format))["input_ids"]
        return list(ids), len(ids)
