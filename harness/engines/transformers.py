"""The in-process transformers engine.

Timing follows docs/metrics.md: the prompt is tokenized first (timed apart), the request starts just before
`generate`, and each streamed token is stamped with time.perf_counter_ns() once its id is on the host
(copying the id to the host waits for the device, so no extra synchronization is needed there).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import greenlet
import torch

from harness.chat import adds_special_tokens, format_chat
from harness.device import synchronize
from harness.engines.base import (
    Engine,
    Generation,
    GenerationParams,
    TokenEvent,
    TokenStream,
    check_scoring_window,
    decode_output,
)
from harness.errors import ConfigError, InferenceError
from harness.models.loader import LoadedModel
from harness.prompts import Prompt, TokenPrompt

if TYPE_CHECKING:
    from harness.config import EngineConfig, HarnessConfig

# bitsandbytes 8-bit logs a warning on every matmul that casts float32 inputs to float16: once per token.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


class _Cancelled(Exception):
    """Thrown into a paused generate() when the consumer closes the stream."""


class _SwitchingStreamer:
    """transformers streamer that hands each new token to the consumer by switching greenlets.

    generate() runs in a greenlet on the consumer's own thread: put() stamps the token and switches back to
    the consumer, which resumes generation when it asks for the next token. Tokens arrive live, yet no second
    thread competes with torch's compute threads for the cores (a worker thread cost 4-7% of decode speed on
    a 2-core CPU). The first put() is the prompt.
    """

    def __init__(self) -> None:
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()  # device -> host copy: waits for the token to exist
        t_ns = time.perf_counter_ns()
        consumer = greenlet.getcurrent().parent
        for token_id in ids:
            consumer.switch(TokenEvent(int(token_id), t_ns))

    def end(self) -> None:
        pass


class Encoded:
    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        stop: tuple[str, ...],
        tokenize_ns: int,
        lengths: list[int],
    ) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.stop = stop
        self.tokenize_ns = tokenize_ns
        self.lengths = lengths  # prompt tokens of each row, without padding


class _Stream(TokenStream):
    """The request starts at the first next(): start_ns is stamped just before generate() begins.

    A stream is consumed by one thread (the one that calls next() first).
    """

    def __init__(self, engine: TransformersEngine, encoded: Encoded, params: GenerationParams) -> None:
        self._engine = engine
        self._params = params
        self.stop = encoded.stop
        self._tokens: list[TokenEvent] = []
        self._done = False
        self._runner: greenlet.greenlet | None = None
        self._kwargs = engine._generate_kwargs(encoded, params)
        self._kwargs["streamer"] = _SwitchingStreamer()
        self.prompt_tokens = int(encoded.input_ids.shape[1])
        self.tokenize_ns = encoded.tokenize_ns
        self.start_ns = 0

    def _work(self) -> BaseException | None:
        try:
            self._engine._run_generate(self._kwargs)
        except _Cancelled:
            return None
        except BaseException as exc:  # handed to the consumer, which raises it
            return exc
        return None

    def _resume(self, cancel: bool = False) -> Any:
        try:
            if self._runner is None:
                self._runner = greenlet.greenlet(self._work)
                self.start_ns = time.perf_counter_ns()
            return self._runner.throw(_Cancelled()) if cancel else self._runner.switch()
        except greenlet.error as exc:
            raise InferenceError(
                f"a token stream was resumed from another thread ({exc}).",
                "consume each stream from a single thread, from its first next() to its end.",
            ) from exc

    def __next__(self) -> TokenEvent:
        if self._done:
            raise StopIteration
        item = self._resume()
        if isinstance(item, TokenEvent):
            self._tokens.append(item)
            return item
        self._finish(item)
        raise StopIteration

    def _finish(self, error: BaseException | None) -> None:
        self._done = True
        self._kwargs = {}
        if error is not None:
            raise self._engine.wrap_error(error, "streaming generation")
        text, reason = self._engine._decode([t.token_id for t in self._tokens], self.stop)
        self._set_generation(self._tokens, text, reason)

    def close(self) -> None:
        if self._done:
            return
        if self._runner is None or self._runner.dead:
            self._done = True
            return
        self._finish(self._resume(cancel=True))


def _dynamo_frames() -> int:
    """Frames torch.compile has compiled so far in this process (0 before dynamo is first imported)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def compile_blockers(model: Any, device: str) -> list[str]:
    """Why torch.compile of the decode step cannot run here (empty when it can be tried)."""
    blockers = []
    if not torch._dynamo.is_dynamo_supported():
        blockers.append(f"torch.compile does not support this Python ({sys.version.split()[0]})")
    kind = device.split(":")[0]
    if kind == "cpu":
        compilers = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            blockers.append("no C++ compiler is on PATH (inductor builds CPU kernels with one; set CXX or install g++)")
    elif kind == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            blockers.append("triton is not installed (inductor's CUDA kernels need it)")
    else:
        blockers.append(f"the device is {device}; compiled decoding is supported here on CPU and CUDA")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        blockers.append(f"{type(quantizer).__name__} quantization cannot be compiled")
    return blockers


