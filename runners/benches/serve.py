"""bench=serve: a load test of an OpenAI-compatible server (launched for the point, or at a URL).

Closed-loop concurrency levels, then open-loop rate levels, then (bench.search=max_rate) a search for the highest
rate whose goodput holds, all inside one point: the server starts once and stays warm, and the curves come from
one run. Each level's figures are keyed with it (ttft_ms[rate=4], goodput_rps[concurrency=8]); every request and
chunk is in samples.csv; the client's own limits are checked per level (details.levels.<level>.client).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from harness.energy import phase_figures
from harness.errors import ConfigError
from harness.loadgen.figures import Level, cached_prompt_tokens, level_metrics
from harness.loadgen.load import arrival_offsets, heap_frozen, run_level, warm_up
from harness.loadgen.server_metrics import GaugeSampler, changed, scrape, server_figures, which_server
from harness.loadgen.sessions import run_sessions, turn_cases
from harness.processes import pinned, usable_cpus
from harness.stats import share_verdict, summarize
from runners.benches.grading import Grades, grade_level
from runners.benches.measure import BenchContext, BenchOutput, trial_spread
from runners.benches.workload import Workload, expected_cached_share, read_sources

if TYPE_CHECKING:
    from harness.config import HarnessConfig

SEARCH_MIN_REQUESTS = 8  # a search level's fewest requests, whatever its rate
# The figures whose spread between bench.trials repeats is reported (figure, statistic).
TRIAL_FIGURES = (
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "p50"),
    ("e2e_ms", "p50"),
    ("output_tok_s", "mean"),
    ("goodput_rps", "mean"),
    ("pass_rate", "mean"),
)
CEILING_SHARE = 0.5  # a level past this share of the client's calibrated chunks/s is flagged client-bound


@contextlib.contextmanager
def watching(progress: Any, what: str, every_s: float = 1.0) -> Iterator[None]:
    """While a level runs, its requests sent and finished, told to `progress` every `every_s` from a thread of its
    own (it counts the level's records; the load loop never waits for it). Client processes
    (bench.client_workers > 1) keep their records: their levels are reported as running."""
    from harness.loadgen import load

    if getattr(progress, "sink", True) is None:  # nobody is listening: no thread beside the load loop
        yield
        return
    stop = threading.Event()
    load.running_level.clear()

    def tell() -> None:
        progress(f"{what}: starting")
        while not stop.wait(every_s):
            records = load.running_level[0] if load.running_level else None
            if records is None:
                progress(f"{what}: running")
                continue
            sent = sum(1 for r in list(records) if r.t_send)
            finished = sum(1 for r in list(records) if r.t_end)
            progress(f"{what}: {sent} sent, {finished} finished")

    thread = threading.Thread(target=tell, name="harness-level-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        load.running_level.clear()


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
        self.trial_spread: dict[str, Any] = {}  # bench.trials > 1: per level, the spread between its trials

    def _count(self, rate: float | None, searching: bool, at_least: int = 0) -> int:
        b = self.bench
        if at_least:  # a search level extended until its verdict is decided
            return at_least
        if rate is not None and searching:  # long enough to be a load, not a burst the server's queue absorbs,
            return max(SEARCH_MIN_REQUESTS, math.ceil(rate * b.search_level_s))  # and not minutes at a low rate
        if rate is not None and b.duration_s:  # the schedule's length: whichever of the two ends first
            return max(1, min(b.num_requests, math.ceil(rate * b.duration_s)))
        return b.num_requests

    def trials(self, mode: str, value: float) -> None:
        """A level run bench.trials times, each from a fresh state: the point's launched server restarted (a running
        one cannot be) and warmed up again, a fresh cache salt (trial=1, 2, ... in its key); and the spread between
        the trials of each headline figure (`<figure>_by_trial[level]`: its stdev is the run-to-run noise, beside
        each trial's own ci95, the request-to-request noise)."""
        n = self.bench.trials
        if n == 1:
            self.level(mode, value)
            return
        keys, fresh = [], []
        for t in range(1, n + 1):
            if t > 1:
                fresh.append(self.renew())
            keys.append(self.level(mode, value, trial=t)["key"])
        base = keys[0].rsplit(",trial=", 1)[0]
        spread = trial_spread(self.out.metrics, keys, base, TRIAL_FIGURES)
        self.trial_spread[base] = {"trials": n, "levels": keys, "figures": spread, "fresh_state": fresh}

    def renew(self) -> dict[str, Any]:
        """A trial's fresh state: the server restarted where the point launched it, and warmed up again."""
        renewed = self.ctx.renew_engine()
        self.endpoint = self.workload.endpoint = self.ctx.engine.endpoint  # type: ignore[attr-defined]
        if self.bench.warmup_runs and str(renewed.get("server", "")).startswith("restarted"):
            renewed["warmup"] = self.warm_up()  # a server that kept running is still warm
        return renewed

    def warm_up(self) -> dict[str, int]:
        """bench.warmup_runs requests, not measured; refused when every one of them failed."""
        import asyncio

        warm = asyncio.run(warm_up(self.endpoint, self.workload.plans(self.bench.warmup_runs, 0)))
        failed = [r for r in warm if not r.ok]
        if len(failed) == len(warm):
            from harness.errors import InferenceError

            raise InferenceError(
                f"every warm-up request failed ({failed[0].status}: {failed[0].error[:400]}).",
                "check the server (its log beside result.json when launched), the model name and the API key.",
            )
        return {"requests": len(warm), "failed": len(failed)}

    def level(
        self, mode: str, value: float, searching: bool = False, requests: int = 0, trial: int = 0
    ) -> dict[str, Any]:
        """Run one level (closed: `value` clients; open: `value` req/s; replay: the trace at `value`x) once, and
        its figures; `requests` reruns a search level with that many requests, in place of its earlier run;
        `trial` marks one of bench.trials repeats."""
        b = self.bench
        key = {"closed": f"concurrency={int(value)}", "open": f"rate={value:g}", "replay": f"replay={value:g}x"}[mode]
        key += f",trial={trial}" if trial else ""
        if key in self.levels and not requests:
            return self.levels[key]
        if key in self.levels:  # the earlier, shorter run's figures and samples give way to the longer one's
            self.out.metrics = {k: v for k, v in self.out.metrics.items() if not k.endswith(f"[{key}]")}
            self.out.samples[:] = [row for row in self.out.samples if row[1] != key]
        self.level_index += 1
        before = scrape(self.endpoint) if b.scrape_metrics else None
        server = which_server(before) if before else None
        gauges = GaugeSampler(self.endpoint, server, b.gauge_interval_s if b.scrape_metrics else 0.0)
        try:
            self.ctx.mark(f"{key}:start")
            with watching(self.ctx.progress, f"serve {key}"):
                plans, cases, level = self._run(mode, value, key, searching, requests)
            self.ctx.mark(f"{key}:end")
        finally:
            gauges.stop()
        after = scrape(self.endpoint) if b.scrape_metrics else None
        self.ctx.engine.remote.check_alive()  # type: ignore[attr-defined]
        if level.mode == "open" and b.ramp_up_s > 0:  # requests sent while the rate was still rising are warm-up
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
        grades = self._grade(level, cases, rows, details)
        self._energy(key, grades)
        sampled, series = gauges.figures(level.t0, level.t0 + level.wall_s)
        for name, (values, unit) in sampled.items():
            self.out.metrics[f"server_{name}[{key}]"] = summarize(values, unit)
        if series:
            details["server_gauges"] = series
        self._against_ceiling(details, level)
        # Where the level sits on the point's clock (details.clock): its requests' times in samples.csv are from t0.
        details["t0_s"], details["wall_s"] = level.t0 - self.ctx.clock_perf_s, level.wall_s
        self._samples(level, rows, grades)
        target = "correct_slo_attainment" if b.search_target == "correct_goodput" else "slo_attainment"
        attained = self.out.metrics.get(f"{target}[{key}]", {})
        n = attained.get("n", 0)
        details["slo_verdict"] = share_verdict(round(attained.get("mean", 0.0) * n), n, b.goodput_target)
        if key in self.levels:
            details["extended_from"] = [*self.levels[key]["details"].get("extended_from", []),
                                        self.levels[key]["details"]["requests"]]  # fmt: skip
        summary = {
            "key": key,
            "details": details,
            "goodput_rps": metrics.get(f"goodput_rps[{key}]", {}).get("mean", 0.0),
            "attainment": attained.get("mean", 0.0),
            "verdict": details["slo_verdict"]["verdict"],
            "offered_rps": level.value if level.mode == "open" else None,
        }
        self.levels[key] = summary
        if len(self.out.outputs) < 3 and rows and rows[0][0].ok:
            self.out.outputs.append({"level": key, "text": rows[0][0].text})
        return summary

    def _run(
        self, mode: str, value: float, key: str, searching: bool, requests: int
    ) -> tuple[list, list[int | None], Level]:
        """The level's requests, run: its plans (none for sessions built turn by turn), each request's expectation
        (graded load) and what happened."""
        b = self.bench
        plans: list = []
        if b.workload == "chat" or (b.workload == "multi_turn" and b.replies == "real"):
            cases, level = self._sessions(mode, value, key, searching, requests)
            return plans, cases, level
        else:
            if mode == "replay":  # a trace's window at its own times (sped up)
                plans = self.workload.plans(len(self.workload.trace_window()), self.level_index)
                offsets = self.workload.trace_offsets()
                mode, value = "open", len(offsets) / max(offsets[-1], 1e-9) if len(offsets) > 1 else 1.0
            else:
                count = self._count(value if mode == "open" else None, searching, requests)
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
                hosts=b.client_hosts,
                ray_address=b.ray_address,
            )
        return plans, [p.case for p in plans], level

    def _grade(self, level: Level, cases: list[int | None], rows: list, details: dict[str, Any]) -> Grades | None:
        """Graded load: each answer judged by its case's checks; the level's pass rates and correct goodput."""
        if not self.workload.graded or not any(c is not None for c in cases):
            return None
        ends = [r.t_end for r, _, _ in rows if r.t_end]
        span = max(ends) - level.t0 if ends else 0.0
        metrics, grading, grades = grade_level(rows, self.workload.expectations, cases, self.bench.slo.limits(),
                                               level.key, span)  # fmt: skip
        self.out.metrics.update(metrics)
        details["grading"] = grading
        return grades

    def _energy(self, key: str, grades: Grades | None) -> None:
        """The level's joules, per output token and (graded) per correct answer, where a counter was read."""
        meter = self.ctx.energy
        if meter is None:
            return
        produced = self.out.metrics.get(f"output_tokens[{key}]", {})
        figures = phase_figures(meter, key, produced.get("mean", 0.0) * produced.get("n", 0))
        joules = figures.get(f"energy_j[{key}]")
        correct = sum(grades.passed(i) for i in grades.checks) if grades else 0
        if joules and correct:
            figures[f"joules_per_correct[{key}]"] = summarize([joules["mean"] / correct], "J/answer")
        self.out.metrics.update(figures)

    def _sessions(
        self, mode: str, value: float, key: str, searching: bool, requests: int
    ) -> tuple[list[int | None], Level]:
        """A level of conversations with the server's real replies (bench.replies=real, or the chat workflow's):
        about the level's request count in turns, closed (value sessions at a time) or open (sessions starting at
        the rate); with each turn's expectation where the sessions are graded."""
        import asyncio

        b = self.bench
        count = self._count(value if mode == "open" else None, searching, requests)
        if b.workload == "chat":
            sessions = self.workload.chat_sessions(count, self.level_index)
        else:
            sessions = self.workload.sessions(math.ceil(count / b.turns), self.level_index)
        offsets = None
        if mode == "open":
            seed = self.ctx.cfg.seed + self.level_index
            offsets = arrival_offsets(len(sessions), value, b.arrival, seed, b.burstiness, b.ramp_up_s)
        with heap_frozen():
            level = asyncio.run(
                run_sessions(self.endpoint, sessions, self.workload.turn, mode, value, offsets, b.duration_s, key)
            )
        return turn_cases(sessions), level

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

    def _samples(self, level: Level, rows: list, grades: Grades | None) -> None:
        add = self.out.samples.append
        for record, counted, figures in rows:
            case, i = level.key, record.index

            def put(metric: str, value: float, unit: str, token: Any = "", case=case, i=i) -> None:
                add(("serve", case, i, token, metric, value, unit))

            put("t_sched_s", record.t_sched - level.t0, "s")
            if grades is not None and i in grades.checks:
                put("passed", float(grades.passed(i)), "fraction")
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
            prompt = (record.usage or {}).get("prompt_tokens") or record.prompt_tokens
            if isinstance(prompt, int):
                put("prompt_tokens", float(prompt), "usage" if record.usage else "client")
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
        """The level holds when the share of its scheduled requests that met every SLO reaches goodput_target:
        decided at 95% confidence where the sample allows (share_verdict), else by the share itself. (Goodput ÷ the
        nominal rate would judge the schedule's sampling noise: 16 Poisson arrivals at 1 req/s span anywhere from
        12 to 20 s.)"""
        if summary["verdict"] != "undecided":
            return summary["verdict"] == "met"
        return summary["attainment"] >= self.bench.goodput_target

    def decided_level(self, rate: float) -> dict[str, Any]:
        """A search level, rerun with twice the requests while its verdict is undecided, up to
        bench.search_max_requests (early stopping: a level stops growing as soon as the verdict is decided)."""
        summary = self.level("open", rate, searching=True)
        while summary["verdict"] == "undecided":
            count = summary["details"]["requests"]
            if count >= self.bench.search_max_requests:
                break
            summary = self.level("open", rate, searching=True, requests=min(2 * count, self.bench.search_max_requests))
        return summary

    def search(self) -> dict[str, Any]:
        """Double the rate until goodput falls short of goodput_target × rate, then bisect between the last rate
        that held and the first that did not; stop after search_steps levels or when they are within 10%."""
        b = self.bench
        rate = b.rates[0] if b.rates else 1.0
        best: float | None = None
        failed: float | None = None
        walked = []
        for _ in range(b.search_steps):
            summary = self.decided_level(round(rate, 3))
            ok = self.meets_target(summary)
            walked.append({"rate": round(rate, 3), "goodput_rps": summary["goodput_rps"],
                           "slo_attainment": summary["attainment"], "met": ok, "verdict": summary["verdict"],
                           "requests": summary["details"]["requests"],
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
        verdicts = {w["rate"]: w["verdict"] for w in walked}
        bounds = [verdicts[round(r, 3)] for r in (best, failed) if r is not None]
        found["decided"] = bool(bounds) and "undecided" not in bounds
        found["confidence"] = (
            "each level that bounds the answer was decided at 95% confidence (docs/benchmark_guide.md)"
            if found["decided"]
            else "a level that bounds the answer stayed undecided at 95% confidence with "
            f"bench.search_max_requests={b.search_max_requests} requests; its share of requests within the SLO "
            "placed it, which a rerun may not repeat: raise bench.search_max_requests"
        )
        if failed is None:
            found["note"] = f"every rate walked held: the max rate is above {best:g}; raise bench.search_steps."
        elif best is None:
            found["note"] = f"even {failed:g} req/s missed the target: lower bench.rates[0] to start below it."
        return found


def run(ctx: BenchContext) -> BenchOutput:
    """The levels, with the client on bench.client_cpus where given (its calibration too: its ceiling is the one
    of the cores it has)."""
    with pinned(usable_cpus(ctx.cfg.bench.client_cpus, "bench.client_cpus")):
        return _run_levels(ctx)


def _run_levels(ctx: BenchContext) -> BenchOutput:
    b = ctx.cfg.bench
    run = _Run(ctx)
    details: dict[str, Any] = {"workload": run.workload.describe(), "server": ctx.loaded.provenance.get("server"),
                               "client_cpus": b.client_cpus or "all"}  # fmt: skip
    if b.calibrate:
        from harness.loadgen.null_server import calibrate

        ctx.progress("serve: calibrating the client against a null server")
        # Ray actors on one host are calibrated as as many client processes (their ceiling on other hosts is theirs)
        details["client_ceiling"] = run.ceiling = calibrate(ctx.cfg.cache_path, max(b.client_workers, b.client_hosts))
    if b.warmup_runs:
        ctx.progress("serve: warm-up")
        ctx.mark("phase=warmup:start")
        details["warmup"] = run.warm_up()
        ctx.mark("phase=warmup:end")
    if b.workload == "trace":  # the trace sets the schedule: bench.concurrency and bench.rates are not levels
        run.trials("replay", b.trace_speedup)
    else:
        for c in b.concurrency:
            run.trials("closed", c)
        for r in b.rates:
            run.trials("open", r)
    if run.trial_spread:
        details["trials"] = run.trial_spread
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
            "client): raise bench.client_workers, pin the client and a server on this machine to CPUs of their "
            "own (bench.client_cpus, engine.cpus), or move the client to another machine."
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
    """Before any server starts: the trace or dataset the workload replays is read and checked, and the CPUs
    the client and the server are pinned to exist here (ConfigError)."""
    _, dataset = read_sources(cfg.bench)
    if dataset is not None and cfg.bench.grade == "on" and not any(e.expected_keywords for e in dataset.entries):
        raise ConfigError(
            f"bench.grade=on, and no entry of bench.dataset={dataset.path} gives expected_keywords to grade against.",
            'add "expected_keywords": [...] to the entries to grade, or bench.grade=auto.',
        )
    usable_cpus(cfg.bench.client_cpus, "bench.client_cpus")
    usable_cpus(cfg.engine.cpus, "engine.cpus")
