"""engine=openai and engine=vllm: any OpenAI-compatible server driven over HTTP by the harness's streaming client,
either launched for the point (harness serve, llama.cpp's server, vLLM in its own environment) or already running
at engine.base_url. bench=serve reaches its target the same way.

Only the model entry's tokenizer is loaded here (no weights): it builds exact-length prompts, formats chat for
api=completions, and counts the tokens of each streamed chunk. A chunk of k tokens becomes k token events whose
times spread its gap evenly (the token ITL of docs/metrics.md), so the in-process benches read HTTP streams with
the same definitions; the server's usage gives the output length where it reports one.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.chat import format_chat
from harness.config import HTTP_ENGINES, PARALLEL_LAUNCHES, HarnessConfig
from harness.device import Placement
from harness.engines.base import (
    Engine,
    GenerationParams,
    TokenEvent,
    TokenStream,
)
from harness.errors import ConfigError, HarnessError, InferenceError
from harness.loadgen.client import Endpoint, RequestRecord, new_session, probe, request_body, send
from harness.loadgen.figures import RunningTokenCount, rescale, token_times
from harness.loadgen.launch import LaunchedServer, cpu_binding, is_vllm_cpu_build, launch
from harness.loadgen.target import RemoteModel, harness_engine_args, served_name, server_plan
from harness.models.attention import AttentionChoice
from harness.models.loader import LoadedModel, checkpoint_for, effective_chat_format, gguf_file_for, load_tokenizer
from harness.models.sources import Source, resolve_source
from harness.processes import usable_cpus
from harness.prompts import Prompt, TokenPrompt


def _local_model(cfg: HarnessConfig, need: str, events: list[str]) -> tuple[Any, str | None, Source]:
    """The entry's tokenizer, and the file a launched server loads (`need`: gguf | checkpoint | none)."""
    from harness.models.cache import file_digest
    from harness.models.gguf import gguf_info, gguf_source, requantize, tokenizer_folder

    model = cfg.model
    if need == "gguf" or (need == "none" and (model.gguf_package or model.gguf_parts) and not model.random_weights):
        source = gguf_source(model, "a llama.cpp server")
        path, digest = gguf_file_for(source, model, cfg.cache_path, events)
        digest = digest or file_digest(path)
        tokenizer = load_tokenizer(str(tokenizer_folder(path, digest, cfg.cache_path, events)), model, source)
        if need == "gguf" and cfg.quant.gguf_type:
            info = gguf_info(path, digest, cfg.cache_path)
            if cfg.quant.gguf_type != info["file_type"]:
                path = requantize(path, digest, cfg.quant.gguf_type, info, cfg.cache_path, events)
        return tokenizer, str(path), source
    source = resolve_source(model)
    checkpoint, _ = checkpoint_for(source, model, cfg.cache_path, cfg.seed, events)
    return load_tokenizer(checkpoint, model, source), checkpoint, source


def _cpu_rank_binding(cfg: HarnessConfig, cpus: set[int] | None) -> str | None:
    """The CPUs of each worker of vLLM's CPU build when the model is split over ranks, unless the user set the
    binding in the environment (None then, and for one rank)."""
    ranks = cfg.engine.tensor_parallel * cfg.engine.pipeline_parallel
    if ranks == 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return None
    return cpu_binding(cpus or os.sched_getaffinity(0), ranks)


