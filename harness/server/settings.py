"""What a server is allowed to do, fixed when it starts; no request can change it."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import EngineConfig, check_base_url, check_key_env
from harness.errors import ConfigError
from harness.processes import TOKEN_ENV

_TARGET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class JobTarget:
    """A server the operator lets benchmark jobs load (`--job-targets`): its exact base URL, and the environment
    variable holding its key, named by the operator at start-up, never by a job."""

    name: str
    base_url: str
    key_env: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"name": self.name, "base_url": self.base_url, "key_env": self.key_env}


def parse_job_targets(specs: list[str], keys: list[str]) -> list[JobTarget]:
    """`--job-targets [NAME=]URL[,…]` (repeatable) and `--job-target-key NAME=VARIABLE` (repeatable): a target
    without a name is named by its position (0, 1, …)."""
    items = [item.strip() for spec in specs for item in spec.split(",") if item.strip()]
    named: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        name, sep, url = item.partition("=")
        if not sep or "://" in name:  # a bare URL (whose query may hold '=')
            name, url = str(i), item
        elif not _TARGET_NAME.match(name):
            raise ConfigError(
                f"--job-targets {item!r}: {name!r} is not a target name (a letter, then letters, digits, . _ -).",
                "write each target as URL or NAME=URL, e.g. --job-targets vllm=http://10.0.0.5:8000/v1.",
            )
        check_base_url("--job-targets", url)
        named.append((name, url.rstrip("/")))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"--job-targets names a target twice ({', '.join(names)}).", "give each a name of its own.")
    key_of: dict[str, str] = {}
    for spec in keys:
        name, sep, variable = spec.partition("=")
        if not sep or name not in names:
            raise ConfigError(
                f"--job-target-key {spec!r} does not name a target of --job-targets ({', '.join(names) or 'none'}).",
                "write it as NAME=VARIABLE, with NAME a target's name (or its position) and VARIABLE the environment "
                "variable that holds that server's key.",
            )
        check_key_env("--job-target-key", variable)
        key_of[name] = variable
    return [JobTarget(name, url, key_of.get(name)) for name, url in named]


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token every request (but /health) must carry; default: $HARNESS_API_TOKEN
    model_dirs: list[str] = field(default_factory=list)  # folders whose sub-folders are servable checkpoints
    capacity: int = 2  # models kept loaded (least recently used is unloaded first)
    memory_budget_mb: int | None = None  # and their summed footprint
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask
    default_max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    max_queue: int = 64  # generation requests waiting for the engine; more get 503
    allow_remote_code: bool = False  # entries that need trust_remote_code load only when the operator allows it
    # Entries whose weights are only on the hub are listed and loaded (downloaded on first use) only when the
    # operator allows it; otherwise a request for one is answered 503 at once instead of after the hub's retries.
    allow_downloads: bool = False
    cache_dir: str = "~/.cache/harness"
    jobs_dir: str = "outputs/api-jobs"
    dashboard_dir: str | None = None  # the outputs folder /dashboard shows; None: the jobs folder's parent
    max_parallel_jobs: int = 1  # benchmark jobs run one at a time by default: parallel timings disturb each other
    job_max_seconds: float = 3600.0  # a job's wall time; past it its process group is killed
    job_max_runs: int = 200  # bench.max_runs, warm-up runs and requests per concurrency level of a job
    # The only servers other than their own that jobs may load (bench=serve), each picked by a job's `target`.
    job_targets: list[JobTarget] = field(default_factory=list)
    # How the transformers engine runs every served model (batching=continuous lets concurrent requests share the
    # decode; cache/compile/threads as in conf/engine/transformers.yaml).
    engine: EngineConfig = field(default_factory=EngineConfig)
    # An OTLP/HTTP receiver (http://host:4318) that gets a span per answered request (harness.tracing).
    otlp_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
        self.cache_dir = os.path.expanduser(os.environ.get("HARNESS_CACHE_DIR") or self.cache_dir)
        checks = [
            (0 <= self.port <= 65535, "port", "between 0 and 65535"),
            (self.capacity >= 1, "capacity", ">= 1"),
            (self.memory_budget_mb is None or self.memory_budget_mb > 0, "memory_budget_mb", "> 0"),
            (self.max_tokens_limit >= 1, "max_tokens_limit", ">= 1"),
            (1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens", "in 1..max_tokens_limit"),
            (self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024"),
            (self.max_queue >= 1, "max_queue", ">= 1"),
            (self.max_parallel_jobs >= 1, "max_parallel_jobs", ">= 1"),
            (self.job_max_seconds > 0, "job_max_seconds", "> 0"),
            (self.job_max_runs >= 1, "job_max_runs", ">= 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"server setting {name}={getattr(self, name)!r} must be {rule}.", f"fix --{name}.")
        if self.otlp_endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.otlp_endpoint):
            raise ConfigError(f"--otlp-endpoint {self.otlp_endpoint!r} is not an http(s)://host:port URL.",
                              "give the OTLP/HTTP receiver's URL, e.g. http://127.0.0.1:4318.")  # fmt: skip
        for folder in self.model_dirs:
            if not Path(folder).expanduser().is_dir():
                raise ConfigError(f"--model-dir {folder} is not a folder.", "give a folder of model checkpoints.")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def exposure_warning(self) -> str | None:
        """A warning when the server is reachable from other machines without a token."""
        if self.loopback or self.token:
            return None
        return (
            f"warning: serving on {self.host}, reachable from other machines, with no token: anyone who can reach "
            f"port {self.port} can run models and benchmark jobs here. Set {TOKEN_ENV} to require a bearer token, "
            "or bind to 127.0.0.1."
        )
