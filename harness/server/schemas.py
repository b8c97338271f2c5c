"""Request bodies of the OpenAI-compatible endpoints, checked by pydantic (wrong types and out-of-range values
are answered 400 with the field named), and the harness's own bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr


def _whole_characters(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (\\ud800), which is no character: no tokenizer can encode it."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(
                f"the text holds a lone UTF-16 surrogate (U+{ord(ch):04X}) at character {i}, which is not a "
                "character; send valid Unicode (a pair of surrogates encodes one character)"
            )
    return text


Text = Annotated[StrictStr, AfterValidator(_whole_characters)]


class _Body(BaseModel):
    # OpenAI clients send fields the harness does not use (user, metadata, …): accepted and ignored, unless a
    # field below says otherwise.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only 1: the engine answers one completion per request")
    presence_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: only 0")
    # vLLM's extensions, so load tests force the output length: at least min_tokens, or exactly max_tokens.
    min_tokens: int = Field(default=0, ge=0, description="generate at least this many tokens (EOS is held back)")
    ignore_eos: StrictBool = Field(default=False, description="hold EOS back until max_tokens")
    top_k: int = Field(default=0, ge=-1, description="sample from the k likeliest tokens; 0 or -1 = off")

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    # Text, or token ids (OpenAI's API takes both): a load test sends a prompt of an exact length as ids.
    prompt: Text | list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class BenchmarkRequest(_Body):
    model_config = ConfigDict(extra="forbid")
    overrides: list[StrictStr] = Field(default_factory=list, max_length=64)
    target: StrictStr | int | None = Field(
        default=None,
        description="one of the operator's --job-targets, by name or position: the server a bench=serve job loads",
    )
