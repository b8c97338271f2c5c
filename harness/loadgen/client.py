"""The one streaming client of engine=openai and bench=serve: an OpenAI-compatible request over aiohttp, each SSE
event stamped as it is read (before parsing), kept as a RequestRecord that never raises for a server's fault.

What counts as a chunk is defined in docs/metrics.md ("A server under load"): an event that carries output text
(content, reasoning or tool-call text). Role-only and usage-only events, empty finish events, comments and [DONE]
are not chunks; their usage and finish reason are kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError, ModelLoadError

READ_BUFFER = 4 * 2**20  # aiohttp's 64 KiB default splits long SSE lines and slows long prompts down
ERROR_TEXT_LIMIT = 2000
DRAIN_S = 0.5  # after [DONE], how long the end of the body may take before the connection is dropped


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and how: `base_url` ends in /v1; the API key is read from `api_key_env` at send time,
    so it is never part of a config, a log or a result."""

    base_url: str
    model: str
    api: str = "chat"  # chat | completions: where chat messages go (token-id prompts always use completions)
    api_key_env: str | None = None
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    send_min_tokens: bool = True  # min_tokens / ignore_eos (vLLM-style servers) to force the output length
    token_prompts: bool = True  # the server takes a prompt as token ids (else its text is sent)
    salt_field: bool = False  # the server isolates its prefix cache by a request's `cache_salt` field (vLLM)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"the API key variable {self.api_key_env} is not set in the environment.",
                    f"export {self.api_key_env}=<key>, or drop api_key_env for a server that needs no key.",
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


@dataclass
class Chunk:
    t: float  # perf_counter() seconds when the event's first line was read
    text: str
    usage_tokens: int | None = None  # completion tokens so far, where the server streams usage on every chunk
    reasoning: str = ""  # the part of text that is reasoning (a thinking model's trace), not the answer

    @property
    def answers(self) -> bool:
        """Whether the chunk carries answer text (content or a tool call), not only reasoning."""
        return len(self.text) > len(self.reasoning)


@dataclass
class RequestRecord:
    """One request as the client saw it; times are time.perf_counter() seconds (system-wide on Linux, so
    records from several client processes share one clock)."""

    index: int
    t_sched: float
    max_tokens: int
    prompt_tokens: int | None = None  # the client's own count of the prompt, where it knows it
    warmup: bool = False
    t_send: float = 0.0
    t_end: float = 0.0
    chunks: list[Chunk] = field(default_factory=list)
    status: str = "pending"  # ok | http_<code> | timeout | connect_error | disconnected | error_event | bad_response
    error: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    forced: bool = True  # the request asked for exactly max_tokens (min_tokens): a shorter answer is counted
    session: int | None = None  # multi-turn sessions with real replies: which session and turn
    turn: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def answer(self) -> str:
        """The answer without any reasoning before it: what a chat client keeps in the conversation."""
        return "".join(c.text[len(c.reasoning) :] for c in self.chunks)


def request_body(
    endpoint: Endpoint, prompt: Any, max_tokens: int, min_tokens: int = 0, **sampling: Any
) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one streamed request. `prompt` is a list of chat messages, a string, or a list of
    token ids (sent to /completions, which takes token ids, so a prompt keeps its exact length)."""
    chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    path = "/chat/completions" if chat and endpoint.api == "chat" else "/completions"
    body: dict[str, Any] = {
        "model": endpoint.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }
    if path == "/chat/completions":
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if min_tokens and endpoint.send_min_tokens:
        body["min_tokens"] = min_tokens
        if min_tokens >= max_tokens:
            body["ignore_eos"] = True
    body.update({k: v for k, v in sampling.items() if v is not None})
    return path, body


def _chunk_text(choice: dict[str, Any]) -> tuple[str, str]:
    """An event's output text, and the part of it that is reasoning (`reasoning_content`, as vLLM and DeepSeek
    send it, or `reasoning`, as llama.cpp's server and OpenRouter do)."""
    if "delta" in choice:
        delta = choice.get("delta") or {}
        reasoning = "".join(p for p in (delta.get("reasoning_content"), delta.get("reasoning")) if isinstance(p, str))
        parts = [delta.get("content")]
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            parts += [function.get("name"), function.get("arguments")]
        return reasoning + "".join(p for p in parts if isinstance(p, str)), reasoning
    text = choice.get("text")
    return (text if isinstance(text, str) else ""), ""


class _Events:
    """SSE framing: lines are gathered into events; an event's time is when its first line was read."""

    def __init__(self, record: RequestRecord, on_chunk: Callable[[Chunk], None] | None = None) -> None:
        self.record = record
        self.on_chunk = on_chunk
        self.data: list[str] = []
        self.t = 0.0
        self.done = False

    def line(self, raw: bytes, t: float) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            self.dispatch()
            return
        if line.startswith(":"):  # a comment (keep-alive)
            return
        name, _, value = line.partition(":")
        if name == "data":
            if not self.data:
                self.t = t
            self.data.append(value[1:] if value.startswith(" ") else value)

    def dispatch(self) -> None:
        if not self.data:
            return
        payload, self.data = "\n".join(self.data), []
        record = self.record
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            record.status, record.error = "bad_response", f"an SSE event is not JSON: {payload[:200]!r}"
            return
        if not isinstance(event, dict):
            record.status, record.error = "bad_response", f"an SSE event is not a JSON object: {payload[:200]!r}"
            return
        if "error" in event:
            err = event["error"]
            record.status = "error_event"
            record.error = str(err.get("message", err) if isinstance(err, dict) else err)[:ERROR_TEXT_LIMIT]
            return
        usage = event.get("usage")
        usage_tokens = None
        if isinstance(usage, dict):
            record.usage = usage
            usage_tokens = usage.get("completion_tokens")
        for choice in (event.get("choices") or [])[:1]:
            text, reasoning = _chunk_text(choice)
            if text:
                chunk = Chunk(self.t, text, usage_tokens, reasoning)
                record.chunks.append(chunk)
                if self.on_chunk is not None:
                    self.on_chunk(chunk)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]


