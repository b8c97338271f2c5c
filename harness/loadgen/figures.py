"""Serving figures from RequestRecords, as docs/metrics.md ("A server under load") defines them.

Token counts: n_out is the server's usage.completion_tokens, else the client tokenizer's count of the output text,
else the chunk count; the source is recorded and every available count kept. Tokens per chunk (k) follow the
same order: the change in streamed usage, the change in the tokenizer's count of the text so far, else 1. A
request whose k do not add up to n_out gives no token ITL (counted), except that a server's count may include a
final stop token that has no text (finish_reason "stop" and one more token than the text holds).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness.loadgen.client import RequestRecord
from harness.stats import percentile, request_latency, summarize, summarize_proportion


class RunningTokenCount:
    """The client tokenizer's reading of a streamed text as it grows, chunk by chunk, without re-reading all of it.

    Re-tokenizing the whole text at every chunk costs O(n²) over a long answer. A token more than CONTEXT tokens
    behind the end is final: each chunk re-reads the text from CONTEXT tokens before the first token that is not
    (so pre-tokenization and merges see the neighbourhood they see in the whole text), and keeps the tokens of that
    reading that start at or after it. A tokenizer without character offsets (a slow one) re-reads the whole text.
    """

    CONTEXT = 8

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.ids: list[int] = []
        self._starts: list[int] = []  # the character where each token starts
        self._settled = 0  # ids[:_settled] are final
        self._offsets = bool(getattr(tokenizer, "is_fast", False))

    def add(self, text: str) -> list[int]:
        """The token ids of the whole text so far, after adding text."""
        self.text += text
        if not self._offsets:
            self.ids = list(self.tokenizer(self.text, add_special_tokens=False)["input_ids"])
            return self.ids
        boundary = self._starts[self._settled] if self._settled else 0
        origin = self._starts[max(0, self._settled - self.CONTEXT)] if self._settled else 0
        encoded = self.tokenizer(self.text[origin:], add_special_tokens=False, return_offsets_mapping=True)
        fresh = [
            (token, origin + start)
            for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
            if origin + start >= boundary
        ]
        self.ids = self.ids[: self._settled] + [token for token, _ in fresh]
        self._starts = self._starts[: self._settled] + [start for _, start in fresh]
        settled = max(self._settled, len(self.ids) - self.CONTEXT)
        # Settle only where a token starts a character of its own: the byte tokens of one character share their
        # offsets, and a boundary between them would count that character's earlier bytes twice.
        while 0 < settled < len(self._starts) and self._starts[settled] <= self._starts[settled - 1]:
            settled -= 1
        self._settled = max(self._settled, settled)
        return self.ids


@dataclass
class Counted:
    n_out: int
    source: str  # usage | tokenizer | chunks
    counts: dict[str, int]  # every count available
    k: list[int]  # tokens per chunk
    k_source: str
    mismatch: bool  # the available counts disagree (beyond a stop token the text does not show)
    token_itl_ok: bool  # sum(k) matches n_out, so per-token gaps are defined
    reasoning_tokens: int = 0  # of n_out, the tokens of reasoning (a thinking model's trace), not of the answer
    reasoning_source: str | None = None  # usage | tokenizer | None (no reasoning text)


def count_tokens(record: RequestRecord, tokenizer: Any | None) -> Counted:
    chunks = record.chunks
    counts: dict[str, int] = {"chunks": len(chunks)}
    usage = record.usage or {}
    if isinstance(usage.get("completion_tokens"), int):
        counts["usage"] = usage["completion_tokens"]
    prefix_counts: list[int] | None = None
    if tokenizer is not None and chunks:
        running = RunningTokenCount(tokenizer)
        prefix_counts = [len(running.add(c.text)) for c in chunks]
        counts["tokenizer"] = prefix_counts[-1]
    source = next(s for s in ("usage", "tokenizer", "chunks") if s in counts)
    n_out = counts[source]
    streamed = [c.usage_tokens for c in chunks]
    if chunks and all(isinstance(u, int) for u in streamed):
        k, k_source = _steps(streamed), "usage_stream"  # type: ignore[arg-type]
    elif prefix_counts is not None:
        k, k_source = _steps(prefix_counts), "tokenizer"
    else:
        k, k_source = [1] * len(chunks), "chunks"
    stop_token = record.finish_reason == "stop"
    token_itl_ok = sum(k) == n_out or (stop_token and sum(k) == n_out - 1)
    text_counts = {v for s, v in counts.items() if s != "chunks"}
    mismatch = False
    if "usage" in counts and "tokenizer" in counts:
        gap = counts["usage"] - counts["tokenizer"]
        mismatch = not (gap == 0 or (stop_token and gap == 1))
    elif len(text_counts) > 1:
        mismatch = True
    reasoning, reasoning_source = _reasoning_tokens(record, usage, tokenizer)
    return Counted(n_out, source, counts, k, k_source, mismatch, token_itl_ok, reasoning, reasoning_source)


def _reasoning_tokens(record: RequestRecord, usage: dict[str, Any], tokenizer: Any | None) -> tuple[int, str | None]:
    """The server's count of reasoning tokens where it gives one, else the client tokenizer's count of the
    reasoning text; (0, None) for an answer without reasoning."""
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int) and details["reasoning_tokens"]:
        return details["reasoning_tokens"], "usage"
    text = "".join(c.reasoning for c in record.chunks)
    if not text:
        return 0, None
    if tokenizer is None:
        return sum(1 for c in record.chunks if c.reasoning), "chunks"
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]), "tokenizer"


def cached_prompt_tokens(record: RequestRecord) -> int | None:
    """The prompt tokens the server served from its prefix cache (usage.prompt_tokens_details.cached_tokens), or
    None where it does not say."""
    details = (record.usage or {}).get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def prompt_tokens_of(record: RequestRecord) -> int:
    """The server's count of the prompt where it gives one, else the client's."""
    return (record.usage or {}).get("prompt_tokens") or record.prompt_tokens or 0


def _steps(running: list[int]) -> list[int]:
    """Tokens added by each chunk from a running count: the rise of its running maximum (a re-tokenized prefix can
    count one less than before, which is not a negative chunk)."""
    out, top = [], 0
    for value in running:
        out.append(max(0, value - top))
        top = max(top, value)
    return out


def rescale(k: list[int], n: int) -> list[int]:
    """Tokens per chunk made to add up to n (the server's count) in proportion to k, by largest remainder: the
    client tokenizer's split of the text is the best guess of where the server's tokens fell."""
    total = sum(k)
    if total == n or not k:
        return list(k)
    weights = k if total > 0 else [1] * len(k)
    share = [w * n / sum(weights) for w in weights]
    out = [int(s) for s in share]
    for i in sorted(range(len(k)), key=lambda i: share[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return out


def token_times(times: list[float], k: list[int]) -> list[float]:
    """Each token's time: the first chunk's tokens at its arrival; a later chunk's k tokens spread evenly over
    the gap since the last chunk that carried a token (so each token ITL is gap/k)."""
    out: list[float] = []
    previous: float | None = None
    for t, n in zip(times, k, strict=True):
        if n <= 0:
            continue
        if previous is None:
            out.extend([t] * n)
        else:
            out.extend(previous + (t - previous) * (i + 1) / n for i in range(n))
        previous = t
    return out


@dataclass
class RequestFigures:
    ttft_ms: float
    ttft_sched_ms: float
    e2e_ms: float
    e2e_sched_ms: float
    lateness_ms: float
    n_out: int
    tpot_ms: float | None
    ttft_answer_ms: float | None = None  # to the first answer chunk (after any reasoning); None: no answer text
    ttft_answer_sched_ms: float | None = None
    chunk_itl_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)


def request_figures(record: RequestRecord, counted: Counted) -> RequestFigures:
    """TTFT/E2E from the send and from the schedule, chunk and token ITL, TPOT (of an ok request)."""
    times = [c.t for c in record.chunks]
    first, last = times[0], times[-1]
    chunk_itl = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    itl: list[float] = []
    if counted.token_itl_ok:
        # A chunk's gap spread evenly over its k tokens; chunks that added no token pass their gap on; the first
        # chunk's tokens have no gap before them.
        stamps = token_times(times, counted.k)
        first_k = next((k for k in counted.k if k > 0), 0)
        itl = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps[max(first_k - 1, 0) :])]
    n = counted.n_out
    latency = request_latency(first - record.t_send, last - record.t_send, n)
    answer = next((c.t - record.t_send for c in record.chunks if c.answers), None)
    lateness = record.t_send - record.t_sched  # TTFT and E2E from the schedule add the client's lateness
    return RequestFigures(
        ttft_ms=latency["ttft_s"] * 1e3,
        ttft_sched_ms=(latency["ttft_s"] + lateness) * 1e3,
        e2e_ms=latency["e2e_s"] * 1e3,
        e2e_sched_ms=(latency["e2e_s"] + lateness) * 1e3,
        lateness_ms=lateness * 1e3,
        n_out=n,
        tpot_ms=latency["tpot_s"] * 1e3 if "tpot_s" in latency else None,
        ttft_answer_ms=answer * 1e3 if answer is not None else None,
        ttft_answer_sched_ms=(answer + lateness) * 1e3 if answer is not None else None,
        chunk_itl_ms=chunk_itl,
        itl_ms=itl,
    )


def check_slo(slo: dict[str, float], f: RequestFigures) -> bool:
    """Every SLO met by one ok request; TTFT and E2E count from the scheduled send (queueing included)."""
    values = {
        "ttft_ms": f.ttft_sched_ms,
        "e2e_ms": f.e2e_sched_ms,
        "tpot_ms": f.tpot_ms if f.tpot_ms is not None else 0.0,
        "itl_ms": max(f.itl_ms) if f.itl_ms else 0.0,
        # An answer that never came (only reasoning, cut at the length limit) misses an answer-TTFT objective.
        "ttft_answer_ms": f.ttft_answer_sched_ms if f.ttft_answer_sched_ms is not None else math.inf,
    }
    return all(values[name] <= limit for name, limit in slo.items())


@dataclass
class Level:
    """One load level's records and what the client measured about itself while sending them."""

    key: str  # concurrency=8 | rate=4
    mode: str  # closed | open
    value: float
    records: list[RequestRecord]
    t0: float  # the level's start (the schedule's origin)
    loop_lag_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    wall_s: float = 0.0
    stopped_early: str | None = None  # why the level ended before its schedule did (saturation)
    schedule: list[float] = field(default_factory=list)  # open loop: the precomputed offsets, seconds
    actors: dict[str, Any] | None = None  # bench.client_hosts: each Ray actor's clock offset and lateness


# Client self-check thresholds: past any of them the client, not the server, may have limited the figures.
LAG_P99_MS = 10.0
LATENESS_P99_MS = 10.0
CLIENT_CPU_SHARE = 0.8  # of one core over the level's wall time


def level_metrics(
    level: Level,
    tokenizer: Any | None,
    slo: dict[str, float],
    expected_cached: float | None = None,
    mismatch_limit: float = 0.05,
) -> tuple[
    dict[str, dict[str, Any]], dict[str, Any], list[tuple[RequestRecord, Counted | None, RequestFigures | None]]
]:
    """The level's statistics (keyed with the level), its details, and each measured request's figures."""
    measured = [r for r in level.records if not r.warmup]
    rows: list[tuple[RequestRecord, Counted | None, RequestFigures | None]] = []
    for r in measured:
        if r.ok:
            counted = count_tokens(r, tokenizer)
            rows.append((r, counted, request_figures(r, counted)))
        else:
            rows.append((r, None, None))
    ok = [(r, c, f) for r, c, f in rows if f is not None]
    key = level.key
    metrics: dict[str, dict[str, Any]] = {}

    def put(name: str, values: list[float], unit: str) -> None:
        if values:
            metrics[f"{name}[{key}]"] = summarize(values, unit)

    for name in ("ttft_ms", "ttft_sched_ms", "e2e_ms", "e2e_sched_ms", "lateness_ms"):
        put(name, [getattr(f, name) for _, _, f in ok], "ms")
    put("tpot_ms", [f.tpot_ms for _, _, f in ok if f.tpot_ms is not None], "ms")
    put("itl_ms", [v for _, _, f in ok for v in f.itl_ms], "ms")
    put("chunk_itl_ms", [v for _, _, f in ok for v in f.chunk_itl_ms], "ms")
    put("output_tokens", [float(f.n_out) for _, _, f in ok], "tokens")
    reasoned = [(c, f) for _, c, f in ok if c is not None and c.reasoning_tokens]
    if reasoned:  # a thinking model: the answer starts after its reasoning
        put("ttft_answer_ms", [f.ttft_answer_ms for _, _, f in ok if f.ttft_answer_ms is not None], "ms")
        put("ttft_answer_sched_ms", [f.ttft_answer_sched_ms for _, _, f in ok if f.ttft_answer_sched_ms is not None],
            "ms")  # fmt: skip
        put("reasoning_tokens", [float(c.reasoning_tokens) for _, c, _ in ok if c is not None], "tokens")
        put("answer_tokens", [float(c.n_out - c.reasoning_tokens) for _, c, _ in ok if c is not None], "tokens")

    ends = [r.t_end for r in measured if r.t_end]
    span = (max(ends) - level.t0) if ends else 0.0
    n_tokens = sum(f.n_out for _, _, f in ok)
    prompt_total = sum((r.usage or {}).get("prompt_tokens") or r.prompt_tokens or 0 for r, _, _ in ok)
    good_count = sum(check_slo(slo, f) for _, _, f in ok) if slo else len(ok)
    if span > 0:
        put("request_throughput_rps", [len(ok) / span], "req/s")
        put("output_tok_s", [n_tokens / span], "tok/s")
        put("total_tok_s", [(n_tokens + prompt_total) / span], "tok/s")
        put("goodput_rps", [good_count / span], "req/s")
    if level.mode == "open":
        sent = [r.t_send - level.t0 for r in measured if r.t_send]
        if len(sent) > 1:
            put("achieved_rate_rps", [(len(sent) - 1) / max(max(sent) - min(sent), 1e-9)], "req/s")
        put("offered_rate_rps", [level.value], "req/s")
    if rows:
        metrics[f"slo_attainment[{key}]"] = summarize_proportion(
            [bool(f is not None and (not slo or check_slo(slo, f))) for _, _, f in rows]
        )
    errors = Counter(r.status for r in measured if not r.ok)
    # An output shorter than the length the request forced (a natural-length request may stop where it likes)
    short = sum(1 for r, c, _ in ok if c is not None and r.forced and c.n_out < r.max_tokens)
    mismatches = sum(1 for _, c, _ in ok if c is not None and c.mismatch)
    no_token_itl = sum(1 for _, c, _ in ok if c is not None and not c.token_itl_ok)
    for name, value in (
        ("requests", len(measured)),
        ("completed", len(ok)),
        ("failed", sum(errors.values())),
        ("short_outputs", short),
        ("token_count_mismatches", mismatches),
    ):
        metrics[f"{name}[{key}]"] = summarize([float(value)], "requests")
    prefix_cache = _prefix_cache(ok, metrics, key, expected_cached)
    accounting = _token_accounting(ok, metrics, key, mismatch_limit)
    sources = Counter(c.source for _, c, _ in ok if c is not None)
    k_sources = Counter(c.k_source for _, c, _ in ok if c is not None)
    chunks = sum(len(r.chunks) for r in measured)
    client = client_check(level, chunks)
    details = {
        "mode": level.mode,
        "value": level.value,
        "requests": len(measured),
        "warmup": len(level.records) - len(measured),
        "errors": dict(errors),
        "error_examples": {kind: next(r.error for r in measured if r.status == kind) for kind in errors},
        "short_outputs": short,
        "token_count_mismatches": mismatches,
        "no_token_itl": no_token_itl,
        "n_out_source": dict(sources),
        "k_source": dict(k_sources),
        "multi_token_chunks": sum(1 for _, c, _ in ok if c is not None for k in c.k if k > 1),
        "chunks": chunks,
        "span_s": span,
        "stopped_early": level.stopped_early,
        "client": client,
        "prefix_cache": prefix_cache,
        "token_accounting": accounting,
    }
    if reasoned:
        details["reasoning"] = {
            "requests": len(reasoned),
            "source": dict(Counter(c.reasoning_source for c, _ in reasoned)),
            "no_answer": sum(1 for _, f in reasoned if f.ttft_answer_ms is None),
        }
    if level.schedule:
        details["schedule_s"] = [round(s, 6) for s in level.schedule]
    return metrics, details, rows


CACHE_EXCESS = 0.05  # a cached share this far above what the level's own prompts can share is flagged


def _prefix_cache(
    ok: list[tuple[RequestRecord, Counted | None, RequestFigures | None]],
    metrics: dict[str, dict[str, Any]],
    key: str,
    expected: float | None,
) -> dict[str, Any]:
    """Prompt tokens served from the server's prefix cache, where the server says (usage.prompt_tokens_details
    .cached_tokens); the level's hit rate beside the most its own prompts could share, flagged when above it."""
    reported = [(r, cached_prompt_tokens(r)) for r, _, _ in ok]
    reported = [(r, n) for r, n in reported if n is not None]
    out: dict[str, Any] = {"reported_by": len(reported), "requests": len(ok), "expected_max_share": expected}
    if not reported:
        out["reason"] = "the server reports no usage.prompt_tokens_details.cached_tokens: no hit rate is known"
        return out
    cached = sum(n for _, n in reported)
    prompt = sum(prompt_tokens_of(r) for r, _ in reported)
    metrics[f"cached_prompt_tokens[{key}]"] = summarize([float(n) for _, n in reported], "tokens")
    if prompt:
        share = cached / prompt
        metrics[f"prefix_cache_hit_rate[{key}]"] = summarize([share], "fraction")
        out["hit_rate"] = share
        if expected is not None and share > expected + CACHE_EXCESS:
            out["flag"] = (
                f"{share:.0%} of the prompt tokens came from the prefix cache, and the level's own prompts can share "
                f"at most {expected:.0%}: the server served this level from what an earlier level or point cached "
                "(was bench.cache_salt=none?), so its TTFT is not what these prompts cost"
            )
    return out


def _token_accounting(
    ok: list[tuple[RequestRecord, Counted | None, RequestFigures | None]],
    metrics: dict[str, dict[str, Any]],
    key: str,
    limit: float,
) -> dict[str, Any]:
    """The client's and the server's output token counts side by side: how many requests disagree and by how
    much, flagged past `limit` with the likely cause."""
    counted = [c for _, c, _ in ok if c is not None]
    both = [c for c in counted if "usage" in c.counts and "tokenizer" in c.counts]
    out: dict[str, Any] = {"requests": len(counted), "compared": len(both)}
    if not counted:
        return out
    if not both:
        usage = sum(1 for c in counted if "usage" in c.counts)
        out["reason"] = (
            "the server reports no usage: output counts are the client tokenizer's" if not usage
            else "no client tokenizer: output counts are the server's"
        )  # fmt: skip
        if not usage:
            out["flag"] = out["reason"] + " (they may not be the server's own)"
        return out
    diffs = [c.counts["usage"] - c.counts["tokenizer"] for c in both]
    disagree = [c for c in both if c.mismatch]
    share = len(disagree) / len(both)
    metrics[f"token_count_mismatch_share[{key}]"] = summarize_proportion([c.mismatch for c in both])
    out.update(disagree=len(disagree), share=share, mean_diff=sum(diffs) / len(diffs),
               max_abs_diff=max(abs(d) for d in diffs))  # fmt: skip
    if share > limit:
        off = [c.counts["usage"] - c.counts["tokenizer"] for c in disagree]
        if all(d == 1 for d in off):
            cause = "the server counts one token more each time: a stop token its text does not show"
        else:
            cause = (
                "the client tokenizer reads the text differently from the server's: a different model or "
                "tokenizer version than the one served"
            )
        out["flag"] = (
            f"{share:.0%} of requests have client and server output counts that disagree (above "
            f"bench.token_mismatch_limit={limit:g}); likely cause: {cause}"
        )
    return out


def client_check(level: Level, chunks: int) -> dict[str, Any]:
    """The client's own limits during the level: event-loop lag, CPU per chunk, send lateness; `client_bound`
    with the reasons when one passes its threshold."""
    lag = sorted(level.loop_lag_ms)
    late = sorted((r.t_send - r.t_sched) * 1e3 for r in level.records if r.t_send and not r.warmup)

    def p(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    cpu_share = level.client_cpu_s / level.wall_s if level.wall_s > 0 else 0.0
    out: dict[str, Any] = {
        "loop_lag_p50_ms": p(lag, 50),
        "loop_lag_p99_ms": p(lag, 99),
        "loop_lag_max_ms": lag[-1] if lag else None,
        "lateness_p50_ms": p(late, 50),
        "lateness_p99_ms": p(late, 99),
        "cpu_s": level.client_cpu_s,
        "cpu_share_of_one_core": cpu_share,
        "cpu_us_per_chunk": level.client_cpu_s / chunks * 1e6 if chunks else None,
    }
    reasons = []
    if out["loop_lag_p99_ms"] is not None and out["loop_lag_p99_ms"] > LAG_P99_MS:
        reasons.append(f"event-loop lag p99 {out['loop_lag_p99_ms']:.1f} ms > {LAG_P99_MS:g} ms")
    if level.mode == "open" and out["lateness_p99_ms"] is not None and out["lateness_p99_ms"] > LATENESS_P99_MS:
        reasons.append(f"send lateness p99 {out['lateness_p99_ms']:.1f} ms > {LATENESS_P99_MS:g} ms")
    if cpu_share > CLIENT_CPU_SHARE:
        reasons.append(f"the client used {cpu_share:.0%} of a core (> {CLIENT_CPU_SHARE:.0%})")
    if level.actors:
        out["actors"] = level.actors["actors"]
        if level.actors["behind"]:
            reasons.append(f"client actor(s) {level.actors['behind']} fell behind their schedule (their own send "
                           f"lateness p99 above {LATENESS_P99_MS:g} ms)")  # fmt: skip
    out["client_bound"] = bool(reasons)
    out["reasons"] = reasons
    return out
