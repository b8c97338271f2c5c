"""What llama.cpp and ONNX Runtime GenAI share: engines driven by a pull loop that yields one token per step.

The prompt is encoded with the model's transformers tokenizer (the same ids on every engine, so a 128-token prompt
is 128 tokens everywhere; chat messages go through the same chat template), timed apart. The request starts at
the first next(): the backend's prefill runs inside it, and every token is stamped with time.perf_counter_ns() as
its id reaches Python. Stop strings and end-of-sequence ids end a stream the way transformers ends one: the stop
token is kept in `token_ids`, the text is cut before the stop string.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator

from harness.chat import adds_special_tokens, format_chat
from harness.engines.base import (
    Engine,
    GenerationParams,
    StopStrings,
    TokenEvent,
    TokenStream,
    decode_output,
)
from harness.errors import InferenceError
from harness.models.loader import LoadedModel
from harness.prompts import Prompt, TokenPrompt


class PullEngine(Engine):
    """An engine whose backend produces tokens one at a time from `_token_ids(prompt_ids, params)`."""

    batch_refusal = (
        "generates one sequence at a time through its Python API; a batch of {n} would be {n} requests in a row, "
        "which is not a batch.",
        "use bench.batch_sizes=[1] on this engine (bench.concurrency measures requests in turn).",
    )

    def __init__(self, loaded: LoadedModel, eos_ids: set[int]) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_ids = eos_ids

    @abstractmethod
    def _token_ids(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[int]:
        """New token ids, one per next(); the prefill runs inside the first. Closing it stops the backend."""

    # -- preparing requests -------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt, params: GenerationParams) -> tuple[list[int], tuple[str, ...], int]:
        t0 = time.perf_counter_ns()
        if isinstance(prompt, TokenPrompt):
            ids, stop = list(prompt.ids), ()
        elif isinstance(prompt, str):
            ids, stop = self.tokenizer(prompt, add_special_tokens=True)["input_ids"], ()
        else:
            text, stop = format_chat(prompt, self.loaded.chat_format, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=adds_special_tokens(self.loaded.chat_format))["input_ids"]
        tokenize_ns = time.perf_counter_ns() - t0
        if not ids:
            raise InferenceError("a prompt encodes to no tokens.", "give each prompt some text.")
        params.validate(self.loaded.context_window, len(ids))
        return list(ids), tuple(stop) + tuple(params.stop), tokenize_ns

    # -- the entry points ---------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        ids, stop, tokenize_ns = self._encode(prompt, params)
        return _PullStream(self, ids, stop, tokenize_ns, params)

    def decode(self, ids: list[int], stop: tuple[str, ...]) -> tuple[str, str]:
        return decode_output(self.tokenizer, ids, stop, self.eos_ids)


class _PullStream(TokenStream):
    def __init__(
        self, engine: PullEngine, ids: list[int], stop: tuple[str, ...], tokenize_ns: int, params: GenerationParams
    ) -> None:
        self._engine = engine
        self._ids = ids
        self._params = params
        self.stop = stop
        self.prompt_tokens = len(ids)
        self.tokenize_ns = tokenize_ns
        self.start_ns = 0
        self._source: Iterator[int] | None = None
        self._events: list[TokenEvent] = []
        self._done = False
        self._stops = StopStrings(stop)
        self._ids_out: list[int] = []

    def __next__(self) -> TokenEvent:
        if self._done:
            raise StopIteration
        if self._source is None:
            self.start_ns = time.perf_counter_ns()
            self._source = self._engine._token_ids(self._ids, self._params)
        try:
            token_id = next(self._source)
        except StopIteration:
            self._finish()
            raise
        except Exception as exc:
            self._done = True
            self._close_source()
            raise self._engine.wrap_error(exc, "streaming generation") from exc
        t_ns = time.perf_counter_ns()
        event = TokenEvent(int(token_id), t_ns)
        self._events.append(event)
        self._ids_out.append(event.token_id)
        if self._ended(event.token_id):
            self._finish()
        return event

    def _ended(self, token_id: int) -> bool:
        n = len(self._events)
        if n >= self._params.max_new_tokens:
            return True
        if token_id in self._engine.eos_ids and n >= self._params.min_new_tokens:
            return True
        return self._stops.ended(self._engine.tokenizer, self._ids_out)

    def _close_source(self) -> None:
        if self._source is not None and hasattr(self._source, "close"):
            self._source.close()

    def _finish(self) -> None:
        self._done = True
        self._close_source()
        text, reason = self._engine.decode(self._ids_out, self.stop)
        self._set_generation(self._events, text, reason)

    def close(self) -> None:
        if not self._done:
            self._finish()


def summed_nll(predicted, targets) -> float:
    """Sum over rows of -log softmax(logits)[target] (nats), in float64: row i of `predicted` scores targets[i]."""
    import numpy as np

    logits = np.asarray(predicted, dtype=np.float64)
    top = logits.max(axis=1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float((log_z - logits[np.arange(len(logits)), np.asarray(targets)]).sum())
