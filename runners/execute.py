"""One sweep point as the sweep runs it: resume, a fresh process, and a record even when that process dies.

`execute_point` skips a point whose result.json says ok for the same config (unless force), else runs it in a
child process (`python -m runners <point dir>`) so that its memory baseline is clean and a segfault or
a kill by the OOM killer marks only that point failed. The child's result.json is checked to belong to this
attempt; when the child died before writing it, the parent writes a failed result naming the signal.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from harness import progress
from harness.config import HarnessConfig
from harness.errors import is_storage_error, storage_error
from harness.processes import dies_with_this_process
from harness.result import Result, write_result
from runners.records import (
    FAULT_LOG,
    RANK_FILES,
    attempt_result,
    config_digest,
    crash_result,
    finished_ok,
    interrupted_result,
    load_result,
    rank_log,
    set_aside_unreadable,
    write_point_file,
)


def _forward(stream, sink, tail: collections.deque) -> None:
    """The point process's output to the sweep's: its progress lines to the sweep's display (dropped where there
    is none), everything else as it came."""
    for line in iter(stream.readline, ""):
        state = progress.parse(line)
        if state is not None:
            if progress.current:
                progress.current[0].update(state)
            continue
        sink.write(line)
        sink.flush()
        tail.append(line)


# How long a point's process may take to record itself as interrupted before it is killed.
STOP_GRACE_S = 30.0


def stop_point_process(proc: subprocess.Popen, signum: int, grace_s: float = STOP_GRACE_S) -> None:
    """Hand the signal to the point's process group, then kill the group if it has not ended in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # anything the point started that outlived it
        os.killpg(proc.pid, signal.SIGKILL)


def start_point(
    cfg: HarnessConfig,
    out_dir: Path,
    point: dict[str, str],
    attempt: str,
    digest: str,
    stdout: Any = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """The point's own process (`python -m runners <out_dir>`), in a process group of its own, so that a
    signal or a cancel reaches it and everything it started, and nothing else; its output goes to stdout (a
    pipe by default, or an open file). `env` replaces this process's environment (a server's job gets a clean
    one); the command line's points keep it whole."""
    write_point_file(cfg, out_dir, point, attempt, digest)
    ranks = cfg.ranks()
    # A model split over ranks: torch's distributed launch starts one `-m runners` process per rank (each its own
    # session, stopped by the launch when it is signalled, or when this process dies).
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    return subprocess.Popen(
        [sys.executable, *launch, "-m", "runners", str(out_dir)],
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ} if env is None else env,
        start_new_session=True,
        preexec_fn=dies_with_this_process(signal.SIGTERM) if ranks > 1 else None,
    )


def _point_process(cfg: HarnessConfig, out_dir: Path, point: dict[str, str], attempt: str, digest: str) -> Any:
    """isolation=process: forked from the sweep's fork server (torch already imported); isolation=spawn, or a
    server that cannot start: a fresh interpreter."""
    if cfg.isolation == "process" and cfg.ranks() == 1:
        from runners.forkserver import fork_server

        server = fork_server()
        if server is not None:
            write_point_file(cfg, out_dir, point, attempt, digest)
            try:
                return server.start(out_dir)
            except (OSError, RuntimeError) as exc:
                print(f"warning: the fork server failed ({exc}); this point runs in a fresh interpreter.")
    return start_point(cfg, out_dir, point, attempt, digest)


def _clear_previous_attempt(out_dir: Path) -> None:
    """A redone point must not keep the logs of the attempt before it."""
    for name in ("error.log", FAULT_LOG):
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("rank-*"):  # the other ranks' results and logs
        path.unlink(missing_ok=True)


def _blame_rank(out_dir: Path, result: Result, attempt: str) -> Result:
    """A model split over ranks whose point failed: when another rank failed first, its error is the point's cause
    (rank 0 then only saw its peer go: a lost connection in a collective call, or the launch's stop)."""
    own = result.error or {}
    stopped = own.get("type") in ("Interrupted", "PointCrashed")
    own_file = out_dir / "result.json"
    own_time = float("inf") if stopped or not own_file.is_file() else own_file.stat().st_mtime_ns
    for path in sorted(out_dir.glob(RANK_FILES), key=lambda p: p.stat().st_mtime_ns):
        other = load_result(path.parent, path.name)
        error = (other.error or {}) if other is not None and other.attempt == attempt else {}
        if not error or error.get("type") == "Interrupted" or error.get("message") == own.get("message"):
            continue
        if path.stat().st_mtime_ns <= own_time:
            rank = int(path.stem.partition("-")[2])
            then = f" (rank 0 then: {own.get('type')}: {own.get('message')})" if not stopped else ""
            result.error = {**error, "message": f"rank {rank} failed first: {error.get('message')}{then}",
                            "hint": str(error.get("hint", "")).replace("error.log", rank_log(rank))}  # fmt: skip
        break
    return result


def execute_point(cfg: HarnessConfig, out_dir: Path, point: dict[str, str]) -> tuple[Result, bool]:
    """Run (or skip) one point; returns (result, skipped). A KeyboardInterrupt (SIGINT, or SIGTERM raised as
    harness.errors.Interrupted) stops the point's process, leaves its Interrupted result, and is re-raised."""
    try:
        return _execute(cfg, out_dir, point)
    except OSError as exc:
        if is_storage_error(exc):
            raise storage_error(
                exc, "the point's files", str(out_dir), how_to_move="hydra.sweep.dir=<folder>"
            ) from None
        raise


def _execute(cfg: HarnessConfig, out_dir: Path, point: dict[str, str]) -> tuple[Result, bool]:
    from runners.point import run_point

    digest = config_digest(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_aside_unreadable(out_dir)
    previous = None if cfg.force else finished_ok(out_dir, digest)
    if previous is not None:
        return previous, True
    _clear_previous_attempt(out_dir)
    attempt = uuid.uuid4().hex
    if cfg.isolation == "inline":
        return run_point(cfg, out_dir, point, attempt=attempt, digest=digest), False
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = _point_process(cfg, out_dir, point, attempt, digest)
    reader = threading.Thread(target=_forward, args=(proc.stdout, sys.stdout, tail), daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        stop_point_process(proc, signum)
        reader.join(timeout=5)
        if attempt_result(out_dir, attempt) is None:  # it was killed before it could say so itself
            result = interrupted_result(cfg, point, signal.Signals(signum).name)
            result.attempt, result.config_digest = attempt, digest
            write_result(out_dir, result)
        raise
    finally:
        reader.join(timeout=5)
    result = attempt_result(out_dir, attempt)
    written = result is not None
    if result is None:
        result = crash_result(cfg, point, out_dir, returncode, list(tail), attempt, digest)
    if cfg.ranks() > 1 and result.status != "ok":
        result, written = _blame_rank(out_dir, result, attempt), False
    if not written:
        write_result(out_dir, result)
    return result, False
