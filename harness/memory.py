"""Memory: one-off snapshots and a background sampler with warning/critical thresholds.

Host: process RSS (psutil), the OS peak (ru_maxrss) and available system memory. CUDA: torch's
allocated/reserved and their peaks, and NVML's per-process figure where the NVML bindings are installed
(it also counts memory that torch's allocator does not see, such as CUDA context and cuBLAS workspaces).
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def nvml_process_bytes(pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to this process, summed over devices; None where NVML is not available."""
    try:
        import pynvml
    except ImportError:
        return None
    pid = pid or psutil.Process().pid
    try:
        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return None


def snapshot() -> dict[str, Any]:
    """Memory now, in bytes."""
    vm = psutil.virtual_memory()
    snap: dict[str, Any] = {
        "rss_bytes": psutil.Process().memory_info().rss,
        "ru_maxrss_bytes": _ru_maxrss_bytes(),
        "system_available_bytes": vm.available,
        "system_total_bytes": vm.total,
    }
    if _cuda_ready():
        import torch

        snap.update(
            cuda_allocated_bytes=torch.cuda.memory_allocated(),
            cuda_reserved_bytes=torch.cuda.memory_reserved(),
            cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(),
            cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(),
            cuda_total_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
        )
        nvml = nvml_process_bytes()
        if nvml is not None:
            snap["nvml_process_bytes"] = nvml
        if torch.cuda.device_count() > 1:  # a model spread over GPUs (model.device_map): each device's own peak
            snap["cuda_max_allocated_bytes_per_device"] = {
                f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
            }
    return snap


def reset_cuda_peaks() -> None:
    if _cuda_ready():
        import torch

        torch.cuda.reset_peak_memory_stats()


@dataclass
class Alert:
    t_s: float  # seconds since the monitor started
    level: str  # warning | critical
    message: str


@dataclass
class MemoryMonitor:
    """Samples memory every `interval_s` on a background thread between start() and stop().

    With interval_s=None there is no thread: only the start and end snapshots, the OS peak (ru_maxrss) and
    torch's CUDA peaks. Timed benches use that, because a sampling thread competes with the decode loop for
    the GIL: on an H200 a 5 ms sampler cost a tiny model 25-40% of its decode speed, a 20 ms one 5-15%.
    Thresholds are fractions of the system's memory in use (and of the GPU's memory reserved); crossing one
    logs once per level and records an Alert.
    """

    interval_s: float | None = 0.005
    warn_fraction: float = 0.90
    critical_fraction: float = 0.97
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t_s, rss_bytes)
    alerts: list[Alert] = field(default_factory=list)
    peak_rss_bytes: int = 0
    peak_cuda_reserved_bytes: int = 0
    min_available_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError("interval_s must be > 0, or None for no sampling thread")
        if not 0 < self.warn_fraction <= self.critical_fraction <= 1:
            raise ValueError("thresholds must satisfy 0 < warn_fraction <= critical_fraction <= 1")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._levels_seen: set[str] = set()
        self._process = psutil.Process()  # reused: building one per sample costs more than the sample
        self.start_snapshot: dict[str, Any] = {}
        self.end_snapshot: dict[str, Any] = {}

    def __enter__(self) -> MemoryMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reset_cuda_peaks()
        self.start_snapshot = snapshot()
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._sample()
        if self.interval_s is not None:
            self._thread = threading.Thread(target=self._loop, name="harness-memory", daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        self.end_snapshot = snapshot()
        return self.summary()

    def _loop(self) -> None:
        assert self.interval_s is not None
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        t = time.perf_counter() - self._t0
        rss = self._process.memory_info().rss
        vm = psutil.virtual_memory()
        self.samples.append((t, rss))
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.min_available_bytes = (
            vm.available if self.min_available_bytes is None else min(self.min_available_bytes, vm.available)
        )
        self._check("system memory", 1 - vm.available / vm.total, t)
        if _cuda_ready():
            import torch

            reserved = torch.cuda.memory_reserved()
            self.peak_cuda_reserved_bytes = max(self.peak_cuda_reserved_bytes, reserved)
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            self._check("GPU memory", reserved / total, t)

    def _check(self, what: str, used_fraction: float, t: float) -> None:
        for level, limit in (("critical", self.critical_fraction), ("warning", self.warn_fraction)):
            if used_fraction >= limit:
                key = f"{what}:{level}"
                if key not in self._levels_seen:
                    self._levels_seen.add(key)
                    message = f"{what} {used_fraction:.0%} in use, at or over the {level} threshold of {limit:.0%}"
                    self.alerts.append(Alert(round(t, 4), level, message))
                    (log.error if level == "critical" else log.warning)(message)
                return

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "interval_s": self.interval_s,
            "samples": len(self.samples),
            "rss_start_bytes": self.start_snapshot.get("rss_bytes"),
            "rss_end_bytes": self.end_snapshot.get("rss_bytes"),
            "rss_peak_bytes": self.peak_rss_bytes,
            "ru_maxrss_bytes": self.end_snapshot.get("ru_maxrss_bytes"),
            "system_min_available_bytes": self.min_available_bytes,
            "alerts": [vars(a) for a in self.alerts],
        }
        for key in (
            "cuda_allocated_bytes",
            "cuda_reserved_bytes",
            "cuda_max_allocated_bytes",
            "cuda_max_reserved_bytes",
            "nvml_process_bytes",
        ):
            if key in self.end_snapshot:
                out[key] = self.end_snapshot[key]
        return out
