"""engine: the inference engine and the knobs each engine reads (conf/engine/<name>.yaml declares which)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.checks import check, check_base_url, check_env_python, check_key_env, check_vllm_python, one_of
from harness.config.options import COMPILE_MODES, HTTP_ENGINES, LAUNCHES, PARALLEL_LAUNCHES, engine_choices
from harness.errors import ConfigError


@dataclass
class EngineConfig:
    """The inference engine and its own knobs; each engine reads its fields (see conf/engine/*.yaml)."""

    name: str = "transformers"
    threads: int | None = None  # CPU threads (torch's pool for transformers); None = the engine's default (recorded)
    # transformers: how the decode step runs (all recorded in resolved.engine; defaults keep earlier figures)
    cache: str = "dynamic"  # dynamic (grows per token) | static (preallocated, fixed shapes: what compile needs)
    compile: bool = False  # torch.compile of the decode step, compiled during warm-up (timings.compile_s)
    compile_mode: str = "auto"  # auto: reduce-overhead (CUDA graphs) on CUDA, default elsewhere | a torch mode
    batching: str = "none"  # none: one request at a time | continuous: transformers' ContinuousBatchingManager
    max_batch_requests: int = 16  # continuous: the most requests decoded in one step
    kv_cache_tokens: int = 16384  # continuous: paged KV cache size, in tokens over all running requests
    batch_sampling: bool = False  # continuous: also serve sampled requests (per-request temperature/top-k/top-p)
    strict: bool = False  # true: an option that cannot run (compile without a compiler) fails instead of falling back
    # llamacpp
    n_ctx: int = 0  # context (KV cache) length (llamacpp; a launched vLLM's --max-model-len); 0 = the default
    n_batch: int = 512  # prompt tokens per llama_decode call
    flash_attn: str = "auto"  # auto | on | off
    n_gpu_layers: int = 0  # layers offloaded to a GPU (-1 = all); needs a CUDA/Metal build of llama-cpp-python
    # onnxruntime
    provider: str = "auto"  # auto (cuda when the model is placed there, else cpu) | cpu | cuda
    # openai, vllm: an OpenAI-compatible server, launched for the point or already running at base_url
    launch: str = "auto"  # auto (none with base_url, else harness) | none | harness | llamacpp_server | vllm
    base_url: str | None = None  # http://host:port/v1 of a running server (launch=none)
    api_key_env: str | None = None  # the NAME of an environment variable holding the key (never the key)
    served_model: str | None = None  # the model name the server knows; None = the entry's (with :quant)
    api: str = "chat"  # chat | completions: the endpoint chat messages go to (token-id prompts use completions)
    python: str | None = None  # vllm, deepspeed: that environment's python (or HARNESS_VLLM_PYTHON, HARNESS_MII_PYTHON)
    # The model split over devices: tensor parallel (each layer's matrices across ranks) and pipeline parallel (vllm:
    # the layers in stages). vllm, deepspeed: GPUs of the launched server, refused up front without their product.
    # transformers: tensor parallel only, as many ranks started by torch's distributed launch (one GPU each, or
    # CPU processes over gloo where no GPU is visible).
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    server_args: list[str] = field(default_factory=list)  # extra command-line arguments of a launched server
    launch_timeout_s: float = 300.0  # a launched server must list its model within this
    # a launched server runs on these CPUs only (Linux); with bench.client_cpus apart, the load client and the
    # server stop taking each other's cores on one machine. None: every CPU.
    cpus: list[int] | None = None
    request_timeout_s: float = 300.0  # a request's whole answer must arrive within this
    send_min_tokens: bool = True  # send min_tokens/ignore_eos to force output lengths (vLLM-style servers)
    # Token-id prompts (exact lengths) to /completions; null = yes, but not to llama.cpp's server, which takes text
    # only (prompts then go as their text, and their length is the server's usage count).
    token_prompts: bool | None = None

    def __post_init__(self) -> None:
        one_of("engine.name", self.name, engine_choices())
        check(self.threads is None or self.threads >= 1, "engine.threads", self.threads, "null or an integer >= 1")
        check(self.n_ctx >= 0, "engine.n_ctx", self.n_ctx, "0 (the model's context) or a positive integer")
        check(self.n_batch >= 1, "engine.n_batch", self.n_batch, "an integer >= 1")
        one_of("engine.flash_attn", str(self.flash_attn).lower(), ("auto", "on", "off"))
        self.flash_attn = str(self.flash_attn).lower()
        check(self.n_gpu_layers >= -1, "engine.n_gpu_layers", self.n_gpu_layers, "-1 (all) or an integer >= 0")
        one_of("engine.provider", self.provider, ("auto", "cpu", "cuda"))
        self._check_transformers_options()
        one_of("engine.launch", self.launch, ("auto", *LAUNCHES))
        if self.launch == "auto":
            self.launch = {"vllm": "vllm", "deepspeed": "mii"}.get(self.name, "none" if self.base_url else "harness")
        check(self.tensor_parallel >= 1, "engine.tensor_parallel", self.tensor_parallel, "an integer >= 1")
        check(self.pipeline_parallel >= 1, "engine.pipeline_parallel", self.pipeline_parallel, "an integer >= 1")
        one_of("engine.api", self.api, ("chat", "completions"))
        check(self.launch_timeout_s > 0, "engine.launch_timeout_s", self.launch_timeout_s, "> 0")
        check(self.request_timeout_s > 0, "engine.request_timeout_s", self.request_timeout_s, "> 0")
        self.server_args = [str(a) for a in self.server_args]
        check(self.cpus is None or (bool(self.cpus) and all(int(c) >= 0 for c in self.cpus)), "engine.cpus",
              self.cpus, "null or a non-empty list of CPU numbers")  # fmt: skip
        if self.base_url is not None:
            check_base_url("engine.base_url", self.base_url)
        check_key_env("engine.api_key_env", self.api_key_env)
        own = {"vllm": "vllm", "deepspeed": "mii"}.get(self.name)
        if own and self.launch not in (own, "none"):
            raise ConfigError(
                f"engine={self.name} with engine.launch={self.launch}: it is launched as launch={own}, or reached at "
                "engine.base_url with launch=none.",
                f"leave engine.launch={own}, or use engine=openai for another server.",
            )
        if self.pipeline_parallel > 1 and self.launch == "mii":
            raise ConfigError(
                f"engine.pipeline_parallel={self.pipeline_parallel}: DeepSpeed-MII splits a model by tensor "
                "parallelism only.",
                "use engine.tensor_parallel with engine=deepspeed, or engine=vllm for pipeline parallelism.",
            )
        if self.name == "transformers":
            self._check_transformers_parallel()
        elif (self.tensor_parallel > 1 or self.pipeline_parallel > 1) and self.launch not in PARALLEL_LAUNCHES:
            raise ConfigError(
                f"engine.tensor_parallel={self.tensor_parallel}, engine.pipeline_parallel={self.pipeline_parallel} "
                f"split a model over GPUs in a launched vLLM or DeepSpeed-MII server, or over ranks of "
                f"engine=transformers, and engine={self.name} with launch={self.launch} has none to split.",
                "use engine=vllm, engine=deepspeed or engine=transformers.",
            )
        if self.name in HTTP_ENGINES and self.launch == "none" and not self.base_url:
            raise ConfigError(
                f"engine={self.name} with engine.launch=none needs the server's address, and engine.base_url is "
                "not set.",
                "set engine.base_url=http://host:port/v1, or engine.launch=harness|llamacpp_server|vllm to start one.",
            )
        if self.launch == "vllm":
            check_vllm_python(self.python)
        if self.launch == "mii":
            check_env_python("DeepSpeed-MII", "HARNESS_MII_PYTHON", self.python)

    def _check_transformers_parallel(self) -> None:
        """transformers splits a model by tensor parallelism over ranks of torch's distributed launch; the decode
        paths that keep state of their own (a compiled step, a static cache, continuous batching's manager) were
        not built for sharded weights and are refused with it."""
        if self.pipeline_parallel > 1:
            raise ConfigError(
                f"engine.pipeline_parallel={self.pipeline_parallel}: engine=transformers splits a model by tensor "
                "parallelism only (engine.tensor_parallel).",
                "use engine.tensor_parallel, or engine=vllm for pipeline parallelism (or model.device_map=auto, "
                "which places the layers over GPUs in turn).",
            )
        if self.tensor_parallel == 1:
            return
        special = [f"engine.{k}={getattr(self, k)}" for k, plain in (("cache", "dynamic"), ("compile", False),
                   ("batching", "none")) if getattr(self, k) != plain]  # fmt: skip
        if special:
            raise ConfigError(
                f"engine.tensor_parallel={self.tensor_parallel} with {', '.join(special)}: tensor parallel "
                "transformers runs the plain generate path (dynamic cache, no compile, one request at a time).",
                "drop those options, or engine.tensor_parallel=1 (for batched serving over GPUs: engine=vllm).",
            )

    def _check_transformers_options(self) -> None:
        one_of("engine.cache", self.cache, ("dynamic", "static"))
        one_of("engine.compile_mode", self.compile_mode, COMPILE_MODES)
        one_of("engine.batching", self.batching, ("none", "continuous"))
        check(self.max_batch_requests >= 1, "engine.max_batch_requests", self.max_batch_requests, "an integer >= 1")
        check(self.kv_cache_tokens >= 256, "engine.kv_cache_tokens", self.kv_cache_tokens, "an integer >= 256")
        changed = [
            f"engine.{k}={getattr(self, k)}"
            for k, default in (("cache", "dynamic"), ("compile", False), ("batching", "none"))
            if getattr(self, k) != default
        ]
        if changed and self.name != "transformers":
            raise ConfigError(
                f"{', '.join(changed)} applies to engine=transformers, not engine={self.name}.",
                "drop the option, or use engine=transformers (a server's own batching is set by its server_args).",
            )
        if self.compile and self.cache != "static":
            raise ConfigError(
                "engine.compile=true needs engine.cache=static: transformers compiles the decode step over a "
                "preallocated cache of fixed shape; a dynamic cache grows every token and would recompile each step.",
                "add engine.cache=static.",
            )
        if self.batch_sampling and self.batching != "continuous":
            raise ConfigError(
                "engine.batch_sampling=true configures continuous batching's manager, and engine.batching is "
                f"{self.batching}.",
                "add engine.batching=continuous, or drop engine.batch_sampling (one request at a time samples anyway).",
            )
        if self.batching == "continuous" and (self.cache != "dynamic" or self.compile):
            raise ConfigError(
                "engine.batching=continuous runs on transformers' own paged KV cache and compiles nothing: "
                f"engine.cache={self.cache} and engine.compile={self.compile} do not apply to it.",
                "leave engine.cache=dynamic and engine.compile=false with batching=continuous, or use "
                "engine.batching=none for a static or compiled decode.",
            )
