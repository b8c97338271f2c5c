"""Choice of device and dtype, with the reason recorded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.device={requested!r} but this torch build sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}).",
                "use model.device=auto or cpu, or install a CUDA build of torch on a machine with a GPU.",
            )
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device={requested!r} but only {torch.cuda.device_count()} CUDA device(s) exist.",
                "name a device index that exists, or model.device=cuda.",
            )
    if requested == "mps" and not _mps_available():
        raise ConfigError("model.device='mps' but MPS is not available here.", "use model.device=auto or cpu.")
    return requested


def resolve_dtype(requested: str, device: str) -> tuple[str, str]:
    """The dtype to load in, and why."""
    if requested != "auto":
        if device == "cpu" and requested == "float16":
            return requested, "asked for (float16 matmuls on CPU are slow and some kernels lack them)"
        return requested, "asked for"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this CUDA device supports bfloat16"
        return "float16", "auto: this CUDA device lacks bfloat16"
    if device == "mps":
        return "float16", "auto: float16 on MPS"
    return "float32", "auto: float32 on CPU"


def resolve_placement(device: str, dtype: str) -> Placement:
    dev = resolve_device(device)
    chosen, reason = resolve_dtype(dtype, dev)
    return Placement(device=dev, dtype=chosen, reason=reason)


def synchronize(device: str) -> None:
    """Wait for queued device work, so that a host timestamp taken next ends it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def gpu_count() -> tuple[int, str]:
    """The NVIDIA GPUs this machine has, and how they were counted: this torch's CUDA view, else nvidia-smi (a
    server in an environment of its own may see GPUs a CPU build of torch here does not)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "torch.cuda.device_count()"
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, "no CUDA device in torch and no nvidia-smi"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, "nvidia-smi -L did not answer"
    return sum(1 for line in listed.splitlines() if line.startswith("GPU ")), "nvidia-smi -L"


def check_parallel_devices(needed: int, what: str, fix: str) -> None:
    """ConfigError before a point runs when it needs more GPUs than the machine has."""
    have, counted = gpu_count()
    if have < needed:
        raise ConfigError(
            f"{what} needs {needed} GPUs, and this machine has {have} ({counted}).",
            fix,
        )
