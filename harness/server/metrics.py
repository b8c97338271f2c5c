"""Prometheus metrics of one server (its own registry, so two servers in one process do not mix)."""

from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from harness.server.jobs import JOB_STATES

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "harness_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.tokens = Counter(
            "harness_tokens",
            "tokens processed, by model and kind (prompt or completion)",
            ["model", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "harness_time_to_first_token_seconds",
            "time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "harness_request_latency_seconds",
            "generation request latency, queue wait included",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loaded_models = Gauge("harness_loaded_models", "models loaded now", registry=r)
        self.model_memory = Gauge("harness_model_memory_bytes", "summed footprint of the loaded models", registry=r)
        self.rss = Gauge("harness_process_resident_memory_bytes", "resident memory of the server process", registry=r)
        self.queue_depth = Gauge("harness_queue_depth", "generation requests waiting for the model", registry=r)
        self.running = Gauge("harness_requests_running", "generations whose stream is being read", registry=r)
        self.cancelled = Counter(
            "harness_cancelled_requests_total",
            "generations stopped before their end because the client went away",
            ["model"],
            registry=r,
        )
        self.jobs = Gauge("harness_benchmark_jobs", "benchmark jobs by status", ["status"], registry=r)

    def render(self, loaded: int, model_bytes: int, queue_depth: int, running: int, jobs: dict[str, int]) -> bytes:
        self.loaded_models.set(loaded)
        self.model_memory.set(model_bytes)
        self.rss.set(psutil.Process().memory_info().rss)
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        for status in JOB_STATES:
            self.jobs.labels(status).set(jobs.get(status, 0))
        return generate_latest(self.registry)
