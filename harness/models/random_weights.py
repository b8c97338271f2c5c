"""Random-weight checkpoints of real architectures, built locally with nothing downloaded.

Latency and memory of an architecture do not depend on its weight values (when the output length is forced),
so a full-size GPT-2 or Qwen2.5-0.5B can be benchmarked from its config alone, and tiny versions of the same
architectures make fast tests. The tokenizer is the hub's when the hub cache has it; otherwise a byte-level BPE
trained here on Python's own documentation (`pydoc_data.topics`, shipped with every CPython).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harness.models.cache import build_once, spec_digest

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Above this many parameters the checkpoint is stored in bfloat16 (random values lose nothing by it).
_BF16_STORE_ABOVE = 50_000_000


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def build_tokenizer(vocab_size: int = 1024, chat_template: str = "none"):
    """A deterministic byte-level BPE tokenizer (any text round-trips) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_training_text(), trainer)
    chatml = chat_template == "chatml"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>" if chatml else "<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1 << 30,
    )
    if chatml:
        tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def _hub_tokenizer(hub_id: str | None):
    if not hub_id:
        return None
    from harness.models.sources import hub_cached

    if not hub_cached(hub_id):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except Exception:  # tokenizer files missing from the cache: fall back to the local tokenizer
        return None


def build_random_checkpoint(
    name: str,
    architecture: dict[str, Any],
    tokenizer_spec: dict[str, Any] | None,
    hub_id: str | None,
    seed: int,
    cache_dir: Path,
) -> tuple[Path, bool]:
    """Return (checkpoint folder, built_now) for random weights of `architecture`, built once per spec."""
    spec = {
        "v": _FORMAT_VERSION,
        "architecture": architecture,
        "tokenizer": tokenizer_spec,
        "hub": hub_id,
        "seed": seed,
    }
    target = cache_dir / "random" / f"{name}-{spec_digest(spec)[:16]}"

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = dict(architecture)
        model_type = fields.pop("model_type")
        tokenizer = _hub_tokenizer(hub_id)
        tokenizer_kind = f"hub tokenizer of {hub_id} (from the local cache)"
        if tokenizer is None:
            spec_t = tokenizer_spec or {}
            vocab = min(int(spec_t.get("vocab_size", 1024)), int(fields.get("vocab_size", 1024)))
            tokenizer = build_tokenizer(vocab, spec_t.get("chat_template", "chatml"))
            tokenizer_kind = f"byte-level BPE ({vocab} tokens) trained on pydoc_data.topics"
            fields.update(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        if n_params > _BF16_STORE_ABOVE:
            model = model.to(torch.bfloat16)
        log.info("building random-weight %s (%.1fM parameters) into %s", name, n_params / 1e6, target)
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"random_weights": True, "seed": seed, "parameters": n_params, "tokenizer": tokenizer_kind}

    return build_once(target, build)
