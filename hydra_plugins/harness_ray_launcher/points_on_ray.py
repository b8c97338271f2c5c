"""The launcher class conf/hydra/launcher/ray.yaml names; the work is runners.ray_launcher's."""

from __future__ import annotations

from typing import Any

from hydra.plugins.launcher import Launcher


class PointsOnRayLauncher(Launcher):
    def __init__(self, ray: Any) -> None:
        from runners.ray_launcher import PointsOnRay

        self.impl = PointsOnRay(ray)

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        return self.impl.launch(job_overrides, initial_job_idx)
