"""The errors a user can cause, each carrying its cause and its fix.

Every error a user can meet derives from HarnessError, which holds two sentences: what went wrong (`cause`)
and what to do about it (`fix`). The entry point prints `str(error)` as one paragraph and exits non-zero; a
sweep point records `error_record()` in its result.json.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class HarnessError(Exception):
    """Base of every error a user can cause; never raised itself."""

    def __init__(self, cause: str, fix: str) -> None:
        self.cause = cause.rstrip()
        self.fix = fix.rstrip()
        super().__init__(f"{self.cause} Fix: {self.fix}")

    def error_record(self) -> dict[str, str]:
        return {"type": type(self).__name__, "message": self.cause, "hint": self.fix}


class ConfigError(HarnessError):
    """A config value is wrong: names the field, the bad value and the allowed values."""


class ModelLoadError(HarnessError):
    """A model's weights, tokenizer or files could not be found or read."""


class QuantizationError(HarnessError):
    """The requested quantization cannot run here (missing package, unsupported device)."""


class InferenceError(HarnessError):
    """Generation failed or was asked for with parameters the model cannot honour."""


class OutOfMemoryError(HarnessError):
    """A load or a generation ran out of host or device memory."""


def did_you_mean(value: object, options: Iterable[str]) -> str:
    """ " Did you mean 'x'?" for the option closest to a mistyped value, or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# What backends say when an allocation fails: torch (CPU and CUDA), ONNX Runtime's C++ allocator, glibc.
_OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "bad_alloc", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from any backend means memory ran out (torch's OutOfMemoryError is recognised by name,
    so this module never imports torch)."""
    if isinstance(exc, MemoryError | OutOfMemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, HarnessError) or not isinstance(exc, Exception):
        return False
    return any(w in str(exc).lower() for w in _OUT_OF_MEMORY_WORDS)


def out_of_memory(exc: BaseException, what: str, fix: str) -> OutOfMemoryError:
    """The one OutOfMemoryError of the harness: what ran out, the backend's first line, and the fix."""
    if isinstance(exc, OutOfMemoryError):
        return exc
    detail = str(exc).splitlines()[0] if str(exc) else "an allocation was refused"
    return OutOfMemoryError(f"{what} ran out of memory ({type(exc).__name__}: {detail}).", fix)


def format_error(error: BaseException) -> str:
    """One paragraph for a person: the error's class, its cause and its fix."""
    if isinstance(error, HarnessError):
        return f"{type(error).__name__}: {error.cause} Fix: {error.fix}"
    return f"{type(error).__name__}: {error}"


class StorageError(HarnessError):
    """A folder or file the harness must write cannot be written: read-only, full, or not permitted."""


_STORAGE_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or point the run elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there, or point the run elsewhere",
    errno.EROFS: "the file system is read-only: point the run at a writable folder",
    errno.EACCES: "this user may not write there: fix its permissions, or point the run at a writable folder",
    errno.EPERM: "this user may not write there: fix its permissions, or point the run at a writable folder",
}


def storage_error(exc: OSError, what: str, where: str | None = None, how_to_move: str = "") -> StorageError:
    """An OSError from writing, as a StorageError naming the path, the reason and the fix."""
    path = exc.filename or where or "?"
    reason = exc.strerror or str(exc)
    fix = _STORAGE_FIXES.get(exc.errno or 0, "check that the folder exists and can be written")
    return StorageError(
        f"could not write {what} at {path}: {reason}.", fix + (f" ({how_to_move})" if how_to_move else "") + "."
    )


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _STORAGE_FIXES


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM reached a run: a KeyboardInterrupt, so every `except KeyboardInterrupt` path
    that records an interrupted point handles SIGTERM the same way; never an Exception, so no launcher records
    it as a point's own failure."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)
