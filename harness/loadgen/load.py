"""Load patterns: closed loop (C clients, each sending when its last request ends) and open loop (sends at the
absolute times of a seeded schedule: constant, poisson or gamma gaps, an optional linear ramp-up), on one asyncio
loop per client process, with the client's own event-loop lag and CPU measured alongside.

Request bodies are built before a level starts, so nothing but sending and reading runs while it is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.loadgen.client import Endpoint, RequestRecord, new_session, send
from harness.loadgen.figures import Level

TICK_S = 0.010  # the lag ticker's period


@dataclass
class Planned:
    """One request ready to send: its path and body, and what the client knows of it."""

    path: str
    body: dict[str, Any]
    max_tokens: int
    prompt_tokens: int | None = None
    forced: bool = True  # min_tokens = max_tokens was asked
    case: int | None = None  # graded load: the index of the expectation its answer is judged against


def arrival_offsets(
    n: int, rate: float, pattern: str, seed: int, burstiness: float = 1.0, ramp_up_s: float = 0.0
) -> list[float]:
    """Send times (seconds from the level's start) of n requests at `rate` per second: constant gaps of 1/rate,
    exponential gaps (poisson), or gamma gaps of shape `burstiness` and mean 1/rate (shape 1 is Poisson, below 1
    burstier). With a ramp-up, the rate rises linearly from 0 to `rate` over ramp_up_s: the same unit-mean gaps
    are laid on that rising rate (the arrival count up to t is rate·t²/(2·ramp) during the ramp)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(seed)
    work, offsets = 0.0, []
    for i in range(n):
        if pattern == "constant":
            gap = 1.0 if i else 0.0
        elif pattern == "poisson":
            gap = rng.expovariate(1.0)
        elif pattern == "gamma":
            gap = rng.gammavariate(burstiness, 1.0 / burstiness)
        else:
            raise ValueError(f"unknown arrival pattern {pattern!r}")
        work += gap
        offsets.append(_time_of(work, rate, ramp_up_s))
    return offsets


def _time_of(work: float, rate: float, ramp_s: float) -> float:
    """The time at which `work` expected arrivals have accumulated under a rate that ramps to `rate`."""
    if ramp_s <= 0:
        return work / rate
    during = rate * ramp_s / 2
    if work <= during:
        return math.sqrt(2 * ramp_s * work / rate)
    return ramp_s + (work - during) / rate


SPIN_S = 0.0015  # the last stretch before a send is waited out by yielding, not by the selector's timeout
WAKE_S = 0.020  # a long wait first ends this far ahead: waking from a long idle sleep can itself be ms late


async def wait_until(t: float) -> None:
    """Sleep until perf_counter() reaches t. The event loop's selector rounds a timeout up to whole milliseconds,
    which alone made sends about 1 ms late, and the first wake-up after seconds of idling came 2-4 ms late here (a
    virtual machine's timer, an idle core): a long wait wakes WAKE_S early, sleeps again to SPIN_S before t, and
    spends the rest yielding to the loop (other requests' chunks are still read), at most SPIN_S of CPU a send."""
    while (left := t - time.perf_counter()) > WAKE_S:
        await asyncio.sleep(left - WAKE_S)
    await asyncio.sleep(max(0.0, t - time.perf_counter() - SPIN_S))
    while time.perf_counter() < t:
        await asyncio.sleep(0)


# The records of the level running in this process, for a progress display to count from another thread (sent,
# finished); the load loop only publishes the list, it never waits for a reader.
running_level: list[list[RequestRecord]] = []


async def lag_ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, (time.perf_counter() - t - TICK_S) * 1e3))


def _record(i: int, plan: Planned, t_sched: float, warmup: bool = False) -> RequestRecord:
    return RequestRecord(i, t_sched, plan.max_tokens, plan.prompt_tokens, warmup=warmup, forced=plan.forced)


async def warm_up(endpoint: Endpoint, plans: list[Planned]) -> list[RequestRecord]:
    """Requests one after another before the measured levels (server caches, compiled kernels, connections)."""
    records = []
    async with new_session(endpoint) as session:
        for i, plan in enumerate(plans):
            record = _record(i, plan, time.perf_counter(), warmup=True)
            await send(session, endpoint, plan.path, plan.body, record)
            records.append(record)
    return records


