"""Command-line overrides read the way Hydra reads them (its own override parser), and checked before anything runs.

Every override must parse and name a group option or a field the schemas know (a typo gets "did you mean"), and a
point must compose and validate (runners.sweep.precheck does this for every point of a sweep before any runs).
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

from harness.config import GROUPS, HarnessConfig, compose_config, validate
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
        "fix the value it names; each field's type and default are in harness/config/ and "
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


# bench=serve with a target of its own launches (or reaches) that server with engine=transformers chosen: these
# engine.* fields still shape the launch and the client (n_ctx: a launched vLLM's or llama.cpp server's window, so
# a sweep over targets gives each the same; cpus: where the launched server runs).
_LAUNCH_FIELDS = frozenset(
    {"python", "server_args", "launch_timeout_s", "send_min_tokens", "token_prompts", "n_ctx", "cpus"}
)


def check_fields_apply(overrides: list[str], cfg: HarnessConfig) -> None:
    """An engine.* override the point's engine does not read (its conf/engine/<name>.yaml does not declare it)
    would be silently ignored: refuse it, naming the engines that read it."""
    from harness.config import engine_choices, engine_fields

    reads = set(engine_fields(cfg.engine.name))
    if cfg.server_launch() is not None:
        reads |= _LAUNCH_FIELDS
    for text in overrides:
        key = parse(text).key_or_group
        if not key.startswith("engine.") or key.split(".", 1)[1] in reads:
            continue
        field = key.split(".", 1)[1]
        readers = [e for e in engine_choices() if field in engine_fields(e)]
        raise ConfigError(
            f"{key} is read by engine={'|'.join(readers) or 'none'}, not by engine={cfg.engine.name}, so it would be "
            "ignored.",
            f"drop {key}, or choose an engine that reads it.",
        )
