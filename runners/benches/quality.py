"""bench=quality: perplexity of the model on a fixed slice of the built-in corpus, by sliding window.

The slice is the first bench.ppl_chars characters of Python's documentation topics, the same text for every
model. Windows of ppl_window tokens advance by ppl_stride; each window scores only its tokens not scored
before, with the rest as context, so every token after the first is scored exactly once with at least
ppl_window - ppl_stride tokens of context (except near the start). Perplexity depends on the tokenizer, so
models with different tokenizers are compared by bits per byte (the same total NLL over the text's UTF-8 bytes).
"""

from __future__ import annotations

import math
from typing import Any

from harness.errors import InferenceError
from harness.prompts import builtin_text
from harness.stats import summarize
from runners.benches.measure import BenchContext, BenchOutput


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window; the scored tokens of all windows tile 1..n_tokens-1 exactly."""
    spans, scored_to = [], 1  # token 0 has nothing before it to predict it
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > scored_to:
            spans.append((begin, end, end - scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return spans


def run(ctx: BenchContext) -> BenchOutput:
    bench = ctx.cfg.bench
    text = builtin_text()[: bench.ppl_chars]
    ids = ctx.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    window = bench.ppl_window
    if ctx.loaded.context_window is not None and window > ctx.loaded.context_window:
        window = ctx.loaded.context_window
    stride = min(bench.ppl_stride, window - 1)
    if len(ids) < 2:
        raise InferenceError(
            f"the scored text encodes to {len(ids)} token(s).", "raise bench.ppl_chars so there is text to score."
        )
    total_nll, scored, per_window = 0.0, 0, []
    spans = windows(len(ids), window, stride)
    for n, (begin, end, n_scored) in enumerate(spans):
        ctx.progress(f"perplexity window {n + 1}/{len(spans)}")
        nll = ctx.engine.token_nll(ids[begin:end], n_scored)
        total_nll += nll
        scored += n_scored
        per_window.append(nll / n_scored)
    mean_nll = total_nll / scored
    n_bytes = len(text.encode("utf-8"))
    out = BenchOutput()
    out.metrics["perplexity"] = summarize([math.exp(mean_nll)], "ppl")
    out.metrics["nll_per_token"] = summarize([mean_nll], "nats")
    out.metrics["bits_per_byte"] = summarize([total_nll / math.log(2) / n_bytes], "bits/byte")
    out.metrics["scored_tokens"] = summarize([float(scored)], "tokens")
    for n, value in enumerate(per_window):
        out.samples.append(("quality", "window", n, "", "nll_per_token", value, "nats"))
    out.details = {
        "text": f"the first {len(text)} characters of pydoc_data.topics (sorted topics, blank-line joined)",
        "text_bytes": n_bytes,
        "tokens": len(ids),
        "scored_tokens": scored,
        "window": window,
        "stride": stride,
        "windows": len(spans),
        "special_tokens_added": False,
    }
    return out


def headline(metrics: dict[str, Any]) -> str:
    if "perplexity" not in metrics:
        return ""
    return (
        f"perplexity {metrics['perplexity']['mean']:.2f} over {metrics['scored_tokens']['mean']:.0f} tokens, "
        f"{metrics['bits_per_byte']['mean']:.3f} bits/byte"
    )
