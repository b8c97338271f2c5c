"""The FastAPI application: OpenAI-compatible generation, model management, benchmark jobs, health, metrics.

Every model operation runs on the one model worker thread (see worker.py). Errors a client can cause are
answered 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}), which the official
clients turn into their own exceptions; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from harness.engines.base import GenerationParams
from harness.errors import ConfigError, HarnessError, InferenceError
from harness.models.manager import ModelManager, ModelSpec
from harness.prompts import Prompt, TokenPrompt
from harness.server import dashboard
from harness.server.jobs import FINISHED, JobLimits, JobRunner
from harness.server.metrics import CONTENT_TYPE, ServerMetrics
from harness.server.registry import ModelRegistry, UnknownModel
from harness.server.schemas import BenchmarkRequest, ChatRequest, CompletionRequest
from harness.server.settings import ServerSettings
from harness.server.worker import Failed, Finished, ModelWorker, QueueFull, TextDelta, asyncio_emitter

OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _harness_error(exc: BaseException) -> APIError:
    """A failure inside the worker as an HTTP answer: the client's request (400) or this server (503/500)."""
    if isinstance(exc, InferenceError):
        return APIError(400, f"{exc.cause} Fix: {exc.fix}")
    if isinstance(exc, HarnessError):
        return APIError(503, f"{type(exc).__name__}: {exc.cause} Fix: {exc.fix}", kind="server_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


class Gate:
    """Pure ASGI: body size limit (413), bearer token (401; the dashboard's paths also take its cookie, and its page
    answers 401 with a form that asks for the token), and a count of every answer by route and code."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def _reply(self, send: Any, status: int, body: dict[str, Any], headers: list | None = None) -> None:
        data = json.dumps(body).encode()
        start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "started": False}

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unrouted"  # refused before routing, or no such path
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    async def _handle(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        token = self.settings.token
        path = scope["path"]
        if token and path not in OPEN_PATHS and path != dashboard.PREFIX + "/login":
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, value = given.partition(" ")
            bearer = scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
            on_dashboard = path == dashboard.PREFIX or path.startswith(dashboard.PREFIX + "/")
            cookie = headers.get(b"cookie", b"").decode("latin-1")
            if not bearer and not (on_dashboard and cookie and dashboard.cookie_ok(cookie, token)):
                why = "no bearer token was sent" if not given else "the bearer token is wrong"
                if path in (dashboard.PREFIX, dashboard.PREFIX + "/"):  # a browser: the form that asks for it
                    page = dashboard.login_page("This server needs its token.")
                    start = [
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"content-length", str(len(page)).encode()),
                    ]
                    await send({"type": "http.response.start", "status": 401, "headers": start})
                    await send({"type": "http.response.body", "body": page})
                    return
                await self._reply(
                    send,
                    401,
                    error_body(f"unauthorized: {why}.", "authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        too_large = error_body(
            f"the request body is larger than the server's limit of {limit} bytes.", "invalid_request_error"
        )
        if length and length.isdigit() and int(length) > limit:
            await self._reply(send, 413, too_large)
            return
        # Read the whole body first (chunked bodies carry no length), so an oversized one is refused with 413
        # before any handler parses a byte of it.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > limit:
                await self._reply(send, 413, too_large)
                return
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Any:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class Server:
    """The state behind the routes."""

    def __init__(self, settings: ServerSettings, manager: ModelManager | None = None) -> None:
        self.settings = settings
        budget = settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None
        self.manager = manager or ModelManager(settings.capacity, budget, cache_dir=settings.cache_dir)
        self.registry = ModelRegistry(settings.model_dirs, settings.allow_remote_code, settings.allow_downloads)
        self.worker = ModelWorker(self.manager, settings.max_queue, settings.engine)
        self.jobs = JobRunner(
            settings.jobs_dir,
            settings.max_parallel_jobs,
            cache_dir=settings.cache_dir,
            allow_remote_code=settings.allow_remote_code,
            limits=JobLimits(
                max_seconds=settings.job_max_seconds,
                max_runs=settings.job_max_runs,
                max_new_tokens=settings.max_tokens_limit,
            ),
            targets=settings.job_targets,
        )
        self.metrics = ServerMetrics()
        self.tracer = None
        if settings.otlp_endpoint:
            from harness.tracing import ServerTracer

            self.tracer = ServerTracer(settings.otlp_endpoint)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.registry.spec(name)
        except UnknownModel as exc:
            raise APIError(404, str(exc), param="model") from None
        except ConfigError as exc:
            raise APIError(400, f"{exc.cause} Fix: {exc.fix}", param="model") from None

    def servable_spec(self, name: str) -> ModelSpec:
        """The spec of a model this server can load now; 503 at once (not after the hub's retries) otherwise."""
        spec = self.spec(name)
        if self.manager.peek(spec.key) is not None:  # loaded: nothing left to fetch
            return spec
        found = self.registry.servable(spec)
        if not found.offline:
            raise APIError(
                503,
                f"model {name!r} cannot be served here: its weights are not on this machine ({found.how}). Fix: "
                "`harness models` lists what is available offline; install or download its weights on the server's "
                "machine, or pick a model that GET /v1/models lists (a server started with --allow-downloads fetches "
                "hub models on first use).",
                kind="server_error",
                param="model",
            )
        return spec

    def params(self, body: ChatRequest | CompletionRequest) -> GenerationParams:
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        limit = self.settings.max_tokens_limit
        if requested is not None and requested > limit:
            raise APIError(400, f"max_tokens={requested} is above this server's limit of {limit}.", param="max_tokens")
        max_new = requested or self.settings.default_max_tokens
        if body.min_tokens > max_new:
            raise APIError(400, f"min_tokens={body.min_tokens} is above max_tokens={max_new}.", param="min_tokens")
        return GenerationParams(
            max_new_tokens=max_new,
            min_new_tokens=max_new if body.ignore_eos else body.min_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            stop=body.stop_sequences(),
        )

    def model_info(self, name: str, spec: ModelSpec) -> dict[str, Any]:
        loaded = self.manager.peek(spec.key)
        q = spec.quant
        quant = {"name": q.name, "method": q.method, "bits": q.bits}
        found = self.registry.servable(spec)
        info: dict[str, Any] = {
            "id": name,
            "loaded": loaded is not None,
            "available": found.offline,
            "weights": found.how,
            "quantization": quant,
        }
        if loaded is not None:
            info.update(
                device=loaded.placement.device,
                dtype=loaded.placement.dtype,
                quantization=loaded.quant,
                attention=loaded.attention_used,
                memory_bytes=loaded.footprint_bytes,
                context_window=loaded.context_window,
                chat_format=loaded.chat_format,
                source=loaded.source.record(),
                trust_remote_code=loaded.trust_remote_code,
            )
            engine = self.worker.engine_description(spec.key)
            if engine is not None:
                info["engine"] = engine  # how it generates: batching, cache, compile, threads
        return info

    async def run(self, job: Callable[[], Future]) -> Any:
        """Queue a model operation on the worker and wait for its result."""
        try:
            return await asyncio.wrap_future(self.enqueue(job))
        except HarnessError as exc:
            raise _harness_error(exc) from None

    @staticmethod
    def enqueue(job: Callable[[], Future]) -> Future:
        try:
            return job()
        except QueueFull as exc:
            raise APIError(503, f"the server is busy: {exc}; retry later.", kind="server_error") from None

    def submit_stream(self, spec: ModelSpec, prompt: Prompt, params: GenerationParams, model: str):
        sink: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        emit = asyncio_emitter(asyncio.get_running_loop(), sink)
        counter = self.metrics.cancelled.labels(model)
        self.enqueue(lambda: self.worker.stream(spec, prompt, params, emit, cancelled, on_cancel=counter.inc))
        return sink, cancelled


def create_app(settings: ServerSettings | None = None, manager: ModelManager | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    server = Server(settings, manager)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.jobs.shutdown)  # stops the jobs' process groups, marks them interrupted
        await asyncio.to_thread(server.worker.stop)
        if server.tracer is not None:
            await asyncio.to_thread(server.tracer.shutdown)  # the last batch of spans goes out

    app = FastAPI(
        title="harness",
        description="OpenAI-compatible generation, model management and benchmark jobs over the harness's engines.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(Gate, settings=settings, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (no such path, method not allowed) in OpenAI's error shape too."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {exc.detail}."
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            if e.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
                continue
            where = ".".join(loc) or "body"
            param = param or where
            problems.append(f"{where}: {e.get('msg')}")
        return JSONResponse(error_body("; ".join(problems) + ".", "invalid_request_error", param), status_code=400)

    # -- OpenAI-compatible ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The models this server can serve now: loaded, or with their weights on this machine (clients such as
        AIPerf pick the first listed, so an entry that would have to be downloaded is not offered)."""
        return {"object": "list", "data": await asyncio.to_thread(_servable_models, server)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        spec = server.servable_spec(body.model)
        messages = [m.model_dump() for m in body.messages]
        return await _generate(server, request, "/v1/chat/completions", body, spec, messages)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        spec = server.servable_spec(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else TokenPrompt(tuple(body.prompt))
        return await _generate(server, request, "/v1/completions", body, spec, prompt)

    # -- model management ----------------------------------------------------------------------------------
    @app.get("/models/{name}")
    async def model_state(name: str) -> dict[str, Any]:
        return server.model_info(name, server.spec(name))

    @app.post("/models/{name}/load")
    async def load(name: str) -> dict[str, Any]:
        spec = server.servable_spec(name)
        await server.run(lambda: server.worker.load(spec))
        return server.model_info(name, spec)

    @app.post("/models/{name}/unload")
    async def unload(name: str) -> dict[str, Any]:
        spec = server.spec(name)
        was_loaded = await server.run(lambda: server.worker.unload(spec))
        return {**server.model_info(name, spec), "unloaded": was_loaded}

    # -- benchmark jobs ------------------------------------------------------------------------------------
    @app.post("/benchmarks", status_code=202)
    async def submit_benchmark(body: BenchmarkRequest) -> dict[str, Any]:
        try:
            job = await asyncio.to_thread(server.jobs.submit, body.overrides, body.target)
        except ConfigError as exc:
            raise APIError(400, f"{exc.cause} Fix: {exc.fix}", param="overrides") from None
        return job.describe(with_result=False)

    @app.get("/benchmarks")
    async def list_benchmarks() -> dict[str, Any]:
        return {"object": "list", "data": [j.describe(with_result=False) for j in server.jobs.all()]}

    @app.get("/benchmarks/{job_id}")
    async def benchmark(job_id: str) -> dict[str, Any]:
        job = server.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no benchmark job {job_id!r}.", param="job_id")
        return job.describe()

    @app.delete("/benchmarks/{job_id}")
    async def cancel_benchmark(job_id: str) -> dict[str, Any]:
        job = server.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no benchmark job {job_id!r}.", param="job_id")
        if job.status in FINISHED:
            raise APIError(409, f"benchmark job {job_id!r} has already ended ({job.status}).", param="job_id")
        job = await asyncio.to_thread(server.jobs.cancel, job_id)
        assert job is not None
        return job.describe(with_result=False)

    # -- the dashboard: the outputs folder's sweeps and this server's jobs -------------------------------------
    from pathlib import Path

    root = Path(settings.dashboard_dir or Path(settings.jobs_dir).parent)
    app.include_router(dashboard.router(root, lambda: [j.describe(with_result=False) for j in server.jobs.all()]))

    @app.post(dashboard.PREFIX + "/login", include_in_schema=False)
    async def dashboard_login(request: Request) -> Response:
        return await dashboard.login(request, settings.token)

    # -- operations ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded_models": len(server.manager.loaded()), "queue_depth": server.worker.queue_depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = server.metrics.render(
            len(server.manager.loaded()),
            server.manager.used_bytes(),
            server.worker.queue_depth,
            server.worker.running,
            server.jobs.counts(),
        )
        return Response(body, media_type=CONTENT_TYPE)

    return app


def _servable_models(server: Server) -> list[dict[str, Any]]:
    loaded = set(server.manager.loaded())
    data = []
    for name in server.registry.names():
        try:
            spec = server.registry.spec(name)
        except (ConfigError, UnknownModel):  # an entry that does not compose here cannot be served either
            continue
        is_loaded = spec.key in loaded
        if is_loaded or server.registry.servable(spec).offline:
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "harness", "loaded": is_loaded})
    return data


async def _until_disconnected(request: Request, cancelled: threading.Event, sink: asyncio.Queue) -> None:
    """Stop a non-streamed generation whose client went away, as a stream's is stopped at its next token."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    cancelled.set()
    sink.put_nowait(Failed(InferenceError("the client disconnected.", "nothing: the generation was stopped.")))


async def _generate(server: Server, request: Request, endpoint: str, body: Any, spec: ModelSpec, prompt: Prompt) -> Any:
    params = server.params(body)
    chat = endpoint == "/v1/chat/completions"
    t0 = time.perf_counter()
    sink, cancelled = server.submit_stream(spec, prompt, params, body.model)
    first = await sink.get()  # before answering: an error here is still a proper 4xx/5xx
    if isinstance(first, Failed):
        raise _harness_error(first.error)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    m = server.metrics

    def record(done: Finished) -> dict[str, int]:
        g = done.generation
        m.tokens.labels(body.model, "prompt").inc(g.prompt_tokens)
        m.tokens.labels(body.model, "completion").inc(g.output_tokens)
        if done.ttft_s is not None:
            m.ttft.labels(body.model).observe(done.ttft_s)
        m.latency.labels(body.model, endpoint).observe(time.perf_counter() - t0)
        if server.tracer is not None:
            now = time.time()
            server.tracer.request("chat" if chat else "text_completion", body.model, now - (time.perf_counter() - t0),
                                  now, g.prompt_tokens, g.output_tokens, done.ttft_s,
                                  FINISH.get(g.finish_reason, "stop"), params.max_new_tokens)  # fmt: skip
        return {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.output_tokens,
            "total_tokens": g.prompt_tokens + g.output_tokens,
        }

    if not body.stream:
        parts, event = [], first
        watcher = asyncio.create_task(_until_disconnected(request, cancelled, sink))
        try:
            while not isinstance(event, Finished):
                if isinstance(event, Failed):
                    raise _harness_error(event.error)
                parts.append(event.text)
                event = await sink.get()
        finally:
            watcher.cancel()
        usage = record(event)
        text, reason = "".join(parts), FINISH.get(event.generation.finish_reason, "stop")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion" if chat else "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice], "usage": usage}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        data = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(None, None, role=True)
            event = first
            while True:
                if isinstance(event, TextDelta):
                    yield chunk(event.text, None)
                elif isinstance(event, Finished):
                    usage = record(event)
                    yield chunk(None if chat else "", FINISH.get(event.generation.finish_reason, "stop"))
                    if include_usage:
                        data = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [],
                                "usage": usage}  # fmt: skip
                        yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:  # Failed mid-stream: the status is already sent, so the error goes in the stream
                    err = _harness_error(event.error)
                    yield f"data: {json.dumps(error_body(err.message, err.kind))}\n\n"
                    return
                event = await sink.get()
        finally:
            cancelled.set()  # a client that went away stops its generation at the next token

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
