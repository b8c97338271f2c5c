"""The client's running token count of a streamed text: every prefix read as the whole text would be read, at a
cost that grows with the text, not with its square (docs/metrics.md, "A server under load")."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.loadgen.figures import RunningTokenCount
from harness.prompts import builtin_text
from tests.conftest import SMOLLM2

TEXT = builtin_text()
# Real text, and text that stresses boundaries: accents, CJK, emoji (several byte tokens per character), runs
# of spaces, tabs and newlines.
SAMPLES = st.one_of(
    st.integers(0, len(TEXT) - 2000).flatmap(lambda i: st.integers(1, 2000).map(lambda n: TEXT[i : i + n])),
    st.lists(st.sampled_from([*"ab ck.\n\téü日本語😀🎉—'\"", "  ", "\n\n", "ing", "the"]), max_size=200).map("".join),
)


def _models():
    return ["tiny-gpt2", "tiny-qwen2"] + (["smollm2"] if SMOLLM2 else [])


@pytest.mark.parametrize("model", _models())
def test_every_prefix_is_counted_as_the_whole_text_would_be(load, model):
    tokenizer = load(model).tokenizer
    assert tokenizer.is_fast  # the incremental path, not the whole-text fallback

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=SAMPLES, cuts=st.lists(st.integers(1, 16), min_size=1, max_size=50))
    def check(text, cuts):
        running, i, k = RunningTokenCount(tokenizer), 0, 0
        while i < len(text):
            piece = text[i : i + cuts[k % len(cuts)]]
            i, k = i + len(piece), k + 1
            assert running.add(piece) == tokenizer(text[:i], add_special_tokens=False)["input_ids"]

    check()


class _Metered:
    """A fast tokenizer that counts the characters it is asked to read."""

    is_fast = True

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.read = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.read += len(text)
        return self.tokenizer(text, **kwargs)


def test_a_long_answer_is_read_a_bounded_number_of_times(load):
    metered = _Metered(load("tiny-gpt2").tokenizer)
    running = RunningTokenCount(metered)
    answer = TEXT[:20_000]
    for i in range(0, len(answer), 4):  # 5000 chunks of 4 characters, as a server streams a long answer
        running.add(answer[i : i + 4])
    assert running.ids == metered.tokenizer(answer, add_special_tokens=False)["input_ids"]
    # Re-reading the whole text per chunk would read about 50 million characters; the running count reads each
    # character a few times (its chunk plus CONTEXT tokens before it).
    assert metered.read < 30 * len(answer)


def test_a_tokenizer_without_offsets_is_read_whole():
    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    running = RunningTokenCount(Words())
    assert running.add("one tw") == [3, 2] and running.add("o three") == [3, 3, 5]
