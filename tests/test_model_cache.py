import shutil

import pytest

from pyagent.engine import model as model_module
from pyagent.engine.model import (
    cache_dir_for,
    cache_status,
    packaged_gguf,
    prepare,
    verify_cache,
    write_manifest,
)
from pyagent.engine.registry import EMBEDDED, resolve_model
from pyagent.errors import ModelError

SHA = "ab" * 32


@pytest.fixture
def cached(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights" * 100)
    (directory / "config.json").write_text("{}")
    write_manifest(directory, "source.gguf", SHA)
    return directory


def test_an_intact_cache_verifies(cached):
    assert verify_cache(cached, SHA) is None


def test_a_flipped_byte_is_detected(cached):
    data = bytearray((cached / "model.safetensors").read_bytes())
    data[10] ^= 1
    (cached / "model.safetensors").write_bytes(bytes(data))
    assert verify_cache(cached, SHA) == "checksum mismatch in model.safetensors"


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: (d / "config.json").unlink(), "missing config.json"),
    (lambda d: (d / "pyagent-cache.json").unlink(), "no manifest"),
    (lambda d: (d / "pyagent-cache.json").write_text("{not json"), "unreadable manifest"),
])
def test_damaged_caches_are_refused(cached, damage, reason):
    damage(cached)
    assert verify_cache(cached, SHA) == reason


def test_a_cache_of_another_source_is_refused(cached):
    assert verify_cache(cached, "cd" * 32) == "manifest for another source or format"


def test_missing_gguf_chunks_are_named(monkeypatch, tmp_path):
    package = pytest.importorskip(EMBEDDED.package)
    gone = tmp_path / "gemma-3-270m-q4_k_m.gguf.part02"
    monkeypatch.setattr(package, "chunk_paths", lambda: [gone])
    with pytest.raises(ModelError, match=f"GGUF chunk files are missing: {gone}"):
        packaged_gguf(EMBEDDED)


@pytest.mark.model
def test_a_corrupt_model_cache_is_rebuilt_not_used(engine, tmp_path, monkeypatch):
    """Copy the real cache, damage it, and check that `prepare` converts the GGUF again."""
    source = engine.loaded.directory
    monkeypatch.setenv("PYAGENT_CACHE_DIR", str(tmp_path))
    _, sha = packaged_gguf(EMBEDDED)
    target = cache_dir_for(EMBEDDED, sha)
    shutil.copytree(source, target)
    assert cache_status(EMBEDDED) == "ready"
    with (target / "tokenizer.json").open("ab") as handle:
        handle.write(b" ")
    assert cache_status(EMBEDDED) == "corrupt (checksum mismatch in tokenizer.json)"
    messages = []
    assert prepare(EMBEDDED, messages.append) == target
    assert any("unusable (checksum mismatch in tokenizer.json); rebuilding" in m for m in messages)
    assert verify_cache(target, sha) is None
    assert model_module.sha256_file(target / "model.safetensors") == \
        model_module.sha256_file(source / "model.safetensors")


@pytest.mark.model
def test_a_user_gguf_file_is_converted_and_cached_by_its_checksum(engine, tmp_path, monkeypatch):
    packaged, sha = packaged_gguf(EMBEDDED)
    mine = tmp_path / "my-model.gguf"
    shutil.copyfile(packaged, mine)
    monkeypatch.setenv("PYAGENT_CACHE_DIR", str(tmp_path / "cache"))
    spec = resolve_model(str(mine))
    assert cache_status(spec) == "not prepared"
    directory = prepare(spec)
    assert directory == cache_dir_for(spec, sha) and directory.name.startswith("my-model-")
    assert cache_status(spec) == "ready"
    assert model_module.sha256_file(directory / "model.safetensors") == \
        model_module.sha256_file(engine.loaded.directory / "model.safetensors")
