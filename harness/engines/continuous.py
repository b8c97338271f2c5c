"""engine.batching=continuous: requests share transformers' ContinuousBatchingManager.

The manager (the library's scheduler and paged KV cache, what `transformers serve` uses) decodes every running
request in one step and lets new ones join between steps. This module starts it for a model, routes its outputs
to one queue per request, and turns them into the engine contract's streams. Each token's time is the manager's
own stamp, taken when the token id is on the host, as in the one-at-a-time path.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from harness.engines.base import Generation, GenerationParams, StopStrings, TokenEvent, TokenStream, decode_output
from harness.errors import ConfigError, InferenceError

if TYPE_CHECKING:
    from harness.engines.transformers import Encoded, TransformersEngine  # types only: no import at run time

# Prompt tokens one step may process on a CPU. The eager and SDPA paths build an attention mask of this many rows
# over the whole cache (the library's default, 8192, costs ~1 GB and seconds to allocate), and a CPU step is
# compute-bound: smollm2 with 16 requests of 128 tokens reached its first token after 0.37 s at 256 and 4.2 s at
# 2048, for the same tokens/s overall. On a GPU the library sizes it from free memory.
CPU_MAX_BATCH_TOKENS = 256
_FINISHED = object()


def _ns(perf_counter_s: float) -> int:
    return round(perf_counter_s * 1e9)  # time.perf_counter and perf_counter_ns read the same clock


# Measured on smollm2, a batch of 16×(128+32) tokens on 2 CPU cores, interleaved: greedy-only 62.6 and 64.8 tok/s,
# with per-request sampling 51.0 and 52.9 (the sorts of top-k and top-p in every step).
SAMPLING_COST = (
    "per request (temperature, top-k, top-p; greedy = top-k 1), one seed for the manager; it costs about 18% of "
    "batched tok/s on greedy traffic (smollm2, 16 requests, CPU): start with --no-batch-sampling for greedy-only "
    "batches, which refuse sampled requests"
)


def unsupported_params(params: GenerationParams, sampling: bool) -> str | None:
    """Why the manager cannot serve a request as asked, or None."""
    if not params.greedy and not sampling:
        return (
            "sampling (temperature > 0; OpenAI clients send 1 unless told otherwise) with engine.batch_sampling=false: "
            "this manager decodes greedily; send temperature 0, or run with engine.batch_sampling=true (harness "
            "serve samples per request unless started with --no-batch-sampling)"
        )
    if params.repetition_penalty != 1.0:
        return "repetition_penalty: the manager has no per-request repetition penalty"
    if 0 < params.min_new_tokens < params.max_new_tokens:
        return "a min_new_tokens below max_new_tokens: the manager can only ignore EOS for the whole request"
    return None


class ContinuousBatcher:
    """One started manager for one model, and a thread that hands each output to its request's queue."""

    def __init__(self, engine: TransformersEngine, max_requests: int, kv_tokens: int, sampling: bool) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = engine.model
        if engine.loaded.attention.implementation is None:
            raise ConfigError(
                f"engine.batching=continuous needs a model class of transformers itself; {engine.loaded.name} runs "
                "its own (remote) code, which the manager's paged attention cannot drive.",
                "use engine.batching=none for this model, or a model whose architecture transformers ships.",
            )
        if getattr(model, "_harness_batcher", None) is not None:
            raise ConfigError(
                f"{engine.loaded.name} already has a running continuous-batching manager: two managers on one model "
                "share its attention state and corrupt each other's outputs.",
                "shut the other engine down first (engine.shutdown()), or load the model again for a second engine.",
            )
        self._eos = sorted(engine.eos_ids)
        # With sampling, one manager serves greedy and sampled requests: it samples, with temperature, top-k and
        # top-p set per request (the values here only make the library build those processors), and a greedy
        # request is sampled from its single likeliest token (top_k=1), the argmax. The sorts this adds to every
        # step cost 18% of smollm2's throughput at 16 requests here, so a greedy-only manager is the default.
        self.sampling = sampling
        sampler = (
            {"do_sample": True, "temperature": 0.5, "top_k": 50, "top_p": 0.9} if sampling else {"do_sample": False}
        )
        generation = GenerationConfig(
            eos_token_id=self._eos or -1, pad_token_id=engine.pad_id, max_new_tokens=32, **sampler
        )
        self._vocab = model.get_input_embeddings().num_embeddings
        page = 256
        config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=max(1, math.ceil(kv_tokens / page)),
            max_batch_tokens=CPU_MAX_BATCH_TOKENS if engine.device == "cpu" else None,
            max_requests_per_batch=max_requests,
            auto_switch_to_flash=False,  # the attention group chose the attention; the manager keeps it
            per_request_processors=sampling,
            seed=0,
        )
        attention_before = model.config._attn_implementation
        try:
            self.manager = model.init_continuous_batching(
                generation_config=generation, continuous_batching_config=config
            )
        except (ValueError, AttributeError, NotImplementedError, TypeError) as exc:
            raise ConfigError(
                f"engine.batching=continuous cannot run {type(model).__name__} with attention "
                f"{attention_before}: transformers' continuous batching refused it ({exc}).",
                "use attention=sdpa or attention=eager (the manager runs those and flash attention) on a model whose "
                "transformers class supports the attention interface (Llama, Qwen2, Mistral, ...), or "
                "engine.batching=none.",
            ) from exc
        self.attention = model.config._attn_implementation  # eager runs as paged|eager under the manager
        self.describe = {
            "max_batch_requests": max_requests,
            "kv_cache_tokens": config.num_blocks * page,
            "max_batch_tokens": config.max_batch_tokens or "the library's choice",
            "attention": self.attention,
            "forced_length": "EOS ignored (the manager has no min_new_tokens)",
            "sampling": SAMPLING_COST if sampling else "greedy only: a sampled request (temperature > 0) is refused",
        }
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = False
        model._harness_batcher = self
        self._model = model
        self.manager.start()
        self._router = threading.Thread(target=self._route, name="harness-cb-router", daemon=True)
        self._router.start()

    def _route(self) -> None:
        while True:
            output = self.manager.get_result(timeout=0.1)
            if output is None:
                if self._stopping and not self.manager.is_running():
                    break
                continue
            with self._lock:
                sink = self._queues.get(output.request_id)
            if sink is not None:
                sink.put(output)
        with self._lock:  # the manager is gone: no request still waiting may hang
            for sink in self._queues.values():
                sink.put(_FINISHED)

    def submit(self, ids: list[int], params: GenerationParams, streaming: bool) -> tuple[str, queue.Queue]:
        if self._stopping or not self.manager.is_running():
            raise InferenceError(
                "the continuous-batching manager has stopped (the model is being unloaded or its loop failed).",
                "retry the request; if it keeps failing, see the server log for the manager's error.",
            )
        request_id = f"h{next(self._ids)}"
        sink: queue.Queue = queue.Queue()
        with self._lock:
            self._queues[request_id] = sink
        forced = params.min_new_tokens == params.max_new_tokens
        self.manager.add_request(
            ids,
            request_id=request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=streaming,
            record_timestamps=True,
            eos_token_id=-1 if forced else (self._eos or -1),
            **self._sampling(params),
        )
        return request_id, sink

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        if not self.sampling:
            return {}
        if params.greedy:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {
            "temperature": float(params.temperature),
            "top_k": int(params.top_k) if params.top_k else self._vocab,
            "top_p": float(params.top_p),
        }

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)
        self.forget(request_id)

    def stop(self) -> None:
        """Let running requests finish, then stop the manager and its router."""
        if self._stopping:
            return
        self._stopping = True
        self.manager.stop(block=True)
        self._router.join(timeout=5)
        self.manager.destroy()
        self._model._harness_batcher = None


