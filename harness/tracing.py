"""OpenTelemetry traces of finished points, sent over OTLP/HTTP (telemetry.otlp_endpoint) by the sweep's own
process after each point, from the point's files: tracing never runs beside a measurement.

A point is one trace: a root span over the point's whole run, a span per latency case or serve level, and a span
per request below it at the request's own times (samples.csv's times on the point's clock, result.details.clock).
Request spans follow OpenTelemetry's GenAI semantic conventions: named `{gen_ai.operation.name}
{gen_ai.request.model}`, kind CLIENT, with `gen_ai.request.model`, `gen_ai.provider.name`, `gen_ai.request.max_tokens`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` and `gen_ai.response.time_to_first_chunk` (seconds),
beside the harness's own `harness.*` attributes (case, request index, lateness, grade). A failed request's span has
status ERROR with the failure.

A receiver that cannot be reached does not fail or slow the sweep: it is tried once (a connection within
CONNECT_TIMEOUT_S), later points are not tried against it, each point's result says why it was not exported, and
`harness trace <sweep folder> --otlp-endpoint URL` sends them later. `harness serve --otlp-endpoint` traces its
own requests live the same way (harness.server).
"""

from __future__ import annotations

import csv
import json
import socket
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

CONNECT_TIMEOUT_S = 2.0
EXPORT_TIMEOUT_S = 10.0


def require_otel() -> None:
    import importlib.util

    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(
                "telemetry.otlp_endpoint sends each point's trace over OTLP, and the OpenTelemetry SDK and its OTLP "
                "exporter are not installed here.",
                "pip install -e '.[telemetry]', or drop telemetry.otlp_endpoint.",
            )


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP endpoint's traces URL: a bare host:port gets the standard /v1/traces path."""
    parsed = urllib.parse.urlparse(endpoint)
    return endpoint if parsed.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"


def reachable(endpoint: str) -> str | None:
    """None when a connection to the endpoint opens within CONNECT_TIMEOUT_S, else why not."""
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"the OTLP receiver at {endpoint} could not be reached ({exc})"


