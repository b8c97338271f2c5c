"""`python -m runners <point dir>`: one sweep point in its own process (started by runners.execute)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig
from harness.result import write_result
from runners.execute import FAULT_LOG, POINT_FILE, set_memory_limit


def main(out_dir: Path) -> int:
    """The point's own process: rebuild the validated config, apply the memory limit, run, exit 0 when ok."""
    import faulthandler

    from omegaconf import OmegaConf

    from runners.point import run_point

    fault_log = (out_dir / FAULT_LOG).open("w")
    faulthandler.enable(file=fault_log)
    spec: dict[str, Any] = json.loads((out_dir / POINT_FILE).read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HarnessConfig), spec["config"]))
    assert isinstance(cfg, HarnessConfig)
    set_memory_limit(cfg.point_memory_limit_mb)
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    result = run_point(cfg, out_dir, spec["point"], attempt=spec["attempt"], digest=spec["config_digest"])
    result.timings["process_s"] = time.perf_counter() - t0
    write_result(out_dir, result)
    faulthandler.disable()
    fault_log.close()
    (out_dir / FAULT_LOG).unlink(missing_ok=True)
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
