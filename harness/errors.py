"""The errors a user can cause, each carrying its cause and its fix.

Every error a user can meet derives from HarnessError, which holds two sentences: what went wrong (`cause`)
and what to do about it (`fix`). The entry point prints `str(error)` as one paragraph and exits non-zero; a
sweep point records `error_record()` in its result.json.
"""

from __future__ import annotations


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


def format_error(error: BaseException) -> str:
    """One paragraph for a person: the error's class, its cause and its fix."""
    if isinstance(error, HarnessError):
        return f"{type(error).__name__}: {error.cause} Fix: {error.fix}"
    return f"{type(error).__name__}: {error}"
