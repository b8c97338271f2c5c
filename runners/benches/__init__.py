"""The benches, one module per conf/bench/ option. Each has `run(ctx: BenchContext) -> BenchOutput` and
`headline(metrics) -> str`, the one or two figures a person looks at first in the sweep's summary line; one that
builds prompts of exact token lengths says so with EXACT_LENGTH_PROMPTS, and one with inputs of its own to check
before anything loads has `check(cfg)`. What they share is in `measure`.

A user's own bench is `bench.name=package.module:function` (a function taking a BenchContext); its summary line
shows the request figures (TTFT, decode rate) where it reports them. Nothing here imports torch: the sweep's parent
process checks and summarizes points with these modules, and only a point's own process runs one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError
from harness.plugins import plugin_module

if TYPE_CHECKING:
    from runners.benches.measure import BenchContext, BenchOutput

# The benches, in the order they are listed to a user; bench `name` is the module runners.benches.<name>. The names
# are conf/bench/'s options (a test keeps the two equal).
BENCHES = ("smoke", "latency", "memory", "throughput", "e2e", "quality", "serve")


def bench_module(name: str) -> ModuleType:
    return plugin_module(
        "bench",
        name,
        {bench: f"{__name__}.{bench}" for bench in BENCHES},
        "pick one of those, or give your own as bench.name=package.module:function.",
        plural="benches",
    )


def _user_function(name: str) -> Callable[[BenchContext], BenchOutput]:
    module_name, _, attribute = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # not found, an empty name, or the user's module failing as it imports
        raise ConfigError(
            f"bench.name={name!r} names no importable function ({exc}).",
            "give `package.module:function` of a function that takes a BenchContext.",
        ) from exc


def resolve_bench(name: str) -> Callable[[BenchContext], BenchOutput]:
    """A built-in bench's run(), or a user's own given as `package.module:function`; ConfigError otherwise."""
    if ":" in name and name not in BENCHES:
        return _user_function(name)
    return bench_module(name).run


def bench_check(name: str, cfg: Any) -> None:
    """The bench's own pre-check of a point (its input files, say), run before anything loads or starts."""
    if name in BENCHES and hasattr(module := bench_module(name), "check"):
        module.check(cfg)


def exact_length_prompts(name: str) -> bool:
    """Whether the bench sends prompts of bench.prompt_lengths tokens and forces bench.max_new_tokens more."""
    return name in BENCHES and getattr(bench_module(name), "EXACT_LENGTH_PROMPTS", False)


def headline(name: str, metrics: dict[str, Any]) -> str:
    """The bench's own summary of its metrics; a user's bench gets the request figures where it has them."""
    if name in BENCHES:
        return bench_module(name).headline(metrics)
    from runners.benches.measure import request_headline

    return request_headline(metrics)
