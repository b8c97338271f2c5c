import pytest

from harness.chat import CHATML_STOP, PLAIN_STOP, chatml, format_chat, plain
from harness.errors import InferenceError

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
]


def test_chatml_exact_string():
    assert chatml(CHAT) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_plain_transcript_exact_string():
    assert plain(CHAT) == (
        "System: You are terse.\n\nUser: Hi\nAssistant: Hello.\nUser: Capital of France?\nAssistant:"
    )


def test_formats_come_with_their_stop_sequences():
    assert format_chat(CHAT, "chatml", None)[1] == CHATML_STOP
    assert format_chat(CHAT, "plain", None)[1] == PLAIN_STOP


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}]])
def test_bad_messages_are_refused(bad):
    with pytest.raises(InferenceError):
        chatml(bad)


def test_unknown_format_is_refused():
    with pytest.raises(InferenceError, match="unknown"):
        format_chat(CHAT, "xml", None)


def test_template_format_uses_the_tokenizers_template(load):
    loaded = load("tiny-qwen2")
    text, stop = format_chat(CHAT[1:2], "template", loaded.tokenizer)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert stop == ()
