"""A scripted OpenAI-compatible server for the serving tests: each model name plays a script of SSE events with
set delays, and the server stamps (time.perf_counter, the client's clock: same process) when it wrote each event,
so a test can check the client's figures against what was really sent, not against sleep accuracy."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DISCONNECT = object()  # close the connection mid-stream


@dataclass
class Script:
    events: list[tuple[float, Any]] = field(default_factory=list)  # (delay before it, dict | str | DISCONNECT)
    status: int = 200
    body: Any = None  # for status != 200, or a non-streaming answer
    content_type: str = "text/event-stream"


def content(text: str, usage: int | None = None, chat: bool = True) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None} if chat else {"index": 0, "text": text}
    event: dict[str, Any] = {"choices": [choice]}
    if usage is not None:
        event["usage"] = {"prompt_tokens": 5, "completion_tokens": usage, "total_tokens": 5 + usage}
    return event


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
FINISH = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}


def usage_only(completion: int, prompt: int = 5) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}  # fmt: skip


class MockServer:
    """aiohttp server on a free loopback port in a thread of its own; `scripts[model]` answers a request."""

    def __init__(
        self,
        scripts: dict[str, Script],
        models_status: int = 200,
        api_key: str | None = None,
        listing: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.scripts = scripts  # a Script, or a function of the request body that returns one
        self.listing = listing or {}  # model -> extra fields of its /v1/models entry (max_model_len)
        self.models_status = models_status
        self.api_key = api_key
        self.writes: dict[str, list[list[float]]] = {}  # model -> per request, the perf_counter of each write
        self.bodies: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []  # every request: method, path, Authorization header
        self.client_ports: list[int | None] = []  # every request's client port: one per connection
        self.metrics: Any = None  # a function of the streams now open -> the /metrics page (None: no /metrics)
        self.streaming = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    def _authorized(self, request: Any) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _app(self) -> Any:
        from aiohttp import web

        async def models(request: web.Request) -> web.Response:
            if not self._authorized(request):
                return web.json_response({"error": {"message": "bad key"}}, status=401)
            if self.models_status != 200:
                return web.Response(text="<html>not here</html>", status=self.models_status, content_type="text/html")
            data = [{"id": m, **self.listing.get(m, {})} for m in self.scripts]
            return web.json_response({"object": "list", "data": data})

        async def complete(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return web.json_response({"error": {"message": "Incorrect API key provided"}}, status=401)
            body = await request.json()
            self.bodies.append(body)
            script = self.scripts[body["model"]]
            if callable(script):  # an answer that depends on the request (a conversation's history)
                script = script(body)
            if script.status != 200 or script.content_type != "text/event-stream":
                if script.body is not None and not isinstance(script.body, str):
                    return web.json_response(script.body, status=script.status)
                return web.Response(text=script.body or "", status=script.status, content_type="text/plain")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            stamps: list[float] = []
            self.writes.setdefault(body["model"], []).append(stamps)
            self.streaming += 1
            try:
                for delay, event in script.events:
                    if delay:
                        await asyncio.sleep(delay)
                    if event is DISCONNECT:
                        request.transport.close()
                        return response
                    if isinstance(event, str):
                        payload = event if event.startswith(":") else f"data: {event}"
                    else:
                        payload = f"data: {json.dumps(event)}"
                    stamps.append(time.perf_counter())
                    await response.write((payload + "\n\n").encode())
                await response.write_eof()
                return response
            finally:
                self.streaming -= 1

        async def metrics(request: web.Request) -> web.Response:
            if self.metrics is None:
                return web.Response(status=404)
            return web.Response(text=self.metrics(self.streaming), content_type="text/plain")

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append((request.method, request.path, request.headers.get("Authorization")))
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.client_ports.append(peer[1] if peer else None)
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/v1/completions", complete)
        app.router.add_post("/v1/chat/completions", complete)
        return app

    def __enter__(self) -> MockServer:
        from aiohttp import web

        async def start() -> None:
            runner = web.AppRunner(self._app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._runner = runner
            self._ready.set()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(start())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"
