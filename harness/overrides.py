"""Command-line overrides read the way Hydra reads them (its own override parser), and checked before anything runs.

`precheck(args)` is what `python -m harness` does first: every override must parse, name a group option or a
field the schemas know (a typo gets "did you mean"), and every point of the sweep must compose and validate.
Hydra's own errors (a wrong type, a `+` on a key that exists) become ConfigErrors here, so a user mistake is
one paragraph and exit status 2, and no point of a sweep runs before all of them are known to be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType

from harness.config import GROUPS, HarnessConfig, check_group_choices, compose_config, validate
from harness.errors import ConfigError

GROUP_KEYS = (*GROUPS, "experiment")
# Fields whose value is a free-form mapping: keys below them are the user's own (model.architecture.hidden_size).
_FREE_FORM = ("model.architecture", "model.tokenizer")
_PARSER: OverridesParser | None = None


def _parser() -> OverridesParser:
    global _PARSER
    if _PARSER is None:
        _PARSER = OverridesParser.create()
    return _PARSER


def parse(override: str) -> Override:
    """One override, parsed by Hydra's grammar; ConfigError when it does not parse."""
    try:
        return _parser().parse_override(override)
    except Exception as exc:  # hydra.errors.OverrideParseException, with the grammar's own complaint
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"the override {override!r} does not parse: {detail}",
            "write it as group=option, group.field=value or a sweep a,b,c; quote values with spaces or "
            "special characters ('a b').",
        ) from None


def is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _fields_of(cls: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out[key] = kind
            out.update(_fields_of(kind, key + "."))
        else:
            out[key] = kind
    return out


def schema_fields() -> dict[str, Any]:
    """Every dotted key of the config schemas ('bench.max_new_tokens', 'seed', …) with its type."""
    return _fields_of(HarnessConfig)


def known_key(key: str, fields: dict[str, Any] | None = None) -> bool:
    fields = fields if fields is not None else schema_fields()
    return key in fields or any(key.startswith(f + ".") for f in _FREE_FORM)


def _unknown_key(key: str, fields: dict[str, Any]) -> ConfigError:
    group = key.split(".", 1)[0]
    same_group = [f for f in fields if f.startswith(group + ".")] or list(fields)
    close = difflib.get_close_matches(key, same_group, n=1, cutoff=0.6)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    where = f"the {group} group" if group in GROUPS else "the harness config"
    return ConfigError(
        f"{key!r} is not a field of {where}, so the value would be ignored.{guess}",
        "fix the field's name; `python -m harness --cfg job` prints every field with its value.",
    )


def check_keys(overrides: list[Override]) -> None:
    """Each override names a group, a known field, or Hydra's own settings; `+`/`~` only where they make sense."""
    fields = schema_fields()
    for o in overrides:
        key, text = o.key_or_group, o.input_line
        if o.package:
            raise ConfigError(
                f"the override {text!r} names a package (@{o.package}); the harness's groups take none.",
                f"write it as {key}=<option>.",
            )
        if is_hydra_key(key):
            continue
        if key in GROUP_KEYS:
            if o.type == OverrideType.DEL and key != "experiment":
                raise ConfigError(
                    f"the override {text!r} removes the {key} group, which every point needs.",
                    f"choose an option instead ({key}=<option>).",
                )
            continue
        if not known_key(key, fields):
            raise _unknown_key(key, fields)
        if o.type == OverrideType.ADD and key in fields:
            raise ConfigError(
                f"the override {text!r} adds {key!r} with '+', but the schema already has that field.",
                f"drop the '+': {text.lstrip('+')}.",
            )
        if o.type == OverrideType.DEL and key in fields:
            raise ConfigError(
                f"the override {text!r} removes {key!r}, a field the schema needs.",
                f"set it instead ({key}=null where null is allowed).",
            )


def expand(args: list[str]) -> list[list[str]]:
    """The points of a sweep as lists of plain overrides (Hydra's own basic-sweeper expansion), without
    Hydra's own settings."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = [o for o in map(parse, args) if not is_hydra_key(o.key_or_group)]
    if not any(o.is_sweep_override() for o in parsed):
        return [[o.input_line for o in parsed]]  # as given, repeated keys included (Hydra applies each)
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:  # a sweep Hydra cannot expand (e.g. an empty range)
        raise ConfigError(f"the sweep does not expand: {exc}", "check the sweep's values.") from None
    return batch


_FULL_KEY = re.compile(r"full_key:\s*(\S+)")


def hydra_error(exc: BaseException, overrides: list[str]) -> ConfigError:
    """A Hydra or OmegaConf composition error as one paragraph naming the field and the fix."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():  # Hydra wraps OmegaConf's error, which says what was wrong
        first = f"{first}: {str(cause).strip().splitlines()[0]}"
        text += "\n" + str(cause)
    match = _FULL_KEY.search(text)
    field_name = match.group(1) if match else None
    where = f" ({field_name})" if field_name else ""
    point = f" in the point {' '.join(overrides)}" if overrides else ""
    return ConfigError(
        f"the configuration does not compose{point}{where}: {first}",
        "fix the value it names; each field's type and default are in harness/config.py and "
        "`python -m harness --cfg job` prints the composed config.",
    )


def compose_point(overrides: list[str]):
    """Compose and validate one point (without running it); ConfigError for any mistake, Hydra's included."""
    try:
        cfg = compose_config(overrides, with_hydra=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise hydra_error(exc, overrides) from None
    try:
        return validate(cfg), cfg
    except ConfigError:
        raise
    except Exception as exc:
        raise hydra_error(exc, overrides) from None


def _preset_sweep(overrides: list[str]) -> list[str]:
    """The sweep an experiment preset declares (hydra.sweeper.params), as overrides the command line's own
    values come after (and so win), as Hydra's basic sweeper does."""
    if not any(parse(o).key_or_group == "experiment" for o in overrides):
        return []
    first = expand(overrides)[0]
    try:
        params = compose_config(first, with_hydra=True).hydra.sweeper.get("params") or {}
    except Exception as exc:
        raise hydra_error(exc, first) from None
    return [f"{key}={value}" for key, value in params.items()]


def precheck(args: list[str], multirun: bool) -> set[str]:
    """Check a command line before Hydra runs anything; returns the keys it sweeps. Raises ConfigError."""
    from runners.point import check_point

    overrides = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    check_group_choices(overrides)
    parsed = [parse(a) for a in overrides]
    check_keys(parsed)
    sweeps = [o for o in parsed if o.is_sweep_override() and not is_hydra_key(o.key_or_group)]
    if sweeps and not multirun:
        raise ConfigError(
            f"{sweeps[0].input_line!r} sweeps over several values, but the command runs a single point.",
            "add -m (python -m harness -m ...) to run a sweep, or give one value.",
        )
    if multirun:
        preset = _preset_sweep(overrides)
        sweeps += [o for o in map(parse, preset) if o.is_sweep_override()]
        overrides = preset + overrides
    points = expand(overrides)
    for point in points:
        validated, _ = compose_point(point)
        check_point(validated)
    return {o.key_or_group for o in sweeps}
