"""HarnessConfig: one sweep point, its groups together, and the checks that need more than one group (a
quantization or attention the engine does not run, a server target that contradicts the engine)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from harness.config.bench import BenchConfig
from harness.config.checks import check, check_vllm_python, one_of
from harness.config.engine import EngineConfig
from harness.config.groups import (
    AttentionConfig,
    CostConfig,
    ModelConfig,
    QuantConfig,
    TelemetryConfig,
    ValidationConfig,
    WorkflowConfig,
)
from harness.config.options import HTTP_ENGINES, QUANT_ENGINES, QUANT_HINT, QUANT_LAUNCHES, TENSOR_PARALLEL_BENCHES
from harness.errors import ConfigError


@dataclass
class HarnessConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    # Where finished points are also sent (never part of a point's identity): mlflow logs each point as a run in an
    # experiment named after the sweep folder (harness.tracking; the optional extra `tracking`), at tracking_uri
    # (an http(s) MLflow server or a folder; null: MLFLOW_TRACKING_URI, else outputs/mlruns)
    tracking: str = "none"  # none | mlflow
    tracking_uri: str | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # auto: joules per phase and level where a hardware counter can be read (NVML, amdsmi, RAPL), and why not
    # where none can | on: a point without a counter is refused | off: no energy figures, no telemetry
    energy: str = "auto"
    energy_idle_s: float = 2.0  # the idle baseline's wait before the model loads (where a counter exists)
    seed: int = 0
    cache_dir: str = "~/.cache/harness"  # materialized GGUF and random-weight checkpoints, quantized models
    print_text: bool = True
    # process: each point in a process of its own (clean memory, crash isolation), forked from a server that has
    # imported torch once | spawn: a fresh interpreter per point | inline: in the sweep's process
    isolation: str = "process"
    force: bool = False  # redo points whose result.json already says ok
    point_memory_limit_mb: int | None = None  # address space a point's process may add after start-up (MiB)
    report: bool = True  # after a sweep, write summary.csv/.md, plots and report.html into its folder

    def __post_init__(self) -> None:
        self.cache_dir = os.path.expanduser(os.environ.get("HARNESS_CACHE_DIR") or self.cache_dir)
        one_of("isolation", self.isolation, ("process", "spawn", "inline"))
        one_of("energy", self.energy, ("auto", "on", "off"))
        one_of("tracking", self.tracking, ("none", "mlflow"))
        check(0 <= self.energy_idle_s <= 60, "energy_idle_s", self.energy_idle_s, "seconds in [0, 60]")
        if self.point_memory_limit_mb is not None:
            check(self.point_memory_limit_mb >= 64, "point_memory_limit_mb", self.point_memory_limit_mb, ">= 64")
        self._check_engine_fits()
        self._check_ranks_fit()

    def _check_engine_fits(self) -> None:
        """Quantization, attention and dtype choices that only some engines run are refused before any work."""
        engine, method = self.engine.name, self.quant.method
        if method != "none" and engine not in QUANT_ENGINES[method]:
            runs_here = ["none", *sorted(m for m, engines in QUANT_ENGINES.items() if engine in engines)]
            raise ConfigError(
                f"quant={self.quant.name} (method {method}) runs only on engine={'|'.join(QUANT_ENGINES[method])}, "
                f"not on engine={engine}, which runs the quantization methods: {', '.join(runs_here)}.",
                f"pick a quantization engine={engine} runs ({QUANT_HINT.get(engine, 'quant=none')}), or a matching "
                "engine; a sweep over both axes must be split into one command per engine.",
            )
        if engine != "transformers" and self.attention.name != "auto":
            raise ConfigError(
                f"attention={self.attention.name} picks a transformers attention kernel; engine={engine} has its own.",
                "leave attention=auto"
                + ("; llama.cpp's flash attention is engine.flash_attn=auto|on|off." if engine == "llamacpp" else "."),
            )
        self._check_server_fits()
        if engine == "llamacpp" and self.model.dtype != "auto":
            raise ConfigError(
                f"model.dtype={self.model.dtype} does not apply to engine=llamacpp: it computes in the GGUF's own "
                "tensor types.",
                "leave model.dtype=auto, and requantize with quant=q8_0 or q4_k_m (or quant.gguf_type=F16).",
            )

    def _check_server_fits(self) -> None:
        """bench=serve's target and the engine agree; a launched server runs the point's quantization."""
        engine, bench = self.engine.name, self.bench
        if bench.name == "serve":
            if bench.target == "engine" and engine not in HTTP_ENGINES:
                raise ConfigError(
                    f"bench=serve with bench.target=engine measures engine=openai|vllm's server, and engine={engine} "
                    "runs in this process.",
                    "set bench.target=harness|llamacpp_server|vllm|url, or engine=openai with its launch or base_url.",
                )
            if bench.target != "engine" and engine != "transformers":
                raise ConfigError(
                    f"bench=serve with bench.target={bench.target} names its own server, and engine={engine} "
                    "names another.",
                    f"drop engine={engine} (the target's server runs its own engine), or set bench.target=engine.",
                )
        launch = self.server_launch()
        if self.engine.cpus and launch in (None, "none"):
            raise ConfigError(
                f"engine.cpus={self.engine.cpus} pins a server the point launches, and this point launches none.",
                "drop engine.cpus; pin an in-process run or a running server with taskset (Linux) instead.",
            )
        if launch is None:
            return
        if bench.name in ("memory", "quality"):
            why = {
                "memory": "measures the memory of this process, and the model lives in the server's",
                "quality": "scores text with the model's logits, which an OpenAI-compatible stream does not give",
            }[bench.name]
            raise ConfigError(
                f"bench={bench.name} {why}; engine={engine} reaches the model over HTTP.",
                f"run bench={bench.name} on an in-process engine (transformers, llamacpp, onnxruntime); for a "
                "server, bench=serve reports its load behaviour and scrapes its /metrics.",
            )
        if launch == "vllm":
            check_vllm_python(self.engine.python)
        method = self.quant.method
        if launch == "none" and method != "none":
            raise ConfigError(
                f"quant={self.quant.name} cannot be applied to a server that is already running: it serves what it "
                "loaded.",
                "leave quant=none and name the quantized model in served_model, or launch the server for the point.",
            )
        if launch != "none" and launch not in QUANT_LAUNCHES.get(method, ()):
            raise ConfigError(
                f"quant={self.quant.name} (method {method}) is not run by a launched {launch} server.",
                f"use a launch that runs it ({', '.join(QUANT_LAUNCHES.get(method, ())) or 'none'}), or quant=none.",
            )

    def ranks(self) -> int:
        """The processes the point runs in: engine.tensor_parallel ranks for a transformers model split over them
        (started by torch's distributed launch), else 1."""
        return self.engine.tensor_parallel if self.engine.name == "transformers" else 1

    def _check_ranks_fit(self) -> None:
        """A model split over ranks runs where every rank can repeat the same calls in step: the in-process benches
        with a fixed amount of work, a plain unquantized model, a process of its own."""
        tp = self.engine.tensor_parallel
        if self.engine.name != "transformers" or tp == 1:
            return
        if self.bench.name not in TENSOR_PARALLEL_BENCHES and ":" not in self.bench.name:  # a user's bench: theirs
            raise ConfigError(
                f"engine.tensor_parallel={tp} with bench={self.bench.name}: a transformers model split over ranks is "
                f"measured by bench={'|'.join(TENSOR_PARALLEL_BENCHES)}, where every rank runs the same requests in "
                "step.",
                "use one of those benches; to load a split model with many requests at once, bench=serve with "
                "bench.target=vllm and engine.tensor_parallel there.",
            )
        why = None
        if self.quant.method != "none":
            why = f"quant={self.quant.name}: transformers' tensor-parallel plans shard plain weights"
        elif self.model.device_map is not None:
            why = f"model.device_map={self.model.device_map}: a model is either split by layers or by tensors"
        elif self.isolation == "inline":
            why = "isolation=inline: the ranks are processes of their own"
        if why is not None:
            raise ConfigError(
                f"engine.tensor_parallel={tp} does not combine with {why}.",
                "drop one of the two.",
            )

    def server_launch(self) -> str | None:
        """The server this point launches (none: it uses a running one); None when it runs no server."""
        if self.bench.name == "serve" and self.bench.target != "engine":
            return "none" if self.bench.target == "url" else self.bench.target
        if self.engine.name in HTTP_ENGINES:
            return self.engine.launch
        return None

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)
