"""A server's own Prometheus counters over one load level, turned into named figures beside the client's.

The load client reads the server's /metrics before and after each level (bench.scrape_metrics). The raw changes are
kept as they are; where the server is one the harness knows (vLLM, llama.cpp's server, harness serve), the changes
that explain a level's latency become figures: the mean time a request waited in the server's queue, spent in
prefill and in decode, the server's own TTFT, preemptions, and the prefix cache's hit rate over the level's
prompt tokens. A histogram's mean over the level is the change of its _sum over the change of its _count. Gauges
(requests running, KV-cache use) are not figures: read once after a level they show the idle server.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.loadgen.client import Endpoint


@dataclass(frozen=True)
class ServerFigure:
    name: str  # the figure, as the result names it: server_<name>[level]
    unit: str
    kind: str  # mean (a histogram's Δsum/Δcount) | delta (a counter's change) | ratio (Δ numerator / Δ denominator)
    series: tuple[str, ...]  # the Prometheus series it reads, without labels (a ratio: numerator, denominator)
    scale: float = 1.0


_VLLM = (
    ServerFigure("queue_ms", "ms", "mean", ("vllm:request_queue_time_seconds",), 1e3),
    ServerFigure("prefill_ms", "ms", "mean", ("vllm:request_prefill_time_seconds",), 1e3),
    ServerFigure("decode_ms", "ms", "mean", ("vllm:request_decode_time_seconds",), 1e3),
    ServerFigure("ttft_ms", "ms", "mean", ("vllm:time_to_first_token_seconds",), 1e3),
    ServerFigure("e2e_ms", "ms", "mean", ("vllm:e2e_request_latency_seconds",), 1e3),
    ServerFigure("preemptions", "count", "delta", ("vllm:num_preemptions_total",)),
    ServerFigure("prompt_tokens", "tokens", "delta", ("vllm:prompt_tokens_total",)),
    ServerFigure(
        "prefix_cache_hit_rate",
        "fraction",
        "ratio",
        ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ),
)
_LLAMACPP = (
    ServerFigure("prefill_tok_s", "tok/s", "ratio", ("llamacpp:prompt_tokens_total", "llamacpp:prompt_seconds_total")),
    ServerFigure(
        "decode_tok_s", "tok/s", "ratio", ("llamacpp:tokens_predicted_total", "llamacpp:tokens_predicted_seconds_total")
    ),
    ServerFigure("prompt_tokens", "tokens", "delta", ("llamacpp:prompt_tokens_total",)),
)
_HARNESS = (
    ServerFigure("ttft_ms", "ms", "mean", ("harness_time_to_first_token_seconds",), 1e3),
    ServerFigure("e2e_ms", "ms", "mean", ("harness_request_latency_seconds",), 1e3),
    ServerFigure("cancelled", "count", "delta", ("harness_cancelled_requests_total",)),
)
SERVERS = {"vllm": _VLLM, "llamacpp": _LLAMACPP, "harness": _HARNESS}
_PREFIX = {"vllm": "vllm:", "llamacpp": "llamacpp:", "harness": "harness_"}


def _total(values: dict[str, float], series: str) -> float | None:
    """A series summed over its labels ('name{labels}' keys), or None when the server has no such series."""
    found = [v for k, v in values.items() if k.partition("{")[0] == series]
    return sum(found) if found else None


def _change(before: dict[str, float], after: dict[str, float], series: str) -> float | None:
    end = _total(after, series)
    return None if end is None else end - (_total(before, series) or 0.0)


def which_server(values: dict[str, float]) -> str | None:
    for server, prefix in _PREFIX.items():
        if any(k.startswith(prefix) for k in values):
            return server
    return None


def server_figures(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, tuple[float, str]]:
    """name -> (value, unit) for the figures the level's change defines; a figure whose series the server lacks,
    or that saw no event in the level (no request finished, no prompt token), is absent, never zero."""
    if not before or not after:
        return {}
    server = which_server(after)
    if server is None:
        return {}
    out: dict[str, tuple[float, str]] = {}
    for f in SERVERS[server]:
        if f.kind == "mean":
            total = _change(before, after, f.series[0] + "_sum")
            count = _change(before, after, f.series[0] + "_count")
            if total is not None and count:
                out[f.name] = (total / count * f.scale, f.unit)
        elif f.kind == "delta":
            change = _change(before, after, f.series[0])
            if change is not None:
                out[f.name] = (change * f.scale, f.unit)
        else:
            top, bottom = _change(before, after, f.series[0]), _change(before, after, f.series[1])
            if top is not None and bottom:
                out[f.name] = (top / bottom * f.scale, f.unit)
    return out


def scrape(endpoint: Endpoint) -> dict[str, float] | None:
    """The server's Prometheus counters (harness serve and vLLM expose /metrics beside /v1), or None."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    root = endpoint.base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(
            urllib.request.Request(root + "/metrics", headers=endpoint.headers()), timeout=5
        ) as r:
            text = r.read(8_000_000).decode(errors="replace")
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
                if "le" in sample.labels:
                    continue  # histogram buckets: their _sum and _count carry the means
                values[f"{sample.name}{{{labels}}}"] = float(sample.value)
        return values
    except Exception:
        return None


def changed(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    if before is None or after is None:
        return {}
    changed = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    return dict(sorted(changed.items())[:200])
