"""Energy from hardware counters and the price of throughput. This machine has no GPU and no RAPL, so the RAPL
reader runs against a powercap tree of the test's own (the kernel's file layout, written by a thread at a known
power); NVML and amdsmi are exercised on a GPU machine (scripts/gpu_check.sh)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from harness.cost import cost_figures
from harness.energy import Counter, describe, find_counters, open_meter, phase_figures
from harness.errors import ConfigError
from runners import run_point
from tests.conftest import run_harness
from tests.mock_openai import MockServer
from tests.test_replay import answer, serve_point, usage

WRAP_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def powercap(root: Path, packages: int = 1) -> list[Path]:
    """A powercap tree: packages with a subzone each (the subzone is inside its package's energy)."""
    files = []
    for p in range(packages):
        zone = root / f"intel-rapl:{p}"
        (zone / f"intel-rapl:{p}:0").mkdir(parents=True)
        (zone / "name").write_text(f"package-{p}\n")
        (zone / "max_energy_range_uj").write_text(f"{WRAP_UJ}\n")
        (zone / "energy_uj").write_text("1000\n")
        (zone / f"intel-rapl:{p}:0" / "energy_uj").write_text("5\n")
        files.append(zone / "energy_uj")
    return files


class Burner(threading.Thread):
    """Advances a RAPL counter as a package drawing `watts` would, starting near the wrap so it wraps."""

    def __init__(self, path: Path, watts: float) -> None:
        super().__init__(daemon=True)
        self.path, self.watts, self.stop = path, watts, threading.Event()
        self.start_uj = WRAP_UJ - int(watts * 1e6 * 0.3)  # wraps 0.3 s in
        path.write_text(f"{self.start_uj}\n")

    def run(self) -> None:
        t0 = time.perf_counter()
        spare = self.path.with_suffix(".next")
        while not self.stop.wait(0.005):  # replaced whole, as the kernel's file reads: never half-written
            spare.write_text(f"{int(self.start_uj + self.watts * 1e6 * (time.perf_counter() - t0)) % WRAP_UJ}\n")
            os.replace(spare, self.path)


def test_rapl_packages_are_found_and_their_subzones_are_not_counted_twice(tmp_path):
    powercap(tmp_path, packages=2)
    counters, missing = find_counters(str(tmp_path))
    assert [c.name for c in counters] == ["rapl:package-0", "rapl:package-1"]
    assert counters[0].wrap_j == pytest.approx(WRAP_UJ / 1e6)
    assert any(m.startswith("NVML") for m in missing) and not any(m.startswith("RAPL") for m in missing)


def test_a_machine_without_counters_says_why_and_energy_on_is_refused(tmp_path):
    counters, missing = find_counters(str(tmp_path / "absent"))
    assert counters == [] and any("modprobe intel_rapl_common" in m for m in missing)
    with pytest.raises(ConfigError, match="energy=on.*RAPL"):
        open_meter("on", 0.0, str(tmp_path / "absent"))
    meter = open_meter("auto", 0.0, str(tmp_path / "absent"))
    assert meter is not None and describe(meter, "auto")["measured"] is False
    assert phase_figures(meter, "phase=load") == {}  # no counter: no figure, never a zero
    assert open_meter("off", 0.0) is None


def test_a_wrapping_counter_and_a_reset_counter_are_both_handled():
    readings = iter([WRAP_UJ / 1e6 - 2.0, 3.0, 10.0])  # 2 J to the wrap, then 3 J past it, then 7 J more
    rapl = Counter("rapl:package-0", lambda: next(readings), WRAP_UJ / 1e6)
    assert [rapl.advance() for _ in range(3)] == pytest.approx([0.0, 5.0, 12.0])
    readings2 = iter([500.0, 520.0, 4.0, 9.0])  # the driver reloaded between 520 and 4
    nvml = Counter("nvml:gpu0", lambda: next(readings2))
    assert [nvml.advance() for _ in range(4)] == pytest.approx([0.0, 20.0, 24.0, 29.0])
    assert nvml.resets == 1 and rapl.resets == 0


def test_joules_follow_a_known_power_across_a_wrap(tmp_path):
    (path,) = powercap(tmp_path)
    burner = Burner(path, watts=40.0)
    burner.start()
    try:
        meter = open_meter("on", 0.4, str(tmp_path))  # the idle baseline: 0.4 s at 40 W
        assert meter is not None
        meter.mark("phase=measure:start")
        time.sleep(0.5)
        meter.mark("phase=measure:end")
        meter.stop_sampling()
    finally:
        burner.stop.set()
        burner.join()
    figures = phase_figures(meter, "phase=measure", tokens=100)
    assert figures["mean_power_w[phase=measure]"]["mean"] == pytest.approx(40.0, rel=0.1)
    assert figures["energy_j[phase=measure]"]["mean"] == pytest.approx(20.0, rel=0.1)
    assert figures["joules_per_token[phase=measure]"]["mean"] == pytest.approx(0.2, rel=0.1)
    assert abs(figures["energy_above_idle_j[phase=measure]"]["mean"]) < 2.0  # it drew its idle power throughout
    assert meter.idle_w == pytest.approx(40.0, rel=0.1)
    assert describe(meter, "on") == {"measured": True, "sources": ["rapl:package-0"], "idle_w": meter.idle_w,
                                     "not_read": meter.missing}  # fmt: skip


def test_a_point_records_energy_per_phase_and_its_telemetry(tmp_path, compose, monkeypatch):
    (path,) = powercap(tmp_path / "powercap")
    monkeypatch.setattr("harness.energy.RAPL_ROOT", str(tmp_path / "powercap"))
    monkeypatch.setattr("harness.energy.TELEMETRY_INTERVAL_S", 0.05)
    burner = Burner(path, watts=25.0)
    burner.start()
    try:
        cfg = compose("model=tiny-qwen2", "bench=latency", "bench.prompt_lengths=[16]", "bench.max_new_tokens=4",
                      "bench.min_runs=3", "bench.max_runs=3", "bench.min_seconds=0", "energy=on",
                      "energy_idle_s=0.2")  # fmt: skip
        result = run_point(cfg, tmp_path / "point")
    finally:
        burner.stop.set()
        burner.join()
    assert result.status == "ok", result.error
    m = result.metrics
    for key in ("phase=load", "phase=measure", "prompt=16"):
        assert m[f"mean_power_w[{key}]"]["mean"] == pytest.approx(25.0, rel=0.2), key
    # The warm-up lasts milliseconds, a few of the test counter's 5 ms steps: present, not precise.
    assert m["energy_j[phase=warmup]"]["mean"] >= 0 and "mean_power_w[phase=warmup]" in m
    assert m["joules_per_token[prompt=16]"]["unit"] == "J/token" and m["idle_power_w"]["mean"] > 0
    assert result.details["energy"]["sources"] == ["rapl:package-0"]
    lines = (tmp_path / "point" / "telemetry.csv").read_text().splitlines()
    assert lines[0] == "t_s,source,power_w" and len(lines) > 3
    # One 50 ms row can be off by a few of the test counter's late 5 ms steps on a busy 2-core machine; the rows'
    # median is the telemetry's claim.
    powers = sorted(float(line.split(",")[2]) for line in lines[1:])
    assert powers[len(powers) // 2] == pytest.approx(25.0, rel=0.2)


def test_without_a_counter_a_point_says_so_and_has_no_energy_figure(tmp_path, compose, monkeypatch):
    monkeypatch.setattr("harness.energy.RAPL_ROOT", str(tmp_path / "absent"))
    cfg = compose("model=tiny-qwen2", "bench=smoke")
    result = run_point(cfg, tmp_path / "point")
    assert result.status == "ok", result.error
    energy = result.details["energy"]
    assert energy["measured"] is False and any("RAPL" in m for m in energy["missing"])
    assert not any(k.startswith(("energy_j", "mean_power_w", "joules_per")) for k in result.metrics)
    assert not (tmp_path / "point" / "telemetry.csv").exists()
    from analysis.__main__ import main as analysis_main

    assert analysis_main([str(tmp_path)]) == 0  # the report says why, beside the machine it ran on
    assert "not measured: no energy counter can be read here" in (tmp_path / "report.html").read_text()


def test_energy_on_without_a_counter_exits_2_before_anything_loads(tmp_path):
    done = run_harness(tmp_path, "model=tiny-qwen2", "bench=smoke", "energy=on")
    assert done.returncode == 2 and "energy=on" in done.stderr and "Traceback" not in done.stderr


def test_prices_follow_the_throughput(tmp_path):
    with MockServer({"m": answer(usage(5, 3), {"content": "a"}, {"content": "b"}, {"content": "c"})}) as server:
        result = serve_point(tmp_path, server, "bench.num_requests=4", "bench.concurrency=[2]", "bench.rates=[]",
                             "cost.per_hour=3.6", "cost.currency=EUR")  # fmt: skip
    m = result.metrics
    tok_s = m["output_tok_s[concurrency=2]"]["mean"]
    assert m["cost_per_mtok[concurrency=2]"]["mean"] == pytest.approx(1000 / tok_s)  # 3.6/h = 1e-3 per second
    assert m["cost_per_mtok[concurrency=2]"]["unit"] == "EUR"
    assert m["cost_per_1k_good[concurrency=2]"]["mean"] == pytest.approx(1 / m["goodput_rps[concurrency=2]"]["mean"])
    assert result.details["cost"] == {"per_hour": 3.6, "currency": "EUR", "per": "machine", "hourly": 3.6}


def test_a_price_per_gpu_counts_the_gpus_and_a_zero_throughput_has_no_price():
    metrics = {"output_tok_s[batch=8]": {"mean": 1000.0}, "output_tok_s[batch=1]": {"mean": 0.0}}
    figures, how = cost_figures(metrics, 2.0, "USD", "gpu", 4)
    assert figures["cost_per_mtok[batch=8]"]["mean"] == pytest.approx(8.0 / 3600 / 1000 * 1e6)
    assert "cost_per_mtok[batch=1]" not in figures and how["hourly"] == 8.0
    _, cpu = cost_figures(metrics, 2.0, "USD", "gpu", 0)
    assert "used no GPU" in cpu["note"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["cost.per_hour=-2", "cost.currency=USD"], "cost.per_hour"),
        (["cost.per_hour=2"], "no currency"),
        (["cost.per_hour=2", "cost.currency=usd"], "ISO 4217"),
        (["cost.per=rack"], "cost.per"),
        (["energy=maybe"], "energy"),
        (["energy_idle_s=-1"], "energy_idle_s"),
    ],
)
def test_bad_cost_and_energy_settings_are_refused(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        compose("model=tiny-qwen2", *overrides)
