"""The options a point is made of, read from conf/ and fixed here: the groups, the engines (conf/engine/*.yaml,
with the engine.* fields each reads), and the values each kind of field takes."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

GROUPS = ("model", "quant", "attention", "engine", "workflow", "bench")
# Top-level fields that change how a point runs or is shown, not what it measures: kept out of the config digest,
# the sweep id, the folder name and a point's identity.
NOT_MEASURED = ("print_text", "isolation", "force", "report", "validation", "tracking", "tracking_uri", "telemetry")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SOURCES = ("auto", "path", "hub", "gguf", "random")
CHAT_FORMATS = ("auto", "template", "chatml", "plain")
QUANT_METHODS = ("none", "bitsandbytes", "gptq", "gguf", "onnx")
_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def engine_choices() -> tuple[str, ...]:
    """The engines: conf/engine/'s options (harness.engines.ENGINES maps each to its module)."""
    return tuple(sorted(p.stem for p in (_CONF_DIR / "engine").glob("*.yaml")))


def engine_fields(name: str) -> frozenset[str]:
    """The engine.* fields an engine reads: the keys its conf/engine/<name>.yaml declares."""
    return frozenset(OmegaConf.load(_CONF_DIR / "engine" / f"{name}.yaml").keys()) - {"name"}


# engines that drive a server over HTTP (launched for the point, or running); deepspeed: DeepSpeed-MII's server
HTTP_ENGINES = ("openai", "vllm", "deepspeed")
LAUNCHES = ("none", "harness", "llamacpp_server", "vllm", "mii")  # engine.launch also takes auto
SERVE_TARGETS = ("engine", "url", "harness", "llamacpp_server", "vllm", "mii")
# The launches that split one model over several GPUs (engine.tensor_parallel, engine.pipeline_parallel).
PARALLEL_LAUNCHES = ("vllm", "mii")
# The benches a transformers model split over ranks runs: each rank repeats the same fixed work, so their collective
# calls stay in step (a bench that stops on time, or answers requests as they come, would let ranks part).
TENSOR_PARALLEL_BENCHES = ("smoke", "latency", "throughput", "memory", "quality")
WORKLOADS = (
    "synthetic",
    "shared_prefix",
    "search_qa",
    "lesson_pack",
    "chat",
    "multi_turn",
    "trace",
    "dataset",
)  # bench=serve's prompts
# Which engines run each quantization method (checked before any point runs). engine=openai runs a quantization
# through the server it launches: harness serves `<entry>:<quant>`, llama.cpp's server a GGUF file.
# ("none": every engine)
QUANT_ENGINES: dict[str, tuple[str, ...]] = {
    "bitsandbytes": ("transformers", "openai"),
    "gptq": ("transformers", "openai"),
    "gguf": ("llamacpp", "openai"),
    "onnx": ("onnxruntime",),
}
# Which launched server runs each quantization method.
QUANT_LAUNCHES = {
    "none": LAUNCHES[1:],
    "bitsandbytes": ("harness",),
    "gptq": ("harness",),
    "gguf": ("llamacpp_server",),
}
# llama.cpp types the harness requantizes to (llama.cpp's own quantize, from an F32/F16/BF16 GGUF).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1", "Q3_K_M", "Q2_K")
ONNX_PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
QUANT_HINT = {
    "transformers": "quant=none, 8bit, 4bit or gptq",
    "llamacpp": "quant=none or gguf for the file as shipped, q8_0 or q4_k_m to requantize an F16/F32 GGUF",
    "onnxruntime": "quant=none for model.dtype's precision, int4",
    "openai": "quant=none (what the server serves), or a quantization its launched server runs",
    "vllm": "quant=none (vLLM loads the checkpoint as it is)",
    "deepspeed": "quant=none (DeepSpeed-MII loads the checkpoint as it is)",
}
ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flash2")
WORKFLOW_CHOICES = ("none", "search_qa", "lesson_pack", "chat")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def conf_dir() -> Path:
    """The conf/ folder beside the packages (the project is installed editable, or run from its root)."""
    return _CONF_DIR


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