async def run_closed(
    endpoint: Endpoint,
    plans: list[Planned],
    concurrency: int,
    duration_s: float | None,
    ramp_up_s: float = 0.0,
    t0: float | None = None,
) -> tuple[list[RequestRecord], list[float], float, float]:
    """`concurrency` clients share `plans` in order, each sending when its previous request ends, until the plans
    or `duration_s` run out; client c starts at c/concurrency of the ramp-up. No schedule: t_sched = t_send."""
    lags: list[float] = []
    stop = asyncio.Event()
    records: list[RequestRecord] = []
    running_level[:] = [records]
    cursor = iter(range(len(plans)))
    cpu0 = time.process_time()
    start = t0 if t0 is not None else time.perf_counter()
    deadline = start + duration_s if duration_s else math.inf

    async def client(c: int, session: Any) -> None:
        # Every client waits for the shared start (other client processes share it), then its share of the ramp.
        await asyncio.sleep(max(0.0, start + ramp_up_s * c / concurrency - time.perf_counter()))
        for i in cursor:
            if time.perf_counter() >= deadline:
                return
            record = _record(i, plans[i], time.perf_counter())
            records.append(record)
            await send(session, endpoint, plans[i].path, plans[i].body, record)
            record.t_sched = record.t_send

    ticker = asyncio.create_task(lag_ticker(lags, stop))
    async with new_session(endpoint) as session:
        await asyncio.gather(*(client(c, session) for c in range(concurrency)))
    stop.set()
    await ticker
    return sorted(records, key=lambda r: r.index), lags, time.process_time() - cpu0, time.perf_counter() - start


async def run_open(
    endpoint: Endpoint,
    plans: list[Planned],
    offsets: list[float],
    max_concurrency: int | None,
    duration_s: float | None,
    backlog_limit: int | None,
    t0: float | None = None,
) -> tuple[list[RequestRecord], list[float], float, float, str | None]:
    """Send plans[i] at t0 + offsets[i] (absolute: a late send does not push the later ones back). A concurrency
    cap delays sends (counted as lateness). When more than `backlog_limit` requests are in flight the server is
    saturated: no more are sent and those in flight are cancelled (status "cancelled"); the reason is returned."""
    lags: list[float] = []
    stop = asyncio.Event()
    records = [_record(i, plan, 0.0) for i, plan in enumerate(plans)]
    running_level[:] = [records]
    cap = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = 0
    saturated: list[str] = []
    cpu0 = time.process_time()
    start = t0 if t0 is not None else time.perf_counter() + 0.05  # a moment to create the tasks before the first
    for r, offset in zip(records, offsets, strict=True):
        r.t_sched = start + offset

    async def one(record: RequestRecord, session: Any) -> None:
        nonlocal in_flight
        await wait_until(record.t_sched)
        if duration_s and record.t_sched - start > duration_s:
            record.status = "past_duration"  # scheduled after the level's end: not part of it
            return
        if saturated:
            record.status, record.error = "not_sent", "not sent: the level stopped at saturation"
            return
        if backlog_limit and in_flight >= backlog_limit:
            saturated.append(
                f"{in_flight} requests were in flight at {record.t_sched - start:.1f} s when the next was due "
                f"(bench.saturation_backlog={backlog_limit}): the server fell behind the offered rate"
            )
            record.status = "not_sent"
            for task in tasks:
                if not task.done() and task is not asyncio.current_task():
                    task.cancel()
            return
        if cap is not None:
            await cap.acquire()
        in_flight += 1
        try:
            plan = plans[record.index]
            await send(session, endpoint, plan.path, plan.body, record)
        except asyncio.CancelledError:
            record.status, record.error, record.t_end = "cancelled", "cancelled: the level stopped at saturation", 0.0
        finally:
            in_flight -= 1
            if cap is not None:
                cap.release()

    ticker = asyncio.create_task(lag_ticker(lags, stop))
    async with new_session(endpoint) as session:
        tasks = [asyncio.create_task(one(r, session)) for r in records]
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for record, outcome in zip(records, done, strict=True):
        if isinstance(outcome, asyncio.CancelledError) and record.status in ("pending", "streaming"):
            record.status = "cancelled" if record.t_send else "not_sent"
            record.error = "cancelled: the level stopped at saturation"
    stop.set()
    await ticker
    # Requests the saturation stop kept from being sent stay in the level (they count against goodput).
    kept = [r for r in records if r.status != "past_duration"]
    return kept, lags, time.process_time() - cpu0, time.perf_counter() - start, (saturated[0] if saturated else None)


