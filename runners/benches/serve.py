"""bench=serve: a load test of an OpenAI-compatible server (launched for the point, or at a URL).

Closed-loop concurrency levels, then open-loop rate levels, then (bench.search=max_rate) a search for the highest
rate whose goodput holds, all inside one point: the server starts once and stays warm, and the curves come from
one run. Each level's figures are keyed with it (ttft_ms[rate=4], goodput_rps[concurrency=8]); every request and
chunk is in samples.csv; the client's own limits are checked per level (details.levels.<level>.client).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from harness.loadgen.figures import Level, cached_prompt_tokens, level_metrics
from harness.loadgen.load import arrival_offsets, heap_frozen, run_level, warm_up
from harness.loadgen.server_metrics import changed, scrape, server_figures
from harness.loadgen.sessions import run_sessions
from harness.stats import summarize
from runners.benches.measure import BenchContext, BenchOutput
from runners.benches.workload import Workload, expected_cached_share, read_sources

if TYPE_CHECKING:
    from harness.config import HarnessConfig

SEARCH_MIN_REQUESTS = 8  # a search level's fewest requests, whatever its rate
CEILING_SHARE = 0.5  # a level past this share of the client's calibrated chunks/s is flagged client-bound


class _Run:
    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.bench = ctx.cfg.bench
        self.endpoint = ctx.engine.endpoint  # type: ignore[attr-defined]
        self.workload = Workload(self.bench, ctx.loaded, self.endpoint, ctx.cfg.seed)
        self.out = BenchOutput()
        self.levels: dict[str, dict[str, Any]] = {}
        self.level_index = 0
        self.ceiling: dict[str, Any] | None = None  # the client's calibrated requests/s and chunks/s

    def _count(self, rate: float | None, searching: bool) -> int:
        b = self.bench
        if rate is not None and searching:  # long enough to be a load, not a burst the server's queue absorbs,
            return max(SEARCH_MIN_REQUESTS, math.ceil(rate * b.search_level_s))  # and not minutes at a low rate
        if rate is not None and b.duration_s:  # the schedule's length: whichever of the two ends first
            return max(1, min(b.num_requests, math.ceil(rate * b.duration_s)))
        return b.num_requests

    def level(self, mode: str, value: float, searching: bool = False) -> dict[str, Any]:
        """Run one level (closed: `value` clients; open: `value` req/s; replay: the trace at `value`x) once, and
        its figures."""
        b = self.bench
        key = {"closed": f"concurrency={int(value)}", "open": f"rate={value:g}", "replay": f"replay={value:g}x"}[mode]
        if key in self.levels:
            return self.levels[key]
        self.ctx.progress(f"serve {key}")
        self.level_index += 1
        before = scrape(self.endpoint) if b.scrape_metrics else None
        plans: list = []
        if b.workload == "multi_turn" and b.replies == "real":
            level = self._sessions(mode, value, key)
        else:
            if mode == "replay":  # a trace's window at its own times (sped up)
                plans = self.workload.plans(len(self.workload.trace_window()), self.level_index)
                offsets = self.workload.trace_offsets()
                mode, value = "open", len(offsets) / max(offsets[-1], 1e-9) if len(offsets) > 1 else 1.0
            else:
                count = self._count(value if mode == "open" else None, searching)
                plans = self.workload.plans(count, self.level_index)
                offsets = None
                if mode == "open":
                    seed = self.ctx.cfg.seed + self.level_index
                    offsets = arrival_offsets(len(plans), value, b.arrival, seed, b.burstiness, b.ramp_up_s)
            level = run_level(
                self.endpoint,
                plans,
                mode,
                value,
                offsets,
                b.duration_s,
                b.ramp_up_s,
                b.max_concurrency,
                b.saturation_backlog if mode == "open" else None,
                b.client_workers,
                key=key,
            )
        after = scrape(self.endpoint) if b.scrape_metrics else None
        self.ctx.engine.remote.check_alive()  # type: ignore[attr-defined]
        if mode == "open" and b.ramp_up_s > 0:  # requests sent while the rate was still rising are warm-up
            for r in level.records:
                r.warmup = r.warmup or (r.t_sched - level.t0) < b.ramp_up_s
        tokenizer = self.ctx.loaded.tokenizer
        expected = expected_cached_share(plans, tokenizer) if plans else None
        metrics, details, rows = level_metrics(level, tokenizer, b.slo.limits(), expected, b.token_mismatch_limit)
        if self.workload.salt:
            details["cache_salt"] = self.workload.salt
        self.out.metrics.update(metrics)
        details["server_metrics_delta"] = changed(before, after)
        for name, (figure, unit) in server_figures(before, after).items():
            self.out.metrics[f"server_{name}[{key}]"] = summarize([figure], unit)
        self._against_ceiling(details, level)
        self._samples(level, rows)
        summary = {
            "key": key,
            "details": details,
            "goodput_rps": metrics.get(f"goodput_rps[{key}]", {}).get("mean", 0.0),
            "attainment": metrics.get(f"slo_attainment[{key}]", {}).get("mean", 0.0),
            "offered_rps": value if mode == "open" else None,
        }
        self.levels[key] = summary
        if len(self.out.outputs) < 3 and rows and rows[0][0].ok:
            self.out.outputs.append({"level": key, "text": rows[0][0].text})
        return summary

    def _sessions(self, mode: str, value: float, key: str) -> Level:
        """A level of conversations with the server's real replies (bench.replies=real): num_requests turns in
        sessions of bench.turns, closed (value sessions at a time) or open (sessions starting at the rate)."""
        import asyncio

        b = self.bench
        sessions = self.workload.sessions(math.ceil(b.num_requests / b.turns), self.level_index)
        offsets = None
        if mode == "open":
            seed = self.ctx.cfg.seed + self.level_index
            offsets = arrival_offsets(len(sessions), value, b.arrival, seed, b.burstiness, b.ramp_up_s)
        with heap_frozen():
            return asyncio.run(
                run_sessions(self.endpoint, sessions, self.workload.turn, mode, value, offsets, b.duration_s, key)
            )

    def _against_ceiling(self, details: dict[str, Any], level: Level) -> None:
        """How close the level came to the client's own ceiling; past half of it the client may have shaped the
        figures (it reads chunks slower than they arrive), which is said with the share."""
        if not self.ceiling or level.wall_s <= 0:
            return
        client = details["client"]
        share = details["chunks"] / level.wall_s / self.ceiling["chunks_s"]
        client["share_of_client_ceiling"] = share
        if share > CEILING_SHARE:
            client["reasons"].append(
                f"the level received {details['chunks'] / level.wall_s:.0f} chunks/s, {share:.0%} of the client's "
                f"calibrated ceiling ({self.ceiling['chunks_s']:.0f} chunks/s)"
            )
            client["client_bound"] = True

    def _samples(self, level: Level, rows: list) -> None:
        add = self.out.samples.append
        for record, counted, figures in rows:
            case, i = level.key, record.index

            def put(metric: str, value: float, unit: str, token: Any = "", case=case, i=i) -> None:
                add(("serve", case, i, token, metric, value, unit))

            put("t_sched_s", record.t_sched - level.t0, "s")
            if record.t_send:
                put("t_send_s", record.t_send - level.t0, "s")
            if record.t_end:
                put("t_end_s", record.t_end - level.t0, "s")
            put("ok", float(record.ok), record.status)
            if figures is None or counted is None:
                continue
            for name in ("ttft_ms", "ttft_sched_ms", "e2e_ms", "lateness_ms"):
                put(name, getattr(figures, name), "ms")
            if figures.tpot_ms is not None:
                put("tpot_ms", figures.tpot_ms, "ms")
            put("output_tokens", float(counted.n_out), counted.source)
            if figures.ttft_answer_ms is not None and counted.reasoning_tokens:
                put("ttft_answer_ms", figures.ttft_answer_ms, "ms")
                put("reasoning_tokens", float(counted.reasoning_tokens), counted.reasoning_source or "")
            cached = cached_prompt_tokens(record)
            if cached is not None:
                put("cached_prompt_tokens", float(cached), "tokens")
            if "usage" in counted.counts and "tokenizer" in counted.counts:
                put("token_count_diff", float(counted.counts["usage"] - counted.counts["tokenizer"]), "tokens")
            for j, (chunk, k) in enumerate(zip(record.chunks, counted.k, strict=False)):
                put("chunk_s", chunk.t - level.t0, "s", j)
                put("chunk_tokens", float(k), counted.k_source, j)

    def meets_target(self, summary: dict[str, Any]) -> bool:
        """The level holds when the share of its scheduled requests that met every SLO reaches goodput_target.
        (Goodput ÷ the nominal rate would judge the schedule's sampling noise: 16 Poisson arrivals at 1 req/s
        span anywhere from 12 to 20 s.)"""
        return summary["attainment"] >= self.bench.goodput_target

    def search(self) -> dict[str, Any]:
        """Double the rate until goodput falls short of goodput_target × rate, then bisect between the last rate
        that held and the first that did not; stop after search_steps levels or when they are within 10%."""
        b = self.bench
        rate = b.rates[0] if b.rates else 1.0
        best: float | None = None
        failed: float | None = None
        walked = []
        for _ in range(b.search_steps):
            summary = self.level("open", round(rate, 3), searching=True)
            ok = self.meets_target(summary)
            walked.append({"rate": round(rate, 3), "goodput_rps": summary["goodput_rps"],
                           "slo_attainment": summary["attainment"], "met": ok,
                           "stopped_early": summary["details"]["stopped_early"]})  # fmt: skip
            if ok:
                best = max(best or 0.0, rate)
            else:
                failed = rate if failed is None else min(failed, rate)
            if best is not None and failed is not None and (failed - best) / failed <= 0.1:
                break
            if failed is None:
                rate *= 2
            elif best is None:
                rate /= 2
            else:
                rate = (best + failed) / 2
        found = {"max_rate_rps": best, "first_failing_rps": failed, "goodput_target": b.goodput_target,
                 "slo": b.slo.limits(), "walked": walked}  # fmt: skip
        if failed is None:
            found["note"] = f"every rate walked held: the max rate is above {best:g}; raise bench.search_steps."
        elif best is None:
            found["note"] = f"even {failed:g} req/s missed the target: lower bench.rates[0] to start below it."
        return found


def run(ctx: BenchContext) -> BenchOutput:
    b = ctx.cfg.bench
    run = _Run(ctx)
    details: dict[str, Any] = {"workload": run.workload.describe(), "server": ctx.loaded.provenance.get("server")}
    if b.calibrate:
        from harness.loadgen.null_server import calibrate

        ctx.progress("serve: calibrating the client against a null server")
        details["client_ceiling"] = run.ceiling = calibrate(ctx.cfg.cache_path, b.client_workers)
    if b.warmup_runs:
        ctx.progress("serve: warm-up")
        import asyncio

        warm = asyncio.run(warm_up(run.endpoint, run.workload.plans(b.warmup_runs, 0)))
        failed = [r for r in warm if not r.ok]
        details["warmup"] = {"requests": len(warm), "failed": len(failed)}
        if len(failed) == len(warm):
            from harness.errors import InferenceError

            raise InferenceError(
                f"every warm-up request failed ({failed[0].status}: {failed[0].error[:400]}).",
                "check the server (its log beside result.json when launched), the model name and the API key.",
            )
    if b.workload == "trace":  # the trace sets the schedule: bench.concurrency and bench.rates are not levels
        run.level("replay", b.trace_speedup)
    else:
        for c in b.concurrency:
            run.level("closed", c)
        for r in b.rates:
            run.level("open", r)
    if b.search == "max_rate":
        found = run.search()
        details["search"] = found
        if found["max_rate_rps"] is not None:
            run.out.metrics["max_rate_rps"] = summarize([found["max_rate_rps"]], "req/s")
    details["workload"] = run.workload.describe()  # again: with what the levels clipped to fit the model
    details["levels"] = {k: v["details"] for k, v in run.levels.items()}
    flags = {
        k: [v["details"][part]["flag"] for part in ("prefix_cache", "token_accounting") if "flag" in v["details"][part]]
        for k, v in run.levels.items()
    }
    details["flags"] = {k: v for k, v in flags.items() if v}
    bound = {
        k: v["details"]["client"]["reasons"] for k, v in run.levels.items() if v["details"]["client"]["client_bound"]
    }
    details["client_bound"] = bound
    if bound:
        details["note"] = (
            "the client, not the server, may have limited the levels in client_bound (their figures measure the "
            "client): raise bench.client_workers or move the client to another machine."
        )
    run.out.details = details
    return run.out


def headline(metrics: dict[str, Any]) -> str:
    """The best throughput among the levels, TTFT at the lightest one, and the max rate found."""
    m = metrics
    tok_s = {k.split("[", 1)[1].rstrip("]"): v["mean"] for k, v in m.items() if k.startswith("output_tok_s[")}
    if not tok_s:
        return "no level completed a request"
    best = max(tok_s, key=tok_s.__getitem__)
    parts = [f"{len(tok_s)} levels, peak {tok_s[best]:.1f} tok/s at {best}"]
    first = next(iter(tok_s))
    ttft = m.get(f"ttft_ms[{first}]")
    if ttft:
        parts.append(f"TTFT p50 {ttft['p50']:.0f} ms at {first}")
    if "max_rate_rps" in m:
        parts.append(f"max rate {m['max_rate_rps']['mean']:.2f} req/s within the SLOs")
    failed = sum(v["mean"] for k, v in m.items() if k.startswith("failed["))
    if failed:
        parts.append(f"{failed:.0f} requests failed")
    return ", ".join(parts)


def check(cfg: HarnessConfig) -> None:
    """Before any server starts: the trace or dataset the workload replays is read and checked (ConfigError)."""
    read_sources(cfg.bench)
