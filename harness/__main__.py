"""`python -m harness [-m] group=option …`: a thin Hydra entry point around runners.execute_point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from harness.config import GROUPS, check_group_choices, conf_dir, register_schemas, validate
from harness.errors import ConfigError, format_error

_outcomes: list[tuple[str, str]] = []  # (status, summary line) of each point run in this process


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _point(cfg: DictConfig) -> None:
    from runners import execute_point, summary_line
    from runners.e2e import below_gate
    from runners.point import preflight

    try:
        validated = validate(cfg)
        preflight(validated)
    except ConfigError as exc:  # a user mistake: stop the whole run before any model is touched
        print(format_error(exc), file=sys.stderr)
        raise SystemExit(2) from None

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    point = {g: str(hc.runtime.choices.get(g, getattr(validated, g).name)) for g in GROUPS}
    result, skipped = execute_point(validated, out_dir, point)
    line = summary_line(result, out_dir)
    if skipped:
        line = "[skipped: already ok] " + line.split("] ", 1)[1]
    elif result.status == "ok" and validated.print_text and result.outputs and validated.bench.name == "smoke":
        print(f"\n{point['model']}> {result.outputs[0]['text'].strip()}")
    gate = below_gate(result, validated.validation.min_pass_rate)
    if gate:
        line += "\n  " + gate
    _outcomes.append(("below_gate" if gate else result.status, line))
    print(line, flush=True)


def main() -> int:
    args = sys.argv[1:]
    try:
        check_group_choices(args)
    except ConfigError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    from runners.sweep import sweep_id

    if any(a.startswith("hydra/launcher=joblib") for a in args):
        print(
            "warning: hydra/launcher=joblib runs points in parallel; they share the cores and memory bandwidth, "
            "so their timings disturb each other. Use it for quality or smoke sweeps, not for latency figures.",
            file=sys.stderr,
        )

    # The same sweep command writes to the same folder, so running it again resumes it.
    os.environ["HARNESS_SWEEP_ID"] = sweep_id(args)
    register_schemas()
    _point()
    from runners.sweep import last_sweep_dir, results_in

    if not _outcomes and last_sweep_dir:  # a launcher ran the points in other processes: read what they left
        from runners.e2e import below_gate

        for r in results_in(last_sweep_dir[0]):
            point = " ".join(f"{k}={v}" for k, v in r.point.items() if k in GROUPS)
            gate = below_gate(r, r.config.get("validation", {}).get("min_pass_rate"))
            line = f"[{r.status}] {point}" + (f" ({gate})" if gate else "")
            _outcomes.append(("below_gate" if gate else r.status, line))
    failed = sum(status == "failed" for status, _ in _outcomes)
    gated = sum(status == "below_gate" for status, _ in _outcomes)
    if len(_outcomes) > 1:
        print(f"\nsweep summary ({len(_outcomes)} points):")
        for _, line in _outcomes:
            print("  " + line.splitlines()[0])
        ok = len(_outcomes) - failed - gated
        tail = (f", {failed} failed" if failed else "") + (f", {gated} below the release gate" if gated else "")
        print(f"{ok} of {len(_outcomes)} points ok" + tail)
    if failed:
        return 1
    return 3 if gated else 0


if __name__ == "__main__":
    sys.exit(main())