class TransformersEngine(Engine):
    name = "transformers"
    batches = True  # generate() over padded rows: a real batch
    backend = "transformers"
    memory_fix = (
        "lower max_new_tokens or the batch size, use a quantized model (quant=8bit/4bit), or free memory held by "
        "other processes."
    )
    failure_fix = (
        "check the generation parameters and the model; rerun with HYDRA_FULL_ERROR=1 and see error.log for the "
        "traceback."
    )

    def __init__(self, loaded: LoadedModel, options: EngineConfig | None = None, cache_dir: Path | None = None) -> None:
        from harness.config import EngineConfig

        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.placement.device
        self.options = options or EngineConfig()
        config_eos = self.model.generation_config.eos_token_id
        eos = config_eos if config_eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        self._compile_config: Any = None
        self.compile_mode: str | None = None
        self.compile_fallback: str | None = None
        self.batcher = None
        if self.options.compile:
            self._set_up_compile(cache_dir)
        if self.options.batching == "continuous":
            from harness.engines.continuous import ContinuousBatcher

            o = self.options
            self.batcher = ContinuousBatcher(self, o.max_batch_requests, o.kv_cache_tokens, o.batch_sampling)
            self.concurrent = True

    def describe(self) -> dict[str, Any]:
        import transformers

        described: dict[str, Any] = {
            "name": self.name,
            "version": transformers.__version__,
            "concurrency": "one request at a time (generate holds the model)",
            "timing": "host perf_counter_ns; a token is stamped when its id reaches the host",
            "threads": torch.get_num_threads(),
            "cache": self.options.cache,
            "compile": self._compile_config is not None,
            "batching": self.options.batching,
        }
        if self.options.compile:
            described["compile_mode"] = self.compile_mode  # its time is timings.compile_s
            if self.compile_fallback:
                described["compile_fallback"] = self.compile_fallback
        if self.batcher is not None:
            described["concurrency"] = (
                "continuous batching: concurrent requests join the running batch (transformers' "
                "ContinuousBatchingManager, paged KV cache)"
            )
            described["timing"] = "the manager's perf_counter stamp, taken when a token id reaches the host"
            described["continuous"] = self.batcher.describe
        return described

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    # -- compiled decoding ----------------------------------------------------------------------------------
    def _set_up_compile(self, cache_dir: Path | None) -> None:
        """Compile the decode step now (warm-up), so no timed request pays for it; fall back (recorded) when it
        cannot run, or raise ConfigError with engine.strict=true."""
        from transformers import CompileConfig

        mode = self.options.compile_mode
        if mode == "auto":
            mode = "reduce-overhead" if self.device.startswith("cuda") else "default"
        self.compile_mode = mode
        blockers = compile_blockers(self.model, self.device)
        if not blockers:
            if cache_dir is not None:  # compiled kernels are reused by the next run of the point
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
            config = CompileConfig(mode=mode, fullgraph=False)
            config._compile_all_devices = True  # transformers compiles only on GPUs unless told to
            self._compile_config = config
            before = _dynamo_frames()
            t0 = time.perf_counter()
            try:
                self._compile_warm_up()
            except Exception as exc:  # inductor's errors have many types: any of them means "cannot compile"
                blockers.append(f"compilation failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            else:
                if _dynamo_frames() == before:
                    blockers.append("transformers' generate did not compile the decode step for this model")
            self.compile_s = time.perf_counter() - t0
        if not blockers:
            return
        self._compile_config = None
        reason = "; ".join(blockers)
        if self.options.strict:
            raise ConfigError(
                f"engine.compile=true cannot run here: {reason}.",
                "fix the cause, or drop engine.strict=true to fall back to the uncompiled decode (recorded).",
            )
        self.compile_fallback = f"uncompiled decode: {reason}"

    def _compile_warm_up(self) -> None:
        """Two generations of different lengths: the second lets dynamo mark the lengths dynamic, so later
        prompt and output lengths reuse the compiled step instead of recompiling."""
        from harness.prompts import TokenPrompt

        vocab = self.model.get_input_embeddings().num_embeddings
        for n_prompt, n_new in ((8, 4), (16, 8)):
            ids = TokenPrompt(tuple(range(1, min(vocab, n_prompt + 1))))
            params = GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new)
            self._run_generate(self._generate_kwargs(self._encode(ids, params), params), timed=False)

    # -- preparing requests -------------------------------------------------------------------------------
    def _prompt_text(self, prompt: Prompt) -> tuple[str, tuple[str, ...], bool]:
        """Text, stop sequences, and whether the tokenizer should add its special tokens."""
        if isinstance(prompt, str):
            return prompt, (), True
        text, stop = format_chat(prompt, self.loaded.chat_format, self.tokenizer)
        return text, stop, adds_special_tokens(self.loaded.chat_format)

    def _encode(self, prompt: Prompt, params: GenerationParams) -> Encoded:
        return self._encode_many([prompt], params)

    def _encode_many(self, prompts: Sequence[Prompt], params: GenerationParams) -> Encoded:
        """Tokenize (timed), left-pad a batch, and validate the parameters against the context window."""
        if not prompts:
            raise InferenceError("no prompts were given.", "pass at least one prompt.")
        t0 = time.perf_counter_ns()
        as_ids = [isinstance(p, TokenPrompt) for p in prompts]
        if any(as_ids) and not all(as_ids):
            raise InferenceError(
                "a batch mixes token-id prompts with text or chat prompts.", "batch one kind at a time."
            )
        if all(as_ids):
            rows = [list(p.ids) for p in prompts]  # type: ignore[union-attr]
            vocab = self.model.get_input_embeddings().num_embeddings
            bad = next((t for row in rows for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise InferenceError(
                    f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}).",
                    "send token ids of this model's tokenizer.",
                )
            stop = tuple(params.stop)
        else:
            texts, stops, specials = zip(*(self._prompt_text(p) for p in prompts), strict=True)
            if len(set(specials)) != 1:
                raise InferenceError("a batch mixes raw-text prompts and chat prompts.", "batch one kind at a time.")
            stop = tuple(dict.fromkeys(s for group in stops for s in group)) + tuple(params.stop)
            rows = self.tokenizer(list(texts), add_special_tokens=specials[0])["input_ids"]
        if any(not row for row in rows):
            raise InferenceError("a prompt encodes to no tokens.", "give each prompt some text.")
        width = max(len(row) for row in rows)
        # Left padding: decoder-only models continue from the right edge of every row.
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        tokenize_ns = time.perf_counter_ns() - t0
        params.validate(self.loaded.context_window, width)
        return Encoded(ids.to(self.device), mask.to(self.device), stop, tokenize_ns, [len(r) for r in rows])

    def _generation_config(self, params: GenerationParams, stop: tuple[str, ...]):
        from transformers import GenerationConfig

        # A fresh config, so a checkpoint's own sampling defaults never apply silently: the harness's
        # parameters are exactly what runs.
        fields: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens or None,
            "do_sample": not params.greedy,
            "eos_token_id": sorted(self.eos_ids) or None,
            "pad_token_id": self.pad_id,
            "bos_token_id": self.model.generation_config.bos_token_id,
            "use_cache": True,
        }
        if not params.greedy:
            fields.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.repetition_penalty != 1.0:
            fields["repetition_penalty"] = params.repetition_penalty
        if stop:
            fields["stop_strings"] = list(stop)
        if self.options.cache == "static":
            fields["cache_implementation"] = "static"
            if self._compile_config is not None:
                fields["compile_config"] = self._compile_config
            else:  # transformers compiles a static cache's decode on its own on GPUs: only engine.compile decides
                fields["disable_compile"] = True
        return GenerationConfig(**fields)

    def _generate_kwargs(self, encoded: Encoded, params: GenerationParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": encoded.input_ids,
            "attention_mask": encoded.attention_mask,
            "generation_config": self._generation_config(params, encoded.stop),
        }
        if encoded.stop:
            kwargs["tokenizer"] = self.tokenizer
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        return kwargs

    def _run_generate(self, kwargs: dict[str, Any], timed: bool = True) -> torch.Tensor:
        before = _dynamo_frames()
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        if timed and _dynamo_frames() != before:
            self.compiles_in_requests += 1  # a shape the warm-up did not cover: this request's time includes it
        return out

    def _decode(self, ids: list[int], stop: tuple[str, ...]) -> tuple[str, str]:
        return decode_output(self.tokenizer, ids, stop, self.eos_ids)

    # -- the three entry points ---------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams) -> Generation:
        return self.batch([prompt], params)[0]  # a batch of one has no padding: the same call, the same tokens

    def stream(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        encoded = self._encode(prompt, params)
        if self.batcher is not None:
            from harness.engines.continuous import BatchedStream

            self._check_batchable(params)
            return BatchedStream(self, encoded, params)
        return _Stream(self, encoded, params)

    def _check_batchable(self, params: GenerationParams) -> None:
        from harness.engines.continuous import unsupported_params

        why = unsupported_params(params, self.options.batch_sampling)
        if why is not None:
            raise InferenceError(
                f"engine.batching=continuous cannot serve {why}.",
                "change the request, or run with engine.batching=none (one request at a time, any parameters).",
            )

    def batch(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        encoded = self._encode_many(prompts, params)
        if self.batcher is not None:
            from harness.engines.continuous import generate_many

            self._check_batchable(params)
            try:
                return generate_many(self, encoded, params)
            except Exception as exc:
                raise self.wrap_error(exc, f"continuous batching of {len(prompts)} prompt(s)") from exc
        stop, tokenize_ns, lengths = encoded.stop, encoded.tokenize_ns, encoded.lengths
        kwargs = self._generate_kwargs(encoded, params)
        start = time.perf_counter_ns()
        try:
            out = self._run_generate(kwargs)
            synchronize(self.device)
        except Exception as exc:
            raise self.wrap_error(exc, f"generation of {len(prompts)} prompt(s)") from exc
        end = time.perf_counter_ns()
        width = int(encoded.input_ids.shape[1])
        results = []
        for row, n_prompt in zip(out[:, width:].tolist(), lengths, strict=True):
            ids = self._trim(row)
            text, reason = self._decode(ids, stop)
            results.append(Generation(text, ids, int(n_prompt), reason, start, end, tokenize_ns))
        return results

    def token_nll(self, ids: Sequence[int], n_scored: int) -> float:
        check_scoring_window(len(ids), n_scored, self.loaded.context_window)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, use_cache=False).logits
            # Position t predicts token t+1: the last n_scored targets are predicted by the positions before them.
            predicted = logits[0, -n_scored - 1 : -1].float()
            targets = input_ids[0, -n_scored:]
            nll = torch.nn.functional.cross_entropy(predicted, targets, reduction="sum")
            return float(nll.item())
        except Exception as exc:
            raise self.wrap_error(exc, f"scoring a window of {len(ids)} tokens") from exc

    def _trim(self, row: list[int]) -> list[int]:
        """A finished sequence is padded to the batch's length: keep up to its first EOS."""
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[: i + 1]
        if self.pad_id not in self.eos_ids:
            while row and row[-1] == self.pad_id:
                row = row[:-1]
        return row


# -- the registry's entry points (harness.engines) ----------------------------------------------------------------
def load(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    from harness.models import load_model

    return load_model(cfg.model, cfg.quant, cfg.attention, cfg.cache_path, cfg.seed, cfg.ranks())


def create(loaded: LoadedModel, cfg: HarnessConfig | None, name: str = "transformers") -> TransformersEngine:
    return TransformersEngine(loaded, cfg.engine if cfg else None, cfg.cache_path if cfg else None)
