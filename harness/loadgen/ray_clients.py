"""One level's load from Ray actors, for a server one client host cannot load (bench.client_hosts=N, the `ray`
extra): each actor sends its share of one absolute schedule, all from one start time.

Each actor lives in a process of its own (on another node where the cluster has several: the SPREAD strategy) and
keeps time by its own perf_counter. Before a level the driver measures each actor's clock against its own, the
way NTP does: of CLOCK_PINGS round trips, the one with the least round-trip time gives the offset (the actor's
reading minus the midpoint of the driver's send and receive) with half that round trip as its uncertainty. The
level's start is sent to each actor in its own clock, and every time its records carry (schedule, send, end,
chunks) comes back in the driver's, so the level's figures and samples.csv are one timeline. The actors' own
lateness is kept apart (details.client.actors): a level where any actor fell behind its schedule is flagged, as
the single client's self-check flags its own.

On one host every actor's perf_counter reads the same system-wide monotonic clock: the measured offsets are then
within their uncertainty of zero, which the tests use as the check of the method.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from harness.errors import ConfigError, InferenceError
from harness.loadgen.client import RequestRecord
from harness.loadgen.figures import LATENESS_P99_MS

CLOCK_PINGS = 25
START_AHEAD_S = 3.0  # the shared start lies this far ahead of the last clock measurement (the shares must arrive)


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "bench.client_hosts sends a level's load from Ray actors, and Ray is not installed here.",
            "pip install -e '.[ray]', or bench.client_hosts=1 (bench.client_workers spreads load over processes of "
            "this machine).",
        ) from None
    return ray


@dataclass
class ActorClock:
    offset_s: float  # the actor's perf_counter minus the driver's, at the same instant
    uncertainty_s: float  # half the round trip of the ping that gave the offset


def _actor_class(ray: Any) -> Any:
    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    class LoadActor:
        def __init__(self) -> None:
            import aiohttp  # noqa: F401 - imported now, not in the seconds before the shared start

            from harness.loadgen.load import _run_share

            self.run_share = _run_share
            with contextlib.suppress(OSError):  # a cluster's workers run niced (15): a client would fall behind
                os.setpriority(os.PRIO_PROCESS, 0, 0)
            self.niceness = os.getpriority(os.PRIO_PROCESS, 0)

        def clock(self) -> float:
            return time.perf_counter()

        def nice(self) -> int:
            return self.niceness

        def run(self, plan: Any) -> Any:
            return self.run_share(plan)

    return LoadActor


def measure_clock(ray: Any, actor: Any, pings: int = CLOCK_PINGS) -> ActorClock:
    best: ActorClock | None = None
    for _ in range(pings):
        sent = time.perf_counter()
        theirs = ray.get(actor.clock.remote())
        back = time.perf_counter()
        sample = ActorClock(theirs - (sent + back) / 2, (back - sent) / 2)
        if best is None or sample.uncertainty_s < best.uncertainty_s:
            best = sample
    assert best is not None
    return best


def _shifted(record: RequestRecord, by: float) -> RequestRecord:
    """A record's times moved by `by` seconds (from the actor's clock to the driver's)."""
    record.t_sched += by
    if record.t_send:
        record.t_send += by
    if record.t_end:
        record.t_end += by
    record.chunks = [replace(c, t=c.t + by) for c in record.chunks]
    return record


def run_on_actors(shares: list[tuple[list[int], Any]], hosts: int, address: str | None) -> tuple[list, dict[str, Any]]:
    """Each (indexes, LevelPlan) share on an actor of its own; the outcomes as run_level_here gives them (records in
    the driver's clock, indexes back in the level's numbering) and the actors' report."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # A local instance's workers at normal priority (Ray's default niceness 15 made actors' sends 60-120 ms late
        # on a busy 2-core machine, against 2-3 ms from this process).
        local = {"num_cpus": max(hosts, 1), "_system_config": {"worker_niceness": 0}}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **({} if address else local))
    actor_class = _actor_class(ray)
    actors = [actor_class.remote() for _ in shares]
    try:
        clocks = [measure_clock(ray, a) for a in actors]
        niceness = ray.get([a.nice.remote() for a in actors])
        t0 = time.perf_counter() + START_AHEAD_S
        pending = [a.run.remote(replace(plan, t0=t0 + c.offset_s)) for a, (_, plan), c in zip(actors, shares, clocks,
                                                                                             strict=True)]  # fmt: skip
        try:
            outcomes = ray.get(pending)
        except ray.exceptions.RayError as exc:  # an actor (or its node) died mid-level: the level has no figures
            cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InferenceError(
                f"a client actor of this level died before the level ended ({type(exc).__name__}: {cause}).",
                "check the Ray cluster's nodes (ray status) and rerun; the points that finished are kept.",
            ) from None
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    merged, report = [], []
    for n, ((idx, _), clock, (records, lags, cpu, wall, stopped)) in enumerate(zip(shares, clocks, outcomes,
                                                                                   strict=True)):  # fmt: skip
        for r in records:
            r.index = idx[r.index]
            _shifted(r, -clock.offset_s)
        lateness = sorted((r.t_send - r.t_sched) * 1e3 for r in records if r.t_send)
        p99 = lateness[min(len(lateness) - 1, int(0.99 * len(lateness)))] if lateness else 0.0
        report.append({"actor": n, "requests": len(records), "clock_offset_ms": clock.offset_s * 1e3,
                       "clock_uncertainty_ms": clock.uncertainty_s * 1e3, "lateness_p99_ms": p99,
                       "niceness": niceness[n],
                       "behind": p99 > LATENESS_P99_MS})  # fmt: skip
        merged.append((records, lags, cpu, wall, stopped))
    return merged, {"t0": t0, "actors": report, "behind": [a["actor"] for a in report if a["behind"]]}