async def send(
    session: Any,
    endpoint: Endpoint,
    path: str,
    body: dict[str, Any],
    record: RequestRecord,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> None:
    """Send one streamed request and fill `record` (`on_chunk` sees each chunk as it lands); a server's failure is
    recorded, never raised."""
    import aiohttp

    events = _Events(record, on_chunk)
    record.t_send = time.perf_counter()
    try:
        async with session.post(endpoint.url(path), json=body, headers=endpoint.headers()) as response:
            if response.status != 200:
                text = (await response.text(errors="replace"))[:ERROR_TEXT_LIMIT]
                record.status, record.error = f"http_{response.status}", _error_message(text)
                return
            kind = response.headers.get("Content-Type", "")
            if "text/event-stream" not in kind:
                text = (await response.text(errors="replace"))[:200]
                record.status = "bad_response"
                record.error = (
                    f"asked for a stream, the server answered {kind or 'no content type'} ({text!r}): it does not "
                    "speak OpenAI's streaming API at this URL."
                )
                return
            record.status = "streaming"
            async for raw in response.content:
                events.line(raw, time.perf_counter())
                if events.done or record.status in ("bad_response", "error_event"):
                    break
            events.dispatch()
            if events.done:
                ended = time.perf_counter()
                await _drain(response)
                record.t_end = ended
    except asyncio.TimeoutError:
        record.status = "timeout"
        record.error = f"no complete answer within {endpoint.request_timeout_s:g} s."
    except aiohttp.ClientConnectorError as exc:
        record.status, record.error = "connect_error", f"cannot connect to {endpoint.base_url}: {exc}"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        record.status, record.error = "disconnected", f"the server closed the stream: {type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        record.status, record.error = "bad_response", f"{type(exc).__name__}: {exc}"
    finally:
        record.t_end = record.t_end or time.perf_counter()
    if record.status == "streaming":
        if events.done or record.finish_reason:
            record.status = "ok"
        else:
            record.status, record.error = "disconnected", "the stream ended before [DONE] or a finish reason."
    if record.status == "ok" and not record.chunks:
        record.status, record.error = "bad_response", "the stream carried no output text."


async def _drain(response: Any) -> None:
    """Read what follows [DONE] (the end of the body), so the connection goes back to the pool and the next
    request of a conversation reuses it; a server that keeps the stream open is left to close."""
    try:
        await asyncio.wait_for(response.read(), timeout=DRAIN_S)
    except Exception:  # a stream that does not end cleanly only costs its connection
        response.close()


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message") or body["error"])[:ERROR_TEXT_LIMIT]
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:ERROR_TEXT_LIMIT]
    except json.JSONDecodeError:
        pass
    return text.strip()[:ERROR_TEXT_LIMIT] or "(empty body)"


def probe(endpoint: Endpoint) -> list[dict[str, Any]]:
    """The models a running server lists at /models; a clear error when it is not reachable, refuses the key, or
    does not speak OpenAI's API."""
    request = urllib.request.Request(endpoint.url("/models"), headers=endpoint.headers())
    where = endpoint.base_url
    try:
        with urllib.request.urlopen(request, timeout=endpoint.connect_timeout_s) as response:
            raw = response.read(1_000_000)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(
                f"the server at {where} refused the request with HTTP {exc.code}: the API key is missing or wrong.",
                "set the api_key_env variable to the server's key (api_key_env names the variable).",
            ) from None
        raise ModelLoadError(
            f"the server at {where} answered GET /models with HTTP {exc.code}: it is not an OpenAI-compatible API "
            "root.",
            "give base_url up to and including /v1 (http://host:port/v1).",
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelLoadError(
            f"cannot reach the server at {where}: {reason}.",
            "start the server, check base_url's host and port, or launch one for the point (launch=harness).",
        ) from None
    try:
        body = json.loads(raw)
        return [m for m in body["data"] if isinstance(m["id"], str)]
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(
            f"the server at {where} answered GET /models with something that is not OpenAI's model list "
            f"({raw[:120]!r}).",
            "point base_url at an OpenAI-compatible API root (it ends in /v1 on most servers).",
        ) from None


def new_session(endpoint: Endpoint, connections: int = 0) -> Any:
    """A connection pool: by default for the whole process, without a cap (a cap silently limits concurrency);
    connections=1 keeps a conversation on one connection, as a chat client does."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=endpoint.request_timeout_s, sock_connect=endpoint.connect_timeout_s)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=READ_BUFFER)
