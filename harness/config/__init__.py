"""Typed schemas of the config groups, and their validation.

Each group (conf/<group>/*.yaml) has one dataclass: `groups` (model, quant, attention, workflow, validation),
`engine`, `bench`; `point` holds them together as HarnessConfig with the checks that span groups; `options` reads
conf/ and fixes the values fields take; `checks` has the field checks they share; `compose` turns overrides into a
validated point. Hydra composes a point, `validate()` turns it into these objects once (`OmegaConf.to_object`),
and each `__post_init__` checks values, so a bad value fails before any model is touched, with a ConfigError that
names the field, the value and what is allowed. Nothing here imports the models, engines or benches.
"""

from harness.config.bench import BenchConfig, SloConfig
from harness.config.checks import check_base_url, check_key_env
from harness.config.compose import (
    check_group_choices,
    compose_config,
    flatten,
    load_config,
    register_schemas,
    validate,
)
from harness.config.engine import EngineConfig
from harness.config.groups import (
    AttentionConfig,
    CostConfig,
    GgufPart,
    ModelConfig,
    QuantConfig,
    TelemetryConfig,
    ValidationConfig,
    WorkflowConfig,
    parse_gguf_parts,
)
from harness.config.options import (
    GROUPS,
    HTTP_ENGINES,
    NOT_MEASURED,
    PARALLEL_LAUNCHES,
    QUANT_ENGINES,
    conf_dir,
    engine_choices,
    engine_fields,
    group_options,
)
from harness.config.point import HarnessConfig

__all__ = [
    "GROUPS",
    "HTTP_ENGINES",
    "NOT_MEASURED",
    "PARALLEL_LAUNCHES",
    "QUANT_ENGINES",
    "AttentionConfig",
    "BenchConfig",
    "CostConfig",
    "EngineConfig",
    "GgufPart",
    "HarnessConfig",
    "ModelConfig",
    "QuantConfig",
    "SloConfig",
    "TelemetryConfig",
    "ValidationConfig",
    "WorkflowConfig",
    "check_base_url",
    "check_group_choices",
    "check_key_env",
    "compose_config",
    "conf_dir",
    "engine_choices",
    "engine_fields",
    "flatten",
    "group_options",
    "load_config",
    "parse_gguf_parts",
    "register_schemas",
    "validate",
]