def _check_output(output: Any) -> None:
    if output is _FINISHED:
        raise InferenceError(
            "the continuous-batching manager stopped before the request finished.",
            "retry the request; see the log for why the manager stopped.",
        )
    if output.error is not None:
        raise InferenceError(
            f"continuous batching failed the request: {output.error}",
            "check the prompt and parameters; rerun with engine.batching=none to see the one-at-a-time error.",
        )


class BatchedStream(TokenStream):
    """One request in the running batch. It is sent at the first next() (start_ns), and each output the manager
    delivers carries the tokens so far with their times; stop strings are checked here, where the request is
    cancelled once one appears."""

    def __init__(self, engine: TransformersEngine, encoded: Encoded, params: GenerationParams) -> None:
        self._engine = engine
        self._batcher: ContinuousBatcher = engine.batcher  # type: ignore[assignment]
        self._params = params
        self._ids = encoded.input_ids[0, encoded.input_ids.shape[1] - encoded.lengths[0] :].tolist()
        self.stop = encoded.stop
        self._stops = StopStrings(encoded.stop)
        self.prompt_tokens = encoded.lengths[0]
        self.tokenize_ns = encoded.tokenize_ns
        self.start_ns = 0
        self.wait_ns = 0
        self._events: list[TokenEvent] = []
        self._pending: list[TokenEvent] = []
        self._request: str | None = None
        self._sink: queue.Queue | None = None
        self._done = False

    def __next__(self) -> TokenEvent:
        if self._pending:
            return self._pending.pop(0)
        if self._done:
            raise StopIteration
        if self._request is None:
            self.start_ns = time.perf_counter_ns()
            self._request, self._sink = self._batcher.submit(self._ids, self._params, streaming=True)
        assert self._sink is not None
        while True:
            output = self._sink.get()
            try:
                _check_output(output)
            except InferenceError:
                self._end()
                raise
            new = output.generated_tokens[len(self._events) :]
            stamps = (output.timestamps or [])[len(self._events) :]
            if output.lifespan[0] > 0:
                self.wait_ns = max(0, _ns(output.lifespan[0]) - self.start_ns)
            arrived = [TokenEvent(int(t), _ns(stamp)) for t, stamp in zip(new, stamps, strict=False)]
            self._events.extend(arrived)
            self._pending.extend(arrived)
            if output.is_finished() or self._stops.ended(self._engine.tokenizer, output.generated_tokens, len(arrived)):
                if not output.is_finished():
                    self._batcher.cancel(self._request)
                self._finish()
            if self._pending:
                return self._pending.pop(0)
            if self._done:
                raise StopIteration

    def _end(self) -> None:
        self._done = True
        if self._request is not None:
            self._batcher.forget(self._request)

    def _finish(self) -> None:
        self._end()
        text, reason = decode_output(
            self._engine.tokenizer, [e.token_id for e in self._events], self.stop, self._engine.eos_ids
        )
        self._set_generation(self._events, text, reason)
        assert self.generation is not None
        self.generation.wait_ns = self.wait_ns

    def close(self) -> None:
        if self._done:
            return
        if self._request is not None:
            self._batcher.cancel(self._request)
        self._finish()


