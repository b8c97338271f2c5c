"""Reading a sweep's result.json files back, with the schema version checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_SCHEMAS = ("harness.result/1",)


class SchemaError(ValueError):
    """A result file this version of the analysis cannot read."""


def load_results(*sweep_dirs: Path | str) -> list[dict[str, Any]]:
    """Every result.json under the given folders, each with `path` added, in a stable order."""
    results = []
    for folder in map(Path, sweep_dirs):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of results: give a run or sweep folder under outputs/")
        for path in sorted(folder.rglob("result.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise SchemaError(f"{path} is not valid JSON ({exc}): was it written by an interrupted run?") from exc
            schema = data.get("schema") if isinstance(data, dict) else None
            if schema not in SUPPORTED_SCHEMAS:
                raise SchemaError(
                    f"{path} has schema {schema!r}; this analysis reads {', '.join(SUPPORTED_SCHEMAS)}."
                    " Upgrade the harness that reads it, or rerun the point."
                )
            data["path"] = str(path)
            results.append(data)
    return results
