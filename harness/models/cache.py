"""Checkpoints the harness builds once and reuses: a folder is published whole (built in a temporary sibling,
then renamed), so a crash or a second process never sees half a checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPLETE = ".complete"


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def spec_digest(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def build_once(target: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """Return (target, built_now). `build(tmp)` fills a temporary folder and returns provenance to record."""
    if is_complete(target):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        provenance = build(tmp)
        (tmp / COMPLETE).write_text(json.dumps(provenance, indent=2, default=str))
        if target.exists():  # a stale, incomplete folder from an interrupted build
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not is_complete(target):  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True
