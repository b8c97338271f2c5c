"""The transformers engine, deliberately slowed: every token waits DELAY_S before it is yielded. A test registers
this module as engine=transformers to stand for a change that made decoding slower (the regression gate must
catch it)."""

from __future__ import annotations

import time
from typing import Any

from harness.engines import transformers

DELAY_S = 0.05
load = transformers.load


def create(loaded: Any, cfg: Any, name: str = "transformers") -> Any:
    engine = transformers.create(loaded, cfg, name)
    fast = engine.stream

    def stream(prompt: Any, params: Any) -> Any:
        tokens = fast(prompt, params)
        step = type(tokens).__next__

        class Slowed(type(tokens)):  # type: ignore[misc, valid-type]
            def __next__(self) -> Any:
                time.sleep(DELAY_S)
                return step(self)

        tokens.__class__ = Slowed
        return tokens

    engine.stream = stream
    return engine
