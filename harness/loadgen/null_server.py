"""A null OpenAI-compatible server that streams max_tokens one-token chunks at once, and the client calibration
that drives it: the requests/s and chunks/s this machine's client reaches when the server costs nothing, so a
load test can say how far its own figures are from the client's ceiling.

Run alone: python -m harness.loadgen.null_server --port 8123
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CALIBRATION_REQUESTS = 200
CALIBRATION_TOKENS = 64
CALIBRATION_CONCURRENCY = 32


def make_app() -> Any:
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "null", "object": "model"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        chat = request.path.endswith("/chat/completions")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        parts = []
        for i in range(n):
            choice = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
            choice["finish_reason"] = "length" if i == n - 1 else None
            parts.append(f"data: {json.dumps({'choices': [choice]})}\n\n")
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        parts.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n")
        for part in parts:  # one write per event: each is its own chunk on the wire, as a real server sends them
            await response.write(part.encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    return app


@contextlib.contextmanager
def running_null_server(log: Path) -> Iterator[Any]:
    """The null server in a process of its own, answering; its Endpoint. Stopped on leaving."""
    from harness.loadgen.client import Endpoint, probe
    from harness.loadgen.launch import free_port, log_tail

    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "harness.loadgen.null_server", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{port}/v1", "null", "completions", request_timeout_s=60)
        deadline = time.perf_counter() + 30
        while True:
            try:
                probe(endpoint)
                break
            except Exception:
                if server.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"the null server did not start: {log_tail(log)}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


def calibrate(cache_dir: Path, workers: int = 1) -> dict[str, Any]:
    """The client's ceiling against the null server in another process (cached per machine and worker count)."""
    import importlib.metadata

    from harness.loadgen.load import Planned, run_level

    key = f"{platform.node()}|{importlib.metadata.version('aiohttp')}|workers={workers}"
    store = cache_dir / "client-ceiling.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return {**known[key], "cached": True}
    with running_null_server(cache_dir / "null-server.log") as endpoint:
        body = {"model": "null", "prompt": "x", "max_tokens": CALIBRATION_TOKENS, "stream": True}
        plans = [Planned("/completions", body, CALIBRATION_TOKENS)] * CALIBRATION_REQUESTS
        level = run_level(endpoint, plans, "closed", CALIBRATION_CONCURRENCY, workers=workers)
    ok = [r for r in level.records if r.ok]
    span = max(r.t_end for r in ok) - level.t0
    chunks = sum(len(r.chunks) for r in ok)
    result = {
        "requests_s": len(ok) / span,
        "chunks_s": chunks / span,
        "client_cpu_us_per_chunk": level.client_cpu_s / chunks * 1e6 if chunks else None,
        "failed": len(level.records) - len(ok),
        "setup": f"{CALIBRATION_REQUESTS} requests of {CALIBRATION_TOKENS} one-token chunks, {CALIBRATION_CONCURRENCY} "
        f"closed-loop clients, {workers} client process(es), the null server in its own process",
    }
    known[key] = result
    with contextlib.suppress(OSError):
        store.write_text(json.dumps(known, indent=1))
    return {**result, "cached": False}


def main() -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