@dataclass
class LevelPlan:
    """What one client process runs for a level (picklable, for client_workers > 1)."""

    endpoint: Endpoint
    plans: list[Planned]
    mode: str  # closed | open
    value: float
    offsets: list[float]
    duration_s: float | None
    ramp_up_s: float
    max_concurrency: int | None
    backlog_limit: int | None
    t0: float | None = None


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """While a level is timed, the objects that existed before it are out of the garbage collector's reach: a
    full collection over a large heap (a loaded model, a tokenizer) stalls the event loop for milliseconds, which
    would be charged to the server as lateness and TTFT."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_level_here(plan: LevelPlan) -> tuple[list[RequestRecord], list[float], float, float, str | None]:
    """Run a level's share on this process's own event loop."""
    if plan.mode == "closed":
        records, lags, cpu, wall = asyncio.run(
            run_closed(plan.endpoint, plan.plans, int(plan.value), plan.duration_s, plan.ramp_up_s, plan.t0)
        )
        return records, lags, cpu, wall, None
    return asyncio.run(
        run_open(
            plan.endpoint, plan.plans, plan.offsets, plan.max_concurrency, plan.duration_s, plan.backlog_limit, plan.t0
        )
    )


def _run_share(plan: LevelPlan) -> tuple[list[RequestRecord], list[float], float, float, str | None]:
    """A client process's share of a level (its start time is seconds ahead, so the collection fits before)."""
    with heap_frozen():
        return run_level_here(plan)


def run_level(
    endpoint: Endpoint,
    plans: list[Planned],
    mode: str,
    value: float,
    offsets: list[float] | None = None,
    duration_s: float | None = None,
    ramp_up_s: float = 0.0,
    max_concurrency: int | None = None,
    backlog_limit: int | None = None,
    workers: int = 1,
    key: str | None = None,
    hosts: int = 1,
    ray_address: str | None = None,
) -> Level:
    """One level, on this process, spread over `workers` client processes, or over `hosts` Ray actors
    (harness.loadgen.ray_clients), all sharing one start time."""
    key = key or (f"concurrency={int(value)}" if mode == "closed" else f"rate={value:g}")
    offsets = list(offsets or [])
    if workers <= 1 and hosts <= 1:
        import aiohttp  # noqa: F401 - its first import takes about 0.1 s: before the start time is fixed, not after

        with heap_frozen():  # before the start time is fixed: the collection itself takes a while
            t0 = time.perf_counter() + 0.05
            records, lags, cpu, wall, stopped = run_level_here(
                LevelPlan(
                    endpoint, plans, mode, value, offsets, duration_s, ramp_up_s, max_concurrency, backlog_limit, t0
                )
            )
        return Level(key, mode, value, records, t0, lags, cpu, wall, stopped, offsets)
    import concurrent.futures
    import multiprocessing

    # Workers start first (spawned: a fresh interpreter imports only this module), then all wait for one t0.
    parts = hosts if hosts > 1 else workers
    t0 = time.perf_counter() + 2.0 + 0.5 * parts
    shares = []
    for w in range(parts):
        idx = list(range(w, len(plans), parts))
        share = [plans[i] for i in idx]
        if mode == "closed":
            count = int(value) // parts + (1 if w < int(value) % parts else 0)
            if count == 0:
                continue
            shares.append((idx, LevelPlan(endpoint, share, mode, count, [], duration_s, ramp_up_s, None, None, t0)))
        else:
            cap = max(1, max_concurrency // parts) if max_concurrency else None
            backlog = max(1, backlog_limit // parts) if backlog_limit else None
            share_offsets = [offsets[i] for i in idx]
            shares.append(
                (idx, LevelPlan(endpoint, share, mode, value, share_offsets, duration_s, 0.0, cap, backlog, t0))
            )
    actors = None
    if hosts > 1:  # Ray actors: each measured against this clock; records come back on it, in the level's numbering
        from harness.loadgen.ray_clients import run_on_actors

        outcomes, actors = run_on_actors(shares, hosts, ray_address)
        t0 = actors["t0"]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
            outcomes = list(pool.map(_run_share, [s for _, s in shares]))
        for (idx, _), (recs, *_) in zip(shares, outcomes, strict=True):
            for r in recs:
                r.index = idx[r.index]  # back to the level's numbering
    records, lags, cpu, wall, stopped = [], [], 0.0, 0.0, None
    for recs, lag, c, w, s in outcomes:
        records += recs
        lags += lag
        cpu += c
        wall = max(wall, w)
        stopped = stopped or s
    return Level(
        key, mode, value, sorted(records, key=lambda r: r.index), t0, lags, cpu, wall, stopped, offsets, actors
    )
