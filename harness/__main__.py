"""`python -m harness [-m] group=option …`: a thin Hydra entry point around runners.run_point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from harness.config import GROUPS, check_group_choices, conf_dir, register_schemas, validate
from harness.errors import ConfigError, format_error

log = logging.getLogger("harness")
_statuses: list[str] = []  # one per point run in this process


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _point(cfg: DictConfig) -> None:
    try:
        validated = validate(cfg)
    except ConfigError as exc:  # a user mistake: stop the whole run before any model is touched
        print(format_error(exc), file=sys.stderr)
        raise SystemExit(2) from None
    from runners import run_point, summary_line

    _quiet_libraries()
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    point = {g: str(hc.runtime.choices.get(g, getattr(validated, g).name)) for g in GROUPS}
    result = run_point(validated, out_dir, point)
    _statuses.append(result.status)
    if result.status == "ok" and validated.print_text and result.outputs:
        print(f"\n{point['model']}> {result.outputs[0]['text'].strip()}")
    print(summary_line(result, out_dir), flush=True)


def main() -> int:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    register_schemas()
    _point()
    failed = sum(s != "ok" for s in _statuses)
    if len(_statuses) > 1:
        print(f"{len(_statuses) - failed} of {len(_statuses)} points ok" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