def load_remote_model(cfg: HarnessConfig, log_dir: Path) -> LoadedModel:
    """The point's server, launched or reached, with the entry's tokenizer; `close` stops a launched server."""
    t0 = time.perf_counter()
    plan = server_plan(cfg)
    events: list[str] = []
    need = {"llamacpp_server": "gguf", "vllm": "checkpoint", "mii": "checkpoint"}.get(plan.launch, "none")
    tokenizer, artifact, source = None, None, Source("server", plan.base_url or plan.launch, "a server over HTTP")
    try:
        tokenizer, artifact, source = _local_model(cfg, need, events)
    except HarnessError as exc:
        if plan.launch != "none":
            raise
        # A running server may serve a model this machine does not have: counts then come from the server.
        events.append(f"no client tokenizer ({exc.cause}): token counts come from the server's usage or chunks")
    name = served_name(cfg, plan)
    if plan.launch == "mii" and not plan.served_model:
        name = str(artifact)  # MII's server lists its model by the path it was given
    server: LaunchedServer | None = None
    relaunch = None
    binding = None
    cpu_build = plan.launch == "vllm" and is_vllm_cpu_build(cfg.engine.python)
    if plan.launch != "none":
        env = {"HARNESS_CACHE_DIR": str(cfg.cache_path)}
        python = cfg.engine.python if plan.launch in ("vllm", "mii") else None
        args = cfg.engine.server_args + harness_engine_args(cfg.engine, plan.launch)
        cpus = usable_cpus(cfg.engine.cpus, "engine.cpus")
        timeout_s = cfg.engine.launch_timeout_s
        binding = _cpu_rank_binding(cfg, cpus) if cpu_build else None
        if binding:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binding

        def relaunch() -> LaunchedServer:
            return launch(plan.launch, name, log_dir, artifact, python, args, timeout_s, env, cpus)

        server = relaunch()
        base_url = server.base_url
    else:
        assert plan.base_url is not None
        base_url = plan.base_url
    token_prompts = cfg.engine.token_prompts
    if token_prompts is None:
        token_prompts = plan.launch != "llamacpp_server"
    endpoint = Endpoint(
        base_url,
        name,
        plan.api,
        plan.api_key_env,
        plan.request_timeout_s,
        10.0,
        cfg.engine.send_min_tokens,
        token_prompts,
        salt_field=plan.launch == "vllm",  # a server at a URL may be anything: its prompts carry the salt
    )
    try:
        models = probe(endpoint)
        listed = [m["id"] for m in models]
        if listed and name not in listed:
            raise ConfigError(
                f"the server at {base_url} does not serve a model named {name!r}; it serves: {', '.join(listed)}.",
                "set served_model (engine.served_model or bench.served_model) to one of those.",
            )
        window = _context_window(endpoint, next((m for m in models if m["id"] == name), {}))
    except BaseException:
        if server is not None:
            server.stop()
        raise
    record = {"base_url": base_url, "served_model": name, "api": plan.api, "listed": listed}
    if plan.launch in PARALLEL_LAUNCHES:  # the model split over GPUs: recorded with the world size it needs
        tp, pp = cfg.engine.tensor_parallel, cfg.engine.pipeline_parallel
        record["parallel"] = {"tensor_parallel": tp, "pipeline_parallel": pp, "world_size": tp * pp}
        if cpu_build:
            record["parallel"]["devices"] = "cpu (vLLM's CPU build: a worker process per rank)"
            if binding:
                record["parallel"]["cpu_binding"] = binding
    if server is not None:
        record.update(server.record())
        events.append(f"launched the {server.kind} server in {server.startup_s:.1f} s (log: {server.log_path})")
    quant = {"name": cfg.quant.name, "method": cfg.quant.method, "served_by": plan.launch, "server": record}
    remote = RemoteModel(endpoint, server, relaunch)
    return LoadedModel(
        name=cfg.model.name,
        model=remote,
        tokenizer=tokenizer,
        placement=Placement("server", "as served", f"served over HTTP at {base_url}"),
        source=source,
        checkpoint=artifact or base_url,
        attention=AttentionChoice("auto", None, "the server's own"),
        attention_used="server",
        quant=quant,
        chat_format=effective_chat_format(cfg.model, tokenizer) if tokenizer is not None else "server",
        trust_remote_code=False,
        context_window=window,
        load_seconds=time.perf_counter() - t0,
        footprint_bytes=0,
        events=events,
        provenance={"server": record},
        close=remote.stop if server is not None else None,  # the server running then (trials restart it)
    )


def _context_window(endpoint: Endpoint, listed: dict[str, Any]) -> int | None:
    """The served model's context: vLLM lists max_model_len; harness serve tells it at /models/<name>."""
    if isinstance(listed.get("max_model_len"), int):
        return listed["max_model_len"]
    root = endpoint.base_url.rstrip("/").removesuffix("/v1")
    try:
        request = urllib.request.Request(f"{root}/models/{endpoint.model}", headers=endpoint.headers())
        with urllib.request.urlopen(request, timeout=endpoint.connect_timeout_s) as response:
            window = json.loads(response.read(100_000)).get("context_window")
    except (OSError, ValueError, AttributeError):
        return None
    return window if isinstance(window, int) else None