def generate_many(engine: TransformersEngine, encoded: Encoded, params: GenerationParams) -> list[Generation]:
    """Every row of a batch sent to the manager at once; one start for all, and each request's own tokens."""
    batcher: ContinuousBatcher = engine.batcher  # type: ignore[assignment]
    width = encoded.input_ids.shape[1]
    rows = [encoded.input_ids[i, width - n :].tolist() for i, n in enumerate(encoded.lengths)]
    start = time.perf_counter_ns()
    sent = [batcher.submit(ids, params, streaming=False) for ids in rows]
    results = []
    try:
        for (_, sink), n_prompt in zip(sent, encoded.lengths, strict=True):
            output = sink.get()
            _check_output(output)
            ids = [int(t) for t in output.generated_tokens]
            stamps = [_ns(t) for t in (output.timestamps or [])]
            text, reason = decode_output(engine.tokenizer, ids, encoded.stop, engine.eos_ids)
            end = stamps[-1] if stamps else time.perf_counter_ns()
            g = Generation(text, ids, int(n_prompt), reason, start, end, encoded.tokenize_ns, token_ns=stamps)
            g.wait_ns = max(0, _ns(output.lifespan[0]) - start) if output.lifespan[0] > 0 else 0
            results.append(g)
    finally:
        for request_id, _ in sent:
            batcher.forget(request_id)
    end = max(g.end_ns for g in results)
    for g in results:  # a batch ends when its last request does, as in the one-call path
        g.end_ns = end
    return results
