"""Traces and datasets to replay: every format read as its source defines it, and every bad file refused with
the file, the row and the fix (before any server starts: tests/test_serve_bench.py runs the command line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.loadgen.datasets import load_dataset
from harness.loadgen.traces import load_trace

FIXTURES = Path(__file__).parent / "fixtures" / "traces"
AZURE = FIXTURES / "azure_code_2023_12min.csv"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_azure_excerpt_is_read_whole_and_in_order():
    trace = load_trace(AZURE)
    assert trace.format == "azure" and len(trace.requests) == 1966
    first, last = trace.requests[0], trace.requests[-1]
    assert (first.t, first.input_tokens, first.output_tokens, first.row) == (0.0, 4808, 10, 2)
    assert last.t == pytest.approx(675.95, abs=0.01) and last.t >= 600  # at least ten minutes of trace time
    # 18:17:03.9799600 -> 18:17:04.0319600: seven fraction digits, read exactly
    assert trace.requests[1].t == pytest.approx(0.052, abs=1e-6)
    assert all(a.t <= b.t for a, b in zip(trace.requests, trace.requests[1:], strict=False))


def test_a_window_starts_at_zero_and_keeps_the_trace_gaps():
    trace = load_trace(AZURE)
    window = trace.window(0.0, 40.0, None)
    assert window[0].t == 0.0 and all(r.t < 40.0 for r in window)
    assert len(trace.window(0.0, None, 25)) == 25
    later = trace.window(180.0, 10.0, None)  # the trace is silent from 39.3 s to 183.1 s
    assert later[0].t == 0.0 and later[0].row > window[-1].row
    with pytest.raises(ConfigError, match="no request of the trace falls in the window"):
        trace.window(60.0, 100.0, None)


def test_thinning_keeps_the_shape_of_ten_minutes_at_a_lower_rate():
    trace = load_trace(AZURE)
    full = trace.window(0.0, 600.0, None)
    thin = trace.window(0.0, 600.0, None, sample=0.05, seed=7)
    assert thin == trace.window(0.0, 600.0, None, sample=0.05, seed=7)  # seeded
    assert 0.03 * len(full) < len(thin) < 0.07 * len(full)
    assert thin[-1].t > 500  # still spans the ten minutes (times relative to the first kept request)
    assert {r.row for r in thin} <= {r.row for r in full}


def test_burstgpt_skips_and_counts_requests_that_failed_in_production(tmp_path):
    path = write(
        tmp_path,
        "burst.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118,GPT-4,417,276,693,API log\n",
    )
    trace = load_trace(path)
    assert trace.format == "burstgpt" and trace.skipped == {"failed_in_trace": 1}
    assert [(r.t, r.input_tokens, r.output_tokens) for r in trace.requests] == [(0.0, 472, 18), (113.0, 417, 276)]


def test_mooncake_keeps_the_prefix_blocks_and_reads_milliseconds(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [0, 1, 2]},
        {"timestamp": 250, "input_length": 700, "output_length": 5, "hash_ids": [0, 3]},
    ]
    path = write(tmp_path, "mooncake.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    trace = load_trace(path)
    assert trace.format == "mooncake" and trace.block_tokens == 512
    assert trace.requests[1].t == 0.25 and trace.requests[1].hash_ids == (0, 3)


def test_the_harness_jsonl_with_blocks_and_without_an_output_length(tmp_path):
    path = write(
        tmp_path,
        "own.jsonl",
        '{"time_s": 1.5, "input_tokens": 40, "hash_ids": [7, 8], "block_tokens": 16}\n'
        '{"time_s": 2.0, "input_tokens": 20, "output_tokens": 4}\n',
    )
    trace = load_trace(path)
    assert trace.format == "jsonl" and trace.block_tokens == 16
    assert [(r.t, r.output_tokens) for r in trace.requests] == [(0.0, 0), (0.5, 4)]


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("empty.csv", "", "the file is empty"),
        ("blank.csv", "\n\n", "the file is empty"),
        ("header.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "no request to replay"),
        ("unknown.csv", "a,b,c\n1,2,3\n", "the format is not one the harness reads"),
        ("json.jsonl", '{"x": 1}\n', "the format is not one the harness reads"),
        (
            "order.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05.0,10,1\n2023-11-16 18:17:04.0,10,1\n",
            "row 3: .*out of order",
        ),
        ("neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05.0,-4,1\n", "row 2: ContextTokens"),
        ("nan.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05.0,ten,1\n", "not a number"),
        ("date.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,1\n", "row 2: TIMESTAMP"),
        ("short.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05.0,10\n", "row 2: expected 3"),
        ("broken.jsonl", '{"time_s": 0, "input_tokens": 5}\n{"time_s": 1,\n', "row 2: not a JSON object"),
        ("ids.jsonl", '{"time_s": 0, "input_tokens": 5, "hash_ids": [1]}\n', "without block_tokens"),
        ("frac.jsonl", '{"time_s": 0, "input_tokens": 5.5}\n', "row 1: input_tokens"),
    ],
)
def test_a_bad_trace_names_the_file_the_row_and_the_fix(tmp_path, name, text, says):
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=says) as caught:
        load_trace(path)
    assert str(path) in caught.value.cause and caught.value.fix


def test_a_missing_trace_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_trace(tmp_path / "absent.csv")


def test_datasets_in_their_three_shapes(tmp_path):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"prompt": "Name a prime.", "output_tokens": 7},
    ]
    chat = load_dataset(write(tmp_path, "chat.jsonl", "\n".join(json.dumps(x) for x in lines)))
    assert chat.format == "messages" and len(chat.entries) == 2
    first, second = chat.entries
    assert first.chat() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert first.reference == "Hello." and second.output_tokens == 7 and second.chat()[0]["role"] == "user"
    share = [{"conversations": [{"from": "human", "value": "Why is the sky blue?"}, {"from": "gpt", "value": "Air."},
                                {"from": "human", "value": "And red at dusk?"}]}]  # fmt: skip
    sharegpt = load_dataset(write(tmp_path, "share.json", json.dumps(share)))  # a JSON array, as ShareGPT dumps are
    assert sharegpt.format == "sharegpt"
    assert sharegpt.entries[0].chat() == [{"role": "user", "content": "Why is the sky blue?"}]
    assert sharegpt.entries[0].reference == "Air."


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "the file is empty"),
        ('{"prompt": "a"}\n{"prompt": ""}\n', "line 2: prompt must be non-empty"),
        ('{"question": "a"}\n', "line 1: the entry has none of messages, conversations or prompt"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "no user message"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "role system, user or assistant"),
        ('{"conversations": [{"from": "gpt", "value": "x"}]}\n', "no human turn"),
        ('{"prompt": "a", "output_tokens": 0}\n', "output_tokens=0"),
        ('{"prompt": "a"}\nnot json\n', "line 2: not a JSON object"),
    ],
)
def test_a_bad_dataset_names_the_file_the_line_and_the_fix(tmp_path, text, says):
    path = write(tmp_path, "d.jsonl", text)
    with pytest.raises(ConfigError, match=says) as caught:
        load_dataset(path)
    assert str(path) in caught.value.cause


def test_a_long_point_folder_name_is_shortened_and_stays_unique():
    from harness.config.compose import FOLDER_NAME_BYTES, folder_name

    short = "bench=serve,model=smollm2"
    assert folder_name(short) == short and folder_name("workflow.cases=a/b.json") == "workflow.cases=a%2Fb.json"
    long_a = "bench.trace=" + "x" * 300 + ",model=smollm2"
    long_b = "bench.trace=" + "x" * 300 + ",model=qwen"
    a, b = folder_name(long_a), folder_name(long_b)
    assert len(a.encode()) <= FOLDER_NAME_BYTES and a != b and a.startswith("bench.trace=xxx")
    assert folder_name("é" * 300) != folder_name("é" * 301) and len(folder_name("é" * 300).encode()) <= 200
