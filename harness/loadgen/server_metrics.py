"""A server's own Prometheus counters over one load level, turned into named figures beside the client's.

The load client reads the server's /metrics before and after each level (bench.scrape_metrics). The raw changes are
kept as they are; where the server is one the harness knows (vLLM, llama.cpp's server, harness serve), the changes
that explain a level's latency become figures: the mean time a request waited in the server's queue, spent in
prefill and in decode, the server's own TTFT, preemptions, and the prefix cache's hit rate over the level's
prompt tokens. A histogram's mean over the level is the change of its _sum over the change of its _count.

Gauges (requests running and waiting, KV-cache use) read once after a level would show the idle server, so they are
sampled while the level runs (bench.gauge_interval_s), by a process of their own: reading and scanning a large
/metrics page on the client's event loop would hold it for milliseconds and make sends late.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class ServerGauge:
    name: str  # server_<name>[level], summarised over the level's samples
    unit: str
    series: str  # summed over its labels


GAUGES = {
    "vllm": (
        ServerGauge("running", "requests", "vllm:num_requests_running"),
        ServerGauge("waiting", "requests", "vllm:num_requests_waiting"),
        ServerGauge("kv_cache_usage", "fraction", "vllm:kv_cache_usage_perc"),  # a fraction despite its name
    ),
    "llamacpp": (
        ServerGauge("running", "requests", "llamacpp:requests_processing"),
        ServerGauge("waiting", "requests", "llamacpp:requests_deferred"),
    ),
    "harness": (
        ServerGauge("running", "requests", "harness_requests_running"),
        ServerGauge("waiting", "requests", "harness_queue_depth"),
    ),
}
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


def read_gauges(text: str, series: tuple[str, ...]) -> dict[str, float]:
    """Each series' value summed over its labels, from Prometheus text: a scan of the lines that start with the
    names, not a full parse, so a sample of a large page costs well under a millisecond of the sampler's time."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(series):
            continue
        brace, space = line.find("{"), line.find(" ")
        labelled = brace != -1 and (space == -1 or brace < space)
        name = line[: brace if labelled else space]
        if name not in series:
            continue  # a longer name that starts with one of them
        rest = line[line.rfind("}") + 1 :] if labelled else line[space:]
        try:
            out[name] = out.get(name, 0.0) + float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return out


def _sample_loop(url: str, headers: dict[str, str], series: tuple[str, ...], interval_s: float, conn: Any) -> None:
    """The sampler process: every interval, the gauges with the time read (perf_counter: one clock for every
    process of the machine), until the parent says stop; then the samples go back through the pipe."""
    import urllib.request

    samples: list[tuple[float, dict[str, float]]] = []
    request = urllib.request.Request(url, headers=headers)
    while not conn.poll(0):
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=max(1.0, interval_s)) as r:
                text = r.read(8_000_000).decode(errors="replace")
            samples.append((t, read_gauges(text, series)))
        except Exception:  # a missed sample is only a gap in the series
            pass
        conn.poll(max(0.0, t + interval_s - time.perf_counter()))
    conn.send(samples)
    conn.close()


class GaugeSampler:
    """Samples a known server's gauges while a level runs (a spawned process; started before the level's start
    time is fixed, so its start-up is not the level's)."""

    def __init__(self, endpoint: Endpoint, server: str | None, interval_s: float) -> None:
        self.gauges = GAUGES.get(server or "", ()) if interval_s > 0 else ()
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._process: Any = None
        if not self.gauges:
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        url = endpoint.base_url.rstrip("/").removesuffix("/v1") + "/metrics"
        series = tuple(g.series for g in self.gauges)
        self._process = context.Process(
            target=_sample_loop, args=(url, endpoint.headers(), series, interval_s, child), daemon=True
        )
        self._process.start()
        child.close()

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            self._conn.send("stop")
            if self._conn.poll(30):
                self.samples = self._conn.recv()
        except (OSError, EOFError):
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._process = None

    def figures(self, t0: float, t_end: float) -> tuple[dict[str, tuple[list[float], str]], dict[str, list[float]]]:
        """name -> (values, unit) over the samples taken in [t0, t_end], and the series (seconds from t0 and each
        gauge) for the result; a gauge the server never reported is absent."""
        inside = [(t, v) for t, v in self.samples if t0 <= t <= t_end]
        figures: dict[str, tuple[list[float], str]] = {}
        series: dict[str, list[float]] = {"t_s": [round(t - t0, 3) for t, _ in inside]} if inside else {}
        for g in self.gauges:
            values = [v.get(g.series) for _, v in inside]
            if inside and all(x is not None for x in values):
                figures[g.name] = ([float(x) for x in values], g.unit)  # type: ignore[arg-type]
                series[g.name] = [float(x) for x in values]  # type: ignore[arg-type]
        return figures, series
