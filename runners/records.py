"""The records a point leaves, shared by the sweep's parent, the point's own process and the server's jobs: the
file names, the config digest (the resume key), reading a result back, and the results written for a point that
was interrupted or crashed before it could write its own. A leaf: it imports no other runners module.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from harness.config import NOT_MEASURED, HarnessConfig
from harness.models.cache import spec_digest
from harness.result import Result, write_json_atomic

POINT_FILE = "point.json"
FAULT_LOG = "faulthandler.log"


def rank_file(rank: int) -> str:
    """The result of a rank other than 0 of a model split over ranks, beside the point's result.json."""
    return f"rank-{rank}.json"


def rank_log(rank: int) -> str:
    """That rank's error.log, kept beside its result when it failed."""
    return f"rank-{rank}-error.log"


RANK_FILES = "rank-*.json"


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


def load_result(out_dir: Path, name: str = "result.json") -> Result | None:
    """The result in out_dir (or its file `name`); None when there is none, or it is not a result this version reads
    (any shape of corrupt or foreign JSON)."""
    try:
        data = json.loads((out_dir / name).read_text())
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


def write_point_file(cfg: HarnessConfig, out_dir: Path, point: dict[str, str], attempt: str, digest: str) -> None:
    """What the point's process runs: its config, identity and attempt."""
    write_json_atomic(
        out_dir / POINT_FILE, {"config": asdict(cfg), "point": point, "attempt": attempt, "config_digest": digest}
    )
