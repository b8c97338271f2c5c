"""Benchmark jobs: the structural allow-list (hand-picked escapes, a property test over generated overrides, and a
schemathesis fuzz of the running server), limits, cancel, persistence across restarts and a clean shutdown."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import asdict

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TOKEN, Http, serving
from harness.config import GROUPS, group_options
from harness.errors import ConfigError
from harness.overrides import schema_fields
from harness.processes import job_environment
from harness.server import ServerSettings, create_app
from harness.server.job_fields import ALLOWED, REFUSED
from harness.server.jobs import JobLimits, JobRunner, check_overrides, compose_job
from harness.server.settings import JobTarget, parse_job_targets
from tests.mock_openai import FINISH, ROLE, MockServer, Script, content, usage_only

LONG_JOB = ["model=tiny-gpt2", "bench=latency", "bench.min_seconds=120", "bench.max_runs=200",
            "bench.target_rel_ci=0.0001", "bench.prompt_lengths=[256]", "bench.max_new_tokens=64"]  # fmt: skip
# Fields that decide what this machine reads, runs or trusts: a job must never change them.
PROTECTED = {
    "model.path": None,
    "model.source": None,
    "model.hub_id": None,
    "model.gguf_package": None,
    "model.gguf_file": None,
    "model.trust_remote_code": None,
    "model.architecture": None,
    "bench.name": None,
    "workflow.cases": None,
    "workflow.corpus": None,
    "quant.calibration": None,
    "cache_dir": None,
    "isolation": None,
    "point_memory_limit_mb": None,
}


def compose(overrides, cache_dir="/tmp/harness-job-cache", target=None):
    return compose_job(check_overrides(overrides), cache_dir, False, JobLimits(max_new_tokens=64), target)


def flat(data, prefix=""):
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for k, v in data.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def assert_only_allowed_changes(cfg, point):
    """The invariant: a job's config equals its group options' own except in the positive list's fields (each
    within the values HTTP allows it), and the fields that name files or code are exactly the entry's."""
    base, _ = compose([f"{g}={point[g]}" for g in GROUPS])
    ours, theirs = flat(asdict(cfg)), flat(asdict(base))
    changed = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert changed <= set(ALLOWED), changed - set(ALLOWED)
    for key in changed:
        assert ALLOWED[key].values is None or ours[key] in ALLOWED[key].values, (key, ours[key])
    for key in PROTECTED:
        assert ours.get(key) == theirs.get(key), key
    assert cfg.model.trust_remote_code is False and cfg.bench.name == point["bench"]
    # no URL, key variable, program or command line leaves the server's defaults
    assert cfg.bench.target == "harness" and cfg.bench.base_url is None and cfg.bench.api_key_env is None
    assert cfg.engine.base_url is None and cfg.engine.api_key_env is None and cfg.engine.python is None
    assert cfg.engine.server_args == [] and cfg.engine.launch == theirs["engine.launch"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bench={name:'os:system'}", "takes an option's name"),
        ("bench={name:'this:x'}", "takes an option's name"),
        ("model={path:'/etc'}", "takes an option's name"),
        ("model={trust_remote_code:true}", "takes an option's name"),
        ("workflow={cases:'/etc/passwd'}", "takes an option's name"),
        ("+bench.name=os:system", "no +, ++ or ~"),
        ("++model.path=/etc", "no +, ++ or ~"),
        ("~model.path", "no +, ++ or ~"),
        ("model@bench=tiny-gpt2", "package"),
        ("bench.prompt_lengths={a:1}", "list of plain values"),
        ("bench.prompt=[a,b]", "plain value"),
        ("bench.prompt='${oc.env:HARNESS_API_TOKEN}'", "interpolation"),
        ('bench.prompt="${oc.env:HARNESS_API_TOKEN}"', "interpolation"),
        ("seed=range(1,3)", "a job is one point"),
        ("bench.prompt=choice(a,b)", "a job is one point"),
        ("cache_dir=/tmp/elsewhere", "not allowed over HTTP"),
        ("isolation=inline", "not allowed over HTTP"),
        ("model.source=path", "not allowed over HTTP"),
        ("model.gguf_package=os", "not allowed over HTTP"),
        ("model.architecture.n_layer=99", "not allowed over HTTP"),
        ("hydra.job.chdir=true", "not allowed over HTTP"),
        ("experiment=quant_sweep", "not allowed over HTTP"),
        ("workflow.corpus=/etc", "not allowed over HTTP"),
        ("quant.name=x", "not allowed over HTTP"),
        ("bench.target=url", "takes only harness"),
        ("bench.target=vllm", "takes only harness"),
        ("bench.target=engine", "takes only harness"),
        ("bench.base_url=http://127.0.0.1:9/v1", "names a URL"),
        ("bench.api_key_env=HARNESS_API_TOKEN", "names an environment variable"),
        ("engine.base_url=http://127.0.0.1:9/v1", "names a URL"),
        ("engine.api_key_env=HOME", "names an environment variable"),
        ("engine.launch=vllm", "chooses a program"),
        ("engine.python=/bin/sh", "names an executable"),
        ("engine.server_args=[--evil]", "a command line"),
        ("engine.served_model=x", "not allowed over HTTP"),
        ("quant.method=gptq", "choose the option instead"),
        ("point_memory_limit_mb=100000", "not allowed over HTTP"),
        ("bench.served_model=x", "picked no target"),
        ("engine.max_batch_requests=1000", "limit for a job"),
        ("bench.num_requests=100000", "limit for a job"),
        ("engine.threads=100000", "limit for a job"),
        ("engine.kv_cache_tokens=100000000", "limit for a job"),
        ("bench.turns=1000", "limit for a job"),
        ("bench.max_runs=100000", "limit for a job"),
        ("bench.min_seconds=1e9", "limit for a job"),
        ("bench.concurrency=[1000]", "limit for a job"),
        ("bench.max_new_tokens=65", "limit for a job"),
        ("model=tiny-gpt2 bench=latency", "does not parse"),
        ("bench.trace=/etc/passwd", "names a file"),
        ("bench.dataset=/etc/passwd", "names a file"),
        ("bench.workload=trace", "takes only synthetic"),
        ("bench.workload=dataset", "takes only synthetic"),
        ("bench.trace_speedup=2", "shapes a trace replay"),
        ("bench.trace_sample=0.5", "shapes a trace replay"),
        ("bench.dataset_output=forced", "shapes a dataset replay"),
    ],
)
def test_escapes_and_excess_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        compose(["model=tiny-gpt2", override])


