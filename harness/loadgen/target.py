"""Which server a point talks to: the plan from engine=openai|vllm's fields or bench=serve's target, the options a
launched harness server gets, the name the model is served under, and the server a loaded point holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from harness.config import EngineConfig, HarnessConfig
from harness.errors import InferenceError
from harness.loadgen.client import Endpoint
from harness.loadgen.launch import LaunchedServer, log_tail


@dataclass
class RemoteModel:
    """What LoadedModel.model holds for a server: where to send requests, and the launched server (None when it
    was already running)."""

    endpoint: Endpoint
    server: LaunchedServer | None = None
    relaunch: Callable[[], LaunchedServer] | None = None  # starts the launched server again, as it was started

    def restart(self) -> float | None:
        """Stop the launched server and start it again as it was: a fresh state (no prefix cache, no warmed
        allocator or compiled graphs). Its seconds to start; None for a server the point did not launch (a running
        server is not the point's to restart)."""
        if self.server is None or self.relaunch is None:
            return None
        self.server.stop()
        self.server = self.relaunch()
        self.endpoint = dataclasses.replace(self.endpoint, base_url=self.server.base_url)
        return self.server.startup_s

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def check_alive(self) -> None:
        """A launched server that died fails the point with its log's tail."""
        if self.server is not None and not self.server.alive():
            raise InferenceError(
                f"the launched {self.server.kind} server exited (status {self.server.process.returncode}) during the "
                f"point. Its log ({self.server.log_path}) ends:\n{log_tail(self.server.log_path)}",
                "fix the cause the log names (out of memory, a crash in the engine); the sweep goes on.",
            )


@dataclass(frozen=True)
class ServerPlan:
    """Which server a point talks to, from engine=openai|vllm's fields or bench=serve's target."""

    launch: str  # none | harness | llamacpp_server | vllm
    base_url: str | None
    api: str
    api_key_env: str | None
    served_model: str | None
    request_timeout_s: float


def server_plan(cfg: HarnessConfig) -> ServerPlan:
    e, b = cfg.engine, cfg.bench
    if b.name == "serve" and b.target != "engine":
        launch_kind = "none" if b.target == "url" else b.target
        return ServerPlan(launch_kind, b.base_url, b.api, b.api_key_env, b.served_model, b.request_timeout_s)
    return ServerPlan(e.launch, e.base_url, e.api, e.api_key_env, e.served_model, e.request_timeout_s)


def harness_engine_args(engine: EngineConfig, launch_kind: str) -> list[str]:
    """The engine's options a launched server runs: bench=serve target=harness with engine=transformers options
    (batching, cache, compile, threads), and for vLLM and llama.cpp's server engine.n_ctx as its context
    (--max-model-len, --n_ctx) where engine.server_args does not give one, so one sweep over targets gives every
    server the same window."""
    if launch_kind == "llamacpp_server":
        given = engine.n_ctx and "--n_ctx" not in engine.server_args
        return ["--n_ctx", str(engine.n_ctx)] if given else []
    if launch_kind == "mii":
        return ["--tensor-parallel", str(engine.tensor_parallel)] if engine.tensor_parallel > 1 else []
    if launch_kind == "vllm":
        from harness.loadgen.launch import DEFAULT_ARGS

        parallel = []
        for flag, size in (("--tensor-parallel-size", engine.tensor_parallel),
                           ("--pipeline-parallel-size", engine.pipeline_parallel)):  # fmt: skip
            if size > 1 and flag not in engine.server_args:
                parallel += [flag, str(size)]
        if engine.n_ctx and "--max-model-len" not in engine.server_args:
            defaults = [] if engine.server_args else DEFAULT_ARGS["vllm"]
            at = defaults.index("--max-model-len") if "--max-model-len" in defaults else None
            rest = defaults[:at] + defaults[at + 2 :] if at is not None else defaults
            return [*rest, "--max-model-len", str(engine.n_ctx), *parallel]
        if parallel and not engine.server_args:
            return [*DEFAULT_ARGS["vllm"], *parallel]  # the defaults still apply beside the parallel sizes
        return parallel
    if launch_kind != "harness" or engine.name != "transformers":
        return []
    args = []
    if engine.batching != "none":
        args += ["--batching", engine.batching, "--max-batch-requests", str(engine.max_batch_requests)]
        args.append("--batch-sampling" if engine.batch_sampling else "--no-batch-sampling")
    if engine.cache != "dynamic":
        args += ["--cache", engine.cache]
    if engine.compile:
        args.append("--compile")
    if engine.threads is not None:
        args += ["--threads", str(engine.threads)]
    return args


def served_name(cfg: HarnessConfig, plan: ServerPlan) -> str:
    if plan.served_model:
        return plan.served_model
    if plan.launch == "harness" and cfg.quant.name != "none":
        return f"{cfg.model.name}:{cfg.quant.name}"  # the harness server's registry name of a quantized entry
    return cfg.model.name
