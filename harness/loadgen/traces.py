"""Production traces to replay: when each request arrived and how long its prompt and answer were.

Formats, told apart by the file's first line and named in the result:
- `azure`: the Azure LLM inference trace CSV, `TIMESTAMP,ContextTokens,GeneratedTokens` (a date and time per row).
- `burstgpt`: the BurstGPT CSV, `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type` (seconds
  from the trace's start). A row with no response tokens is a request that failed in production: it is skipped
  and counted.
- `mooncake`: JSONL with `timestamp` (milliseconds), `input_length`, `output_length` and `hash_ids` (the ids of
  the prompt's blocks of `block_tokens` tokens: prompts that share an id share that block, so a prefix cache sees
  the trace's own sharing).
- `jsonl`: the harness's own JSONL, one request per line: `{"time_s": 0.0, "input_tokens": 512,
  "output_tokens": 128}`, with optional `hash_ids` (as mooncake's) and `block_tokens`.

Every problem with the file is a ConfigError naming the file, the row and the fix, raised before any server
starts: missing or empty, unknown format, a row that cannot be read, a negative or non-numeric length, times that
go backwards.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

MOONCAKE_BLOCK_TOKENS = 512  # the block size of mooncake's hash_ids
AZURE_HEADER = ("timestamp", "contexttokens", "generatedtokens")
BURSTGPT_HEADER = ("timestamp", "model", "request tokens", "response tokens")
FORMATS = ("azure", "burstgpt", "mooncake", "jsonl")


@dataclass(frozen=True)
class TraceRequest:
    t: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int
    row: int  # the line of the file it came from
    hash_ids: tuple[int, ...] = ()


@dataclass
class Trace:
    path: Path
    format: str
    requests: list[TraceRequest]
    block_tokens: int | None = None  # the tokens of one hash id (traces with hash_ids)
    skipped: dict[str, int] = field(default_factory=dict)  # why rows were not replayed, and how many

    def window(
        self, start_s: float, duration_s: float | None, max_requests: int | None, sample: float = 1.0, seed: int = 0
    ) -> list[TraceRequest]:
        """The requests from start_s on (trace time), for duration_s, a seeded `sample` share of them (thinning
        keeps the trace's shape over time at a lower rate) and at most max_requests, their times made relative to
        the window's start."""
        chosen = [r for r in self.requests if r.t >= start_s and (duration_s is None or r.t < start_s + duration_s)]
        if sample < 1.0:
            rng = random.Random(seed)
            chosen = [r for r in chosen if rng.random() < sample]
        chosen = chosen[:max_requests] if max_requests else chosen
        if not chosen:
            raise ConfigError(
                f"bench.trace={self.path}: no request of the trace falls in the window that starts at "
                f"{start_s:g} s" + (f" and lasts {duration_s:g} s" if duration_s else "") + f"; the trace spans "
                f"{self.requests[-1].t:.1f} s.",
                "set bench.trace_start_s below the trace's span, or widen bench.trace_duration_s.",
            )
        origin = chosen[0].t
        return [TraceRequest(r.t - origin, r.input_tokens, r.output_tokens, r.row, r.hash_ids) for r in chosen]

    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "format": self.format,
            "requests": len(self.requests),
            "span_s": self.requests[-1].t if self.requests else 0.0,
            "block_tokens": self.block_tokens,
            "skipped_rows": dict(self.skipped),
        }


def _bad(path: Path, row: int | None, what: str, fix: str) -> ConfigError:
    where = f"row {row}: " if row is not None else ""
    return ConfigError(f"bench.trace={path}: {where}{what}", fix)


def _count(path: Path, row: int, name: str, value: Any, allow_zero: bool = True) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(path, row, f"{name}={value!r} is not a number.", "fix or delete that row.") from None
    if number != int(number) or number < (0 if allow_zero else 1):
        raise _bad(
            path, row, f"{name}={value!r} is not a token count (a whole number >= {0 if allow_zero else 1}).",
            "fix or delete that row.",
        )  # fmt: skip
    return int(number)


def _seconds_of(path: Path, row: int, value: str) -> float:
    """An Azure timestamp ('2023-11-16 18:17:03.9799600': more fraction digits than datetime reads) in seconds."""
    whole, _, fraction = value.strip().partition(".")
    try:
        moment = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc)  # no daylight-saving jumps
        return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)
    except ValueError:
        raise _bad(path, row, f"TIMESTAMP={value!r} is not a date and time.", "fix or delete that row.") from None


