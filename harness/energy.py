"""Energy from hardware counters: NVIDIA GPUs (NVML's total-energy counter), AMD GPUs (amdsmi's energy
accumulator) and CPU packages (Linux RAPL under /sys/class/powercap). Nothing here estimates: where no counter can
be read, the point says so and names what would let it read one.

A counter is read at marks (a phase's start and end, a serve level's); the joules between two marks are the sum
over the counters of their change. A RAPL counter wraps at its max_energy_range_uj; a change that goes backwards is
taken as one wrap. An NVML or amdsmi counter that goes backwards was reset (a driver reload): the reading after the
reset counts from zero, and the reset is recorded. The idle baseline is the mean power over a short wait before the
point loads its model; `above_idle_j` subtracts it over the phase's duration.

A sampler thread writes power, clocks, temperature, utilisation and memory to telemetry.csv once a second (a
handful of NVML calls, tens of microseconds, which ctypes makes without holding the interpreter), and any thermal
or power throttling an NVIDIA GPU reports is flagged.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.stats import summarize

RAPL_ROOT = "/sys/class/powercap"  # tests point this at a tree of their own
TELEMETRY_INTERVAL_S = 1.0


@dataclass
class Counter:
    """One energy counter: its name, how to read it (joules, cumulative), and how it wraps."""

    name: str
    read_j: Any  # () -> float
    wrap_j: float | None = None  # RAPL: the counter's range; None: a counter that does not wrap (a reset is a reset)
    telemetry: Any = None  # () -> dict of power/clock/temperature readings, where the source has them
    last: float | None = None
    total: float = 0.0
    resets: int = 0

    def advance(self) -> float:
        """Read, and add the change since the previous reading to the running total (wraps and resets
        handled); returns the running total in joules."""
        now = self.read_j()
        if self.last is not None:
            change = now - self.last
            if change < 0:
                if self.wrap_j:  # a RAPL counter passed its range once
                    change += self.wrap_j
                else:  # reset: the counter started again from zero
                    change = now
                    self.resets += 1
            self.total += change
        self.last = now
        return self.total


def _rapl_counters(root: str) -> tuple[list[Counter], str | None]:
    zones = sorted(glob.glob(os.path.join(root, "intel-rapl:*")))
    zones = [z for z in zones if os.path.basename(z).count(":") == 1]  # packages; their subzones are inside them
    if not zones:
        why = (
            f"{root} is absent (a virtual machine, or a kernel without the intel_rapl driver)"
            if not os.path.isdir(root)
            else f"{root} has no intel-rapl zone (an AMD CPU needs a kernel with its RAPL support)"
        )
        return [], f"RAPL: {why}; on bare metal load it with `modprobe intel_rapl_common`"
    counters = []
    for zone in zones:
        path = os.path.join(zone, "energy_uj")
        try:
            wrap = int(Path(zone, "max_energy_range_uj").read_text()) / 1e6
            Path(path).read_text()
        except PermissionError:
            return [], (
                f"RAPL: {path} is readable by root only (since Linux 5.10); grant read access "
                "(`chmod o+r` on the energy_uj files, or a udev rule) to measure CPU energy"
            )
        except (OSError, ValueError) as exc:
            return [], f"RAPL: {path} cannot be read ({exc})"
        label = Path(zone, "name").read_text().strip() if Path(zone, "name").exists() else os.path.basename(zone)

        def read(path: str = path) -> float:
            return int(Path(path).read_text()) / 1e6

        counters.append(Counter(f"rapl:{label}", read, wrap))
    return counters, None


def _nvml_counters() -> tuple[list[Counter], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "NVML: nvidia-ml-py is not installed (pip install -e '.[nvml]') or there is no NVIDIA GPU"
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as exc:
        return [], f"NVML: no NVIDIA driver answered ({exc})"
    if not handles:
        return [], "NVML: no NVIDIA GPU"
    counters = []
    for i, handle in enumerate(handles):
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as exc:
            return [], f"NVML: GPU {i} has no energy counter ({exc}; it needs a Volta or newer GPU)"

        def read(handle: Any = handle) -> float:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # millijoules

        counters.append(Counter(f"nvml:gpu{i}", read, None, _nvml_telemetry(pynvml, handle)))
    return counters, None


def _nvml_telemetry(pynvml: Any, handle: Any) -> Any:
    def sample() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, call in (
            ("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3),
            ("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
            ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            ("utilization_pct", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            ("memory_used_mib", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20),
            ("throttle_reasons", lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        ):
            with contextlib.suppress(Exception):  # a reading this GPU or driver lacks is left out
                out[key] = call()
        return out

    return sample


def _amd_counters() -> tuple[list[Counter], str | None]:
    try:
        import amdsmi
    except ImportError:
        return [], "amdsmi: not installed (it comes with ROCm) or there is no AMD GPU"
    try:
        amdsmi.amdsmi_init()
        handles = amdsmi.amdsmi_get_processor_handles()
    except Exception as exc:  # amdsmi raises its own error types
        return [], f"amdsmi: no AMD driver answered ({exc})"
    if not handles:
        return [], "amdsmi: no AMD GPU"
    counters = []
    for i, handle in enumerate(handles):

        def read(handle: Any = handle) -> float:
            e = amdsmi.amdsmi_get_energy_count(handle)
            return e["energy_accumulator"] * e["counter_resolution"] / 1e6  # microjoules per count

        counters.append(Counter(f"amdsmi:gpu{i}", read))
    return counters, None


def find_counters(rapl_root: str | None = None) -> tuple[list[Counter], list[str]]:
    """The energy counters this machine lets the harness read, and why each kind it cannot read is missing."""
    counters: list[Counter] = []
    missing: list[str] = []
    for found, why in (_nvml_counters(), _amd_counters(), _rapl_counters(rapl_root or RAPL_ROOT)):
        counters += found
        if why:
            missing.append(why)
    return counters, missing


THROTTLE_MASK = 0x0004 | 0x0020 | 0x0040 | 0x0080  # NVML: SW power cap, SW/HW thermal slowdown, power brake


@dataclass
class EnergyMeter:
    """Marks on the counters, the joules between them, and a telemetry sampler."""

    counters: list[Counter]
    missing: list[str]
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (time, joules so far)
    idle_w: float | None = None
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def total_j(self) -> float:
        return sum(c.advance() for c in self.counters)

    def mark(self, label: str) -> None:
        self.marks[label] = (time.perf_counter(), self.total_j())

    def between(self, start: str, end: str) -> dict[str, float] | None:
        """joules, seconds, mean watts and (with an idle baseline) joules above idle between two marks."""
        if start not in self.marks or end not in self.marks:
            return None
        (t0, j0), (t1, j1) = self.marks[start], self.marks[end]
        seconds, joules = t1 - t0, j1 - j0
        out = {"joules": joules, "seconds": seconds, "mean_w": joules / seconds if seconds > 0 else 0.0}
        if self.idle_w is not None:
            out["above_idle_j"] = joules - self.idle_w * seconds
        return out

    def measure_idle(self, seconds: float) -> None:
        """The idle baseline: mean power over `seconds` of waiting (before the point loads anything)."""
        self.mark("idle_start")
        time.sleep(seconds)
        self.mark("idle_end")
        idle = self.between("idle_start", "idle_end")
        self.idle_w = idle["mean_w"] if idle else None

    def start_sampling(self, interval_s: float) -> None:
        samplers = [(c.name, c.telemetry) for c in self.counters if c.telemetry is not None]
        rapl = [c for c in self.counters if c.name.startswith("rapl:")]
        if not samplers and not rapl:
            return

        def run() -> None:
            t_prev, j_prev = time.perf_counter(), {c.name: c.read_j() for c in rapl}
            while not self._stop.wait(interval_s):
                now = time.perf_counter()
                for name, sample in samplers:
                    self.telemetry.append({"t": now, "source": name, **sample()})
                for c in rapl:  # RAPL has no power reading: the energy change over the interval
                    j = c.read_j()
                    change = j - j_prev[c.name] + (c.wrap_j or 0.0) * (j < j_prev[c.name])
                    self.telemetry.append({"t": now, "source": c.name, "power_w": change / (now - t_prev)})
                    j_prev[c.name] = j
                t_prev = now

        self._thread = threading.Thread(target=run, name="harness-telemetry", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def throttled(self) -> list[str]:
        """The sources that reported thermal or power throttling while sampled."""
        return sorted(
            {row["source"] for row in self.telemetry if int(row.get("throttle_reasons") or 0) & THROTTLE_MASK}
        )

    def write_telemetry(self, path: Path, t0: float) -> None:
        if not self.telemetry:
            return
        columns = ["t_s", "source", *sorted({k for row in self.telemetry for k in row} - {"t", "source"})]
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in self.telemetry:
                writer.writerow([round(row["t"] - t0, 3), row["source"], *(row.get(c, "") for c in columns[2:])])


def open_meter(mode: str, idle_s: float, rapl_root: str | None = None) -> EnergyMeter | None:
    """The point's meter: None with energy=off; with energy=on and no counter, a ConfigError naming what would
    give one. The idle baseline is measured here, before anything loads."""
    if mode == "off":
        return None
    counters, missing = find_counters(rapl_root)
    if not counters and mode == "on":
        raise ConfigError(
            "energy=on, and no energy counter can be read on this machine: " + "; ".join(missing) + ".",
            "run with energy=auto (the result then says energy was not measured, and why), or enable one of "
            "the counters above.",
        )
    meter = EnergyMeter(counters, missing)
    if counters:
        meter.measure_idle(idle_s)
        meter.start_sampling(TELEMETRY_INTERVAL_S)
    return meter


def check_energy(mode: str, rapl_root: str | None = None) -> None:
    """energy=on is refused before anything runs where no counter can be read (ConfigError)."""
    if mode == "on" and not find_counters(rapl_root)[0]:
        open_meter(mode, 0.0, rapl_root)


def phase_figures(meter: EnergyMeter, key: str, tokens: float | None = None) -> dict[str, dict[str, Any]]:
    """energy_j, mean_power_w, energy_above_idle_j and (given the tokens produced) joules_per_token of the span
    between the marks `<key>:start` and `<key>:end`, keyed with it."""
    span = meter.between(f"{key}:start", f"{key}:end")
    if span is None or not meter.counters:
        return {}
    out = {
        f"energy_j[{key}]": summarize([span["joules"]], "J"),
        f"mean_power_w[{key}]": summarize([span["mean_w"]], "W"),
    }
    if "above_idle_j" in span:
        out[f"energy_above_idle_j[{key}]"] = summarize([span["above_idle_j"]], "J")
    if tokens:
        out[f"joules_per_token[{key}]"] = summarize([span["joules"] / tokens], "J/token")
    return out


def describe(meter: EnergyMeter | None, mode: str) -> dict[str, Any]:
    """details.energy: the sources read (with resets), the idle baseline, throttling; or why nothing was read."""
    if meter is None:
        return {"measured": False, "why": "energy=off"}
    if not meter.counters:
        return {"measured": False, "why": "no energy counter can be read here", "missing": meter.missing,
                "note": "no figure is estimated: energy figures appear only where a counter was read"}  # fmt: skip
    out: dict[str, Any] = {"measured": True, "sources": [c.name for c in meter.counters], "idle_w": meter.idle_w,
                           "not_read": meter.missing}  # fmt: skip
    resets = {c.name: c.resets for c in meter.counters if c.resets}
    if resets:
        out["counter_resets"] = resets
    throttled = meter.throttled()
    if throttled:
        out["throttled"] = throttled
        out["warning"] = (
            f"{', '.join(throttled)} throttled (thermal or power) during the point: its speed figures are low"
        )
    return out
