"""bench: one schema for every bench, with bench=serve's SLOs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from harness.config.checks import check, check_base_url, check_key_env, one_of
from harness.config.options import SERVE_TARGETS, WORKLOADS
from harness.errors import ConfigError


@dataclass
class SloConfig:
    """Per-request service-level objectives of bench=serve (ms); goodput counts requests meeting every one set.
    TTFT and E2E count from the scheduled send time, so queueing in the client or server counts against them."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: float | None = None  # the request's largest token ITL
    ttft_answer_ms: float | None = None  # to the first answer token (after any reasoning), from the scheduled send

    def __post_init__(self) -> None:
        for name, limit in self.limits().items():
            check(limit > 0, f"bench.slo.{name}", limit, "null or a limit > 0 (ms)")

    def limits(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class BenchConfig:
    """One schema for every bench; each bench reads the fields it needs (see conf/bench/*.yaml)."""

    name: str = "smoke"
    system_prompt: str | None = None
    prompt: str = "In one sentence, what is a large language model?"
    max_new_tokens: int = 32  # the output length; latency/memory/throughput force it (min_new_tokens = max)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    prompt_lengths: list[int] = field(default_factory=lambda: [128])  # prompt tokens, exact
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    concurrency: list[int] = field(default_factory=lambda: [1])  # closed-loop clients
    requests_per_client: int = 4
    warmup_runs: int = 1
    min_runs: int = 3
    max_runs: int = 30
    min_seconds: float = 1.0
    target_rel_ci: float = 0.02  # stop when the 95% CI half-width of the primary metric is within 2% of its mean
    primary_metric: str = "e2e_ms"
    perplexity: bool = False  # e2e: also score perplexity and bits per byte at this point, as bench=quality does
    ppl_chars: int = 16000  # quality: characters of the built-in corpus scored (the same text for every model)
    ppl_window: int = 512  # quality: tokens per forward pass (capped at the context window)
    ppl_stride: int = 256  # quality: new tokens scored per window; the rest is context
    # serve: a load test of an OpenAI-compatible server (docs/metrics.md, "A server under load")
    target: str = "harness"  # harness | llamacpp_server | vllm (launched) | url (base_url) | engine (engine=openai's)
    base_url: str | None = None  # target=url: http://host:port/v1
    api_key_env: str | None = None  # target=url: the NAME of the variable holding the key
    api: str = "completions"  # chat | completions
    served_model: str | None = None  # target=url: the server's model name; None = the entry's
    rates: list[float] = field(default_factory=list)  # open-loop levels, requests/s
    arrival: str = "poisson"  # constant | poisson | gamma
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular
    num_requests: int = 32  # per level (open loop: the schedule's length)
    duration_s: float | None = None  # per level: stop sending after this (with num_requests: whichever first)
    ramp_up_s: float = 0.0  # open: the rate rises linearly over it; closed: clients start spread over it
    max_concurrency: int | None = None  # open loop: at most this many in flight (a held send counts as lateness)
    request_timeout_s: float = 120.0
    slo: SloConfig = field(default_factory=lambda: SloConfig())  # bench.slo={ttft_ms:500,tpot_ms:50}
    search: str = "none"  # none | max_rate: bisect for the highest rate whose goodput >= goodput_target × rate
    goodput_target: float = 0.9  # max_rate: the share of scheduled requests that must meet every SLO
    # max_rate holds goodput_target against: goodput (requests within every SLO) | correct_goodput (within every
    # SLO and passing their grade: a graded workload)
    search_target: str = "goodput"
    # auto: grade every answer where the workload has expectations (search_qa, lesson_pack, a dataset's
    # expected_keywords) | on: and refuse a workload without them | off: never grade (forced output lengths then)
    grade: str = "auto"
    search_steps: int = 6  # levels the max_rate search may run
    search_level_s: float = 20.0  # a search level offers at least this many seconds of load (short bursts are absorbed)
    # each serve level or latency case run this many times, each from a fresh state (the launched server restarted,
    # a new engine, a fresh cache salt); the spread between the trials is reported beside each trial's own
    trials: int = 1
    search_max_requests: int = 160  # an undecided search level is rerun with twice the requests, up to this many
    saturation_backlog: int | None = 64  # open loop: a level stops when more are in flight (the server fell behind)
    client_workers: int = 1  # client processes sharing the load
    # Ray actors sharing the load (the `ray` extra), spread over the cluster's nodes, each clock measured against
    # this process's; ray_address: the cluster (ray://head:10001), null: a local instance for the point
    client_hosts: int = 1
    ray_address: str | None = None
    client_cpus: list[int] | None = None  # the load client runs on these CPUs only (Linux); None: every CPU
    calibrate: bool = True  # measure the client's ceiling against a local null server (cached per machine)
    scrape_metrics: bool = True  # the server's Prometheus /metrics before and after each level, deltas kept
    gauge_interval_s: float = 0.5  # a known server's gauges (running, waiting, KV cache) sampled this often; 0: off
    # synthetic (exact lengths) | shared_prefix | search_qa | lesson_pack | chat | multi_turn | trace | dataset
    workload: str = "synthetic"
    length_dist: str = "fixed"  # synthetic prompt lengths around prompt_lengths[0]: fixed | uniform | normal
    length_spread: float = 0.25  # uniform: ±spread × length; normal: sd = spread × length
    prefix_tokens: int = 256  # shared_prefix: tokens every prompt starts with
    turns: int = 3  # multi_turn: user turns per session (each turn carries the whole conversation)
    # multi_turn: canned (fixed replies of the output length: exact, known lengths) | real (each turn carries the
    # server's actual answers: sessions run turn after turn on one connection)
    replies: str = "canned"
    # replies=real (and workload=chat, whose replies are always real): the mean pause between an answer and the
    # next question (exponential)
    think_time_s: float = 0.0
    # trace: a production trace replayed at its own times (formats: docs/serving.md, "Replaying traffic")
    trace: str | None = None  # the trace file
    trace_speedup: float = 1.0  # the trace's times are divided by this
    trace_start_s: float = 0.0  # the replayed window starts this far into the trace (trace time)
    trace_duration_s: float | None = None  # and lasts this long (trace time); None: to the trace's end
    trace_requests: int | None = None  # at most this many of the window's requests
    trace_sample: float = 1.0  # keep this share of the window's requests (seeded): the trace's shape at a lower rate
    dataset: str | None = None  # dataset: a JSONL of chat messages, ShareGPT conversations or prompts
    dataset_output: str = "natural"  # natural: the model stops (bench.max_new_tokens at most) | forced: the entry's
    # auto: every level's prompts are its own (a level cannot be served from a cache an earlier level or point
    # filled) | none: the same prompts every time (cache studies)
    cache_salt: str = "auto"
    token_mismatch_limit: float = 0.05  # a level where a larger share of requests' token counts disagree is flagged

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "bench.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.temperature >= 0, "bench.temperature", self.temperature, ">= 0 (0 means greedy)")
        check(0 < self.top_p <= 1, "bench.top_p", self.top_p, "in (0, 1]")
        check(self.top_k >= 0, "bench.top_k", self.top_k, ">= 0 (0 disables top-k)")
        check(self.repetition_penalty > 0, "bench.repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("prompt_lengths", "batch_sizes", "concurrency"):
            values = list(getattr(self, name))
            check(
                bool(values) and all(isinstance(v, int) and v >= 1 for v in values),
                f"bench.{name}",
                values,
                "a non-empty list of integers >= 1",
            )
        check(self.requests_per_client >= 1, "bench.requests_per_client", self.requests_per_client, ">= 1")
        check(self.warmup_runs >= 0, "bench.warmup_runs", self.warmup_runs, ">= 0")
        check(self.min_runs >= 1, "bench.min_runs", self.min_runs, ">= 1")
        check(self.max_runs >= self.min_runs, "bench.max_runs", self.max_runs, f">= bench.min_runs ({self.min_runs})")
        check(self.min_seconds >= 0, "bench.min_seconds", self.min_seconds, ">= 0")
        check(0 < self.target_rel_ci < 1, "bench.target_rel_ci", self.target_rel_ci, "in (0, 1)")
        one_of("bench.primary_metric", self.primary_metric, ("e2e_ms", "ttft_ms", "tpot_ms"))
        check(self.ppl_chars >= 100, "bench.ppl_chars", self.ppl_chars, "an integer >= 100")
        check(self.ppl_window >= 2, "bench.ppl_window", self.ppl_window, "an integer >= 2")
        self._check_serve()
        check(
            1 <= self.ppl_stride <= self.ppl_window - 1,
            "bench.ppl_stride",
            self.ppl_stride,
            f"between 1 and bench.ppl_window - 1 ({self.ppl_window - 1})",
        )

    def _check_replay(self) -> None:
        """bench.workload=trace|dataset: the file, read later (runners.benches.serve.check) before any server starts;
        a file or option given to a workload that would ignore it is refused."""
        check(self.trace_speedup > 0, "bench.trace_speedup", self.trace_speedup, "> 0 (2 replays twice as fast)")
        check(self.trace_start_s >= 0, "bench.trace_start_s", self.trace_start_s, ">= 0 (seconds of trace time)")
        check(self.trace_duration_s is None or self.trace_duration_s > 0, "bench.trace_duration_s",
              self.trace_duration_s, "null or > 0 (seconds of trace time)")  # fmt: skip
        check(self.trace_requests is None or self.trace_requests >= 1, "bench.trace_requests", self.trace_requests,
              "null or an integer >= 1")  # fmt: skip
        check(0 < self.trace_sample <= 1, "bench.trace_sample", self.trace_sample, "a fraction in (0, 1]")
        one_of("bench.dataset_output", self.dataset_output, ("natural", "forced"))
        one_of("bench.cache_salt", self.cache_salt, ("auto", "none"))
        one_of("bench.grade", self.grade, ("auto", "on", "off"))
        one_of("bench.search_target", self.search_target, ("goodput", "correct_goodput"))
        graded = self.grade != "off" and self.workload in ("search_qa", "lesson_pack", "chat", "dataset")
        if self.grade == "on" and not graded:
            raise ConfigError(
                f"bench.grade=on judges answers against a workload's expectations, and bench.workload={self.workload} "
                "has none.",
                "use bench.workload=search_qa, lesson_pack or chat, or a dataset whose entries give "
                "expected_keywords; or bench.grade=auto.",
            )
        if self.search_target == "correct_goodput" and not graded:
            raise ConfigError(
                "bench.search_target=correct_goodput counts answers that passed their grade, and "
                f"bench.workload={self.workload} with bench.grade={self.grade} grades none.",
                "use a graded workload (bench.workload=search_qa, lesson_pack or chat, or a dataset with "
                "expected_keywords), or bench.search_target=goodput.",
            )
        one_of("bench.replies", self.replies, ("canned", "real"))
        check(self.think_time_s >= 0, "bench.think_time_s", self.think_time_s, ">= 0 (seconds)")
        if (self.replies == "real" or self.think_time_s) and self.workload not in ("multi_turn", "chat"):
            raise ConfigError(
                "bench.replies=real and bench.think_time_s shape multi-turn sessions, and bench.workload is "
                f"{self.workload}, so they would be ignored.",
                "add bench.workload=multi_turn (or chat), or drop them.",
            )
        real = self.replies == "real" or self.workload == "chat"
        if self.think_time_s and not real:
            raise ConfigError(
                "bench.think_time_s pauses between a real answer and the next question; canned replies are sent "
                "without waiting for an answer.",
                "add bench.replies=real, or drop bench.think_time_s.",
            )
        if real and self.client_hosts > 1:
            raise ConfigError(
                "real replies (bench.replies=real, bench.workload=chat) build each turn from the previous answer in "
                f"the client that received it; bench.client_hosts={self.client_hosts} splits a level over Ray actors.",
                "use bench.client_hosts=1 with real replies.",
            )
        if real and self.client_workers > 1:
            raise ConfigError(
                "real replies (bench.replies=real, bench.workload=chat) build each turn from the previous answer in "
                "the client that received it; "
                f"bench.client_workers={self.client_workers} splits a level over processes.",
                "use bench.client_workers=1 with real replies.",
            )
        check(self.client_cpus is None or (bool(self.client_cpus) and all(int(c) >= 0 for c in self.client_cpus)),
              "bench.client_cpus", self.client_cpus, "null or a non-empty list of CPU numbers")  # fmt: skip
        check(self.gauge_interval_s == 0 or 0.05 <= self.gauge_interval_s <= 60, "bench.gauge_interval_s",
              self.gauge_interval_s, "0 (off) or seconds in [0.05, 60]")  # fmt: skip
        check(0 <= self.token_mismatch_limit <= 1, "bench.token_mismatch_limit", self.token_mismatch_limit,
              "a fraction in [0, 1]")  # fmt: skip
        if self.workload == "trace" and self.search != "none":
            raise ConfigError(
                "bench.search=max_rate searches open-loop rates, and bench.workload=trace replays the trace's own "
                "times.",
                "drop bench.search, and sweep bench.trace_speedup instead (-m bench.trace_speedup=1,2,4).",
            )
        for name, workload in (("trace", "trace"), ("dataset", "dataset")):
            path = getattr(self, name)
            if self.workload == workload and not path:
                raise ConfigError(
                    f"bench.workload={workload} replays a file, and bench.{name} is not set.",
                    f'set bench.{name}=/path/to/file (formats: docs/serving.md, "Replaying traffic").',
                )
            if path and self.workload != workload:
                raise ConfigError(
                    f"bench.{name}={path} is replayed only by bench.workload={workload}, and bench.workload is "
                    f"{self.workload}, so it would be ignored.",
                    f"add bench.workload={workload}, or drop bench.{name}.",
                )
            if path:
                setattr(self, name, os.path.abspath(os.path.expanduser(path)))  # a point's process may run elsewhere

    def _check_serve(self) -> None:
        one_of("bench.target", self.target, SERVE_TARGETS)
        one_of("bench.api", self.api, ("chat", "completions"))
        one_of("bench.arrival", self.arrival, ("constant", "poisson", "gamma"))
        one_of("bench.search", self.search, ("none", "max_rate"))
        one_of("bench.workload", self.workload, WORKLOADS)
        one_of("bench.length_dist", self.length_dist, ("fixed", "uniform", "normal"))
        rates = list(self.rates)
        check(
            all(isinstance(r, int | float) and r > 0 for r in rates),
            "bench.rates",
            rates,
            "a list of rates > 0 (req/s)",
        )
        self.rates = [float(r) for r in rates]
        check(self.burstiness > 0, "bench.burstiness", self.burstiness, "> 0 (1 = Poisson)")
        check(self.num_requests >= 1, "bench.num_requests", self.num_requests, "an integer >= 1")
        check(self.duration_s is None or self.duration_s > 0, "bench.duration_s", self.duration_s, "null or > 0")
        check(self.ramp_up_s >= 0, "bench.ramp_up_s", self.ramp_up_s, ">= 0")
        check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            "bench.max_concurrency",
            self.max_concurrency,
            "null or an integer >= 1",
        )
        check(self.request_timeout_s > 0, "bench.request_timeout_s", self.request_timeout_s, "> 0")
        check(0 < self.goodput_target <= 1, "bench.goodput_target", self.goodput_target, "in (0, 1]")
        check(self.search_steps >= 2, "bench.search_steps", self.search_steps, "an integer >= 2")
        check(self.search_level_s > 0, "bench.search_level_s", self.search_level_s, "> 0")
        check(self.trials >= 1, "bench.trials", self.trials, "an integer >= 1 (1: each level once)")
        if self.trials > 1 and self.name not in ("serve", "latency"):
            raise ConfigError(
                f"bench.trials={self.trials} repeats a serve level or a latency case from a fresh state, and "
                f"bench={self.name} has neither, so it would be ignored.",
                "use bench=serve or bench=latency with bench.trials, or drop it.",
            )
        check(self.search_max_requests >= 1, "bench.search_max_requests", self.search_max_requests, "an integer >= 1")
        check(
            self.saturation_backlog is None or self.saturation_backlog >= 1,
            "bench.saturation_backlog",
            self.saturation_backlog,
            "null or an integer >= 1",
        )
        check(1 <= self.client_workers <= 64, "bench.client_workers", self.client_workers, "between 1 and 64")
        check(1 <= self.client_hosts <= 256, "bench.client_hosts", self.client_hosts, "between 1 and 256")
        if self.client_hosts > 1 and self.client_workers > 1:
            raise ConfigError(
                f"bench.client_hosts={self.client_hosts} and bench.client_workers={self.client_workers} both split a "
                "level's load; the actors are the workers.",
                "give one of them.",
            )
        if self.ray_address is not None and self.client_hosts == 1:
            raise ConfigError(
                "bench.ray_address names the Ray cluster the load actors run on, and bench.client_hosts is 1 (no "
                "actors), so it would be ignored.",
                "add bench.client_hosts=N, or drop bench.ray_address.",
            )
        check(self.length_spread >= 0, "bench.length_spread", self.length_spread, ">= 0")
        check(self.prefix_tokens >= 1, "bench.prefix_tokens", self.prefix_tokens, "an integer >= 1")
        check(self.turns >= 1, "bench.turns", self.turns, "an integer >= 1")
        self._check_replay()
        if self.name != "serve":
            return
        if self.search == "max_rate" and not self.slo.limits():
            raise ConfigError(
                "bench.search=max_rate looks for the highest rate whose goodput meets the SLOs; bench.slo is empty.",
                "set bench.slo, e.g. bench.slo={ttft_ms:1000,tpot_ms:100}.",
            )
        if self.target == "url" and not self.base_url:
            raise ConfigError(
                "bench.target=url needs the server's address, and bench.base_url is not set.",
                "set bench.base_url=http://host:port/v1, or bench.target=harness|llamacpp_server|vllm to launch one.",
            )
        for name in ("base_url", "api_key_env", "served_model"):
            if getattr(self, name) is not None and self.target != "url":
                # the point would load-test another server (a launched one) and report it as this one
                raise ConfigError(
                    f"bench.{name} names a running server's {name.replace('_', ' ')}, and bench.target={self.target} "
                    "does not load a running server, so it would be ignored.",
                    f"add bench.target=url to load-test that server, or drop bench.{name}.",
                )
        if self.base_url is not None:
            check_base_url("bench.base_url", self.base_url)
        check_key_env("bench.api_key_env", self.api_key_env)