def _csv_rows(path: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise _bad(path, reader.line_num, f"the CSV cannot be read ({exc}).", "fix the file's quoting.") from None
    return header, rows


def _azure(path: Path, text: str) -> Trace:
    _, rows = _csv_rows(path, text)
    out, first = [], None
    for line, row in rows:
        if len(row) < 3:
            raise _bad(path, line, f"expected 3 columns ({','.join(AZURE_HEADER)}), found {len(row)}.", "fix it.")
        t = _seconds_of(path, line, row[0])
        first = t if first is None else first
        out.append(TraceRequest(t - first, _count(path, line, "ContextTokens", row[1], allow_zero=False),
                                _count(path, line, "GeneratedTokens", row[2]), line))  # fmt: skip
    return Trace(path, "azure", out)


def _burstgpt(path: Path, text: str) -> Trace:
    header, rows = _csv_rows(path, text)
    at = {name: header.index(name) for name in ("timestamp", "request tokens", "response tokens")}
    out, failed, first = [], 0, None
    for line, row in rows:
        if len(row) < len(header):
            raise _bad(path, line, f"expected {len(header)} columns, found {len(row)}.", "fix or delete that row.")
        try:
            t = float(row[at["timestamp"]])
        except ValueError:
            raise _bad(path, line, f"Timestamp={row[at['timestamp']]!r} is not a number.", "fix it.") from None
        answer = _count(path, line, "Response tokens", row[at["response tokens"]])
        prompt = _count(path, line, "Request tokens", row[at["request tokens"]])
        if answer == 0 or prompt == 0:
            failed += 1  # failed in production: nothing was generated
            continue
        first = t if first is None else first
        out.append(TraceRequest(t - first, prompt, answer, line))
    return Trace(path, "burstgpt", out, skipped={"failed_in_trace": failed} if failed else {})


def _jsonl(path: Path, text: str, kind: str) -> Trace:
    fields = {
        "mooncake": ("timestamp", "input_length", "output_length"),
        "jsonl": ("time_s", "input_tokens", "output_tokens"),
    }[kind]
    scale = 1e-3 if kind == "mooncake" else 1.0
    out, first, block = [], None, MOONCAKE_BLOCK_TOKENS if kind == "mooncake" else None
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _bad(path, line, f"not a JSON object ({exc.msg}).", "fix or delete that line.") from None
        if not isinstance(entry, dict) or any(f not in entry for f in fields[:2]):
            raise _bad(path, line, f"needs the fields {', '.join(fields)}.", "add them, or fix the line.")
        try:
            t = float(entry[fields[0]]) * scale
        except (TypeError, ValueError):
            raise _bad(path, line, f"{fields[0]}={entry[fields[0]]!r} is not a number.", "fix it.") from None
        output = _count(path, line, fields[2], entry[fields[2]]) if entry.get(fields[2]) is not None else 0
        ids = entry.get("hash_ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise _bad(path, line, "hash_ids must be a list of integers.", "fix it.")
        if kind == "jsonl" and entry.get("block_tokens") is not None:
            block = _count(path, line, "block_tokens", entry["block_tokens"], allow_zero=False)
        first = t if first is None else first
        out.append(TraceRequest(t - first, _count(path, line, fields[1], entry[fields[1]], allow_zero=False),
                                output, line, tuple(ids)))  # fmt: skip
    if kind == "jsonl" and any(r.hash_ids for r in out) and block is None:
        raise _bad(path, None, "hash_ids are given without block_tokens (the tokens of one id).",
                   'add "block_tokens": N to a line.')  # fmt: skip
    return Trace(path, kind, out, block_tokens=block if any(r.hash_ids for r in out) else None)


def detect_format(path: Path, first_line: str) -> str:
    line = first_line.lstrip("\ufeff").strip()
    if line.startswith("{"):
        try:
            keys = set(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            raise _bad(path, 1, "the first line starts like JSON but is not a JSON object.", "fix it.") from None
        if {"input_length", "timestamp"} <= keys:
            return "mooncake"
        if {"time_s", "input_tokens"} <= keys:
            return "jsonl"
    else:
        header = tuple(h.strip().lower() for h in next(csv.reader([line]), []))
        if header[:3] == AZURE_HEADER:
            return "azure"
        if set(BURSTGPT_HEADER) <= set(header):
            return "burstgpt"
    raise _bad(
        path, 1, f"the format is not one the harness reads (first line: {line[:120]!r}).",
        "give an Azure LLM inference trace CSV, a BurstGPT CSV, a mooncake JSONL, or the harness's JSONL "
        '({"time_s": …, "input_tokens": …, "output_tokens": …}; docs/serving.md).',
    )  # fmt: skip


def read_replay_file(path: str | Path, field: str, example: str) -> tuple[Path, str]:
    """A trace's or dataset's text (a byte-order mark dropped); ConfigError naming `field` when the file is missing,
    unreadable or empty."""
    path = Path(path).expanduser()

    def bad(what: str, fix: str) -> ConfigError:
        return ConfigError(f"{field}={path}: {what}", fix)

    if not path.is_file():
        raise bad("no such file.", f"give the path of the file ({field}={example}).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(f"the file cannot be read ({exc}).", "give a readable UTF-8 text file.") from None
    if not text.strip():
        raise bad("the file is empty.", "give a file with at least one request.")
    return path, text


def load_trace(path: str | Path) -> Trace:
    """The trace at path, read whole and checked; ConfigError naming the file, the row and the fix otherwise."""
    path, text = read_replay_file(path, "bench.trace", "/path/to/trace.csv")
    lines = [line for line in text.splitlines() if line.strip()]
    kind = detect_format(path, lines[0])
    trace = {"azure": _azure, "burstgpt": _burstgpt}[kind](path, text) if kind in ("azure", "burstgpt") else (
        _jsonl(path, text, kind))  # fmt: skip
    if not trace.requests:
        raise _bad(path, None, f"no request to replay ({trace.skipped or 'only a header'}).", "give a longer trace.")
    for before, after in zip(trace.requests, trace.requests[1:], strict=False):
        if after.t < before.t:
            raise _bad(
                path, after.row, f"its time ({after.t:.3f} s into the trace) is earlier than row {before.row}'s "
                f"({before.t:.3f} s): the rows are out of order.", "sort the trace by time.",
            )  # fmt: skip
    return trace
