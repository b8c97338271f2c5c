"""A toy engine written the way docs/engines.md says: `load` returns the model in the form the engine runs (here
nothing: the engine answers a fixed reply), `create` returns the Engine, and the Engine implements `stream` and
`describe` only (generate and batch come from the base class)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig
from harness.device import Placement
from harness.engines.base import Engine, GenerationParams, TokenEvent, TokenStream
from harness.models.attention import AttentionChoice
from harness.models.loader import LoadedModel
from harness.models.sources import Source
from harness.prompts import Prompt

REPLY = ["a", "fixed", "reply", "from", "the", "toy", "engine"]


def load(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    return LoadedModel(
        name=cfg.model.name,
        model=None,
        tokenizer=None,
        placement=Placement("cpu", "none", "a toy engine has no weights"),
        source=Source("toy", cfg.model.name, "no weights: a fixed reply"),
        checkpoint="",
        attention=AttentionChoice("auto", None, "a toy engine has no attention"),
        attention_used="none",
        quant={"name": cfg.quant.name, "method": "none"},
        chat_format="plain",
        trust_remote_code=False,
        context_window=None,
        load_seconds=0.0,
        footprint_bytes=0,
    )


def create(loaded: LoadedModel, cfg: HarnessConfig | None, name: str = "toy") -> Engine:
    return ToyEngine()


class ToyEngine(Engine):
    name = "toy"

    def stream(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        params.validate()
        return _ToyStream(min(params.max_new_tokens, len(REPLY)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": "1", "concurrency": "one request at a time",
                "timing": "perf_counter_ns as each word is yielded"}  # fmt: skip


class _ToyStream(TokenStream):
    def __init__(self, n: int) -> None:
        self.prompt_tokens, self.tokenize_ns, self._n, self._events = 1, 0, n, []

    def __next__(self) -> TokenEvent:
        if not self._events and self.generation is None:
            self.start_ns = time.perf_counter_ns()
        if len(self._events) >= self._n:
            if self.generation is None:
                self._set_generation(self._events, " ".join(REPLY[: self._n]), "length")
            raise StopIteration
        self._events.append(TokenEvent(len(self._events), time.perf_counter_ns()))
        return self._events[-1]

    def close(self) -> None:
        self._n = len(self._events)
