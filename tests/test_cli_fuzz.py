"""Property tests of the command line: generated override sets, drawn from the schemas' fields with junk values,
end in a clean outcome (exit 0, or 2 with one paragraph that says the fix, or a point failed with a named cause),
never a traceback or an "unexpected error"."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_harness
from harness.errors import ConfigError
from harness.overrides import schema_fields
from runners.sweep import precheck

FIELDS = sorted(
    k
    for k, kind in schema_fields().items()
    if "." in k and not k.startswith(("model.architecture", "model.tokenizer")) and "Config" not in str(kind)
)
# Values a person might type, or mistype. Numbers stay small: a bench told to run 1e6 s would, rightly.
TYPED = ["0.5", "-1.5", "1e-3", "true", "false", "null", "[]", "[1,2]", "[0]", "[a]", "{}", "{a:1}", "abc",
         "'two words'", "''", "auto", "cpu", "cuda:0", "bfloat16", "template", "e2e_ms", "nf4", "/nonexistent",
         "${oc.env:HOME}", "x,y"]  # fmt: skip
JUNK = st.one_of(
    st.integers(-3, 3).map(str),
    st.sampled_from(TYPED),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).map(
        lambda t: "'" + t.replace("'", "").replace("\\", "") + "'"
    ),
)
_KINDS = schema_fields()


def plausible(field: str) -> st.SearchStrategy[str]:
    """A value of the field's own type, in a small range: most of these compose, so points run."""
    kind = str(_KINDS.get(field, "str"))
    if "list" in kind:
        return st.lists(st.integers(1, 3), min_size=1, max_size=2).map(lambda v: "[" + ",".join(map(str, v)) + "]")
    if "bool" in kind:
        return st.sampled_from(["true", "false"])
    if "int" in kind:
        return st.integers(0, 3).map(str)
    if "float" in kind:
        return st.sampled_from(["0", "0.01", "0.5", "1", "1.5"])
    return st.sampled_from(["auto", "cpu", "float32", "plain", "chatml", "nf4", "'Say hi.'", "null"])


FIELD = st.sampled_from([*FIELDS, "seed", "bench.max_new_token", "modle.dtype", "report", "force"])
OVERRIDE = st.one_of(
    FIELD.flatmap(lambda f: plausible(f).map(lambda v: f"{f}={v}")),
    FIELD.flatmap(lambda f: plausible(f).map(lambda v: f"{f}={v}")),
    st.tuples(st.sampled_from(["", "+"]), FIELD, JUNK).map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(OVERRIDE, min_size=1, max_size=4))
def test_precheck_answers_every_override_set_with_ok_or_a_config_error(overrides):
    try:
        precheck(["model=tiny-gpt2", *overrides], multirun=False)
    except ConfigError as exc:
        assert exc.cause and exc.fix and "at most 0" not in str(exc)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(OVERRIDE, min_size=1, max_size=2), st.sampled_from(["smoke", "latency"]))
def test_the_command_line_never_ends_in_a_traceback(tmp_path_factory, overrides, bench):
    cwd = tmp_path_factory.mktemp("fuzz")
    fast = ["model=tiny-gpt2", f"bench={bench}", "bench.max_new_tokens=2", "bench.prompt_lengths=[8]",
            "bench.min_runs=1", "bench.max_runs=2", "bench.min_seconds=0", "isolation=inline"]  # fmt: skip
    proc = run_harness(cwd, *fast, *overrides, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode in (0, 1, 2), out[-3000:]
    if proc.returncode == 2:
        assert "Fix:" in proc.stderr
    if proc.returncode == 1:  # the point ran and failed: its cause is one the harness names, with the fix
        (result,) = [json.loads(p.read_text()) for p in cwd.rglob("result.json")]
        assert result["status"] == "failed" and "unexpected error" not in result["error"]["hint"], result["error"]


def test_precheck_reports_the_keys_an_experiment_preset_sweeps():
    # The summary lines name the swept keys: a preset's own sweep counts as much as the command line's.
    assert precheck(["experiment=model_quality"], multirun=True) >= {"model", "quant", "workflow"}
    assert precheck(["model=tiny-gpt2", "seed=1,2"], multirun=True) == {"seed"}
