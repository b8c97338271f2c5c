"""Conversations under load: each session sends its turns one after another on one connection, every turn
carrying the server's real previous answers, with a think time between an answer and the next question.

A session's next request cannot be built before its previous answer arrives, so unlike the other load patterns
its bodies are built while the level runs (by `build`, from the conversation so far). Closed loop: C sessions at
a time, a new one starting when one ends. Open loop: sessions start at the schedule's times. A turn is scheduled
at the end of the previous answer plus the think time, so lateness means the same as for a single request. A
session whose turn fails ends there (the rest of the conversation would be about an answer that never came); its
unsent turns are not requests of the level.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.loadgen.client import Endpoint, RequestRecord, new_session, send
from harness.loadgen.figures import Level
from harness.loadgen.load import Planned, lag_ticker, running_level, wait_until


@dataclass
class SessionPlan:
    users: list[str]  # each turn's user message
    think_s: list[float]  # the wait after each turn's answer before the next question
    system: str | None = None  # the system message every turn starts with
    cases: list[int | None] | None = None  # graded load: each turn's expectation index


def first_indexes(sessions: list[SessionPlan]) -> list[int]:
    """The request index of each session's first turn: a level's turns are numbered session after session."""
    out, n = [], 0
    for s in sessions:
        out.append(n)
        n += len(s.users)
    return out


def turn_cases(sessions: list[SessionPlan]) -> list[int | None]:
    """Each request index's expectation (graded sessions), in the numbering of `first_indexes`."""
    return [case for s in sessions for case in (s.cases or [None] * len(s.users))]


Build = Callable[[list[dict[str, str]]], Planned]  # the conversation so far -> the request that continues it


async def _session(
    endpoint: Endpoint, number: int, first: int, plan: SessionPlan, build: Build, start: float, deadline: float,
    records: list[RequestRecord],
) -> None:  # fmt: skip
    history: list[dict[str, str]] = [{"role": "system", "content": plan.system}] if plan.system else []
    t_sched = start
    async with new_session(endpoint, connections=1) as http:
        for turn, user in enumerate(plan.users):
            await wait_until(t_sched)
            if t_sched >= deadline:
                return
            history.append({"role": "user", "content": user})
            planned = build(history)
            record = RequestRecord(first + turn, t_sched, planned.max_tokens, planned.prompt_tokens,
                                   forced=planned.forced, session=number, turn=turn)  # fmt: skip
            records.append(record)
            await send(http, endpoint, planned.path, planned.body, record)
            if not record.ok:
                return
            history.append({"role": "assistant", "content": record.answer})
            t_sched = time.perf_counter() + plan.think_s[turn]


async def run_sessions(
    endpoint: Endpoint,
    sessions: list[SessionPlan],
    build: Build,
    mode: str,
    value: float,
    offsets: list[float] | None,
    duration_s: float | None,
    key: str,
) -> Level:
    """One level of sessions (closed: `value` at a time; open: starting at t0 + offsets)."""
    lags: list[float] = []
    stop = asyncio.Event()
    records: list[RequestRecord] = []
    running_level[:] = [records]
    firsts = first_indexes(sessions)
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    deadline = t0 + duration_s if duration_s else math.inf
    ticker = asyncio.create_task(lag_ticker(lags, stop))
    if mode == "closed":
        queue = iter(range(len(sessions)))

        async def worker() -> None:
            await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            for i in queue:
                if time.perf_counter() >= deadline:
                    return
                await _session(endpoint, i, firsts[i], sessions[i], build, time.perf_counter(), deadline, records)

        await asyncio.gather(*(worker() for _ in range(int(value))))
    else:
        assert offsets is not None
        await asyncio.gather(*(_session(endpoint, i, firsts[i], s, build, t0 + offsets[i], deadline, records)
                               for i, s in enumerate(sessions)))  # fmt: skip
    stop.set()
    await ticker
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return Level(key, mode, value, records, t0, lags, time.process_time() - cpu0, wall, None, list(offsets or []))