def test_a_llamacpp_context_beyond_the_job_limits_is_refused():
    with pytest.raises(ConfigError, match="engine.n_ctx=1e\\+06 is above this server's limit for a job"):
        compose(["model=smollm2", "engine=llamacpp", "engine.n_ctx=1000000"])


def test_a_job_may_set_the_load_accounting_fields_that_name_nothing():
    cfg, point = compose(["model=tiny-gpt2", "bench=serve", "bench.workload=multi_turn", "bench.replies=real",
                          "bench.think_time_s=0.5", "bench.cache_salt=none", "bench.token_mismatch_limit=0.1",
                          "bench.slo.ttft_answer_ms=900"])  # fmt: skip
    b = cfg.bench
    assert (b.replies, b.think_time_s, b.cache_salt, b.token_mismatch_limit) == ("real", 0.5, "none", 0.1)
    assert b.slo.ttft_answer_ms == 900 and b.trace is None and b.dataset is None
    assert_only_allowed_changes(cfg, point)


def test_an_allowed_job_composes_only_what_it_may_change():
    cfg, point = compose(["model=tiny-gpt2", "bench=latency", "bench.prompt_lengths=[16,32]", "seed=3",
                          "quant.llm_int8_threshold=5.0", "model.dtype=float32", "attention=eager"])  # fmt: skip
    assert cfg.bench.prompt_lengths == [16, 32] and cfg.seed == 3 and point["attention"] == "eager"
    assert cfg.cache_dir == "/tmp/harness-job-cache" and cfg.isolation == "process" and cfg.force
    assert_only_allowed_changes(cfg, point)


