"""The one thread that touches models: it loads, unloads and starts generations, one job at a time.

With engine.batching=none the transformers engine serves one request at a time and a token stream must be
consumed by one thread, so the whole generation runs on this thread. With batching=continuous a request only
joins the running batch here, and its tokens are read on a thread of its own while the next request joins.
Either way an unload waits for the model's running requests, so weights are never freed under a generation.
HTTP handlers wait on the job's future (or, for a stream, on its asyncio queue of events).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from harness.config import EngineConfig
from harness.engines.base import Engine, Generation, GenerationParams, StopStrings, TokenStream
from harness.models.loader import LoadedModel
from harness.models.manager import ModelManager, ModelSpec
from harness.prompts import Prompt

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    generation: Generation
    ttft_s: float | None


@dataclass
class Failed:
    error: BaseException


class DeltaDecoder:
    """Turns token ids into text deltas: never emits half a UTF-8 character, nor text that may turn out to be
    the start of a stop sequence (the final text is cut before a stop sequence, so neither may a stream).

    Each token costs a decode of two tokens, not of the whole output: the newest token is decoded with the one
    before it as context (so a tokenizer that merges or drops spaces at token boundaries decodes as it would in
    the full text), and the text grows by the difference.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = StopStrings(stop)
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read]
        self.sent = 0  # characters of text already sent
        self._prefix = 0  # ids[_prefix:read] are the context the next token is decoded with
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        context = self._decode(self.ids[self._prefix : self._read])
        with_new = self._decode(self.ids[self._prefix :])
        if with_new.endswith("\ufffd") or len(with_new) <= len(context):
            return ""  # half a character (or nothing) so far: wait for the next token
        self.text += with_new[len(context) :]
        self._prefix, self._read = self._read, len(self.ids)
        end = self.stops.sendable(self.text, self.sent)
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def finish(self, final_text: str) -> str:
        """What is left to send of the final (stop-cut) text."""
        sent = self.text[: self.sent]
        if final_text.startswith(sent):
            return final_text[len(sent) :]
        return ""  # cannot happen with a prefix-stable tokenizer; never resend text


@dataclass
class _Job:
    run: Callable[[], Any]
    future: Future = field(default_factory=Future)


class ModelWorker:
    def __init__(self, manager: ModelManager, max_queue: int, engine_options: EngineConfig | None = None) -> None:
        self.manager = manager
        self.engine_options = engine_options or EngineConfig()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._engines: dict[str, Engine] = {}
        self._running: dict[str, int] = {}  # model key -> its streams still being read
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="harness-model-worker", daemon=True)
        self._thread.start()

    # -- the thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.run())
            except BaseException as exc:  # handed to the waiting request
                job.future.set_exception(exc)

    def submit(self, run: Callable[[], Any]) -> Future:
        job = _Job(run)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting for the model") from None
        return job.future

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def running(self) -> int:
        """Generations whose token stream is still being read (all models)."""
        with self._idle:
            return sum(self._running.values())

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        for key in list(self._engines):
            self._close_engine(key)
        self.manager.unload_all()

    # -- jobs (run on the worker thread) ---------------------------------------------------------------------
    def _engine(self, spec: ModelSpec) -> tuple[LoadedModel, Engine]:
        from harness.engines.transformers import TransformersEngine

        loaded = self.manager.get(spec)
        for key in list(self._engines):  # engines of models the LRU has unloaded
            if key not in self.manager:
                self._close_engine(key)
        if spec.key not in self._engines:
            self._engines[spec.key] = TransformersEngine(loaded, self.engine_options, self.manager.cache_dir)
        return loaded, self._engines[spec.key]

    def engine_description(self, key: str) -> dict[str, Any] | None:
        engine = self._engines.get(key)
        return engine.describe() if engine is not None else None

    def _close_engine(self, key: str) -> None:
        """Wait for the model's running streams to end, then stop its engine (a batching manager's thread)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._running.get(key))
        engine = self._engines.pop(key, None)
        if engine is not None:
            engine.shutdown()

    def _track(self, key: str, delta: int) -> None:
        with self._idle:
            self._running[key] = self._running.get(key, 0) + delta
            if not self._running[key]:
                del self._running[key]
                self._idle.notify_all()

    def load(self, spec: ModelSpec) -> Future:
        return self.submit(lambda: self._engine(spec)[0])

    def unload(self, spec: ModelSpec) -> Future:
        def run() -> bool:
            self._close_engine(spec.key)
            return self.manager.unload(spec.key)

        return self.submit(run)

    def stream(
        self,
        spec: ModelSpec,
        prompt: Prompt,
        params: GenerationParams,
        emit: Callable[[Any], None],
        cancelled: threading.Event,
        on_cancel: Callable[[], None] | None = None,
    ) -> Future:
        """Generate, calling emit(TextDelta) per new text, then emit(Finished) or emit(Failed); once cancelled
        is set, stop at the next token and call on_cancel."""

        def read(stream: TokenStream, tokenizer: Any) -> None:
            try:
                decoder = DeltaDecoder(tokenizer, stream.stop)
                for event in stream:
                    if cancelled.is_set():
                        stream.close()
                        if on_cancel is not None:
                            on_cancel()
                        return
                    delta = decoder.push(event.token_id)
                    if delta:
                        emit(TextDelta(delta))
                generation = stream.generation
                assert generation is not None
                rest = decoder.finish(generation.text)
                if rest:
                    emit(TextDelta(rest))
                emit(Finished(generation, generation.latency().get("ttft_s")))
            except BaseException as exc:
                emit(Failed(exc))

        def run() -> None:
            try:
                loaded, engine = self._engine(spec)
                stream = engine.stream(prompt, params)
            except BaseException as exc:
                emit(Failed(exc))
                return
            self._track(spec.key, +1)  # counted here, so an unload queued after this job waits for it
            if not engine.concurrent:  # read on this thread: the next job waits for it
                try:
                    read(stream, loaded.tokenizer)
                finally:
                    self._track(spec.key, -1)
                return

            def read_then_release() -> None:
                try:
                    read(stream, loaded.tokenizer)
                finally:
                    self._track(spec.key, -1)

            threading.Thread(target=read_then_release, name="harness-stream", daemon=True).start()

        return self.submit(run)


def asyncio_emitter(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue) -> Callable[[Any], None]:
    """emit() for the worker thread that hands events to an asyncio queue on the server's loop."""

    def emit(event: Any) -> None:
        loop.call_soon_threadsafe(sink.put_nowait, event)

    return emit
