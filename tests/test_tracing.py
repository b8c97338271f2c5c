"""telemetry.otlp_endpoint and `harness serve --otlp-endpoint`: traces sent over OTLP/HTTP to a receiver the test
runs, which decodes the protobuf it gets (the wire format any collector reads)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the telemetry extra is not installed")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from harness.loadgen.launch import free_port
from harness.tracing import export_point, finish_sweep
from tests.conftest import run_harness, serving
from tests.mock_openai import MockServer
from tests.test_replay import answer, serve_point, usage


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span it is sent, decoded, with its attributes."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        received = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            received.append({
                                "service": service, "name": span.name, "trace": span.trace_id.hex(),
                                "id": span.span_id.hex(), "parent": span.parent_span_id.hex(), "kind": span.kind,
                                "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                "status": span.status.code, "attrs": {a.key: _value(a.value) for a in span.attributes},
                            })  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def test_a_sweep_exports_a_trace_per_point_with_genai_request_spans(tmp_path):
    folder = tmp_path / "outputs" / "multirun" / "traced"
    with Receiver() as receiver:
        done = run_harness(tmp_path, "-m", "model=tiny-gpt2", "bench=latency", "seed=0,1", "bench.prompt_lengths=[8]",
                           "bench.max_new_tokens=4", "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0",
                           f"telemetry.otlp_endpoint={receiver.url}", f"hydra.sweep.dir={folder}")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    spans = receiver.spans
    roots = [s for s in spans if s["name"].startswith("harness point")]
    assert len(roots) == 2 and len({s["trace"] for s in spans}) == 2 and {s["service"] for s in spans} == {"harness"}
    for root in roots:
        mine = [s for s in spans if s["trace"] == root["trace"]]
        (case,) = [s for s in mine if s["name"] == "latency prompt=8"]
        requests = [s for s in mine if s["parent"] == case["id"]]
        assert case["parent"] == root["id"] and len(requests) == 3
        for r in requests:
            assert r["name"] == "text_completion tiny-gpt2" and r["kind"] == 3  # SPAN_KIND_CLIENT
            a = r["attrs"]
            assert a["gen_ai.request.model"] == "tiny-gpt2" and a["gen_ai.usage.output_tokens"] == 4
            assert a["gen_ai.usage.input_tokens"] == 8 and 0 < a["gen_ai.response.time_to_first_chunk"] < 5
            assert root["start"] <= r["start"] < r["end"] <= root["end"]
            assert r["end"] - r["start"] == pytest.approx(a["harness.e2e_ms"] * 1e6, rel=1e-3)
    results = [json.loads(p.read_text()) for p in folder.rglob("result.json")]
    assert all(r["details"]["telemetry"]["exported"] and r["details"]["telemetry"]["spans"] == 5 for r in results)


def test_a_serve_level_is_a_span_with_its_requests_below_it_and_failures_marked(tmp_path):
    with MockServer({"m": answer(usage(7, 2), {"content": "a"}, {"content": "b"})}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=3", "bench.concurrency=[1]", "bench.rates=[]")
    with Receiver() as receiver:
        record = export_point(tmp_path, receiver.url, "bench-ci")
        assert finish_sweep(tmp_path) is None
    assert record["exported"] and record["spans"] == 1 + 1 + 3
    (level,) = [s for s in receiver.spans if s["name"] == "serve concurrency=1"]
    requests = [s for s in receiver.spans if s["parent"] == level["id"]]
    assert len(requests) == 3 and all(s["name"] == "chat tiny-qwen2" for s in requests)
    assert {s["attrs"]["gen_ai.usage.output_tokens"] for s in requests} == {2}
    assert {s["attrs"]["gen_ai.usage.input_tokens"] for s in requests} == {7}
    level_t0 = result.details["clock"]["unix_s"] + result.details["levels"]["concurrency=1"]["t0_s"]
    assert all(s["start"] >= level_t0 * 1e9 - 1e6 for s in requests) and level["service"] == "bench-ci"


def test_an_unreachable_receiver_neither_fails_nor_slows_the_sweep_and_harness_trace_sends_later(tmp_path):
    folder = tmp_path / "outputs" / "multirun" / "offline"
    nowhere = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    done = run_harness(tmp_path, "-m", "model=tiny-gpt2", "bench=smoke", "seed=0,1", "bench.max_new_tokens=4",
                       f"telemetry.otlp_endpoint={nowhere}", f"hydra.sweep.dir={folder}")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - t0 < 90
    assert "trace not exported" in done.stdout and f"harness trace {folder} --otlp-endpoint {nowhere}" in done.stdout
    results = [json.loads(p.read_text()) for p in folder.rglob("result.json")]
    assert all(not r["details"]["telemetry"]["exported"] and "could not be reached" in r["details"]["telemetry"]["why"]
               for r in results)  # fmt: skip
    from harness.cli import main as cli_main

    with Receiver() as receiver:
        assert cli_main(["trace", str(folder), "--otlp-endpoint", receiver.url]) == 0
    assert len([s for s in receiver.spans if s["name"].startswith("harness point")]) == 2


def test_harness_serve_exports_a_span_per_answered_request(tmp_path, load):
    import openai

    from harness.server import ServerSettings, create_app

    shutil.copytree(load("tiny-llama").checkpoint, tmp_path / "served" / "my-llama")
    with Receiver() as receiver:
        settings = ServerSettings(model_dirs=[str(tmp_path / "served")], max_tokens_limit=16, default_max_tokens=8,
                                  jobs_dir=str(tmp_path / "jobs"), otlp_endpoint=receiver.url)  # fmt: skip
        with serving(create_app(settings)) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
            client.chat.completions.create(model="my-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5)  # fmt: skip
            stream = client.completions.create(model="my-llama", prompt="once", max_tokens=3, stream=True)
            list(stream)
        # Leaving the server flushes its last batch of spans.
    served = sorted((s for s in receiver.spans if s["service"] == "harness-serve"), key=lambda s: s["start"])
    assert [s["name"] for s in served] == ["chat my-llama", "text_completion my-llama"]
    assert served[0]["kind"] == 2 and served[0]["attrs"]["gen_ai.usage.output_tokens"] <= 5  # SPAN_KIND_SERVER
    assert served[1]["attrs"]["gen_ai.request.max_tokens"] == 3 and served[1]["attrs"]["gen_ai.usage.input_tokens"] > 0
    assert "gen_ai.response.time_to_first_chunk" in served[1]["attrs"]
