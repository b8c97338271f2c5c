"""Field checks shared by the schemas: a value from a list (naming the closest), a rule, a device, an address, the
name of an environment variable. Each raises ConfigError naming the field, the value and what is allowed."""

from __future__ import annotations

import os
from typing import Any

from harness.errors import ConfigError, did_you_mean


def one_of(field_name: str, value: Any, allowed: tuple[str, ...], fix: str = "") -> None:
    if value not in allowed:
        raise ConfigError(
            f"{field_name}={value!r} is not valid; allowed values: {', '.join(allowed)}.{did_you_mean(value, allowed)}",
            fix or f"set {field_name} to one of: {', '.join(allowed)}.",
        )


def check(condition: bool, field_name: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(
            f"{field_name}={value!r} is not valid: it must be {rule}.", f"set {field_name} to a value that is {rule}."
        )


def device_ok(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def check_base_url(field_name: str, url: str) -> None:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"{field_name}={url!r} is not an http(s) URL.",
            f"set {field_name}=http://host:port/v1 (the server's OpenAI API root).",
        )


def check_vllm_python(python: str | None) -> None:
    if not (python or os.environ.get("HARNESS_VLLM_PYTHON")):
        raise ConfigError(
            "vLLM runs in its own Python environment, and neither engine.python nor HARNESS_VLLM_PYTHON names that "
            "environment's python.",
            "set engine.python=<venv>/bin/python or export HARNESS_VLLM_PYTHON (docs/serving.md has the CPU "
            "build's install steps).",
        )


def check_env_python(what: str, variable: str, python: str | None) -> None:
    """A server that lives in a Python environment of its own needs that environment's python."""
    if not (python or os.environ.get(variable)):
        raise ConfigError(
            f"{what} runs in its own Python environment, and neither engine.python nor {variable} names that "
            "environment's python.",
            f"set engine.python=<venv>/bin/python or export {variable} (docs/scaling.md has the install steps).",
        )


def check_key_env(field_name: str, name: str | None) -> None:
    """The variable must exist: a key that is missing would turn every request into a 401."""
    if name is None:
        return
    if not str(name).replace("_", "").isalnum():
        raise ConfigError(
            f"{field_name}={name!r} is not an environment variable's name (it holds the variable's NAME, never "
            "the key itself).",
            f"export the key as e.g. MY_API_KEY and set {field_name}=MY_API_KEY.",
        )
    if not os.environ.get(name):
        raise ConfigError(
            f"{field_name}={name}, but the environment variable {name} is not set (or is empty).",
            f"export {name}=<the server's API key> before the run, or drop {field_name} for a server without keys.",
        )
