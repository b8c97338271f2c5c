import time

import pytest

from harness.memory import MemoryMonitor, nvml_process_bytes, snapshot


def test_snapshot_has_host_figures():
    s = snapshot()
    assert s["rss_bytes"] > 0 and s["ru_maxrss_bytes"] >= s["rss_bytes"] * 0.5
    assert 0 < s["system_available_bytes"] <= s["system_total_bytes"]


def test_monitor_samples_in_the_background_and_sees_a_peak():
    with MemoryMonitor(interval_s=0.002) as mon:
        block = bytearray(200 * 2**20)  # 200 MiB, touched so it is resident
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.05)
        del block
        time.sleep(0.02)
    summary = mon.summary()
    assert summary["samples"] >= 10
    assert summary["rss_peak_bytes"] - summary["rss_start_bytes"] > 150 * 2**20
    assert summary["rss_peak_bytes"] >= summary["rss_end_bytes"]
    assert summary["alerts"] == []


def test_thresholds_raise_alerts_once_per_level(caplog):
    with MemoryMonitor(interval_s=0.002, warn_fraction=0.0001, critical_fraction=0.0002) as mon:
        time.sleep(0.02)
    levels = [a.level for a in mon.alerts]
    assert levels == ["critical"]
    assert "critical threshold" in caplog.text
    with MemoryMonitor(interval_s=0.002, warn_fraction=0.0001, critical_fraction=1.0) as mon2:
        time.sleep(0.01)
    assert [a.level for a in mon2.alerts] == ["warning"]


@pytest.mark.parametrize(
    "kwargs", [{"interval_s": 0}, {"warn_fraction": 0.9, "critical_fraction": 0.5}, {"warn_fraction": 0}]
)
def test_bad_monitor_settings(kwargs):
    with pytest.raises(ValueError):
        MemoryMonitor(**kwargs)


def test_nvml_absent_or_no_gpu_gives_none_or_a_number():
    value = nvml_process_bytes()
    assert value is None or value >= 0


def test_monitor_without_a_thread_still_reports_start_end_and_peaks():
    with MemoryMonitor(interval_s=None) as mon:
        time.sleep(0.01)
    s = mon.summary()
    assert s["samples"] == 2 and s["rss_start_bytes"] > 0 and s["ru_maxrss_bytes"] > 0
