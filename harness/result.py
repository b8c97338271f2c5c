"""result.json: the self-describing record of one sweep point (docs/metrics.md, "The result of a point"), written
atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA = "harness.result/1"
STATUSES = ("ok", "failed", "skipped")
# The JSON kind of each annotated field type of Result (annotations are strings under `from __future__`).
_JSON_KINDS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "dict[str, str]": dict,
    "dict[str, Any]": dict,
    "dict[str, dict[str, Any]]": dict,
    "dict[str, float]": dict,
    "list[dict[str, Any]]": list,
    "dict[str, str] | None": dict,
}


@dataclass
class Result:
    status: str
    point: dict[str, str]
    config: dict[str, Any]
    resolved: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # generated texts, for a person to read
    memory: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # how the bench ran: stop reasons, cases, bandwidth
    error: dict[str, str] | None = None
    config_digest: str = ""  # hash of the measured config: a rerun skips an ok point only when it matches
    attempt: str = ""  # id of the run that wrote this file (tells a stale file from this attempt's)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if not isinstance(self.status, str) or self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    @classmethod
    def from_dict(cls, data: Any) -> Result:
        """A result read back from JSON; ValueError for anything that is not one of this schema (a list, null,
        a field of the wrong type, another schema version)."""
        if not isinstance(data, dict):
            raise ValueError(f"a result is a JSON object, not {type(data).__name__}")
        data = dict(data)
        if data.pop("schema", SCHEMA) != SCHEMA:
            raise ValueError("a result of another schema version")
        kinds = {f.name: f.type for f in fields(cls)}
        for name, value in data.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown field {name!r}")
            expected = _JSON_KINDS.get(str(kind))
            if expected is not None and not (value is None and "None" in str(kind)) and not isinstance(value, expected):
                raise ValueError(f"field {name!r} is {type(value).__name__}, not {expected}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema": data.pop("schema"), **data}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part (temp file + rename)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")


def write_result(out_dir: Path, result: Result) -> Path:
    path = out_dir / "result.json"
    write_json_atomic(path, result.to_dict())
    return path


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write a text (or bytes) file whole or not at all: a full disk leaves the old file, or none, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path, what: str, fix: str) -> None:
    """ConfigError naming the folder when it cannot be created or written (read-only, full, not permitted)."""
    from harness.errors import ConfigError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".harness-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {folder} cannot be written: {exc.strerror or exc}.", fix + ".") from None
