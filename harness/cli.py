"""The `harness` console script: `models`, `info <model>`, `run …` (as python -m harness), `report <dir>…` and
`serve` (the OpenAI-compatible server).

`models` and `info` work offline: they read the model entries in conf/model/ and what is on this machine (the
hub cache, installed packages, the harness cache), and count parameters on torch's meta device (no memory).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any

from harness.config import EngineConfig, ModelConfig, group_options
from harness.errors import ConfigError, HarnessError, format_error
from harness.models.sources import availability

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "8bit": 1.0, "4bit": 0.5}


def model_entry(name: str) -> ModelConfig:
    """The validated entry conf/model/<name>.yaml, or ConfigError with the closest names."""
    options = group_options("model")
    if name not in options:
        close = difflib.get_close_matches(name, options, n=1)
        raise ConfigError(
            f"model {name!r} is not a known entry; the entries are: {', '.join(options)}."
            + (f" Did you mean '{close[0]}'?" if close else ""),
            "pick one of those, or add conf/model/<name>.yaml.",
        )
    from harness.config import load_config

    return load_config([f"model={name}"]).model


def architecture(cfg: ModelConfig) -> Any | None:
    """The model's transformers config: from the entry's architecture, else the hub cache, else None."""
    from transformers import AutoConfig

    if cfg.architecture:
        fields = dict(cfg.architecture)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    from harness.models.sources import hub_cached

    if cfg.hub_id and hub_cached(cfg.hub_id, cfg.revision):
        return AutoConfig.from_pretrained(cfg.hub_id, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    return None


def parameter_count(config: Any) -> int:
    """Parameters of the architecture, counted on the meta device (no memory is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.0f} KiB"


def cmd_models() -> int:
    rows = []
    for name in group_options("model"):
        cfg = model_entry(name)
        avail = availability(cfg)
        config = architecture(cfg)
        kind = getattr(config, "model_type", None) or "unknown offline (remote code)"
        size = (
            _size(avail.size_bytes)
            if avail.size_bytes
            else (f"~{_size(parameter_count(config) * 2)} bf16" if config is not None else "–")
        )
        rows.append((name, "yes" if avail.offline else "no", kind, size, avail.how))
    widths = [max(len(r[i]) for r in [("model", "offline", "architecture", "size", "source"), *rows]) for i in range(4)]
    header = ("model", "offline", "architecture", "size", "source")
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def cmd_info(name: str) -> int:
    import torch

    from harness.device import resolve_placement
    from harness.models.attention import flash_attn_installed, model_class_for

    cfg = model_entry(name)
    config = architecture(cfg)
    avail = availability(cfg)
    placement = resolve_placement(cfg.device, cfg.dtype)
    print(f"{name}")
    print(f"  source           {avail.how} (offline: {'yes' if avail.offline else 'no'})")
    print(f"  trust_remote_code {cfg.trust_remote_code}")
    print(f"  default here     {placement.device}, {placement.dtype} ({placement.reason})")
    if config is None:
        print("  architecture     unknown offline: its config is not in the hub cache (remote code).")
        return 0
    from harness.models.sources import context_window_of

    params = parameter_count(config)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    print(f"  architecture     {config.model_type}")
    print(f"  parameters       {params / 1e6:.1f} M")
    print(f"  layers           {layers}")
    print(f"  context length   {context_window_of(config)} tokens")
    estimates = ", ".join(f"{q} ~{_size(params * b)}" for q, b in BYTES_PER_PARAM.items())
    print(f"  weights memory   {estimates} (8bit/4bit quantize the linear layers only: real figures run higher)")
    cls = model_class_for(config)
    backends = ["eager"]
    if cls is not None and getattr(cls, "_supports_sdpa", False):
        backends.append("sdpa")
    flash_here = (
        cls is not None
        and getattr(cls, "_supports_flash_attn", False)
        and flash_attn_installed()
        and torch.cuda.is_available()
    )
    backends.append("flash2" if flash_here else "flash2 not here (needs flash-attn, CUDA, fp16/bf16)")
    print(f"  attention here   {', '.join(backends)}")
    return 0


def serve_settings(args: argparse.Namespace):
    """The server's settings from `harness serve`'s options; ConfigError for a bad one."""
    from harness.server import ServerSettings
    from harness.server.settings import parse_job_targets

    # `harness serve`'s options named as the settings' fields (and as the transformers engine's) carry over as they are.
    same = ("host", "port", "capacity", "memory_budget_mb", "max_tokens_limit", "max_body_bytes", "allow_remote_code",
            "jobs_dir", "job_max_seconds", "job_max_runs", "allow_downloads", "otlp_endpoint")  # fmt: skip
    engine_options = ("threads", "cache", "compile", "batching", "max_batch_requests")
    return ServerSettings(
        **{name: getattr(args, name) for name in same},
        model_dirs=args.model_dir,
        default_max_tokens=min(256, args.max_tokens_limit),
        job_targets=parse_job_targets(args.job_targets, args.job_target_key),
        engine=EngineConfig(
            **{name: getattr(args, name) for name in engine_options},
            # Per-request sampling unless the operator turns it off: every OpenAI client defaults to temperature 1.
            batch_sampling=args.batching == "continuous" if args.batch_sampling is None else args.batch_sampling,
            strict=True,  # an operator asked for it: a server that cannot compile says so at start
        ),
    )


