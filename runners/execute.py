"""One sweep point as the sweep runs it: resume, a fresh process, and a record even when that process dies.

`execute_point` skips a point whose result.json says ok for the same config (unless force), else runs it in a
child process (`python -m runners <point dir>`) so that its memory baseline is clean and a segfault or
a kill by the OOM killer marks only that point failed. The child's result.json is checked to belong to this
attempt; when the child died before writing it, the parent writes a failed result naming the signal.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.config import NOT_MEASURED, HarnessConfig
from harness.errors import is_storage_error, storage_error
from harness.models.cache import spec_digest
from harness.result import Result, write_json_atomic, write_result

POINT_FILE = "point.json"
FAULT_LOG = "faulthandler.log"
_SIGNAL_HINTS = {
    "SIGKILL": "a kill the process could not catch; on Linux most often the OOM killer (see `dmesg`): give the "
    "point more memory, a smaller model or batch, or a quantized model",
    "SIGSEGV": "a crash in native code (a kernel, a driver or an extension); the last lines of its output are in "
    "error.log",
    "SIGABRT": "an abort in native code; the last lines of its output are in error.log",
}


def config_digest(cfg: HarnessConfig) -> str:
    data = asdict(cfg)
    for key in NOT_MEASURED:
        data.pop(key, None)
    return spec_digest(data)


def load_result(out_dir: Path) -> Result | None:
    """The result in out_dir; None when there is none, or it is not a result this version reads (any shape of
    corrupt or foreign JSON)."""
    try:
        data = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        return Result.from_dict(data)
    except (TypeError, ValueError):
        return None


def set_aside_unreadable(out_dir: Path) -> Path | None:
    """Rename a result.json that cannot be read (kept for a person to look at, never deleted), so the point is
    redone; returns the new name."""
    path = out_dir / "result.json"
    if not path.exists() or load_result(out_dir) is not None:
        return None
    aside = path.with_name(f"result.json.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    path.rename(aside)
    print(f"warning: {path} could not be read as a result; set aside as {aside.name} and the point is redone.")
    return aside


def finished_ok(out_dir: Path, digest: str) -> Result | None:
    """The ok result in out_dir when it was measured with the same config, else None."""
    result = load_result(out_dir)
    return result if result and result.status == "ok" and result.config_digest == digest else None


def interrupted_result(cfg: HarnessConfig, point: dict[str, str], how: str) -> Result:
    return Result(
        status="failed",
        point=point,
        config=asdict(cfg),
        error={
            "type": "Interrupted",
            "message": f"the point was interrupted ({how}) before it finished.",
            "hint": "rerun the same command: finished points are skipped and this one is redone.",
        },
    )


def attempt_result(out_dir: Path, attempt: str) -> Result | None:
    """This attempt's result; None when the file is from an earlier attempt (this one never wrote its own)."""
    result = load_result(out_dir)
    return result if result and result.attempt == attempt else None


def set_memory_limit(limit_mb: int | None) -> None:
    """Let the point's process grow its address space by at most limit_mb beyond what start-up mapped
    (torch alone maps gigabytes it never touches, so an absolute limit would be a guess)."""
    if limit_mb is not None:
        import resource

        import psutil

        limit = psutil.Process().memory_info().vms + limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def crash_result(
    cfg: HarnessConfig,
    point: dict[str, str],
    out_dir: Path,
    returncode: int,
    tail: list[str],
    attempt: str,
    digest: str,
) -> Result:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        how = f"was killed by {name}"
        hint = _SIGNAL_HINTS.get(name, "see error.log for the last lines it printed")
        if cfg.engine.name == "llamacpp" and name in ("SIGSEGV", "SIGABRT"):
            hint += (
                "; with engine=llamacpp: a CUDA build of llama-cpp-python has crashed while loading in every process "
                "that had imported a CUDA build of torch (seen with llama-cpp-python 0.3.36 on CUDA 13.0 beside "
                "torch 2.11+cu130), and a harness point always imports torch: install a CPU build of "
                "llama-cpp-python there, or run llama.cpp as a server; on a CPU with AMX (recent Xeons), a native "
                "build crashed in its first decode where the kernel does not grant AMX tiles (a sandbox): rebuild it "
                'for AVX2 with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                "pip install --force-reinstall --no-cache-dir llama-cpp-python"
            )
    else:
        how, hint = f"exited with status {returncode}", "see the last lines it printed in error.log"
    message = f"the point's process {how} before it finished."
    native = out_dir / FAULT_LOG
    trace = native.read_text() if native.is_file() else ""
    (out_dir / "error.log").write_text(
        f"PointCrashed: {message} Fix: {hint}.\n\nLast output:\n"
        + "".join(tail)
        + (f"\nPython stack at the crash:\n{trace}" if trace else "")
    )
    result = Result(
        status="failed",
        point=point,
        config=asdict(cfg),
        error={"type": "PointCrashed", "message": message, "hint": hint + "."},
    )
    result.attempt, result.config_digest = attempt, digest
    return result


def _forward(stream, sink, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
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
    return subprocess.Popen(
        [sys.executable, "-m", "runners", str(out_dir)],
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ} if env is None else env,
        start_new_session=True,
    )


def write_point_file(cfg: HarnessConfig, out_dir: Path, point: dict[str, str], attempt: str, digest: str) -> None:
    """What the point's process runs: its config, identity and attempt."""
    write_json_atomic(
        out_dir / POINT_FILE, {"config": asdict(cfg), "point": point, "attempt": attempt, "config_digest": digest}
    )


def _point_process(cfg: HarnessConfig, out_dir: Path, point: dict[str, str], attempt: str, digest: str) -> Any:
    """isolation=process: forked from the sweep's fork server (torch already imported); isolation=spawn, or a
    server that cannot start: a fresh interpreter."""
    if cfg.isolation == "process":
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
    if result is None:
        result = crash_result(cfg, point, out_dir, returncode, list(tail), attempt, digest)
        write_result(out_dir, result)
    return result, False
