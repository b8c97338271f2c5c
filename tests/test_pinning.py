"""CPU pinning of the load client and of a launched server (Linux affinity): what a process is given is what it
gets, its children inherit it, names of CPUs the machine lacks are refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.errors import ConfigError
from harness.processes import dies_with_this_process, pinned, usable_cpus
from tests.conftest import run_harness

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
AFFINITY = "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), subprocess.run([sys.executable, '-c', "
AFFINITY += "'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout.strip())"


def test_a_launched_process_and_its_children_run_on_the_cpus_given():
    last = {CPUS[-1]}
    done = subprocess.run(
        [sys.executable, "-c", AFFINITY], capture_output=True, text=True, preexec_fn=dies_with_this_process(cpus=last)
    )
    assert done.stdout.split() == [f"[{CPUS[-1]}]", f"[{CPUS[-1]}]"], done.stderr


def test_the_client_is_pinned_for_the_block_and_unpinned_after():
    before = os.sched_getaffinity(0)
    with pinned({CPUS[0]}):
        assert os.sched_getaffinity(0) == {CPUS[0]}
    assert os.sched_getaffinity(0) == before
    with pinned(None):
        assert os.sched_getaffinity(0) == before


def test_cpus_the_process_may_not_use_are_refused_with_the_ones_it_may():
    assert usable_cpus(None, "bench.client_cpus") is None
    assert usable_cpus(CPUS[:1], "bench.client_cpus") == {CPUS[0]}
    with pytest.raises(ConfigError, match=r"bench.client_cpus=\[4096\].*may use"):
        usable_cpus([4096], "bench.client_cpus")


def test_bad_cpus_exit_2_before_any_server_starts(tmp_path):
    done = run_harness(tmp_path, "model=tiny-qwen2", "bench=serve", "bench.client_cpus=[4096]")
    assert done.returncode == 2 and "bench.client_cpus" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("server.log"))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["bench=latency", "engine.cpus=[0]"], "launches none"),  # an in-process engine: no server to pin
        (["bench=serve", "bench.target=url", "bench.base_url=http://127.0.0.1:9/v1", "engine.cpus=[0]"], "none"),
        (["bench=serve", "engine.cpus=[]"], "engine.cpus"),
        (["bench=serve", "bench.client_cpus=[-1]"], "bench.client_cpus"),
    ],
)
def test_pinning_that_cannot_apply_is_refused(compose, overrides, says):
    with pytest.raises(ConfigError, match=says):
        compose("model=tiny-qwen2", *overrides)
