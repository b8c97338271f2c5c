"""A transformers model split by tensor parallelism over the ranks of torch's distributed launch.

transformers shards each layer's matrices by the architecture's own plan (`base_model_tp_plan`), over NCCL with one
GPU per rank, or over gloo between CPU processes where torch sees no accelerator. Here: the checks that refuse a
split transformers would fail at (no plan, heads that do not divide), the arguments of from_pretrained, where the
rank's model lives, and what the split looked like (the plan, each rank's device and weight bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from harness import parallel
from harness.device import Placement
from harness.errors import ConfigError


def check_split(config: Any, size: int, model_name: str) -> None:
    """ConfigError when transformers cannot split this architecture `size` ways."""
    import transformers

    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ConfigError(
            f"engine.tensor_parallel={size}: model {model_name} ({config.model_type}) has no tensor-parallel plan in "
            f"transformers {transformers.__version__}, so its layers cannot be split over ranks.",
            "use engine.tensor_parallel=1, a model whose architecture has a plan (llama, qwen2, mistral, gemma, ...), "
            "or engine=vllm, which splits more architectures.",
        )
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count is not None and count % size:
            raise ConfigError(
                f"engine.tensor_parallel={size}: model {model_name} has {count} {what}, which do not divide into "
                f"{size} equal shards.",
                f"use a tensor-parallel size that divides {count}.",
            )


def placement_of_rank(placement: Placement) -> Placement:
    """Where transformers puts this rank's shard: the machine's accelerator (one GPU per local rank), else the CPU.
    A point that asked for another device is refused (transformers binds the accelerator it finds)."""
    import torch

    if torch.cuda.is_available():
        if not placement.device.startswith("cuda"):
            raise ConfigError(
                f"engine.tensor_parallel with model.device={placement.device}: transformers splits a model over the "
                "GPUs it finds, one per rank, and this machine has some.",
                "use model.device=auto (or cuda), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to split over CPU "
                "processes.",
            )
        return dataclasses.replace(placement, device=f"cuda:{parallel.local_rank()}")
    if placement.device != "cpu":
        raise ConfigError(
            f"engine.tensor_parallel with model.device={placement.device}: without CUDA, transformers splits a model "
            "over CPU processes only.",
            "use model.device=auto or cpu.",
        )
    return placement


def from_pretrained_args(size: int) -> dict[str, Any]:
    """The from_pretrained arguments of a `size`-way split with the architecture's own plan (newer transformers
    take it as a DistributedConfig, older ones as tp_plan/tp_size)."""
    import inspect

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto", "tp_size": size}
    if "tp_size" in inspect.signature(DistributedConfig).parameters:
        return {"distributed_config": DistributedConfig(tp_size=size)}
    return {"tp_plan": "auto", "tp_size": size}


def split_summary(model: Any, size: int) -> dict[str, Any]:
    """The split as loaded: world size, backend, the plan by module pattern, and each rank's device and bytes of
    weights (its shards plus what every rank holds whole)."""
    local = 0
    for p in model.parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p
        local += shard.numel() * shard.element_size()
    device = str(next(model.parameters()).device)
    ranks = parallel.gather({"device": device, "weight_bytes": local})
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    return {
        "kind": "tensor_parallel",
        "launcher": "torch.distributed.run",
        "tensor_parallel": size,
        "world_size": parallel.world_size(),
        "backend": parallel.backend(),
        "devices": [r["device"] for r in ranks],
        "weight_bytes_per_rank": [r["weight_bytes"] for r in ranks],
        "plan": dict(plan),
    }