def _samples(folder: Path) -> dict[tuple[str, str, int], dict[str, float]]:
    """samples.csv's per-request values: (bench, case, request) -> {metric: value}."""
    out: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    path = folder / "samples.csv"
    if not path.is_file():
        return out
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("token"):
                continue  # per-token rows: the request's own span is enough
            try:
                out[(row["bench"], row["case"], int(row["request"]))][row["metric"]] = float(row["value"])
            except (KeyError, ValueError):
                continue
    return out


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def build_spans(folder: Path, service_name: str) -> list[Any]:
    """The point's spans (finished, ready to export), from its result.json and samples.csv."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    result = json.loads((folder / "result.json").read_text())
    point = result.get("point", {})
    clock = (result.get("details") or {}).get("clock") or {}
    started = clock.get("started_unix_s")
    if started is None:
        return []  # a result from before the point's clock was recorded, or one that failed before measuring
    zero = clock["unix_s"]
    model = str(point.get("model", ""))
    engine = str(((result.get("resolved") or {}).get("engine") or {}).get("name") or point.get("engine", ""))
    collected = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(SimpleSpanProcessor(collected))
    tracer = provider.get_tracer("harness")
    total = float((result.get("timings") or {}).get("total_s") or 0.0)
    attributes = {"harness.status": str(result.get("status")), "gen_ai.request.model": model}
    attributes.update({f"harness.point.{k}": str(v) for k, v in point.items()})
    label = " ".join(f"{k}={v}" for k, v in point.items())
    root = tracer.start_span(f"harness point {label}", start_time=_ns(started), attributes=attributes)
    root_context = trace.set_span_in_context(root)
    requests = _samples(folder)
    levels = (result.get("details") or {}).get("levels") or {}
    max_tokens = int(((result.get("config") or {}).get("bench") or {}).get("max_new_tokens") or 0)
    by_case: dict[tuple[str, str], list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for (bench, case, index), values in requests.items():
        by_case[(bench, case)].append((index, values))
    for (bench, case), rows in sorted(by_case.items()):
        if bench == "serve" and case in levels and "t0_s" in levels[case]:
            t0 = zero + levels[case]["t0_s"]
            group_start, group_end = t0, t0 + float(levels[case].get("wall_s") or 0.0)
        elif bench == "latency":
            t0 = zero
            starts = [v["t_start_s"] for _, v in rows if "t_start_s" in v]
            if not starts:
                continue
            group_start = zero + min(starts)
            group_end = zero + max(v["t_start_s"] + v.get("e2e_ms", 0.0) / 1e3 for _, v in rows if "t_start_s" in v)
        else:
            continue
        group = tracer.start_span(f"{bench} {case}", context=root_context, start_time=_ns(group_start),
                                  attributes={"harness.bench": bench, "harness.case": case})  # fmt: skip
        context = trace.set_span_in_context(group)
        for index, v in sorted(rows):
            _request_span(tracer, context, bench, case, index, v, t0, model, engine, max_tokens)
        group.end(end_time=_ns(max(group_end, group_start)))
    root.end(end_time=_ns(started + max(total, 0.0)))
    provider.shutdown()
    return list(collected.get_finished_spans())


def _request_span(
    tracer: Any, context: Any, bench: str, case: str, index: int, v: dict[str, float], t0: float, model: str,
    engine: str, max_tokens: int,
) -> None:  # fmt: skip
    from opentelemetry.trace import SpanKind, Status, StatusCode

    if bench == "serve":
        start = t0 + v.get("t_send_s", v.get("t_sched_s", 0.0))
        end = t0 + v["t_end_s"] if "t_end_s" in v else start
        operation = "chat"
    else:
        if "t_start_s" not in v:
            return
        start = t0 + v["t_start_s"]
        end = start + v.get("e2e_ms", 0.0) / 1e3
        operation = "text_completion"
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "gen_ai.provider.name": engine,
        "harness.case": case,
        "harness.request": index,
    }
    if max_tokens:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    if "prompt_tokens" in v:
        attributes["gen_ai.usage.input_tokens"] = int(v["prompt_tokens"])
    if "output_tokens" in v:
        attributes["gen_ai.usage.output_tokens"] = int(v["output_tokens"])
    if "ttft_ms" in v:
        attributes["gen_ai.response.time_to_first_chunk"] = v["ttft_ms"] / 1e3
    for name in ("lateness_ms", "tpot_ms", "e2e_ms", "passed"):
        if name in v:
            attributes[f"harness.{name}"] = v[name]
    span = tracer.start_span(f"{operation} {model}", context=context, kind=SpanKind.CLIENT, start_time=_ns(start),
                             attributes=attributes)  # fmt: skip
    if v.get("ok") == 0.0:
        span.set_status(Status(StatusCode.ERROR, "the request failed (samples.csv's ok row names its status)"))
    span.end(end_time=_ns(max(end, start)))


class Exporter:
    """Sends points' traces to one OTLP/HTTP receiver; after the first failure to reach it, later points are not
    tried (the sweep is not slowed)."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        self.endpoint, self.service_name = endpoint, service_name
        self.down: str | None = None

    def export(self, folder: Path) -> dict[str, Any]:
        """What to record in the point's result: exported (with the span count) or not (with why)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import SpanExportResult

        record: dict[str, Any] = {"otlp_endpoint": self.endpoint, "exported": False}
        if self.down is None:
            self.down = reachable(self.endpoint)
        if self.down:
            return {**record, "why": f"not sent: {self.down}"}
        try:
            spans = build_spans(folder, self.service_name)
        except (OSError, ValueError, KeyError) as exc:
            return {**record, "why": f"the point's files could not be read ({type(exc).__name__}: {exc})"}
        if not spans:
            return {**record, "why": "the point has no clock to place its requests on (it did not measure)"}
        exporter = OTLPSpanExporter(endpoint=traces_url(self.endpoint), timeout=EXPORT_TIMEOUT_S)
        try:
            outcome = exporter.export(spans)
        finally:
            exporter.shutdown()
        if outcome != SpanExportResult.SUCCESS:
            self.down = f"the OTLP receiver at {self.endpoint} refused the export"
            return {**record, "why": self.down}
        return {**record, "exported": True, "spans": len(spans), "trace_id": f"{spans[0].context.trace_id:032x}"}


class ServerTracer:
    """`harness serve --otlp-endpoint`: a span per answered request, as the points' request spans are, exported in
    the background (a batch processor: a receiver that is down costs the server a dropped batch, never a request)."""

    def __init__(self, endpoint: str, service_name: str = "harness-serve") -> None:
        require_otel()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("harness.server")

    def request(
        self, operation: str, model: str, start_unix_s: float, end_unix_s: float, input_tokens: int,
        output_tokens: int, ttft_s: float | None, finish_reason: str, max_tokens: int,
    ) -> None:  # fmt: skip
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.provider.name": "harness",
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.response.finish_reasons": [finish_reason],
        }
        if ttft_s is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = ttft_s
        span = self.tracer.start_span(f"{operation} {model}", kind=SpanKind.SERVER, start_time=_ns(start_unix_s),
                                      attributes=attributes)  # fmt: skip
        span.end(end_time=_ns(end_unix_s))

    def shutdown(self) -> None:
        self.provider.shutdown()


current: list[Exporter] = []
not_exported: list[str] = []


def export_point(folder: Path, endpoint: str, service_name: str) -> dict[str, Any]:
    """The sweep's exporter (one per process) sends a finished point's trace."""
    if not current or current[0].endpoint != endpoint:
        current[:] = [Exporter(endpoint, service_name)]
    record = current[0].export(folder)
    if not record["exported"]:
        not_exported.append(str(folder))
    return record


def finish_sweep(sweep_folder: Path | None) -> str | None:
    """The retry command when points were not exported."""
    message = None
    if not_exported and current:
        where = sweep_folder or Path(not_exported[0]).parent
        why = current[0].down or "see details.telemetry in their result.json"
        message = (
            f"{len(not_exported)} point(s) were not exported to {current[0].endpoint} ({why}). Once the receiver "
            f"answers: harness trace {where} --otlp-endpoint {current[0].endpoint}"
        )
    current.clear()
    not_exported.clear()
    return message


def main(argv: list[str] | None = None) -> int:
    """`harness trace <sweep folder> --otlp-endpoint URL`: send the traces of a folder's points (again)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="harness trace", description="Send a sweep's points' traces over OTLP.")
    parser.add_argument("folder", type=Path, help="a sweep (or run) folder holding result.json files")
    parser.add_argument("--otlp-endpoint", required=True, help="http(s)://host:port of an OTLP/HTTP receiver")
    parser.add_argument("--service-name", default="harness")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"harness trace: {args.folder} is not a folder of results.", file=sys.stderr)
        return 2
    try:
        require_otel()
    except ConfigError as exc:
        from harness.errors import format_error

        print(format_error(exc), file=sys.stderr)
        return 2
    exporter = Exporter(args.otlp_endpoint, args.service_name)
    failed = 0
    for result in sorted(args.folder.rglob("result.json")):
        record = exporter.export(result.parent)
        if not record["exported"]:
            failed += 1
            print(f"  not exported: {result.parent}: {record['why']}", file=sys.stderr)
    print(f"{len(list(args.folder.rglob('result.json'))) - failed} point trace(s) sent to {args.otlp_endpoint}")
    return 1 if failed else 0
