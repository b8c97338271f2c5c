"""The engine contract every backend follows: generate (one prompt), stream (tokens with host timestamps),
batch (many prompts). Generation parameters are validated before any model runs."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError, InferenceError, is_out_of_memory, out_of_memory
from harness.prompts import Prompt
from harness.stats import request_latency


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # benches force the output length with min_new_tokens = max_new_tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, context_window: int | None = None, prompt_tokens: int = 0) -> None:
        """Raise InferenceError naming the parameter, its value and the allowed range."""

        def bad(name: str, rule: str) -> InferenceError:
            return InferenceError(
                f"generation parameter {name}={getattr(self, name)!r} is not valid: it must be {rule}.",
                f"set {name} to a value that is {rule}.",
            )

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"between 0 and max_new_tokens ({self.max_new_tokens})")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0 disables top-k)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "a non-negative integer or None")
        if context_window is not None and prompt_tokens + self.max_new_tokens > context_window:
            room = context_window - prompt_tokens
            if room >= 1:
                fix = f"shorten the prompt or lower max_new_tokens to at most {room}."
            elif self.max_new_tokens < context_window:
                fix = (
                    f"shorten the prompt to at most {context_window - self.max_new_tokens} tokens: alone it fills "
                    "the context window, leaving no room for an answer."
                )
            else:
                fix = f"lower max_new_tokens below the context window ({context_window}), and shorten the prompt."
            raise InferenceError(
                f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({self.max_new_tokens}) exceeds the model's "
                f"context window of {context_window} tokens.",
                fix,
            )


@dataclass
class Generation:
    """One finished request. Times are time.perf_counter_ns() values; token_ns only from stream()."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # length | eos | stop
    start_ns: int
    end_ns: int
    tokenize_ns: int = 0
    token_ns: list[int] = field(default_factory=list)
    # Over HTTP a chunk may carry several tokens: the first chunk's extra tokens have no gap before them, and the
    # server's own count of output tokens (usage) is kept beside the client's.
    first_chunk_tokens: int = 1
    reported_tokens: int | None = None
    # Time the request waited inside the engine before its prefill began (continuous batching's scheduler); it is
    # part of TTFT and E2E, and throughput reports it with the queue wait.
    wait_ns: int = 0

    @property
    def output_tokens(self) -> int:
        """Tokens generated: over HTTP the server's own count where it reports one (token_ids there are the client
        tokenizer's reading of the text, which can differ by a token)."""
        return self.reported_tokens if self.reported_tokens is not None else len(self.token_ids)

    def latency(self) -> dict[str, float]:
        """TTFT, E2E, TPOT, decode and prefill rates of this request (stats.request_latency); empty without tokens."""
        if not self.token_ns:
            return {}
        first, last = ((t - self.start_ns) / 1e9 for t in (self.token_ns[0], self.token_ns[-1]))
        return request_latency(first, last, len(self.token_ns), self.prompt_tokens)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    t_ns: int  # the moment the token id was on the host


class TokenStream(ABC, Iterator[TokenEvent]):
    """Iterates tokens as they are produced; `generation` is set once the stream is exhausted (or closed).

    The request starts at the first next(): `start_ns` is stamped then, after tokenization (`tokenize_ns`).
    """

    prompt_tokens: int
    start_ns: int
    tokenize_ns: int
    stop: tuple[str, ...] = ()  # the stop sequences in force (the chat format's and the request's)
    generation: Generation | None = None

    @abstractmethod
    def close(self) -> None:
        """Stop generating early and release the worker."""

    def _set_generation(self, events: list[TokenEvent], text: str, finish_reason: str) -> None:
        token_ns = [e.t_ns for e in events]
        self.generation = Generation(
            text=text,
            token_ids=[e.token_id for e in events],
            prompt_tokens=self.prompt_tokens,
            finish_reason=finish_reason,
            start_ns=self.start_ns,
            end_ns=token_ns[-1] if token_ns else time.perf_counter_ns(),
            tokenize_ns=self.tokenize_ns,
            token_ns=token_ns,
        )