class OpenAIEngine(Engine):
    """Requests over HTTP on a private event loop thread; concurrent requests reach the server concurrently."""

    concurrent = True
    batch_refusal = (
        "sends requests to a server, which batches concurrent requests itself; a batch of {n} in one call is not "
        "something its API offers.",
        "use bench.batch_sizes=[1] here; bench.concurrency and bench=serve measure the server's batching.",
    )

    def __init__(self, loaded: LoadedModel, name: str = "openai") -> None:
        self.name = name
        self.loaded = loaded
        self.remote: RemoteModel = loaded.model
        self.tokenizer = loaded.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        self._session = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        close_server = loaded.close

        def close() -> None:
            self.shutdown()
            if close_server is not None:
                close_server()

        loaded.close = close

    @property
    def endpoint(self) -> Endpoint:
        """The server's, now (a trial's restart moves it to a new port)."""
        return self.remote.endpoint

    async def _open(self) -> Any:
        return new_session(self.endpoint)

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InferenceError(
                f"engine={self.name} needs the model entry's tokenizer to build prompts and count tokens, and "
                f"model '{self.loaded.name}' has none on this machine.",
                "pick the model entry the server serves (its tokenizer is loaded locally, never its weights).",
            )
        return self.tokenizer

    def _request(self, prompt: Prompt, params: GenerationParams) -> tuple[str, dict[str, Any], int | None]:
        tokenizer = self._require_tokenizer()
        prompt_tokens: int | None
        stop = list(params.stop)
        if isinstance(prompt, TokenPrompt):
            payload: Any = list(prompt.ids) if self.endpoint.token_prompts else tokenizer.decode(prompt.ids)
            prompt_tokens = len(prompt.ids)
        elif isinstance(prompt, str):
            payload = prompt
            prompt_tokens = len(tokenizer(prompt)["input_ids"])
        elif self.endpoint.api == "chat":
            payload, prompt_tokens = [dict(m) for m in prompt], None  # the server applies its own template
        else:
            payload, chat_stop = format_chat(prompt, self.loaded.chat_format, tokenizer)
            stop += [s for s in chat_stop if s not in stop]
            prompt_tokens = len(tokenizer(payload, add_special_tokens=False)["input_ids"])
        params.validate(self.loaded.context_window, prompt_tokens or 0)
        sampling: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
        if stop:
            sampling["stop"] = stop
        if params.top_k:
            sampling["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = params.repetition_penalty
        path, body = request_body(self.endpoint, payload, params.max_new_tokens, params.min_new_tokens, **sampling)
        return path, body, prompt_tokens

    def stream(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        self.remote.check_alive()
        path, body, prompt_tokens = self._request(prompt, params)
        return _HttpStream(self, path, body, prompt_tokens, params)

    def describe(self) -> dict[str, Any]:
        server = self.loaded.provenance.get("server", {})
        return {
            "name": self.name,
            "base_url": self.endpoint.base_url,
            "served_model": self.endpoint.model,
            "api": self.endpoint.api,
            "server": server,
            "client": f"aiohttp {_version('aiohttp')}, one connection pool, no connection cap",
            "concurrency": "the server's own: concurrent requests are sent concurrently",
            "batch": "the server batches concurrent requests; batch() sends one request",
            "timing": "client perf_counter at each SSE event's arrival; a chunk's k tokens share its gap evenly",
            "output_length": "forced with min_tokens/ignore_eos" if self.endpoint.send_min_tokens else "not forced",
        }


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class _HttpStream(TokenStream):
    """Token events of one streamed HTTP request, produced as its chunks arrive on the engine's loop."""

    def __init__(
        self, engine: OpenAIEngine, path: str, body: dict[str, Any], prompt_tokens: int | None, params: GenerationParams
    ) -> None:
        self._engine = engine
        self._params = params
        self.stop = tuple(body.get("stop") or ())
        self.prompt_tokens = prompt_tokens or 0
        self.tokenize_ns = 0
        self.start_ns = 0
        self._path, self._body = path, body
        self._queue: queue.Queue = queue.Queue()
        self._future: Any = None
        self._pending: list[TokenEvent] = []
        self._events: list[TokenEvent] = []
        self._text = ""
        self._reading = RunningTokenCount(engine.tokenizer)
        self._count = 0  # the running maximum of the tokenizer's count of the text so far
        self._chunks: list[tuple[float, int]] = []  # (arrival, tokens) of each chunk
        self._done = False
        self._record = RequestRecord(0, 0.0, params.max_new_tokens, prompt_tokens)

    async def _run(self) -> None:
        self._record.t_sched = time.perf_counter()
        try:
            await send(
                self._engine._session,
                self._engine.endpoint,
                self._path,
                self._body,
                self._record,
                on_chunk=lambda chunk: self._queue.put(("chunk", chunk)),
            )
        finally:
            self._queue.put(("end", None))

    def __next__(self) -> TokenEvent:
        while not self._pending:
            if self._done:
                raise StopIteration
            if self._future is None:
                self._future = asyncio.run_coroutine_threadsafe(self._run(), self._engine._loop)
            kind, chunk = self._queue.get()
            if kind == "end":
                self._finish()
                continue
            self._take(chunk)
        return self._pending.pop(0)

    def _take(self, chunk: Any) -> None:
        if not self.start_ns:
            self.start_ns = int(self._record.t_send * 1e9)
        self._text += chunk.text
        ids = self._reading.add(chunk.text)
        k = max(0, len(ids) - self._count)  # the rise of the running count (as figures.count_tokens reads it)
        self._chunks.append((chunk.t, k))
        if not k:
            return
        times = token_times([t for t, _ in self._chunks], [n for _, n in self._chunks])[-k:]
        new = [TokenEvent(int(i), int(t * 1e9)) for i, t in zip(ids[self._count :], times, strict=False)]
        self._count += k
        self._events.extend(new)
        self._pending.extend(new)

    def _finish(self) -> None:
        self._done = True
        record = self._record
        if record.status != "ok":
            where = self._engine.endpoint.base_url
            self._engine.remote.check_alive()
            if record.status.startswith("http_4"):  # the server refused this request: its message says why
                raise InferenceError(
                    f"the server at {where} refused the request ({record.status}): {record.error}",
                    "change the request as the server's message says.",
                )
            raise InferenceError(
                f"the server at {where} failed the request ({record.status}): {record.error}",
                "see the server's log (server.log beside result.json for a launched server); lower the load or "
                "the request's size, or raise engine.request_timeout_s for slow answers.",
            )
        if not self.start_ns:
            self.start_ns = int(record.t_send * 1e9)
        usage = record.usage or {}
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
        reason = {"length": "length"}.get(record.finish_reason or "", "stop" if self.stop else "eos")
        self._set_generation(self._events, record.text, reason)
        assert self.generation is not None
        # The server's count of output tokens wins over the client tokenizer's (which re-reads the text): the
        # token times are laid out again for that count, chunk by chunk (docs/metrics.md, "A server under load").
        reported = usage.get("completion_tokens")
        times, k = [t for t, _ in self._chunks], [n for _, n in self._chunks]
        if isinstance(reported, int) and reported != sum(k) and reported > 0:
            k = rescale(k, reported)
        token_ns = [int(t * 1e9) for t in token_times(times, k)]
        self.generation = replace(
            self.generation,
            token_ns=token_ns,
            end_ns=token_ns[-1] if token_ns else self.generation.end_ns,
            first_chunk_tokens=max(1, next((n for n in k if n > 0), 1)),
            reported_tokens=reported if isinstance(reported, int) else None,
        )

    def close(self) -> None:
        if self._done:
            return
        if self._future is not None and not self._future.done():
            self._future.cancel()
        self._done = True
        self._set_generation(self._events, self._text, "stop")


# -- the registry's entry points (harness.engines): engine=openai and engine=vllm ----------------------------------
def load(cfg: HarnessConfig, log_dir: Path | None = None) -> LoadedModel:
    return load_remote_model(cfg, log_dir or cfg.cache_path / "server-logs")


def create(loaded: LoadedModel, cfg: HarnessConfig | None, name: str = "openai") -> OpenAIEngine:
    return OpenAIEngine(loaded, name if name in HTTP_ENGINES else "openai")