_KEYS = st.sampled_from(
    [*GROUPS, *ALLOWED, *REFUSED, *PROTECTED, "hydra.run.dir", "experiment", "print_text", "model", "bench.x", "a.b"]
)
_SCALARS = st.one_of(
    st.sampled_from([o for g in GROUPS for o in group_options(g)]),
    st.integers(-10, 10**6).map(str),
    st.sampled_from(
        [
            "true",
            "null",
            "1e9",
            "os:system",
            "/etc/passwd",
            "~",
            "..",
            "'a b'",
            "\\'",
            '"x"',
            "url",
            "http://127.0.0.1:9/v1",
            "HARNESS_API_TOKEN",
            "harness",
            "vllm",
            "[--x]",
        ]
    ),
    st.text(min_size=0, max_size=40),
    st.text(alphabet="ab:/._-", min_size=200, max_size=400),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
    st.tuples(st.sampled_from(["name", "path", "cases", "trust_remote_code"]), _SCALARS).map(
        lambda kv: "{" + f"{kv[0]}:{kv[1]}" + "}"
    ),
    _SCALARS.map(lambda v: "${" + v + "}"),
    _SCALARS.map(lambda v: "${oc.env:" + v + "}"),
    st.lists(_SCALARS, min_size=2, max_size=3).map(",".join),
    _SCALARS.map(lambda v: f"choice({v})"),
)
_OVERRIDES = st.tuples(st.sampled_from(["", "", "", "+", "++", "~"]), _KEYS, st.sampled_from(["=", "@x=", "", "=="]),
                       _VALUES).map(lambda t: f"{t[0]}{t[1]}{t[2]}{t[3]}")  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_OVERRIDES, min_size=1, max_size=3))
def test_no_generated_override_escapes_the_allow_list(overrides):
    try:
        cfg, point = compose(["model=tiny-gpt2", *overrides])
    except ConfigError:
        return
    assert_only_allowed_changes(cfg, point)


def test_every_schema_field_is_allowed_or_refused_once_with_its_reason():
    fields = {k for k in schema_fields() if k not in GROUPS}  # a group itself is chosen as group=option
    undecided = fields - set(ALLOWED) - set(REFUSED)
    assert not undecided, f"decide in harness/server/job_fields.py whether a job may set: {sorted(undecided)}"
    assert not set(ALLOWED) & set(REFUSED)
    assert not (set(ALLOWED) | set(REFUSED)) - fields, "the list names fields the schemas no longer have"
    assert all(a.why for a in ALLOWED.values()) and all(REFUSED.values())


def test_a_field_on_no_list_is_refused(monkeypatch):
    """A field added to a schema later is unreachable over HTTP until someone puts it on the list."""
    import harness.server.jobs as jobs

    fields = {**schema_fields(), "bench.new_field": int}
    monkeypatch.setattr(jobs, "schema_fields", lambda: fields)
    with pytest.raises(ConfigError, match="not on the list of fields a job may set"):
        check_overrides(["bench.new_field=3"])