def cmd_dashboard(argv: list[str]) -> int:
    """`harness dashboard [FOLDER] [--host H] [--port P]`: the dashboard alone over an outputs folder."""
    import uvicorn

    from harness.processes import TOKEN_ENV
    from harness.server.dashboard import create_dashboard_app

    parser = argparse.ArgumentParser(prog="harness dashboard", description="The live dashboard of an outputs folder.")
    parser.add_argument("folder", nargs="?", type=Path, default=Path("outputs"), help="default: outputs")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8050)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"harness dashboard: {args.folder} is not a folder; give the outputs folder sweeps write to.",
              file=sys.stderr)  # fmt: skip
        return 2
    token = os.environ.get(TOKEN_ENV) or None
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving {args.folder} on {args.host} with no token (set {TOKEN_ENV} to require one).",
              file=sys.stderr)  # fmt: skip
    print(f"dashboard of {args.folder} on http://{args.host}:{args.port}/dashboard/", file=sys.stderr)
    uvicorn.run(create_dashboard_app(args.folder, token), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until Ctrl-C."""
    import uvicorn

    from harness.server import create_app

    settings = serve_settings(args)
    warning = settings.exposure_warning()
    if warning:
        print(warning, file=sys.stderr)
    app = create_app(settings)
    server = app.state.server
    from harness.server.registry import UnknownModel

    for name in args.preload:
        print(f"loading {name} …", file=sys.stderr)
        try:
            server.worker.load(server.registry.spec(name)).result()
        except UnknownModel as exc:
            server.worker.stop()
            raise ConfigError(f"--preload {name}: {exc}", "preload a model that `harness models` lists.") from None
        except HarnessError:
            server.worker.stop()
            raise
    auth = "bearer token required" if settings.token else "no token (set HARNESS_API_TOKEN to require one)"
    print(f"serving on http://{settings.host}:{settings.port} ({auth}); API page: /docs", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark real LLMs: speed, memory, quality.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="the model entries: source, available offline, architecture, size")
    info = sub.add_parser("info", help="parameters, layers, context, memory per quantization, attention here")
    info.add_argument("model")
    sub.add_parser("run", help="run a point or a sweep: harness run [-m] group=option … (as python -m harness)")
    sub.add_parser("report", help="tables, plots and report.html of sweep folders (as python -m analysis)")
    sub.add_parser("runs", help="the sweeps under an outputs folder; --metric M: one figure across them, plotted")
    sub.add_parser("track", help="log a sweep's points to MLflow (those not logged yet): the retry after a failure")
    sub.add_parser("trace", help="send a sweep's points' traces to an OTLP receiver (--otlp-endpoint)")
    sub.add_parser("dashboard", help="the live dashboard of an outputs folder, read-only, no model loaded")
    serve = sub.add_parser("serve", help="an OpenAI-compatible server with model management and benchmark jobs")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-dir", action="append", default=[], help="a folder of checkpoints to serve by name")
    serve.add_argument("--preload", action="append", default=[], help="a model to load before serving")
    serve.add_argument("--capacity", type=int, default=2, help="models kept loaded (LRU)")
    serve.add_argument("--memory-budget-mb", type=int, default=None, help="summed footprint of loaded models")
    serve.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000)
    serve.add_argument("--jobs-dir", default="outputs/api-jobs", help="where benchmark jobs write their points")
    serve.add_argument("--job-max-seconds", type=float, default=3600.0, help="a benchmark job's wall-time limit")
    serve.add_argument("--job-max-runs", type=int, default=200, help="the most runs a benchmark job may ask for")
    serve.add_argument("--allow-remote-code", action="store_true", help="let entries needing trust_remote_code load")
    serve.add_argument(
        "--job-targets",
        action="append",
        default=[],
        metavar="[NAME=]URL[,…]",
        help="servers (exact OpenAI base URLs) that bench=serve jobs may load, picked by a job's `target`; by "
        "default a job loads only a server it launches on loopback",
    )
    serve.add_argument(
        "--job-target-key",
        action="append",
        default=[],
        metavar="NAME=VARIABLE",
        help="the environment variable holding a job target's API key (by its name or position)",
    )
    serve.add_argument(
        "--allow-downloads",
        action="store_true",
        help="list and load entries that are only on the hub (downloaded on first use); by default only what is "
        "on this machine",
    )
    serve.add_argument(
        "--batching",
        choices=("none", "continuous"),
        default="none",
        help="none: one request at a time; continuous: concurrent requests join a running batch",
    )
    serve.add_argument("--max-batch-requests", type=int, default=16, help="continuous: requests decoded together")
    serve.add_argument(
        "--batch-sampling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continuous: sample per request, so standard OpenAI clients (temperature 1 by default) are served "
        "(the default with --batching continuous); --no-batch-sampling: greedy-only batches, about 18%% faster on "
        "CPU, which refuse sampled requests",
    )
    serve.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="the KV cache of generate")
    serve.add_argument("--compile", action="store_true", help="torch.compile the decode step (needs --cache static)")
    serve.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    serve.add_argument("--otlp-endpoint", default=None, help="an OTLP/HTTP receiver (http://host:4318) that gets a "
                       "span per answered request (pip install -e '.[telemetry]')")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after `run` is Hydra's
        from harness.__main__ import main as run_main

        sys.argv = ["harness", *argv[1:]]
        return run_main()
    if argv and argv[0] == "report":
        from analysis.__main__ import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "runs":
        from analysis.history import main as runs_main

        return runs_main(argv[1:])
    if argv and argv[0] == "track":
        from harness.tracking import main as track_main

        return track_main(argv[1:])
    if argv and argv[0] == "dashboard":
        return cmd_dashboard(argv[1:])
    if argv and argv[0] == "trace":
        from harness.tracing import main as trace_main

        return trace_main(argv[1:])
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # configs built only to count parameters: no advice wanted
    try:
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_models() if args.command == "models" else cmd_info(args.model)
    except ConfigError as exc:
        print(format_error(exc), file=sys.stderr)
        return 2
    except HarnessError as exc:  # a preloaded model that cannot load here
        print(format_error(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