class StopStrings:
    """A request's stop strings, one behaviour everywhere: whether one has just appeared in the tokens so far (a
    stream ends there, as transformers ends one, whatever min_new_tokens says), where the text is cut (before it),
    and how much of a growing text a server may send without sending part of one."""

    def __init__(self, strings: Sequence[str]) -> None:
        self.strings = tuple(s for s in strings if s)
        # A character is at most 4 byte-level tokens: the newest tokens and this many before them hold any stop
        # string that has just ended (an earlier one ended the stream already), so a check decodes only that tail.
        self._context = 4 * max((len(s) for s in self.strings), default=0)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def ended(self, tokenizer: Any, ids: Sequence[int], arrived: int = 1) -> bool:
        """Whether a stop string ends in the `arrived` newest of ids."""
        if not self.strings or arrived <= 0:
            return False
        raw = tokenizer.decode(list(ids[-(arrived + self._context) :]), skip_special_tokens=False)
        return any(s in raw for s in self.strings)

    def cut(self, text: str, raw: str) -> str | None:
        """The text cut before the first listed stop string that appears in raw (the text with special tokens),
        or None when none does."""
        for s in self.strings:
            if s in raw:
                found = text.find(s)
                return text[:found] if found >= 0 else text
        return None

    def sendable(self, text: str, sent: int) -> int:
        """How much of a growing text may be sent: up to a stop string, and short of a tail that may begin one.
        text[:sent] was sendable before, so it holds no stop string and only the rest is looked at."""
        end = len(text)
        for s in self.strings:
            found = text.find(s, sent)
            if found >= 0:
                end = min(end, found)
            for k in range(min(len(s) - 1, len(text) - sent), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
        return end


def decode_output(tokenizer, ids: list[int], stop: Sequence[str], eos_ids: set[int]) -> tuple[str, str]:
    """Text of generated ids (cut before a stop string) and why generation ended: stop | eos | length."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stops = StopStrings(stop)
    if stops:
        cut = stops.cut(text, tokenizer.decode(ids, skip_special_tokens=False))
        if cut is not None:
            return cut, "stop"
    if ids and ids[-1] in eos_ids:
        return text, "eos"
    return text, "length"


def check_scoring_window(n_ids: int, n_scored: int, window: int | None, fix: str = "") -> None:
    """token_nll's arguments: every scored token has one before it, and the window fits the context."""
    if not 0 < n_scored < n_ids:
        raise InferenceError(
            f"cannot score the last {n_scored} of {n_ids} tokens: each needs at least one token before it.",
            "score fewer tokens than the window holds.",
        )
    if window is not None and n_ids > window:
        raise InferenceError(
            f"a scoring window of {n_ids} tokens exceeds the context window of {window}.",
            fix or f"set bench.ppl_window to at most {window}.",
        )


class Engine(ABC):
    """An inference backend bound to one loaded model. An engine implements `stream` and `describe`; `generate`
    runs a stream to its end and `batch` takes one prompt per call unless the engine has a real batch."""

    name: str
    # False: batch() takes one prompt at a time (it refuses more, saying why and what to do instead); benches record
    # larger batch sizes as not run.
    batches: bool = False
    batch_refusal: tuple[str, str] = (
        "takes one prompt per call; a batch of {n} would be {n} requests in a row, which is not a batch.",
        "use bench.batch_sizes=[1] on this engine (bench.concurrency measures requests in turn).",
    )
    # True: requests may be sent from several threads at once (a server or a batching manager runs them together);
    # False: one at a time.
    concurrent: bool = False
    # Seconds spent compiling before the first timed request (torch.compile), and compilations that still happened
    # inside requests (each one's time is then not a steady-state figure).
    compile_s: float | None = None
    compiles_in_requests: int = 0
    # How a backend's own exception reads to a user: the backend's name, and the fix for running out of memory and
    # for any other failure (wrap_error).
    backend: str = "the engine"
    memory_fix: str = "lower max_new_tokens or the model size, or free memory held by other processes."
    failure_fix: str = "check the generation parameters; see error.log beside result.json for the traceback."

    def shutdown(self) -> None:
        """Release what the engine started (threads, a batching manager), after its running requests end."""
        return None  # most engines start nothing of their own

    @abstractmethod
    def stream(self, prompt: Prompt, params: GenerationParams) -> TokenStream: ...

    def wrap_error(self, exc: BaseException, what: str) -> BaseException:
        """A backend's exception as the harness's error: out of memory (whatever the backend calls it), or an
        InferenceError naming the backend. Harness errors and interruptions (Ctrl-C, SIGTERM) pass unchanged."""
        if not isinstance(exc, Exception) or isinstance(exc, HarnessError):
            return exc
        if is_out_of_memory(exc):
            return out_of_memory(exc, what, self.memory_fix)
        return InferenceError(f"{what} failed in {self.backend}: {type(exc).__name__}: {exc}", self.failure_fix)

    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        """One request run to its end, through the streaming path (so every token is timed the same way)."""
        return streamed(self, prompt, params)

    def batch(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """Several prompts in one call; an engine without a real batch takes one and refuses more (a batch of n
        would be n requests in a row, and its figure would mean something else)."""
        return one_at_a_time(self, prompts, params, *self.batch_refusal)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the result records about how this engine serves requests."""

    def token_nll(self, ids: Sequence[int], n_scored: int) -> float:
        """Sum of the negative log-likelihoods (nats) of the last n_scored of ids, each given those before it."""
        raise InferenceError(
            f"engine {self.name!r} cannot score text (no access to the model's logits).",
            "use engine=transformers for bench=quality.",
        )


def one_at_a_time(engine: Engine, prompts: Sequence[Prompt], params: GenerationParams, why: str, fix: str):
    """batch() of an engine that takes one prompt per call: that one, or an InferenceError saying why not more."""
    if len(prompts) != 1:
        raise InferenceError(f"engine={engine.name} {why.format(n=len(prompts))}", fix)
    return [engine.generate(prompts[0], params)]


def streamed(engine: Engine, prompt: Prompt, params: GenerationParams) -> Generation:
    """One request through the streaming path, run to its end: the Generation with every token's timestamp."""
    stream = engine.stream(prompt, params)
    for _ in stream:
        pass
    assert stream.generation is not None
    return stream.generation
