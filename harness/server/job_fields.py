"""Which config fields a benchmark job over HTTP may set: a positive list, field by field, each with the reason it
is safe. This is the one place that decides it.

A job reaches the server's machine: its overrides must never name a URL, host, file, folder, executable,
environment variable or command, never turn on remote code, and never move the server's own folders. So a field is
settable only when ALLOWED names it (some only with the values listed there); every other schema field is in
REFUSED with the reason. A field added to a schema later is in neither, so it is refused over HTTP until someone
decides, and a test fails until they do (tests/test_jobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Allowed:
    why: str
    values: tuple[Any, ...] | None = None  # the only values a job may give, where HTTP narrows the field's range


_TEXT = "a text sent to the model as it is; it names nothing on this machine"
_QUANT = "a quantization parameter, checked against its allowed values; it names nothing on this machine"
_ENGINE = "how the engine decodes, checked against its range; it names nothing on this machine"
_LOAD = "a number or choice shaping the load the job offers, checked against its range and the job limits"
_WORKFLOW = "a parameter of the workflow's own cases and checks, checked against its range"
_SLO = "a service-level objective in ms; a number only"

ALLOWED: dict[str, Allowed] = {
    "seed": Allowed("an integer seeding sampling and random weights"),
    "model.device": Allowed("a device of this machine, checked against auto, cpu, cuda, cuda:N, mps"),
    "model.dtype": Allowed("one of auto, float32, float16, bfloat16"),
    "model.chat_format": Allowed("how chat messages are formatted: auto, template, chatml or plain"),
    "model.fallback_to_cpu": Allowed("whether a CUDA out-of-memory during load retries on the CPU"),
    "quant.bits": Allowed(_QUANT),
    "quant.quant_type": Allowed(_QUANT),
    "quant.double_quant": Allowed(_QUANT),
    "quant.compute_dtype": Allowed(_QUANT),
    "quant.llm_int8_threshold": Allowed(_QUANT),
    "quant.group_size": Allowed(_QUANT),
    "quant.desc_act": Allowed(_QUANT),
    "quant.calibration_samples": Allowed(_QUANT),
    "quant.gguf_type": Allowed(_QUANT),
    "quant.onnx_precision": Allowed(_QUANT),
    "attention.strict": Allowed("whether an attention choice that cannot be honoured fails instead of falling back"),
    "engine.threads": Allowed(_ENGINE),
    "engine.cache": Allowed(_ENGINE),
    "engine.compile": Allowed(_ENGINE + " (compile time counts against the job's wall time)"),
    "engine.compile_mode": Allowed(_ENGINE),
    "engine.batching": Allowed(_ENGINE),
    "engine.max_batch_requests": Allowed(_ENGINE + " and the job's parallelism limit"),
    "engine.kv_cache_tokens": Allowed(_ENGINE),
    "engine.batch_sampling": Allowed(_ENGINE),
    "engine.strict": Allowed(_ENGINE),
    "engine.n_ctx": Allowed(_ENGINE),
    "engine.n_batch": Allowed(_ENGINE),
    "engine.flash_attn": Allowed(_ENGINE),
    "engine.n_gpu_layers": Allowed(_ENGINE),
    "engine.provider": Allowed(_ENGINE),
    "engine.api": Allowed("which endpoint of the point's own server chat goes to: chat or completions"),
    "engine.launch_timeout_s": Allowed("a time limit; the job's wall time bounds it anyway"),
    "engine.request_timeout_s": Allowed("a time limit; the job's wall time bounds it anyway"),
    "engine.send_min_tokens": Allowed("whether requests ask the server for an exact output length"),
    "engine.token_prompts": Allowed("whether prompts go to the server as token ids or as text"),
    "workflow.limit": Allowed(_WORKFLOW),
    "workflow.max_new_tokens": Allowed(_WORKFLOW + " and the job's token limit"),
    "workflow.system_prompt": Allowed(_TEXT),
    "workflow.example_turn": Allowed(_WORKFLOW),
    "workflow.top_k": Allowed(_WORKFLOW),
    "workflow.chunk_words": Allowed(_WORKFLOW),
    "workflow.chunk_overlap": Allowed(_WORKFLOW),
    "workflow.min_exercises": Allowed(_WORKFLOW),
    "workflow.min_words": Allowed(_WORKFLOW),
    "workflow.max_words": Allowed(_WORKFLOW),
    "workflow.context_budget": Allowed(_WORKFLOW),
    "bench.system_prompt": Allowed(_TEXT),
    "bench.prompt": Allowed(_TEXT),
    "bench.max_new_tokens": Allowed("an output length, within the job's token limit"),
    "bench.temperature": Allowed("a sampling parameter"),
    "bench.top_p": Allowed("a sampling parameter"),
    "bench.top_k": Allowed("a sampling parameter"),
    "bench.repetition_penalty": Allowed("a sampling parameter"),
    "bench.prompt_lengths": Allowed("prompt lengths in tokens, within the job's and the model's limits"),
    "bench.batch_sizes": Allowed("batch sizes, within the job's parallelism limit"),
    "bench.concurrency": Allowed("closed-loop clients, within the job's parallelism limit"),
    "bench.requests_per_client": Allowed("requests per client, within the job's run limit"),
    "bench.warmup_runs": Allowed("a run count, within the job's run limit"),
    "bench.min_runs": Allowed("a run count, within the job's run limit"),
    "bench.max_runs": Allowed("a run count, within the job's run limit"),
    "bench.min_seconds": Allowed("a duration, within the job's wall time"),
    "bench.target_rel_ci": Allowed("the stop rule's target, a fraction"),
    "bench.primary_metric": Allowed("which metric the stop rule watches: e2e_ms, ttft_ms or tpot_ms"),
    "bench.perplexity": Allowed("whether e2e also scores perplexity on the built-in text"),
    "bench.ppl_chars": Allowed("characters of the built-in text scored, within the job's limit"),
    "bench.ppl_window": Allowed("tokens per forward pass of the quality bench"),
    "bench.ppl_stride": Allowed("tokens scored per window of the quality bench"),
    "bench.target": Allowed(
        "the server a serve job loads: only one it launches on loopback; another server only through the "
        "operator's --job-targets, picked by the request's `target`",
        values=("harness",),
    ),
    "bench.api": Allowed("which endpoint the load goes to: chat or completions"),
    "bench.served_model": Allowed(
        "a model name sent to a server the operator listed in --job-targets (only with a `target`); it names "
        "nothing on this machine"
    ),
    "bench.rates": Allowed(_LOAD),
    "bench.arrival": Allowed(_LOAD),
    "bench.burstiness": Allowed(_LOAD),
    "bench.num_requests": Allowed(_LOAD),
    "bench.duration_s": Allowed(_LOAD),
    "bench.ramp_up_s": Allowed(_LOAD),
    "bench.max_concurrency": Allowed(_LOAD),
    "bench.request_timeout_s": Allowed("a time limit; the job's wall time bounds it anyway"),
    "bench.slo.ttft_ms": Allowed(_SLO),
    "bench.slo.tpot_ms": Allowed(_SLO),
    "bench.slo.e2e_ms": Allowed(_SLO),
    "bench.slo.itl_ms": Allowed(_SLO),
    "bench.slo.ttft_answer_ms": Allowed(_SLO),
    "bench.search": Allowed(_LOAD),
    "bench.goodput_target": Allowed(_LOAD),
    "bench.search_steps": Allowed(_LOAD),
    "bench.search_level_s": Allowed(_LOAD),
    "bench.search_max_requests": Allowed(_LOAD),
    "bench.trials": Allowed(_LOAD),
    "bench.search_target": Allowed(_LOAD),
    "bench.grade": Allowed("whether answers are judged by the workload's own cases: auto, on or off"),
    "bench.saturation_backlog": Allowed(_LOAD),
    "bench.client_workers": Allowed("client processes on this machine, within the job's parallelism limit"),
    "bench.calibrate": Allowed("whether the client measures its own ceiling against a null server on loopback"),
    "bench.scrape_metrics": Allowed("whether the target's /metrics are read before and after each level"),
    "bench.gauge_interval_s": Allowed("how often the target's gauges are read during a level (bounded to 60 s)"),
    "bench.workload": Allowed(
        _LOAD + "; trace and dataset replay a file, which a job may not name",
        values=("synthetic", "shared_prefix", "search_qa", "lesson_pack", "chat", "multi_turn"),
    ),
    "bench.cache_salt": Allowed("whether each level's prompts are its own: auto or none"),
    "bench.token_mismatch_limit": Allowed("a fraction above which a level's token-count disagreements are flagged"),
    "bench.length_dist": Allowed(_LOAD),
    "bench.length_spread": Allowed(_LOAD),
    "bench.prefix_tokens": Allowed(_LOAD),
    "bench.turns": Allowed(_LOAD),
    "bench.replies": Allowed(_LOAD),
    "bench.think_time_s": Allowed(_LOAD + " (think time counts against the job's wall time)"),
    "validation.min_pass_rate": Allowed("the release gate's threshold, a fraction"),
    "energy": Allowed("whether the job reads the machine's energy counters: auto, on or off"),
    "energy_idle_s": Allowed("the idle baseline's wait, bounded to 60 s (counts against the job's wall time)"),
    "cost.per_hour": Allowed("a price, a number only"),
    "cost.currency": Allowed("a three-letter currency code, checked"),
    "cost.per": Allowed("machine or gpu"),
}

_GROUP = "set by the group option; choose the option instead ({group}=<option>)"
_WEIGHTS = "decides which weights or files this machine reads; a job picks a registered entry (model=<entry>)"
_SERVER = "the server fixes it for every job"

REFUSED: dict[str, str] = {
    "model.name": _GROUP.format(group="model"),
    "model.source": _WEIGHTS,
    "model.path": "names a file or folder of this machine",
    "model.hub_id": _WEIGHTS + " (and makes this machine download)",
    "model.revision": _WEIGHTS + " (and makes this machine download)",
    "model.gguf_package": _WEIGHTS,
    "model.gguf_file": "names a file",
    "model.gguf_parts": "names packages and files",
    "model.gguf_size": _WEIGHTS,
    "model.gguf_sha256": _WEIGHTS,
    "model.random_weights": _WEIGHTS,
    "model.architecture": "a free-form mapping that builds a model of any size on this machine",
    "model.tokenizer": "a free-form mapping that builds a tokenizer on this machine",
    "model.trust_remote_code": "runs a repository's code on this machine; only the operator's --allow-remote-code",
    "quant.name": _GROUP.format(group="quant"),
    "quant.method": _GROUP.format(group="quant"),
    "quant.calibration": "names a file",
    "attention.name": _GROUP.format(group="attention"),
    "engine.name": _GROUP.format(group="engine"),
    "engine.launch": "chooses a program to start on this machine",
    "engine.base_url": "names a URL this machine would send requests to (the operator's --job-targets do that)",
    "engine.api_key_env": "names an environment variable whose value would be sent away",
    "engine.served_model": "belongs with engine.base_url, which a job may not set",
    "engine.python": "names an executable",
    "engine.server_args": "a command line for a program this machine starts",
    "engine.cpus": "pins a server to CPUs of the machine, which the operator shares out, not a job",
    "bench.client_hosts": "starts a Ray instance on this machine or uses a cluster, which the operator chooses",
    "bench.ray_address": "names an address this machine would connect to",
    "engine.tensor_parallel": "takes several GPUs of the machine, which the operator shares out, not a job",
    "engine.pipeline_parallel": "takes several GPUs of the machine, which the operator shares out, not a job",
    "model.device_map": "spreads a model over every GPU of the machine, which the operator shares out",
    "tracking": "sends the job's results to a tracking server, which the operator chooses",
    "tracking_uri": "names a URL or a folder",
    "telemetry": "a mapping whose otlp_endpoint names a URL",
    "telemetry.otlp_endpoint": "names a URL this machine would send traces to",
    "telemetry.service_name": "belongs with telemetry.otlp_endpoint, which a job may not set",
    "bench.client_cpus": "pins the job's own process to CPUs of the machine, which the operator shares out",
    "workflow.name": _GROUP.format(group="workflow"),
    "workflow.cases": "names a file",
    "workflow.corpus": "names a folder",
    "bench.name": _GROUP.format(group="bench") + "; a bench.name of package:function would run code",
    "bench.base_url": "names a URL this machine would send requests to (the operator's --job-targets do that)",
    "bench.api_key_env": "names an environment variable whose value would be sent away",
    "bench.slo": "a mapping; set its fields one by one (bench.slo.ttft_ms=500)",
    "cost": "a mapping; set its fields one by one (cost.per_hour=2.5 cost.currency=USD)",
    "bench.trace": "names a file of this machine",
    "bench.trace_speedup": "shapes a trace replay, which a job cannot start (bench.trace names a file)",
    "bench.trace_start_s": "shapes a trace replay, which a job cannot start (bench.trace names a file)",
    "bench.trace_duration_s": "shapes a trace replay, which a job cannot start (bench.trace names a file)",
    "bench.trace_requests": "shapes a trace replay, which a job cannot start (bench.trace names a file)",
    "bench.trace_sample": "shapes a trace replay, which a job cannot start (bench.trace names a file)",
    "bench.dataset": "names a file of this machine",
    "bench.dataset_output": "shapes a dataset replay, which a job cannot start (bench.dataset names a file)",
    "validation": "a mapping; set its field (validation.min_pass_rate=0.8)",
    "cache_dir": "names a folder; " + _SERVER,
    "isolation": _SERVER + " (every job runs in a process of its own)",
    "force": _SERVER + " (a job always measures anew)",
    "print_text": _SERVER,
    "report": "a sweep's report; a job is one point",
    "point_memory_limit_mb": "the operator's decision about this machine's memory",
}


def allowed_value(key: str, value: Any) -> bool:
    """Whether a job may give this value to an allowed field (some fields are narrower over HTTP)."""
    values = ALLOWED[key].values
    return values is None or value in values
