"""Case files of the workflows: their schema, and a loader that names the file, the case and the field of
anything malformed.

A case file is JSON: `{"workflow": "<name>", "cases": [{...}, ...]}`. Each workflow's fields are listed in
SCHEMAS (name → (type, required)); unknown fields are refused, so a misspelt field is not silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

_STR_LIST = "list[str]"
_TURNS = "turns"

SCHEMAS: dict[str, dict[str, tuple[Any, bool]]] = {
    "search_qa": {
        "id": (str, True),
        "question": (str, True),
        "expected_keywords": (_STR_LIST, True),  # all must appear in the answer; "a|b" accepts either
        "expected_source": (str, True),  # the id of the document that holds the answer
        "min_keywords": (int, False),  # accept an answer with at least this many of them
        "kind": (str, False),  # the question's kind (what, which, why, how, can, value, exception, method, ...)
        "provenance": (str, False),  # who wrote the case, when, and from which source text
    },
    "lesson_pack": {
        "id": (str, True),
        "topic": (str, True),
        "level": (str, False),
        "language": (str, False),
        "min_exercises": (int, False),
        "expected_keywords": (_STR_LIST, False),  # words a lesson on this topic cannot avoid
        "kind": (str, False),  # the subject area (programming, mathematics, science, language, tools)
        "provenance": (str, False),
    },
    "chat": {
        "id": (str, True),
        "system": (str, False),
        "turns": (_TURNS, True),  # [{"user": "...", "expect": ["keyword", ...]}]; expect is optional
        "kind": (str, False),  # what the conversation must remember (name, place, number, date, preference, ...)
        "provenance": (str, False),
    },
}


def _type_error(where: str, name: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(
        f"{where}: field '{name}' must be {rule}, not {json.dumps(value)[:80]}.",
        f"fix '{name}' in that case (the schema is in docs/real_model_guide.md).",
    )


def _check_turns(where: str, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise _type_error(where, "turns", 'a non-empty list of {"user": ..., "expect": [...]}', value)
    for n, turn in enumerate(value):
        at = f"{where}, turn {n}"
        if not isinstance(turn, dict):
            raise _type_error(at, "turns", "an object with 'user' text", turn)
        unknown = set(turn) - {"user", "expect"}
        if unknown:
            raise ConfigError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}.", "use only 'user' and 'expect'.")
        if not isinstance(turn.get("user"), str) or not turn["user"].strip():
            raise _type_error(at, "user", "non-empty text", turn.get("user"))
        expect = turn.get("expect", [])
        if not isinstance(expect, list) or not all(isinstance(k, str) and k.strip() for k in expect):
            raise _type_error(at, "expect", "a list of non-empty strings", expect)


def _check_case(where: str, case: Any, schema: dict[str, tuple[Any, bool]]) -> None:
    if not isinstance(case, dict):
        raise ConfigError(f"{where}: a case must be a JSON object, not {type(case).__name__}.", "fix that case.")
    unknown = set(case) - set(schema)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}.",
            f"use only the fields {', '.join(schema)} (a misspelt field would otherwise be ignored).",
        )
    for name, (kind, required) in schema.items():
        if name not in case:
            if required:
                raise ConfigError(f"{where}: the required field '{name}' is missing.", f"add '{name}' to that case.")
            continue
        value = case[name]
        if kind == _TURNS:
            _check_turns(where, value)
        elif kind == _STR_LIST:
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise _type_error(where, name, "a non-empty list of non-empty strings", value)
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _type_error(where, name, "an integer >= 1", value)
        elif not isinstance(value, str) or not value.strip():
            raise _type_error(where, name, "non-empty text", value)


def load_cases(path: str | Path, workflow: str) -> list[dict[str, Any]]:
    """The cases of a file, every field checked; ConfigError naming file, case and field otherwise."""
    path = Path(path)
    schema = SCHEMAS[workflow]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"the case file {path} does not exist.", "give workflow.cases=<a JSON case file>.") from None
    except ValueError as exc:
        raise ConfigError(f"the case file {path} is not valid JSON: {exc}.", "fix the JSON.") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ConfigError(
            f"the case file {path} must be an object with a 'cases' list.",
            f'write it as {{"workflow": "{workflow}", "cases": [...]}}.',
        )
    if data.get("workflow", workflow) != workflow:
        raise ConfigError(
            f"the case file {path} holds cases of workflow '{data['workflow']}', not '{workflow}'.",
            f"give a {workflow} case file, or set workflow={data['workflow']}.",
        )
    if not data["cases"]:
        raise ConfigError(f"the case file {path} has no cases.", "add at least one case.")
    seen: set[str] = set()
    for n, case in enumerate(data["cases"]):
        label = case.get("id") if isinstance(case, dict) else None
        where = f"{path}, case {n}" + (f" ({label!r})" if isinstance(label, str) else "")
        _check_case(where, case, schema)
        if case["id"] in seen:
            raise ConfigError(f"{where}: the id {case['id']!r} is used twice.", "give each case a distinct id.")
        seen.add(case["id"])
    return data["cases"]