def test_a_jobs_environment_holds_no_credential():
    source = {
        "PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0",
        "HARNESS_CACHE_DIR": "/c", "HF_HUB_OFFLINE": "1", "HARNESS_API_TOKEN": "t", "HARNESS_DB_PASSWORD": "p",
        "HF_TOKEN": "h", "OPENAI_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "GITHUB_TOKEN": "g", "SOMETHING": "x",
    }  # fmt: skip
    assert job_environment(source) == {
        "PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0",
        "HARNESS_CACHE_DIR": "/c", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    assert job_environment(source, {"LAB_KEY": "k2"})["LAB_KEY"] == "k2"  # what the server itself hands over


def test_job_targets_are_the_operators_exact_urls_and_keys(monkeypatch):
    monkeypatch.setenv("LAB_KEY", "k")
    targets = parse_job_targets(["http://127.0.0.1:9/v1,lab=http://10.0.0.5:8000/v1/"], ["lab=LAB_KEY"])
    assert targets == [JobTarget("0", "http://127.0.0.1:9/v1"), JobTarget("lab", "http://10.0.0.5:8000/v1", "LAB_KEY")]
    for specs, keys, says in [
        (["ftp://x/v1"], [], "is not an http(s) URL"),
        (["a=http://x/v1,a=http://y/v1"], [], "names a target twice"),
        (["9x=http://x/v1"], [], "is not a target name"),
        (["http://x/v1"], ["lab=LAB_KEY"], "does not name a target"),
        (["lab=http://x/v1"], ["lab=NO_SUCH_VARIABLE_HERE"], "is not set"),
    ]:
        with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_job_targets(specs, keys)


def test_a_target_job_is_a_serve_point_aimed_at_the_target(monkeypatch):
    monkeypatch.setenv("LAB_KEY", "k")
    lab = JobTarget("lab", "http://127.0.0.1:9/v1", "LAB_KEY")
    cfg, _ = compose(["model=tiny-qwen2", "bench=serve", "bench.served_model=m"], target=lab)
    assert (cfg.bench.target, cfg.bench.base_url, cfg.bench.api_key_env) == ("url", lab.base_url, "LAB_KEY")
    with pytest.raises(ConfigError, match="add bench=serve"):
        compose(["model=tiny-qwen2", "bench=latency"], target=lab)
    with pytest.raises(ConfigError, match="cannot be applied to a server that is already running"):
        compose(["model=tiny-qwen2", "bench=serve", "quant=8bit"], target=lab)


def test_the_exfiltration_replay_sends_nothing(job_server, monkeypatch):
    """The report's replay: a job naming a URL and the server's own token variable. Nothing may reach the URL."""
    monkeypatch.setenv("HARNESS_API_TOKEN", TOKEN)
    http = job_server["http"]
    with MockServer({"tiny-qwen2": Script()}) as listener:
        attempts = [
            ["model=tiny-qwen2", "bench=serve", "bench.target=url", f"bench.base_url={listener.base_url}",
             "bench.api_key_env=HARNESS_API_TOKEN", "bench.num_requests=1", "bench.concurrency=[1]", "bench.rates=[]"],
            ["model=tiny-qwen2", "engine=openai", "bench=smoke", f"engine.base_url={listener.base_url}",
             "engine.launch=none", "engine.api_key_env=HARNESS_API_TOKEN"],
            ["model=tiny-qwen2", "bench=serve", "bench.target=engine", "engine=openai",
             f"engine.base_url={listener.base_url}"],
        ]  # fmt: skip
        for overrides in attempts:
            status, body = http.json("POST", "/benchmarks", {"overrides": overrides})
            assert status == 400 and "not allowed over HTTP" in body["error"]["message"], body
        status, body = http.json("POST", "/benchmarks", {"overrides": ["model=tiny-qwen2"], "target": "0"})
        assert status == 400 and "not one of this server's job targets (none)" in body["error"]["message"]
        time.sleep(1)
        assert listener.requests == []
    assert http.json("GET", "/benchmarks")[1]["data"] == []


def test_a_job_loads_exactly_the_operators_target_with_the_operators_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_API_TOKEN", TOKEN)
    monkeypatch.setenv("LAB_KEY", "operator-key")
    events = [(0.0, ROLE), (0.0, content("a")), (0.0, content(" b")), (0.0, FINISH), (0.0, usage_only(2)),
              (0.0, "[DONE]")]  # fmt: skip
    with MockServer({"tiny-qwen2": Script(events)}, api_key="operator-key") as lab:
        settings = ServerSettings(
            token=TOKEN,
            max_tokens_limit=64,
            default_max_tokens=16,
            jobs_dir=str(tmp_path / "jobs"),
            job_targets=parse_job_targets([f"lab={lab.base_url}"], ["lab=LAB_KEY"]),
        )
        with serving(create_app(settings)) as base:
            http = Http(base)
            overrides = ["model=tiny-qwen2", "bench=serve", "bench.api=chat", "bench.num_requests=3",
                         "bench.warmup_runs=0", "bench.concurrency=[1]", "bench.rates=[]", "bench.calibrate=false",
                         "bench.scrape_metrics=false", "bench.max_new_tokens=2",
                         "bench.prompt_lengths=[16]"]  # fmt: skip
            status, job = http.json("POST", "/benchmarks", {"overrides": overrides, "target": "lab"})
            assert status == 202 and job["target"] == "lab", job
            done = wait_for(lambda: (j := http.json("GET", f"/benchmarks/{job['id']}")[1])["finished"] and j)
            assert done["status"] == "ok", done["result"]["error"]
            assert done["result"]["config"]["bench"]["base_url"] == lab.base_url
            assert done["result"]["metrics"]["completed[concurrency=1]"]["mean"] == 3
            saved = json.loads((tmp_path / "jobs" / job["id"] / "point.json").read_text())
            assert saved["config"]["bench"]["api_key_env"] == "LAB_KEY"  # the variable's name, never its value
            assert "operator-key" not in (tmp_path / "jobs" / job["id"] / "point.json").read_text()
    assert lab.requests and {auth for _, _, auth in lab.requests} == {"Bearer operator-key"}


def test_a_server_launched_by_a_point_dies_when_the_point_is_killed(tmp_path):
    """SIGKILL (a cancel's escalation, the OOM killer) gives the point no chance to stop its server: the kernel's
    parent-death signal must."""
    from harness.config import load_config
    from runners.execute import start_point

    cfg = load_config(["model=tiny-qwen2", "bench=serve", "bench.num_requests=200", "bench.rates=[]",
                       "bench.concurrency=[1]", "bench.calibrate=false", "bench.max_new_tokens=64"])  # fmt: skip
    proc = start_point(cfg, tmp_path, {"model": "tiny-qwen2"}, "attempt", "digest", stdout=subprocess.DEVNULL)
    try:

        def launched_server():
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if "serve" in child.cmdline() and "harness.cli" in child.cmdline():
                        return child
            return None

        server = wait_for(launched_server, timeout=180)
        wait_for(lambda: "serving on" in (tmp_path / "server.log").read_text(), timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t0 = time.time()
        wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, timeout=10, step=0.1)
        assert time.time() - t0 < 10
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- the running server ----------------------------------------------------------------------------------------
def wait_for(check, timeout=120, step=0.2):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, "timed out"
        time.sleep(step)


@pytest.fixture()
def job_server(tmp_path):
    settings = ServerSettings(
        token=TOKEN, max_tokens_limit=64, default_max_tokens=16, jobs_dir=str(tmp_path / "jobs"), job_max_seconds=600
    )
    app = create_app(settings)
    with serving(app) as base:
        yield {"http": Http(base), "app": app, "jobs": tmp_path / "jobs"}


def point_process(job_folder):
    """The live `python -m runners <job folder>` process, or None."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[-2:] == ["runners", str(job_folder)]:
            return p
    return None


def test_a_running_job_is_cancelled_with_its_whole_process_group(job_server, monkeypatch):
    monkeypatch.setenv("HARNESS_API_TOKEN", TOKEN)
    monkeypatch.setenv("MY_CLOUD_SECRET_KEY", "s3cr3t")
    http = job_server["http"]
    status, job = http.json("POST", "/benchmarks", {"overrides": LONG_JOB})
    assert status == 202, job
    folder = job_server["jobs"] / job["id"]
    wait_for(lambda: http.json("GET", f"/benchmarks/{job['id']}")[1]["status"] == "running")
    child = wait_for(lambda: point_process(folder))
    env = child.environ()  # the job's process holds no credential of the server's
    assert "HARNESS_API_TOKEN" not in env and "MY_CLOUD_SECRET_KEY" not in env and env["PATH"] == os.environ["PATH"]
    time.sleep(3)  # inside its bench
    status, cancelled = http.json("DELETE", f"/benchmarks/{job['id']}")
    assert status == 200 and cancelled["status"] == "cancelled"
    done = wait_for(lambda: (j := http.json("GET", f"/benchmarks/{job['id']}")[1])["finished"] and j)
    assert done["status"] == "cancelled" and done["result"]["error"]["type"] == "Interrupted"
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    saved = json.loads((folder / "job.json").read_text())
    assert saved["status"] == "cancelled"
    status, again = http.json("DELETE", f"/benchmarks/{job['id']}")
    assert status == 409 and "already ended" in again["error"]["message"]
    assert http.json("DELETE", "/benchmarks/nope")[0] == 404


def test_a_job_past_its_time_limit_is_stopped(tmp_path):
    runner = JobRunner(tmp_path / "jobs", limits=JobLimits(max_seconds=8))
    try:
        # bench.min_seconds may equal the limit; loading the model on top of it runs past the limit
        job = runner.submit([o for o in LONG_JOB if "min_seconds" not in o] + ["bench.min_seconds=8"])
        wait_for(lambda: runner.get(job.id).finished, timeout=120)
        assert job.status == "failed" and job.error["type"] == "JobTimeout"
        assert not point_process(job.folder)
    finally:
        runner.shutdown()


def test_jobs_survive_a_restart_and_say_when_they_were_interrupted(tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / "old-running").mkdir(parents=True)
    (jobs / "old-running" / "job.json").write_text(json.dumps(
        {"id": "old-running", "status": "running", "overrides": ["model=tiny-gpt2"], "point": {}, "submitted": 1.0}
    ))  # fmt: skip
    (jobs / "old-ok").mkdir()
    (jobs / "old-ok" / "job.json").write_text(json.dumps(
        {"id": "old-ok", "status": "ok", "overrides": [], "point": {}, "submitted": 2.0, "finished": 3.0}
    ))  # fmt: skip
    (jobs / "junk").mkdir()
    (jobs / "junk" / "job.json").write_text("[1]")
    runner = JobRunner(jobs)
    try:
        assert [j.id for j in runner.all()] == ["old-running", "old-ok"]
        assert runner.get("old-running").status == "interrupted" and runner.get("old-ok").status == "ok"
        assert "stopped before this job finished" in runner.get("old-running").error["message"]
        assert json.loads((jobs / "old-running" / "job.json").read_text())["status"] == "interrupted"
    finally:
        runner.shutdown()


def test_server_shutdown_stops_its_jobs_and_leaves_no_process(tmp_path):
    from test_server import free_port

    port, jobs = free_port(), tmp_path / "jobs"
    cmd = [sys.executable, "-m", "harness.cli", "serve", "--port", str(port), "--jobs-dir", str(jobs)]
    env = {**os.environ, "HARNESS_API_TOKEN": TOKEN}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    http = Http(f"http://127.0.0.1:{port}")
    try:

        def up():
            try:
                return http("GET", "/health", token=None)[0] == 200
            except urllib.error.URLError:
                return False

        wait_for(up, timeout=60)
        status, job = http.json("POST", "/benchmarks", {"overrides": LONG_JOB})
        assert status == 202, job
        child = wait_for(lambda: point_process(jobs / job["id"]))
        time.sleep(2)
        t0 = time.time()
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
        assert time.time() - t0 < 30, "the server took too long to stop"
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=15)
        saved = json.loads((jobs / job["id"] / "job.json").read_text())
        assert saved["status"] == "interrupted"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    again = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(up, timeout=60)
        listed = http.json("GET", "/benchmarks")[1]["data"]
        assert [(j["id"], j["status"]) for j in listed] == [(job["id"], "interrupted")]
    finally:
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=60)
    assert again.returncode == 0


# -- schemathesis: the whole API against its own OpenAPI schema -----------------------------------------------------
def _fuzzer(op, http, accepted, failures):
    """A hypothesis test of one operation: no 5xx, every error in OpenAI's shape, accepted jobs recorded (and
    cancelled at once: the fuzz checks what the server accepts, not the points it would measure)."""

    @settings(max_examples=40 if op.path == "/benchmarks" else 15, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=op.as_strategy())
    def fuzz(case):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
        response = case.call(base_url=http.base, timeout=60)
        where = (op.method, op.path, case.body, case.path_parameters, response.status_code)
        if response.status_code >= 500:
            failures.append((*where, response.text[:300]))
        try:
            body = json.loads(response.content)
        except ValueError:  # /metrics answers Prometheus text
            body = {}
        if response.status_code >= 400 and not (isinstance(body, dict) and "message" in body.get("error", {})):
            failures.append((*where, "not OpenAI's error shape: " + response.text[:200]))
        if op.path == "/benchmarks" and op.method.upper() == "POST" and response.status_code == 202:
            accepted.append(case.body.get("overrides", []))
            http("DELETE", f"/benchmarks/{body['id']}")

    return fuzz


def test_fuzz_the_api_with_schemathesis(job_server):
    schemathesis = pytest.importorskip("schemathesis")
    http = job_server["http"]
    schema = schemathesis.openapi.from_url(http.base + "/openapi.json")
    accepted, failures, fuzzed = [], [], []
    for operation in schema.get_all_operations():
        op = operation.ok()
        if op.path.startswith("/models/") and op.method.upper() == "POST":
            continue  # loading models by generated names: 404s only, and slow when a name happens to exist
        _fuzzer(op, http, accepted, failures)()
        fuzzed.append(f"{op.method.upper()} {op.path}")
    assert "POST /benchmarks" in fuzzed and "DELETE /benchmarks/{job_id}" in fuzzed
    assert not failures, failures[:5]
    for overrides in accepted:  # whatever the server accepted composes within the allow-list
        cfg, point = compose(overrides)
        assert_only_allowed_changes(cfg, point)


def test_a_job_may_set_this_sessions_measurement_fields_and_not_the_machine_pinning():
    cfg, point = compose(
        [
            "model=tiny-gpt2",
            "bench=serve",
            "bench.workload=search_qa",
            "bench.grade=on",
            "bench.search_target=correct_goodput",
            "bench.search=max_rate",
            "bench.slo.ttft_ms=900",
            "bench.search_max_requests=40",
            "bench.trials=2",
            "bench.gauge_interval_s=1",
            "energy=off",
            "energy_idle_s=1",
            "cost.per_hour=2",
            "cost.currency=EUR",
            "cost.per=gpu",
        ]
    )
    assert (cfg.bench.trials, cfg.cost.currency, cfg.energy, cfg.bench.grade) == (2, "EUR", "off", "on")
    assert_only_allowed_changes(cfg, point)
    refused = ("engine.cpus=[0]", "bench.client_cpus=[0]", "cost={per_hour:1}", "tracking=mlflow",
               "tracking_uri=http://10.0.0.1:5000", "telemetry.otlp_endpoint=http://10.0.0.1:4318",
               "engine.tensor_parallel=2", "engine.pipeline_parallel=2", "model.device_map=auto",
               "bench.client_hosts=2", "bench.ray_address=ray://10.0.0.1:10001")  # fmt: skip
    for field in refused:
        with pytest.raises(ConfigError, match="not allowed over HTTP"):
            check_overrides([field])
    with pytest.raises(ConfigError, match="bench.search_max_requests=1e\\+06 is above this server's limit"):
        compose(
            [
                "model=tiny-gpt2",
                "bench=serve",
                "bench.search=max_rate",
                "bench.slo.ttft_ms=9",
                "bench.search_max_requests=1000000",
            ]
        )
