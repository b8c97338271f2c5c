"""Peak memory bandwidth of the device a point runs on, for MBU (model bandwidth utilization).

GPUs: the vendor's datasheet figure when the card is in the table below (the source is recorded), else a
measured device-to-device copy. CPUs: a measured copy (bytes read + bytes written), once per machine, cached.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Any

# Datasheet peak memory bandwidth, bytes/s. Source: each vendor's product datasheet / specification page.
GPU_PEAK_BANDWIDTH: dict[str, tuple[float, str]] = {
    "H200": (4.8e12, "NVIDIA H200 Tensor Core GPU datasheet (HBM3e, 4.8 TB/s)"),
    "H100 PCIe": (2.0e12, "NVIDIA H100 datasheet, PCIe (HBM2e, 2.0 TB/s)"),
    "H100 NVL": (3.9e12, "NVIDIA H100 datasheet, NVL (HBM3, 3.9 TB/s)"),
    "H100": (3.35e12, "NVIDIA H100 datasheet, SXM (HBM3, 3.35 TB/s)"),
    "A100-SXM4-80GB": (2.039e12, "NVIDIA A100 datasheet, 80GB SXM (2,039 GB/s)"),
    "A100 80GB PCIe": (1.935e12, "NVIDIA A100 datasheet, 80GB PCIe (1,935 GB/s)"),
    "A100": (1.555e12, "NVIDIA A100 datasheet, 40GB (1,555 GB/s)"),
    "L40S": (864e9, "NVIDIA L40S datasheet (864 GB/s)"),
    "L4": (300e9, "NVIDIA L4 datasheet (300 GB/s)"),
    "A10G": (600e9, "NVIDIA A10G (AWS G5) specification (600 GB/s)"),
    "A10": (600e9, "NVIDIA A10 datasheet (600 GB/s)"),
    "T4": (320e9, "NVIDIA T4 datasheet (320 GB/s)"),
    "V100": (900e9, "NVIDIA V100 datasheet, SXM2 (900 GB/s)"),
    "RTX 4090": (1.008e12, "NVIDIA GeForce RTX 4090 specification (1,008 GB/s)"),
}


def gpu_datasheet(name: str) -> tuple[float, str] | None:
    """The table entry whose key occurs in the device name; the longest key wins (H100 NVL before H100)."""
    for key in sorted(GPU_PEAK_BANDWIDTH, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_BANDWIDTH[key]
    return None


def measure_copy_bandwidth(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Best of `repeats` copies of a buffer, counting bytes read plus bytes written, in bytes/s."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first copy faults the pages in and is not counted
            best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def peak_bandwidth(device: str, cache_dir: Path) -> dict[str, Any]:
    """{"bytes_per_s", "source"} for the device; CPU and unknown GPUs are measured once and cached."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        sheet = gpu_datasheet(name)
        if sheet is not None:
            return {"bytes_per_s": sheet[0], "source": sheet[1], "device_name": name}
        key = f"cuda-{name}"
    else:
        from harness.environment import cpu_model

        name = cpu_model()
        key = f"cpu-{platform.node()}-{name}"
    cache = cache_dir / "bandwidth.json"
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):  # no cache yet, or an unreadable one: measure again
        known = json.loads(cache.read_text())
    if key not in known:
        known[key] = {
            "bytes_per_s": measure_copy_bandwidth("cuda" if device.startswith("cuda") else "cpu"),
            "source": f"measured copy on {name} (read + write bytes, best of 5)",
            "device_name": name,
        }
        from harness.result import write_json_atomic

        write_json_atomic(cache, known)
    return known[key]


def kv_bytes_per_position(config: Any, dtype_bytes: int) -> int:
    """Bytes of K and V cache one sequence position holds across all layers."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def mbu(
    decode_tok_s: float,
    weight_bytes: int,
    kv_bytes_per_pos: int,
    context_tokens: float,
    peak_bytes_per_s: float,
    sequences: float = 1,
) -> float:
    """Bytes read per second over peak bandwidth. A decode step reads all weights once and each sequence's KV
    cache so far, and yields one token per sequence: steps/s = decode_tok_s ÷ sequences."""
    step_bytes = weight_bytes + sequences * kv_bytes_per_pos * context_tokens
    return decode_tok_s / sequences * step_bytes / peak_bytes_per_s
