"""Child processes the harness starts: they die with their parent, and a job's process sees only a clean
environment.

A point's process and a server launched for a point each run in a process group of their own (so a signal reaches
them and their children, and nothing else). A group of its own also means that nothing stops them when the
process that started them is killed outright (SIGKILL, the OOM killer): Linux's parent-death signal does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping

_PR_SET_PDEATHSIG = 1
# The variable holding `harness serve`'s bearer token.
TOKEN_ENV = "HARNESS_API_TOKEN"


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):  # not glibc, or no prctl: nothing to ask for
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


def usable_cpus(cpus: list[int] | None, field_name: str) -> set[int] | None:
    """`cpus` checked against the CPUs this process may run on (Linux's affinity mask), or None when not set."""
    if not cpus:
        return None
    if not hasattr(os, "sched_getaffinity"):
        from harness.errors import ConfigError

        raise ConfigError(
            f"{field_name} pins processes to CPUs, which this system ({sys.platform}) does not let a program do.",
            f"drop {field_name} here (Linux only).",
        )
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        from harness.errors import ConfigError

        raise ConfigError(
            f"{field_name}={sorted(cpus)} names CPUs this process may not use; it may use {sorted(allowed)}.",
            f"give {field_name} a list from those.",
        )
    return set(cpus)


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process (and the processes it starts meanwhile) runs on `cpus` only, then on what it had before."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux; elsewhere nothing)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signum)


def dies_with_this_process(signum: int = signal.SIGKILL, cpus: set[int] | None = None) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child gets `signum` when this process dies, however it dies, and
    runs on `cpus` only where given (set before it starts, so every thread and process it makes inherits them).

    The kernel ties the signal to the thread that starts the child, so start long-lived children from a thread
    that lives as long as they should (the main thread, or a worker that outlives them). None off Linux.
    """
    prctl = _prctl()  # looked up here: the child, between fork and exec, must only call it
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


# The variables a benchmark job's process keeps from the server's environment: what a point needs to find its
# programs, caches, devices, thread settings and locale. A name on the list that looks like a credential is still
# dropped, so HARNESS_API_TOKEN (a HARNESS_ variable) never reaches a job.
JOB_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
        "LD_LIBRARY_PATH", "CC", "CXX", "CUDA_HOME", "CUDA_PATH",
        "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE",
        "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
        "NUMEXPR_NUM_THREADS", "TOKENIZERS_PARALLELISM",
        "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
    }
)  # fmt: skip
JOB_ENV_PREFIXES = ("LC_", "HARNESS_")
_CREDENTIAL = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.IGNORECASE)


def looks_like_credential(name: str) -> bool:
    return bool(_CREDENTIAL.search(name))


def job_environment(source: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark job's process: the listed variables of `source` (default: this process's),
    never one that looks like a credential, plus `extra` (what the server itself decided the job gets)."""
    source = os.environ if source is None else source
    kept = {
        name: value
        for name, value in source.items()
        if (name in JOB_ENV_NAMES or name.startswith(JOB_ENV_PREFIXES)) and not looks_like_credential(name)
    }
    return {**kept, **(extra or {})}
